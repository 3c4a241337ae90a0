"""lafs_kernels.ops.attention: every backend, forward and backward, against the formula in float64."""

import pytest
import torch

from lafs_kernels import BackendUnavailableError
from lafs_kernels.ops.attention import MAX_HEAD_WIDTH, attention, attention_op, attention_qkv, attention_qkv_op

from helpers.skips import CPU_KERNELS_MISSING, CPU_KERNELS_SKIP_REASON, NEEDS_CPU_KERNELS
from tolerances import assert_close


@pytest.fixture(params=["torch", "cpu"])
def backend(request):
    if request.param == "cpu" and CPU_KERNELS_MISSING:
        pytest.skip(CPU_KERNELS_SKIP_REASON)
    return request.param


def packed_qkv(rng, b, h, t, d, dtype, tq=None):
    """q [b, h, tq, d] and k, v [b, h, t, d] as the blocks make them: views of one [b, t, 3, h, d] tensor,
    rows strided by 3 h d (q: its first tq rows)."""
    qkv = torch.randn(b, t, 3, h, d, generator=rng, dtype=torch.float64).to(dtype).requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return qkv, q[:, :, : t if tq is None else tq], k, v


def formula_float64(q, k, v, scale):
    """softmax(scale q k^T) v written out in float64, with its own autograd."""
    weights = torch.softmax(scale * torch.einsum("bhid,bhjd->bhij", q.double(), k.double()), dim=-1)
    return torch.einsum("bhij,bhjd->bhid", weights, v.double())


# (B, H, Tq, T, d): sequences and rows that are and are not multiples of a vector / an 8-row block (a last block
# of one row has its own path), float32 heads of half a vector (8), one and a half (24) and whole vectors
SHAPES = [
    (1, 1, 1, 1, 1),
    (2, 3, 5, 5, 4),
    (2, 2, 1, 37, 24),  # the last block's cls row over a local view
    (1, 4, 37, 37, 24),
    (2, 1, 17, 33, 16),
    (1, 2, 197, 197, 24),  # a global view of part_fvit_tiny
    (1, 1, 9, 70, 32),
    (3, 2, 25, 25, 8),  # a local view of the default run's size: three whole blocks and a single row
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,h,tq,t,d", SHAPES)
def test_attention_and_its_gradients_match_the_formula(backend, rng, dtype, b, h, tq, t, d):
    qkv, q, k, v = packed_qkv(rng, b, h, t, d, dtype, tq)
    scale = 0.7
    out = attention(q, k, v, scale, backend=backend)
    assert out.shape == (b, h, tq, d) and out.dtype == dtype
    grad_out = torch.randn(out.shape, generator=rng, dtype=torch.float64).to(dtype)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)

    leaf = qkv.detach().double().requires_grad_(True)
    q64, k64, v64 = leaf.permute(2, 0, 3, 1, 4).unbind(0)
    expected = formula_float64(q64[:, :, :tq], k64, v64, scale)
    (expected_grad,) = torch.autograd.grad(expected, leaf, grad_out.double())
    assert_close(out, expected)
    assert_close(grad, expected_grad, scale=4.0)  # each gradient sums T terms of the backward's products


@pytest.mark.parametrize("d", [40, 48, 56, 64])  # padded to 3 and 4 float32 vectors per row (float64 stops at 32)
def test_wide_float32_heads_match_the_formula(backend, rng, d):
    qkv, q, k, v = packed_qkv(rng, 2, 2, 70, d, torch.float32, tq=67)
    out = attention(q, k, v, 0.2, backend=backend)
    grad_out = torch.randn(out.shape, generator=rng)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    leaf = qkv.detach().double().requires_grad_(True)
    q64, k64, v64 = leaf.permute(2, 0, 3, 1, 4).unbind(0)
    expected = formula_float64(q64[:, :, :67], k64, v64, 0.2)
    (expected_grad,) = torch.autograd.grad(expected, leaf, grad_out.double())
    assert_close(out, expected)
    assert_close(grad, expected_grad, scale=4.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,h,t,d", [(1, 1, 1, 1), (2, 3, 37, 24), (1, 2, 197, 24), (2, 1, 70, 32)])
@NEEDS_CPU_KERNELS
def test_packed_qkv_attention_and_its_gradient_match_the_formula(backend, rng, dtype, b, h, t, d):
    """attention_qkv: the same attention on a packed qkv [B, T, 3, H, d], its gradient written in one piece."""
    qkv = torch.randn(b, t, 3, h, d, generator=rng, dtype=torch.float64).to(dtype).requires_grad_(True)
    out = attention_qkv(qkv, 0.6, backend=backend)
    grad_out = torch.randn(out.shape, generator=rng, dtype=torch.float64).to(dtype)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    assert grad.shape == qkv.shape
    assert grad.is_contiguous() or backend == "torch"  # the kernel's gradient is one piece
    leaf = qkv.detach().double().requires_grad_(True)
    expected = formula_float64(*leaf.permute(2, 0, 3, 1, 4).unbind(0), 0.6)
    (expected_grad,) = torch.autograd.grad(expected, leaf, grad_out.double())
    assert_close(out, expected)
    assert_close(grad, expected_grad, scale=4.0)


@NEEDS_CPU_KERNELS
def test_packed_qkv_op_passes_torchs_checks(rng):
    qkv = torch.randn(2, 9, 3, 2, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: attention_qkv(x, 0.8, backend="cpu"), (qkv,))
    torch.library.opcheck(attention_qkv_op, (qkv, 0.8))
    with pytest.raises(ValueError, match=r"qkv must be \[B, T, 3, H, d\]"):
        attention_qkv(qkv[:, :, :2])
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.lafs_kernels._attention_qkv_bwd(qkv[:, ::2].detach(), qkv[:, ::2].detach(), qkv, qkv, 1.0)


@NEEDS_CPU_KERNELS
def test_the_kernel_handles_wide_score_ranges(rng):
    """Scores spread over hundreds: most probabilities underflow, the softmax must stay exact (float64)."""
    _, q, k, v = packed_qkv(rng, 2, 2, 50, 8, torch.float64)
    scale = 40.0
    out = attention(q, k, v, scale, backend="cpu")
    assert_close(out, formula_float64(q, k, v, scale))
    q32, k32, v32 = (x.detach().float() for x in (q, k, v))
    assert_close(attention(q32, k32, v32, scale, backend="cpu"), formula_float64(q32, k32, v32, scale), scale=10.0)


@NEEDS_CPU_KERNELS
def test_the_kernel_output_transposes_back_without_a_copy(rng):
    _, q, k, v = packed_qkv(rng, 2, 3, 20, 8, torch.float32)
    out = attention(q, k, v, backend="cpu")
    assert out.transpose(1, 2).is_contiguous()  # [B, Tq, H, d]: the block's reshape to [B, Tq, H * d] is a view


def test_gradcheck_and_opcheck_of_the_custom_op(rng):
    """torch's own checks of the op: gradients by finite differences, and its schema / fake / autograd
    registrations (torch.library.opcheck)."""
    _, q, k, v = packed_qkv(rng, 1, 2, 11, 5, torch.float64, tq=9)
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, 0.9, backend="cpu"), (q, k, v))
    torch.library.opcheck(attention_op, (q, k, v, 0.9))


def test_the_default_scale_is_the_inverse_square_root_of_the_head_width(backend, rng):
    _, q, k, v = packed_qkv(rng, 1, 2, 6, 9, torch.float64)
    assert_close(attention(q, k, v, backend=backend), formula_float64(q, k, v, 9**-0.5))


def test_bad_inputs_get_clear_errors(rng):
    _, q, k, v = packed_qkv(rng, 1, 2, 6, 4, torch.float32)
    with pytest.raises(ValueError, match=r"q must be \[B, H, T, d\]"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="disagree"):
        attention(q, k[:, :1], v)
    with pytest.raises(ValueError, match="T = 0"):
        attention(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(TypeError, match="one float dtype"):
        attention(q, k.double(), v)
    with pytest.raises(TypeError, match="one float dtype"):
        attention(*(x.detach().to(torch.int64) for x in (q, k, v)))
    if CPU_KERNELS_MISSING:
        return
    wide = torch.randn(1, 1, 3, MAX_HEAD_WIDTH[torch.float32] + 1)
    with pytest.raises(BackendUnavailableError, match="head width of at most 64"):
        attention(wide, wide, wide, backend="cpu")
    assert_close(attention(wide, wide, wide), formula_float64(wide, wide, wide, wide.shape[-1] ** -0.5))
    with pytest.raises(RuntimeError, match="head width d must be in"):
        torch.ops.lafs_kernels._attention_fwd(wide, wide, wide, 1.0)
    strided = torch.randn(1, 1, 4, 6)[..., ::2]
    with pytest.raises(RuntimeError, match="last dimension must be dense"):
        torch.ops.lafs_kernels._attention_fwd(strided, strided, strided, 1.0)


@NEEDS_CPU_KERNELS
def test_a_transformer_on_the_kernel_compiles_as_one_graph(rng):
    """torch.compile(fullgraph=True) of a Part fViT transformer whose blocks take the C++ kernel ("auto" with more
    than EXPLICIT_MAX_KEYS keys): the backend choice is constant-folded, the op traced through its fake
    implementation; output and gradients match eager."""
    from lafs.models.transformer import EXPLICIT_MAX_KEYS, PartTransformer, auto_attention_form

    t = PartTransformer(num_landmarks=80, patch_size=2, dim=16, depth=1, heads=2, dim_head=8, mlp_dim=16)
    t.last_block_cls_only = False  # the one block runs every token, so through the kernel
    tokens = torch.randn(2, EXPLICIT_MAX_KEYS + 8, 12, generator=rng)
    heads = torch.empty(2, 2, EXPLICIT_MAX_KEYS + 9, 8)  # [B, H, cls + tokens, d] as the block sees them
    assert auto_attention_form(heads, heads) == "kernel"
    eager = t(tokens)
    (eager_grad,) = torch.autograd.grad(eager.sum(), [t.layers[0][0].fn.fn.to_qkv.weight])
    compiled = torch.compile(t, fullgraph=True, dynamic=False)(tokens)
    (compiled_grad,) = torch.autograd.grad(compiled.sum(), [t.layers[0][0].fn.fn.to_qkv.weight])
    assert_close(compiled, eager, scale=10.0)
    assert_close(compiled_grad, eager_grad, scale=10.0)
