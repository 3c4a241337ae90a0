"""Our model file format, atomic saving, and ``load_model`` for every kind of file a user may hold.

Format ``lafs/v1``: ``{"format": "lafs/v1", "kind": "PartFViT" | "PartTransformer",
"arch": <flat config, see lafs.models.presets>, "state_dict": {...}}``.  A
training checkpoint written by ``lafs.train`` stores this dict under ``"model"``.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Union

import torch
from torch import nn

from .official import IncompatibleCheckpointError, infer_official_config, load_official_state_dict, unwrap_official
from .part_fvit import PartFViT
from .presets import build_model, build_transformer
from .safe_load import UnsafeCheckpointError, load_checkpoint

FORMAT = "lafs/v1"
_BUILDERS = {"PartFViT": build_model, "PartTransformer": build_transformer}


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash leaves either the old file or the new one, never a torn file.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: Union[str, os.PathLike], write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` into a temporary file in ``path``'s folder, fsync, then rename over ``path``
    (a crash leaves the old file or the new one, never a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created as open() creates files (0666 less the umask), not 0600 as mkstemp would; O_EXCL keeps the name ours.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def model_to_dict(model: nn.Module) -> dict:
    """A :class:`PartFViT` or :class:`PartTransformer` as a ``lafs/v1`` dict (CPU tensors)."""
    kind = type(model).__name__
    if kind not in _BUILDERS:
        raise TypeError(f"model_to_dict saves PartFViT or PartTransformer; got {kind}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "kind": kind, "arch": model.arch_config(), "state_dict": state}


def is_model_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def model_from_dict(d: Mapping) -> nn.Module:
    """Rebuild the model saved by :func:`model_to_dict` (strict load).

    The ``arch`` comes from the file, so it is checked against the state dict before anything is
    allocated (a few-KB file must not ask for a million blocks): the number of transformer layers and
    landmark blocks first, then every key and shape of the model built on the meta device.
    """
    if not is_model_dict(d):
        found = d.get("format") if isinstance(d, Mapping) else type(d).__name__
        raise ValueError(f"not a {FORMAT} model dict (format: {found!r})")
    kind = d.get("kind", "PartFViT")
    if kind not in _BUILDERS:
        raise ValueError(f"unknown model kind {kind!r} in a {FORMAT} dict; known: {sorted(_BUILDERS)}")
    arch, state = d.get("arch"), d.get("state_dict")
    if not isinstance(arch, Mapping) or not isinstance(state, Mapping):
        raise IncompatibleCheckpointError(
            f"a {FORMAT} dict needs 'arch' and 'state_dict' mappings; got {type(arch).__name__} and "
            f"{type(state).__name__}"
        )
    arch = dict(arch)
    _check_structure(arch, state)
    try:
        with torch.device("meta"):
            skeleton = _BUILDERS[kind](arch)
    except (TypeError, ValueError, KeyError, IndexError) as err:
        raise IncompatibleCheckpointError(f"the {FORMAT} arch cannot build a {kind}: {err}") from None
    _check_shapes(skeleton.state_dict(), state)
    model = _BUILDERS[kind](arch)
    model.load_state_dict(state)
    return model


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _check_structure(arch: dict, state: Mapping) -> None:
    """The arch's counts of repeated blocks against the state dict's, before any block is built."""
    layers = {
        m.group(1)
        for key in state
        if not str(key).startswith("landmark_cnn.")
        for m in [_LAYER_INDEX.search(str(key))]
        if m
    }
    depth = arch.get("depth")
    if depth is not None and (not isinstance(depth, int) or depth != len(layers)):
        raise IncompatibleCheckpointError(
            f"the {FORMAT} arch says depth {depth!r}, its state dict holds {len(layers)} transformer layers"
        )
    blocks = arch.get("landmark_blocks")
    if blocks is not None and (not isinstance(blocks, (list, tuple)) or len(blocks) > len(state)):
        count = len(blocks) if isinstance(blocks, (list, tuple)) else type(blocks).__name__
        raise IncompatibleCheckpointError(
            f"the {FORMAT} arch lists {count} landmark blocks for a state dict of {len(state)} tensors"
        )


def _check_shapes(expected: Mapping, state: Mapping) -> None:
    """Every key and shape of the model the arch builds (``expected``) against the saved state dict."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(getattr(state[k], 'shape', ()))} vs arch {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape)
    ]
    if missing or unexpected or mismatched:
        raise IncompatibleCheckpointError(
            f"the {FORMAT} state dict does not match its own arch: missing {missing[:12]}, "
            f"unexpected {unexpected[:12]}, shapes {mismatched[:12]}"
        )


def resolve_checkpoint_path(path: Union[str, os.PathLike]) -> Path:
    """A run folder -> its ``checkpoints/best.pt`` (else ``last.pt``); a file -> itself."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no such checkpoint file or run folder: {path}")
    for folder in (path / "checkpoints", path):
        for name in ("best.pt", "last.pt"):
            if (folder / name).is_file():
                return folder / name
    stages = sorted(p.name for p in path.iterdir() if (p / "checkpoints").is_dir())
    hint = f"; it holds stages {stages}: pass one of them, e.g. {path / stages[-1]}" if stages else ""
    raise FileNotFoundError(f"{path} has no checkpoints/best.pt or checkpoints/last.pt{hint}")


def load_model(
    path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu", *, unsafe_pickle: bool = False
) -> PartFViT:
    """A :class:`PartFViT` in eval mode from a run folder, one of our files, or an official Part fViT state dict.

    Run folder: ``checkpoints/best.pt``, else ``last.pt``.  Training checkpoint:
    the ``lafs/v1`` dict under ``"model"``.  Official Part fViT state dict (plain
    or wrapped, ``module.`` / ``backbone.`` prefixes): the architecture is read from
    its shapes (``part_fvit_b`` for the released weights).  An official LAFS
    pretraining checkpoint (``student`` / ``teacher``) holds no landmark CNN and is
    refused: :func:`lafs.ssl.load_official_pretraining` loads it.

    The file is read by :func:`lafs.models.safe_load.load_checkpoint`: one that would
    run code raises :class:`UnsafeCheckpointError` unless ``unsafe_pickle=True``.
    """
    file = resolve_checkpoint_path(path)
    try:
        obj = load_checkpoint(file, unsafe_pickle=unsafe_pickle)
    except UnsafeCheckpointError:
        raise
    except Exception as err:
        raise ValueError(f"cannot read {file} as a torch checkpoint: {err}") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{file} holds a {type(obj).__name__}, not a model checkpoint")
    if is_model_dict(obj.get("model")):
        obj = obj["model"]
    if is_model_dict(obj):
        try:
            model = model_from_dict(obj)
        except IncompatibleCheckpointError as err:
            raise IncompatibleCheckpointError(f"{file}: {err}") from None
        if not isinstance(model, PartFViT):
            raise ValueError(
                f"{file} holds a {type(model).__name__} without a landmark CNN; rebuild it with "
                "lafs.models.model_from_dict and combine it with a landmark CNN"
            )
    else:
        model = _official_model(obj, file)
    return model.to(device).eval()


def _official_model(obj: Mapping, file: Path) -> PartFViT:
    try:
        state = unwrap_official(obj)
    except IncompatibleCheckpointError as err:
        raise ValueError(
            f"{file}: unknown checkpoint format (neither {FORMAT} nor an official Part fViT state dict; "
            f"top-level keys {sorted(map(str, obj))[:12]}): {err}"
        ) from None
    try:
        model = build_model(infer_official_config(state))
        result = load_official_state_dict(model, state)
    except IncompatibleCheckpointError as err:
        raise IncompatibleCheckpointError(f"{file}: {err}") from None
    if "landmark_cnn" not in result.loaded:
        raise IncompatibleCheckpointError(
            f"{file} holds no landmark CNN (an official LAFS pretraining checkpoint?): load_model builds a whole "
            "Part fViT; load the student and teacher with lafs.ssl.load_official_pretraining, or the teacher "
            "transformer alone with lafs.models.load_official_state_dict(create_transformer(...), checkpoint)"
        )
    return model
