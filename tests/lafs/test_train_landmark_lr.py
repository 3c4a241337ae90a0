"""The landmark CNN's own learning rate: optim.landmark_lr_scale and optim.landmark_warmup_epochs."""

import numpy as np
import pytest
import torch

from lafs.models import create_model
from lafs.train.optim import landmark_warmup, param_groups, set_lr


def _groups(scale=1.0, layer_decay=1.0):
    model = create_model("part_fvit_nano", depth=2)
    return model, param_groups(
        model, weight_decay=0.05, landmark_weight_decay=0.01, layer_decay=layer_decay, landmark_lr_scale=scale
    )


@pytest.mark.parametrize("layer_decay", [1.0, 0.5])
def test_landmark_groups_hold_the_landmark_cnn_alone_with_its_scale(layer_decay):
    model, groups = _groups(scale=7.0, layer_decay=layer_decay)
    landmark = {id(p) for p in model.landmark_cnn.parameters()}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        if group["landmark"]:
            assert ids <= landmark
            assert group["lr_scale"] == pytest.approx(7.0 * layer_decay**3)
        else:
            assert not ids & landmark
    assert sum(len(g["params"]) for g in groups if g["landmark"]) == len(landmark)


def test_set_lr_holds_the_landmark_cnn_back_by_its_factor():
    _, groups = _groups(scale=3.0)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    set_lr(optimizer, 0.01, landmark_factor=0.0)
    assert all(g["lr"] == 0.0 for g in optimizer.param_groups if g["landmark"])
    assert all(g["lr"] == pytest.approx(0.01) for g in optimizer.param_groups if not g["landmark"])
    set_lr(optimizer, 0.01, landmark_factor=0.5)
    assert all(g["lr"] == pytest.approx(0.015) for g in optimizer.param_groups if g["landmark"])


def test_landmark_warmup_is_frozen_then_ramps():
    np.testing.assert_allclose(landmark_warmup(8, 3, 2), [0, 0, 0, 0.5, 1, 1, 1, 1])
    np.testing.assert_allclose(landmark_warmup(4, 0, 0), [1, 1, 1, 1])
    np.testing.assert_allclose(landmark_warmup(4, 0, 3), [1, 1, 1, 1])  # no warm-up: the lr schedule as it was
    assert landmark_warmup(5, 9, 1).max() == 0.0


def test_a_landmark_warmup_keeps_the_landmark_cnn_fixed_while_the_transformer_trains(tmp_path):
    from lafs.models import load_model
    from lafs.train.__main__ import main
    from lafs.train.loop import seed_everything

    common = ["supervised", "--config", "tiny", "train.stop_after_steps=3", "val.landmark_faces=0"]
    assert main([*common, "optim.landmark_warmup_epochs=2", "--out", str(tmp_path / "frozen")]) == 0
    assert main([*common, "--out", str(tmp_path / "free")]) == 0
    seed_everything(0)  # the runs' seed: the same initial weights
    start = create_model(
        "part_fvit_nano",
        dim=32,
        depth=1,
        heads=2,
        dim_head=16,
        mlp_dim=64,
        landmark_stem_channels=8,
        landmark_blocks=[[3, 16, 16, False, "RE", 2], [3, 32, 24, True, "HS", 2]],
    )
    frozen, free = load_model(tmp_path / "frozen"), load_model(tmp_path / "free")
    # only the run without the warm-up moved its landmark CNN (parameters; batch-norm statistics still update)
    assert torch.equal(frozen.landmark_cnn.output_layer[1].bias, start.landmark_cnn.output_layer[1].bias)
    assert all(torch.equal(a, b) for a, b in zip(frozen.landmark_cnn.parameters(), start.landmark_cnn.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(free.landmark_cnn.parameters(), start.landmark_cnn.parameters()))
    assert not torch.equal(frozen.transformer.cls_token, start.transformer.cls_token)
