"""MultiViewBuilder: shapes, token counts, reproducibility, evaluation mode, one fused call per group,
the original (per-landmark grid_sample) path."""
import pytest
import torch
from torch import nn

import lafs.ssl.views as views_module
from lafs.models import LandmarkCNN
from lafs.ssl import MultiViewBuilder
from lafs_kernels import landmark_patch_gather

from tolerances import assert_close

L, SIZE, P = 16, 32, 4


def tiny_cnn() -> LandmarkCNN:
    return LandmarkCNN(num_landmarks=L, image_size=SIZE, blocks="tiny")


class FixedLandmarks(nn.Module):
    """Landmark 'CNN' that records its inputs and answers the same L points for every image."""

    def __init__(self, generator):
        super().__init__()
        self.points = torch.rand(L, 2, generator=generator) * (SIZE - 1)
        self.seen = []

    def forward(self, images):
        self.seen.append(images.clone())
        return self.points.expand(images.shape[0], L, 2)


def builder(cnn=None, **kw) -> MultiViewBuilder:
    options = dict(patch_size=P, global_views=2, local_views=2, local_tokens=5, image_size=SIZE)
    options.update(kw)
    return MultiViewBuilder(cnn if cnn is not None else tiny_cnn(), **options)


def test_groups_shapes_and_token_counts(rng):
    images = torch.rand(3, 3, 40, 40, generator=rng) * 2 - 1
    global_group, local_group = builder(local_views=3)(images, generator=rng)
    assert global_group.tokens.shape == (2 * 3, L, P * P * 3)
    assert torch.equal(global_group.index, torch.arange(L).expand(6, L))
    assert local_group.tokens.shape == (3 * 3, 5, P * P * 3)
    assert local_group.index.shape == (9, 5) and local_group.index.dtype == torch.int64
    assert local_group.index.min() >= 0 and local_group.index.max() < L
    assert torch.isfinite(global_group.tokens).all() and torch.isfinite(local_group.tokens).all()


def test_local_tokens_with_and_without_replacement(rng):
    images = torch.rand(2, 3, SIZE, SIZE, generator=rng) * 2 - 1
    _, with_replacement = builder(local_tokens=L + 4)(images, generator=rng)
    assert with_replacement.index.shape == (4, L + 4)  # more tokens than landmarks: repeats
    _, without = builder(local_tokens=L, replacement=False)(images, generator=rng)
    assert all(sorted(row.tolist()) == list(range(L)) for row in without.index)
    with pytest.raises(ValueError, match="without replacement"):
        builder(local_tokens=L + 1, replacement=False)(images, generator=rng)


def test_reproducible_from_a_seed(rng):
    images = torch.rand(2, 3, SIZE, SIZE, generator=rng) * 2 - 1
    b = builder()
    first = b(images, generator=torch.Generator().manual_seed(11))
    again = b(images, generator=torch.Generator().manual_seed(11))
    other = b(images, generator=torch.Generator().manual_seed(12))
    for g1, g2, g3 in zip(first, again, other):
        assert torch.equal(g1.tokens, g2.tokens) and torch.equal(g1.index, g2.index)
        assert not torch.equal(g1.tokens, g3.tokens)
    assert not torch.equal(first[1].index, other[1].index)


def test_the_builders_own_generator_advances_and_its_seed_reproduces(rng):
    images = torch.rand(2, 3, SIZE, SIZE, generator=rng) * 2 - 1
    cnn = tiny_cnn()
    a, b = builder(cnn, seed=3), builder(cnn, seed=3)
    first_a, first_b = a(images), b(images)
    assert torch.equal(first_a[1].tokens, first_b[1].tokens)
    assert not torch.equal(a(images)[1].tokens, first_a[1].tokens)


def test_jitter_moves_patches_only_when_on(rng):
    images = torch.rand(2, 3, SIZE, SIZE, generator=rng) * 2 - 1
    cnn = FixedLandmarks(rng)
    still = builder(cnn, jitter_std=0.0)(images, generator=torch.Generator().manual_seed(5))
    still_again = builder(cnn, jitter_std=0.0)(images, generator=torch.Generator().manual_seed(5))
    jittered = builder(cnn, jitter_std=5.0)(images, generator=torch.Generator().manual_seed(5))
    assert torch.equal(still[0].tokens, still_again[0].tokens)
    # Same global crops and colours (drawn before the jitter): only the patch centres differ.
    assert not torch.allclose(still[0].tokens, jittered[0].tokens)


def test_landmarks_come_from_the_plain_crop_and_patches_from_the_coloured_one(rng):
    colour = torch.tensor([0.3, -0.2, 0.5])
    images = colour.view(1, 3, 1, 1).expand(6, 3, SIZE, SIZE).contiguous()  # one flat colour
    views = builder(FixedLandmarks(rng), jitter_std=0.0)
    global_group, _ = views(images, generator=rng)
    cnn = views.landmark_cnn
    assert len(cnn.seen) == 2
    for seen in cnn.seen:  # a crop of a flat image is that flat colour, unless colour-augmented
        torch.testing.assert_close(seen, colour.view(1, 3, 1, 1).expand_as(seen), atol=1e-5, rtol=0)
    # Landmarks well inside the crop: a patch holds the view's (augmented) colour in every pixel.
    inside = ((cnn.points >= P) & (cnn.points <= SIZE - 1 - P)).all(dim=1)
    pixels = global_group.tokens[:, inside].reshape(12, -1, 3)
    changed = (pixels - colour).abs().amax(dim=(1, 2)) > 1e-3
    assert changed.any()


def test_evaluation_mode_has_no_augmentation(rng):
    images = torch.rand(3, 3, SIZE, SIZE, generator=rng) * 2 - 1
    cnn = tiny_cnn().eval()
    b = builder(cnn).eval()
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    (group,) = b(images, generator=generator)
    assert torch.equal(generator.get_state(), state)  # nothing random was drawn
    with torch.no_grad():
        expected = landmark_patch_gather(images, cnn(images), P)
    assert torch.equal(group.tokens, expected)
    assert torch.equal(group.index, torch.arange(L).expand(3, L))


def test_landmark_cnn_is_a_frozen_copy_in_eval_mode(rng):
    cnn = tiny_cnn().train()
    b = builder(cnn)
    b.train()
    assert b.training and not b.landmark_cnn.training
    assert not any(p.requires_grad for p in b.landmark_cnn.parameters())
    assert cnn.training and all(p.requires_grad for p in cnn.parameters())  # the caller's module is untouched


def test_landmark_cnn_calls_of_each_path(rng):
    """Ours: one call per view group on channels_last crops; the original script's: one per global
    view and one for all local views, on NCHW crops."""
    images = torch.rand(3, 3, SIZE, SIZE, generator=rng) * 2 - 1
    for original_path, expected_rows in ((False, [6, 9]), (True, [3, 3, 9])):
        views = builder(FixedLandmarks(rng), local_views=3, original_path=original_path)
        views(images, generator=rng)
        seen = views.landmark_cnn.seen
        assert [crops.shape[0] for crops in seen] == expected_rows
        assert all(crops.is_contiguous(memory_format=torch.channels_last) != original_path for crops in seen)


def test_our_landmark_cnn_has_folded_batch_norms_and_the_originals_does_not(rng):
    cnn = tiny_cnn()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in builder(cnn).landmark_cnn.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in builder(cnn, original_path=True).landmark_cnn.modules())


def test_one_fused_gather_call_per_view_group(rng, monkeypatch):
    calls = []

    def counting_gather(image, landmarks, patch_size=8, **kw):
        calls.append((tuple(image.shape), tuple(landmarks.shape), kw.get("index")))
        return landmark_patch_gather(image, landmarks, patch_size, **kw)

    monkeypatch.setattr(views_module, "landmark_patch_gather", counting_gather)
    images = torch.rand(2, 3, SIZE, SIZE, generator=rng) * 2 - 1
    builder(global_views=2, local_views=8, local_tokens=6)(images, generator=rng)
    assert len(calls) == 2
    (global_image, global_landmarks, global_index), (local_image, local_landmarks, local_index) = calls
    assert global_image == (4, 3, SIZE, SIZE) and global_landmarks == (4, L, 2) and global_index is None
    assert local_image == (16, 3, SIZE, SIZE) and local_landmarks == (16, L, 2) and local_index.shape == (16, 6)


def test_bad_input_is_named(rng):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        builder()(torch.rand(2, 1, SIZE, SIZE, generator=rng))
    with pytest.raises(ValueError, match="global_scale"):
        builder(global_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="grayscale_p"):
        builder(grayscale_p=1.5)


def _is_gray(tokens: torch.Tensor) -> torch.Tensor:
    """[N, K, P*P*3] tokens (pixel-major, channel last) -> [N]: every pixel of the view has R = G = B."""
    pixels = tokens.reshape(tokens.shape[0], -1, 3)
    return ((pixels - pixels[..., :1]).abs() < 1e-6).flatten(1).all(dim=1)


def test_grayscale_probability_reaches_every_view(rng):
    images = torch.rand(4, 3, SIZE, SIZE, generator=rng) * 2 - 1
    always = builder(grayscale_p=1.0)(images, generator=rng)
    assert all(_is_gray(group.tokens).all() for group in always)
    never = builder(grayscale_p=0.0)(images, generator=rng)
    assert not any(_is_gray(group.tokens).any() for group in never)



@pytest.mark.parametrize("replacement", [True, False])
def test_original_path_gives_the_same_tokens_from_the_same_generator_state(rng, monkeypatch, replacement):
    images = torch.rand(2, 3, 40, 40, generator=rng) * 2 - 1
    cnn = tiny_cnn()
    options = dict(local_views=3, local_tokens=7, replacement=replacement, jitter_std=3.0)
    fused = builder(cnn, **options)
    fused_groups = fused(images, generator=torch.Generator().manual_seed(21))
    (fused_eval,) = fused.eval()(images)

    loop_calls = []
    loop = views_module.gather_patches_loop

    def counting_loop(image, landmarks, patch_size):
        loop_calls.append(tuple(landmarks.shape))
        return loop(image, landmarks, patch_size)

    def no_fused_gather(*args, **kwargs):
        raise AssertionError("the original path called the fused gather")

    monkeypatch.setattr(views_module, "gather_patches_loop", counting_loop)
    monkeypatch.setattr(views_module, "landmark_patch_gather", no_fused_gather)
    original = builder(cnn, original_path=True, **options)
    original_groups = original(images, generator=torch.Generator().manual_seed(21))
    # As the original script: one loop per global view, one for all local views, at the selected landmarks.
    assert loop_calls == [(2, L, 2), (2, L, 2), (6, 7, 2)]
    for fused_group, original_group in zip(fused_groups, original_groups, strict=True):
        assert torch.equal(original_group.index, fused_group.index)
        assert_close(original_group.tokens, fused_group.tokens)
    (original_eval,) = original.eval()(images)
    assert_close(original_eval.tokens, fused_eval.tokens)
