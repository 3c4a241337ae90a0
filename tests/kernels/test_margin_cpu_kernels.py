"""The two blockwise CPU backends: ``cpu`` (the C++ chunk kernels of csrc/cpu/margin_softmax.cpp) and
``chunked`` (PyTorch ops, what CPU tensors get when the extension is not built).  Both against the
float64 reference of test_margin_softmax on the cases where their code paths differ."""

import math

import pytest
import torch

from lafs_kernels import _extension, margin_softmax_cross_entropy
from lafs_kernels.ops import margin_chunks
from tests.tolerances import assert_close, assert_float32_sum_close

from helpers.margin import GRAD_SCALE, MARGINS, loss_and_grads, make_inputs, reference_loss

needs_kernels = pytest.mark.skipif(
    margin_chunks.cpp_kernels_missing_reason() is not None,
    reason=f"C++ margin kernels not built: {margin_chunks.cpp_kernels_missing_reason()}",
)


@pytest.fixture(params=["cpu", "chunked"])
def engine(request):
    """The backend under test: ``cpu`` (C++ chunk kernels) or ``chunked`` (PyTorch ops)."""
    if request.param == "cpu" and margin_chunks.cpp_kernels_missing_reason() is not None:
        pytest.skip(f"C++ margin kernels not built: {margin_chunks.cpp_kernels_missing_reason()}")
    return request.param


def test_kernels_are_registered_when_the_extension_is_built():
    if _extension.missing_reason("cpu") is None:
        assert margin_chunks.cpp_kernels_missing_reason() is None, (
            "the extension lacks _margin_chunk_fwd/_bwd: rebuild it"
        )


def soft_targets(rng, b, c, dtype):
    """labels [b, 2] with a repeated class in row 0, mixup weights [b, 2]."""
    labels = torch.randint(0, c, (b, 2), generator=rng)
    labels[0, 1] = labels[0, 0]
    lam = torch.rand(b, 1, generator=rng, dtype=torch.float64)
    return labels, torch.cat([lam, 1 - lam], 1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["cosface", "arcface", "combined"])
def test_soft_targets_smoothing_signed_upstream(rng, engine, dtype, kind):
    """Two targets (one repeated), smoothing, reduction none with negative and zero upstream gradients."""
    x, w, _ = make_inputs(rng, 9, 16, 45, dtype=dtype)
    labels, label_weights = soft_targets(rng, 9, 45, dtype)
    with torch.no_grad():  # zero centres: one a target, one not
        w[labels[1, 0]] = 0
        w[(labels[2, 0] + 1) % 45] = 0
    upstream = torch.randn(9, generator=rng, dtype=dtype)
    upstream[3] = 0
    kwargs = dict(label_weights=label_weights, label_smoothing=0.1, reduction="none", **MARGINS[kind])
    ours = loss_and_grads(
        margin_softmax_cross_entropy, x, w, labels, backend=engine, chunk_size=16, upstream=upstream, **kwargs
    )
    ref = loss_and_grads(reference_loss, x.double(), w.double(), labels, upstream=upstream.double(), **kwargs)
    # A zero centre's gradient is (a sum of signed terms over the rows) / EPS, ~1e9-1e12 after cancellation:
    # there only its direction is meaningful in float32 (both rows checked finite and parallel to the
    # reference); every other row meets the tolerance table.
    zero = (w == 0).all(1)
    for name, a, b in zip(("loss", "grad x", "grad w"), ours, ref):
        if name == "grad w":
            cosine = torch.nn.functional.cosine_similarity(a[zero].double(), b[zero], dim=1)
            assert torch.isfinite(a).all() and (cosine > 1 - 1e-5).all(), f"{engine}: zero centres' grad w {cosine}"
            a, b = a[~zero], b[~zero]
        assert_close(a, b, dtype=dtype, scale=1.0 if name == "loss" else GRAD_SCALE, msg=f"{engine}: {name}")


def test_targets_far_above_the_log_sum_exp(rng, engine):
    """Embeddings next to their centres with ArcFace's margin: the plain target logit then lies far
    above lse, and an exp of it must not leak into any gradient."""
    x, w, labels = make_inputs(rng, 6, 32, 300)
    with torch.no_grad():
        x[:] = 2.0 * w[labels] + 0.05 * torch.randn(6, 32, generator=rng, dtype=torch.float64).float()
    ours = loss_and_grads(
        margin_softmax_cross_entropy, x, w, labels, backend=engine, chunk_size=128, **MARGINS["arcface"]
    )
    ref = loss_and_grads(reference_loss, x.double(), w.double(), labels, **MARGINS["arcface"])
    for name, a, b in zip(("loss", "grad x", "grad w"), ours, ref):
        assert_close(a, b, dtype=torch.float32, scale=GRAD_SCALE, msg=f"{engine}: {name}")


def test_labels_of_other_shards_and_argmax(rng, engine):
    """Labels outside [0, C) (another rank's classes) have no target here; the argmax is exact."""
    x, w, _ = make_inputs(rng, 5, 8, 37)
    labels = torch.tensor([[3, -1], [40, 36], [0, 0], [-5, 17], [36, 100]])
    label_weights = torch.full((5, 2), 0.5)
    loss, argmax = margin_softmax_cross_entropy(
        x,
        w,
        labels,
        label_weights=label_weights,
        backend=engine,
        chunk_size=10,
        check_labels=False,
        return_argmax=True,
        reduction="none",
        **MARGINS["cosface"],
    )
    with torch.no_grad():
        cos = torch.nn.functional.normalize(x.double()) @ torch.nn.functional.normalize(w.double()).T
        inside = (labels >= 0) & (labels < 37)
        # lse over the plain logits with the margined targets of this shard, weights as given
        logits = 64.0 * cos
        for t in range(2):
            col = labels[:, t].clamp(0, 36)
            target = 64.0 * (cos.gather(1, col[:, None])[:, 0] - 0.4)
            first = inside[:, t] & ((t == 0) | (labels[:, 1] != labels[:, 0]))
            logits[first, col[first]] = target[first]
        lse = torch.logsumexp(logits, 1)
        target_logit = torch.where(inside, 64.0 * (cos.gather(1, labels.clamp(0, 36)) - 0.4), 0.0)
        expected = (label_weights.double() * (lse[:, None] - target_logit)).sum(1)
    assert_close(loss, expected, dtype=torch.float32, msg=engine)
    assert torch.equal(argmax, cos.argmax(1))


@needs_kernels
def test_kernel_log_sum_exp_over_the_whole_float_range(rng):
    """Logits from -200 to 88 (exp underflows, is subnormal, overflows before the shift) and rows
    whose sum lies below the normal range: lse against float64, to a few float32 ulp."""
    rows, n = 6, 4000
    raw = torch.empty(rows, n)
    raw[0] = torch.linspace(-200.0, 88.0, n)
    raw[1] = torch.linspace(-200.0, -90.0, n)  # every exp(logit) is below float32's normal range
    raw[2:] = 30.0 * torch.randn(rows - 2, n, generator=rng)
    inv_w = torch.ones(n)
    no_targets = torch.full((rows, 1), -1, dtype=torch.int64)
    first = torch.ones(rows, 1, dtype=torch.bool)
    lse, logit_sum, best, column = torch.ops.lafs_kernels._margin_chunk_fwd(
        raw, inv_w, no_targets, first, 0, torch.zeros(rows, 1)
    )
    expected = torch.logsumexp(raw.double(), 1)
    torch.testing.assert_close(lse.double(), expected, rtol=4 * 2.0**-23, atol=0)
    # rows of N(0, 30) cancel down to a few units; a lost term of typical size (~24) is ~60x the bound
    assert_float32_sum_close(logit_sum, raw, dim=1)
    assert torch.equal(best, raw.max(1).values) and torch.equal(column, raw.max(1).indices)


@needs_kernels
def test_kernels_name_bad_arguments():
    raw, inv_w = torch.randn(3, 8), torch.ones(8)
    labels, first = torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1, dtype=torch.bool)
    fwd = torch.ops.lafs_kernels._margin_chunk_fwd
    with pytest.raises(RuntimeError, match="raw must be a contiguous"):
        fwd(
            raw.T,
            torch.ones(3),
            labels[:1].expand(8, 1).contiguous(),
            first[:1].expand(8, 1).contiguous(),
            0,
            torch.zeros(8, 1),
        )
    with pytest.raises(RuntimeError, match="inv_w must be"):
        fwd(raw, torch.ones(7), labels, first, 0, torch.zeros(3, 1))
    with pytest.raises(RuntimeError, match="first must be"):
        fwd(raw, inv_w, labels, first.long(), 0, torch.zeros(3, 1))
    with pytest.raises(RuntimeError, match="grad_lse must be"):
        torch.ops.lafs_kernels._margin_chunk_bwd(
            raw,
            inv_w,
            labels,
            first,
            0,
            torch.zeros(3, 1),
            torch.ones(3, 1),
            torch.zeros(3),
            torch.zeros(4),
            None,
            None,
            64.0,
        )
    assert math.isfinite(fwd(raw, inv_w, labels, first, 0, torch.zeros(3, 1))[0].sum().item())
