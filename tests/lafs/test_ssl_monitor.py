"""View retrieval, the label-free pretraining check: probe views and the retrieval accuracy."""

import pytest
import torch
from torch import nn

from lafs.models import LandmarkCNN
from lafs.ssl import MultiViewBuilder
from lafs.ssl.monitor import probe_views, view_retrieval_accuracy
from lafs.ssl.views import ViewGroup

L, SIZE, P = 16, 32, 4


def builder(global_views=2) -> MultiViewBuilder:
    cnn = LandmarkCNN(num_landmarks=L, image_size=SIZE, blocks="tiny")
    return MultiViewBuilder(
        cnn, patch_size=P, global_views=global_views, local_views=2, local_tokens=5, image_size=SIZE
    )


class MeanToken(nn.Module):
    """Backbone stand-in: the mean token (``[rows, F]``), which records its mode at each call."""

    def __init__(self):
        super().__init__()
        self.modes = []

    def forward(self, tokens, index):
        self.modes.append(self.training)
        return tokens.mean(dim=1)


def test_probe_is_reproducible_and_leaves_the_builder_alone(rng):
    images = torch.rand(5, 3, 40, 40, generator=rng) * 2 - 1
    views = builder(global_views=3).eval()
    state = views.generator.get_state()
    first, again = probe_views(views, images, seed=3), probe_views(views, images, seed=3)
    assert first.tokens.shape == (10, L, P * P * 3) and first.index.shape == (10, L)
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, probe_views(views, images, seed=4).tokens)
    assert not torch.equal(first.tokens[:5], first.tokens[5:]), "the two views should differ (augmentation on)"
    assert torch.equal(views.generator.get_state(), state), "the builder's own generator must not advance"
    assert not views.training
    with pytest.raises(ValueError, match="two global views"):
        probe_views(builder(global_views=1), images, seed=0)


def test_retrieval_is_one_for_identical_views_and_chance_for_a_constant_backbone(rng):
    n = 8
    tokens = torch.randn(n, L, 12, generator=rng)
    index = torch.arange(L).expand(2 * n, L)
    same = ViewGroup(torch.cat([tokens, tokens]), index)
    backbone = MeanToken().train()
    assert view_retrieval_accuracy(backbone, same, batch_size=5) == 1.0
    assert backbone.modes and not any(backbone.modes) and backbone.training, "eval inside, mode restored"
    # Second views shifted by one image: every first view finds the wrong image.
    shifted = ViewGroup(torch.cat([tokens, tokens.roll(1, dims=0)]), index)
    assert view_retrieval_accuracy(MeanToken(), shifted) == 0.0
    constant = ViewGroup(torch.ones(2 * n, L, 12), index)  # all ties: argmax picks image 0 for everyone
    assert view_retrieval_accuracy(MeanToken(), constant) == pytest.approx(1 / n)
    with pytest.raises(ValueError, match="two views"):
        view_retrieval_accuracy(MeanToken(), ViewGroup(tokens[:3], index[:3]))
