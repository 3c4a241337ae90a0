"""Frozen inference copies of the landmark CNN: batch norms folded into convolutions, channels_last."""

import pytest
import torch
from torch import nn

from lafs.models import LandmarkCNN
from lafs.ssl.frozen import fold_batch_norms, frozen_copy

from tolerances import assert_close


def trained_looking_cnn(rng) -> LandmarkCNN:
    """A small landmark CNN with random batch-norm statistics and a random head (a fresh one predicts a fixed grid)."""
    cnn = LandmarkCNN(num_landmarks=9, image_size=32, blocks="tiny")
    with torch.no_grad():
        for module in cnn.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=rng) * 0.3)
                module.running_var.copy_(torch.rand(module.num_features, generator=rng) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=rng) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=rng) * 0.2)
        head = cnn.output_layer[1]
        head.weight.copy_(torch.randn(head.weight.shape, generator=rng))
    return cnn.eval()


def test_folding_keeps_the_function_and_leaves_no_batch_norm(rng):
    cnn = trained_looking_cnn(rng)
    images = torch.rand(4, 3, 32, 32, generator=rng) * 2 - 1
    with torch.no_grad():
        expected_features = cnn.features(images)
        expected = cnn(images)
    folded = frozen_copy(cnn, fast=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in cnn.modules()) == 16  # the stem's and 3 per block
    with torch.no_grad():
        features = folded.features(images.contiguous(memory_format=torch.channels_last))
        landmarks = folded(images.contiguous(memory_format=torch.channels_last))
        assert_close(folded(images), landmarks)  # NCHW input works too
    assert_close(features, expected_features, scale=10)  # the folded weights round differently
    assert_close(landmarks, expected, scale=10)
    assert features.is_contiguous(memory_format=torch.channels_last)


def test_frozen_copy_is_eval_without_gradients_and_the_original_is_untouched(rng):
    cnn = trained_looking_cnn(rng).train()
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    for fast in (False, True):
        frozen = frozen_copy(cnn, fast=fast)
        assert not frozen.training and not any(m.training for m in frozen.modules())
        assert not any(p.requires_grad for p in frozen.parameters())
    assert cnn.training and all(p.requires_grad for p in cnn.parameters())
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in frozen_copy(cnn).modules())  # fast=False keeps them


def test_folding_a_module_in_training_mode_is_refused(rng):
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


def test_only_conv_then_batch_norm_pairs_fold():
    model = nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    ).eval()
    assert fold_batch_norms(model) == 1
    assert [type(m).__name__ for m in model] == ["BatchNorm2d", "Conv2d", "ReLU", "BatchNorm2d", "Conv2d", "Identity"]
