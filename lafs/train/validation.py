"""Periodic verification of a training stage on its held-out pairs."""

from __future__ import annotations

from typing import Optional

import torch

from .data import ValSet


def verify_sets(
    model: torch.nn.Module,
    val_sets: list[ValSet],
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
) -> dict:
    """``{"accuracy": mean over the sets, "acc_<name>": each set's 10-fold flip-test accuracy}``."""
    from lafs.eval.verification import verify_model

    results = {}
    for val_set in val_sets:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            result = verify_model(
                model,
                val_set.images,
                val_set.issame,
                batch_size=batch_size,
                device=device,
                pair_index=val_set.pair_index,
            )
        results[val_set.name] = result["accuracy"]
    return {"accuracy": sum(results.values()) / len(results), **{f"acc_{k}": v for k, v in results.items()}}
