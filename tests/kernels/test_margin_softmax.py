"""margin_softmax_cross_entropy: every backend against a dense float64 reference written here."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lafs_kernels
from lafs_kernels import margin_softmax_cross_entropy
from lafs_kernels.baselines.margin import unfused_margin_loss
from lafs_kernels.nn import ArcFace, CombinedMarginSoftmax, CosFace
from lafs_kernels.ops.margin_chunks import cpp_kernels_missing_reason
from tests.tolerances import assert_close, assert_close_low_precision, assert_rows_close

from helpers.margin import (
    GRAD_SCALE,
    MARGINS,
    loss_and_grads,
    make_inputs,
    reference_logits,
    reference_loss,
)
from helpers.skips import NEEDS_TRITON

# "cpu" (the C++ chunk kernels) runs where the extension is built; "chunked" is the same blockwise path in PyTorch ops.
NEEDS_CPP = pytest.mark.skipif(
    cpp_kernels_missing_reason() is not None, reason=f"C++ margin kernels: {cpp_kernels_missing_reason()}"
)
CPP = pytest.param("cpu", marks=NEEDS_CPP)
# "triton" runs under the interpreter here, where a Triton the kernels are tested with is installed.
TRITON = pytest.param("triton", marks=NEEDS_TRITON)
BACKENDS = ["torch", "chunked", CPP, TRITON]
NEEDS = {"cpu": NEEDS_CPP, "triton": NEEDS_TRITON}


def cases(rows):
    """Parameter rows; those of the ``cpu`` / ``triton`` backends skip where their kernels cannot run."""
    return [pytest.param(*row, marks=NEEDS[row[0]]) if row[0] in NEEDS else row for row in rows]


def check_against_reference(
    x, w, labels, backend, chunk_size, grad_scale=GRAD_SCALE, assert_grads_close=assert_close, **kwargs
):
    """Loss and both gradients of ``backend`` against the float64 reference; returns the reference's
    (loss, grad of embeddings, grad of weight)."""
    ours = loss_and_grads(margin_softmax_cross_entropy, x, w, labels, backend=backend, chunk_size=chunk_size, **kwargs)
    ref = loss_and_grads(reference_loss, x.double(), w.double(), labels, **kwargs)
    dtype = x.dtype
    assert_close(ours[0], ref[0], dtype=dtype, msg="loss")
    assert_grads_close(ours[1], ref[1], dtype=dtype, scale=grad_scale, msg="grad of embeddings")
    assert_grads_close(ours[2], ref[2], dtype=dtype, scale=grad_scale, msg="grad of weight")
    return ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(MARGINS))
def test_float32_matches_reference(rng, backend, kind):
    x, w, labels = make_inputs(rng, 6, 16, 37)
    check_against_reference(x, w, labels, backend, chunk_size=16, **MARGINS[kind])


@pytest.mark.parametrize("backend", ["torch", "chunked", CPP])
def test_float64_matches_reference(rng, backend):
    x, w, labels = make_inputs(rng, 5, 8, 23, dtype=torch.float64)
    check_against_reference(x, w, labels, backend, chunk_size=7, **MARGINS["combined"])


@pytest.mark.parametrize(
    "backend, reduction",
    cases([(b, r) for b in ("torch", "chunked", "cpu") for r in ("mean", "sum", "none")] + [("triton", "none")]),
)
def test_two_target_soft_labels_smoothing_and_reductions(rng, backend, reduction):
    x, w, labels = make_inputs(rng, 7, 12, 29, t=2)
    labels[0, 1] = labels[0, 0]  # one sample names the same class twice
    lam = torch.rand(7, 1, generator=rng, dtype=torch.float64)
    label_weights = torch.cat([lam, 1 - lam], 1).float()
    upstream = torch.rand(7, generator=rng) if reduction == "none" else None
    kwargs = dict(label_weights=label_weights, label_smoothing=0.1, reduction=reduction, **MARGINS["arcface"])
    ours = loss_and_grads(
        margin_softmax_cross_entropy, x, w, labels, backend=backend, chunk_size=8, upstream=upstream, **kwargs
    )
    ref = loss_and_grads(reference_loss, x.double(), w.double(), labels, upstream=upstream, **kwargs)
    assert ours[0].shape == ref[0].shape
    assert_close(ours[0], ref[0], dtype=torch.float32, msg="loss")
    assert_close(ours[1], ref[1], dtype=torch.float32, scale=GRAD_SCALE, msg="grad x")
    assert_close(ours[2], ref[2], dtype=torch.float32, scale=GRAD_SCALE, msg="grad w")


ODD_SIZES = [(1, 3, 5, 2), (3, 3, 11, 4), (2, 5, 9, 100)]


@pytest.mark.parametrize(
    "backend, b, d, c, chunk",
    cases(
        [(backend, *size) for backend in ("torch", "chunked", "cpu") for size in ODD_SIZES]
        + [("triton", *ODD_SIZES[1])]
    ),
)
def test_odd_sizes(rng, backend, b, d, c, chunk):
    x, w, labels = make_inputs(rng, b, d, c)
    check_against_reference(x, w, labels, backend, chunk_size=chunk, **MARGINS["combined"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_arcface_fallback_when_theta_plus_m_exceeds_pi(rng, backend):
    x, w, labels = make_inputs(rng, 6, 16, 20)
    with torch.no_grad():  # embeddings nearly opposite to their centres: theta close to pi
        x[:3] = -w[labels[:3]] + 0.05 * torch.randn(3, 16, generator=rng)
    cos = F.cosine_similarity(x, w[labels]).detach()
    assert (torch.acos(cos[:3]) + 0.5 > math.pi).all()
    check_against_reference(x, w, labels, backend, chunk_size=8, **MARGINS["arcface"])


def well_trained_rows(rng, kind):
    """(x [4, 32], W [24, 32], labels [4]) float32: each target's plain cosine is its row's largest and its
    margined logit still leads by ~10-20 (1 - p between 1e-11 and 1e-5), as in a well-trained model."""
    b, d, c = 4, 32, 24
    labels = torch.tensor([3, 11, 17, 20])
    basis = torch.linalg.qr(torch.randn(d, d, generator=rng, dtype=torch.float64))[0].T  # orthonormal rows
    x_dir, rest = basis[:b], basis[b:]
    # other centres: cosine at most 0.3 with every embedding; each target centre: 0.85 / 0.9 with its own
    w = F.normalize(torch.randn(c, d - b, generator=rng, dtype=torch.float64), dim=1) @ rest
    w = w + (0.6 * torch.rand(c, b, generator=rng, dtype=torch.float64) - 0.3) @ x_dir
    own = {"arcface": 0.85, "cosface": 0.9}[kind]
    w[labels] = own * x_dir + math.sqrt(1 - own**2) * rest[:b]
    w = w * (0.5 + torch.rand(c, 1, generator=rng, dtype=torch.float64))
    x = x_dir * (1 + 2 * torch.rand(b, 1, generator=rng, dtype=torch.float64))
    x, w = x.float(), w.float()
    logits = reference_logits(x, w, labels, **MARGINS[kind])
    cos = F.normalize(x.double()) @ F.normalize(w.double()).T
    assert torch.equal(cos.argmax(1), labels) and torch.equal(logits.argmax(1), labels)
    one_minus_p = 1 - torch.softmax(logits, 1).gather(1, labels[:, None])
    assert ((one_minus_p > 1e-12) & (one_minus_p < 1e-4)).all(), one_minus_p
    return x, w, labels


@pytest.mark.parametrize("backend", ["chunked", CPP, TRITON])
@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_rows_whose_target_holds_the_probability(rng, backend, kind):
    """The engines' log-sum-exp of a well-trained row is the target itself plus a small log-sum, so the
    gradient 1 - p keeps float32 precision (a shift by the replaced plain logit, one float32 lse of ~s, or a
    logit rounded differently in the backward carries up to ~2e-6 of rounding: up to all of 1 - p)."""
    x, w, labels = well_trained_rows(rng, kind)
    check_against_reference(x, w, labels, backend, chunk_size=16, reduction="sum", **MARGINS[kind])


@pytest.mark.parametrize("backend", ["torch", "chunked", CPP])
@pytest.mark.parametrize("kind", ["arcface", "combined"])
def test_theta_near_zero_is_finite_and_exact(rng, backend, kind):
    x, w, labels = make_inputs(rng, 4, 8, 10, dtype=torch.float64)
    with torch.no_grad():  # embeddings on (or within 1e-9 of) their centres: theta ~ 0
        x[:2] = 3.0 * w[labels[:2]]
        x[2] = w[labels[2]] + 1e-9 * torch.randn(8, generator=rng, dtype=torch.float64)
    ours = loss_and_grads(margin_softmax_cross_entropy, x, w, labels, backend=backend, chunk_size=4, **MARGINS[kind])
    ref = loss_and_grads(reference_loss, x, w, labels, **MARGINS[kind])
    for name, a, b in zip(("loss", "grad x", "grad w"), ours, ref):
        assert torch.isfinite(a).all(), name
        # acos is ill-conditioned at cos ~ 1 (dtheta = dcos / theta): float64 rounding of cos
        # moves the margined logit by ~1e-6, so judge with float32's tolerance.
        assert_close(a, b, dtype=torch.float32, scale=GRAD_SCALE, msg=name)


@pytest.mark.parametrize(
    "backend, dtype, kind",
    cases(
        [
            (b, dtype, kind)
            for b in ("chunked", "cpu")
            for dtype in (torch.float16, torch.bfloat16)
            for kind in ("cosface", "arcface")
        ]
    )
    + cases([("triton", torch.float16, "cosface"), ("triton", torch.bfloat16, "arcface")]),
)
def test_low_precision(rng, backend, dtype, kind):
    x64, w64, labels = make_inputs(rng, 8, 32, 40, dtype=torch.float64)
    x, w = x64.to(dtype), w64.to(dtype)
    margins = MARGINS[kind]
    ours = loss_and_grads(margin_softmax_cross_entropy, x, w, labels, backend=backend, chunk_size=16, **margins)
    same_dtype = loss_and_grads(unfused_margin_loss, x, w, labels, **margins)
    ref = loss_and_grads(reference_loss, x.double(), w.double(), labels, straight_through=False, **margins)
    for name, a, b, r in zip(("loss", "grad x", "grad w"), ours, same_dtype, ref):
        assert a.dtype == (torch.float32 if name == "loss" else dtype)
        assert_close_low_precision(a.to(dtype), b, r, msg=name)


@pytest.mark.parametrize(
    "backend, dtype",
    cases([("chunked", torch.float16), ("cpu", torch.bfloat16), ("triton", torch.bfloat16), ("triton", torch.float16)]),
)
def test_low_precision_soft_labels(rng, backend, dtype):
    """Two labels with mixup weights and smoothing: within a small factor of plain PyTorch's error in ``dtype``."""
    x64, w64, labels = make_inputs(rng, 8, 32, 40, t=2, dtype=torch.float64)
    lam = torch.rand(8, 1, generator=rng, dtype=torch.float64)
    label_weights = torch.cat([lam, 1 - lam], 1)
    x, w = x64.to(dtype), w64.to(dtype)
    kwargs = dict(label_smoothing=0.1, **MARGINS["arcface"])
    ours = loss_and_grads(
        margin_softmax_cross_entropy,
        x,
        w,
        labels,
        backend=backend,
        chunk_size=16,
        label_weights=label_weights.to(dtype),
        **kwargs,
    )
    same_dtype = loss_and_grads(reference_loss, x, w, labels, label_weights.to(dtype), dtype=dtype, **kwargs)
    ref = loss_and_grads(reference_loss, x.double(), w.double(), labels, label_weights, **kwargs)
    for name, a, b, r in zip(("loss", "grad x", "grad w"), ours, same_dtype, ref):
        assert_close_low_precision(a.to(dtype), b, r, msg=name)


def test_defaults_add_no_margin(rng):
    """Giving one margin never adds another: m2 alone is ArcFace, no margin at all is a plain softmax of s*cos."""
    x, w, labels = make_inputs(rng, 6, 16, 20)
    assert_close(
        margin_softmax_cross_entropy(x, w, labels, m2=0.5),
        reference_loss(x, w, labels, **MARGINS["arcface"]),
        dtype=torch.float32,
    )
    plain = F.cross_entropy(64.0 * F.normalize(x.double()) @ F.normalize(w.double()).T, labels)
    assert_close(margin_softmax_cross_entropy(x, w, labels), plain, dtype=torch.float32)
    head = CombinedMarginSoftmax(16, 20, m2=0.5)
    assert (head.m1, head.m2, head.m3) == (1.0, 0.5, 0.0)
    assert (CosFace(16, 20).m3, ArcFace(16, 20).m2) == (0.4, 0.5)  # the modules named after a paper keep its margin


def test_gradcheck_float64(rng):
    x, w, labels = make_inputs(rng, 3, 4, 7, t=2, dtype=torch.float64)
    label_weights = torch.rand(3, 2, generator=rng, dtype=torch.float64, requires_grad=True)

    def fn(x, w, label_weights):
        return margin_softmax_cross_entropy(
            x,
            w,
            labels,
            label_weights=label_weights,
            s=8.0,
            label_smoothing=0.1,
            reduction="none",
            backend="chunked",
            chunk_size=3,
            **MARGINS["combined"],
        )

    assert torch.autograd.gradcheck(fn, (x, w, label_weights))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_embeddings_and_centres_are_finite(rng, backend):
    x, w, labels = make_inputs(rng, 4, 8, 12)
    with torch.no_grad():
        x[0] = 0
        w[labels[1]] = 0
        w[(labels[2] + 1) % 12] = 0
    # the zero rows' gradients are ~1e12 (1 / the normalisation's eps): judged relative to their rows
    ref = check_against_reference(
        x, w, labels, backend, chunk_size=5, assert_grads_close=assert_rows_close, **MARGINS["arcface"]
    )
    assert ref[1][0].abs().max() > 1e9 and ref[2][labels[1]].abs().max() > 1e9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 12, 10**9])
def test_out_of_range_labels_raise(rng, backend, bad):
    x, w, labels = make_inputs(rng, 4, 8, 12)
    labels[2] = bad
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 12\)"):
        margin_softmax_cross_entropy(x, w, labels, backend=backend)
    soft = torch.stack([labels.roll(1), labels], 1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 12\)"):
        margin_softmax_cross_entropy(x, w, soft, label_weights=torch.full((4, 2), 0.5), backend=backend)


def test_bad_arguments_name_the_problem(rng):
    x, w, labels = make_inputs(rng, 4, 8, 12)
    with pytest.raises(ValueError, match="embedding size 8 != weight's 5"):
        margin_softmax_cross_entropy(x, w[:, :5], labels)
    with pytest.raises(TypeError, match="same floating dtype"):
        margin_softmax_cross_entropy(x, w.double(), labels)
    with pytest.raises(TypeError, match="labels must be int64"):
        margin_softmax_cross_entropy(x, w, labels.int())
    with pytest.raises(ValueError, match="need label_weights"):
        margin_softmax_cross_entropy(x, w, labels[:, None])
    with pytest.raises(ValueError, match="reduction must be one of"):
        margin_softmax_cross_entropy(x, w, labels, reduction="avg")


def insightface_style_loss(x, w, labels, s, m2, m3):
    """arcface_torch's CombinedMarginLoss after linear(normalize(x), normalize(w)): the ArcFace
    margin is applied under no_grad, CosFace subtracts m3; then cross-entropy."""
    logits = F.linear(F.normalize(x), F.normalize(w)).clamp(-1, 1)
    rows = torch.arange(labels.shape[0])
    target = logits[rows, labels].view(-1, 1)
    if m2 > 0:
        with torch.no_grad():
            target.arccos_()
            logits.arccos_()
            logits[rows, labels] = target.view(-1) + m2
            logits.cos_()
    else:
        logits[rows, labels] = target.view(-1) - m3
    return F.cross_entropy(logits * s, labels)


@pytest.mark.parametrize(
    "backend, kind",
    cases(
        [("torch", "arcface"), ("chunked", "arcface"), ("cpu", "arcface"), ("cpu", "cosface"), ("triton", "arcface")]
    ),
)
def test_straight_through_matches_insightface(rng, backend, kind):
    x, w, labels = make_inputs(rng, 6, 16, 25)
    m = MARGINS[kind]
    ours = loss_and_grads(
        margin_softmax_cross_entropy, x, w, labels, backend=backend, chunk_size=8, margin_grad="straight_through", **m
    )
    theirs = loss_and_grads(insightface_style_loss, x.double(), w.double(), labels, 64.0, m["m2"], m["m3"])
    for name, a, b, scale in zip(("loss", "grad x", "grad w"), ours, theirs, (1.0, GRAD_SCALE, GRAD_SCALE)):
        assert_close(a, b, dtype=torch.float32, scale=scale, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_is_the_nearest_centre(rng, backend):
    x, w, labels = make_inputs(rng, 9, 16, 45)
    loss, argmax = margin_softmax_cross_entropy(
        x, w, labels, backend=backend, chunk_size=16, return_argmax=True, **MARGINS["cosface"]
    )
    expected = (F.normalize(x.double()) @ F.normalize(w.double()).T).argmax(1)
    assert argmax.dtype == torch.int64
    assert torch.equal(argmax, expected)
    assert_close(loss, reference_loss(x, w, labels, **MARGINS["cosface"]), dtype=torch.float32)


def sample_op_inputs(rng):
    x, w, labels = make_inputs(rng, 5, 8, 19, t=2)
    return x, w, labels


@pytest.mark.parametrize("backend", ["chunked"])  # the op's schema and fake are shared by its backends
def test_opcheck(rng, backend):
    x, w, labels = sample_op_inputs(rng)
    labels[1, 1] = -1  # a target on another shard
    args = (x, w, labels, 64.0, 0.9, 0.3, 0.2, False, False, True, False, True, 8, backend)
    torch.library.opcheck(torch.ops.lafs_kernels.margin_softmax_forward.default, args)
    lse = torch.randn(5, generator=rng)
    grads = (torch.rand(5, generator=rng), torch.rand(5, 2, generator=rng), None)
    norms = torch.linalg.vector_norm(w.detach(), dim=1)
    bargs = (*grads, x.detach(), w.detach(), labels, lse, norms, 64.0, 0.9, 0.3, 0.2, False, False, True, 8, backend)
    torch.library.opcheck(torch.ops.lafs_kernels.margin_softmax_backward.default, bargs)


def test_torch_compile_fullgraph(rng):
    x, w, labels = make_inputs(rng, 6, 16, 33, t=2)
    label_weights = torch.full((6, 2), 0.5)

    def step(x, w):
        loss, argmax = margin_softmax_cross_entropy(
            x,
            w,
            labels,
            label_weights=label_weights,
            label_smoothing=0.1,
            chunk_size=16,
            return_argmax=True,
            backend="chunked",
            **MARGINS["arcface"],
        )
        return loss, argmax

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_x, eager_w = x.detach().requires_grad_(), w.detach().requires_grad_()
    eager_loss, eager_arg = step(eager_x, eager_w)
    eager_loss.backward()
    comp_x, comp_w = x.detach().requires_grad_(), w.detach().requires_grad_()
    comp_loss, comp_arg = compiled(comp_x, comp_w)
    comp_loss.backward()
    assert_close(comp_loss, eager_loss)
    assert torch.equal(comp_arg, eager_arg)
    assert_close(comp_x.grad, eager_x.grad)
    assert_close(comp_w.grad, eager_w.grad)


def test_torch_compile_fullgraph_with_the_default_backend_and_the_modules(rng):
    """No backend named: the device's default is chosen while tracing (its checks read files, which Dynamo
    cannot trace), for the function and for the modules."""
    x, w, labels = make_inputs(rng, 6, 16, 33)
    head = CosFace(16, 33, s=64.0, m=0.4)
    with torch.no_grad():
        head.weight.copy_(w)

    def function(x):
        return margin_softmax_cross_entropy(x, w, labels, **MARGINS["cosface"])

    for step in (function, lambda x: head(x, labels)):
        eager = step(x)
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
        assert_close(compiled, eager)


@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_label_range_is_checked_inside_torch_compile(rng, backend):
    x, w, labels = make_inputs(rng, 4, 8, 10)

    def step(labels):
        return margin_softmax_cross_entropy(x, w, labels, backend=backend, **MARGINS["cosface"])

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_close(compiled(labels), step(labels))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*max 10"):
        compiled(torch.full_like(labels, 10))


def test_zero_classes_and_bad_arguments_raise_clearly(rng):
    x, w, labels = make_inputs(rng, 4, 8, 10)
    with pytest.raises(ValueError, match="weight has no rows"):
        margin_softmax_cross_entropy(x, w[:0], labels, check_labels=False)
    with pytest.raises(ValueError, match="chunk_size must be positive; got 0"):
        margin_softmax_cross_entropy(x, w, labels, chunk_size=0)
    two = torch.stack([labels, labels.flip(0)], 1)
    with pytest.raises(TypeError, match="label_weights must be a floating tensor on the labels' device cpu"):
        margin_softmax_cross_entropy(x, w, two, label_weights=torch.ones(4, 2, device="meta"))
    with pytest.raises(TypeError, match="label_weights must be a floating tensor.*got torch.int64"):
        margin_softmax_cross_entropy(x, w, two, label_weights=torch.ones(4, 2, dtype=torch.int64))


@pytest.mark.parametrize("backend", ["torch", "chunked", CPP])
def test_a_shard_without_classes_gives_empty_statistics_in_the_graph(rng, backend):
    """weight [0, D] (a rank holding no classes): lse and best_cos -inf, no targets, as every engine gives
    them, and x still gets a (zero) gradient, so that rank's backward runs its collectives."""
    from lafs_kernels.ops.margin_softmax import Margin, local_row_stats

    x, w, labels = make_inputs(rng, 4, 8, 10, t=2)
    margin = Margin(64.0, 1.0, 0.0, 0.4, False, False)
    stats = local_row_stats(x, w[:0], labels, margin, chunk_size=8, backend=backend, check_labels=False)
    assert torch.isneginf(stats.lse).all() and torch.isneginf(stats.best_cos).all()
    assert (stats.target_logit == 0).all() and (stats.logit_sum == 0).all() and (stats.argmax == 0).all()
    assert stats.target_logit.shape == labels.shape
    (stats.lse.clamp_min(0).sum() + stats.target_logit.sum()).backward()
    assert x.grad is not None and (x.grad == 0).all()


@pytest.mark.parametrize(
    "module, margins",
    [
        (lambda: CosFace(16, 30, s=32.0, m=0.35), dict(s=32.0, m1=1.0, m2=0.0, m3=0.35)),
        (lambda: ArcFace(16, 30), dict(s=64.0, m1=1.0, m2=0.5, m3=0.0)),
        (lambda: ArcFace(16, 30, easy_margin=True), dict(s=64.0, m1=1.0, m2=0.5, m3=0.0, easy_margin=True)),
        (lambda: CombinedMarginSoftmax(16, 30, 64.0, 0.9, 0.3, 0.2), dict(s=64.0, m1=0.9, m2=0.3, m3=0.2)),
    ],
)
def test_modules_own_weight_and_match_reference(rng, module, margins):
    head = module()
    assert head.weight.shape == (30, 16)
    x = torch.randn(5, 16, generator=rng)
    labels = torch.randint(0, 30, (5,), generator=rng)
    loss, argmax = head(x, labels, return_argmax=True)
    loss.backward()
    w = head.weight.detach().double().requires_grad_()
    ref = reference_loss(x, w, labels, **margins)
    ref.backward()
    assert_close(loss, ref, dtype=torch.float32)
    assert_close(head.weight.grad, w.grad, dtype=torch.float32, scale=GRAD_SCALE)
    assert torch.equal(argmax, (F.normalize(x) @ F.normalize(head.weight.detach()).T).argmax(1))


def test_module_label_check_can_be_skipped_as_the_function_s(rng):
    """``check_labels=False`` reaches the function: a label out of range raises by default, and without the
    check the module gives the function's unchecked loss (that row has no target)."""
    x = torch.randn(4, 8, generator=rng)
    labels = torch.tensor([1, 2, 20, 3])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 20\)"):
        CosFace(8, 20)(x, labels)
    head = CosFace(8, 20, check_labels=False)
    expected = margin_softmax_cross_entropy(x, head.weight, labels, s=64.0, m3=0.4, check_labels=False)
    assert torch.equal(head(x, labels), expected)


def test_module_soft_labels(rng):
    head = CosFace(8, 20)
    x = torch.randn(4, 8, generator=rng)
    labels = torch.randint(0, 20, (4, 2), generator=rng)
    label_weights = torch.tensor([[0.7, 0.3]]).expand(4, 2)
    loss = head(x, labels, label_weights)
    assert_close(
        loss, reference_loss(x, head.weight.detach(), labels, label_weights, **MARGINS["cosface"]), dtype=torch.float32
    )


def test_backend_registered_and_cpu_prefers_the_cpp_kernels_then_chunked():
    from lafs_kernels._dispatch import REGISTRY, Call
    from lafs_kernels.ops.margin_chunks import cpp_kernels_missing_reason

    backends = REGISTRY["margin_softmax_cross_entropy"]
    expected = "chunked" if cpp_kernels_missing_reason() else "cpu"
    assert backends.select(Call(device=torch.device("cpu"), dtype=torch.float32)) == expected
    assert set(backends.names) == {"torch", "chunked", "cpu", "triton"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu_matches_reference(rng, dtype):
    x64, w64, labels = make_inputs(rng, 96, 256, 5000, t=2, dtype=torch.float64)
    label_weights = torch.full((96, 2), 0.5, dtype=torch.float64)
    x, w = x64.to(dtype).cuda(), w64.to(dtype).cuda()
    kwargs = dict(label_weights=label_weights, label_smoothing=0.1, **MARGINS["arcface"])
    ours = loss_and_grads(
        margin_softmax_cross_entropy,
        x,
        w,
        labels.cuda(),
        backend="triton",
        chunk_size=2048,
        **{**kwargs, "label_weights": label_weights.cuda()},
    )
    ref = loss_and_grads(reference_loss, x.double().cpu(), w.double().cpu(), labels, **kwargs)
    if dtype == torch.float32:
        for name, a, b, scale in zip(("loss", "grad x", "grad w"), ours, ref, (1.0, GRAD_SCALE, GRAD_SCALE)):
            assert_close(a, b, dtype=dtype, scale=scale, msg=name)
    else:
        same = loss_and_grads(
            reference_loss,
            x,
            w,
            labels.cuda(),
            dtype=dtype,
            **{**kwargs, "label_weights": label_weights.to(dtype).cuda()},
        )
        for name, a, b, r in zip(("soft loss", "soft grad x", "soft grad w"), ours, same, ref):
            assert_close_low_precision(a.to(dtype), b, r, msg=name)
        same = loss_and_grads(unfused_margin_loss, x, w, labels[:, 0].cuda(), **MARGINS["arcface"])
        ref1 = loss_and_grads(reference_loss, x.double().cpu(), w.double().cpu(), labels[:, 0], **MARGINS["arcface"])
        ours1 = loss_and_grads(
            margin_softmax_cross_entropy, x, w, labels[:, 0].cuda(), backend="triton", **MARGINS["arcface"]
        )
        for name, a, b, r in zip(("loss", "grad x", "grad w"), ours1, same, ref1):
            assert_close_low_precision(a.to(dtype), b, r, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_rows_whose_target_holds_the_probability_on_gpu(rng, backend, kind):
    """As on the CPU, with the GPU's compilers (FMA contraction would round a logit differently in the backward)."""
    x, w, labels = well_trained_rows(rng, kind)
    check_against_reference(x.cuda(), w.cuda(), labels.cuda(), backend, chunk_size=16, reduction="sum", **MARGINS[kind])


@pytest.mark.gpu
def test_triton_compiles_on_gpu(rng):
    x, w, labels = make_inputs(rng, 64, 128, 3000)
    x, w, labels = x.detach().cuda().requires_grad_(), w.detach().cuda().requires_grad_(), labels.cuda()
    step = torch.compile(lambda x, w: margin_softmax_cross_entropy(x, w, labels, backend="triton"), fullgraph=True)
    step(x, w).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    with pytest.raises(ValueError, match="labels must lie in"):
        margin_softmax_cross_entropy(x, w, labels + 3000, backend="triton")
    assert lafs_kernels.margin_softmax_cross_entropy is margin_softmax_cross_entropy


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_runs_on_the_inputs_device_not_the_current_one(rng):
    """A process holding its tensors on cuda:1 while cuda:0 is current (one process per GPU without set_device)."""
    x, w, labels = make_inputs(rng, 32, 64, 500)
    with torch.cuda.device(0):
        ours = loss_and_grads(
            margin_softmax_cross_entropy, x.cuda(1), w.cuda(1), labels.cuda(1), backend="triton", **MARGINS["arcface"]
        )
    ref = loss_and_grads(reference_loss, x.double(), w.double(), labels, **MARGINS["arcface"])
    for name, a, b, scale in zip(("loss", "grad x", "grad w"), ours, ref, (1.0, GRAD_SCALE, GRAD_SCALE)):
        assert a.device == torch.device("cuda", 1)
        assert_close(a, b, dtype=torch.float32, scale=scale, msg=name)


# --------------------------------------------------------------------------- what a GPU run would show first


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_leaves_the_loss_in_the_inputs_dtype(rng, backend):
    """Under autocast (the trainer's bfloat16 on GPUs; CPU autocast runs the same policy) the class GEMMs must not
    drop to bfloat16: the dense and chunked paths then failed in their scatters (two dtypes), the C++ chunk
    kernels rejected bfloat16.  Forward and backward inside the context give the float32 result bit for bit."""
    x, w, labels = make_inputs(rng, 6, 16, 37)
    kwargs = dict(backend=backend, chunk_size=16, **MARGINS["arcface"])
    expected = loss_and_grads(margin_softmax_cross_entropy, x, w, labels, **kwargs)

    def under_autocast(x, w, labels, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return margin_softmax_cross_entropy(x, w, labels, **kwargs)

    runs = {"backward outside": loss_and_grads(under_autocast, x, w, labels, **kwargs)}
    if backend != "torch":  # the custom op's backward too (autograd's own backward follows an enclosing autocast)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs["backward inside"] = loss_and_grads(margin_softmax_cross_entropy, x, w, labels, **kwargs)
    for run, got in runs.items():
        for name, a, b in zip(("loss", "grad x", "grad w"), got, expected):
            assert a.dtype == torch.float32, f"{run}: {name}"
            assert torch.equal(a, b), f"{run}: {name}"


def test_triton_chunks_fit_one_launch():
    """CUDA allows 65535 blocks along grid y, the class blocks of a Triton launch: a larger chunk is split by the
    chunk loops (a launch of more fails with "invalid argument"), and the launcher refuses it with a clear error."""
    kernels = pytest.importorskip("lafs_kernels.triton.margin_softmax")
    from lafs_kernels.ops.margin_chunks import engine_chunk

    for device in (torch.device("cuda"), torch.device("cpu")):
        block_c = kernels._blocks(device)[1]
        most = kernels.max_classes_per_launch(device)
        assert most // block_c <= kernels.MAX_GRID_Y == 65535
    w = torch.empty(10_000_000, 512, dtype=torch.bfloat16, device="meta")  # 2M-class shards and larger: no memory
    assert engine_chunk("triton", 10**9, w) == kernels.max_classes_per_launch(w.device)
    assert engine_chunk("chunked", 10**9, w) == 10**9
    x, inv_x, labels = torch.empty(8, 512, dtype=w.dtype, device="meta"), torch.empty(8), torch.empty(8, 1)
    with pytest.raises(ValueError, match="fit one launch"):
        kernels._common(x, inv_x.to("meta"), w, labels.to("meta"))


@NEEDS_TRITON
def test_triton_splits_a_chunk_larger_than_one_launch(rng, monkeypatch):
    """The chunk loops hand the Triton engine no more classes than one launch takes (made 64 here)."""
    kernels = pytest.importorskip("lafs_kernels.triton.margin_softmax")
    monkeypatch.setattr(kernels, "max_classes_per_launch", lambda device: 64)
    sizes = []
    for name in ("chunk_forward", "chunk_backward"):
        launch = getattr(kernels, name)

        def spy(x, inv_x, w, *args, launch=launch):
            sizes.append(w.shape[0])
            return launch(x, inv_x, w, *args)

        monkeypatch.setattr(kernels, name, spy)
    x, w, labels = make_inputs(rng, 5, 16, 150)
    check_against_reference(x, w, labels, "triton", chunk_size=10**6, **MARGINS["cosface"])
    assert sizes == [64, 64, 22] * 2


@NEEDS_TRITON
def test_triton_offsets_past_2_31_elements():
    """int32 offsets in the margin kernels: ``rows * C`` of the [B, C] gradient wraps at B * C = 2^31 (B = 1024 with
    a 2M-class chunk) and ``cols * stride_w`` past 2^31 / D classes.  The worker runs one tile there (in its own
    process: a wrapped offset crashes the interpreter, as it faults a GPU) against the same tile at small offsets."""
    pytest.importorskip("triton")
    worker = Path(__file__).with_name("margin_offsets_worker.py")
    env = {**os.environ, "PYTHONPATH": str(worker.parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, env=env, timeout=300)
    if out.returncode == 3:
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0, f"worker exited {out.returncode} (-11: a wrapped offset)\n{out.stderr[-2000:]}"
    assert out.stdout.split() == ["equal", "True", "True"], out.stdout


def test_triton_interpreter_converts_its_scalars():
    """Triton 3.6's interpreter (the one torch 2.11 pins) turns a scalar into an int with ``int()`` of a 1-element
    array, which NumPy 2.4 refuses: every kernel looping to a runtime bound (``range(0, D, BLOCK_D)`` in the margin
    tiles, the colour chain's mean over M) failed interpreted.  ``tests/conftest.py`` mends that interpreter; its
    probe tells a failing conversion from a working one."""
    pytest.importorskip("triton")
    from triton.runtime import interpreter

    from helpers.triton_interpreter import interpreter_index_is_broken

    assert not interpreter_index_is_broken(interpreter._patch_lang_tensor)

    def failing(tensor, scope):
        def index(self):
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

        scope.set_attr(tensor, "__index__", index)

    def working(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    assert interpreter_index_is_broken(failing)
    assert not interpreter_index_is_broken(working)

    def failing_before_3_6(tensor):  # Triton 3.2 (torch 2.6's) patches the class itself, with no scope
        def index(self):
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")

        tensor.__index__ = index

    def working_before_3_6(tensor):
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())

    assert interpreter_index_is_broken(failing_before_3_6)
    assert not interpreter_index_is_broken(working_before_3_6)
