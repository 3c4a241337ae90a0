"""The fused view path's geometry (lafs.ssl.geometry): crops as the gather's per-view affine, landmarks
mapped into views, the crop edge, the contrast's mean samples; the tokens against a materialised crop."""

import pytest
import torch
import torch.nn.functional as F

from lafs.data.synthetic import SyntheticFaces
from lafs.ssl.augment import random_crop_parameters
from lafs.ssl.geometry import (
    landmarks_into_views,
    mean_sample_layout,
    sample_offsets,
    view_edge_weights,
)
from lafs_kernels import landmark_patch_gather
from lafs_kernels.ops.landmark_patch_gather import crop_affine

from tolerances import assert_close

S, P = 24, 4


def bilinear_views(images, affine, size):
    """Materialised views ``[N, C, S, S]`` (N a multiple of B): view pixel (x, y) is the bilinear, zero-padded
    sample of its source at the affine image of (x, y), as a crop resized with align_corners=False."""
    batch, _, height, width = images.shape
    rows = affine.shape[0]
    pixels = torch.arange(size, dtype=torch.float64)
    a = affine.to(torch.float64)
    x = a[:, 0, None] * pixels + a[:, 2, None]  # [N, S]
    y = a[:, 1, None] * pixels + a[:, 3, None]
    gx = ((2 * x + 1) / width - 1)[:, None, :].expand(rows, size, size)
    gy = ((2 * y + 1) / height - 1)[:, :, None].expand(rows, size, size)
    grid = torch.stack((gx, gy), dim=-1)
    return F.grid_sample(images.to(torch.float64).repeat(rows // batch, 1, 1, 1), grid, align_corners=False)


def test_crop_affine_maps_view_pixel_centres_to_the_crops_sample_points(rng):
    """Against the crop path's own formula (lafs.ssl.augment.resized_crops): view pixel k samples the
    source at x0 + u_k * w - 0.5 with u_k = (k + 0.5) / S, or 1 - u_k when mirrored."""
    boxes, flips = random_crop_parameters(64, 40, 50, (0.2, 1.0), rng)
    affine = crop_affine(boxes, S, flips).to(torch.float64)
    k = torch.arange(S, dtype=torch.float64)
    u = (k + 0.5) / S
    u_x = torch.where(flips[:, None], 1 - u, u)
    expected_x = boxes[:, 0:1] + u_x * boxes[:, 2:3] - 0.5
    expected_y = boxes[:, 1:2] + u * boxes[:, 3:4] - 0.5
    assert_close(affine[:, 0:1] * k + affine[:, 2:3], expected_x, dtype=torch.float32)
    assert_close(affine[:, 1:2] * k + affine[:, 3:4], expected_y, dtype=torch.float32)
    assert flips.any() and (~flips).any()


def test_landmarks_into_views_inverts_the_affine(rng):
    boxes, flips = random_crop_parameters(3 * 4, 30, 30, (0.3, 1.0), rng)
    affine = crop_affine(boxes, S, flips)
    source = torch.rand(3, 7, 2, generator=rng) * 30
    in_views = landmarks_into_views(source, affine)  # [12, 7, 2]
    # a landmark l samples around l - 0.5; mapped through the affine that is the source's l - 0.5
    back = affine[:, None, :2] * (in_views - 0.5) + affine[:, None, 2:] + 0.5
    assert_close(back, source.repeat(4, 1, 1), dtype=torch.float32, scale=10)
    # continuous crop coordinates: (l - x0) * S / w, mirrored as S - that
    x0, y0, w, h = boxes.float().unbind(dim=1)
    expected_x = (source.repeat(4, 1, 1)[..., 0] - x0[:, None]) * S / w[:, None]
    expected_x = torch.where(flips[:, None], S - expected_x, expected_x)
    assert_close(in_views[..., 0], expected_x, dtype=torch.float32, scale=10)
    with pytest.raises(ValueError, match="multiple"):
        landmarks_into_views(source, affine[:5])


def test_affine_tokens_equal_a_materialised_crop_at_pixel_centres(rng):
    """Patches whose samples fall on view pixel centres (landmarks at half-integers): the affine path with the
    edge weights gives exactly what gathering from a materialised (bilinear) crop gives, flips and patches
    that leave the view included."""
    images = torch.rand(2, 3, 32, 36, generator=rng, dtype=torch.float64) * 2 - 1
    boxes, flips = random_crop_parameters(3 * 2, 32, 36, (0.3, 1.0), rng)
    affine = crop_affine(boxes, S, flips)
    landmarks = torch.randint(-3, S + 3, (6, 9, 2), generator=rng).to(torch.float64) + 0.5
    crops = bilinear_views(images, affine, S)
    expected = landmark_patch_gather(crops, landmarks, P, backend="torch")
    tokens = landmark_patch_gather(images, landmarks, P, view_affine=affine)
    tokens = (tokens.view(6, 9, P, P, 3) * view_edge_weights(landmarks, P, S)).view_as(tokens)
    assert_close(tokens, expected, dtype=torch.float32)
    assert flips.any() or not flips.all()


def test_affine_tokens_against_a_materialised_crop_anywhere():
    """At arbitrary positions the two differ by interpolating twice (crop, then patch) against once; on
    synthetic faces, the mean absolute difference in [-1, 1] stays below 0.02 (reported)."""
    gen = torch.Generator().manual_seed(0)
    faces = SyntheticFaces(4, 1, seed=3)
    images = torch.stack([faces[i][0] for i in range(4)])
    boxes, flips = random_crop_parameters(8, 112, 112, (0.4, 1.0), gen)
    affine = crop_affine(boxes, 112, flips)
    landmarks = torch.rand(8, 49, 2, generator=gen) * 100 + 6
    crops = bilinear_views(images, affine, 112).float()
    expected = landmark_patch_gather(crops, landmarks, 8)
    tokens = landmark_patch_gather(images, landmarks, 8, view_affine=affine)
    tokens = (tokens.view(8, 49, 8, 8, 3) * view_edge_weights(landmarks, 8, 112)).view_as(tokens)
    difference = (tokens - expected).abs().mean().item()
    print(f"affine tokens vs bilinear crop + gather: mean |difference| {difference:.4f}")
    assert difference < 0.02


def test_view_edge_weights():
    centres = torch.tensor([[[10.0, 10.0], [0.5, 10.0], [-0.25, 10.0], [S + 5.0, 10.0]]])
    weights = view_edge_weights(centres, P, S)[0, ..., 0]  # [K, P(i), P(j)]
    assert torch.equal(weights[0], torch.ones(P, P))
    x = 0.5 + sample_offsets(P, centres)  # -2.5 .. 0.5
    expected = torch.clamp(torch.minimum(x + 1, S - x), 0, 1)
    assert_close(weights[1], expected[:, None].expand(P, P))
    # samples at -2.75, -1.75, -0.75, 0.25: a crop's bilinear taps inside the view weigh 0, 0, 0.25, 1
    assert torch.equal(weights[2], torch.tensor([0.0, 0.0, 0.25, 1.0])[:, None].expand(P, P))
    assert torch.equal(weights[3], torch.zeros(P, P))


def test_mean_samples_are_a_grid_over_the_view(rng):
    images = torch.rand(2, 3, 30, 30, generator=rng, dtype=torch.float64)
    boxes, flips = random_crop_parameters(4, 30, 30, (0.3, 1.0), rng)
    affine = crop_affine(boxes, S, flips)
    coarse, centres = mean_sample_layout(affine, S, P, grid=8)
    samples = landmark_patch_gather(images, centres.to(torch.float64), P, view_affine=coarse)  # [4, 4, P*P*3]
    grid = 8
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) * S / grid - 0.5  # view positions of the grid
    a = affine.to(torch.float64)
    x, y = a[:, 0, None] * u + a[:, 2, None], a[:, 1, None] * u + a[:, 3, None]
    gx = ((2 * x + 1) / 30 - 1)[:, None, :].expand(4, grid, grid)
    gy = ((2 * y + 1) / 30 - 1)[:, :, None].expand(4, grid, grid)
    expected = F.grid_sample(images.repeat(2, 1, 1, 1), torch.stack((gx, gy), -1), align_corners=False)
    expected_pixels = expected.permute(0, 2, 3, 1).reshape(4, -1, 3).sort(dim=1).values
    got_pixels = samples.reshape(4, -1, 3).sort(dim=1).values
    assert_close(got_pixels, expected_pixels, dtype=torch.float32)


def test_blurring_the_source_against_blurring_the_crop():
    """A blurred view gathered from its source blurred with sigma * |scale| per axis (3 sigma of taps) against the
    crop path's blur of the materialised (bilinear) crop with sigma (6 taps, reflect padding at the crop's edge):
    on synthetic faces the mean |difference| of the tokens is below 0.01 in [-1, 1] (reported), most of it from
    patches at the crop's edge, where the crop reflects and the source has real pixels."""
    from lafs.ssl.augment import _gaussian_blur

    gen = torch.Generator().manual_seed(1)
    faces = SyntheticFaces(8, 1, seed=4)
    images = torch.stack([faces[i][0] for i in range(8)])
    boxes, flips = random_crop_parameters(8, 112, 112, (0.4, 1.0), gen)
    affine = crop_affine(boxes, 112, flips)
    sigma = torch.rand(8, generator=gen, dtype=torch.float64) * 1.9 + 0.1
    landmarks = torch.rand(8, 49, 2, generator=gen) * 100 + 6
    crops = _gaussian_blur(bilinear_views(images, affine, 112).float(), sigma)
    expected = landmark_patch_gather(crops, landmarks, 8)
    scale = affine[:, :2].abs().double()
    radius = int(torch.ceil(3 * (sigma[:, None] * scale).max()))
    sources = _gaussian_blur(images, sigma * scale[:, 0], sigma * scale[:, 1], radius=radius)
    tokens = landmark_patch_gather(sources, landmarks, 8, view_affine=affine)
    tokens = (tokens.view(8, 49, 8, 8, 3) * view_edge_weights(landmarks, 8, 112)).view_as(tokens)
    difference = (tokens - expected).abs()
    print(f"blurred source vs blurred crop: mean |difference| {difference.mean():.4f}, max {difference.max():.3f}")
    assert difference.mean() < 0.01
