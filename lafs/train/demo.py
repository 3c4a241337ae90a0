"""The default run: supervised -> LAFS pretraining -> few-shot fine-tuning, and few-shot from scratch.

Every stage writes its own run folder under ``runs/demo/`` (``supervised``,
``pretrain``, ``finetune``, ``scratch``); ``runs/demo/summary.json`` collects
each stage's verification accuracy and throughput and the few-shot comparison.
All four configurations are validated before the first step. With ``--resume``
finished stages are kept and an interrupted one continues from its last.pt.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from . import config as config_mod
from .distributed import init_distributed
from .stage_run import run_single_stage

# (run folder, stage implementation, what the table calls it)
DEMO_RUNS = (
    ("supervised", "supervised", "supervised, all labels"),
    ("pretrain", "pretrain", "LAFS pretraining, no labels"),
    ("finetune", "finetune", "few-shot fine-tuning from LAFS"),
    ("scratch", "finetune", "few-shot training from scratch"),
)


def run_demo(tree: dict, *, out: Path, resume: bool = False) -> dict:
    refs = {"supervised": out / "supervised", "pretrain": out / "pretrain"}
    configs = config_mod.resolve_demo(tree, refs, source="demo recipe")
    main = init_distributed().is_main  # under torchrun only the main process writes and prints the summary
    out.mkdir(parents=True, exist_ok=True)
    if main:
        config_mod.dump(tree, out / "config.yaml")
    results, started = {}, time.perf_counter()
    for folder, stage, _ in DEMO_RUNS:
        path = out / folder
        summary_file = path / "summary.json"
        if resume and summary_file.exists() and json.loads(summary_file.read_text()).get("finished"):
            results[folder] = json.loads(summary_file.read_text())
            continue
        stage_resume = resume and (path / "checkpoints" / "last.pt").exists()
        stage_started = time.perf_counter()
        results[folder] = run_single_stage(stage, configs[folder], path, resume=stage_resume)
        results[folder]["wall_seconds"] = time.perf_counter() - stage_started
    summary = demo_summary(results, configs, time.perf_counter() - started)
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(format_table(summary))
    return summary


def demo_summary(results: dict, configs: dict, wall_seconds: float) -> dict:
    stages = {}
    for folder, _, label in DEMO_RUNS:
        r = results[folder]
        stages[folder] = {
            "description": label,
            "verification_accuracy": r.get("verification", {}).get("accuracy"),
            "best_accuracy": r.get("best", {}).get("accuracy"),
            "images_per_s": r["images_per_s"],
            "train_seconds": r["train_seconds"],
            "steps": r["steps"],
            "train_images": r.get("train_images"),
        }
        if "landmark_tracking" in r:  # supervised and fine-tuning stages (None on real data)
            stages[folder]["landmark_tracking"] = r["landmark_tracking"]
    # Pretraining's label-free check (lafs.ssl.monitor): absent when val.view_probe is 0.
    for key in ("view_retrieval", "student_view_retrieval"):
        value = results["pretrain"].get("verification", {}).get(key)
        if value is not None:
            stages["pretrain"][key] = value
    lafs = stages["finetune"]["verification_accuracy"]
    scratch = stages["scratch"]["verification_accuracy"]
    margin = None if lafs is None or scratch is None else lafs - scratch
    few_shot = configs["finetune"].data.few_shot
    noise = _difference_noise(lafs, scratch, configs["finetune"])
    beyond_noise = None if margin is None or noise is None else abs(margin) > noise
    return {
        "seed": configs["supervised"].seed,
        "stages": stages,
        "few_shot": {
            "images_per_identity": few_shot.images_per_identity,
            "identity_fraction": few_shot.identity_fraction,
            "lafs_accuracy": lafs,
            "scratch_accuracy": scratch,
            "lafs_minus_scratch": margin,
            "lafs_ahead": None if margin is None else margin > 0,
            "noise": noise,
            "beyond_noise": beyond_noise,
            "note": _comparison_note(margin, noise, beyond_noise),
        },
        "wall_seconds": wall_seconds,
    }


def _difference_noise(lafs, scratch, cfg):
    """Twice the standard error of the difference of two accuracies over the same number of synthetic
    held-out pairs (binomial); None when either is missing or the pairs come from .bin files."""
    if lafs is None or scratch is None or cfg.val.bins:
        return None
    pairs = cfg.val.pairs
    return 2.0 * math.sqrt((lafs * (1 - lafs) + scratch * (1 - scratch)) / pairs)


def _comparison_note(margin, noise, beyond_noise) -> str:
    if margin is None:
        return "no comparison: a few-shot stage reported no verification accuracy"
    verdict = (
        "LAFS-pretrained fine-tuning is ahead of training from scratch on the same few-shot subset"
        if margin > 0
        else "LAFS-pretrained fine-tuning is NOT ahead of training from scratch in this run"
    )
    if beyond_noise is False:
        verdict += f", but by less than the noise of this comparison (+-{noise:.3f}): not evidence either way"
    return verdict


def format_table(summary: dict) -> str:
    lines = [f"{'stage':<34}{'verification':>13}{'images/s':>10}{'seconds':>9}"]
    for row in summary["stages"].values():
        acc = row["verification_accuracy"]
        lines.append(
            f"{row['description']:<34}{'-' if acc is None else f'{acc:.4f}':>13}"
            f"{row['images_per_s']:>10.1f}{row['train_seconds']:>9.0f}"
        )
    retrieval = summary["stages"]["pretrain"].get("view_retrieval")
    if retrieval is not None:
        lines.append(
            f"pretraining view retrieval (teacher; second view of an image nearest to its first): {retrieval:.3f}"
        )
    tracking = summary["stages"]["supervised"].get("landmark_tracking")
    if tracking:
        from lafs.eval.landmark_tracking import setting_name

        lines.append(
            "supervised landmark tracking R^2 (held-out faces): "
            + ", ".join(f"{t['score']:.3f} at {setting_name(t)}" for t in tracking.values())
        )
    fs = summary["few_shot"]
    if fs["lafs_minus_scratch"] is not None:
        lines.append(
            f"few-shot ({fs['images_per_identity']} images per identity): LAFS - scratch = "
            f"{fs['lafs_minus_scratch']:+.4f} (seed {summary['seed']}); {fs['note']}"
        )
    lines.append(f"total {summary['wall_seconds']:.0f} s")
    return "\n".join(lines)
