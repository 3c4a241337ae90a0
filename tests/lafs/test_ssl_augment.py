"""Batched crop and colour augmentations of the LAFS view builder."""

import colorsys
import math

import pytest
import torch
import torch.nn.functional as F

from lafs.ssl.augment import (
    _JITTER,
    _gaussian_blur,
    _uniform,
    colour_augment,
    draw_colour_parameters,
    random_crop_boxes,
    random_resized_crops,
)
from lafs_kernels.ops.dino_colour import blend_ as _blend_
from lafs_kernels.ops.dino_colour import colour_jitter_ as _colour_jitter_
from lafs_kernels.ops.dino_colour import shift_hue_ as _shift_hue_

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


def crops_with_their_draws(images, size, scale, rng):
    """(crops, boxes [N, 4], flips [N]): the crops and the boxes and flips they were drawn with."""
    state = rng.get_state()
    crops = random_resized_crops(images, size, scale, rng)
    rng.set_state(state)
    n, _, height, width = images.shape
    boxes = random_crop_boxes(n, height, width, scale, rng)
    return crops, boxes, torch.rand(n, generator=rng) < 0.5


def test_crop_interior_matches_crop_then_resize(rng):
    images = torch.rand(6, 3, 30, 30, generator=rng, dtype=torch.float64)
    size = 40
    crops, boxes, flips = crops_with_their_draws(images, size, (0.2, 0.6), rng)
    for img, crop, box, flip in zip(images, crops, boxes, flips):
        x0, y0, w, h = (int(v) for v in box)
        expected = F.interpolate(
            img[None, :, y0 : y0 + h, x0 : x0 + w], size=(size, size), mode="bicubic", align_corners=False
        )[0].clamp(images.min(), images.max())
        expected = expected.flip(-1) if flip else expected
        # Bicubic taps near the crop's edge read the neighbouring image pixels here, replicated
        # crop pixels in interpolate: compare away from the edge.
        m = math.ceil(2.5 * size / min(w, h))
        assert_close(crop[:, m:-m, m:-m], expected[:, m:-m, m:-m])


def test_crops_are_bicubic_grid_samples_with_border_padding(rng):
    images = torch.rand(5, 3, 17, 23, generator=rng, dtype=torch.float64) * 2 - 1
    size = 13
    crops, boxes, flips = crops_with_their_draws(images, size, (0.1, 1.0), rng)
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    for img, crop, (x0, y0, w, h), flip in zip(images, crops, boxes, flips):
        u = 1 - centres if flip else centres
        grid_x = (2 * (x0 + u * w) / 23 - 1)[None, :].expand(size, size)
        grid_y = (2 * (y0 + centres * h) / 17 - 1)[:, None].expand(size, size)
        grid = torch.stack((grid_x, grid_y), dim=-1)[None]
        expected = F.grid_sample(img[None], grid, mode="bicubic", padding_mode="border", align_corners=False)[0]
        assert_close(crop, expected.clamp(images.min(), images.max()))


def _luma(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def test_hue_shift_matches_colorsys(rng):
    rgb = torch.rand(2, 3, 5, 7, generator=rng, dtype=torch.float64)
    rgb[0, :, 0, 0] = 0.4  # a gray pixel
    rgb[0, :, 0, 1] = torch.tensor([0.7, 0.7, 0.2])  # red and green tie for the largest channel
    rgb[1, :, 2, 2] = torch.tensor([0.1, 0.8, 0.8])  # green and blue tie
    shift = torch.tensor([0.37, -0.08], dtype=torch.float64)
    out = _shift_hue_(rgb.clone(), shift)
    for n in range(2):
        for i in range(5):
            for j in range(7):
                h, s, v = colorsys.rgb_to_hsv(*rgb[n, :, i, j].tolist())
                expected = colorsys.hsv_to_rgb((h + shift[n].item()) % 1.0, s, v)
                assert out[n, :, i, j].tolist() == pytest.approx(expected, abs=1e-12)


def test_blend_gives_brightness_contrast_and_saturation(rng):
    x = torch.rand(3, 3, 6, 5, generator=rng, dtype=torch.float64)
    f = _uniform(3, 0.2, 1.8, rng)
    f4 = f.view(-1, 1, 1, 1)
    gray = _luma(x)
    expected = torch.stack(
        [
            (f4 * x)[0],  # brightness
            (f4 * x + (1 - f4) * gray.mean(dim=(1, 2, 3), keepdim=True))[1],  # contrast
            (f4 * x + (1 - f4) * gray)[2],  # saturation
        ]
    ).clamp(0, 1)
    gray_weight = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    mean_weight = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    assert_close(_blend_(x.clone(), f, gray_weight, mean_weight), expected)


def test_jitter_applies_each_images_ops_in_its_drawn_order(rng):
    n = 24
    x = torch.rand(n, 3, 6, 6, generator=rng, dtype=torch.float64)
    apply = torch.rand(n, generator=rng) < 0.8
    state = rng.get_state()
    params = draw_colour_parameters(n, torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), rng)
    out = _colour_jitter_(x.clone(), apply, params.factors, params.order)
    rng.set_state(state)  # the same draws, in the documented order: five per-image draws, the four factors, the order
    for _ in range(3):  # jitter, grayscale, blur
        torch.rand(n, generator=rng)
    _uniform(n, 0.1, 2.0, rng)  # sigma
    torch.rand(n, generator=rng)  # solarisation
    factors = {
        op: _uniform(n, -s, s, rng) if op == "hue" else _uniform(n, 1 - s, 1 + s, rng) for op, s in _JITTER.items()
    }
    order = torch.rand(n, 4, generator=rng).argsort(dim=1)
    ops = list(_JITTER)
    for i in range(n):
        image = x[i : i + 1].clone()
        for k in order[i].tolist() if apply[i] else []:
            f = factors[ops[k]][i]
            if ops[k] == "brightness":
                image = (f * image).clamp(0, 1)
            elif ops[k] == "contrast":
                image = (f * image + (1 - f) * _luma(image).mean()).clamp(0, 1)
            elif ops[k] == "saturation":
                image = (f * image + (1 - f) * _luma(image)).clamp(0, 1)
            else:
                image = _shift_hue_(image, f.view(1))
        assert_close(out[i], image[0], msg=f"image {i}, order {order[i].tolist()}, applied {bool(apply[i])}")


def test_blur_of_an_impulse_is_the_normalised_gaussian():
    image = torch.zeros(2, 3, 21, 21, dtype=torch.float64)
    image[:, :, 10, 10] = 1.0
    sigma = torch.tensor([0.7, 1.9], dtype=torch.float64)
    out = _gaussian_blur(image, sigma)
    taps = torch.arange(21, dtype=torch.float64) - 10
    for n in range(2):
        g = torch.exp(-(taps**2) / (2 * sigma[n] ** 2)) * (taps.abs() <= 6)
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
