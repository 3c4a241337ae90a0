"""Resharding class centres (and their optimizer state) between world sizes: a pure function on tensors."""

import pytest
import torch

from lafs_kernels.ops.margin_sharded import class_range
from lafs_kernels.reshard import main, reshard_centres, shard_sizes


def split(whole, world):
    """The shards of ``whole`` [C, ...] as arcface_torch's ranks hold them (class_start, num_local per rank)."""
    ranges = (class_range(whole.shape[0], world, rank) for rank in range(world))
    return [whole[start : start + count] for start, count in ranges]


def test_shard_sizes_follow_arcface_torch():
    assert shard_sizes(41, 2) == [21, 20]
    assert shard_sizes(205_990, 8) == [25_749] * 6 + [25_748] * 2
    assert [class_range(10, 4, r) for r in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]


@pytest.mark.parametrize("n, m", [(2, 3), (3, 1), (1, 4), (4, 3), (8, 5)])
def test_round_trip_is_bit_exact(rng, n, m):
    centres = torch.randn(103, 16, generator=rng)
    momentum = torch.randn(103, 16, generator=rng, dtype=torch.float64)
    for whole in (centres, momentum):
        there = reshard_centres(split(whole, n), m)
        assert [s.shape[0] for s in there] == shard_sizes(103, m)
        for got, want in zip(there, split(whole, m)):
            assert torch.equal(got, want) and got.dtype == whole.dtype
        back = reshard_centres(there, n)
        for got, want in zip(back, split(whole, n)):
            assert torch.equal(got, want)


def test_shards_out_of_order_or_of_other_shapes_are_refused(rng):
    shards = split(torch.randn(41, 4, generator=rng), 3)  # 14, 14, 13 rows
    with pytest.raises(ValueError, match="not the split of 41 classes over 3 ranks"):
        reshard_centres([shards[2], shards[0], shards[1]], 2)
    with pytest.raises(ValueError, match="differ only in their number of rows"):
        reshard_centres([shards[0], shards[1][:, :2], shards[2]], 2)


def test_command_reshards_softmax_fc_files(rng, tmp_path, capsys):
    whole = torch.randn(41, 8, generator=rng)
    for rank, shard in enumerate(split(whole, 2)):
        torch.save({"weight": shard.clone()}, tmp_path / f"softmax_fc_gpu_{rank}.pt")
    files = [str(tmp_path / f"softmax_fc_gpu_{r}.pt") for r in (1, 0)]  # any order: ranks come from the names
    main([*files, "--world-size", "3", "--out", str(tmp_path / "three")])
    assert len(capsys.readouterr().out.split()) == 3
    for rank, want in enumerate(split(whole, 3)):
        state = torch.load(tmp_path / "three" / f"softmax_fc_gpu_{rank}.pt", weights_only=True)
        assert list(state) == ["weight"] and torch.equal(state["weight"], want)
    torch.save({"weight": whole[:5], "bias": torch.zeros(5)}, tmp_path / "odd_0.pt")
    with pytest.raises(SystemExit, match="besides 'weight'"):
        main([str(tmp_path / "odd_0.pt"), "--world-size", "2", "--out", str(tmp_path / "x")])
