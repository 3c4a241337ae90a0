"""Nested mappings of settings: attribute access, dotted paths, flattening and merging."""

from __future__ import annotations

from typing import Sequence


class Config(dict):
    """A nested mapping with attribute access for reading (``cfg.optim.lr``)."""

    def __getattr__(self, name):
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return Config(value) if isinstance(value, dict) and not isinstance(value, Config) else value

    def get_path(self, dotted: str):
        """The value at ``a.b.c``; KeyError when a part is missing."""
        node = self
        for part in dotted.split("."):
            node = node[part]
        return node

    def to_plain(self) -> dict:
        return plain(self)


def plain(value):
    """A deep copy of nested dicts and lists as plain ``dict`` / ``list`` (no ``Config``)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def set_path(tree: dict, dotted: str, value) -> None:
    """Set ``tree[a][b][c] = value`` for ``a.b.c``, creating (or replacing non-mapping) parents."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def flatten(tree: dict, prefix: str = "", leaves: Sequence[str] = ()) -> dict:
    """Dotted keys of a nested mapping; keys listed in ``leaves`` are kept whole (dict-valued options)."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in leaves and value:
            flat.update(flatten(value, dotted + ".", leaves))
        else:
            flat[dotted] = value
    return flat


def merge(base: dict, update: dict) -> dict:
    """``base`` updated by ``update`` key by key, nested mappings merged recursively (both left unchanged)."""
    merged = plain(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = plain(value)
    return merged
