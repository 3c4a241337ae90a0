"""Training and verification data of a stage, built from its config (errors before training starts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import Config, ConfigError


def build_train_set(cfg: Config, *, few_shot: bool = True):
    """The training set of ``cfg.data`` (with the few-shot subset applied when configured)."""
    data = cfg.data
    if data.source == "synthetic":
        from lafs.data import SyntheticFaces

        dataset = SyntheticFaces(
            data.synthetic.identities,
            data.synthetic.images_per_identity,
            seed=cfg.seed,
            difficulty=data.synthetic.difficulty,
            cache=True,
            difficulty_warmup_epochs=data.synthetic.difficulty_warmup_epochs,
            colours=data.synthetic.colours,
            pose_difficulty=data.synthetic.pose_difficulty,
        )
    elif data.source == "rec":
        from lafs.data import FaceRecordDataset

        try:
            dataset = FaceRecordDataset(data.root, color=data.color)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data.root {data.root!r}: cannot read the .rec set: {exc}") from exc
    else:
        from lafs.data import ImageFolderFaces

        try:
            dataset = ImageFolderFaces(data.root)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data.root {data.root!r}: cannot read the image folder: {exc}") from exc
    if len(dataset) == 0:
        raise ConfigError(f"the training set ({data.source}, root {data.root!r}) holds no images")
    shots = data.few_shot.images_per_identity
    if few_shot and (shots is not None or data.few_shot.identity_fraction < 1.0):
        from lafs.data import few_shot_subset

        keep_all = int(np.bincount(np.asarray(dataset.labels)).max())
        try:
            dataset = few_shot_subset(
                dataset,
                images_per_identity=shots or keep_all,
                identity_fraction=data.few_shot.identity_fraction,
                seed=cfg.seed,
            )
        except ValueError as exc:
            raise ConfigError(f"data.few_shot: {exc}") from exc
        if len(dataset) == 0:
            raise ConfigError("the few-shot subset is empty: raise data.few_shot.identity_fraction")
    check_dataset_labels(
        dataset.labels, int(dataset.num_classes), f"the training set ({data.source}, root {data.root!r})"
    )
    return dataset


def check_dataset_labels(labels, num_classes: int, name: str) -> None:
    """Every label in ``[0, num_classes)``, checked once on the host: the margin heads then skip the
    check of each step (``check_labels=False``, one device sync less per step on GPUs)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ConfigError(
            f"{name}: {bad.size} label(s) outside [0, {num_classes}), e.g. {int(bad[0])}: the data set's class count "
            "and its labels disagree"
        )


@dataclass
class ValSet:
    """Verification pairs of one set: pair ``i`` is ``images[2i], images[2i+1]`` (a ``.bin`` file), or
    with ``pair_index`` (int64 ``[2N]``) ``images[pair_index[2i]], images[pair_index[2i+1]]``
    (held-out synthetic faces, each image embedded once).

    images: float ``[M,3,112,112]`` in [-1, 1] or uint8 ``[M,112,112,3]``; issame: bool ``[N]``.
    """

    name: str
    images: object
    issame: np.ndarray
    pair_index: Optional[np.ndarray] = None

    def sample_images(self, count: int = 8):
        """``count`` images spread evenly over the set (different identities, for pictures)."""
        step = max(1, len(self.images) // count)
        return self.images[::step][:count]


def build_val_sets(cfg: Config) -> list[ValSet]:
    """The .bin files of ``val.bins`` or, without them, pairs of held-out synthetic identities
    (never trained on)."""
    val = cfg.val
    if val.bins:
        from lafs.eval.verification import load_bin

        sets = []
        for path in val.bins:
            try:
                images, issame = load_bin(path)
            except Exception as exc:
                raise ConfigError(f"val.bins: cannot read {path}: {exc}") from exc
            sets.append(ValSet(Path(path).stem, images, np.asarray(issame, dtype=bool)))
        return sets
    from lafs.data import SyntheticFaces, verification_pair_index

    held_out = SyntheticFaces(
        val.synthetic_identities,
        val.synthetic_images_per_identity,
        seed=cfg.seed,
        identity_offset=_held_out_offset(cfg),
        difficulty=cfg.data.synthetic.difficulty,
        colours=cfg.data.synthetic.colours,
        pose_difficulty=cfg.data.synthetic.pose_difficulty,
    )
    index, issame = verification_pair_index(held_out, val.pairs, seed=cfg.seed)
    used = np.unique(index)
    images = torch.stack([held_out[int(i)][0] for i in used])
    return [ValSet("synthetic_held_out", images, issame, np.searchsorted(used, index))]


def _held_out_offset(cfg: Config) -> int:
    """First held-out identity: after the training identities of a synthetic set (a margin for any size)."""
    if cfg.data.source == "synthetic":
        return cfg.data.synthetic.identities
    return 1_000_000
