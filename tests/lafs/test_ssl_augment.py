"""Batched crop and colour augmentations of the LAFS view builder."""
import colorsys
import math

import pytest
import torch
import torch.nn.functional as F

from lafs.ssl.augment import (
    _gaussian_blur,
    _hsv_to_rgb,
    _rgb_to_hsv,
    colour_augment,
    random_crop_boxes,
    random_resized_crops,
)
from tolerances import assert_close


def test_crop_boxes_respect_scale_and_ratio(rng):
    boxes = random_crop_boxes(500, 40, 48, (0.3, 0.9), rng)
    x0, y0, w, h = boxes.unbind(dim=1)
    assert torch.all((x0 >= 0) & (y0 >= 0) & (x0 + w <= 48) & (y0 + h <= 40))
    assert torch.all((w == w.round()) & (h == h.round()) & (x0 == x0.round()))
    area = w * h / (40 * 48)
    assert area.min() > 0.3 * 0.8 and area.max() < 0.9 * 1.2  # rounding of the sides moves the area a little
    ratio = w / h
    assert ratio.min() > 0.75 * 0.9 and ratio.max() < 4 / 3 * 1.1
    assert area.std() > 0.1 and x0.std() > 1  # really random


def test_crop_fallback_is_central_with_clamped_ratio(rng):
    boxes = random_crop_boxes(20, 10, 100, (0.95, 1.0), rng)  # a 10 x 100 strip: no 3/4..4/3 box of that area fits
    expected = torch.tensor([43.0, 0.0, 13.0, 10.0], dtype=torch.float64)  # w = round(10 * 4/3), centred
    assert torch.equal(boxes, expected.expand(20, 4))


def test_full_scale_crops_are_the_image_or_its_mirror(rng):
    images = torch.rand(64, 3, 12, 12, generator=rng, dtype=torch.float64)
    crops = random_resized_crops(images, 12, (1.0, 1.0), rng)
    same = (crops - images).abs().amax(dim=(1, 2, 3)) < 1e-9
    mirrored = (crops - images.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-9
    assert torch.all(same ^ mirrored)
    assert same.any() and mirrored.any()


def test_crop_interior_matches_crop_then_resize(rng):
    images = torch.rand(6, 3, 30, 30, generator=rng, dtype=torch.float64)
    size = 40
    state = rng.get_state()
    crops = random_resized_crops(images, size, (0.2, 0.6), rng)
    rng.set_state(state)
    boxes = random_crop_boxes(6, 30, 30, (0.2, 0.6), rng)
    flips = torch.rand(6, generator=rng) < 0.5
    for img, crop, box, flip in zip(images, crops, boxes, flips):
        x0, y0, w, h = (int(v) for v in box)
        expected = F.interpolate(img[None, :, y0:y0 + h, x0:x0 + w], size=(size, size), mode="bicubic",
                                 align_corners=False)[0].clamp(images.min(), images.max())
        expected = expected.flip(-1) if flip else expected
        # Bicubic taps near the crop's edge read the neighbouring image pixels here, replicated
        # crop pixels in interpolate: compare away from the edge.
        m = math.ceil(2.5 * size / min(w, h))
        assert_close(crop[:, m:-m, m:-m], expected[:, m:-m, m:-m])


def test_hsv_round_trip_and_colorsys(rng):
    rgb = torch.rand(2, 3, 5, 7, generator=rng, dtype=torch.float64)
    rgb[0, :, 0, 0] = 0.4  # a gray pixel
    hsv = _rgb_to_hsv(rgb)
    for n, i, j in [(0, 0, 0), (0, 1, 2), (1, 4, 6), (1, 3, 3)]:
        expected = colorsys.rgb_to_hsv(*rgb[n, :, i, j].tolist())
        assert hsv[n, :, i, j].tolist() == pytest.approx(expected, abs=1e-12)
    assert_close(_hsv_to_rgb(hsv), rgb)


def test_blur_of_an_impulse_is_the_normalised_gaussian():
    image = torch.zeros(2, 3, 21, 21, dtype=torch.float64)
    image[:, :, 10, 10] = 1.0
    sigma = torch.tensor([0.7, 1.9], dtype=torch.float64)
    out = _gaussian_blur(image, sigma)
    taps = torch.arange(21, dtype=torch.float64) - 10
    for n in range(2):
        g = torch.exp(-taps**2 / (2 * sigma[n] ** 2)) * (taps.abs() <= 6)
        g = g / g.sum()
        assert_close(out[n], (g[:, None] * g[None, :]).expand(3, 21, 21))
    flat = torch.full((1, 3, 9, 9), 0.3, dtype=torch.float64)
    assert_close(_gaussian_blur(flat, torch.tensor([1.5], dtype=torch.float64)), flat)


def test_colour_augment_pieces(rng):
    images = torch.rand(8, 3, 10, 10, generator=rng)
    zeros = torch.zeros(8, dtype=torch.float64)
    ones = torch.ones(8, dtype=torch.float64)
    identity = colour_augment(images, zeros, zeros, rng, jitter_p=0.0, grayscale_p=0.0)
    assert torch.equal(identity, images)
    gray = colour_augment(images, zeros, zeros, rng, jitter_p=0.0, grayscale_p=1.0)
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    assert_close(gray, luma[:, None].expand_as(images))
    solar = colour_augment(images, zeros, ones, rng, jitter_p=0.0, grayscale_p=0.0)
    assert torch.equal(solar, torch.where(images >= 0.5, 1 - images, images))
    jittered = colour_augment(images, zeros, zeros, rng, jitter_p=1.0, grayscale_p=0.0)
    assert jittered.min() >= 0 and jittered.max() <= 1
    assert ((jittered - images).abs().amax(dim=(1, 2, 3)) > 1e-3).all()


def test_colour_augment_is_reproducible_from_a_seed(rng):
    images = torch.rand(6, 3, 12, 12, generator=rng)
    p = torch.full((6,), 0.5, dtype=torch.float64)
    a = colour_augment(images, p, p, torch.Generator().manual_seed(7))
    b = colour_augment(images, p, p, torch.Generator().manual_seed(7))
    c = colour_augment(images, p, p, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
