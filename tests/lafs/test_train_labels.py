"""Training labels are checked once, against the data set's class count; the margin heads then skip the
check of every step (a host sync per step on GPUs)."""

import numpy as np
import pytest
import torch

from lafs.train import config as cfgmod
from lafs.train.config import ConfigError
from lafs.train.data import build_train_set, check_dataset_labels
from lafs.train.distributed import Distributed
from lafs.train.heads import build_margin_head


def tiny_supervised(*overrides):
    tree = cfgmod.demo_stage_tree(cfgmod.load_recipe("tiny"), "supervised")
    return cfgmod.resolve_stage("supervised", cfgmod.apply_overrides(tree, cfgmod.parse_overrides(list(overrides))))


def test_labels_outside_the_class_count_name_the_set_the_count_and_a_label():
    check_dataset_labels(np.array([0, 4, 2]), 5, "set A")
    with pytest.raises(ConfigError, match=r"set B: 2 label\(s\) outside \[0, 5\), e\.g\. 5"):
        check_dataset_labels(np.array([0, 5, 2, 7]), 5, "set B")
    with pytest.raises(ConfigError, match=r"set C: 1 label\(s\) outside \[0, 3\), e\.g\. -1"):
        check_dataset_labels(np.array([-1, 0]), 3, "set C")


def test_training_set_labels_are_checked_when_it_is_built(monkeypatch):
    """A data set whose labels go past its class count stops the stage before any step."""
    import lafs.data

    class OneClassShort(lafs.data.SyntheticFaces):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_classes -= 1

    monkeypatch.setattr(lafs.data, "SyntheticFaces", OneClassShort)
    with pytest.raises(ConfigError, match=r"the training set \(synthetic.*label\(s\) outside"):
        build_train_set(tiny_supervised())


@pytest.mark.parametrize("loss", ["cosface", "arcface"])
def test_training_heads_skip_the_per_step_check_and_compute_the_checked_loss(rng, loss):
    cfg = tiny_supervised(f"loss.type={loss}")
    head = build_margin_head(cfg, 8, 20, Distributed())
    assert head.loss.check_labels is False
    x = torch.randn(6, 8, generator=rng)
    labels = torch.randint(0, 20, (6,), generator=rng)
    checked = type(head.loss)(8, 20, s=cfg.loss.s, m=cfg.loss.m)
    checked.load_state_dict(head.loss.state_dict())
    assert torch.equal(head(x, labels)[0], checked(x, labels))
