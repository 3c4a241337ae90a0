"""--original-path (per-landmark grid_sample loop + unfused margin loss) trains the same model as the fused path."""

import json
import types

import pytest
import torch

from lafs.train.__main__ import main

from tolerances import ATOL_RTOL

pytestmark = pytest.mark.slow


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_original_path_matches_fused_path(tmp_path, rng):
    """Same initial weights and data, four optimizer steps (the first at lr 0): every step's loss, accuracy and
    gradient norm, and the final weights, agree to float32 rounding carried through AdamW."""
    seed = int(torch.randint(0, 1000, (), generator=rng))
    common = ["supervised", "--config", "tiny", f"seed={seed}", "train.stop_after_steps=4", "val.every_steps=0"]
    assert main([*common, "--out", str(tmp_path / "fused")]) == 0
    assert main([*common, "--original-path", "--out", str(tmp_path / "original")]) == 0
    fused, original = _log(tmp_path / "fused"), _log(tmp_path / "original")
    saved = (tmp_path / "original" / "config.yaml").read_text()
    assert "original_path: true" in saved
    steps = [r for r in fused if "loss" in r]
    assert len(steps) == 4 and [r["step"] for r in steps] == [r["step"] for r in original if "loss" in r]
    for a, b in zip(steps, (r for r in original if "loss" in r)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), a["step"]
        assert a["acc"] == b["acc"], a["step"]
    a = torch.load(tmp_path / "fused" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "original" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert a["model"]["arch"] == b["model"]["arch"]
    # ours runs PyTorch's fused AdamW, the original path its default multi-tensor one, as the released code
    assert [g["fused"] for g in a["optimizer"]["param_groups"]] == [True] * len(a["optimizer"]["param_groups"])
    assert not any(g["fused"] for g in b["optimizer"]["param_groups"])
    weights_a, weights_b = a["model"]["state_dict"], b["model"]["state_dict"]
    assert weights_a.keys() == weights_b.keys()
    # AdamW moves each weight by about lr per step whatever its gradient's size, so a weight whose gradient is
    # near zero (float32 rounding apart on the two gathers) can move differently by up to ~lr per step. The landmark
    # CNN's gradients are all small: not comparable here (tests/kernels compare the two gathers' landmark
    # gradients). The transformer's gradients are large: nearly all of its weights agree to rounding carried through
    # AdamW (99.9% within 1e-5: at most 3.1e-6 seen over seeds 0-5), and a few near-zero-gradient ones may move
    # apart, but by far less than the 4e-3 the four steps' learning rates add up to (6.2e-5 the largest seen).
    transformer = [
        key for key, value in weights_a.items() if value.is_floating_point() and not key.startswith("landmark_cnn.")
    ]
    difference = torch.cat([(weights_a[key] - weights_b[key]).abs().flatten().double() for key in transformer])
    assert float(torch.quantile(difference, 0.999)) <= 1e-5, difference.topk(20).values
    worst = int(difference.argmax())
    assert float(difference[worst]) <= 2e-4, (worst, float(difference[worst]))
    assert a["step"] == b["step"] == 4


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


def test_original_paths_run_every_token_through_the_last_block(tmp_path):
    """Ours runs the last block for the cls row only; the original paths, as the released code, for every token,
    with attention in the released code's explicit form."""
    from lafs.models import create_model, model_to_dict
    from lafs.train import config as cfgmod
    from lafs.train.heads import OriginalPathModel
    from lafs.train.pretrain import PretrainStage
    from lafs.train.runner import stage_config

    model = create_model("part_fvit_nano")
    assert (model.transformer.last_block_cls_only, model.transformer.attention_form) == (True, "auto")
    OriginalPathModel(model)
    assert (model.transformer.last_block_cls_only, model.transformer.attention_form) == (False, "explicit")

    (tmp_path / "landmark.pt").touch()  # resolving checks that it exists
    for original in (False, True):
        overrides = [("train.original_path", original), ("init.landmark", str(tmp_path / "landmark.pt"))]
        cfg = stage_config("pretrain", cfgmod.load_recipe("demo"), overrides, source="test")
        torch.save(model_to_dict(create_model(cfg.model.name, **cfg.model.overrides)), tmp_path / "landmark.pt")
        stage = types.SimpleNamespace(cfg=cfg, device=torch.device("cpu"))
        _, student, teacher = PretrainStage._build_models(stage)
        assert student.last_block_cls_only == teacher.last_block_cls_only == (not original)
        assert student.attention_form == teacher.attention_form == ("explicit" if original else "auto")
