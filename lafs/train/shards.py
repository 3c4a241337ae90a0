"""Class-centre shards in training checkpoints: every process's part saved, restored, resharded.

With several processes the margin head is ``lafs_kernels.nn.PartialFC``: process r of N holds
the centres of classes ``[start_r, start_r + n_r)`` (arcface_torch's split: the first
``C % N`` processes one class more) and the AdamW state of those rows. A checkpoint
(``checkpoints/last.pt``, written by the main process) keeps the replicated part of the run
and, under ``"head"``, where the shards are::

    {"num_classes": C, "world_size": N, "shards": [shard]}          # one process: inline
    {"num_classes": C, "world_size": N, "files": [name_0, ...]}     # N processes: one file each

A shard (a plain dict of tensors, loadable with ``torch.load(weights_only=True)``) is
``{"rank", "world_size", "class_start", "num_classes", "state": head.state_dict(),
"optimizer": {param name: AdamW state of that parameter}}``. Each process writes its own file
``head-step<step>-rank<r>of<N>.pt`` (atomically) before the main process writes ``last.pt``,
which names them: ``last.pt`` is the commit point, so a crash leaves the previous complete
checkpoint. Files no checkpoint names any more are removed afterwards.

Resuming on M != N processes reshards the rows (centres and their optimizer rows) with
``lafs_kernels.reshard.reshard_centres``; one process holds all classes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from lafs.models.checkpoint import atomic_save
from lafs.models.safe_load import load_checkpoint
from lafs_kernels.ops.margin_sharded import class_range as _class_range
from lafs_kernels.reshard import reshard_centres

SHARD_FILE = "head-step{step:07d}-rank{rank}of{world}.pt"
_SHARD_RE = re.compile(r"head-step(\d+)-rank(\d+)of(\d+)\.pt$")


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(class_start, num_local) of ``rank``: arcface_torch's split, as ``PartialFC`` builds it."""
    return _class_range(num_classes, world_size, rank)


def shard_file(step: int, rank: int, world_size: int) -> str:
    return SHARD_FILE.format(step=step, rank=rank, world=world_size)


def save_shard(checkpoints: Path, step: int, shard: dict) -> str:
    """Write this process's shard atomically; returns its file name (relative to ``checkpoints``)."""
    name = shard_file(step, shard["rank"], shard["world_size"])
    atomic_save(shard, Path(checkpoints) / name)
    return name


def load_shards(checkpoints: Path, head: dict) -> list[dict]:
    """The shards a checkpoint's ``"head"`` entry names, in rank order."""
    if "shards" in head:
        return list(head["shards"])
    shards = []
    for name in head["files"]:
        if not isinstance(name, str) or not _SHARD_RE.fullmatch(name):
            raise ValueError(
                f"{checkpoints}: the checkpoint names a class-centre shard {name!r}, not a shard file name"
            )
        path = Path(checkpoints) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: a class-centre shard that the checkpoint names is missing")
        shards.append(load_checkpoint(path))  # no code runs; --unsafe-pickle applies as to every checkpoint
    return shards


def remove_stale(checkpoints: Path, keep_steps: Sequence[int]) -> None:
    """Delete shard files of steps no checkpoint names any more."""
    keep = {int(s) for s in keep_steps}
    for path in Path(checkpoints).glob("head-step*-rank*of*.pt"):
        match = _SHARD_RE.match(path.name)
        if match and int(match.group(1)) not in keep:
            path.unlink(missing_ok=True)


def reshard(shards: Sequence[dict], world_size: int, row_keys: dict) -> list[dict]:
    """The same class centres split for ``world_size`` processes.

    ``row_keys``: ``{"state": [keys of head.state_dict() with one row per class], "optimizer":
    [param names whose optimizer state tensors (ndim >= 1) have one row per class]}``; every
    other entry (e.g. AdamW's ``step``) is the same on every process and is taken from shard 0.
    """
    num_classes = int(shards[0]["num_classes"])
    order = sorted(shards, key=lambda s: int(s["rank"]))

    def split(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        rows = sum(t.shape[0] for t in tensors)
        if rows != num_classes:
            raise ValueError(f"the shards hold {rows} class rows, the checkpoint says {num_classes}")
        return reshard_centres(tensors, world_size)

    out = [
        {
            "rank": r,
            "world_size": world_size,
            "class_start": class_range(num_classes, r, world_size)[0],
            "num_classes": num_classes,
            "state": dict(order[0]["state"]),
            "optimizer": {name: dict(entry) for name, entry in order[0]["optimizer"].items()},
        }
        for r in range(world_size)
    ]
    for key in row_keys["state"]:
        for shard, part in zip(out, split([s["state"][key] for s in order])):
            shard["state"][key] = part
    for name in row_keys["optimizer"]:
        if name not in order[0]["optimizer"]:
            continue  # no optimizer state yet (checkpoint before the first step)
        for field, value in order[0]["optimizer"][name].items():
            if torch.is_tensor(value) and value.dim() >= 1:
                for shard, part in zip(out, split([s["optimizer"][name][field] for s in order])):
                    shard["optimizer"][name][field] = part
    return out
