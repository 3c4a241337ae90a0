"""Loading a pretraining checkpoint written by the original LAFS (DINO-style) code.

The original saves ``{"student", "teacher", "optimizer", "epoch", "args", "dino_loss",
"fp16_scaler"}``.  The student was wrapped in DDP and DINO's ``MultiCropWrapper``, so its
keys read ``module.backbone.<Part fViT transformer key>`` and ``module.head.<DINO head key>``;
the teacher's lack ``module.``.  The backbone keys are the original ViT's
(``transformer.layers.*``, plus the unused CosFace ``loss.weight``), translated by
:func:`lafs.models.load_official_state_dict`; the head keys (``mlp.0/2/4``,
``last_layer.weight_g`` / ``weight_v`` from ``torch.nn.utils.weight_norm``) are ours as they are.
The optimizer state is not loaded (its parameter order differs); the loss centre is.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional, Union

import torch
from torch import nn

from lafs.models import IncompatibleCheckpointError, load_official_state_dict
from lafs.models.official import unwrap_official
from lafs.models.safe_load import load_checkpoint

from .loss import DINOLoss
from .multicrop import MultiCropModel

# Weight norm written by torch.nn.utils.parametrizations.weight_norm (newer PyTorch) -> our names.
_PARAMETRIZED_WEIGHT_NORM = {
    "last_layer.parametrizations.weight.original0": "last_layer.weight_g",
    "last_layer.parametrizations.weight.original1": "last_layer.weight_v",
}


@dataclasses.dataclass
class OfficialDINOLoad:
    """What :func:`load_official_pretraining` did: the checkpoint's epoch (or None), whether the
    loss centre was loaded, and official key -> why it was not loaded."""

    epoch: Optional[int]
    center_loaded: bool
    ignored: dict[str, str]


def official_head_state(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DINO head entries of a flat official dict (prefixes removed), keyed for :class:`DINOHead`."""
    head = {}
    for key, value in flat.items():
        if key.startswith("head."):
            name = key[len("head.") :]
            head[_PARAMETRIZED_WEIGHT_NORM.get(name, name)] = value
    return head


def load_official_pretraining(
    student: MultiCropModel,
    teacher: MultiCropModel,
    checkpoint: Union[Mapping, str, os.PathLike],
    loss: Optional[DINOLoss] = None,
    *,
    unsafe_pickle: bool = False,
) -> OfficialDINOLoad:
    """Load an original LAFS pretraining checkpoint into our student and teacher (and loss centre).

    ``student`` / ``teacher``: :class:`MultiCropModel` with a ``PartTransformer`` backbone and a
    ``DINOHead`` of the checkpoint's sizes.  ``checkpoint``: the loaded dict, or the file, read by
    :func:`lafs.models.safe_load.load_checkpoint` (its ``args`` Namespace and NumPy scalars load;
    anything that would run code is refused unless ``unsafe_pickle=True``).  Every part is loaded
    strictly: a missing, unexpected or differently shaped key raises ``IncompatibleCheckpointError``
    naming them all.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_checkpoint(checkpoint, unsafe_pickle=unsafe_pickle)
    if not isinstance(checkpoint, Mapping):
        raise IncompatibleCheckpointError(f"not a LAFS pretraining checkpoint: a {type(checkpoint).__name__}")
    for which in ("student", "teacher"):
        if which not in checkpoint or not isinstance(checkpoint[which], Mapping):
            raise IncompatibleCheckpointError(
                f"not a LAFS pretraining checkpoint: no {which!r} state dict "
                f"(top-level keys: {sorted(checkpoint)[:12]})"
            )
    ignored: dict[str, str] = {}
    for which, model in (("student", student), ("teacher", teacher)):
        result = load_official_state_dict(model.backbone, checkpoint, which=which)
        ignored.update({f"{which}.{k}": why for k, why in result.ignored.items() if not k.startswith("head.")})
        if result.classifier_weight is not None:
            ignored[f"{which}.loss.weight"] = "CosFace class centres of the backbone (unused in pretraining)"
        _load_head(model.head, official_head_state(unwrap_official(checkpoint, which)), which)

    center_loaded = False
    loss_state = checkpoint.get("dino_loss")
    center = loss_state.get("center") if isinstance(loss_state, Mapping) else None
    if loss is not None and center is not None:
        if center.shape != loss.center.shape:
            raise IncompatibleCheckpointError(
                f"dino_loss.center has shape {tuple(center.shape)}, the loss expects {tuple(loss.center.shape)}"
            )
        loss.center.copy_(center)
        center_loaded = True
    for key in ("optimizer", "fp16_scaler"):
        if key in checkpoint:
            ignored[key] = "training state of the original run (its parameter order differs; not transferable)"
    epoch = checkpoint.get("epoch")
    epoch = int(epoch) if epoch is not None else None
    return OfficialDINOLoad(epoch=epoch, center_loaded=center_loaded, ignored=ignored)


def _load_head(head: nn.Module, state: dict[str, torch.Tensor], which: str) -> None:
    if not state:
        raise IncompatibleCheckpointError(f"the checkpoint's {which} has no DINO head (no 'head.*' keys)")
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise IncompatibleCheckpointError(
            f"the checkpoint's {which} DINO head does not fit this DINOHead: {err}"
        ) from None
