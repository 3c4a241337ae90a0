"""The default run: supervised -> LAFS pretraining -> few-shot fine-tuning, and few-shot from scratch.

Every stage writes its own run folder under ``runs/demo/`` (``supervised``,
``pretrain``, ``finetune``, ``scratch``); ``runs/demo/summary.json`` collects
each stage's verification accuracy and throughput and the few-shot comparison.
All four configurations are validated before the first step. With ``--resume``
finished stages are kept and an interrupted one continues from its last.pt.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from . import config as config_mod
from .distributed import init_distributed
from .run_folder import finished_summary
from .stage_run import run_single_stage

# run folder (without its seed suffix) -> (stage implementation, what the table calls it)
DEMO_RUNS = {
    "supervised": ("supervised", "supervised, all labels"),
    "pretrain": ("pretrain", "LAFS pretraining, no labels"),
    "finetune": ("finetune", "few-shot fine-tuning from LAFS"),
    "scratch": ("finetune", "few-shot training from scratch"),
}


def demo_runs(configs: dict) -> list[tuple[str, str, str]]:
    """(run folder, stage implementation, label) in running order, from ``resolve_demo``'s configs:
    ``finetune-seed1`` runs the fine-tuning stage and is labelled with its seed."""
    runs = []
    for folder, cfg in configs.items():
        base, _, seed = folder.partition("-seed")
        stage, label = DEMO_RUNS[base]
        runs.append((folder, stage, f"{label} (seed {cfg.seed})" if seed else label))
    return runs


def run_demo(tree: dict, *, out: Path, resume: bool = False) -> dict:
    refs = {"supervised": out / "supervised", "pretrain": out / "pretrain"}
    configs = config_mod.resolve_demo(tree, refs, source="demo recipe")
    main = init_distributed().is_main  # under torchrun only the main process writes and prints the summary
    out.mkdir(parents=True, exist_ok=True)
    if main:
        config_mod.dump(tree, out / "config.yaml")
    results, started, load_before = {}, time.perf_counter(), os.getloadavg()[0]
    for folder, stage, _ in demo_runs(configs):
        path = out / folder
        done = finished_summary(path) if resume else None
        if done is not None:
            results[folder] = done
            continue
        stage_resume = resume and (path / "checkpoints" / "last.pt").exists()
        stage_started = time.perf_counter()
        results[folder] = run_single_stage(stage, configs[folder], path, resume=stage_resume)
        results[folder]["wall_seconds"] = time.perf_counter() - stage_started
    summary = demo_summary(results, configs, time.perf_counter() - started)
    summary["machine"] = machine_facts(load_before)
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(format_table(summary))
    return summary


def demo_summary(results: dict, configs: dict, wall_seconds: float) -> dict:
    stages = {}
    for folder, _, label in demo_runs(configs):
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
    few_shot = configs["finetune"].data.few_shot
    return {
        "seed": configs["supervised"].seed,
        "stages": stages,
        "few_shot": {
            "images_per_identity": few_shot.images_per_identity,
            "identity_fraction": few_shot.identity_fraction,
            **few_shot_comparison(stages, configs),
        },
        "wall_seconds": wall_seconds,
    }


def few_shot_comparison(stages: dict, configs: dict) -> dict:
    """LAFS - scratch over the few-shot seeds (pairs ``finetune[-seed<s>]`` / ``scratch[-seed<s>]``): the
    per-seed accuracies, the mean difference and its noise (``_difference_noise``)."""
    per_seed = []
    for folder in configs:
        if folder.startswith("finetune"):
            lafs = stages[folder]["verification_accuracy"]
            scratch = stages[folder.replace("finetune", "scratch", 1)]["verification_accuracy"]
            per_seed.append({"seed": configs[folder].seed, "lafs_accuracy": lafs, "scratch_accuracy": scratch})
    complete = all(r["lafs_accuracy"] is not None and r["scratch_accuracy"] is not None for r in per_seed)
    lafs = statistics.mean([r["lafs_accuracy"] for r in per_seed]) if complete else None
    scratch = statistics.mean([r["scratch_accuracy"] for r in per_seed]) if complete else None
    margin = None if lafs is None else lafs - scratch
    noise = _difference_noise(per_seed, configs["finetune"]) if complete else None
    beyond_noise = None if margin is None or noise is None else abs(margin) > noise
    return {
        "seeds": [r["seed"] for r in per_seed],
        "per_seed": per_seed,
        "lafs_accuracy": lafs,
        "scratch_accuracy": scratch,
        "lafs_minus_scratch": margin,
        "lafs_ahead": None if margin is None else margin > 0,
        "noise": noise,
        "beyond_noise": beyond_noise,
        "note": _comparison_note(margin, noise, beyond_noise),
    }


def machine_facts(load_before: float) -> dict:
    """When and where the run finished: the numbers of a shared machine mean little without its load."""
    return {
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def _difference_noise(per_seed: list[dict], cfg):
    """Twice the standard error of the mean of the per-seed differences LAFS - scratch; None when the
    pairs come from .bin files.

    One seed: the binomial error of two accuracies over the same number of synthetic held-out pairs (it
    leaves out the training draw's noise, which is larger). Several seeds: the spread of the per-seed
    differences (training draw, few-shot subset and pairs together), never below the binomial error of
    their mean.
    """
    if cfg.val.bins:
        return None
    binomial_var = statistics.mean(
        [
            (r["lafs_accuracy"] * (1 - r["lafs_accuracy"]) + r["scratch_accuracy"] * (1 - r["scratch_accuracy"]))
            / cfg.val.pairs
            for r in per_seed
        ]
    )
    n, var = len(per_seed), binomial_var
    if n > 1:
        diffs = [r["lafs_accuracy"] - r["scratch_accuracy"] for r in per_seed]
        var = max(statistics.variance(diffs), binomial_var)
    return 2.0 * math.sqrt(var / n)


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
    elif beyond_noise:
        verdict += f", by more than the noise of this comparison (+-{noise:.3f})"
    return verdict


def _few_shot_text(fs: dict) -> str:
    """'LAFS - scratch = +0.068 (seed 0: ...)' with every seed's pair of accuracies, then the verdict."""
    seeds = "; ".join(
        f"seed {r['seed']}: {r['lafs_accuracy']:.3f} vs {r['scratch_accuracy']:.3f}" for r in fs["per_seed"]
    )
    mean = "mean " if len(fs["per_seed"]) > 1 else ""
    return f"LAFS - scratch = {mean}{fs['lafs_minus_scratch']:+.3f} ({seeds}); {fs['note']}"


def format_table(summary: dict) -> str:
    width = max(len(row["description"]) for row in summary["stages"].values()) + 2
    lines = [f"{'stage':<{width}}{'verification':>13}{'images/s':>10}{'seconds':>9}"]
    for row in summary["stages"].values():
        acc = row["verification_accuracy"]
        lines.append(
            f"{row['description']:<{width}}{'-' if acc is None else f'{acc:.4f}':>13}"
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
        lines.append(f"few-shot ({fs['images_per_identity']} images per identity): {_few_shot_text(fs)}")
    lines.append(f"total {summary['wall_seconds']:.0f} s")
    return "\n".join(lines)


def markdown_table(summary: dict) -> str:
    """The summary as a README paragraph and table (``benchmarks/report.py --demo`` writes it into README.md)."""
    m = summary.get("machine", {})
    fs = summary["few_shot"]
    lines = [
        f"Seed {summary['seed']}, {summary['wall_seconds'] / 60:.1f} minutes in all on {m.get('device', '?')} "
        f"({m.get('cpu_cores', '?')} cores, torch threads: {m.get('torch_threads', '?')}, load average "
        f"{m.get('load_average_before', '?')} before / {m.get('load_average_after', '?')} after), "
        f"finished {m.get('finished_utc', '?')} UTC.",
        "",
        "| stage | held-out verification | landmark tracking R^2 (pretraining: view retrieval) | images/s | seconds |",
        "|---|---:|---|---:|---:|",
    ]
    for row in summary["stages"].values():
        acc = row["verification_accuracy"]
        tracking = row.get("landmark_tracking")
        tracking_text = (
            ", ".join(f"{t['score']:.2f} (d={t['difficulty']:g})" for t in tracking.values()) if tracking else ""
        )
        if "view_retrieval" in row:
            tracking_text = f"(view retrieval {row['view_retrieval']:.3f})"
        lines.append(
            f"| {row['description']} | {'-' if acc is None else f'{acc:.3f}'} | {tracking_text} | "
            f"{row['images_per_s']:.0f} | {row['train_seconds']:.0f} |"
        )
    if fs["lafs_minus_scratch"] is not None:
        lines += [
            "",
            f"Few-shot ({fs['images_per_identity']} images per identity): {_few_shot_text(fs)}.",
        ]
    return "\n".join(lines)
