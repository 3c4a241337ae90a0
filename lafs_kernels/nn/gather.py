"""Module wrapper of :func:`lafs_kernels.landmark_patch_gather`."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..ops.landmark_patch_gather import draw_index, landmark_patch_gather


class LandmarkPatchGather(nn.Module):
    """Landmark-centred P x P patches as tokens, with training-time jitter and subsampling.

    In training mode each selected landmark gets N(0, jitter_std^2) noise and,
    when ``num_samples`` is set, each image keeps ``num_samples`` landmarks drawn
    uniformly (with replacement unless ``replacement=False``).  In eval mode all
    landmarks are used, in order, without noise.

    forward(image [B, C, H, W], landmarks [B, L, 2], generator=None, return_index=False)
      -> tokens [B, K, P*P*C]  (and index [B, K] int64 with ``return_index``; None
      when all landmarks are used in order)
    """

    def __init__(
        self, patch_size: int = 8, num_samples: Optional[int] = None, replacement: bool = True, jitter_std: float = 0.0
    ):
        super().__init__()
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 or None, got {num_samples}")
        if jitter_std < 0:
            raise ValueError(f"jitter_std must be >= 0, got {jitter_std}")
        self.patch_size = patch_size
        self.num_samples = num_samples
        self.replacement = replacement
        self.jitter_std = jitter_std

    def forward(
        self,
        image: Tensor,
        landmarks: Tensor,
        generator: Union[torch.Generator, int, None] = None,
        return_index: bool = False,
    ):
        index = None
        jitter_std = self.jitter_std if self.training else 0.0
        if self.training and self.num_samples is not None:
            if isinstance(generator, int) and not isinstance(generator, bool):
                generator = torch.Generator().manual_seed(generator)  # one generator for index and jitter
            index = draw_index(
                landmarks.shape[0],
                landmarks.shape[1],
                self.num_samples,
                replacement=self.replacement,
                generator=generator,
                device=landmarks.device,
            )
        tokens = landmark_patch_gather(
            image, landmarks, self.patch_size, index=index, jitter_std=jitter_std, generator=generator
        )
        return (tokens, index) if return_index else tokens

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, num_samples={self.num_samples}, replacement={self.replacement}, "
            f"jitter_std={self.jitter_std}"
        )
