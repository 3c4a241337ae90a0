"""--original-path (per-landmark grid_sample loop + unfused margin loss) trains the same model as the fused path."""

import json
import types

import pytest
import torch

from lafs.models import model_from_dict
from lafs.train.__main__ import main

from tolerances import ATOL_RTOL

pytestmark = pytest.mark.slow


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_original_path_matches_fused_path(tmp_path, rng):
    """Same initial weights and data, four optimizer steps (the first at lr 0): every step's loss, accuracy and
    gradient norm, and the final weights, agree to float32 rounding carried through AdamW.

    The landmark CNN is held at lr 0 here (its gradients are compared in the next test). Trained, AdamW moves
    each of its weights by about lr per step whatever its gradient's size; where a landmark's gradient is near
    zero its sign is the two gathers' float32 rounding, so that landmark moves one way on one path and the other
    way on the other, and from the third step on the patches, then the losses and weights, drift apart at a rate
    set by chance (by 1e-4 relative in the loss, 1e-5 in the weights' 99.9% quantile, at 3 of seeds 0-199; with
    the fused path's landmark CNN in NCHW as well, so not its channels-last layout).
    With it held, over seeds 0-119 the loss agreed to 4.3e-7 relative, the gradient norm to 1.1e-5, the
    accuracy exactly and every transformer weight to 1.8e-7: the bounds below are 10x those.
    """
    seed = int(torch.randint(0, 1000, (), generator=rng))
    common = ["supervised", "--config", "tiny", f"seed={seed}", "train.stop_after_steps=4", "val.every_steps=0"]
    common.append("optim.landmark_lr_scale=0")
    assert main([*common, "--out", str(tmp_path / "fused")]) == 0
    assert main([*common, "--original-path", "--out", str(tmp_path / "original")]) == 0
    fused, original = _log(tmp_path / "fused"), _log(tmp_path / "original")
    saved = (tmp_path / "original" / "config.yaml").read_text()
    assert "original_path: true" in saved
    steps = [r for r in fused if "loss" in r]
    assert len(steps) == 4 and [r["step"] for r in steps] == [r["step"] for r in original if "loss" in r]
    for a, b in zip(steps, (r for r in original if "loss" in r)):
        assert a["loss"] == pytest.approx(b["loss"], rel=4e-6), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]
        assert a["acc"] == b["acc"], a["step"]
    a = torch.load(tmp_path / "fused" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "original" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert a["model"]["arch"] == b["model"]["arch"]
    # ours runs PyTorch's fused AdamW, the original path its default multi-tensor one, as the released code
    assert [g["fused"] for g in a["optimizer"]["param_groups"]] == [True] * len(a["optimizer"]["param_groups"])
    assert not any(g["fused"] for g in b["optimizer"]["param_groups"])
    weights_a, weights_b = a["model"]["state_dict"], b["model"]["state_dict"]
    assert weights_a.keys() == weights_b.keys()
    held = list(
        zip(
            model_from_dict(a["model"]).landmark_cnn.parameters(),
            model_from_dict(b["model"]).landmark_cnn.parameters(),
        )
    )
    assert held and all(torch.equal(ours, theirs) for ours, theirs in held)
    transformer = [
        key for key, value in weights_a.items() if value.is_floating_point() and not key.startswith("landmark_cnn.")
    ]
    difference = torch.cat([(weights_a[key] - weights_b[key]).abs().flatten().double() for key in transformer])
    worst = int(difference.argmax())
    assert float(difference[worst]) <= 2e-6, (worst, float(difference[worst]))
    assert a["step"] == b["step"] == 4


def test_original_path_gives_every_parameter_the_same_gradient(rng):
    """One training step's gradients on both paths, from the same weights, images and dropout draws: the
    transformer's and the class centres' to float32 rounding, the landmark CNN's (every layer of it: its output
    layer starts at zero, so it gets random weights here) to a bound set by its channels-last float32 backward.

    Against a float64 run of the original path, ours (channels-last, as it trains) was 1e-3 to 2e-3 off in the
    landmark CNN's gradients (the first layers' sums over 16 x 56 x 56 positions), the NCHW paths ~6e-6; between
    the two paths, over seeds 0-29, at most 3.5e-3 (norm of the difference over the norm of all its gradients).
    """
    import copy

    from lafs.models import create_model
    from lafs.train.heads import OriginalHead, OriginalPathModel
    from lafs_kernels.nn import CosFace

    model = create_model("part_fvit_tiny")
    torch.nn.init.normal_(model.landmark_cnn.output_layer[1].weight, std=0.01, generator=rng)
    original = OriginalPathModel(copy.deepcopy(model))
    model.landmark_cnn.to(memory_format=torch.channels_last)  # as the fused path trains it
    classes, margin = 50, dict(s=64.0, m1=1.0, m2=0.0, m3=0.4)
    fused_head = CosFace(model.embedding_dim, classes, s=margin["s"], m=margin["m3"])
    original_head = OriginalHead(model.embedding_dim, classes, margin)
    with torch.no_grad():
        original_head.weight.copy_(fused_head.weight)
    images = torch.rand(16, 3, 112, 112, generator=rng)
    labels = torch.randint(0, classes, (16,), generator=rng)
    dropout_seed = int(torch.randint(0, 2**31, (), generator=rng))  # the landmark CNN's dropout, the same draws

    torch.manual_seed(dropout_seed)
    fused_head(model.train()(images), labels).backward()
    torch.manual_seed(dropout_seed)
    original_head(original.train()(images), labels)[0].backward()

    ours = dict(model.named_parameters())
    theirs = dict(original.model.named_parameters())
    assert ours.keys() == theirs.keys()
    pairs = [(ours[name].grad, theirs[name].grad, name) for name in ours if not name.startswith("landmark_cnn.")]
    for grad, reference, name in [*pairs, (fused_head.weight.grad, original_head.weight.grad, "class centres")]:
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-5 * float(reference.norm()), msg=name)
    landmark = [name for name in ours if name.startswith("landmark_cnn.")]
    assert all(float(theirs[name].grad.abs().max()) > 0 for name in landmark if name.endswith("weight"))
    ours_cnn = torch.cat([ours[name].grad.flatten() for name in landmark])
    theirs_cnn = torch.cat([theirs[name].grad.flatten() for name in landmark])
    assert float((ours_cnn - theirs_cnn).norm() / theirs_cnn.norm()) <= 2e-2


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
