"""The loop every stage shares: data order, schedule position, logging, checkpoints, resume.

A stage is a :class:`Stage` subclass: it builds its model, data and optimizer,
does one optimizer step on a list of micro-batches, verifies, and says what
goes into a checkpoint. :func:`run_stage` drives it: it walks the global step
counter from the checkpoint's position to the end of the schedule, draws the
micro-batches of each step from a resumable sampler, shows a progress bar,
writes ``log.jsonl``, verifies every ``val.every_steps``, and writes
``checkpoints/last.pt`` / ``best.pt`` atomically (with several processes each
also writes its class-centre shard first; ``lafs.train.shards``).

Exact resume: the data order is a function of (seed, epoch) and each item's
augmentation a function of (seed, epoch, index); the schedule is an array
indexed by step; model, optimizer, scaler and the global RNG states (which
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

import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from lafs.models.safe_load import load_checkpoint

from . import config as config_mod
from . import shards as shards_mod
from .distributed import Distributed, barrier, broadcast_flag

CHECKPOINT_FORMAT = "lafs.train/2"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


class ResumeError(RuntimeError):
    """--resume was asked for but the run folder cannot be continued."""


class RunFolder:
    """``runs/<name>/``: config.yaml, log.jsonl, checkpoints/, summary.json, plots."""

    def __init__(self, path, dist: Distributed):
        self.path = Path(path)
        self.dist = dist
        self.checkpoints = self.path / "checkpoints"
        if dist.is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.path / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict]:
        path = self.path / "log.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_log(self, step: int) -> None:
        """Drop log lines written after ``step`` (they belong to steps a resumed run will redo)."""
        if self.dist.is_main:
            kept = [r for r in self.read_log() if r.get("step", 0) <= step]
            (self.path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write_json(self, name: str, data: dict) -> None:
        if self.dist.is_main:
            (self.path / name).write_text(json.dumps(data, indent=2) + "\n")


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, rank: int = 0) -> None:
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    random.seed(seed + rank)


class ResumableBatchSampler(Sampler):
    """Batches of ``(index, epoch)`` from a ``DistributedSampler``, starting at batch ``start``.

    The epoch rides along with each index so that a dataset can seed its
    augmentation from (seed, epoch, index), which keeps a resumed run identical.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int):
        self.sampler = sampler
        self.batch_size = batch_size
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        indices = list(self.sampler)
        for b in range(self.start, len(self)):
            yield [(i, self.epoch) for i in indices[b * self.batch_size:(b + 1) * self.batch_size]]


class SeededItems(Dataset):
    """``dataset[i]`` passed through ``transform`` with the RNG seeded from (seed, epoch, i).

    ``transform(image [3,112,112]) -> image`` may use torch's global RNG
    (torchvision.transforms.v2 does); the caller's RNG state is left untouched.
    """

    def __init__(self, dataset, seed: int, transform=None):
        self.dataset = dataset
        self.seed = seed
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        # Data sets with a per-epoch curriculum (SyntheticFaces.item_at) see the epoch too.
        item_at = getattr(self.dataset, "item_at", None)
        image, label = item_at(index, epoch) if item_at is not None else self.dataset[index]
        if self.transform is None:
            return image, label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.transform(image), label


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """bfloat16/float16 on GPU as configured; None (float32) on CPU or when off."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(dtype: Optional[torch.dtype], device: torch.device):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def atomic_torch_save(obj, path: Path) -> None:
    """Write ``obj`` with lafs.models.checkpoint.atomic_save (temporary file, then rename)."""
    from lafs.models.checkpoint import atomic_save

    atomic_save(obj, path)


class Stage:
    """One training stage. Subclasses set ``name`` and implement the abstract methods."""

    name = "stage"

    def __init__(self, cfg: config_mod.Config, run: RunFolder, dist: Distributed):
        self.cfg = cfg
        self.run = run
        self.dist = dist
        self.device = dist.device

    # --- what a stage provides -------------------------------------------------------
    def build(self) -> None:
        """Create model, dataset (``self.train_set``), optimizer; raise on bad data or weights."""
        raise NotImplementedError

    def train_step(self, micro_batches: list, step: int) -> dict:
        """One optimizer step over ``accum_steps`` micro-batches; returns float metrics (``loss`` at least)."""
        raise NotImplementedError

    def validate(self) -> dict:
        """Verification metrics (``accuracy`` at least); empty when the stage has none."""
        return {}

    def state_dict(self) -> dict:
        """What every process holds alike (written once, by the main process)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict, shard: Optional[dict] = None) -> None:
        """Restore :meth:`state_dict`'s output and this process's class-centre ``shard`` (None without)."""
        raise NotImplementedError

    def shard_state(self) -> Optional[dict]:
        """This process's class centres and their optimizer state (``lafs.train.shards``), or None."""
        return None

    def shard_row_keys(self) -> dict:
        """The entries of :meth:`shard_state` that hold one row per class (``lafs.train.shards.reshard``)."""
        return {"state": [], "optimizer": []}

    def process_state(self) -> dict:
        """Random-stream state of this process beyond the global RNGs (saved per process)."""
        return {}

    def load_process_state(self, state: dict) -> None:
        pass

    def finish(self, summary: dict) -> dict:
        """Plots and stage-specific summary entries, after the last step (main process only)."""
        return summary

    def transform(self):
        """Per-item training augmentation (RNG seeded per item), or None."""
        return None

    @property
    def progress_keys(self) -> tuple:
        return ("loss", "acc")

    # --- shared machinery ----------------------------------------------------------------
    def make_loader(self):
        cfg = self.cfg
        items = SeededItems(self.train_set, cfg.seed, self.transform())
        sampler = DistributedSampler(items, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                     shuffle=True, seed=cfg.seed, drop_last=True)
        batch_sampler = ResumableBatchSampler(sampler, cfg.optim.batch_size)
        if len(batch_sampler) < cfg.optim.accum_steps:
            raise config_mod.ConfigError(
                f"the training set has {len(self.train_set)} images: fewer than one optimizer step of "
                f"{cfg.optim.batch_size} x {cfg.optim.accum_steps} x {self.dist.world_size} processes")
        # A private generator: creating an iterator must not draw from the global RNG (which drives
        # dropout), or a resumed run would diverge from an uninterrupted one.
        loader = DataLoader(items, batch_sampler=batch_sampler, num_workers=cfg.data.num_workers,
                            pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed + self.dist.rank))
        return loader, batch_sampler

    def schedule_lengths(self, micro_per_epoch: int) -> tuple[int, int, int]:
        """(optimizer steps per epoch, total steps, warmup steps)."""
        per_epoch = micro_per_epoch // self.cfg.optim.accum_steps
        total = max(1, math.ceil(self.cfg.optim.epochs * per_epoch))
        warmup = int(round(self.cfg.optim.warmup_epochs * per_epoch))
        return per_epoch, total, warmup


def _micro_batches(loader, batch_sampler: ResumableBatchSampler, micro_per_epoch: int, start: int) -> Iterator:
    """Endless micro-batches from global micro-batch number ``start`` on."""
    micro = start
    while True:
        epoch, position = divmod(micro, micro_per_epoch)
        batch_sampler.set_position(epoch, position)
        for batch in loader:
            yield batch
            micro += 1
            if micro % micro_per_epoch == 0:
                break


def run_stage(stage: Stage, *, resume: bool = False) -> dict:
    """Train ``stage`` to the end of its schedule (or ``train.stop_after_steps``); return its summary."""
    cfg, run, dist = stage.cfg, stage.run, stage.dist
    seed_everything(cfg.seed)  # the same initial weights on every process
    stage.build()
    loader, batch_sampler = stage.make_loader()
    accum = cfg.optim.accum_steps
    micro_per_epoch = (len(batch_sampler) // accum) * accum
    stage.steps_per_epoch, stage.total_steps, stage.warmup_steps = stage.schedule_lengths(micro_per_epoch)
    stage.setup_schedules()  # (pretraining builds its DINO heads here)
    if dist.rank:
        seed_everything(cfg.seed, dist.rank)  # dropout, drop path, Partial FC sampling differ per process

    step, best = 0, {"accuracy": -1.0}
    if resume:
        if not run.last.exists():
            raise ResumeError(f"--resume: {run.last} does not exist (nothing to continue)")
        state = load_checkpoint(run.last)  # no code runs (see lafs.models.safe_load)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("stage") != stage.name:
            raise ResumeError(f"--resume: {run.last} is not a {stage.name} checkpoint of lafs.train "
                              f"(format {state.get('format')!r}, this version writes {CHECKPOINT_FORMAT!r})")
        global_batch = cfg.optim.batch_size * cfg.optim.accum_steps * dist.world_size
        if state["global_batch"] != global_batch:
            raise ResumeError(
                f"--resume: {run.last} was trained with a global batch of {state['global_batch']} images "
                f"({state['world_size']} processes); this run has {global_batch} ({dist.world_size} processes x "
                f"optim.batch_size {cfg.optim.batch_size} x optim.accum_steps {cfg.optim.accum_steps}). Set "
                f"optim.batch_size so that the global batch stays the same")
        try:
            shard = _own_shard(stage, state)
        except (OSError, ValueError, KeyError) as exc:
            raise ResumeError(f"--resume: the class-centre shards of {run.last} cannot be read: {exc}") from exc
        stage.load_state_dict(state, shard=shard)
        step, best = state["step"], state["best"]
        if dist.rank < len(state["rng"]):  # a process the saved run did not have keeps its fresh seed
            restore_rng(state["rng"][dist.rank])
            stage.load_process_state(state["rng"][dist.rank].get("stage", {}))
        run.truncate_log(step)
    end = stage.total_steps
    if cfg.train.stop_after_steps is not None:
        end = min(end, cfg.train.stop_after_steps)

    batches = _micro_batches(loader, batch_sampler, micro_per_epoch, step * accum)
    bar = tqdm(total=stage.total_steps, initial=step, desc=stage.name, disable=not dist.is_main,
               dynamic_ncols=True, leave=True)
    images_per_step = cfg.optim.batch_size * accum * dist.world_size
    window_start, window_images = time.perf_counter(), 0
    train_seconds, trained_images = 0.0, 0
    last_val = {}
    try:
        while step < end:
            step_start = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            metrics = stage.train_step(micro, step)
            finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics.get("grad_norm", 0.0))
            if broadcast_flag(not finite, dist):
                what = (f"the loss became {metrics['loss']}" if not math.isfinite(metrics["loss"]) else
                        f"the gradient norm became {metrics['grad_norm']} (loss {metrics['loss']:.4g})")
                raise NonFiniteLossError(
                    f"{stage.name}: {what} at step {step + 1}; stopped without updating the weights. The last good "
                    f"checkpoint is {run.last if run.last.exists() else '(none written yet)'}. Lower optim.lr, "
                    f"raise optim.warmup_epochs or set train.amp=bf16/off.")
            step += 1
            window_images += images_per_step
            trained_images += images_per_step
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == end:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "epoch": round(step / stage.steps_per_epoch, 4),
                          "lr": stage.current_lr(step - 1), **metrics,
                          "images_per_s": window_images / max(elapsed, 1e-9)}
                run.log(record)
                bar.set_postfix({k: f"{record[k]:.3g}" for k in (*stage.progress_keys, "images_per_s", "lr")
                                 if k in record})
                window_start, window_images = time.perf_counter(), 0
            at_val = (cfg.val.every_steps and step % cfg.val.every_steps == 0) or step == stage.total_steps
            train_seconds += time.perf_counter() - step_start
            if at_val:
                last_val = stage.validate()
                if last_val:
                    run.log({"step": step, **{f"val_{k}": v for k, v in last_val.items()}})
                    bar.write(f"{stage.name} step {step}: verification accuracy {last_val['accuracy']:.4f}")
            checkpoint_now = at_val or step == end or (
                cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
            if checkpoint_now:
                is_best = bool(last_val) and at_val and last_val["accuracy"] > best["accuracy"]
                if is_best:
                    best = {"accuracy": last_val["accuracy"], "step": step}
                _save(stage, step, best, is_best)
            if at_val or checkpoint_now:
                window_start, window_images = time.perf_counter(), 0  # throughput counts training only
    finally:
        bar.close()
    summary = {"stage": stage.name, "steps": step, "total_steps": stage.total_steps,
               "finished": step >= stage.total_steps, "world_size": dist.world_size,
               "images_per_s": trained_images / max(train_seconds, 1e-9), "train_seconds": train_seconds}
    if last_val:
        summary["verification"] = last_val
        summary["best"] = best
    if dist.is_main:
        summary = stage.finish(summary)
        run.write_json("summary.json", summary)
    barrier(dist)
    return summary


def _own_shard(stage: Stage, state: dict) -> Optional[dict]:
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


def _save(stage: Stage, step: int, best: dict, is_best: bool) -> None:
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
    state = {"format": CHECKPOINT_FORMAT, "stage": stage.name, "step": step, "epoch": step / stage.steps_per_epoch,
             "best": best, "rng": rng, "world_size": dist.world_size,
             "global_batch": stage.cfg.optim.batch_size * stage.cfg.optim.accum_steps * dist.world_size,
             "config": stage.cfg.to_plain(), **stage.state_dict()}
    if head is not None:
        state["head"] = head
    atomic_torch_save(state, stage.run.last)
    if is_best:
        atomic_torch_save(state, stage.run.best)
    if head is not None:  # shard files of earlier steps (or of a run on more processes) no checkpoint names
        shards_mod.remove_stale(checkpoints, [step] + ([best["step"]] if "step" in best else []))
