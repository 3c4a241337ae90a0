"""LAFS multi-view builder: landmark-centred patch tokens of augmented crops.

For each image of a batch (``[B, 3, H, W]`` in [-1, 1]) and each view, as the
released LAFS pretraining script does:

1. random resized crop (scale range, 112 x 112) and horizontal flip;
2. landmarks predicted on that plain crop by the frozen landmark CNN (eval mode, no grad);
3. a colour-augmented copy of the crop (DINO's jitter, grayscale, blur, solarisation);
4. patches cut from the augmented copy around the landmarks, each jittered by
   N(0, jitter_std^2) pixels: all L landmarks for global views, ``local_tokens``
   drawn at random (with replacement by default) for local views.

Steps 2 and 4 run once per view group (all global views of the batch, then all
local views): the landmark CNN with its batch norms folded into the convolutions,
channels_last (``lafs.ssl.frozen``), and one ``lafs_kernels.landmark_patch_gather``
call.  With ``original_path=True`` both run as the original script runs them:
once per global view and once for all local views, the CNN as it is (separate
batch norms, NCHW), and the patches cut by the original per-landmark
``grid_sample`` loop (``lafs_kernels.baselines.gather.gather_patches_loop``) at
the same centres: both paths select and jitter landmarks with ``select_centres``,
so the same generator state gives the same tokens (up to float rounding).  Every
random number comes from one ``torch.Generator``, so a seed reproduces the views
exactly.

In eval mode (``builder.eval()``) there is one view per image: the image itself,
all landmarks in order, no crop, colour change, jitter or subsampling.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from lafs_kernels import landmark_patch_gather
from lafs_kernels.baselines.gather import gather_patches_loop
from lafs_kernels.ops.landmark_patch_gather import draw_index, select_centres

from .augment import colour_augment, random_resized_crops
from .frozen import frozen_copy

# (blur probability, solarisation probability) per view, from DINO / LAFS: the first
# global view is always blurred, the second rarely blurred and sometimes solarised.
GLOBAL_VIEW_COLOUR = ((1.0, 0.0), (0.1, 0.2))
LOCAL_VIEW_COLOUR = (0.5, 0.0)


class ViewGroup(NamedTuple):
    """Views of the same token count, view-major: row ``v * B + b`` is view v of image b.

    tokens: [V*B, K, P*P*3] patch tokens; index: [V*B, K] int64 landmark id of each token
    (for the transformer's positional embedding).
    """

    tokens: torch.Tensor
    index: torch.Tensor


class MultiViewBuilder(nn.Module):
    """``builder(images [B, 3, H, W] in [-1, 1]) -> [global ViewGroup, local ViewGroup]``.

    Args:
      landmark_cnn: module mapping images [N, 3, S, S] to landmarks [N, L, 2] (pixels).  The
        builder keeps a frozen copy (no gradients, always in eval mode), so training the
        original elsewhere (fine-tuning) does not change the views.
      patch_size: P of the tokens.
      global_views / local_views: views per image in each group (2 and 8 in LAFS);
        a group with 0 views is left out.
      local_tokens: tokens per local view (36 of 196 in LAFS).
      jitter_std: landmark jitter in pixels (5 in LAFS; 0 turns it off).
      replacement: draw local tokens with replacement (LAFS) or without.
      global_scale / local_scale: area range of the random resized crops (LAFS uses
        0.4-1 for both: its local views are made like the global ones, only with fewer tokens).
      image_size: side of the crops.
      grayscale_p: probability that a view is turned to grayscale (0.2 in DINO / LAFS).
      seed: seed of the builder's own generator, used when ``forward`` gets none.
      original_path: run the landmark CNN and gather patches as the original code does
        (for comparisons: see above) instead of our path; same tokens, same random numbers.
    """

    def __init__(
        self,
        landmark_cnn: nn.Module,
        patch_size: int = 8,
        global_views: int = 2,
        local_views: int = 8,
        local_tokens: int = 36,
        jitter_std: float = 5.0,
        replacement: bool = True,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.4, 1.0),
        image_size: int = 112,
        grayscale_p: float = 0.2,
        seed: int = 0,
        original_path: bool = False,
    ):
        super().__init__()
        if global_views < 1 or local_views < 0:
            raise ValueError(f"need global_views >= 1 and local_views >= 0, got {global_views}, {local_views}")
        if local_views and local_tokens < 1:
            raise ValueError(f"local_tokens must be >= 1, got {local_tokens}")
        if jitter_std < 0:
            raise ValueError(f"jitter_std must be >= 0, got {jitter_std}")
        for name, (low, high) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < low <= high <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got ({low}, {high})")
        if not 0.0 <= grayscale_p <= 1.0:
            raise ValueError(f"grayscale_p must be a probability in [0, 1], got {grayscale_p}")
        # Our path runs the frozen CNN with its batch norms folded into the convolutions, channels_last;
        # the original path runs it as the original code does (separate batch norms, NCHW).
        self.landmark_cnn = frozen_copy(landmark_cnn, fast=not original_path)
        self.patch_size = patch_size
        self.global_views = global_views
        self.local_views = local_views
        self.local_tokens = local_tokens
        self.jitter_std = float(jitter_std)
        self.replacement = replacement
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)
        self.image_size = image_size
        self.grayscale_p = float(grayscale_p)
        self.generator = torch.Generator().manual_seed(seed)
        self.original_path = original_path

    def train(self, mode: bool = True) -> "MultiViewBuilder":
        """Switch augmentation on (train) or off (eval); the landmark CNN always stays in eval mode."""
        self.training = mode
        self.landmark_cnn.eval()
        return self

    @property
    def crops_per_image(self) -> int:
        return self.global_views + self.local_views

    @torch.no_grad()
    def forward(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> list[ViewGroup]:
        self._check(images)
        if not self.training:
            landmarks = self._landmarks(images, images.shape[0])
            tokens = self._gather(images, landmarks, None, 0.0, None, images.shape[0])
            return [ViewGroup(tokens, self._all_landmarks(landmarks))]
        generator = self.generator if generator is None else generator
        global_colour = [GLOBAL_VIEW_COLOUR[v % len(GLOBAL_VIEW_COLOUR)] for v in range(self.global_views)]
        groups = [self._group(images, self.global_views, self.global_scale, global_colour, None, generator)]
        if self.local_views:
            local_colour = [LOCAL_VIEW_COLOUR] * self.local_views
            groups.append(
                self._group(images, self.local_views, self.local_scale, local_colour, self.local_tokens, generator)
            )
        return groups

    def _group(self, images, views, scale, colour, num_tokens, generator) -> ViewGroup:
        """One view group: ``views`` crops of every image, ``num_tokens`` tokens each (None: all landmarks)."""
        batch = images.shape[0]
        # The original script runs the landmark CNN and the gather once per global view and once for
        # all local views together; our path once per group.
        call_rows = batch if self.original_path and num_tokens is None else views * batch
        crops = random_resized_crops(images.repeat(views, 1, 1, 1), self.image_size, scale, generator)
        landmarks = self._landmarks(crops, call_rows)
        probabilities = torch.tensor(colour, dtype=torch.float64).repeat_interleave(batch, dim=0)  # [V*B, 2]
        coloured = colour_augment(crops.add(1).mul_(0.5), probabilities[:, 0], probabilities[:, 1], generator,
                                  grayscale_p=self.grayscale_p)
        coloured = coloured.mul_(2).sub_(1)  # back to [-1, 1]
        index = None  # all landmarks in order
        if num_tokens is not None:
            index = draw_index(
                landmarks.shape[0], landmarks.shape[1], num_tokens, replacement=self.replacement,
                generator=generator, device=landmarks.device,
            )
        tokens = self._gather(coloured, landmarks, index, self.jitter_std, generator, call_rows)
        return ViewGroup(tokens, self._all_landmarks(landmarks) if index is None else index)

    def _landmarks(self, images, call_rows) -> torch.Tensor:
        """landmarks [N, L, 2] of images [N, 3, S, S], ``call_rows`` images per landmark CNN call."""
        if not self.original_path:
            return self.landmark_cnn(images.contiguous(memory_format=torch.channels_last))
        return torch.cat([self.landmark_cnn(chunk) for chunk in images.split(call_rows)])

    def _gather(self, image, landmarks, index, jitter_std, generator, call_rows) -> torch.Tensor:
        """tokens [N, K, P*P*3] from image [N, 3, S, S] around landmarks [N, L, 2] selected by
        index [N, K] (None: all L in order), jittered by N(0, jitter_std^2) pixels; the original
        path loops over ``call_rows`` images at a time."""
        if not self.original_path:
            return landmark_patch_gather(
                image, landmarks, self.patch_size, index=index, jitter_std=jitter_std, generator=generator
            )
        # The fused op places centres in float32 (float64 for float64 images); so does this path.
        centres = select_centres(
            landmarks, index=index, jitter_std=jitter_std, generator=generator,
            dtype=torch.promote_types(image.dtype, torch.float32),
        )
        return torch.cat([
            gather_patches_loop(image_chunk, centre_chunk, self.patch_size)
            for image_chunk, centre_chunk in zip(image.split(call_rows), centres.split(call_rows))
        ])

    @staticmethod
    def _all_landmarks(landmarks: torch.Tensor) -> torch.Tensor:
        rows, num_landmarks = landmarks.shape[:2]
        return torch.arange(num_landmarks, device=landmarks.device).expand(rows, num_landmarks)

    def _check(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"MultiViewBuilder expects images [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"MultiViewBuilder expects floating-point images in [-1, 1], got {images.dtype}")
