"""The Part fViT blocks' attention, forward + backward, in each form of ``lafs.models.transformer.attend``.

Ours: ``auto``, what the blocks run (on the CPU the separate matmul / softmax / matmul ops up to
``EXPLICIT_MAX_KEYS`` keys, our C++ kernel beyond; on a GPU torch's fused kernel), and on the CPU ``kernel``, our C++
kernel (``lafs_kernels.ops.attention``) at every length. The baselines are ``explicit``, the released code's
einsum, scale, softmax, einsum (what the original path runs), and ``sdpa``, torch's fused
``scaled_dot_product_attention`` (what every path ran before the forms existed). All run interleaved, round by
round (``_harness.compare``).

Shapes ``[N, H, T, d]``: the views of the benchmarked pretraining cases (N = views x batch, T = tokens + cls;
part_fvit_tiny 4 heads of 24, the default run's part_fvit_nano 4 of 32, part_fvit_b 11 of 64), and on the CPU key
lengths on both sides of the threshold.  Each case is what a block does around its attention: q, k and v are views
of one ``[N, T, 3, H, d]`` tensor, as the blocks' qkv projection gives them (passed packed too, as the blocks pass
it), the output goes back to ``[N, T, H * d]`` for the output projection, and the case returns the gradient of the
packed tensor.
"""

from __future__ import annotations

import pytest
import torch

from lafs.models.transformer import attend_packed

import _harness
from _harness import DEVICE, DTYPES, pick

pytestmark = pytest.mark.benchmark(timer=_harness.synchronized_timer)

# (what, N, H, T, d, dtype)
SHAPES = pick(
    cpu=[
        ("tiny global", 32, 4, 197, 24, "float32"),
        ("tiny local", 128, 4, 37, 24, "float32"),
        ("default run global", 64, 4, 50, 32, "float32"),
        ("default run local", 64, 4, 25, 32, "float32"),
        ("crossover", 64, 4, 100, 24, "float32"),
        ("crossover", 64, 4, 64, 24, "float32"),
    ],
    gpu=[("b global", 128, 11, 197, 64, "bfloat16"), ("b local", 512, 11, 37, 64, "bfloat16")],
    smoke=[("smoke", 2, 2, 5, 4, "float32")],
)
OURS = pick(cpu=["auto", "kernel"], gpu=["auto"], smoke=["auto", "kernel"])
FORMS = OURS + ["explicit", "sdpa"]
SCALE = 96**-0.5  # part_fvit_tiny's dim ** -0.5


def build_case(form: str, N: int, H: int, T: int, d: int, dtype: str, device: str = DEVICE):
    """() -> gradient of the packed qkv [N, T, 3, H, d] under a fixed gradient of the [N, T, H * d] output."""
    generator = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(N, T, 3, H, d, generator=generator, device=device).to(DTYPES[dtype]).requires_grad_(True)
    grad_out = torch.randn(N, T, H * d, generator=generator, device=device).to(DTYPES[dtype])

    def case():
        out = attend_packed(qkv, SCALE, form).transpose(1, 2).reshape(N, T, H * d)
        return _harness.grads_of(out, (qkv,), grad_out)

    return case


def _check_forms_agree(N: int, H: int, T: int, d: int, dtype: str) -> None:
    """A wrong attention must not produce a speed-up: every form's gradient against the explicit one's."""
    reference = build_case("explicit", N, H, T, d, dtype)()[0].float()
    for form in [f for f in FORMS if f != "explicit"]:
        _harness.assert_close(
            build_case(form, N, H, T, d, dtype)()[0].float(), reference, dtype=DTYPES[dtype], msg=f"{form} != explicit"
        )


@pytest.mark.parametrize("what,N,H,T,d,dtype", SHAPES)
def test_attention(benchmark, what, N, H, T, d, dtype):
    """Ours ("auto", "kernel") and the baselines, interleaved round by round."""
    _check_forms_agree(N, H, T, d, dtype)
    _harness.compare(
        benchmark,
        op="attention",
        title="Part fViT attention, forward + backward, by form",
        mode="fwd+bwd",
        dtype=dtype,
        shape={"views": what, "N": N, "H": H, "T": T, "d": d},
        impls=[_harness.Impl(form, form in OURS, (lambda f=form: build_case(f, N, H, T, d, dtype))) for form in FORMS],
        work={"flops": 12 * N * H * T * T * d},  # 2 matmuls forward, 4 backward, 2 T^2 d multiply-adds each
    )
