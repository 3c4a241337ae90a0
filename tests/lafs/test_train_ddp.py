"""Two CPU processes under torchrun (gloo): DDP over the model, Partial FC over the class centres."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_two_process_supervised_run(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "lafs.train", "supervised", "--config", "tiny", "--out", str(out),
               "optim.epochs=1", "train.cpu_threads=1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]
    # 32 images, 2 processes x batch 8 -> 2 steps per epoch
    assert summary["steps"] == 2
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(map(lambda v: v == v and abs(v) < 1e4, losses))
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 2 and len(state["rng"]) == 2  # the RNG state of each process
    # the final verification, then (main process only) the landmark tracking report
    assert "val_accuracy" in records[-2] and "landmark_tracking" in records[-1]
    assert sum("landmark_tracking" in r for r in records) == 1
