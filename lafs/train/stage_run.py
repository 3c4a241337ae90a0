"""One stage into one run folder: config.yaml, log, checkpoints, summary, plots; works under torchrun."""

from __future__ import annotations

from pathlib import Path

import torch

from . import config as config_mod
from .distributed import init_distributed
from .loop import run_stage
from .run_folder import RunFolder


def stage_class(name: str):
    """The :class:`~lafs.train.stage.Stage` subclass of stage ``name`` (imported on demand)."""
    if name == "supervised":
        from .supervised import SupervisedStage

        return SupervisedStage
    if name == "pretrain":
        from .pretrain import PretrainStage

        return PretrainStage
    if name == "finetune":
        from .finetune import FinetuneStage

        return FinetuneStage
    raise config_mod.ConfigError(f"unknown stage {name!r}")


def run_single_stage(name: str, cfg: config_mod.Config, out: Path, *, resume: bool = False) -> dict:
    """One stage into ``out`` (config.yaml, log, checkpoints, summary, plots); works under torchrun.

    Under torchrun the process group started by the first stage stays up for the next ones (the
    demo's); ``lafs.train.distributed.shutdown`` ends it (``python -m lafs.train`` does on exit).
    """
    dist = init_distributed()
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    run = RunFolder(out, dist)
    stage = stage_class(name)(cfg, run, dist)
    if dist.is_main and not resume:
        (run.path / "log.jsonl").unlink(missing_ok=True)
    return run_stage(stage, resume=resume)  # writes config.yaml (resuming: once the checkpoint was accepted)
