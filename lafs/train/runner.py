"""From a command, a recipe and overrides to a finished run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from . import config as config_mod
from .demo import run_demo
from .stage_run import run_single_stage, stage_class

__all__ = ["run_command", "run_single_stage", "saved_config", "stage_class", "stage_config"]


def saved_config(path: Path) -> dict:
    """A run folder's config.yaml, without ``train.stop_after_steps`` (shared or per stage): a stop belongs
    to the command that gave it, so ``--resume`` alone runs to the end (given again, it applies again)."""
    tree = config_mod.load_recipe(str(path))
    for section in (tree, *(value for value in tree.values() if isinstance(value, dict))):
        train = section.get("train")
        if isinstance(train, dict):
            train.pop("stop_after_steps", None)
    return tree


def stage_config(command: str, tree: dict, overrides: list, *, source: str) -> config_mod.Config:
    """The resolved configuration of stage ``command`` from a recipe tree (the demo recipe: that stage's part)
    and parsed ``key=value`` overrides."""
    if config_mod.is_demo_recipe(tree):
        tree = config_mod.demo_stage_tree(tree, command)
    return config_mod.resolve_stage(command, config_mod.apply_overrides(tree, overrides), source=source)


def run_command(command: str, *, recipe: str, overrides: Sequence[str], out: Path, resume: bool = False) -> dict:
    """Run ``command`` ('demo' or a stage) into ``out``; returns its summary."""
    parsed = config_mod.parse_overrides(overrides)
    saved = Path(out) / "config.yaml"
    # A resumed run continues with the configuration it started with (plus explicit overrides).
    from_saved = resume and saved.is_file()
    tree = saved_config(saved) if from_saved else config_mod.load_recipe(recipe)
    source = f"{saved} + overrides" if from_saved else f"{recipe} + overrides"
    if command == "demo":
        return run_demo(config_mod.apply_overrides(tree, parsed), out=Path(out), resume=resume)
    try:
        cfg = stage_config(command, tree, parsed, source=source)
    except config_mod.ConfigError as exc:
        if not from_saved:
            raise
        raise config_mod.ConfigError(
            f"{exc} (--resume continues {out} with the command that started it: was it not `{command}`?)"
        ) from exc
    return run_single_stage(command, cfg, Path(out), resume=resume)
