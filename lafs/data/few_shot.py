"""Few-shot subsets as the LAFS paper uses them: k images per identity for a fraction of the identities."""

import math

import numpy as np
import torch


class FewShotSubset(torch.utils.data.Dataset):
    """A subset of a face data set with contiguous labels 0..num_classes-1.

    Labels are remapped (fine-tuning heads need contiguous classes): new class
    ``c`` is original class ``identities[c]``; ``identities`` is sorted, so the
    remapping keeps the original order.  ``indices`` are the parent's items;
    ``original_labels`` their labels in the parent.
    """

    def __init__(self, dataset, indices: np.ndarray):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.original_labels = np.asarray(dataset.labels, dtype=np.int64)[self.indices]
        self.identities, self.labels = np.unique(self.original_labels, return_inverse=True)
        self.labels = self.labels.astype(np.int64)
        self.num_classes = len(self.identities)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, _ = self.dataset[int(self.indices[index])]
        return image, int(self.labels[index])

    def item_at(self, index: int, epoch: int):
        """Item ``index`` as training epoch ``epoch`` sees it, when the parent has a curriculum (``item_at``)."""
        item_at = getattr(self.dataset, "item_at", None)
        if item_at is None:
            return self[index]
        image, _ = item_at(int(self.indices[index]), epoch)
        return image, int(self.labels[index])


def few_shot_subset(dataset, images_per_identity: int, identity_fraction: float = 1.0, seed: int = 0) -> FewShotSubset:
    """Keep ``images_per_identity`` random images of each of ``round(identity_fraction * identities)``
    random identities (at least one); identities with fewer images keep all of them.

    ``dataset`` follows the data contract (``.labels``, ``dataset[i] -> (image, label)``).
    The choice depends only on the labels and ``seed``.
    """
    if images_per_identity < 1:
        raise ValueError(f"images_per_identity must be at least 1, got {images_per_identity}")
    if not 0.0 < identity_fraction <= 1.0:
        raise ValueError(f"identity_fraction must be in (0, 1], got {identity_fraction}")
    labels = np.asarray(dataset.labels, dtype=np.int64)
    if labels.size == 0:
        raise ValueError("cannot take a few-shot subset of an empty data set")
    order = np.argsort(labels, kind="stable")
    identities, starts = np.unique(labels[order], return_index=True)
    members = np.split(order, starts[1:])
    rng = np.random.default_rng(seed)
    count = max(1, min(len(identities), math.floor(identity_fraction * len(identities) + 0.5)))
    chosen = np.sort(rng.choice(len(identities), size=count, replace=False))
    kept = [rng.choice(members[i], size=min(images_per_identity, len(members[i])), replace=False) for i in chosen]
    return FewShotSubset(dataset, np.sort(np.concatenate(kept)))
