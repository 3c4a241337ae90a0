"""The demo layout of a recipe: shared sections (``seed``, ``data``, ``val``, ``model``, ``train``) and one
section per stage, merged as ``defaults <- shared <- stage``; ``fewshot`` and ``scratch`` sections for the demo's
few-shot runs."""

from __future__ import annotations

from .errors import ConfigError
from .resolve import resolve_stage
from .schema import STAGES
from .tree import Config, merge

SHARED_SECTIONS = ("seed", "data", "val", "model", "train")


def is_demo_recipe(tree: dict) -> bool:
    """A recipe with per-stage sections (the demo layout) rather than one stage's options."""
    return any(isinstance(tree.get(stage), dict) for stage in STAGES)


def demo_stage_tree(tree: dict, stage: str) -> dict:
    """One stage's mapping from a demo-layout recipe: its section merged over the shared sections."""
    known = set(SHARED_SECTIONS) | set(STAGES) | {"fewshot", "scratch"}
    for key in tree:
        if key not in known:
            raise ConfigError(f"unknown demo section {key!r} (sections: {', '.join(sorted(known))})")
    merged = merge({k: tree[k] for k in SHARED_SECTIONS if k in tree}, tree.get(stage) or {})
    if stage == "finetune":
        merged = merge(merged, {"data": {"few_shot": tree.get("fewshot") or {}}})
    return merged


def resolve_demo(tree: dict, refs: dict, *, source: str = "recipe") -> dict[str, Config]:
    """Per-stage configs of the three-stage demo; ``@supervised`` / ``@pretrain`` resolve through ``refs``.

    Also ``scratch``: the fine-tuning config with both ``init`` entries null (the
    same few-shot training from random weights), updated by the recipe's
    ``scratch`` section.
    """
    stages = {
        stage: resolve_stage(stage, demo_stage_tree(tree, stage), source=f"{source} [{stage}]", refs=refs)
        for stage in STAGES
    }
    scratch = merge(demo_stage_tree(tree, "finetune"), {"init": {"pretrained": None, "landmark": None}})
    scratch = merge(scratch, tree.get("scratch") or {})
    stages["scratch"] = resolve_stage("finetune", scratch, source=f"{source} [scratch]")
    return stages
