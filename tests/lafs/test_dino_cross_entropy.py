"""The fused DINO cross-entropy against the released script's per-pair form and a float64 reference."""

import pytest
import torch

from lafs.ssl import DINOLoss, DINOSettings
from lafs.ssl.dino_cross_entropy import dino_cross_entropy, pairwise_dino_cross_entropy

from tolerances import assert_close

# (student crops V, teacher crops T): DINO / LAFS's 2 + 8, the default run's 2 + 2, one teacher crop, no locals
CROPS = [(10, 2), (4, 2), (3, 1), (2, 2)]


def logits_and_targets(rng, ncrops, teachers, batch=3, out_dim=257, dtype=torch.float32, spread=4.0):
    """Student logits [V*B, K] (spread: DINO's head gives |s| <= 1, larger values stress the lse) and
    teacher probabilities [T*B, K], sharpened as DINO's teacher temperature does."""
    student = torch.randn(ncrops * batch, out_dim, generator=rng, dtype=torch.float64) * spread
    targets = torch.softmax(torch.randn(teachers * batch, out_dim, generator=rng, dtype=torch.float64) / 0.04, -1)
    return student.to(dtype), targets.to(dtype)


def loss_and_grad(loss_fn, student, targets, ncrops, temp=0.1):
    student = student.detach().requires_grad_(True)
    loss = loss_fn(student, targets, ncrops, temp)
    loss.backward()
    return loss.detach(), student.grad


@pytest.mark.parametrize("ncrops,teachers", CROPS)
def test_fused_equals_the_per_pair_form_in_float64(rng, ncrops, teachers):
    student, targets = logits_and_targets(rng, ncrops, teachers, dtype=torch.float64)
    loss, grad = loss_and_grad(dino_cross_entropy, student, targets, ncrops)
    loss_ref, grad_ref = loss_and_grad(pairwise_dino_cross_entropy, student, targets, ncrops)
    assert loss.dtype == grad.dtype == torch.float64
    assert_close(loss, loss_ref)
    assert_close(grad, grad_ref)


def errors_from_float64(student, targets, ncrops):
    """{form: (loss error, largest grad error)} of both float32 forms against the float64 per-pair form,
    and (|loss|, largest |grad|) of the float64 one."""
    loss_64, grad_64 = loss_and_grad(pairwise_dino_cross_entropy, student.double(), targets.double(), ncrops)
    errors = {}
    for name, form in (("fused", dino_cross_entropy), ("pairwise", pairwise_dino_cross_entropy)):
        loss, grad = loss_and_grad(form, student, targets, ncrops)
        assert loss.dtype == grad.dtype == torch.float32
        errors[name] = (abs(loss.double() - loss_64).item(), (grad.double() - grad_64).abs().max().item())
    return errors, (abs(loss_64.item()), grad_64.abs().max().item())


@pytest.mark.parametrize("crops_per_pass", [1, 3])
def test_crops_split_over_passes(rng, monkeypatch, crops_per_pass):
    """Large problems take a few crops per pass (CHUNK_ELEMENTS): one crop, and three with a remainder."""
    from lafs.ssl import dino_cross_entropy as module

    ncrops, teachers, batch, out_dim = 10, 2, 3, 64
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", crops_per_pass * batch * out_dim)
    assert len(module._crop_chunks(ncrops, teachers, batch * out_dim)) == teachers + -(-8 // crops_per_pass)
    student, targets = logits_and_targets(rng, ncrops, teachers, batch=batch, out_dim=out_dim, dtype=torch.float64)
    loss, grad = loss_and_grad(dino_cross_entropy, student, targets, ncrops)
    loss_ref, grad_ref = loss_and_grad(pairwise_dino_cross_entropy, student, targets, ncrops)
    assert_close(loss, loss_ref)
    assert_close(grad, grad_ref)


@pytest.mark.parametrize("ncrops,teachers", CROPS)
def test_float32_fused_within_float32_tolerance(rng, ncrops, teachers):
    """Logits in the head's range (|s| <= 1 from unit vectors; a spread of 1 here)."""
    student, targets = logits_and_targets(rng, ncrops, teachers, out_dim=4096, spread=1.0)
    loss_64, grad_64 = loss_and_grad(pairwise_dino_cross_entropy, student.double(), targets.double(), ncrops)
    loss, grad = loss_and_grad(dino_cross_entropy, student, targets, ncrops)
    assert loss.dtype == grad.dtype == torch.float32
    assert_close(loss, loss_64, dtype=torch.float32)
    assert_close(grad, grad_64, dtype=torch.float32)


@pytest.mark.parametrize("ncrops,teachers", CROPS)
def test_float32_fused_errs_no_more_than_the_per_pair_form_on_large_logits(rng, ncrops, teachers):
    """Logits of +-300 after the temperature, where plain float32 PyTorch itself leaves the float32 tolerance
    now and then: the fused form's error at most 3x the per-pair form's or 4 float32 ulps of the value
    (loss ~1000: the per-pair form's sum is sometimes luckier than one ulp).  Forming log-probabilities as
    lse - x instead of (x - max) - log-sum failed this with 50x the per-pair form's gradient error."""
    student, targets = logits_and_targets(rng, ncrops, teachers, out_dim=4096, spread=30.0)
    errors, (loss_size, grad_size) = errors_from_float64(student, targets, ncrops)
    (loss_error, grad_error), (loss_error_ref, grad_error_ref) = errors["fused"], errors["pairwise"]
    ulp = torch.finfo(torch.float32).eps
    assert loss_error <= max(3 * loss_error_ref, 4 * ulp * loss_size), errors
    assert grad_error <= max(3 * grad_error_ref, 4 * ulp * grad_size), errors


def saved_bytes(loss_fn, student, targets, ncrops):
    """Bytes autograd keeps for the backward pass of ``loss_fn`` (distinct storages)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(student.detach().requires_grad_(True), targets, ncrops, 0.1)
    return sum(storages.values())


def test_fused_keeps_no_per_pair_copies(rng):
    ncrops, teachers, batch, out_dim = 10, 2, 4, 1000
    student, targets = logits_and_targets(rng, ncrops, teachers, batch=batch, out_dim=out_dim)
    row_block = batch * out_dim * 4  # one [B, out_dim] float32 tensor
    fused = saved_bytes(dino_cross_entropy, student, targets, ncrops)
    pairwise = saved_bytes(pairwise_dino_cross_entropy, student, targets, ncrops)
    # the student logits (V blocks) and the targets (T blocks)
    assert fused <= (ncrops + teachers) * row_block
    # the released form keeps its log-softmax copy and a negated target per pair (18 here) besides
    assert pairwise >= (ncrops + teachers * ncrops - teachers) * row_block


def test_dino_loss_forms_agree(rng):
    student, targets = logits_and_targets(rng, 6, 2)
    teacher = torch.log(targets) * 0.04  # raw teacher logits whose sharpened softmax is ``targets``
    losses, grads = {}, {}
    for fused in (True, False):
        leaf = student.detach().requires_grad_(True)
        losses[fused] = DINOLoss(student.shape[1], 6, fused=fused)(leaf, teacher, 0)
        (grads[fused],) = torch.autograd.grad(losses[fused], leaf)
    assert_close(losses[True], losses[False], dtype=torch.float32)
    assert_close(grads[True], grads[False], dtype=torch.float32)


@pytest.mark.parametrize("original", [False, True])
def test_the_original_path_keeps_the_per_pair_loop(tmp_path, original):
    from lafs.train import config as cfgmod

    (tmp_path / "landmark.pt").touch()  # resolving checks that it exists; nothing loads it here
    tree = cfgmod.demo_stage_tree(cfgmod.load_recipe("demo"), "pretrain")
    cfg = cfgmod.resolve_stage(
        "pretrain",
        cfgmod.apply_overrides(
            tree, [("train.original_path", original), ("init.landmark", str(tmp_path / "landmark.pt"))]
        ),
    )
    settings = DINOSettings.from_config(cfg, iters_per_epoch=1, amp_dtype=None)
    assert settings.fused_loss == (not original) and settings.fused_optimizer == (not original)
    assert DINOSettings(epochs=1, iters_per_epoch=1, batch_size=1).fused_loss


def test_bad_shapes_are_named(rng):
    student, targets = logits_and_targets(rng, 4, 2)
    with pytest.raises(ValueError, match="share K"):
        dino_cross_entropy(student, targets[:, :-1], 4, 0.1)
    with pytest.raises(ValueError, match="not 5"):
        dino_cross_entropy(student, targets, 5, 0.1)
    with pytest.raises(ValueError, match="target rows"):
        dino_cross_entropy(student, targets[:-1], 4, 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_fused_on_cuda_under_autocast(rng, amp_dtype):
    """The trainer's use on GPUs: the head's output in the autocast dtype, the loss computed in float32."""
    ncrops, out_dim = 10, 4096
    student, targets = logits_and_targets(rng, ncrops, 2, out_dim=out_dim, spread=1.0)
    teacher = (torch.log(targets) * 0.04).cuda()
    results = {}
    for fused in (True, False):
        leaf = student.to("cuda", amp_dtype).requires_grad_(True)
        with torch.autocast("cuda", dtype=amp_dtype):
            loss = DINOLoss(out_dim, ncrops, fused=fused).cuda()(leaf, teacher, 0)
        (grad,) = torch.autograd.grad(loss, leaf)
        assert loss.dtype == torch.float32 and grad.dtype == amp_dtype
        results[fused] = (loss, grad)
    assert_close(results[True][0], results[False][0], dtype=torch.float32)
    assert_close(results[True][1], results[False][1], dtype=amp_dtype)
