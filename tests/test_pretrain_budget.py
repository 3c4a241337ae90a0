"""benchmarks/pretrain_budget.py: sizing the GPU long-pretraining demo and its report."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "pretrain_budget.py"
_spec = importlib.util.spec_from_file_location("pretrain_budget", SCRIPT)
budget = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = budget  # dataclasses look their module up there
_spec.loader.exec_module(budget)


def test_plan_fits_the_budget_with_room_for_fine_tuning():
    plan = budget.plan_pretraining(
        seconds_per_step=0.05, steps_per_epoch=48, finetune_seconds=20.0, budget_seconds=300.0
    )
    epoch_seconds = 0.05 * 48 * budget.VALIDATION_OVERHEAD
    assert plan.epochs == int((300.0 - 40.0) // epoch_seconds)
    assert plan.expected_seconds + 2 * 20.0 <= 300.0
    # one more epoch would not fit
    assert (plan.epochs + 1) * epoch_seconds + 40.0 > 300.0
    assert plan.val_every_steps % 48 == 0 and plan.val_every_steps <= plan.epochs * 48
    assert 2 <= plan.warmup_epochs < plan.epochs


def test_plan_is_capped_and_refuses_too_little_time():
    capped = budget.plan_pretraining(
        seconds_per_step=1e-4, steps_per_epoch=48, finetune_seconds=1.0, budget_seconds=1000.0, max_epochs=50
    )
    assert capped.epochs == 50
    assert (
        budget.plan_pretraining(
            seconds_per_step=1.0, steps_per_epoch=48, finetune_seconds=10.0, budget_seconds=200.0, min_epochs=8
        )
        is None
    )
    with pytest.raises(ValueError, match="positive"):
        budget.plan_pretraining(seconds_per_step=0.0, steps_per_epoch=48, finetune_seconds=1.0, budget_seconds=100.0)


def _fake_demo_run(
    path: Path,
    *,
    steps: int,
    epochs: float,
    seconds: float,
    lafs: float,
    scratch: float,
    curve: list[tuple[int, float, float]],
) -> Path:
    (path / "pretrain").mkdir(parents=True)
    (path / "pretrain" / "config.yaml").write_text(yaml.safe_dump({"optim": {"epochs": epochs}}))
    stage = {
        "verification_accuracy": 0.5,
        "train_seconds": seconds,
        "steps": steps,
        "view_retrieval": 0.25,
        "student_view_retrieval": 0.5,
    }
    summary = {
        "stages": {"pretrain": stage, "finetune": {"train_seconds": 10.0}},
        "few_shot": {
            "lafs_accuracy": lafs,
            "scratch_accuracy": scratch,
            "lafs_minus_scratch": lafs - scratch,
            "noise": 0.04,
        },
    }
    (path / "summary.json").write_text(json.dumps(summary))
    rows = [{"step": s, "loss": 1.0} for s in range(1, steps + 1)]
    rows += [{"step": s, "val_accuracy": acc, "val_view_retrieval": r} for s, acc, r in curve]
    (path / "pretrain" / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_plan_from_run_reads_the_measured_speed(tmp_path):
    run = _fake_demo_run(tmp_path / "default", steps=96, epochs=2, seconds=12.0, lafs=0.5, scratch=0.5, curve=[])
    plan = budget.plan_from_run(run, budget_seconds=200.0, min_epochs=1)
    # 0.125 s per step, 48 steps per epoch, 2 x 10 s kept for fine-tuning
    assert plan.epochs == int(180.0 // (0.125 * 48 * budget.VALIDATION_OVERHEAD))
    assert budget.main(["plan", str(run), "--seconds", "10"]) == 3


def test_report_compares_runs_and_lists_the_curve(tmp_path, capsys):
    default = _fake_demo_run(
        tmp_path / "default", steps=96, epochs=2, seconds=9.6, lafs=0.45, scratch=0.49, curve=[(96, 0.46, 0.05)]
    )
    long = _fake_demo_run(
        tmp_path / "long",
        steps=960,
        epochs=20,
        seconds=96.0,
        lafs=0.61,
        scratch=0.49,
        curve=[(480, 0.55, 0.2), (960, 0.6, 0.3)],
    )
    out = tmp_path / "report.md"
    assert budget.main(["report", str(default), str(long), "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    assert "| default | 96 | 0.250 / 0.500 | 0.500 | 0.450 | 0.490 | -0.040 (0.040) |" in text
    assert "| long | 960 | 0.250 / 0.500 | 0.500 | 0.610 | 0.490 | +0.120 (0.040) |" in text
    assert "- 480: 0.550, 0.200 / -" in text and "- 960: 0.600, 0.300 / -" in text
