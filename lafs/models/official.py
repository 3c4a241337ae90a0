"""Loading state dicts written by the original Part fViT / LAFS code.

The original keeps everything in one flat module: ``stn.features.*`` and
``output_layer.*`` (landmark CNN), ``patch_to_embedding.*``, ``cls_token``,
``pos_embedding``, ``transformer.layers.*``, ``mlp_head.0.*`` (transformer)
and ``loss.weight`` (the CosFace class centres).  Ours nests the same
sub-module layout under ``landmark_cnn.`` and ``transformer.``; :func:`to_our_key`
is the whole translation.  LAFS pretraining checkpoints hold ``student`` and
``teacher`` dicts whose keys carry ``module.`` (DDP) and ``backbone.``
(DINO's wrapper) prefixes next to the DINO ``head.*``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch
from torch import nn

from .landmark_cnn import LandmarkCNN
from .part_fvit import PartFViT
from .transformer import PartTransformer

_LANDMARK_PREFIXES = {"stn.": "landmark_cnn.", "output_layer.": "landmark_cnn.output_layer."}
_TRANSFORMER_PREFIXES = ("patch_to_embedding.", "mlp_head.")
_TRANSFORMER_TENSORS = ("cls_token", "pos_embedding")
CLASSIFIER_KEY = "loss.weight"
# Keys the original models carry that Part fViT does not use: the masked-token and
# global-token parameters of LAFS variants, and the DINO projection head.
_UNUSED_PREFIXES = {
    "mask_token": "LAFS mask token (unused by Part fViT)",
    "global_token.": "LAFS global-token projection (unused by Part fViT)",
    "head.": "DINO projection head (pretraining only)",
}


class IncompatibleCheckpointError(ValueError):
    """A state dict that does not fit the model; the message lists every missing, unexpected and mismatched key."""


@dataclasses.dataclass
class OfficialLoadResult:
    """What :func:`load_official_state_dict` did.

    loaded: the parts filled (``"landmark_cnn"``, ``"transformer"``).
    classifier_weight: the CosFace class centres [num_classes, dim] (``loss.weight``), or None.
    ignored: official key -> why it was not loaded.
    """

    loaded: list[str]
    classifier_weight: Optional[torch.Tensor]
    ignored: dict[str, str]


def to_our_key(key: str) -> Optional[str]:
    """Official key (prefixes already removed) -> our ``PartFViT`` key, or None if it belongs to neither part."""
    for prefix, ours in _LANDMARK_PREFIXES.items():
        if key.startswith(prefix):
            return ours + key[len(prefix) :]
    if key.startswith("transformer.layers."):
        return key
    if key in _TRANSFORMER_TENSORS or key.startswith(_TRANSFORMER_PREFIXES):
        return "transformer." + key
    return None


def unwrap_official(checkpoint: Mapping, which: str = "teacher") -> dict[str, torch.Tensor]:
    """The flat official state dict inside ``checkpoint``, with ``module.`` / ``backbone.`` removed.

    Accepts a plain state dict, ``{"state_dict": ...}`` / ``{"model": ...}``
    wrappers, and LAFS pretraining checkpoints (``which`` picks ``"teacher"``,
    the one LAFS fine-tunes from, or ``"student"``).
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student'; got {which!r}")
    state = checkpoint
    while True:
        if which in state and isinstance(state[which], Mapping):
            state = state[which]
        elif "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        elif "model" in state and isinstance(state["model"], Mapping):
            state = state["model"]
        else:
            break
    flat = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise IncompatibleCheckpointError(
                f"not a state dict: entry {key!r} is a {type(value).__name__}; top-level keys: {sorted(state)[:20]}"
            )
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        flat[key] = value
    return flat


def _key_report(missing, unexpected, mismatched) -> str:
    def listing(title, items):
        items = sorted(items)
        shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
        return f"\n  {title} ({len(items)}): {shown}" if items else ""

    return listing("missing", missing) + listing("unexpected", unexpected) + listing("shape mismatch", mismatched)


def _official_name(part: str, key: str) -> str:
    """Key relative to our ``landmark_cnn`` / ``transformer`` part -> the original's name."""
    if part == "landmark_cnn":
        return "stn." + key if key.startswith("features.") else key
    return "transformer." + key if key.startswith("layers.") else key


def _problems(module: nn.Module, state: dict[str, torch.Tensor], part: str) -> tuple[list, list, list]:
    """(missing, unexpected, shape-mismatched) keys of a strict load, in the original's names."""
    expected = module.state_dict()
    missing = [_official_name(part, k) for k in expected if k not in state]
    unexpected = [_official_name(part, k) for k in state if k not in expected]
    mismatched = [
        f"{_official_name(part, k)} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    return missing, unexpected, mismatched


def split_official(state: dict[str, torch.Tensor]) -> tuple[dict, dict, Optional[torch.Tensor], dict[str, str]]:
    """Official flat dict -> (landmark CNN dict, transformer dict, classifier weight, ignored keys).

    The part dicts use keys relative to ``LandmarkCNN`` / ``PartTransformer``.
    Raises on keys that belong to no known part.
    """
    landmark, transformer, ignored, unknown = {}, {}, {}, []
    classifier = state.get(CLASSIFIER_KEY)
    for key, value in state.items():
        if key == CLASSIFIER_KEY:
            continue
        ours = to_our_key(key)
        if ours is not None:
            part, rest = ours.split(".", 1)
            (landmark if part == "landmark_cnn" else transformer)[rest] = value
        else:
            why = next((why for prefix, why in _UNUSED_PREFIXES.items() if key.startswith(prefix)), None)
            if why is None:
                unknown.append(key)
            else:
                ignored[key] = why
    if unknown:
        raise IncompatibleCheckpointError(
            "keys that belong to no part of Part fViT (not an official Part fViT / LAFS state dict?):"
            + _key_report([], unknown, [])
        )
    if transformer and not any(k.startswith("layers.") for k in transformer):
        # The landmark network that LAFS pretraining loads keeps embeddings but no transformer blocks.
        ignored.update({k: "transformer embeddings without transformer blocks" for k in transformer})
        transformer = {}
    return landmark, transformer, classifier, ignored


def load_official_state_dict(model: nn.Module, checkpoint: Mapping, which: str = "teacher") -> OfficialLoadResult:
    """Load an official Part fViT / LAFS state dict strictly into ``model``.

    model: a :class:`PartFViT`, a :class:`PartTransformer` or a :class:`LandmarkCNN`.
    checkpoint: a plain or wrapped official state dict, or a LAFS pretraining
    checkpoint (``which``: ``"teacher"`` or ``"student"``); see :func:`unwrap_official`.

    Each part of ``model`` that the checkpoint holds is loaded strictly: a
    missing, unexpected or differently shaped key raises
    :class:`IncompatibleCheckpointError` listing all of them.  A ``PartFViT``
    may receive a checkpoint with only one part (a pretraining checkpoint has no
    landmark CNN; the LAFS landmark network has no transformer blocks): the other
    part keeps its weights and ``result.loaded`` says which parts were filled.
    Parts of the checkpoint that ``model`` does not have are listed in
    ``result.ignored``, like the DINO head and the LAFS extras.  The CosFace class
    centres (``loss.weight``) are returned as ``result.classifier_weight``.
    """
    landmark, transformer, classifier, ignored = split_official(unwrap_official(checkpoint, which))
    if isinstance(model, PartFViT):
        targets = {"landmark_cnn": (model.landmark_cnn, landmark), "transformer": (model.transformer, transformer)}
    elif isinstance(model, PartTransformer):
        targets = {"transformer": (model, transformer)}
        ignored.update(
            {_official_name("landmark_cnn", k): "landmark CNN (the model is a transformer alone)" for k in landmark}
        )
    elif isinstance(model, LandmarkCNN):
        targets = {"landmark_cnn": (model, landmark)}
        ignored.update(
            {_official_name("transformer", k): "transformer (the model is a landmark CNN alone)" for k in transformer}
        )
    else:
        raise TypeError(
            f"load_official_state_dict loads into PartFViT, PartTransformer or LandmarkCNN; got {type(model).__name__}"
        )
    targets = {name: target for name, target in targets.items() if target[1]}
    missing, unexpected, mismatched = [], [], []
    for name, (module, state) in targets.items():
        for found, problems in zip((missing, unexpected, mismatched), _problems(module, state, name)):
            found.extend(problems)
    if missing or unexpected or mismatched:
        raise IncompatibleCheckpointError(
            f"the checkpoint does not fit this {type(model).__name__} (another architecture?); checkpoint "
            f"vs model:{_key_report(missing, unexpected, mismatched)}"
        )
    for module, state in targets.values():
        module.load_state_dict(state, strict=True)
    loaded = list(targets)
    if not loaded:
        raise IncompatibleCheckpointError(
            f"the checkpoint holds no part of a {type(model).__name__} (found only: {sorted(ignored)[:12]})"
        )
    return OfficialLoadResult(loaded=loaded, classifier_weight=classifier, ignored=ignored)


def infer_official_config(state: Mapping[str, torch.Tensor]) -> dict:
    """A flat model config (see :mod:`lafs.models.presets`) read from an official state dict's shapes.

    Needs the transformer keys; assumes heads of 64 (as every released model)
    and the MobileNetV3-large landmark trunk. Dropout, embedding dropout and drop
    path (which no state dict records) are Part fViT-B's, the original's training values.
    """
    from .presets import PRESETS

    try:
        pos = state["pos_embedding"]
        token_dim = state["patch_to_embedding.weight"].shape[1]
        inner = state["transformer.layers.0.0.fn.fn.to_out.0.weight"].shape[1]
        mlp_dim = state["transformer.layers.0.1.fn.fn.net.0.weight"].shape[0]
    except KeyError as err:
        raise IncompatibleCheckpointError(f"cannot read the architecture: the state dict lacks {err}") from None
    except (AttributeError, IndexError, TypeError) as err:
        raise IncompatibleCheckpointError(
            f"cannot read the architecture: a transformer entry is malformed ({err})"
        ) from None
    if not isinstance(pos, torch.Tensor) or pos.dim() != 3:
        found = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
        raise IncompatibleCheckpointError(f"pos_embedding must be [1, L + 1, dim]; got {found}")
    indices = {k.split(".")[2] for k in state if k.startswith("transformer.layers.")}
    depth = len(indices)
    # The layers' numbers must be 0..depth-1: a stray "layers.999999" must not ask for a million blocks.
    if indices != {str(i) for i in range(depth)}:
        odd = sorted(indices - {str(i) for i in range(depth)})[:5]
        raise IncompatibleCheckpointError(f"transformer layers are not numbered 0..{depth - 1}: found {odd}")
    patch = round((token_dim / 3) ** 0.5)
    if 3 * patch * patch != token_dim or inner % 64:
        raise IncompatibleCheckpointError(
            f"unexpected shapes: token width {token_dim} is not 3*P*P, or attention width {inner} is not heads*64"
        )
    return dict(
        num_landmarks=pos.shape[1] - 1,
        patch_size=patch,
        dim=pos.shape[2],
        depth=depth,
        heads=inner // 64,
        dim_head=64,
        mlp_dim=mlp_dim,
        image_size=112,
        landmark_blocks="mobilenet_v3_large",
        landmark_stem_channels=16,
        **{k: PRESETS["part_fvit_b"][k] for k in ("dropout", "emb_dropout", "drop_path")},
    )
