"""Two gloo processes with batch b train as one process with batch 2b; a two-process run resumes exactly.

Every stage runs the tiny recipe with the random elements that depend on how the batch is split
switched off: the landmark CNN's dropout (``model.landmark_dropout=0``) and its batch statistics
(``train.frozen_batch_norm=true``: each process would normalise with its own batch's statistics);
the transformer of the tiny recipe has no dropout or drop path. Flips and RandAugment stay on:
they are drawn per image from (seed, epoch, index), the same however the images are split.
Pretraining's views are drawn per process batch, so the test replaces them with views that depend
on each image alone; fine-tuning's mixup partner is the reversed process batch, so the single
process mixes each image with the partner it has under two processes (worker module).

All two-process jobs run in one pair of processes (``module_runs``), the single-process references
in the test process.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from lafs.train import shards as shards_mod

import train_distributed_worker as worker

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORLD, LOCAL_BATCH = 2, 4
STOP = 3  # the interrupted run stops after this many of its 6 steps
SEED = 3
# Every random element that depends on the split off; gradient accumulation and a clip that bites on.
EXACT = [
    f"seed={SEED}",
    "model.landmark_dropout=0",
    "train.frozen_batch_norm=true",
    "train.cpu_threads=1",
    "train.plots=false",
    "optim.accum_steps=2",
    "optim.clip_grad=1.0",
    "optim.epochs=3",
]
SUPERVISED = EXACT + ["optim.warmup_epochs=1"]
FINETUNE = EXACT + [
    "init.pretrained=null",
    "init.landmark=null",
    "aug.mixup_prob=0.5",
    "aug.randaugment=true",
    "optim.warmup_epochs=0",
]
# Every random element on (each process draws its own dropout, drop path, flips of other images, batch statistics).
RANDOM = [
    f"seed={SEED}",
    "train.cpu_threads=1",
    "train.plots=false",
    "optim.accum_steps=2",
    "optim.clip_grad=1.0",
    "optim.epochs=2",
    "init.pretrained=null",
    "init.landmark=null",
    "aug.mixup_prob=0.5",
    "model.overrides.drop_path=0.1",
    "model.overrides.dropout=0.1",
]
PRETRAIN = [f"seed={SEED}", "train.cpu_threads=1", "train.plots=false", "optim.epochs=2", "val.view_probe=0"]


def batch(size):
    return [f"optim.batch_size={size}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    one = worker.run_jobs  # one process, batch 2b, in this process
    landmark = [f"init.landmark={root / 'sup1'}"]
    one(
        [
            ("supervised", root / "sup1", SUPERVISED + batch(WORLD * LOCAL_BATCH), False, []),
            (
                "supervised",
                root / "sup1_to2",
                SUPERVISED + batch(WORLD * LOCAL_BATCH) + [f"train.stop_after_steps={STOP}"],
                False,
                [],
            ),
            (
                "pretrain",
                root / "pre1_to2",
                PRETRAIN + landmark + batch(WORLD * LOCAL_BATCH) + [f"train.stop_after_steps={STOP}"],
                False,
                [],
            ),
        ]
    )
    shutil.copy(root / "pre1_to2" / "checkpoints" / "last.pt", root / "pre1_to2_stopped.pt")
    two = [
        ("supervised", root / "sup2", SUPERVISED + batch(LOCAL_BATCH), False, []),
        (
            "supervised",
            root / "sup2_split",
            SUPERVISED + batch(LOCAL_BATCH) + [f"train.stop_after_steps={STOP}"],
            False,
            [],
        ),
        (
            "supervised",
            root / "sup2_to1",
            SUPERVISED + batch(LOCAL_BATCH) + [f"train.stop_after_steps={STOP}"],
            False,
            [],
        ),
        ("supervised", root / "sup2_split", ["train.stop_after_steps=null"], True, []),
        ("supervised", root / "sup1_to2", ["train.stop_after_steps=null"] + batch(LOCAL_BATCH), True, []),
        ("pretrain", root / "pre2", PRETRAIN + landmark + batch(LOCAL_BATCH), False, [("deterministic_views",)]),
        # with the real views (each process draws its own): resume
        (
            "pretrain",
            root / "pre2_views",
            PRETRAIN + landmark + batch(LOCAL_BATCH),
            False,
            [("dump_replicas", root / "pre2_views")],
        ),
        (
            "pretrain",
            root / "pre2_views_split",
            PRETRAIN + landmark + batch(LOCAL_BATCH) + [f"train.stop_after_steps={STOP}"],
            False,
            [],
        ),
        ("pretrain", root / "pre2_views_split", ["train.stop_after_steps=null"], True, []),
        ("pretrain", root / "pre1_to2", batch(LOCAL_BATCH), True, [("record_streams", root / "pre1_to2")]),
        ("finetune", root / "fine2", FINETUNE + batch(LOCAL_BATCH), False, []),
        (
            "finetune",
            root / "fine2_random",
            RANDOM + batch(LOCAL_BATCH),
            False,
            [("dump_replicas", root / "fine2_random")],
        ),
    ]
    worker.run_processes(WORLD, two, timeout=300)
    worker.run_processes(
        4, [("supervised", root / "sup4", SUPERVISED + batch(WORLD * LOCAL_BATCH // 4), False, [])], timeout=300
    )
    shutil.copytree(root / "sup2_to1", root / "sup2_to1_stopped")
    one(
        [
            ("supervised", root / "sup2_to1", ["train.stop_after_steps=null"] + batch(WORLD * LOCAL_BATCH), True, []),
            (
                "pretrain",
                root / "pre1",
                PRETRAIN + landmark + batch(WORLD * LOCAL_BATCH),
                False,
                [("deterministic_views",)],
            ),
            (
                "finetune",
                root / "fine1",
                FINETUNE + batch(WORLD * LOCAL_BATCH),
                False,
                [("interleaved_mixup_partner", WORLD)],
            ),
        ]
    )
    return root


def load(run, name="last.pt"):
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=False)


def whole_head(run, state):
    """The class centres [C, D] and their AdamW rows of a checkpoint, whatever the number of processes."""
    parts = shards_mod.load_shards(run / "checkpoints", state["head"])
    (name,) = parts[0]["optimizer"]
    parts = sorted(parts, key=lambda p: p["class_start"])
    return {
        "centres": torch.cat([p["state"][name] for p in parts]),
        **{f"centres.{k}": torch.cat([p["optimizer"][name][k] for p in parts]) for k in ("exp_avg", "exp_avg_sq")},
    }


def flat(tree, prefix="", floating=True):
    """Every (floating-point) tensor of a nested checkpoint dict or list, by dotted key."""
    out = {}
    for key, value in tree.items() if isinstance(tree, dict) else enumerate(tree):
        if isinstance(value, (dict, list)):
            out.update(flat(value, f"{prefix}{key}.", floating))
        elif torch.is_tensor(value) and (value.is_floating_point() or not floating):
            out[f"{prefix}{key}"] = value
    return out


def losses(run, key="loss"):
    """The log's ``key`` (the loss, or e.g. the training accuracy) at every logged step."""
    return [r[key] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def max_differences(a: dict, b: dict) -> dict:
    assert a.keys() == b.keys()
    return {k: float((a[k] - b[k]).abs().max()) for k in a if a[k].numel()}


def assert_close_tensors(a: dict, b: dict, atol: float, rtol: float):
    assert a.keys() == b.keys() and a
    worst = max(
        ((k, float(((a[k] - b[k]).abs() / (atol + rtol * b[k].abs())).max())) for k in a if a[k].numel()),
        key=lambda kv: kv[1],
    )
    assert worst[1] <= 1.0, f"{worst[0]} differs by {worst[1]:.3g} x (atol {atol} + rtol {rtol} |value|)"


def recognition_state(run):
    state = load(run)
    tensors = {**flat(state["model"]["state_dict"], "model."), **whole_head(run, state)}
    for index, entry in state["optimizer"]["state"].items():
        tensors.update({f"adam.{index}.{k}": v for k, v in entry.items() if v.dim()})
    return state, tensors


def test_supervised_two_processes_equal_one_with_batch_2b(runs):
    state1, one = recognition_state(runs / "sup1")
    state2, two = recognition_state(runs / "sup2")
    assert state1["step"] == state2["step"] == 6 and state2["world_size"] == 2
    assert len(state2["head"]["files"]) == 2
    assert_close_tensors(two, one, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(losses(runs / "sup2"), losses(runs / "sup1"), rtol=1e-5)
    assert losses(runs / "sup2", "acc") == losses(runs / "sup1", "acc")  # the global batch's training accuracy
    norms = [
        r["grad_norm"]
        for r in map(json.loads, (runs / "sup1" / "log.jsonl").read_text().splitlines())
        if "grad_norm" in r
    ]
    assert max(norms) > 1.0, "the clip never bit: raise the test's clipping"


def test_supervised_four_processes_equal_one_with_batch_4b(runs):
    state4, four = recognition_state(runs / "sup4")
    assert state4["world_size"] == 4 and len(state4["head"]["files"]) == 4  # 8 classes: 2 per process
    assert_close_tensors(four, recognition_state(runs / "sup1")[1], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(losses(runs / "sup4"), losses(runs / "sup1"), rtol=1e-5)


def test_two_process_run_resumed_equals_uninterrupted_run_bit_for_bit(runs):
    straight, split = runs / "sup2", runs / "sup2_split"
    names = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (split / "checkpoints").iterdir())
    assert {"last.pt", "best.pt", "head-step0000006-rank0of2.pt", "head-step0000006-rank1of2.pt"} == set(names)
    for name in names:  # every tensor: weights, optimizer state, RNG states
        a, b = flat(load(straight, name), floating=False), flat(load(split, name), floating=False)
        assert a.keys() == b.keys() and a, name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key}"
    a, b = load(straight), load(split)
    for index in a["optimizer"]["state"]:
        for key, value in a["optimizer"]["state"][index].items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), f"optimizer {index} {key}"
    assert losses(split) == losses(straight)


def test_two_process_run_resumed_on_one_process_continues_with_every_centre(runs):
    stopped = load(runs / "sup2_to1_stopped")
    assert stopped["step"] == STOP and stopped["world_size"] == 2
    resumed_state, resumed = recognition_state(runs / "sup2_to1")
    assert resumed_state["world_size"] == 1 and resumed_state["step"] == 6
    assert_close_tensors(resumed, recognition_state(runs / "sup1")[1], atol=1e-5, rtol=1e-4)
    assert_close_tensors(resumed, recognition_state(runs / "sup2")[1], atol=1e-5, rtol=1e-4)


def test_one_process_run_resumed_on_two_processes_continues_with_every_centre(runs):
    resumed_state, resumed = recognition_state(runs / "sup1_to2")
    assert resumed_state["world_size"] == 2 and resumed_state["step"] == 6
    assert_close_tensors(resumed, recognition_state(runs / "sup1")[1], atol=1e-5, rtol=1e-4)


def test_resume_with_another_global_batch_is_refused(runs, tmp_path):
    from lafs.train.loop import ResumeError

    shutil.copytree(runs / "sup2_to1_stopped", tmp_path / "run")
    with pytest.raises(ResumeError, match="global batch of 16 images .2 processes.*has 4 "):
        worker.run_jobs([("supervised", tmp_path / "run", ["optim.batch_size=2"], True, [])])


def test_resume_with_a_missing_shard_is_refused(runs, tmp_path):
    from lafs.train.loop import ResumeError

    shutil.copytree(runs / "sup2_to1_stopped", tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / f"head-step{STOP:07d}-rank1of2.pt").unlink()
    with pytest.raises(ResumeError, match="shards .* cannot be read.*rank1of2.pt"):
        worker.run_jobs([("supervised", tmp_path / "run", batch(WORLD * LOCAL_BATCH), True, [])])


def test_a_resume_that_fails_on_one_process_stops_every_process(runs, tmp_path):
    """No process goes on into training (and a collective its peer never joins): each one raises, the
    failing one with its own error."""
    run = tmp_path / "run"
    shutil.copytree(runs / "sup2_split", run)
    patches = [("fail_resume_on", 1), ("record_errors", run)]
    with pytest.raises(Exception, match="injected failure on process 1|another process could not resume"):
        worker.run_processes(WORLD, [("supervised", run, batch(LOCAL_BATCH), True, patches)], timeout=120)
    assert "injected failure on process 1" in (run / "error-rank1.txt").read_text()
    assert (run / "error-rank0.txt").read_text().startswith("ResumeError: --resume: another process could not")


def test_pretraining_two_processes_equal_one_with_batch_2b(runs):
    one, two = load(runs / "pre1")["dino"], load(runs / "pre2")["dino"]
    for part in ("student", "teacher", "dino_loss"):
        assert_close_tensors(flat(two[part]), flat(one[part]), atol=1e-5, rtol=1e-4)
    assert float(one["dino_loss"]["center"].abs().max()) > 0  # the centre moved
    np.testing.assert_allclose(losses(runs / "pre2"), losses(runs / "pre1"), rtol=1e-5)


def test_two_process_pretraining_resumed_equals_uninterrupted_run_bit_for_bit(runs):
    """Each process's view generator is saved and restored with its RNG state."""
    a, b = load(runs / "pre2_views"), load(runs / "pre2_views_split")
    assert a["step"] == b["step"] == 8 and len(b["rng"]) == 2
    a, b = flat(a, floating=False), flat(b, floating=False)  # incl. each process's RNG and view generator
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert losses(runs / "pre2_views_split") == losses(runs / "pre2_views")


def test_pretraining_resumed_on_more_processes_gives_the_new_one_its_own_views(runs):
    """Resumed from one process on two (a plain --resume: the first run's stop does not apply again): process
    0 continues the saved streams, process 1 draws its own views and dropout, not a copy of process 0's."""
    run = runs / "pre1_to2"
    assert json.loads((run / "summary.json").read_text())["finished"]
    saved = torch.load(runs / "pre1_to2_stopped.pt", weights_only=False)["rng"][0]
    rank0, rank1 = (torch.load(run / f"streams-rank{r}.pt", weights_only=False) for r in (0, 1))
    assert torch.equal(rank0["torch"], saved["torch"])
    assert torch.equal(rank0["stage"]["views"], saved["stage"]["views"])
    assert not torch.equal(rank1["torch"], rank0["torch"])
    assert not torch.equal(rank1["stage"]["views"], rank0["stage"]["views"])


def test_finetuning_with_mixup_two_processes_equal_one_with_batch_2b(runs):
    draws = [np.random.default_rng([SEED, step, micro]).random() < 0.5 for step in range(6) for micro in range(2)]
    assert any(draws) and not all(draws)  # some micro-batches mix, others do not
    _, one = recognition_state(runs / "fine1")
    _, two = recognition_state(runs / "fine2")
    assert_close_tensors(two, one, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(losses(runs / "fine2"), losses(runs / "fine1"), rtol=1e-5)


@pytest.mark.parametrize("run", ["fine2_random", "pre2_views"])
def test_with_randomness_on_the_processes_hold_the_same_model(runs, run):
    """Per-process dropout, drop path, batch statistics, views and mixup partners; shared mixup draws,
    one clip norm, DDP's all-reduce, the same teacher EMA: no replica drifts. (Batch-norm running statistics
    differ after the last forward pass: each process updates them with its own batch; DDP broadcasts process
    0's, the ones checkpoints keep, before every forward pass.)"""
    first, second = (torch.load(runs / run / f"replica-rank{r}.pt", weights_only=True) for r in range(WORLD))
    a, b = flat(first), flat(second)
    assert a.keys() == b.keys() and a
    running = [k for k in a if k.endswith(("running_mean", "running_var"))]
    assert (run == "fine2_random") == bool(running)
    for key in set(a) - set(running):
        assert torch.equal(a[key], b[key]), key
