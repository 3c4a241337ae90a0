"""Move class-centre shards (Partial FC) from N ranks to M ranks.

Rank r of W holds the rows ``[class_start, class_start + num_local)`` of the whole head, with
arcface_torch's split: ``num_local = C // W + (r < C % W)``, ``class_start = C // W * r + min(r, C % W)``
(:func:`lafs_kernels.ops.margin_sharded.class_range`).  Resharding concatenates the shards in rank
order and splits them again for the new world size; any tensor whose rows follow the classes
(the centres, an optimizer's momentum or Adam moments of them) reshards the same way.

Command, for arcface_torch's per-rank files (each a ``PartialFC_V2`` / ``PartialFC`` state dict,
``{"weight": [num_local, D]}``)::

    python -m lafs_kernels.reshard run/softmax_fc_gpu_*.pt --world-size 4 --out run4/

writes ``run4/softmax_fc_gpu_{rank}.pt`` for ranks 0..3.  Files are read with
``torch.load(weights_only=True)`` (no code runs) and written atomically.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Sequence

import torch

from .ops.margin_sharded import class_range


def shard_sizes(num_classes: int, world_size: int) -> list[int]:
    """num_local of every rank, in rank order."""
    return [class_range(num_classes, world_size, rank)[1] for rank in range(world_size)]


def reshard_centres(shards: Sequence[torch.Tensor], world_size: int) -> list[torch.Tensor]:
    """Shards [num_local_r, ...] of N ranks (rank order) -> shards of ``world_size`` ranks.

    The input shards must follow arcface_torch's split of ``C = sum of their rows`` over N ranks; the
    output follows it over ``world_size``.  Values are copied bit for bit (new, contiguous tensors), so
    N -> M -> N gives back the inputs exactly.  Use it for the centres and for every optimizer-state
    tensor of the same rows (momentum, Adam moments).
    """
    if not shards:
        raise ValueError("reshard_centres: no shards given")
    if world_size < 1:
        raise ValueError(f"reshard_centres: world_size must be >= 1; got {world_size}")
    tail = shards[0].shape[1:]
    for rank, shard in enumerate(shards):
        if shard.dim() < 1 or shard.shape[1:] != tail or shard.dtype != shards[0].dtype:
            raise ValueError(
                f"reshard_centres: shard {rank} is {tuple(shard.shape)} {shard.dtype}, shard 0 is "
                f"{tuple(shards[0].shape)} {shards[0].dtype}: shards must differ only in their number of rows"
            )
    num_classes = sum(shard.shape[0] for shard in shards)
    expected = shard_sizes(num_classes, len(shards))
    got = [shard.shape[0] for shard in shards]
    if got != expected:
        raise ValueError(
            f"reshard_centres: {len(shards)} shards of {got} rows are not the split of {num_classes} classes over "
            f"{len(shards)} ranks ({expected}); are they in rank order and complete?"
        )
    whole = torch.cat(list(shards))
    return [part.clone() for part in torch.split(whole, shard_sizes(num_classes, world_size))]


def _rank_of(path: str):
    match = re.search(r"_(\d+)\.pt$", os.path.basename(path))
    return int(match.group(1)) if match else None


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def reshard_files(
    paths: Sequence[str], world_size: int, out_dir: str, key: str = "weight", prefix: str = "softmax_fc_gpu_"
) -> list[str]:
    """Read the per-rank state dicts ``paths`` (ordered by the rank number in their names when every name
    ends in ``_{rank}.pt``, else as given), reshard ``key`` and write ``out_dir/{prefix}{rank}.pt``."""
    ranks = [_rank_of(p) for p in paths]
    if all(r is not None for r in ranks):
        if sorted(ranks) != list(range(len(paths))):
            raise ValueError(f"reshard: the files' ranks are {sorted(ranks)}; expected 0..{len(paths) - 1}, each once")
        paths = [p for _, p in sorted(zip(ranks, paths))]
    shards = []
    for path in paths:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or key not in state:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"reshard: {path} is not a state dict with {key!r} (found {found})")
        others = sorted(set(state) - {key})
        if others:
            raise ValueError(f"reshard: {path} holds {others} besides {key!r}; only {key!r} is resharded")
        shards.append(state[key])
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for rank, shard in enumerate(reshard_centres(shards, world_size)):
        path = os.path.join(out_dir, f"{prefix}{rank}.pt")
        _atomic_save({key: shard}, path)
        written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lafs_kernels.reshard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", help="every rank's softmax_fc_gpu_{rank}.pt")
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks to reshard to")
    parser.add_argument("--out", required=True, help="folder for the new softmax_fc_gpu_{rank}.pt files")
    parser.add_argument("--key", default="weight", help="the state dict's entry to reshard (default: weight)")
    args = parser.parse_args(argv)
    try:
        written = reshard_files(args.files, args.world_size, args.out, key=args.key)
    except (ValueError, OSError) as exc:
        sys.exit(f"reshard: {exc}")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
