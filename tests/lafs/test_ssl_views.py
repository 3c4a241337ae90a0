"""MultiViewBuilder: shapes, token counts, reproducibility, evaluation mode, the fused path's gathers from the
source, per-image landmarks, local positions, the original (per-landmark grid_sample) path."""

import pytest
import torch
from torch import nn

import lafs.ssl.views as views_module
from lafs.data.synthetic import SyntheticFaces
from lafs.models import LandmarkCNN
from lafs.ssl import MultiViewBuilder
from lafs.ssl.augment import random_crop_parameters, resized_crops
from lafs.ssl.geometry import landmarks_into_views
from lafs_kernels import landmark_patch_gather
from lafs_kernels.ops.landmark_patch_gather import crop_affine

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


def test_our_path_samples_every_view_from_the_source_images(rng, monkeypatch):
    """Per view group one gather of all views' tokens from the B source images through their affines, one of the
    contrast's view samples when any view of the group is jittered, and one of the blurred views from their
    blurred sources when any is blurred; no crop reaches a gather."""
    calls, drawn = [], []
    gather, draw = views_module.landmark_patch_gather, views_module.draw_colour_parameters

    def counting_gather(image, landmarks, patch_size=8, **kw):
        calls.append((tuple(image.shape), tuple(landmarks.shape), kw.get("view_affine")))
        return gather(image, landmarks, patch_size, **kw)

    def recording_draw(*args, **kw):
        drawn.append(draw(*args, **kw))
        return drawn[-1]

    monkeypatch.setattr(views_module, "landmark_patch_gather", counting_gather)
    monkeypatch.setattr(views_module, "draw_colour_parameters", recording_draw)
    images = torch.rand(2, 3, 40, 40, generator=rng) * 2 - 1
    builder(global_views=2, local_views=8, local_tokens=6)(images, generator=rng)
    assert all(c[2] is not None and c[2].shape == (c[1][0], 4) for c in calls)
    source = (2, 3, 40, 40)
    expected = []
    for params, rows, tokens in zip(drawn, (4, 16), (L, 6)):
        expected.append((source, (rows, tokens, 2)))  # the tokens, from the sources
        if params.jitter.any():  # the 16 x 16 view samples (4 x 4 patches of 4 x 4) for the contrast's mean
            expected.append((source, (rows, 16, 2)))
        blurred = int(params.blur.sum())
        if blurred:  # one blurred source per blurred view
            expected.append(((blurred, 3, 40, 40), (blurred, tokens, 2)))
    assert len(drawn) == 2 and drawn[0].blur[:2].all()  # the first global view is always blurred
    assert [(c[0], c[1]) for c in calls] == expected


def test_per_image_landmarks_run_the_cnn_once_and_map_into_each_view(rng, monkeypatch):
    images = torch.rand(3, 3, SIZE, SIZE, generator=rng) * 2 - 1
    cnn = FixedLandmarks(rng)
    seen = []
    gather = views_module.landmark_patch_gather

    def recording_gather(image, landmarks, patch_size=8, **kw):
        seen.append((landmarks, kw.get("view_affine")))
        return gather(image, landmarks, patch_size, **kw)

    monkeypatch.setattr(views_module, "landmark_patch_gather", recording_gather)
    views = builder(cnn, landmarks="per_image", jitter_std=0.0, local_views=3)
    views(images, generator=rng)
    assert [x.shape[0] for x in views.landmark_cnn.seen] == [3]  # once, on the source images
    global_centres, global_affine = seen[0]
    # Blurred views (the first global view always) are gathered from their blurred sources in a later call:
    # the first call gets a non-finite affine for them, which gathers zeros.
    blurred = ~global_affine.isfinite().all(dim=1)
    assert blurred.tolist()[:3] == [True] * 3
    blurred_calls = [affine for centres, affine in seen[1:] if centres.equal(global_centres[blurred])]
    assert len(blurred_calls) == 1
    blurred_affine = blurred_calls[0]
    global_affine = global_affine.clone()
    global_affine[blurred] = blurred_affine
    assert_close(global_centres, landmarks_into_views(cnn.points.expand(3, L, 2), global_affine))


def test_per_image_mapping_against_a_landmark_finder_on_crops(rng):
    """A 'landmark CNN' that follows the image exactly (the centroid of a bright blob): its landmarks on each
    crop and the per-image landmarks mapped into the crop agree to resampling error (< 0.3 px), flips included.
    (The stage-1 CNN of the default run is measured in docs/EXPERIMENTS.md: it does not follow crops exactly.)"""

    class BlobFinder(nn.Module):
        def forward(self, x):
            weight = x.mean(dim=1).clamp_min(0) ** 4  # [N, S, S]
            ys, xs = torch.meshgrid(torch.arange(x.shape[2]) + 0.5, torch.arange(x.shape[3]) + 0.5, indexing="ij")
            total = weight.sum(dim=(1, 2))
            centre = torch.stack(((weight * xs).sum((1, 2)) / total, (weight * ys).sum((1, 2)) / total), dim=1)
            return centre[:, None, :].expand(-1, L, 2)

    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    centres = torch.rand(4, 2, generator=rng) * 8 + 12
    blob = torch.exp(-((xs - centres[:, 0, None, None]) ** 2 + (ys - centres[:, 1, None, None]) ** 2) / 8.0)
    images = (blob * 2 - 1)[:, None].expand(4, 3, SIZE, SIZE).contiguous()
    options = dict(jitter_std=0.0, global_scale=(0.6, 1.0), local_views=0)
    state = torch.Generator().manual_seed(3)
    per_view = builder(BlobFinder(), **options)
    per_view(images, generator=torch.Generator().set_state(state.get_state()))
    per_image = builder(BlobFinder(), landmarks="per_image", **options)
    per_image(images, generator=torch.Generator().set_state(state.get_state()))
    boxes, flips = random_crop_parameters(8, SIZE, SIZE, (0.6, 1.0), torch.Generator().set_state(state.get_state()))
    on_crops = BlobFinder()(resized_crops(images.repeat(2, 1, 1, 1), boxes, flips, SIZE))
    mapped = landmarks_into_views(BlobFinder()(images), crop_affine(boxes, SIZE, flips))
    distance = (on_crops - mapped).norm(dim=-1).max().item()
    print(f"blob finder: per-image landmarks mapped into crops vs found on crops: max {distance:.3f} px")
    assert distance < 0.3 and flips.any()


@pytest.mark.parametrize(
    "original_path,positions,expected",
    [(False, None, "landmark"), (True, None, "first"), (False, "first", "first"), (True, "landmark", "landmark")],
)
def test_local_positions(rng, original_path, positions, expected):
    images = torch.rand(2, 3, SIZE, SIZE, generator=rng) * 2 - 1
    b = builder(local_tokens=5, original_path=original_path, local_positions=positions)
    global_group, local_group = b(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(global_group.index, torch.arange(L).expand(4, L))
    if expected == "first":  # the original: a K-token view gets positions 1..K (after cls), whatever it drew
        assert torch.equal(local_group.index, torch.arange(5).expand(4, 5))
    else:
        drawn = builder(local_tokens=5, original_path=not original_path, local_positions="landmark")(
            images, generator=torch.Generator().manual_seed(1)
        )[1].index
        assert torch.equal(local_group.index, drawn) and not torch.equal(drawn, torch.arange(5).expand(4, 5))
    with pytest.raises(ValueError, match="local_positions"):
        builder(local_positions="middle")
    with pytest.raises(ValueError, match="landmarks"):
        builder(landmarks="per_crop")


def test_bad_input_is_named(rng):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        builder()(torch.rand(2, 1, SIZE, SIZE, generator=rng))
    with pytest.raises(ValueError, match="global_scale"):
        builder(global_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="grayscale_p"):
        builder(grayscale_p=1.5)


def _coloured_and_visible(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K, P*P*3] tokens (pixel-major, channel last) -> ([N], [N]): whether some pixel of the view has
    R, G, B not all equal, and whether some pixel is not zero (a view whose tokens all lie outside it is zero,
    and zero is gray: such views say nothing about the grayscale draw)."""
    pixels = tokens.reshape(tokens.shape[0], -1, 3)
    coloured = ((pixels - pixels[..., :1]).abs() >= 1e-6).any(dim=2).any(dim=1)
    visible = (pixels != 0).any(dim=2).any(dim=1)
    return coloured, visible


def test_grayscale_probability_reaches_every_view(rng):
    images = torch.rand(4, 3, SIZE, SIZE, generator=rng) * 2 - 1
    always = builder(grayscale_p=1.0)(images, generator=rng)
    assert not any(_coloured_and_visible(group.tokens)[0].any() for group in always)
    never = builder(grayscale_p=0.0)(images, generator=rng)
    for group in never:
        coloured, visible = _coloured_and_visible(group.tokens)
        assert visible.sum() >= visible.numel() // 2  # most views show some of the image
        assert torch.equal(coloured, visible)


@pytest.mark.parametrize("replacement", [True, False])
def test_original_path_runs_the_released_scripts_steps_on_the_same_draws(rng, monkeypatch, replacement):
    """The original path: per-landmark loop once per global view and once for the locals, never the fused
    gather; its landmark CNN sees the same crops as ours (per_view) from the same generator state, and its local
    tokens take the first positions."""
    images = torch.rand(2, 3, 40, 40, generator=rng) * 2 - 1
    cnn = FixedLandmarks(rng)
    options = dict(local_views=3, local_tokens=7, replacement=replacement, jitter_std=3.0)
    ours = builder(cnn, **options)
    our_groups = ours(images, generator=torch.Generator().manual_seed(21))
    (ours_eval,) = ours.eval()(images)

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
    assert loop_calls == [(2, L, 2), (2, L, 2), (6, 7, 2)]
    our_crops, original_crops = torch.cat(ours.landmark_cnn.seen[:2]), torch.cat(original.landmark_cnn.seen[:3])
    assert_close(our_crops, original_crops)
    assert torch.equal(original_groups[1].index, torch.arange(7).expand(6, 7))
    for our_group, original_group in zip(our_groups, original_groups, strict=True):
        assert our_group.tokens.shape == original_group.tokens.shape
    (original_eval,) = original.eval()(images)
    assert_close(original_eval.tokens, ours_eval.tokens)


def test_our_tokens_against_the_original_paths_on_faces():
    """Same draws, per_view landmarks: our tokens differ from the original path's by bicubic-then-bilinear
    against one bilinear sampling, the blur before the colour, the contrast's sampled mean and the source
    beyond the crop's edge.  On synthetic faces the mean |difference| is below 0.02 in [-1, 1] (reported)."""
    data = SyntheticFaces(6, 1, seed=2, colours="per_identity")
    images = torch.stack([data[i][0] for i in range(6)])
    cnn = LandmarkCNN(num_landmarks=49, image_size=112, blocks="tiny")
    options = dict(patch_size=8, local_views=2, local_tokens=24, image_size=112)
    ours = MultiViewBuilder(cnn, **options)(images, generator=torch.Generator().manual_seed(3))
    original = MultiViewBuilder(cnn, original_path=True, **options)(images, generator=torch.Generator().manual_seed(3))
    for name, a, b in zip(("global", "local"), ours, original):
        difference = (a.tokens - b.tokens).abs()
        print(
            f"{name} views, ours vs original path: mean |difference| {difference.mean():.4f}, "
            f"max {difference.max():.3f}"
        )
        assert difference.mean() < 0.02
