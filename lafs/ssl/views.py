"""LAFS multi-view builder: landmark-centred patch tokens of augmented views.

For each image of a batch (``[B, 3, H, W]`` in [-1, 1]) and each view, as the
released LAFS pretraining script does:

1. random resized crop (scale range, 112 x 112) and horizontal flip;
2. landmarks predicted on that plain crop by the frozen landmark CNN (eval mode, no grad);
3. a colour-augmented copy of the crop (DINO's jitter, grayscale, blur, solarisation);
4. patches cut from the augmented copy around the landmarks, each jittered by
   N(0, jitter_std^2) pixels: all L landmarks for global views, ``local_tokens``
   drawn at random (with replacement by default) for local views.

Our path (the default) makes the tokens in one pass per view group without materialising
a crop: the crop plus flip is the per-view affine of ``lafs_kernels.landmark_patch_gather``
(``view_affine``, ``lafs.ssl.geometry``), which samples every view's patches straight from the
source image; the per-pixel colour operations run on the gathered tokens only
(``lafs.ssl.token_colour``; the contrast's view mean from a 16 x 16 grid of samples of the
view); a blurred view is gathered from its source image blurred once with the view's sigma
in source pixels; samples beyond the crop's edge are weighted as a crop's zero padding would
(``view_edge_weights``, applied by the colour kernel in the same pass).  Landmarks (``landmarks=``):

- ``"per_view"``: the landmark CNN runs on every view's crop, as the original (the crops are
  made for it alone, uncoloured; one CNN call per view group, batch norms folded,
  channels_last, ``lafs.ssl.frozen``);
- ``"per_image"``: the CNN runs once per source image and its landmarks are mapped into each
  view through the inverse affine (``landmarks_into_views``): one CNN pass instead of one per
  view.  This changes the method where the CNN would not follow the crop exactly.

With ``original_path=True`` everything runs as the original script runs it: materialised
bicubic crops, the CNN as it is (separate batch norms, NCHW) once per global view and once for
all local views, colour on whole crops, patches cut by the original per-landmark
``grid_sample`` loop (``lafs_kernels.baselines.gather.gather_patches_loop``), and a local
view's K tokens take the position embeddings of the first K + 1 positions.  Both paths draw
the crops, colours, tokens and jitter from one ``torch.Generator`` in the same order (so a seed
reproduces the views exactly, and the two paths see the same crops and centres).

Position embeddings (``local_positions``): ``"landmark"`` gives each local token its landmark's
(``ViewGroup.index`` holds the landmark ids), ``"first"`` the original's first K + 1 positions
(``index`` = 0..K-1).  Global views hold all L landmarks in order: the same either way.

In eval mode (``builder.eval()``) there is one view per image: the image itself,
all landmarks in order, no crop, colour change, jitter or subsampling.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from lafs_kernels import landmark_patch_gather
from lafs_kernels.baselines.gather import gather_patches_loop
from lafs_kernels.ops.gaussian_blur import gaussian_blur
from lafs_kernels.ops.landmark_patch_gather import crop_affine, draw_index, select_centres

from .augment import (
    blur_,
    draw_colour_parameters,
    jitter_and_gray_,
    random_crop_parameters,
    random_resized_crops,
    resized_crops,
    solarize_,
)
from .frozen import frozen_copy
from .geometry import landmarks_into_views, mean_sample_layout, view_edge_weights
from .token_colour import colour_tokens

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


LANDMARK_MODES = ("per_view", "per_image")
POSITION_MODES = ("landmark", "first")
MEAN_GRID = 16  # the contrast's view mean: a 16 x 16 grid of samples of the view


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
      image_size: side of the views (S).
      grayscale_p: probability that a view is turned to grayscale (0.2 in DINO / LAFS).
      seed: seed of the builder's own generator, used when ``forward`` gets none.
      original_path: build the views as the original code does (see above), for comparisons.
      landmarks: "per_view" or "per_image" (see above; the original path is always per view).
      local_positions: "landmark" or "first" (None: "first" on the original path, else "landmark").
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
        landmarks: str = "per_view",
        local_positions: Optional[str] = None,
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
        if landmarks not in LANDMARK_MODES:
            raise ValueError(f"landmarks must be one of {LANDMARK_MODES}, got {landmarks!r}")
        local_positions = local_positions or ("first" if original_path else "landmark")
        if local_positions not in POSITION_MODES:
            raise ValueError(f"local_positions must be one of {POSITION_MODES}, got {local_positions!r}")
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
        self.landmarks = "per_view" if original_path else landmarks
        self.local_positions = local_positions

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
        source_landmarks = None
        if not self.original_path and self.landmarks == "per_image":
            with record_function("views.landmark_cnn"):
                source_landmarks = self._source_landmarks(images)
        global_colour = [GLOBAL_VIEW_COLOUR[v % len(GLOBAL_VIEW_COLOUR)] for v in range(self.global_views)]
        specs = [(self.global_views, self.global_scale, global_colour, None)]
        if self.local_views:
            specs.append(
                (self.local_views, self.local_scale, [LOCAL_VIEW_COLOUR] * self.local_views, self.local_tokens)
            )
        group = self._original_group if self.original_path else self._fused_group
        return [
            group(images, views, scale, colour, num_tokens, generator, source_landmarks)
            for views, scale, colour, num_tokens in specs
        ]

    def _original_group(self, images, views, scale, colour, num_tokens, generator, _) -> ViewGroup:
        """One view group as the original script makes it: ``views`` crops of every image, ``num_tokens``
        tokens each (None: all landmarks)."""
        batch = images.shape[0]
        # The original script runs the landmark CNN and the gather once per global view and once for
        # all local views together.
        call_rows = batch if num_tokens is None else views * batch
        with record_function("views.crops"):
            crops = random_resized_crops(images.repeat(views, 1, 1, 1), self.image_size, scale, generator)
        with record_function("views.landmark_cnn"):
            landmarks = self._landmarks(crops, call_rows)
        probabilities = torch.tensor(colour, dtype=torch.float64).repeat_interleave(batch, dim=0)  # [V*B, 2]
        params = draw_colour_parameters(
            crops.shape[0], probabilities[:, 0], probabilities[:, 1], generator, grayscale_p=self.grayscale_p
        )
        with record_function("views.colour"):
            coloured = jitter_and_gray_(crops.add_(1).mul_(0.5), params)
        with record_function("views.blur"):
            blur_(coloured, params)
        with record_function("views.colour"):
            coloured = solarize_(coloured, params).mul_(2).sub_(1)  # back to [-1, 1]
        index = None  # all landmarks in order
        if num_tokens is not None:
            index = draw_index(
                landmarks.shape[0],
                landmarks.shape[1],
                num_tokens,
                replacement=self.replacement,
                generator=generator,
                device=landmarks.device,
            )
        with record_function("views.gather"):
            tokens = self._gather(coloured, landmarks, index, self.jitter_std, generator, call_rows)
        return ViewGroup(tokens, self._token_positions(landmarks, index))

    def _fused_group(self, images, views, scale, colour, num_tokens, generator, source_landmarks) -> ViewGroup:
        """One view group of our path: the same draws as ``_original_group``, tokens sampled from the source."""
        batch, _, height, width = images.shape
        rows, size, device = views * batch, self.image_size, images.device
        with record_function("views.crops"):
            boxes, flips = random_crop_parameters(rows, height, width, scale, generator)
            host_affine = crop_affine(boxes, size, flips)  # [rows, 4] on the CPU, for the blur's sigmas
            affine = host_affine.to(device)
        if source_landmarks is None:  # per_view: the CNN sees each view's (uncoloured) crop
            with record_function("views.crops"):
                crops = resized_crops(images.repeat(views, 1, 1, 1), boxes, flips, size)
            with record_function("views.landmark_cnn"):
                landmarks = self._landmarks(crops, rows)
        else:
            landmarks = landmarks_into_views(source_landmarks, affine)
        probabilities = torch.tensor(colour, dtype=torch.float64).repeat_interleave(batch, dim=0)  # [V*B, 2]
        params = draw_colour_parameters(
            rows, probabilities[:, 0], probabilities[:, 1], generator, grayscale_p=self.grayscale_p
        )
        index = None
        if num_tokens is not None:
            index = draw_index(
                rows, landmarks.shape[1], num_tokens, replacement=self.replacement, generator=generator, device=device
            )
        centres = select_centres(
            landmarks,
            index=index,
            jitter_std=self.jitter_std,
            generator=generator,
            dtype=torch.promote_types(images.dtype, torch.float32),
        )
        blurred = params.blur.any()
        with record_function("views.gather"):
            # A blurred view's tokens come from its blurred source (below): a non-finite affine makes the
            # gather write zeros for those rows instead of sampling them twice.
            plain_affine = affine.masked_fill(params.blur.to(device)[:, None], float("nan")) if blurred else affine
            tokens = landmark_patch_gather(images, centres, self.patch_size, view_affine=plain_affine)
            samples = None
            if params.jitter.any():
                coarse_affine, coarse_centres = mean_sample_layout(affine, size, self.patch_size, MEAN_GRID)
                samples = landmark_patch_gather(
                    images, coarse_centres.to(centres.dtype), self.patch_size, view_affine=coarse_affine
                )
        if blurred:
            with record_function("views.blur"):
                tokens = self._blurred_tokens(images, tokens, centres, affine, host_affine, params)
        with record_function("views.colour"):
            weights = view_edge_weights(centres, self.patch_size, size)
            tokens = colour_tokens(tokens, params, samples, pixel_weights=weights)
        return ViewGroup(tokens, self._token_positions(landmarks, index))

    def _blurred_tokens(self, images, tokens, centres, affine, host_affine, params) -> torch.Tensor:
        """``tokens`` with the blurred views' rows gathered again from their source images blurred once with
        the view's sigma in source pixels (sigma * |scale| per axis: a Gaussian of the view is a Gaussian
        of the source under the affine); the blur comes before the colour jitter here, after it in the
        original (the same for the linear steps of the jitter, up to clamping)."""
        rows = torch.nonzero(params.blur).squeeze(1)
        scale = host_affine[rows, :2].abs().double()  # from the host copy: no device sync per step
        sigma_x, sigma_y = params.sigma[rows] * scale[:, 0], params.sigma[rows] * scale[:, 1]
        # taps out to 3 times the group's largest sigma, as the crop path's 6 for its largest sigma, 2
        radius = min(max(1, math.ceil(3 * float(torch.maximum(sigma_x, sigma_y).max()))), min(images.shape[-2:]) - 1)
        rows_dev = rows.to(images.device)
        # the host copy of the rows: checking the sources' range then needs no device sync
        sources = gaussian_blur(images, sigma_x, sigma_y, radius=radius, source_index=rows % images.shape[0])
        blurred = landmark_patch_gather(sources, centres[rows_dev], self.patch_size, view_affine=affine[rows_dev])
        return tokens.index_copy_(0, rows_dev, blurred)

    def _token_positions(self, landmarks, index) -> torch.Tensor:
        """``ViewGroup.index``: all landmarks in order (global views), each token's landmark id (local views,
        ``local_positions="landmark"``) or 0..K-1 (``"first"``: the original's first K + 1 positions)."""
        if index is None:
            return self._all_landmarks(landmarks)
        if self.local_positions == "first":
            return torch.arange(index.shape[1], device=index.device).expand_as(index)
        return index

    def _source_landmarks(self, images) -> torch.Tensor:
        """landmarks [B, L, 2] of the source images in their pixels (the CNN sees them resized to S x S when
        they have another size; bilinear with antialiasing, landmarks scaled back)."""
        height, width = images.shape[-2:]
        size = self.image_size
        if (height, width) == (size, size):
            return self._landmarks(images, images.shape[0])
        resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        scale = torch.tensor([width / size, height / size], device=images.device)
        return self._landmarks(resized, images.shape[0]) * scale

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
            landmarks,
            index=index,
            jitter_std=jitter_std,
            generator=generator,
            dtype=torch.promote_types(image.dtype, torch.float32),
        )
        return torch.cat(
            [
                gather_patches_loop(image_chunk, centre_chunk, self.patch_size)
                for image_chunk, centre_chunk in zip(image.split(call_rows), centres.split(call_rows))
            ]
        )

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
