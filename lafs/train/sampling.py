"""Resumable data order: which images each optimizer step sees, as a function of (seed, epoch, position).

The data order is a function of (seed, epoch) and each item's augmentation a function of
(seed, epoch, index), so a run resumed at any step draws the same images, augmented alike.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


class ResumableBatchSampler(Sampler):
    """Batches of ``(index, epoch)`` from a ``DistributedSampler``, starting at batch ``start``.

    The epoch rides along with each index so that a dataset can seed its
    augmentation from (seed, epoch, index), which keeps a resumed run identical.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int):
        self.sampler = sampler
        self.batch_size = batch_size
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        indices = list(self.sampler)
        for b in range(self.start, len(self)):
            yield [(i, self.epoch) for i in indices[b * self.batch_size : (b + 1) * self.batch_size]]


class SeededItems(Dataset):
    """``dataset[i]`` passed through ``transform`` with the RNG seeded from (seed, epoch, i).

    ``transform(image [3,112,112]) -> image`` may use torch's global RNG
    (torchvision.transforms.v2 does); the caller's RNG state is left untouched.
    """

    def __init__(self, dataset, seed: int, transform=None):
        self.dataset = dataset
        self.seed = seed
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        # Data sets with a per-epoch curriculum (SyntheticFaces.item_at) see the epoch too.
        item_at = getattr(self.dataset, "item_at", None)
        image, label = item_at(index, epoch) if item_at is not None else self.dataset[index]
        if self.transform is None:
            return image, label
        with torch.random.fork_rng(devices=[]):
            # Reduced to int64 (manual_seed overflows beyond 2**64): the same seeds as before wherever they fitted.
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63)
            return self.transform(image), label


def micro_batches(loader, batch_sampler: ResumableBatchSampler, micro_per_epoch: int, start: int) -> Iterator:
    """Endless micro-batches from global micro-batch number ``start`` on."""
    micro = start
    while True:
        epoch, position = divmod(micro, micro_per_epoch)
        batch_sampler.set_position(epoch, position)
        for batch in loader:
            yield batch
            micro += 1
            if micro % micro_per_epoch == 0:
                break
