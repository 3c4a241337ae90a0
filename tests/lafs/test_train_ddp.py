"""``torchrun --standalone --nproc_per_node=2 -m lafs.train --config tiny`` on the CPU (gloo): every stage of
the default run finishes on two processes. (That two processes compute what one does is
tests/lafs/test_train_distributed.py.)"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_torchrun_two_processes_run_every_stage_of_the_tiny_demo(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # stacks if a process aborts
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lafs.train",
        "--config",
        "tiny",
        "--out",
        str(out),
        "train.cpu_threads=1",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("few-shot training from scratch") == 1  # only the main process prints the table
    demo = json.loads((out / "summary.json").read_text())
    for stage in ("supervised", "pretrain", "finetune", "scratch"):
        summary = json.loads((out / stage / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["finished"], stage
        assert demo["stages"][stage]["verification_accuracy"] is not None, stage
        state = torch.load(out / stage / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
        assert state["world_size"] == 2 and len(state["rng"]) == 2, stage
        if stage != "pretrain":  # each process's class-centre shard, named by last.pt
            assert [(out / stage / "checkpoints" / f).is_file() for f in state["head"]["files"]] == [True, True]
    records = [json.loads(line) for line in (out / "supervised" / "log.jsonl").read_text().splitlines()]
    # the final verification, then (main process only) the landmark tracking report
    assert "val_accuracy" in records[-2] and "landmark_tracking" in records[-1]
    assert sum("landmark_tracking" in r for r in records) == 1
