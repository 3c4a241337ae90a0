"""Schedules of DINO pretraining, as arrays indexed by global step (or by epoch).

The learning rate, weight decay and teacher momentum change every iteration:
``cosine_schedule`` returns one value per global step, optionally preceded by a
linear warmup.  The teacher temperature changes once per epoch: a linear warmup
over the first epochs, then constant (``teacher_temp_schedule``).
"""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: float = 0,
    start_warmup: float = 0.0,
) -> np.ndarray:
    """Per-iteration values: linear warmup ``start_warmup -> base``, then cosine ``base -> final``.

    Returns a float64 array of length ``epochs * iters_per_epoch``; entry ``i`` is the
    value for global step ``i``.  The warmup lasts ``round(warmup_epochs * iters_per_epoch)``
    steps (``warmup_epochs`` may be fractional, useful for short runs); its last step
    reaches ``base``.  The cosine part starts at ``base`` and approaches ``final``
    (reached half a step after the end, as in DINO).
    """
    if epochs < 1 or iters_per_epoch < 1:
        raise ValueError(f"cosine_schedule needs epochs >= 1 and iters_per_epoch >= 1, got {epochs}, {iters_per_epoch}")
    total = epochs * iters_per_epoch
    warmup_iters = int(round(warmup_epochs * iters_per_epoch))
    if not 0 <= warmup_iters <= total:
        raise ValueError(
            f"warmup of {warmup_epochs} epochs ({warmup_iters} steps) does not fit in {epochs} epochs ({total} steps)"
        )
    warmup = np.linspace(start_warmup, base, warmup_iters)
    steps = np.arange(total - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate((warmup, cosine))


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: ``linspace(warmup_temp, temp, warmup_epochs)``, then ``temp``.

    Returns ``epochs`` values.  When the warmup is longer than the run, the run
    stops part way up the warmup (the temperature never reaches ``temp``).
    """
    if epochs < 1 or warmup_epochs < 0:
        raise ValueError(
            f"teacher_temp_schedule needs epochs >= 1 and warmup_epochs >= 0, got {epochs}, {warmup_epochs}"
        )
    warmup = np.linspace(warmup_temp, temp, warmup_epochs)
    constant = np.full(max(epochs - warmup_epochs, 0), temp, dtype=np.float64)
    return np.concatenate((warmup, constant))[:epochs]
