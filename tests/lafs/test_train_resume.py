"""Faults: --resume gives the uninterrupted result; a non-finite loss stops with the last good checkpoint;
a checkpoint of another architecture is refused before training."""

import json

import pytest
import torch

from lafs.train import config as cfgmod
from lafs.train.loop import NonFiniteLossError, ResumeError
from lafs.train.runner import run_command
from lafs.train.weights import ArchitectureMismatchError

pytestmark = pytest.mark.slow


def _params(run_dir, key="model"):
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    return state, state[key]["state_dict"] if key == "model" else state[key]


def _train(command, out, *overrides, resume=False):
    return run_command(command, recipe="tiny", overrides=list(overrides), out=out, resume=resume)


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key


def test_supervised_resume_equals_uninterrupted_run(tmp_path, rng):
    seed = int(torch.randint(0, 1000, (), generator=rng))
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train("supervised", straight, f"seed={seed}")
    first = _train("supervised", split, f"seed={seed}", "train.stop_after_steps=3")
    assert first["steps"] == 3 and not first["finished"]
    assert "stop_after_steps: 3" in (split / "config.yaml").read_text()
    second = _train("supervised", split, resume=True)  # the first command's stop does not apply again
    assert second["finished"] and second["steps"] == first["total_steps"]
    a, model_a = _params(straight)
    b, model_b = _params(split)
    _assert_same_tensors(model_a, model_b)
    (head_a,), (head_b,) = a["head"]["shards"], b["head"]["shards"]  # one process: the whole head inline
    _assert_same_tensors(head_a["state"], head_b["state"])
    assert head_a["optimizer"].keys() == head_b["optimizer"].keys() and head_a["optimizer"]
    for name in head_a["optimizer"]:
        _assert_same_tensors(head_a["optimizer"][name], head_b["optimizer"][name])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _assert_same_tensors(sa, sb)
    steps = [r["step"] for r in map(json.loads, (split / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps)), "the resumed log repeats or skips steps"


def test_finetune_resume_with_mixup_and_randaugment(tmp_path, rng):
    """Augmentation and mixup draws are keyed to (seed, epoch, index) and (seed, step): resume is exact."""
    seed = int(torch.randint(0, 1000, (), generator=rng))
    common = [f"seed={seed}", "init.pretrained=null", "init.landmark=null", "aug.mixup_prob=0.5"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train("finetune", straight, *common)
    _train("finetune", split, *common, "train.stop_after_steps=2")
    _train("finetune", split, "train.stop_after_steps=null", resume=True)
    _assert_same_tensors(_params(straight)[1], _params(split)[1])


def test_pretrain_resume_equals_uninterrupted_run(tmp_path):
    supervised = tmp_path / "sup"
    _train("supervised", supervised, "optim.epochs=1")
    common = [f"init.landmark={supervised}", "optim.epochs=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train("pretrain", straight, *common)
    _train("pretrain", split, *common, "train.stop_after_steps=3")
    _train("pretrain", split, "train.stop_after_steps=null", resume=True)
    a, b = _params(straight, "dino")[1], _params(split, "dino")[1]
    _assert_same_tensors(a["student"], b["student"])
    _assert_same_tensors(a["teacher"], b["teacher"])
    _assert_same_tensors(a["dino_loss"], b["dino_loss"])


def test_resume_edge_cases_keep_the_run_folder_right(tmp_path, capsys):
    """A refused resume changes nothing; changed settings are named; a finished run is left as it is; a
    folder of another stage is named as the likely cause."""
    out = tmp_path / "run"
    _train("supervised", out, "train.stop_after_steps=2")
    config = (out / "config.yaml").read_text()
    with pytest.raises(ResumeError, match=r"global batch of 8 images \(1 process\).*Set optim.batch_size=8"):
        _train("supervised", out, "optim.batch_size=4", resume=True)
    assert (out / "config.yaml").read_text() == config
    with pytest.warns(UserWarning, match=r"optim.lr: 0.002 -> 0.001"):
        _train("supervised", out, "optim.lr=1e-3", "train.stop_after_steps=3", resume=True)
    assert "stopped at step 3 of" in capsys.readouterr().out
    finished = _train("supervised", out, resume=True)
    assert finished["finished"] and "verification" in finished
    log = (out / "log.jsonl").read_text()
    again = _train("supervised", out, resume=True)
    assert again == finished and (out / "log.jsonl").read_text() == log
    assert "finished all" in capsys.readouterr().out
    with pytest.raises(cfgmod.ConfigError, match="was it not `pretrain`"):
        _train("pretrain", out, resume=True)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ResumeError, match="does not exist"):
        _train("supervised", tmp_path / "never", resume=True)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from lafs.train.supervised import SupervisedStage

    out = tmp_path / "run"
    good_step = 2
    original = SupervisedStage.train_step

    def poisoned(self, micro_batches, step):
        metrics = original(self, micro_batches, step)
        if step >= good_step:  # from the third step on, every loss is NaN
            metrics["loss"] = float("nan")
        return metrics

    monkeypatch.setattr(SupervisedStage, "train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match=f"at step {good_step + 1}.*last good checkpoint"):
        _train("supervised", out, "train.checkpoint_every=1")
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == good_step
    assert all(torch.isfinite(t).all() for t in state["model"]["state_dict"].values() if t.is_floating_point())


def test_nan_gradients_never_reach_the_weights(tmp_path, monkeypatch):
    """A NaN loss from the model itself: the optimizer step is skipped and the run stops."""
    from lafs.train import supervised

    out = tmp_path / "run"
    real = supervised.SupervisedStage.targets

    def nan_images(self, images, labels, step, micro):
        images, labels, weights = real(self, images, labels, step, micro)
        return images * float("nan") if step == 1 else images, labels, weights

    monkeypatch.setattr(supervised.SupervisedStage, "targets", nan_images)
    with pytest.raises(NonFiniteLossError):
        _train("supervised", out, "train.checkpoint_every=1")
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 1


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    supervised = tmp_path / "sup"
    _train("supervised", supervised, "optim.epochs=1")
    with pytest.raises(ArchitectureMismatchError, match="landmark CNN"):
        _train(
            "finetune",
            tmp_path / "ft",
            f"init.landmark={supervised}",
            "init.pretrained=null",
            "model.overrides.landmark_stem_channels=16",
        )
    assert not (tmp_path / "ft" / "checkpoints" / "last.pt").exists()
    with pytest.raises(cfgmod.ConfigError, match="does not exist"):
        _train("finetune", tmp_path / "ft2", f"init.landmark={tmp_path / 'missing'}")
