"""The export form of Part fViT: the eval-mode model with the patch gather spelled in standard operators.

``lafs_kernels.landmark_patch_gather`` is a custom op that no ONNX exporter
knows.  In eval mode (all landmarks, in order, no jitter) it equals one
``grid_sample`` on a ``[B, L*P, P, 2]`` grid, bilinear, zero padding,
``align_corners=False`` (``lafs_kernels.baselines.gather.gather_patches_batched``,
whose output has the op's token layout ``f = (i*P + j)*C + c``): sample (i, j) of
landmark (lx, ly) is read at pixel ``(lx + i - P/2 - 0.5, ly + j - P/2 - 0.5)``
by both.  The only difference is float32 rounding of the normalised grid
(``(l + a) / (S/2) - 1`` and back): about 1e-5 px, so tokens differ by up to
1.3e-5 for uniform noise in [-1, 1] (onnxruntime, 100 random cases of 4 x 196
patches; much less on smooth images; checked in tests/lafs/test_export.py).  A
non-finite landmark gives the op a zero patch, PyTorch's ``grid_sample`` a NaN one and onnxruntime's
GridSample an arbitrary one; the landmark CNN's min-max scaling only yields non-finite landmarks for
non-finite images, which ``FaceEmbedder`` and ``lafs.eval`` refuse.

The training code is not touched: the exporters wrap the model in
:class:`PartFViTExportForm`, which calls the model's own landmark CNN and
transformer around the standard-operator gather.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lafs.models import PartFViT
from lafs_kernels.baselines.gather import gather_patches_batched


def export_form_gather(images: torch.Tensor, landmarks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images [B, C, H, W], landmarks [B, L, 2] -> tokens [B, L, P*P*C] (GridSample in ONNX, opset >= 16).

    Equal to ``landmark_patch_gather(images, landmarks, patch_size)`` in eval mode
    up to float32 rounding of the grid; the grid is built in float32 whatever the
    image dtype, so coordinates keep their precision in a float16 model.
    """
    if landmarks.dtype != torch.float32:
        landmarks = landmarks.float()
    if images.dtype != torch.float32:
        images = images.float()
    return gather_patches_batched(images, landmarks, patch_size)


class PartFViTExportForm(nn.Module):
    """A :class:`PartFViT` for export: images float32 [B, 3, S, S] in [-1, 1] -> embeddings float32 [B, dim].

    Shares the model's landmark CNN and transformer (a float32 form adds no
    memory); use it in eval mode, which is what it stands for.

    ``half=True`` runs the transformer (nearly all of the weights and the work
    of ``part_fvit_b``) in float16, converted in a copy (the model passed in is
    not changed).  The landmark CNN, the coordinates and the gather stay float32:
    a float16 landmark CNN moves the patches by its rounding (per-face cosine to
    the float32 model fell to 0.998 on random images).  The interface is the
    same: float32 in, float32 out.
    """

    def __init__(self, model: PartFViT, half: bool = False):
        super().__init__()
        if not isinstance(model, PartFViT):
            raise TypeError(f"the export form wraps a PartFViT, got {type(model).__name__}")
        dtype = torch.float16 if half else torch.float32
        landmark_cnn, transformer = model.landmark_cnn, model.transformer
        if any(p.dtype != torch.float32 for p in landmark_cnn.parameters()):
            landmark_cnn = copy.deepcopy(landmark_cnn).float()  # the caller's model keeps its dtype
        if any(p.dtype != dtype for p in transformer.parameters()):
            transformer = copy.deepcopy(transformer).to(dtype)
        self.landmark_cnn = landmark_cnn
        self.transformer = transformer
        self.patch_size = model.patch_size
        self.image_size = model.image_size
        self.compute_dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images float32 [B, 3, S, S] in [-1, 1] -> embeddings float32 [B, dim]."""
        landmarks = self.landmark_cnn(images)
        tokens = export_form_gather(images, landmarks, self.patch_size)
        if self.compute_dtype == tokens.dtype:
            return self.transformer(tokens)
        return self.transformer(tokens.to(self.compute_dtype)).float()
