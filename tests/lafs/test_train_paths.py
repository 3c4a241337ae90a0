"""--original-path (per-landmark grid_sample loop + unfused margin loss) trains the same model as the fused path."""

import json

import pytest
import torch

from lafs.train.__main__ import main

from tolerances import ATOL_RTOL

pytestmark = pytest.mark.slow


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_original_path_matches_fused_path(tmp_path, rng):
    seed = int(torch.randint(0, 1000, (), generator=rng))
    common = ["supervised", "--config", "tiny", f"seed={seed}", "train.stop_after_steps=2", "val.every_steps=0"]
    assert main([*common, "--out", str(tmp_path / "fused")]) == 0
    assert main([*common, "--original-path", "--out", str(tmp_path / "original")]) == 0
    fused, original = _log(tmp_path / "fused"), _log(tmp_path / "original")
    saved = (tmp_path / "original" / "config.yaml").read_text()
    assert "original_path: true" in saved
    atol, rtol = ATOL_RTOL[torch.float32]
    # same initial weights and data: the first loss agrees to float32 rounding of a sum over 2 steps' inputs
    assert fused[0]["loss"] == pytest.approx(original[0]["loss"], rel=100 * rtol, abs=100 * atol)
    assert fused[0]["acc"] == original[0]["acc"]
    a = torch.load(tmp_path / "fused" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "original" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert a["model"]["arch"] == b["model"]["arch"]
    assert a["model"]["state_dict"].keys() == b["model"]["state_dict"].keys()


@pytest.mark.parametrize(
    "margin", [dict(s=64.0, m1=1.0, m2=0.0, m3=0.4), dict(s=64.0, m1=1.0, m2=0.5, m3=0.0)], ids=["cosface", "arcface"]
)
def test_original_head_mixup_has_the_fused_objective(rng, margin):
    """Mixup's two labels margined in one logit matrix (a row whose two labels coincide included)."""
    from lafs.train.heads import OriginalHead
    from lafs_kernels import margin_softmax_cross_entropy

    head = OriginalHead(16, 10, margin)
    x = torch.randn(12, 16, generator=rng, requires_grad=True)
    labels = torch.randint(0, 10, (12, 2), generator=rng)
    labels[0, 1] = labels[0, 0]
    lam = float(torch.rand((), generator=rng))
    weights = torch.tensor([lam, 1 - lam]).expand(12, 2)
    loss, _ = head(x, labels, weights)
    reference = margin_softmax_cross_entropy(x, head.weight, labels, label_weights=weights, **margin)
    atol, rtol = ATOL_RTOL[torch.float32]
    assert loss.item() == pytest.approx(reference.item(), rel=10 * rtol, abs=10 * atol)
    (grad,) = torch.autograd.grad(loss, x)
    (grad_ref,) = torch.autograd.grad(reference, x)
    torch.testing.assert_close(grad, grad_ref, atol=10 * atol, rtol=10 * rtol)
