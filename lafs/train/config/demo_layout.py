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
        subset = {k: v for k, v in (tree.get("fewshot") or {}).items() if k != "repeats"}
        merged = merge(merged, {"data": {"few_shot": subset}})
    return merged


def few_shot_repeats(tree: dict) -> int:
    """How many seeds the demo's few-shot comparison runs (``fewshot.repeats``, default 1)."""
    repeats = (tree.get("fewshot") or {}).get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"fewshot.repeats must be a whole number >= 1, got {repeats!r}")
    return repeats


def resolve_demo(tree: dict, refs: dict, *, source: str = "recipe") -> dict[str, Config]:
    """Per-stage configs of the three-stage demo; ``@supervised`` / ``@pretrain`` resolve through ``refs``.

    Also ``scratch``: the fine-tuning config with both ``init`` entries null (the
    same few-shot training from random weights), updated by the recipe's
    ``scratch`` section. With ``fewshot.repeats`` = n > 1, the pair ``finetune-seed<s>`` /
    ``scratch-seed<s>`` for each of the next n - 1 seeds after the fine-tuning seed (another
    few-shot subset and another training draw; the pretrained weights are the same).
    """
    stages = {
        stage: resolve_stage(stage, demo_stage_tree(tree, stage), source=f"{source} [{stage}]", refs=refs)
        for stage in STAGES
    }
    scratch = merge(demo_stage_tree(tree, "finetune"), {"init": {"pretrained": None, "landmark": None}})
    scratch = merge(scratch, tree.get("scratch") or {})
    stages["scratch"] = resolve_stage("finetune", scratch, source=f"{source} [scratch]")
    first_seed = stages["finetune"].seed
    for seed in range(first_seed + 1, first_seed + few_shot_repeats(tree)):
        for name, stage_tree in (("finetune", demo_stage_tree(tree, "finetune")), ("scratch", scratch)):
            stages[f"{name}-seed{seed}"] = resolve_stage(
                "finetune", merge(stage_tree, {"seed": seed}), source=f"{source} [{name}, seed {seed}]", refs=refs
            )
    return stages
