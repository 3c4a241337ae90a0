"""Recipes on disk: YAML files under ``lafs/recipes/`` (by name) or anywhere (by path)."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import ConfigError
from .tree import plain

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return path
    candidate = RECIPE_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
        raise ConfigError(f"no recipe named {name_or_path!r} (built-in recipes: {known})")
    return candidate


def load_recipe(name_or_path: str) -> dict:
    path = recipe_path(name_or_path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {path} must hold a mapping at the top level")
    return tree


def dump(cfg: dict, path) -> None:
    Path(path).write_text(yaml.safe_dump(plain(cfg), sort_keys=False))
