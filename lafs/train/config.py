"""Recipes, command-line overrides and validation of the training configuration.

A recipe is a YAML file (``lafs/recipes/<name>.yaml`` or any path). A stage's
configuration is a nested mapping whose every key is declared once below, with
its default, its type and a help string (``python -m lafs.train --help`` prints
them all). The ``demo`` recipe holds shared sections (``seed``, ``data``,
``val``, ``model``) and one section per stage, merged as
``defaults <- shared <- stage``.

Overrides are ``dotted.key=value`` pairs applied to the recipe before it is
resolved; values are parsed as YAML (``optim.lr=1e-3``, ``val.bins=[a.bin]``,
``data.root=null``). Every value is checked before any training starts.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
STAGES = ("supervised", "pretrain", "finetune")
SHARED_SECTIONS = ("seed", "data", "val", "model", "train")


class ConfigError(ValueError):
    """A recipe or override names an unknown key or holds a bad value."""


@dataclass(frozen=True)
class Option:
    key: str
    default: Any
    help: str
    kind: type = str  # int, float, bool, str, list or dict
    choices: Optional[tuple] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    nullable: bool = False
    # (alias, value) pairs: an alias (compared by identity, so True is not 1) stands for the value,
    # e.g. YAML 1.1 reads a bare ``off`` as False.
    aliases: tuple = ()


def _opt(key, default, help, kind=None, **kw) -> Option:
    if kind is None:
        kind = type(default) if default is not None else str
    return Option(key, default, help, kind, **kw)


COMMON = [
    _opt("seed", 0, "Seed of everything random: initialisation, data order, augmentation, dropout.", minimum=0),
    _opt("data.source", "synthetic", "Training images: 'synthetic' (built-in SyntheticFaces, no files needed), "
         "'rec' (insightface train.rec/train.idx under data.root) or 'folder' (data.root/<identity>/<image>).",
         choices=("synthetic", "rec", "folder")),
    _opt("data.root", None, "Folder of the .rec set or the image folder (not used for synthetic data).", str,
         nullable=True),
    _opt("data.color", "rgb", "Channel order the .rec images were packed in: rgb (WebFace4M) or bgr (MS1MV3).",
         choices=("rgb", "bgr")),
    _opt("data.synthetic.identities", 64, "Training identities of the synthetic set.", minimum=2),
    _opt("data.synthetic.images_per_identity", 24, "Images per synthetic training identity.", minimum=1),
    _opt("data.synthetic.difficulty", 1.0, "Strength of the per-image nuisances (pose, lighting, blur, noise) of the "
         "synthetic set; 0 renders every image of an identity alike.", float, minimum=0.0),
    _opt("data.synthetic.colours", "per_image", "Skin tone and hair colour of the synthetic faces: drawn for every "
         "image ('per_image': colour never identifies anybody) or once per identity ('per_identity', as real "
         "people keep theirs; small per-image variation). Backgrounds are per image in both.",
         choices=("per_image", "per_identity")),
    _opt("data.synthetic.difficulty_warmup_epochs", 0.0, "Curriculum: the training images' nuisances ramp "
         "linearly from none to data.synthetic.difficulty over this many epochs (each image keeps its own random "
         "draw, scaled); held-out pairs always use the full difficulty. 0: full difficulty from the start.", float,
         minimum=0.0),
    _opt("data.few_shot.images_per_identity", None, "Keep only this many images per identity (few-shot subset); "
         "null keeps all.", int, nullable=True, minimum=1),
    _opt("data.few_shot.identity_fraction", 1.0, "Fraction of identities kept in the few-shot subset.", float,
         minimum=0.0, maximum=1.0),
    _opt("data.num_workers", 0, "DataLoader worker processes per training process (0: load in the main process).",
         minimum=0),
    _opt("val.every_steps", 0, "Verify on held-out pairs every this many optimizer steps (0: only at the end).",
         minimum=0),
    _opt("val.synthetic_identities", 40, "Held-out synthetic identities (never trained on) for verification pairs.",
         minimum=2),
    _opt("val.synthetic_images_per_identity", 6, "Images per held-out synthetic identity.", minimum=2),
    _opt("val.pairs", 600, "Verification pairs drawn from the held-out synthetic identities (half genuine).",
         minimum=20),
    _opt("val.bins", [], "Verification .bin files (lfw.bin, cfp_fp.bin, ...) to evaluate on instead of synthetic "
         "pairs; the best checkpoint follows the mean accuracy.", list),
    _opt("val.batch_size", 128, "Images per forward pass during verification.", minimum=1),
    _opt("model.name", "part_fvit_tiny", "Model preset of lafs.models.create_model (part_fvit_b is the paper's "
         "Part fViT-B; part_fvit_tiny runs on a CPU)."),
    _opt("model.overrides", {}, "Preset fields to change, e.g. {depth: 4, drop_path: 0.1}.", dict),
    _opt("optim.batch_size", 64, "Images per process per forward pass (global batch = this x accum_steps x "
         "processes).", minimum=1),
    _opt("optim.accum_steps", 1, "Forward/backward passes accumulated per optimizer step.", minimum=1),
    _opt("optim.epochs", 10.0, "Passes over the training set (fractions allowed).", float, minimum=0.0),
    _opt("optim.warmup_epochs", 1.0, "Linear learning-rate warmup from 0, in epochs.", float, minimum=0.0),
    _opt("optim.lr", 1e-3, "Peak learning rate at the global batch size (pretrain: per 256 images, scaled by the "
         "global batch as DINO does).", float, minimum=0.0),
    _opt("optim.min_lr", 1e-6, "Learning rate at the end of the cosine decay.", float, minimum=0.0),
    _opt("optim.weight_decay", 0.05, "AdamW weight decay of weight matrices (none on biases, norms, tokens).",
         float, minimum=0.0),
    _opt("optim.landmark_weight_decay", 0.05, "AdamW weight decay of the landmark CNN's weights.", float,
         minimum=0.0),
    _opt("optim.layer_decay", 1.0, "Layer-wise learning-rate decay: block i of D gets lr x decay^(D + 1 - i); "
         "the embedding and landmark CNN get decay^(D + 1). 1 disables it; the paper fine-tunes with 0.58.",
         float, minimum=0.0, maximum=1.0),
    _opt("optim.betas", [0.9, 0.999], "AdamW betas.", list),
    _opt("optim.clip_grad", 5.0, "Clip the global gradient norm to this value (0 disables).", float, minimum=0.0),
    _opt("train.amp", "auto", "Autocast dtype on GPU: auto (bfloat16 where supported, else float16), bf16, fp16 or "
         "off (false and true mean off and auto). CPU runs in float32.", choices=("auto", "bf16", "fp16", "off"),
         aliases=((False, "off"), (True, "auto"))),
    _opt("train.original_path", False, "Use the code paths of the original LAFS repository (per-landmark "
         "grid_sample loop, unfused margin loss from lafs_kernels.baselines; in pretraining the frozen landmark CNN "
         "run once per global view and once for the locals, batch norms unfolded) for comparisons.", bool),
    _opt("train.log_every", 10, "Write a log line every this many optimizer steps.", minimum=1),
    _opt("train.checkpoint_every", 0, "Write checkpoints/last.pt every this many optimizer steps (0: at each "
         "verification and at the end).", minimum=0),
    _opt("train.stop_after_steps", None, "Stop after this many optimizer steps while keeping the schedule of the "
         "full run (continue later with --resume).", int, nullable=True, minimum=1),
    _opt("train.channels_last", True, "Store the landmark CNN's convolution weights channels_last (NHWC) and feed "
         "it NHWC images: faster oneDNN / cuDNN convolutions (supervised and fine-tuning stages; not with "
         "train.original_path, which runs NCHW as the original code does).", bool),
    _opt("train.cpu_threads", 0, "Threads of CPU ops per process (0: torch's default). On a CPU shared with other "
         "jobs 1 is often several times faster than more, which then wait on each other.", minimum=0),
    _opt("train.plots", True, "Write curves.png and landmarks.png into the run folder.", bool),
]

MARGIN = [
    _opt("loss.type", "cosface", "Margin softmax: cosface (target cos - m) or arcface (cos(theta + m)).",
         choices=("cosface", "arcface")),
    _opt("loss.s", 64.0, "Logit scale s.", float, minimum=0.0),
    _opt("loss.m", 0.4, "Margin m (CosFace 0.4, ArcFace 0.5).", float, minimum=0.0),
    _opt("loss.partial_fc_sample_rate", 1.0, "With several processes the class centres are sharded (Partial FC); "
         "this fraction of negative classes is sampled per step.", float, minimum=0.0, maximum=1.0),
]

FLIP = [_opt("aug.flip", 0.5, "Probability of a horizontal flip of a training image.", float, minimum=0.0,
             maximum=1.0)]

SUPERVISED = COMMON + MARGIN + FLIP

FINETUNE = COMMON + MARGIN + FLIP + [
    _opt("init.pretrained", None, "LAFS pretraining run folder or checkpoint whose teacher transformer starts the "
         "fine-tuning (null: transformer from scratch).", str, nullable=True),
    _opt("init.landmark", None, "Supervised run folder, checkpoint or official state dict whose landmark CNN starts "
         "the fine-tuning (null: landmark CNN from scratch).", str, nullable=True),
    _opt("aug.randaugment", True, "Apply RandAugment (torchvision.transforms.v2) to the training images.", bool),
    _opt("aug.randaugment_ops", 2, "RandAugment operations per image.", minimum=1),
    _opt("aug.randaugment_magnitude", 9, "RandAugment magnitude (0-30).", minimum=0, maximum=30),
    _opt("aug.mixup_prob", 0.1, "Probability that a batch is mixed (mixup through the two-label soft-target path "
         "of the fused margin loss); the paper uses 0.1, and 0.2 for MS1MV3.", float, minimum=0.0, maximum=1.0),
    _opt("aug.mixup_alpha", 0.8, "Beta(alpha, alpha) distribution of the mixup weight.", float, minimum=0.0),
]

PRETRAIN = COMMON + [
    _opt("init.landmark", None, "Supervised run folder, checkpoint or official state dict whose landmark CNN "
         "(frozen, eval mode) places the patches. Required.", str, nullable=True),
    _opt("val.student", True, "Also verify the student transformer at each validation (val_student_accuracy in "
         "the log); the teacher's accuracy picks the best checkpoint.", bool),
    _opt("val.view_probe", 128, "Training images whose two global views (drawn once from the seed) are matched at "
         "each validation: val_view_retrieval is the fraction whose second view is the nearest to their first "
         "(chance 1/N; no labels needed). 0 turns it off.", minimum=0),
    _opt("views.global_scale", [0.4, 1.0], "Random-resized-crop scale range of the two global views.", list),
    _opt("views.local_count", 8, "Local views per image.", minimum=0),
    _opt("views.local_scale", [0.4, 1.0], "Random-resized-crop scale range of the local views.", list),
    _opt("views.local_tokens", 36, "Landmarks drawn per local view.", minimum=1),
    _opt("views.replacement", True, "Draw the local views' landmarks with replacement (as the paper).", bool),
    _opt("views.jitter_std", 5.0, "Gaussian landmark jitter in pixels.", float, minimum=0.0),
    _opt("views.grayscale_p", 0.2, "Probability that a view is turned to grayscale (DINO's 0.2).", float,
         minimum=0.0, maximum=1.0),
    _opt("views.landmarks", "per_view", "Where the frozen landmark CNN runs: per_view (on every view's crop, as the "
         "paper) or per_image (once per source image, its landmarks mapped into each view through the crop's "
         "inverse affine: one CNN pass instead of one per view). train.original_path always runs it per view.",
         choices=("per_view", "per_image")),
    _opt("views.local_positions", None, "Position embeddings of a local view's tokens: landmark (each token its "
         "landmark's) or first (the released code's first K + 1 positions, whatever landmarks were drawn); null: "
         "first with train.original_path, else landmark.", str, nullable=True, choices=("landmark", "first")),
    _opt("dino.out_dim", 65536, "Output dimension of the DINO head (the paper uses up to 100,000).", minimum=1),
    _opt("dino.hidden_dim", 2048, "Hidden width of the DINO head.", minimum=1),
    _opt("dino.bottleneck_dim", 256, "Bottleneck width of the DINO head.", minimum=1),
    _opt("dino.norm_last_layer", True, "Fix the gain of the weight-normalised last layer to 1.", bool),
    _opt("dino.student_temp", 0.1, "Student softmax temperature.", float, minimum=0.0),
    _opt("dino.warmup_teacher_temp", 0.04, "Teacher temperature at the start of its warmup.", float, minimum=0.0),
    _opt("dino.teacher_temp", 0.04, "Teacher temperature after warmup.", float, minimum=0.0),
    _opt("dino.warmup_teacher_temp_epochs", 0.0, "Epochs of linear teacher-temperature warmup.", float,
         minimum=0.0),
    _opt("dino.center_momentum", 0.9, "Momentum of the teacher-output centre.", float, minimum=0.0, maximum=1.0),
    _opt("dino.momentum_teacher", 0.996, "Teacher EMA momentum at the start (cosine to 1).", float, minimum=0.0,
         maximum=1.0),
    _opt("dino.weight_decay_end", 0.4, "Weight decay at the end of its cosine schedule (from optim.weight_decay).",
         float, minimum=0.0),
    _opt("dino.freeze_last_layer_epochs", 1.0, "Epochs during which the head's last layer gets no update.", float,
         minimum=0.0),
]

SCHEMAS = {"supervised": SUPERVISED, "pretrain": PRETRAIN, "finetune": FINETUNE}


class Config(dict):
    """A nested mapping with attribute access for reading (``cfg.optim.lr``)."""

    def __getattr__(self, name):
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return Config(value) if isinstance(value, dict) and not isinstance(value, Config) else value

    def get_path(self, dotted: str):
        node = self
        for part in dotted.split("."):
            node = node[part]
        return node

    def to_plain(self) -> dict:
        return _plain(self)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def set_path(tree: dict, dotted: str, value) -> None:
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


def apply_overrides(tree: dict, overrides: Sequence[tuple[str, Any]]) -> dict:
    tree = _plain(tree)
    for key, value in overrides:
        set_path(tree, key, value)
    return tree


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
        set_path(resolved, opt.key, _plain(opt.default))
    for key, value in flatten(tree, leaves=dict_keys).items():
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown {stage} option {key!r}{hint}")
        set_path(resolved, key, _check(schema[key], value, source))
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
                raise ConfigError(f"{source}: {key} {value!r} names the output of another stage, which only the demo "
                                  f"provides; give a run folder or checkpoint path")
            set_path(cfg, key, str(refs[value[1:]]))


def _check(opt: Option, value, source: str):
    where = f"{source}: {opt.key}"
    value = next((meaning for alias, meaning in opt.aliases if value is alias), value)
    if value is None:
        if opt.nullable:
            return None
        raise ConfigError(f"{where} must not be null ({opt.help})")
    if opt.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if opt.kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) and opt.kind is not bool or not isinstance(value, opt.kind):
        raise ConfigError(f"{where} must be {opt.kind.__name__}, got {value!r} ({type(value).__name__})")
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, opt.choices))}; got {value!r}")
    if opt.minimum is not None and value < opt.minimum:
        raise ConfigError(f"{where} must be >= {opt.minimum}; got {value!r}")
    if opt.maximum is not None and value > opt.maximum:
        raise ConfigError(f"{where} must be <= {opt.maximum}; got {value!r}")
    return value


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
    if "loss" in cfg and cfg.loss.partial_fc_sample_rate <= 0:
        fail("loss.partial_fc_sample_rate must be > 0")
    for path in cfg.val.bins:
        if not isinstance(path, str) or not os.path.isfile(path):
            fail(f"val.bins: {path!r} is not a file")
    if stage == "pretrain":
        for key in ("views.global_scale", "views.local_scale"):
            lo_hi = cfg.get_path(key)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
                fail(f"{key} must be [low, high] with 0 < low <= high <= 1; got {lo_hi!r}")
        if not cfg.init.landmark:
            fail("init.landmark is required: pretraining places patches with a frozen landmark CNN from the "
                 "supervised stage (a run folder or checkpoint) or an official checkpoint")
    for key in ("init.landmark", "init.pretrained"):
        try:
            path = cfg.get_path(key)
        except KeyError:
            continue
        if path and not path.startswith("@") and not os.path.exists(path):
            fail(f"{key} {path!r} does not exist")


def is_demo_recipe(tree: dict) -> bool:
    """A recipe with per-stage sections (the demo layout) rather than one stage's options."""
    return any(isinstance(tree.get(stage), dict) for stage in STAGES)


def demo_stage_tree(tree: dict, stage: str) -> dict:
    """One stage's mapping from a demo-layout recipe: its section merged over the shared sections."""
    known = set(SHARED_SECTIONS) | set(STAGES) | {"fewshot", "scratch"}
    for key in tree:
        if key not in known:
            raise ConfigError(f"unknown demo section {key!r} (sections: {', '.join(sorted(known))})")
    merged = _merge({k: tree[k] for k in SHARED_SECTIONS if k in tree}, tree.get(stage) or {})
    if stage == "finetune":
        merged = _merge(merged, {"data": {"few_shot": tree.get("fewshot") or {}}})
    return merged


def resolve_demo(tree: dict, refs: dict, *, source: str = "recipe") -> dict[str, Config]:
    """Per-stage configs of the three-stage demo; ``@supervised`` / ``@pretrain`` resolve through ``refs``.

    Also ``scratch``: the fine-tuning config with both ``init`` entries null (the
    same few-shot training from random weights), updated by the recipe's
    ``scratch`` section.
    """
    stages = {stage: resolve_stage(stage, demo_stage_tree(tree, stage), source=f"{source} [{stage}]", refs=refs)
              for stage in STAGES}
    scratch = _merge(demo_stage_tree(tree, "finetune"), {"init": {"pretrained": None, "landmark": None}})
    scratch = _merge(scratch, tree.get("scratch") or {})
    stages["scratch"] = resolve_stage("finetune", scratch, source=f"{source} [scratch]")
    return stages


def _merge(base: dict, update: dict) -> dict:
    merged = _plain(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = _plain(value)
    return merged


def dump(cfg: dict, path) -> None:
    Path(path).write_text(yaml.safe_dump(_plain(cfg), sort_keys=False))


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
