"""The loop every stage shares: data order, schedule position, logging, validation, checkpoints, resume.

:func:`run_stage` drives a :class:`~lafs.train.stage.Stage` in named phases: ``_prepare``
(build, data, schedule lengths), ``checkpoints.resume`` (``--resume``), then per optimizer
step ``_train_step`` (micro-batches, the step, the non-finite guard), ``Progress.advance``
(bar and ``log.jsonl``), ``_validate`` every ``val.every_steps`` and ``_checkpoint``
(``checkpoints/last.pt`` / ``best.pt``, atomically), and ``_summarise`` at the end.

Exact resume: the data order is a function of (seed, epoch) and each item's
augmentation a function of (seed, epoch, index) (``lafs.train.sampling``); the schedule
is an array indexed by step; model, optimizer, scaler and the global RNG states (which
drive dropout and drop path) are restored from ``last.pt``. So N steps straight
and N/2 + resume + N/2 give the same parameters.

Several processes (torchrun): the model starts from the same seed on every process
(process 0's, so one process and N start alike); the random streams that differ per
process (dropout, the pretraining views) are seeded with the rank after building.
A run may resume on another number of processes when the global batch
(``optim.batch_size x optim.accum_steps x processes``) stays the same: the class
centres are resharded, data order and schedule continue (per-process random
streams of processes that did not exist start afresh).
"""

from __future__ import annotations

import math
import time
from typing import Iterator

from tqdm import tqdm

from . import checkpoints
from .checkpoints import CHECKPOINT_FORMAT, ResumeError, global_batch
from .distributed import barrier, broadcast_flag
from .precision import autocast, autocast_dtype
from .randomness import capture_rng, restore_rng, seed_everything
from .run_folder import RunFolder
from .sampling import ResumableBatchSampler, SeededItems, micro_batches
from .stage import Stage

__all__ = [
    "CHECKPOINT_FORMAT",
    "NonFiniteLossError",
    "Progress",
    "ResumableBatchSampler",
    "ResumeError",
    "RunFolder",
    "SeededItems",
    "Stage",
    "autocast",
    "autocast_dtype",
    "capture_rng",
    "restore_rng",
    "run_stage",
    "seed_everything",
]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


def run_stage(stage: Stage, *, resume: bool = False) -> dict:
    """Train ``stage`` to the end of its schedule (or ``train.stop_after_steps``); return its summary."""
    cfg = stage.cfg
    batches_from = _prepare(stage)
    step, best = _resume_everywhere(stage) if resume else (0, {"accuracy": -1.0})
    stage.run.write_config(cfg)  # resuming: only once the checkpoint was accepted, so a refused resume changes nothing
    if resume and step >= stage.total_steps and stage.run.finished_summary() is not None:
        return _already_finished(stage, step)
    stop = cfg.train.stop_after_steps  # keeps the full run's schedule; --resume continues
    end = stage.total_steps if stop is None else min(stage.total_steps, stop)
    batches = batches_from(step)
    progress = Progress(stage, step)
    last_val: dict = {}
    if step >= stage.total_steps:  # stopped after the last checkpoint, before its summary
        last_val = _validate(stage, step, progress)
    try:
        while step < end:
            started = time.perf_counter()
            metrics = _train_step(stage, batches, step)
            step += 1
            progress.advance(step, metrics, log=step % cfg.train.log_every == 0 or step == end)
            progress.train_seconds += time.perf_counter() - started
            at_val = bool(cfg.val.every_steps and step % cfg.val.every_steps == 0) or step == stage.total_steps
            if at_val:
                last_val = _validate(stage, step, progress)
            if at_val or step == end or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
                best = _checkpoint(stage, step, best, last_val if at_val else {})
                progress.restart_window()  # throughput counts training only
    finally:
        progress.close()
    if step < stage.total_steps and stage.dist.is_main:
        print(
            f"{stage.name}: stopped at step {step} of {stage.total_steps} (train.stop_after_steps={stop}); "
            f"`--resume` continues to the end",
            flush=True,
        )
    return _summarise(stage, step, best, last_val, progress)


def _already_finished(stage: Stage, step: int) -> dict:
    """--resume of a run that already ran its whole schedule: its summary, untouched."""
    summary = stage.run.finished_summary()
    if stage.dist.is_main:
        print(f"{stage.name}: {stage.run.path} finished all {step} steps already; nothing to continue", flush=True)
    barrier(stage.dist)
    return summary


# --- the phases ---------------------------------------------------------------------------------
def _prepare(stage: Stage):
    """Build the stage (same initial weights on every process), its data and its schedules; returns
    ``batches_from(step)``: the endless micro-batches from optimizer step ``step`` on."""
    cfg, dist = stage.cfg, stage.dist
    seed_everything(cfg.seed)  # the same initial weights on every process
    stage.build()
    loader, batch_sampler = stage.make_loader()
    accum = cfg.optim.accum_steps
    micro_per_epoch = (len(batch_sampler) // accum) * accum
    stage.steps_per_epoch, stage.total_steps, stage.warmup_steps = stage.schedule_lengths(micro_per_epoch)
    stage.setup_schedules()
    if dist.rank:
        seed_everything(cfg.seed, dist.rank)  # dropout, drop path, Partial FC sampling differ per process
    return lambda step: micro_batches(loader, batch_sampler, micro_per_epoch, step * accum)


def _resume_everywhere(stage: Stage) -> tuple[int, dict]:
    """``checkpoints.resume`` on every process; when it fails on one, every process stops here (none goes on
    to wait for it in a collective), the failing one with its own error."""
    try:
        result, error = checkpoints.resume(stage), None
    except Exception as exc:  # a missing shard, a refused file: raised below, after the others are told
        result, error = None, exc
    if broadcast_flag(error is not None, stage.dist):
        raise error or ResumeError("--resume: another process could not resume (its error names the problem)")
    return result


def _train_step(stage: Stage, batches: Iterator, step: int) -> dict:
    """One optimizer step on the next ``accum_steps`` micro-batches; NonFiniteLossError (on every process
    alike) when the loss or the gradient norm is not finite."""
    metrics = stage.train_step([next(batches) for _ in range(stage.cfg.optim.accum_steps)], step)
    loss, grad_norm = metrics["loss"], metrics.get("grad_norm", 0.0)
    if broadcast_flag(not (math.isfinite(loss) and math.isfinite(grad_norm)), stage.dist):
        what = (
            f"the loss became {loss}"
            if not math.isfinite(loss)
            else f"the gradient norm became {grad_norm} (loss {loss:.4g})"
        )
        last = stage.run.last
        raise NonFiniteLossError(
            f"{stage.name}: {what} at step {step + 1}; stopped without updating the weights. The last good "
            f"checkpoint is {last if last.exists() else '(none written yet)'}. Lower optim.lr, "
            f"raise optim.warmup_epochs or set train.amp=bf16/off."
        )
    return metrics


def _validate(stage: Stage, step: int, progress: Progress) -> dict:
    """The stage's verification, logged as ``val_*`` (empty on processes that do not verify)."""
    results = stage.validate()
    if results:
        stage.run.log({"step": step, **{f"val_{k}": v for k, v in results.items()}})
        progress.bar.write(f"{stage.name} step {step}: verification accuracy {results['accuracy']:.4f}")
    return results


def _checkpoint(stage: Stage, step: int, best: dict, fresh: dict) -> dict:
    """Write last.pt (and best.pt when the verification ``fresh`` at this step beats ``best``); returns best."""
    is_best = bool(fresh) and fresh["accuracy"] > best["accuracy"]
    if is_best:
        best = {"accuracy": fresh["accuracy"], "step": step}
    checkpoints.save(stage, step, best, is_best)
    return best


def _summarise(stage: Stage, step: int, best: dict, last_val: dict, progress: Progress) -> dict:
    """The run's summary (the main process adds the stage's entries and writes summary.json)."""
    summary = {
        "stage": stage.name,
        "steps": step,
        "total_steps": stage.total_steps,
        "finished": step >= stage.total_steps,
        "world_size": stage.dist.world_size,
        "images_per_s": progress.trained_images / max(progress.train_seconds, 1e-9),
        "train_seconds": progress.train_seconds,
    }
    if last_val:
        summary["verification"] = last_val
        summary["best"] = best
    if stage.dist.is_main:
        summary = stage.finish(summary)
        stage.run.write_json("summary.json", summary)
    barrier(stage.dist)
    return summary


class Progress:
    """The progress bar, the training lines of ``log.jsonl`` and the throughput.

    ``images_per_s`` of a log line counts the images since the last line (or checkpoint); the
    summary's counts training time only (``train_seconds``, kept by the loop).
    """

    def __init__(self, stage: Stage, step: int):
        self.stage = stage
        self.bar = tqdm(
            total=stage.total_steps,
            initial=step,
            desc=stage.name,
            disable=not stage.dist.is_main,
            dynamic_ncols=True,
            leave=True,
        )
        self.images_per_step = global_batch(stage)
        self.train_seconds, self.trained_images = 0.0, 0
        self.restart_window()

    def restart_window(self) -> None:
        self.window_start, self.window_images = time.perf_counter(), 0

    def advance(self, step: int, metrics: dict, *, log: bool) -> None:
        """Count optimizer step ``step`` (1-based) and, with ``log``, write its line and refresh the bar."""
        self.window_images += self.images_per_step
        self.trained_images += self.images_per_step
        self.bar.update(1)
        if not log:
            return
        stage = self.stage
        elapsed = time.perf_counter() - self.window_start
        record = {
            "step": step,
            "epoch": round(step / stage.steps_per_epoch, 4),
            "lr": stage.current_lr(step - 1),
            **metrics,
            "images_per_s": self.window_images / max(elapsed, 1e-9),
        }
        stage.run.log(record)
        self.bar.set_postfix(
            {k: f"{record[k]:.3g}" for k in (*stage.progress_keys, "images_per_s", "lr") if k in record}
        )
        self.restart_window()

    def close(self) -> None:
        self.bar.close()
