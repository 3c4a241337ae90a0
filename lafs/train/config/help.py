"""``python -m lafs.train --help``: every option with its default, choices and the stages that have it."""

from __future__ import annotations

import yaml

from .schema import SCHEMAS, Option


def options_help() -> str:
    """Every option of every stage with its default and help, for ``--help``."""
    lines = []
    seen: dict[str, list[str]] = {}
    order: list[Option] = []
    for stage, schema in SCHEMAS.items():
        for opt in schema:
            if opt.key not in seen:
                seen[opt.key] = []
                order.append(opt)
            seen[opt.key].append(stage)
    for opt in order:
        stages = "" if len(seen[opt.key]) == len(SCHEMAS) else f" [{', '.join(seen[opt.key])}]"
        choice = f" {{{'|'.join(map(str, opt.choices))}}}" if opt.choices else ""
        default = yaml.safe_dump(opt.default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {opt.key}={default}{choice}{stages}\n      {opt.help}")
    return "\n".join(lines)
