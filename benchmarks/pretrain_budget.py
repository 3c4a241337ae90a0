"""Plan and report the long-pretraining demo of ``benchmarks/gpu_pretrain_demo.sh``.

The default run (``python -m lafs.train``) pretrains for 96 steps, orders of magnitude short of what DINO needs
(issue 6). On a GPU the same demo can pretrain for thousands of steps in minutes; this script sizes that run
from the default run's own measured speed so that it fits the time left on the device.

  python benchmarks/pretrain_budget.py plan DEFAULT_RUN --seconds S
      prints ``EPOCHS WARMUP_EPOCHS VAL_EVERY_STEPS`` for a pretraining that fits in S seconds together with
      the few-shot fine-tuning stage (scratch is reused from the default run), or exits 3 when not even
      ``--min-epochs`` fit.
  python benchmarks/pretrain_budget.py report DEFAULT_RUN LONG_RUN [--out FILE.md]
      prints (and writes) a Markdown table: pretraining steps, view retrieval, teacher verification and the
      few-shot comparison of both runs, from their summary.json and pretrain/log.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

# Validation (1000 held-out pairs + the view probe) and checkpoints cost a share of each step; measured on the
# CPU at every 240 steps as about 10%. The plan assumes 25% to keep the run inside its budget.
VALIDATION_OVERHEAD = 1.25
# How many verification points the long run logs (one every 1/VALIDATIONS of the run, rounded to epochs).
VALIDATIONS = 8


@dataclass(frozen=True)
class PretrainPlan:
    epochs: int
    warmup_epochs: int
    val_every_steps: int
    expected_seconds: float


def plan_pretraining(
    *,
    seconds_per_step: float,
    steps_per_epoch: int,
    finetune_seconds: float,
    budget_seconds: float,
    min_epochs: int = 8,
    max_epochs: int = 400,
) -> PretrainPlan | None:
    """The longest pretraining (whole epochs, at most ``max_epochs``) that leaves time for one few-shot
    fine-tuning stage (``finetune_seconds``, counted twice for start-up and Triton compilation) within
    ``budget_seconds``; None when fewer than ``min_epochs`` fit."""
    if seconds_per_step <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"need positive step time and steps per epoch, got {seconds_per_step}, {steps_per_epoch}")
    left = budget_seconds - 2.0 * finetune_seconds
    epoch_seconds = seconds_per_step * steps_per_epoch * VALIDATION_OVERHEAD
    epochs = min(max_epochs, int(left // epoch_seconds)) if left > 0 else 0
    if epochs < min_epochs:
        return None
    # DINO's recipe warms up for 10 of 100 epochs or more; 5% keeps the long run mostly at its peak rate.
    warmup = max(2, round(0.05 * epochs))
    val_every = max(1, epochs // VALIDATIONS) * steps_per_epoch
    return PretrainPlan(epochs, warmup, val_every, epochs * epoch_seconds)


def _summary(run: Path) -> dict:
    path = run / "summary.json"
    if not path.is_file():
        raise SystemExit(f"pretrain_budget: {path} not found: the demo run did not finish")
    return json.loads(path.read_text())


def _stage_config(run: Path, stage: str) -> dict:
    import yaml

    return yaml.safe_load((run / stage / "config.yaml").read_text())


def plan_from_run(run: Path, budget_seconds: float, min_epochs: int) -> PretrainPlan | None:
    stages = _summary(run)["stages"]
    pretrain = stages["pretrain"]
    epochs = float(_stage_config(run, "pretrain")["optim"]["epochs"])
    steps_per_epoch = max(1, round(pretrain["steps"] / epochs))
    # The short default run includes compilation and warm-up in its step time: the plan errs on the safe side.
    return plan_pretraining(
        seconds_per_step=pretrain["train_seconds"] / pretrain["steps"],
        steps_per_epoch=steps_per_epoch,
        finetune_seconds=stages["finetune"]["train_seconds"],
        budget_seconds=budget_seconds,
        min_epochs=min_epochs,
    )


def _curve(run: Path) -> list[dict]:
    log = run / "pretrain" / "log.jsonl"
    if not log.is_file():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in rows if "val_accuracy" in r]


def _fmt(value, spec=".3f") -> str:
    return "-" if value is None else format(value, spec)


def report(runs: dict[str, Path]) -> str:
    """Markdown comparison of demo runs (name -> run folder)."""
    lines = [
        "| run | pretraining steps | view retrieval (teacher / student) | teacher verification | "
        "few-shot from LAFS | from scratch | LAFS - scratch (noise) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        s = _summary(run)
        pre, fs = s["stages"]["pretrain"], s["few_shot"]
        margin = fs["lafs_minus_scratch"]
        lines.append(
            f"| {name} | {pre['steps']} | {_fmt(pre.get('view_retrieval'))} / "
            f"{_fmt(pre.get('student_view_retrieval'))} | {_fmt(pre['verification_accuracy'])} | "
            f"{_fmt(fs['lafs_accuracy'])} | {_fmt(fs['scratch_accuracy'])} | "
            f"{_fmt(margin, '+.3f')} ({_fmt(fs['noise'])}) |"
        )
    for name, run in runs.items():
        curve = _curve(run)
        if curve:
            lines += [
                "",
                f"{name}: pretraining validation (step: teacher verification, teacher / student view retrieval)",
                "",
            ]
            lines += [
                f"- {r.get('step')}: {_fmt(r.get('val_accuracy'))}, {_fmt(r.get('val_view_retrieval'))} / "
                f"{_fmt(r.get('val_student_view_retrieval'))}"
                for r in curve
            ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan")
    p.add_argument("run", type=Path)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--min-epochs", type=int, default=8)
    r = sub.add_parser("report")
    r.add_argument("runs", type=Path, nargs="+")
    r.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "plan":
        plan = plan_from_run(args.run, args.seconds, args.min_epochs)
        if plan is None:
            print(
                f"pretrain_budget: fewer than {args.min_epochs} pretraining epochs fit in {args.seconds:.0f} s",
                file=sys.stderr,
            )
            return 3
        print(plan.epochs, plan.warmup_epochs, plan.val_every_steps)
        print(f"pretrain_budget: {plan.epochs} epochs, about {math.ceil(plan.expected_seconds)} s", file=sys.stderr)
        return 0
    text = report({run.name: run for run in args.runs})
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
