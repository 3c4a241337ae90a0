"""A stage's checkpoints: ``last.pt`` / ``best.pt`` written atomically, and ``--resume`` from ``last.pt``.

A checkpoint holds what every process holds alike (``Stage.state_dict``, written once by the
main process), the step, the best verification so far, the configuration and every process's
random-stream state. With several processes each process first writes its class-centre shard
(``lafs.train.shards``) and ``last.pt`` names the shard files; ``last.pt`` is renamed into place
last, so it only ever names complete files. A run may resume on another number of processes when
the global batch stays the same: the class centres are then resharded.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Optional

import torch

from lafs.models.checkpoint import atomic_save
from lafs.models.safe_load import load_checkpoint

from . import shards as shards_mod
from .config.tree import flatten
from .randomness import capture_rng, restore_rng

if TYPE_CHECKING:
    from .stage import Stage

CHECKPOINT_FORMAT = "lafs.train/2"


class ResumeError(RuntimeError):
    """--resume was asked for but the run folder cannot be continued."""


def global_batch(stage: Stage) -> int:
    """Images per optimizer step over all processes: batch_size x accum_steps x processes."""
    optim = stage.cfg.optim
    return optim.batch_size * optim.accum_steps * stage.dist.world_size


def resume(stage: Stage) -> tuple[int, dict]:
    """Restore ``stage`` (built, schedules set up) from its run's ``last.pt``; returns (step, best verification).

    Raises ResumeError when there is no ``last.pt``, it belongs to another stage or format, the global
    batch differs, or the class-centre shards cannot be read. Log lines after the step are dropped.
    """
    cfg, run, dist = stage.cfg, stage.run, stage.dist
    if not run.last.exists():
        raise ResumeError(f"--resume: {run.last} does not exist (nothing to continue)")
    try:
        state = load_checkpoint(run.last)  # no code runs (see lafs.models.safe_load)
    except ValueError as exc:  # empty, truncated, another format
        raise ResumeError(f"--resume: {exc}") from None
    found = state.get("format") if isinstance(state, dict) else f"a {type(state).__name__}"
    if found != CHECKPOINT_FORMAT or state.get("stage") != stage.name:
        raise ResumeError(
            f"--resume: {run.last} is not a {stage.name} checkpoint of lafs.train "
            f"(format {found!r}, this version writes {CHECKPOINT_FORMAT!r})"
        )
    if state["global_batch"] != global_batch(stage):
        raise ResumeError(
            f"--resume: {run.last} was trained with a global batch of {state['global_batch']} images "
            f"({_processes(state['world_size'])}); this run has {global_batch(stage)} "
            f"({_processes(dist.world_size)} x optim.batch_size {cfg.optim.batch_size} x optim.accum_steps "
            f"{cfg.optim.accum_steps}). {_batch_advice(state['global_batch'], dist.world_size, cfg.optim.accum_steps)}"
        )
    _warn_changed_settings(stage, state.get("config", {}))
    try:
        shard = own_shard(stage, state)
    except (OSError, ValueError, KeyError) as exc:
        raise ResumeError(f"--resume: the class-centre shards of {run.last} cannot be read: {exc}") from exc
    fresh = {**capture_rng(), "stage": stage.process_state()}  # before load_state_dict, which may set them
    stage.load_state_dict(state, shard=shard)
    # A process the saved run did not have keeps its fresh, per-process streams (not a copy of another's).
    streams = state["rng"][dist.rank] if dist.rank < len(state["rng"]) else fresh
    restore_rng(streams)
    stage.load_process_state(streams.get("stage", {}))
    run.truncate_log(state["step"])
    return state["step"], state["best"]


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def _batch_advice(saved_global: int, world_size: int, accum_steps: int) -> str:
    """How to keep the saved global batch on ``world_size`` processes with ``accum_steps``, or why it cannot be."""
    per_step = world_size * accum_steps
    if saved_global % per_step:
        return (
            f"{saved_global} images cannot be split over {_processes(world_size)} x optim.accum_steps {accum_steps}: "
            f"change optim.accum_steps or the number of processes"
        )
    return f"Set optim.batch_size={saved_global // per_step} to keep the global batch"


# Settings that may change between the invocations of one run without changing what it computes (the
# batch split, as long as the global batch stays, which resume checks).
PER_INVOCATION = {
    "train.stop_after_steps",
    "train.cpu_threads",
    "train.plots",
    "train.log_every",
    "optim.batch_size",
    "optim.accum_steps",
}


def _warn_changed_settings(stage: Stage, saved: dict) -> None:
    """Name every setting this resume changes against the checkpoint's (the run then differs from one
    that was never interrupted); the new values apply."""
    if not stage.dist.is_main or not saved:
        return
    now, before = flatten(stage.cfg.to_plain()), flatten(saved)
    changed = [
        f"{key}: {before.get(key, '(unset)')!r} -> {now.get(key, '(unset)')!r}"
        for key in sorted(set(now) | set(before))
        if key not in PER_INVOCATION and now.get(key) != before.get(key)
    ]
    if changed:
        warnings.warn(
            f"--resume: {stage.run.last} continues with settings other than those it was trained with, so the run "
            f"will not equal an uninterrupted one: {'; '.join(changed)}",
            stacklevel=2,
        )


def own_shard(stage: Stage, state: dict) -> Optional[dict]:
    """This process's class-centre shard from a checkpoint, resharded when the number of processes changed."""
    head = state.get("head")
    if head is None:
        return None
    dist, checkpoints = stage.dist, stage.run.checkpoints
    if head["world_size"] == dist.world_size:
        if "files" in head:  # only this process's file
            head = {**head, "files": [head["files"][dist.rank]]}
            return shards_mod.load_shards(checkpoints, head)[0]
        return shards_mod.load_shards(checkpoints, head)[dist.rank]
    every = shards_mod.load_shards(checkpoints, head)
    return shards_mod.reshard(every, dist.world_size, stage.shard_row_keys())[dist.rank]


def save(stage: Stage, step: int, best: dict, is_best: bool) -> None:
    """last.pt (and best.pt), written by the main process, with the RNG state of every process;
    each process first writes its class-centre shard (several processes) so that last.pt, renamed
    into place last, only ever names complete shard files."""
    dist, checkpoints = stage.dist, stage.run.checkpoints
    shard = stage.shard_state()
    head = None
    if shard is not None:
        head = {"num_classes": shard["num_classes"], "world_size": dist.world_size}
        if dist.enabled:
            shards_mod.save_shard(checkpoints, step, shard)
            head["files"] = [shards_mod.shard_file(step, r, dist.world_size) for r in range(dist.world_size)]
        else:
            head["shards"] = [shard]
    own = {**capture_rng(), "stage": stage.process_state()}
    rng = [own]
    if dist.enabled:  # also waits until every process has written its shard
        rng = [None] * dist.world_size
        torch.distributed.all_gather_object(rng, own)
    if not dist.is_main:
        return
    state = {
        "format": CHECKPOINT_FORMAT,
        "stage": stage.name,
        "step": step,
        "epoch": step / stage.steps_per_epoch,
        "best": best,
        "rng": rng,
        "world_size": dist.world_size,
        "global_batch": global_batch(stage),
        "config": stage.cfg.to_plain(),
        **stage.state_dict(),
    }
    if head is not None:
        state["head"] = head
    atomic_save(state, stage.run.last)
    if is_best:
        atomic_save(state, stage.run.best)
    if head is not None:  # shard files of earlier steps (or of a run on more processes) no checkpoint names
        shards_mod.remove_stale(checkpoints, [step] + ([best["step"]] if "step" in best else []))
