"""Loading weights into the model of a stage, with a clear error for another architecture."""

from __future__ import annotations

from typing import Mapping

from torch import nn

from lafs.models.safe_load import UnsafeCheckpointError, load_checkpoint

from .config import ConfigError


class ArchitectureMismatchError(ConfigError):
    """A checkpoint's architecture differs from the configured model."""


def check_same_architecture(model: nn.Module, arch: Mapping, what: str) -> None:
    """Raise when ``arch`` (a lafs/v1 ``arch`` dict) differs from ``model.arch_config()`` where both define a key."""
    ours = model.arch_config()
    differences = [
        f"{k}: checkpoint {arch[k]!r} vs configured {ours[k]!r}"
        for k in sorted(set(ours) & set(arch))
        if _normalise(arch[k]) != _normalise(ours[k]) and k not in ("dropout", "emb_dropout", "drop_path")
    ]
    if differences:
        raise ArchitectureMismatchError(
            f"{what} was trained with another architecture ({'; '.join(differences)}); set model.name / "
            f"model.overrides to match it"
        )


def _normalise(value):
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def load_model_weights(model: nn.Module, model_dict: Mapping, what: str) -> None:
    """Strictly load a lafs/v1 model dict into ``model`` after checking the architecture."""
    check_same_architecture(model, model_dict["arch"], what)
    _load_strict(model, model_dict["state_dict"], what)


def _load_strict(module: nn.Module, state: Mapping, what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        raise ArchitectureMismatchError(
            f"{what} does not fit the configured model: missing {missing[:6]}, unexpected {unexpected[:6]}, "
            f"shape differences {wrong[:6]}"
        )
    module.load_state_dict(state)


def load_landmark_cnn(target: nn.Module, source: str, *, unsafe_pickle: bool = False) -> None:
    """Copy the landmark CNN of ``source`` (run folder, our checkpoint or an official state dict) into ``target``.

    The file is read without running code unless ``unsafe_pickle`` (see :mod:`lafs.models.safe_load`).
    """
    from lafs.models import load_model

    try:
        donor = load_model(source, unsafe_pickle=unsafe_pickle)
    except FileNotFoundError as exc:
        raise ConfigError(f"init.landmark: {exc}") from exc
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise ArchitectureMismatchError(f"init.landmark {source!r}: {exc}") from exc
    donor_cfg = donor.landmark_cnn.arch_config()
    ours = target.arch_config()
    if donor_cfg != ours:
        raise ArchitectureMismatchError(
            f"init.landmark {source!r}: its landmark CNN {donor_cfg} differs from the configured {ours}"
        )
    _load_strict(target, donor.landmark_cnn.state_dict(), f"init.landmark {source!r}")


def load_pretrained_transformer(target: nn.Module, source: str, *, unsafe_pickle: bool = False) -> None:
    """Copy the teacher transformer of a LAFS pretraining run / checkpoint into ``target``.

    The file is read without running code unless ``unsafe_pickle`` (see :mod:`lafs.models.safe_load`).
    """
    from lafs.models.checkpoint import resolve_checkpoint_path

    try:
        path = resolve_checkpoint_path(source)
    except FileNotFoundError as exc:
        raise ConfigError(f"init.pretrained: {exc}") from exc
    try:
        state = load_checkpoint(path, unsafe_pickle=unsafe_pickle)
    except ValueError as exc:  # UnsafeCheckpointError is not one: it keeps its own message and exit status
        raise ConfigError(f"init.pretrained: {exc}") from None
    teacher = state.get("teacher_transformer") if isinstance(state, Mapping) else None
    if isinstance(teacher, Mapping) and "arch" in teacher:
        check_same_architecture(target, teacher["arch"], f"init.pretrained {str(path)!r}")
        _load_strict(target, teacher["state_dict"], f"init.pretrained {str(path)!r}")
        return
    from lafs.models.official import load_official_state_dict

    try:
        load_official_state_dict(target, state)
    except Exception as exc:
        raise ArchitectureMismatchError(
            f"init.pretrained {str(path)!r}: neither a lafs.train pretraining checkpoint nor an official LAFS "
            f"checkpoint that fits the configured transformer: {exc}"
        ) from exc
