"""Loading pretraining checkpoints written by the original LAFS (DINO-style) code."""

import json
from pathlib import Path

import pytest
import torch

from lafs.models import IncompatibleCheckpointError, PartTransformer
from lafs.ssl import DINOHead, DINOLoss, MultiCropModel, load_official_pretraining

SHAPES = json.loads((Path(__file__).parents[1] / "data" / "lafs_official_state_dict_shapes.json").read_text())


def official_checkpoint(backbone: dict, head: dict, center: torch.Tensor) -> dict:
    """The layout the original saves: DDP + MultiCropWrapper student, plain MultiCropWrapper teacher."""
    student = {f"module.backbone.{k}": v for k, v in backbone.items()}
    student.update({f"module.head.{k}": v for k, v in head.items()})
    teacher = {f"backbone.{k}": v.clone() + 1 for k, v in backbone.items()}
    teacher.update({f"head.{k}": v.clone() + 1 for k, v in head.items()})
    return {
        "student": student,
        "teacher": teacher,
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 7,
        "args": None,
        "dino_loss": {"center": center},
    }


def original_head_shapes(in_dim, out_dim, hidden=2048, bottleneck=256):
    return {
        "mlp.0.weight": (hidden, in_dim),
        "mlp.0.bias": (hidden,),
        "mlp.2.weight": (hidden, hidden),
        "mlp.2.bias": (hidden,),
        "mlp.4.weight": (bottleneck, hidden),
        "mlp.4.bias": (bottleneck,),
        "last_layer.weight_g": (out_dim, 1),
        "last_layer.weight_v": (out_dim, bottleneck),
    }


def test_full_size_lafs_checkpoint_loads_strictly_on_meta():
    """Part fViT-B backbone keys from the reference shapes, DINO head of 65,536 outputs (no memory used)."""
    backbone_shapes = {
        k: v for k, v in SHAPES["part_fvit_b_webface"].items() if not k.startswith(("stn.", "output_layer."))
    }
    assert "transformer.layers.11.1.fn.fn.net.3.weight" in backbone_shapes and "loss.weight" in backbone_shapes
    with torch.device("meta"):
        backbone = {k: torch.empty(shape) for k, shape in backbone_shapes.items()}
        head = {k: torch.empty(shape) for k, shape in original_head_shapes(768, 65536).items()}
        checkpoint = official_checkpoint(backbone, head, torch.empty(1, 65536))
        student = MultiCropModel(PartTransformer(), DINOHead(768, 65536))
        teacher = MultiCropModel(PartTransformer(), DINOHead(768, 65536))
    result = load_official_pretraining(student, teacher, checkpoint)
    assert result.epoch == 7 and not result.center_loaded
    assert "student.loss.weight" in result.ignored and "optimizer" in result.ignored


def tiny_models():
    def model():
        return MultiCropModel(
            PartTransformer(num_landmarks=9, patch_size=2, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=24),
            DINOHead(16, 40, hidden_dim=20, bottleneck_dim=6),
        )

    return model(), model()


def official_backbone_names(ours: dict) -> dict:
    """Our PartTransformer keys written the original way (blocks under ``transformer.``)."""
    return {("transformer." + k if k.startswith("layers.") else k): v for k, v in ours.items()}


def test_values_land_in_the_right_places(rng):
    source_student, _ = tiny_models()
    with torch.no_grad():
        for p in source_student.parameters():
            p.copy_(torch.randn(p.shape, generator=rng))
    backbone = official_backbone_names(source_student.backbone.state_dict())
    backbone["loss.weight"] = torch.randn(30, 16, generator=rng)  # the original's CosFace centres
    center = torch.randn(1, 40, generator=rng)
    checkpoint = official_checkpoint(backbone, source_student.head.state_dict(), center)

    student, teacher = tiny_models()
    loss = DINOLoss(40, ncrops=4)
    result = load_official_pretraining(student, teacher, checkpoint, loss)
    assert result.center_loaded and torch.equal(loss.center, center)
    for key, value in source_student.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key
        assert torch.equal(teacher.state_dict()[key], value + 1), key
    tokens = torch.randn(3, 9, 12, generator=rng)
    assert torch.equal(student.eval()([(tokens, None)]), source_student.eval()([(tokens, None)]))


def test_parametrized_weight_norm_keys_load(rng):
    source, _ = tiny_models()
    head = source.head.state_dict()
    head["last_layer.parametrizations.weight.original0"] = head.pop("last_layer.weight_g")
    head["last_layer.parametrizations.weight.original1"] = head.pop("last_layer.weight_v")
    checkpoint = official_checkpoint(official_backbone_names(source.backbone.state_dict()), head, torch.zeros(1, 40))
    student, teacher = tiny_models()
    load_official_pretraining(student, teacher, checkpoint)
    assert torch.equal(student.head.last_layer.weight_v, source.head.last_layer.weight_v)


def test_mismatches_are_reported(rng):
    source, _ = tiny_models()
    backbone = official_backbone_names(source.backbone.state_dict())
    head = source.head.state_dict()
    student, teacher = tiny_models()
    wrong_head = dict(head, **{"last_layer.weight_v": torch.zeros(41, 6)})
    with pytest.raises(IncompatibleCheckpointError, match="last_layer.weight_v"):
        load_official_pretraining(student, teacher, official_checkpoint(backbone, wrong_head, torch.zeros(1, 40)))
    no_head = official_checkpoint(backbone, {}, torch.zeros(1, 40))
    with pytest.raises(IncompatibleCheckpointError, match="no DINO head"):
        load_official_pretraining(student, teacher, no_head)
    with pytest.raises(IncompatibleCheckpointError, match="'teacher'"):
        load_official_pretraining(student, teacher, {"student": {}})
    with pytest.raises(IncompatibleCheckpointError, match="center"):
        load_official_pretraining(
            student, teacher, official_checkpoint(backbone, head, torch.zeros(1, 41)), DINOLoss(40, ncrops=4)
        )
