"""Part fViT: landmark CNN -> landmark-centred patches -> transformer -> embedding."""

from __future__ import annotations

import torch
from torch import nn

from lafs_kernels import landmark_patch_gather

from .landmark_cnn import LandmarkCNN
from .transformer import PartTransformer


class PartFViT(nn.Module):
    """images [B, 3, S, S] in [-1, 1] -> embeddings [B, dim] (S = ``landmark_cnn.image_size``, 112 for LAFS).

    The landmark CNN predicts L pixel coordinates in [0, S - 1]; the fused
    ``lafs_kernels.landmark_patch_gather`` cuts a P x P patch around each one
    (the original's per-landmark ``grid_sample``, SPEC section 1) and lays them
    out as tokens [B, L, P*P*3]; the transformer turns them into the embedding.
    Gradients reach the landmark CNN through the gather, as in the original
    end-to-end training.

    State-dict keys are ``landmark_cnn.*`` and ``transformer.*``; official
    checkpoints (``stn.*``, ``output_layer.*``, ``patch_to_embedding.*``, ...)
    load through :func:`lafs.models.load_official_state_dict`.
    """

    def __init__(self, landmark_cnn: LandmarkCNN, transformer: PartTransformer, patch_size: int | None = None):
        super().__init__()
        patch_size = transformer.patch_size if patch_size is None else patch_size
        if patch_size != transformer.patch_size:
            raise ValueError(f"patch_size {patch_size} differs from the transformer's {transformer.patch_size}")
        if landmark_cnn.num_landmarks != transformer.num_landmarks:
            raise ValueError(
                f"the landmark CNN predicts {landmark_cnn.num_landmarks} landmarks but the transformer "
                f"has {transformer.num_landmarks} positions"
            )
        if transformer.channels != 3:
            raise ValueError(f"PartFViT feeds RGB patches; the transformer expects {transformer.channels} channels")
        self.landmark_cnn = landmark_cnn
        self.transformer = transformer
        self.patch_size = patch_size

    @property
    def embedding_dim(self) -> int:
        return self.transformer.dim

    @property
    def image_size(self) -> int:
        return self.landmark_cnn.image_size

    def arch_config(self) -> dict:
        """Flat constructor config; ``lafs.models.build_model(config)`` rebuilds the same architecture."""
        cnn = self.landmark_cnn.arch_config()
        return {
            **self.transformer.arch_config(),
            "image_size": cnn["image_size"],
            "landmark_blocks": cnn["blocks"],
            "landmark_stem_channels": cnn["stem_channels"],
            "landmark_readout_grid": cnn["readout_grid"],
        }

    def forward_with_landmarks(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] -> (embeddings [B, dim], landmarks [B, L, 2] pixel (x, y))."""
        size = self.image_size
        if images.dim() != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(
                f"PartFViT expects images [B, 3, {size}, {size}] in [-1, 1]; got shape {tuple(images.shape)}"
            )
        landmarks = self.landmark_cnn(images)
        tokens = landmark_patch_gather(images, landmarks, self.patch_size)
        return self.transformer(tokens), landmarks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_landmarks(images)[0]
