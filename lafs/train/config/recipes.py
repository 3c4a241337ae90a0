"""Recipes on disk: YAML files under ``lafs/recipes/`` (by name) or anywhere (by path)."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import ConfigError
from .tree import merge, plain

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


def load_recipe(name_or_path: str, _chain: tuple[Path, ...] = ()) -> dict:
    """The recipe's settings; a top-level ``base: NAME`` (a recipe name, or a path relative to this file)
    starts from that recipe and changes only what this one sets (nested mappings merged key by key)."""
    path = recipe_path(name_or_path)
    if path.resolve() in _chain:
        raise ConfigError("recipe bases form a loop: " + " -> ".join(str(p) for p in (*_chain, path.resolve())))
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {path} must hold a mapping at the top level")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"recipe {path}: base must be a recipe name or file, got {base!r}")
    relative = path.parent / base
    source = str(relative) if relative.suffix in (".yaml", ".yml") else base
    return merge(load_recipe(source, (*_chain, path.resolve())), tree)


def dump(cfg: dict, path) -> None:
    Path(path).write_text(yaml.safe_dump(plain(cfg), sort_keys=False))
