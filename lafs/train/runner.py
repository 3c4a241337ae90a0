"""From a command, a recipe and overrides to a finished run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from . import config as config_mod
from .demo import run_demo
from .stage_run import run_single_stage, stage_class

__all__ = ["run_command", "run_single_stage", "stage_class"]


def run_command(command: str, *, recipe: str, overrides: Sequence[str], out: Path, resume: bool = False) -> dict:
    """Run ``command`` ('demo' or a stage) into ``out``; returns its summary."""
    parsed = config_mod.parse_overrides(overrides)
    saved = Path(out) / "config.yaml"
    # A resumed run continues with the configuration it started with (plus explicit overrides).
    tree = config_mod.load_recipe(str(saved) if resume and saved.is_file() else recipe)
    if command == "demo":
        return run_demo(config_mod.apply_overrides(tree, parsed), out=Path(out), resume=resume)
    if config_mod.is_demo_recipe(tree):
        tree = config_mod.demo_stage_tree(tree, command)
    tree = config_mod.apply_overrides(tree, parsed)
    cfg = config_mod.resolve_stage(command, tree, source=f"{recipe} + overrides")
    return run_single_stage(command, cfg, Path(out), resume=resume)
