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
