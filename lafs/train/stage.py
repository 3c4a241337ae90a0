"""What a training stage provides to :func:`lafs.train.loop.run_stage`, declared in one place.

A stage is a :class:`Stage` subclass: it builds its model, data and optimizer, sets
up what depends on the schedule's length, does one optimizer step on a list of
micro-batches, verifies, and says what goes into a checkpoint. The loop calls the
methods below and nothing else, in this order: ``build``, ``make_loader`` (which asks
``transform``), ``schedule_lengths``, ``setup_schedules``; on ``--resume``
``shard_row_keys`` (resharding), ``load_state_dict`` and ``load_process_state``; per step
``train_step``, and ``current_lr`` / ``progress_keys`` for the log; ``validate``;
``shard_state``, ``process_state`` and ``state_dict`` for each checkpoint; ``finish``.
"""

from __future__ import annotations

import abc
import math
from typing import Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .config import Config, ConfigError
from .distributed import Distributed
from .run_folder import RunFolder
from .sampling import ResumableBatchSampler, SeededItems


class Stage(abc.ABC):
    """One training stage. Subclasses set ``name`` and implement the abstract methods.

    ``run_stage`` sets ``steps_per_epoch``, ``total_steps`` and ``warmup_steps`` (optimizer
    steps) from :meth:`schedule_lengths` before it calls :meth:`setup_schedules`.
    """

    name = "stage"
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def __init__(self, cfg: Config, run: RunFolder, dist: Distributed):
        self.cfg = cfg
        self.run = run
        self.dist = dist
        self.device = dist.device

    # --- what a stage must provide ------------------------------------------------------
    @abc.abstractmethod
    def build(self) -> None:
        """Create model, dataset (``self.train_set``), optimizer; raise ConfigError on bad data or weights."""

    @abc.abstractmethod
    def setup_schedules(self) -> None:
        """Build what depends on the length of the run (``total_steps``, ``steps_per_epoch``, ``warmup_steps``):
        the learning-rate schedule, or pretraining's DINO trainer with all its per-step schedules."""

    @abc.abstractmethod
    def current_lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based), as logged."""

    @abc.abstractmethod
    def train_step(self, micro_batches: list, step: int) -> dict:
        """One optimizer step over ``accum_steps`` micro-batches ``[(images [b, 3, H, W], labels [b]), ...]``;
        returns float metrics: ``loss`` at least, ``grad_norm`` when known (the loop stops on a non-finite one)."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """What every process holds alike (written once, by the main process)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict, shard: Optional[dict] = None) -> None:
        """Restore :meth:`state_dict`'s output and this process's class-centre ``shard`` (None without)."""

    # --- what a stage may provide (defaults: nothing) -------------------------------------
    def validate(self) -> dict:
        """Verification metrics (``accuracy`` at least); empty when the stage has none."""
        return {}

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
        """Restore :meth:`process_state`'s output."""
        return None

    def finish(self, summary: dict) -> dict:
        """Plots and stage-specific summary entries, after the last step (main process only)."""
        return summary

    def transform(self):
        """Per-item training augmentation (RNG seeded per item), or None."""
        return None

    @property
    def progress_keys(self) -> tuple:
        """Metrics the progress bar shows (besides images/s and lr)."""
        return ("loss", "acc")

    # --- shared machinery ----------------------------------------------------------------
    def make_loader(self) -> tuple[DataLoader, ResumableBatchSampler]:
        """This process's share of ``self.train_set``, in batches of ``optim.batch_size``, resumable by position."""
        cfg = self.cfg
        items = SeededItems(self.train_set, cfg.seed, self.transform())
        sampler = DistributedSampler(
            items, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        batch_sampler = ResumableBatchSampler(sampler, cfg.optim.batch_size)
        if len(batch_sampler) < cfg.optim.accum_steps:
            raise ConfigError(
                f"the training set has {len(self.train_set)} images: fewer than one optimizer step of "
                f"{cfg.optim.batch_size} x {cfg.optim.accum_steps} x {self.dist.world_size} processes"
            )
        # A private generator: creating an iterator must not draw from the global RNG (which drives
        # dropout), or a resumed run would diverge from an uninterrupted one.
        loader = DataLoader(
            items,
            batch_sampler=batch_sampler,
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed + self.dist.rank),
        )
        return loader, batch_sampler

    def schedule_lengths(self, micro_per_epoch: int) -> tuple[int, int, int]:
        """(optimizer steps per epoch, total steps, warmup steps)."""
        per_epoch = micro_per_epoch // self.cfg.optim.accum_steps
        total = max(1, math.ceil(self.cfg.optim.epochs * per_epoch))
        warmup = int(round(self.cfg.optim.warmup_epochs * per_epoch))
        return per_epoch, total, warmup
