"""Nothing we load runs code unless the user says so (lafs.models.safe_load).

A hostile pickle (one whose unpickling creates a file) goes to every path that reads a checkpoint:
the file must not appear, and the error must name the file and the global it wanted. The same
payload does create the file under the explicit opt-in, so the test can fail. Official Part fViT /
LAFS files (with their ``args`` Namespace and NumPy scalars) still load, strictly, by default.
"""

import argparse
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lafs.eval import __main__ as eval_cli
from lafs.eval.verification import load_bin
from lafs.models import (
    UnsafeCheckpointError,
    allow_unsafe_pickle,
    atomic_save,
    create_model,
    create_transformer,
    load_checkpoint,
    load_model,
    model_to_dict,
)
from lafs.models.official import IncompatibleCheckpointError
from lafs.ssl import DINOHead, DINOLoss, MultiCropModel, load_official_pretraining
from lafs.train import __main__ as train_cli
from lafs.train import shards as shards_mod
from lafs.train.weights import load_landmark_cnn, load_pretrained_transformer

from helpers.models import official_state_of


class CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: the file appears if the loader ran the pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


WANTED = f"{open.__module__}.open"  # io.open: the global the payload names


def write_hostile(path: Path, marker: Path, fmt: str) -> Path:
    """A checkpoint that looks like ours (a real lafs/v1 model dict) with the payload beside it
    (``fmt``: "torch.save" or "pickle"), or a verification .bin with it among the labels ("bin")."""
    obj = {"model": model_to_dict(create_model("part_fvit_nano")), "step": 3, "hook": CreatesFile(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        path.write_bytes(pickle.dumps(([b"\x89PNG", b"\x89PNG"], [True, CreatesFile(marker)])))
    elif fmt == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


def tiny_multicrop():
    return MultiCropModel(
        create_transformer("part_fvit_nano", depth=1), DINOHead(64, 40, hidden_dim=20, bottleneck_dim=6)
    )


def _train(args, capsys):
    code = train_cli.main(args)
    return code, capsys.readouterr().err


# Every loading path: (name, call(path, tmp_path, capsys) -> error message).
def _raises(call):
    with pytest.raises(pickle.UnpicklingError) as err:
        call()
    return str(err.value)


def _cli_eval_error(args, capsys):
    """python -m lafs.eval reports a refused file in one line and exits 1 (no traceback)."""
    code = eval_cli.main(args)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    return err


def _cli_train_error(args, capsys):
    code, err = _train(args, capsys)
    assert code == 1, err
    return err


LOADERS = {
    "load_checkpoint": lambda p, tmp, capsys: _raises(lambda: load_checkpoint(p)),
    "load_model(file)": lambda p, tmp, capsys: _raises(lambda: load_model(p)),
    "load_model(run folder)": lambda p, tmp, capsys: _raises(lambda: load_model(p.parent.parent)),
    "load_official_pretraining": lambda p, tmp, capsys: _raises(
        lambda: load_official_pretraining(tiny_multicrop(), tiny_multicrop(), p)
    ),
    "init.landmark (load_landmark_cnn)": lambda p, tmp, capsys: _raises(
        lambda: load_landmark_cnn(create_model("part_fvit_nano").landmark_cnn, str(p))
    ),
    "init.pretrained (load_pretrained_transformer)": lambda p, tmp, capsys: _raises(
        lambda: load_pretrained_transformer(create_transformer("part_fvit_nano"), str(p))
    ),
    "python -m lafs.train pretrain init.landmark=": lambda p, tmp, capsys: _cli_train_error(
        ["pretrain", "--config", "tiny", "--out", str(tmp / "run"), f"init.landmark={p}"], capsys
    ),
    "python -m lafs.train finetune init.pretrained=": lambda p, tmp, capsys: _cli_train_error(
        ["finetune", "--config", "tiny", "--out", str(tmp / "run"), "init.landmark=null", f"init.pretrained={p}"],
        capsys,
    ),
    "python -m lafs.train --resume": lambda p, tmp, capsys: _cli_train_error(
        ["supervised", "--config", "tiny", "--out", str(p.parent.parent), "--resume"], capsys
    ),
    "python -m lafs.eval verify --model": lambda p, tmp, capsys: _cli_eval_error(
        [
            "verify",
            "--model",
            str(p),
            "--data",
            str(_bin_folder(tmp)),
            "--targets",
            "lfw",
            "--device",
            "cpu",
            "--out",
            str(tmp / "v.json"),
        ],
        capsys,
    ),
    "python -m lafs.eval ijb --model": lambda p, tmp, capsys: _cli_eval_error(
        [
            "ijb",
            "--model",
            str(p),
            "--root",
            str(tmp),
            "--target",
            "IJBB",
            "--device",
            "cpu",
            "--out",
            str(tmp / "ijb"),
        ],
        capsys,
    ),
    "load_bin (verification .bin)": lambda p, tmp, capsys: _raises(lambda: load_bin(p)),
}


def _bin_folder(tmp: Path) -> Path:
    folder = tmp / "bins"
    folder.mkdir(exist_ok=True)
    (folder / "lfw.bin").write_bytes(b"")  # only its existence is checked before the model loads
    return folder


CASES = [
    (loader, fmt) for loader in LOADERS for fmt in (("bin",) if "load_bin" in loader else ("torch.save", "pickle"))
]


@pytest.mark.parametrize("loader, fmt", CASES)
def test_a_hostile_pickle_runs_on_no_loading_path(loader, fmt, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    path = write_hostile(tmp_path / "run" / "checkpoints" / "last.pt", marker, fmt)
    message = LOADERS[loader](path, tmp_path, capsys)
    assert not marker.exists(), f"{loader} ran the pickle's code"
    assert str(path) in message and WANTED in message, message


def test_class_centre_shards_load_as_every_checkpoint_does(tmp_path):
    """The shard files a training checkpoint names go through load_checkpoint (no code runs, the opt-in
    applies), and only plain shard file names are read."""
    marker = tmp_path / "code_ran"
    name = shards_mod.shard_file(3, 0, 2)
    path = write_hostile(tmp_path / name, marker, "torch.save")
    with pytest.raises(UnsafeCheckpointError, match=f"{path}.*{WANTED}"):
        shards_mod.load_shards(tmp_path, {"files": [name]})
    assert not marker.exists()
    with allow_unsafe_pickle(), pytest.warns(UserWarning, match="can run code"):
        (loaded,) = shards_mod.load_shards(tmp_path, {"files": [name]})
    assert marker.exists() and loaded["step"] == 3
    with pytest.raises(ValueError, match="not a shard file name"):
        shards_mod.load_shards(tmp_path, {"files": ["../elsewhere/head-step0000003-rank0of2.pt"]})


def test_a_damaged_checkpoint_to_resume_or_start_from_is_one_clear_line(tmp_path, capsys):
    whole = tmp_path / "whole.pt"
    torch.save(model_to_dict(create_model("part_fvit_nano")), whole)
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(whole.read_bytes()[:4000])
    err = _cli_train_error(["supervised", "--config", "tiny", "--out", str(run.parent), "--resume"], capsys)
    assert "--resume:" in err and "last.pt: not a readable torch checkpoint" in err and "Traceback" not in err
    torch.save([1, 2], run / "last.pt")
    err = _cli_train_error(["supervised", "--config", "tiny", "--out", str(run.parent), "--resume"], capsys)
    assert "is not a supervised checkpoint of lafs.train (format 'a list'" in err
    (tmp_path / "empty.pt").write_bytes(b"")
    args = ["finetune", "--config", "tiny", "--out", str(tmp_path / "ft"), "init.landmark=null"]
    code, err = _train([*args, f"init.pretrained={tmp_path / 'empty.pt'}"], capsys)
    assert code == 2 and "init.pretrained:" in err and "empty.pt: not a readable torch checkpoint" in err


def test_the_payload_does_run_under_the_explicit_opt_in(tmp_path):
    marker = tmp_path / "code_ran"
    path = write_hostile(tmp_path / "evil.pt", marker, "torch.save")
    with pytest.warns(UserWarning, match="can run code"):
        loaded = load_checkpoint(path, unsafe_pickle=True)
    assert marker.exists() and loaded["step"] == 3
    marker.unlink()
    with allow_unsafe_pickle(), pytest.warns(UserWarning):
        load_model(path)  # the model dict beside the payload loads
    assert marker.exists()


def test_the_cli_flags_opt_in(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    path = write_hostile(tmp_path / "evil.pt", marker, "torch.save")
    with pytest.warns(UserWarning):  # the model loads; the IJB folder holds no meta files
        code = eval_cli.main(
            [
                "ijb",
                "--model",
                str(path),
                "--root",
                str(tmp_path),
                "--target",
                "IJBB",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "ijb"),
                "--unsafe-pickle",
            ]
        )
    assert code == 1 and "meta" in capsys.readouterr().err
    assert marker.exists()
    marker.unlink()
    with pytest.warns(UserWarning, match="can run code"):
        code, err = _train(
            [
                "finetune",
                "--config",
                "tiny",
                "--out",
                str(tmp_path / "run"),
                "init.landmark=null",
                f"init.pretrained={path}",
                "--unsafe-pickle",
            ],
            capsys,
        )
    assert marker.exists() and code == 2 and "neither a lafs.train pretraining checkpoint" in err  # loaded
    marker.unlink()
    # the opt-in ends with the command
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_hostile_object_inside_an_allowed_namespace_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "official.pth"
    torch.save({"student": {}, "teacher": {}, "args": argparse.Namespace(lr=0.1, hook=CreatesFile(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match="official.pth.*io.open"):
        load_official_pretraining(tiny_multicrop(), tiny_multicrop(), path)
    assert not marker.exists()


def test_other_globals_are_refused_by_name(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"where": Path("/tmp"), "state_dict": {}}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_model(path)
    assert err.value.path == path and err.value.globals == [f"pathlib.{type(Path('/tmp')).__name__}"]


# ---------------------------------------------------------------- what still loads by default


def dino_args() -> argparse.Namespace:
    """What the original's argparse leaves in a checkpoint, NumPy scalars included."""
    return argparse.Namespace(
        arch="vit",
        out_dim=40,
        norm_last_layer=True,
        momentum_teacher=np.float64(0.996),
        local_crops_scale=(0.4, 1.0),
        epochs=np.int64(40),
        lr=0.0005,
        output_dir="out",
    )


def test_official_pretraining_file_loads_strictly_from_its_path(tmp_path, rng):
    source = tiny_multicrop()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(generator=rng)
    backbone = {
        ("transformer." + k if k.startswith("layers.") else k): v for k, v in source.backbone.state_dict().items()
    }
    head = source.head.state_dict()
    checkpoint = {
        "student": {
            **{f"module.backbone.{k}": v for k, v in backbone.items()},
            **{f"module.head.{k}": v for k, v in head.items()},
        },
        "teacher": {
            **{f"backbone.{k}": v + 1 for k, v in backbone.items()},
            **{f"head.{k}": v + 1 for k, v in head.items()},
        },
        "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(1e-3), "params": [0, 1]}]},
        "epoch": np.int64(7),
        "args": dino_args(),
        "dino_loss": {"center": torch.ones(1, 40)},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    student, teacher, loss = tiny_multicrop(), tiny_multicrop(), DINOLoss(40, 2)
    result = load_official_pretraining(student, teacher, path, loss)
    assert result.epoch == 7 and result.center_loaded
    for ours, theirs, shift in ((student, source, 0), (teacher, source, 1)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b + shift), name
    del checkpoint["teacher"]["backbone.pos_embedding"]
    torch.save(checkpoint, path)
    with pytest.raises(IncompatibleCheckpointError, match="pos_embedding"):
        load_official_pretraining(tiny_multicrop(), tiny_multicrop(), path)


def test_official_part_fvit_file_with_args_loads_through_load_model(tmp_path, rng):
    source = create_model("part_fvit_b", dim=128, depth=2, heads=2, mlp_dim=256).eval()
    path = tmp_path / "part_fvit.pth"
    torch.save(
        {
            "model": {"module." + k: v for k, v in official_state_of(source).items()},
            "epoch": np.int64(20),
            "args": dino_args(),
        },
        path,
    )
    x = torch.rand(1, 3, 112, 112, generator=rng) * 2 - 1
    assert torch.equal(load_model(path)(x), source(x))


def test_our_training_checkpoints_load_without_the_opt_in(tmp_path):
    """The NumPy random state of a training checkpoint is a plain array: allowed."""
    state = {
        "model": model_to_dict(create_model("part_fvit_nano")),
        "rng": {"numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }
    atomic_save(state, tmp_path / "checkpoints" / "last.pt")
    loaded = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert np.array_equal(loaded["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert load_model(tmp_path).arch_config() == create_model("part_fvit_nano").arch_config()


def test_load_model_points_pretraining_checkpoints_to_load_official_pretraining(tmp_path):
    transformer = create_transformer("part_fvit_b", dim=128, depth=1, heads=2, mlp_dim=256)
    teacher = {
        f"backbone.{'transformer.' + k if k.startswith('layers.') else k}": v
        for k, v in transformer.state_dict().items()
    }
    torch.save({"student": teacher, "teacher": teacher, "args": dino_args()}, tmp_path / "pre.pth")
    with pytest.raises(IncompatibleCheckpointError, match="lafs.ssl.load_official_pretraining"):
        load_model(tmp_path / "pre.pth")
