"""Named Part fViT configurations and the builders that turn a flat config into modules.

A config is a flat dict: the :class:`PartTransformer` arguments plus
``image_size``, ``landmark_blocks`` (a trunk name or a list of
``[kernel, expanded, out, se, act, stride]``), ``landmark_stem_channels`` and
``landmark_readout_grid`` (1, the original's global average, unless set).
``model.arch_config()`` returns the same form, so ``build_model(model.arch_config())``
rebuilds any model.
"""

from __future__ import annotations

import inspect

from .landmark_cnn import LandmarkCNN
from .part_fvit import PartFViT
from .transformer import PartTransformer

PRESETS: dict[str, dict] = {
    # The architecture of the paper and of the released checkpoints, with the original's training dropout
    # (ViT_face_landmark_patch8(dropout=0.1, emb_dropout=0.1) in its training scripts; eval mode ignores it).
    "part_fvit_b": dict(
        num_landmarks=196,
        patch_size=8,
        dim=768,
        depth=12,
        heads=11,
        dim_head=64,
        mlp_dim=2048,
        dropout=0.1,
        emb_dropout=0.1,
        drop_path=0.1,
        image_size=112,
        landmark_blocks="mobilenet_v3_large",
        landmark_stem_channels=16,
    ),
    # CPU demos: same token layout (196 landmarks, 8x8 patches), narrow and shallow.
    "part_fvit_tiny": dict(
        num_landmarks=196,
        patch_size=8,
        dim=96,
        depth=4,
        heads=4,
        dim_head=24,
        mlp_dim=192,
        dropout=0.0,
        emb_dropout=0.0,
        drop_path=0.0,
        image_size=112,
        landmark_blocks="tiny",
        landmark_stem_channels=16,
    ),
    # Quicker still: 49 landmarks (7 x 7 tokens).
    "part_fvit_nano": dict(
        num_landmarks=49,
        patch_size=8,
        dim=64,
        depth=3,
        heads=4,
        dim_head=16,
        mlp_dim=128,
        dropout=0.0,
        emb_dropout=0.0,
        drop_path=0.0,
        image_size=112,
        landmark_blocks="tiny",
        landmark_stem_channels=16,
    ),
}

_TRANSFORMER_KEYS = tuple(inspect.signature(PartTransformer.__init__).parameters)[1:]
_LANDMARK_KEYS = ("image_size", "landmark_blocks", "landmark_stem_channels", "landmark_readout_grid")
CONFIG_KEYS = _TRANSFORMER_KEYS + _LANDMARK_KEYS


def _check_keys(config: dict, allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} option(s) {unknown}; valid: {sorted(allowed)}")


def preset_config(name: str, **overrides) -> dict:
    """The flat config of preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(PRESETS)}")
    _check_keys(overrides, CONFIG_KEYS, "model")
    return {**PRESETS[name], **overrides}


def build_transformer(config: dict) -> PartTransformer:
    """A :class:`PartTransformer` from a flat config (landmark CNN keys are ignored; missing keys take the
    ``part_fvit_b`` values, drop path 0.1 included)."""
    _check_keys(config, CONFIG_KEYS, "model")
    defaults = PRESETS["part_fvit_b"]
    return PartTransformer(
        **{k: config[k] if k in config else defaults[k] for k in _TRANSFORMER_KEYS if k in config or k in defaults}
    )


def build_landmark_cnn(config: dict) -> LandmarkCNN:
    """A :class:`LandmarkCNN` from a flat config."""
    _check_keys(config, CONFIG_KEYS, "model")
    defaults = PRESETS["part_fvit_b"]
    return LandmarkCNN(
        num_landmarks=config.get("num_landmarks", defaults["num_landmarks"]),
        image_size=config.get("image_size", defaults["image_size"]),
        blocks=config.get("landmark_blocks", defaults["landmark_blocks"]),
        stem_channels=config.get("landmark_stem_channels", defaults["landmark_stem_channels"]),
        readout_grid=config.get("landmark_readout_grid", 1),
    )


def build_model(config: dict) -> PartFViT:
    """A :class:`PartFViT` from a flat config (missing keys take the ``part_fvit_b`` values)."""
    transformer = build_transformer(config)
    return PartFViT(build_landmark_cnn(config), transformer, transformer.patch_size)


def create_model(name: str = "part_fvit_b", **overrides) -> PartFViT:
    """``create_model("part_fvit_tiny", depth=2)``: a preset, optionally with changed arguments."""
    return build_model(preset_config(name, **overrides))


def create_transformer(name: str = "part_fvit_b", **overrides) -> PartTransformer:
    """The transformer of a preset alone (LAFS pretraining trains it without the landmark CNN)."""
    return build_transformer(preset_config(name, **overrides))


def create_landmark_cnn(name: str = "part_fvit_b", **overrides) -> LandmarkCNN:
    """The landmark CNN of a preset alone."""
    return build_landmark_cnn(preset_config(name, **overrides))
