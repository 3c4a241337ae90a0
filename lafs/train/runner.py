"""From a command, a recipe and overrides to a finished run folder."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from . import config as config_mod
from .distributed import init_distributed
from .loop import RunFolder, run_stage


def stage_class(name: str):
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


def run_command(command: str, *, recipe: str, overrides: Sequence[str], out: Path, resume: bool = False) -> dict:
    """Run ``command`` ('demo' or a stage) into ``out``; returns its summary."""
    parsed = config_mod.parse_overrides(overrides)
    saved = Path(out) / "config.yaml"
    if resume and saved.is_file():
        # A resumed run continues with the configuration it started with (plus explicit overrides).
        tree = config_mod.load_recipe(str(saved))
    else:
        tree = config_mod.load_recipe(recipe)
    if command == "demo":
        from .demo import run_demo

        return run_demo(config_mod.apply_overrides(tree, parsed), out=Path(out), resume=resume)
    if config_mod.is_demo_recipe(tree):
        tree = config_mod.demo_stage_tree(tree, command)
    tree = config_mod.apply_overrides(tree, parsed)
    cfg = config_mod.resolve_stage(command, tree, source=f"{recipe} + overrides")
    return run_single_stage(command, cfg, Path(out), resume=resume)


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
    if dist.is_main:
        if not resume:
            (run.path / "log.jsonl").unlink(missing_ok=True)
        config_mod.dump(cfg.to_plain(), run.path / "config.yaml")
    return run_stage(stage, resume=resume)
