"""One stage's configuration: defaults updated by a recipe's mapping, every value and relation checked."""

from __future__ import annotations

import difflib
import os
from typing import Optional

from .errors import ConfigError
from .schema import SCHEMAS, check_value
from .tree import Config, flatten, plain, set_path


def resolve_stage(stage: str, tree: dict, *, source: str = "recipe", refs: Optional[dict] = None) -> Config:
    """Defaults of ``stage`` updated by ``tree`` (one stage's mapping), validated.

    ``init.*`` values ``@supervised`` / ``@pretrain`` name the output of an earlier
    stage of the demo; ``refs`` maps those names to run folders (which need not
    exist yet).
    """
    schema = {opt.key: opt for opt in SCHEMAS[stage]}
    dict_keys = [k for k, o in schema.items() if o.kind is dict]
    resolved: dict = {}
    for opt in schema.values():
        set_path(resolved, opt.key, plain(opt.default))
    for key, value in flatten(tree, leaves=dict_keys).items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown {stage} option {key!r}{hint}")
        set_path(resolved, key, check_value(schema[key], value, source))
    cfg = Config(resolved)
    _check_relations(stage, cfg, source)
    _substitute_refs(cfg, refs or {}, source)
    return cfg


def _substitute_refs(cfg: Config, refs: dict, source: str) -> None:
    for key in ("init.landmark", "init.pretrained"):
        try:
            value = cfg.get_path(key)
        except KeyError:
            continue
        if isinstance(value, str) and value.startswith("@"):
            if value[1:] not in refs:
                raise ConfigError(
                    f"{source}: {key} {value!r} names the output of another stage, which only the demo "
                    f"provides; give a run folder or checkpoint path"
                )
            set_path(cfg, key, str(refs[value[1:]]))


# Options of the recognition stages (the landmark CNN trains, layer-wise decay) that pretraining has no use for.
RECOGNITION_ONLY = (
    "optim.layer_decay",
    "optim.landmark_weight_decay",
    "optim.landmark_lr_scale",
    "optim.landmark_warmup_epochs",
)


def default_of(key: str):
    """The schema's default of option ``key`` (the same in every stage that has it)."""
    return next(opt.default for opt in SCHEMAS["supervised"] + SCHEMAS["pretrain"] if opt.key == key)


def _check_relations(stage: str, cfg: Config, source: str) -> None:
    def fail(message):
        raise ConfigError(f"{source}: {message}")

    if cfg.optim.epochs <= 0:
        fail("optim.epochs must be > 0")
    if cfg.optim.warmup_epochs > cfg.optim.epochs:
        fail(f"optim.warmup_epochs ({cfg.optim.warmup_epochs}) exceeds optim.epochs ({cfg.optim.epochs})")
    if cfg.optim.min_lr > cfg.optim.lr:
        fail(f"optim.min_lr ({cfg.optim.min_lr}) exceeds optim.lr ({cfg.optim.lr})")
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        fail(f"optim.betas must be two numbers in [0, 1); got {betas!r}")
    if cfg.data.source != "synthetic":
        root = cfg.data.root
        if not root:
            fail(f"data.root is required when data.source is {cfg.data.source!r}")
        if not os.path.isdir(root):
            fail(f"data.root {root!r} is not a folder")
        if cfg.data.source == "rec":
            for name in ("train.rec", "train.idx"):
                if not os.path.isfile(os.path.join(root, name)):
                    fail(f"data.root {root!r} has no {name} (data.source 'rec' needs train.rec and train.idx)")
    if 0 < cfg.val.landmark_faces < 10:
        fail(
            f"val.landmark_faces must be 0 (skip) or at least 10 (5-fold cross-validation); got "
            f"{cfg.val.landmark_faces}"
        )
    if "loss" in cfg and cfg.loss.partial_fc_sample_rate <= 0:
        fail("loss.partial_fc_sample_rate must be > 0")
    for path in cfg.val.bins:
        if not isinstance(path, str) or not os.path.isfile(path):
            fail(f"val.bins: {path!r} is not a file")
    if stage == "finetune" and cfg.aug.resized_crop_scale is not None:
        lo_hi = cfg.aug.resized_crop_scale
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            fail(f"aug.resized_crop_scale must be null or [low, high] with 0 < low <= high <= 1; got {lo_hi!r}")
    if stage == "pretrain":
        changed = [key for key in RECOGNITION_ONLY if cfg.get_path(key) != default_of(key)]
        if changed:
            fail(
                f"{', '.join(changed)} {'has' if len(changed) == 1 else 'have'} no effect in pretraining (one AdamW "
                "over the student with DINO's weight-decay schedule; the landmark CNN is frozen): leave the default"
            )
        for key in ("views.global_scale", "views.local_scale"):
            lo_hi = cfg.get_path(key)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
                fail(f"{key} must be [low, high] with 0 < low <= high <= 1; got {lo_hi!r}")
        if not cfg.init.landmark:
            fail(
                "init.landmark is required: pretraining places patches with a frozen landmark CNN from the "
                "supervised stage (a run folder or checkpoint) or an official checkpoint"
            )
    for key in ("init.landmark", "init.pretrained"):
        try:
            path = cfg.get_path(key)
        except KeyError:
            continue
        if path and not path.startswith("@") and not os.path.exists(path):
            fail(f"{key} {path!r} does not exist")
