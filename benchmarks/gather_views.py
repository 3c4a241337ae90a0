"""Views sampled straight from the source image (``view_affine``) against materialising each crop.

    PYTHONPATH=$PWD python benchmarks/gather_views.py [--device cpu|cuda] [--batch 16] [--rounds 9]

Part 1, distance: synthetic 112 x 112 faces (``lafs.data.SyntheticFaces``, values in [-1, 1]), random
resized crops as ``lafs.ssl.augment.random_crop_boxes`` draws them, rounded to whole pixels, half of
them flipped: global views (scale 0.4..1, all 196 tokens) and local views (scale 0.05..0.4, 36 tokens),
each 112 x 112, landmarks spread over the view.  Tokens of the affine gather are compared with crop,
resize to 112 x 112, flip, gather, where the resize is (a) ``F.interpolate`` bilinear,
align_corners=False, no antialias (the map the affine states; equal at whole view pixels up to the
crop's border, where interpolate repeats the edge pixel) and (b) torchvision's antialiased
``resized_crop`` (what RandomResizedCrop does on tensors).  Printed: largest and mean absolute
difference, for landmarks anywhere (two bilinear interpolations against one) and at half-pixel
landmarks (samples on whole view pixels).

Part 2, time (forward, no gradients, as the frozen-landmark pretraining step uses it): the affine gather
of the 2 global + 8 local view groups against crop-and-resize with ``F.interpolate`` then the fused
gather, interleaved in each round (ABBA), median ratio with its range and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from lafs.data import SyntheticFaces
from lafs.ssl.augment import random_crop_boxes
from lafs_kernels import landmark_patch_gather
from lafs_kernels.ops.landmark_patch_gather import crop_affine

SIZE, P, L = 112, 8, 196
GROUPS = {"global": dict(views=2, scale=(0.4, 1.0), tokens=196), "local": dict(views=8, scale=(0.05, 0.4), tokens=36)}


def faces(batch: int) -> torch.Tensor:
    data = SyntheticFaces(num_identities=batch, images_per_identity=1, seed=0)
    rgb = torch.stack([torch.from_numpy(data.render(i)[0]) for i in range(batch)])  # [B, H, W, 3] uint8
    return rgb.permute(0, 3, 1, 2).float() / 127.5 - 1


def views_of(batch: int, group: dict, generator: torch.Generator):
    """boxes [V*B, 4] whole pixels (x0, y0, w, h), flips [V*B], landmarks [V*B, L, 2] in view pixels."""
    n = group["views"] * batch
    boxes = random_crop_boxes(n, SIZE, SIZE, group["scale"], generator).round()
    boxes[:, 2:] = boxes[:, 2:].clamp(min=2)
    boxes[:, :2] = torch.minimum(boxes[:, :2], SIZE - boxes[:, 2:])
    flips = torch.rand(n, generator=generator) < 0.5
    landmarks = torch.rand(n, L, 2, generator=generator) * (SIZE - 16) + 8
    return boxes.long(), flips, landmarks


def materialised(images, boxes, flips, antialias: bool):
    """[V*B, C, 112, 112]: the crops resized (interpolate, or torchvision's antialiased resize) and flipped."""
    from torchvision.transforms.v2 import functional as TF

    B = images.shape[0]
    out = []
    for n, ((x0, y0, w, h), flip) in enumerate(zip(boxes.tolist(), flips.tolist())):
        crop = images[n % B : n % B + 1, :, y0 : y0 + h, x0 : x0 + w]
        if antialias:
            view = TF.resize(crop, [SIZE, SIZE], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        else:
            view = F.interpolate(crop, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=False)
        out.append(view.flip(-1) if flip else view)
    return torch.cat(out)


def distances(images, generator, device):
    print("distance of the affine gather from crop -> resize -> gather (token values in [-1, 1]):")
    for name, group in GROUPS.items():
        boxes, flips, landmarks = views_of(images.shape[0], group, generator)
        index = torch.randint(0, L, (landmarks.shape[0], group["tokens"]), generator=generator)
        affine = crop_affine(boxes, SIZE, flips)
        for where, lm in (("anywhere", landmarks), ("half-pixel", landmarks.floor() + 0.5)):
            lm, idx = lm.to(device), index.to(device)
            ours = landmark_patch_gather(images.to(device), lm, P, index=idx, view_affine=affine.to(device)).cpu()
            for label, antialias in (("interpolate", False), ("torchvision antialias", True)):
                views = materialised(images, boxes, flips, antialias).to(device)
                theirs = landmark_patch_gather(views, lm, P, index=idx).cpu()
                diff = (ours - theirs).abs()
                print(
                    f"  {name:6s} landmarks {where:10s} vs {label:22s}: max {diff.max():.2e}  "
                    f"mean {diff.mean():.2e}  (token std {theirs.std():.2f})"
                )


def timing(images, generator, device, rounds):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    images = images.to(device)
    cases = {}
    for name, group in GROUPS.items():
        boxes, flips, landmarks = views_of(images.shape[0], group, generator)
        index = torch.randint(0, L, (landmarks.shape[0], group["tokens"]), generator=generator).to(device)
        affine, landmarks = crop_affine(boxes, SIZE, flips).to(device), landmarks.to(device)
        cases[name] = (
            lambda a=affine, lm=landmarks, i=index: landmark_patch_gather(images, lm, P, index=i, view_affine=a),
            lambda b=boxes, f=flips, lm=landmarks, i=index: landmark_patch_gather(
                materialised(images, b, f, antialias=False), lm, P, index=i
            ),
        )

    def once(fn):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    print(
        f"time, forward, {images.shape[0]} images, 2 global + 8 local views, {device} "
        f"({torch.get_num_threads()} threads); ratio = crop-then-gather / affine:"
    )
    for name, (ours, theirs) in cases.items():
        ours(), theirs()
        load = os.getloadavg()[0]
        pairs = []
        for r in range(rounds):
            if r % 2:
                b = once(theirs)
                a = once(ours)
            else:
                a = once(ours)
                b = once(theirs)
            pairs.append((a, b))
        ratios = [b / a for a, b in pairs]
        print(
            f"  {name:6s} affine {1e3 * statistics.median(a for a, _ in pairs):7.2f} ms  crop+resize+gather "
            f"{1e3 * statistics.median(b for _, b in pairs):7.2f} ms  ratio {statistics.median(ratios):.2f}x "
            f"(range {min(ratios):.2f}-{max(ratios):.2f}, {rounds} rounds, "
            f"load {load:.2f}->{os.getloadavg()[0]:.2f})"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--skip-distance", action="store_true")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    images = faces(args.batch)
    if not args.skip_distance:
        distances(images, generator, args.device)
    timing(images, generator, args.device, args.rounds)


if __name__ == "__main__":
    main()
