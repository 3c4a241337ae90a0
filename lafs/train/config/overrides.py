"""Command-line overrides: ``dotted.key=value`` pairs, values parsed as YAML, applied to a recipe's mapping."""

from __future__ import annotations

from typing import Any, Sequence

import yaml

from .errors import ConfigError
from .tree import plain, set_path


def parse_overrides(pairs: Sequence[str]) -> list[tuple[str, Any]]:
    parsed = []
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key or key.startswith("-"):
            raise ConfigError(f"override {pair!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {pair!r}: value is not valid YAML ({exc})") from None
        parsed.append((key.strip(), _number_if_numeric(value)))
    return parsed


def _number_if_numeric(value):
    """YAML 1.1 reads ``5e-4`` (no dot) as a string; a user typing it means the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(tree: dict, overrides: Sequence[tuple[str, Any]]) -> dict:
    tree = plain(tree)
    for key, value in overrides:
        set_path(tree, key, value)
    return tree
