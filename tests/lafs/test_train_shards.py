"""Class-centre shards in checkpoints: resharding N -> M -> N exactly, centres independent of the split."""

import pytest
import torch

from lafs.train.heads import init_class_centres
from lafs.train.shards import class_range, remove_stale, reshard, shard_file

ROWS = {"state": ["loss.weight"], "optimizer": ["loss.weight"]}


def shards_of(whole: dict, world: int) -> list[dict]:
    num_classes = whole["weight"].shape[0]
    out = []
    for rank in range(world):
        start, count = class_range(num_classes, rank, world)
        rows = slice(start, start + count)
        out.append(
            {
                "rank": rank,
                "world_size": world,
                "class_start": start,
                "num_classes": num_classes,
                "state": {"loss.weight": whole["weight"][rows].clone()},
                "optimizer": {
                    "loss.weight": {
                        "step": whole["step"],
                        "exp_avg": whole["exp_avg"][rows].clone(),
                        "exp_avg_sq": whole["exp_avg_sq"][rows].clone(),
                    }
                },
            }
        )
    return out


@pytest.mark.parametrize("before,after", [(2, 1), (1, 3), (3, 2), (4, 4)])
def test_reshard_moves_rows_exactly(rng, before, after):
    whole = {
        "weight": torch.randn(11, 5, generator=rng),
        "exp_avg": torch.randn(11, 5, generator=rng),
        "exp_avg_sq": torch.rand(11, 5, generator=rng),
        "step": torch.tensor(7.0),
    }
    moved = reshard(shards_of(whole, before), after, ROWS)
    expected = shards_of(whole, after)
    assert len(moved) == after
    for got, want in zip(moved, expected):
        assert (got["rank"], got["world_size"], got["class_start"]) == (want["rank"], after, want["class_start"])
        assert torch.equal(got["state"]["loss.weight"], want["state"]["loss.weight"])
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(got["optimizer"]["loss.weight"][key], want["optimizer"]["loss.weight"][key]), key
    back = reshard(moved, before, ROWS)
    assert all(
        torch.equal(b["state"]["loss.weight"], s["state"]["loss.weight"])
        for b, s in zip(back, shards_of(whole, before))
    )


def test_reshard_refuses_shards_that_do_not_cover_the_classes(rng):
    whole = {
        "weight": torch.randn(6, 3, generator=rng),
        "exp_avg": torch.zeros(6, 3),
        "exp_avg_sq": torch.zeros(6, 3),
        "step": torch.tensor(1.0),
    }
    parts = shards_of(whole, 2)[:1]  # one of two shards
    with pytest.raises(ValueError, match="3 class rows"):
        reshard(parts, 1, ROWS)


def test_centres_do_not_depend_on_the_split():
    from lafs.train import heads

    whole = init_class_centres(10_000, 8, 0, 10_000, seed=5)
    bound = (6 / (10_000 + 8)) ** 0.5
    assert whole.shape == (10_000, 8) and whole.abs().max() <= bound and whole.std() > bound / 2
    for world in (2, 3, 7):
        parts = [init_class_centres(10_000, 8, *class_range(10_000, r, world), seed=5) for r in range(world)]
        assert torch.equal(torch.cat(parts), whole)
    assert heads.CENTRE_BLOCK < 10_000  # the rows above cross block boundaries
    assert not torch.equal(init_class_centres(10_000, 8, 0, 10_000, seed=6), whole)


def test_remove_stale_keeps_named_steps(tmp_path):
    for step in (3, 6, 9):
        for rank in range(2):
            (tmp_path / shard_file(step, rank, 2)).write_bytes(b"")
    (tmp_path / "last.pt").write_bytes(b"")
    remove_stale(tmp_path, [9, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["last.pt"] + [shard_file(s, r, 2) for s in (3, 9) for r in range(2)]
    )
