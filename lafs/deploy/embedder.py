"""``FaceEmbedder``: normalised face embeddings from any model this package reads, made as the evaluation does.

>>> embedder = FaceEmbedder("runs/demo/supervised")          # or a checkpoint, official weights, an .onnx file
>>> features = embedder.embed(aligned_rgb_faces)              # uint8 [N, 112, 112, 3] -> float32 [N, D], unit norm
>>> features = embedder.embed_images(photos, five_points)     # align with norm_crop first
>>> similarity = features[0] @ features[1]

Each face is embedded with its horizontal mirror image; the embedding is the
L2-normalised sum of the two (``lafs.eval.verification.embed_with_flip``, the
protocol of the verification sets), so scores match ``python -m lafs.eval``'s.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from lafs.eval.align import align_face
from lafs.eval.verification import embed_with_flip

from .onnx_model import OnnxModel

COLORS = ("rgb", "bgr")


def is_onnx_path(path: Union[str, os.PathLike]) -> bool:
    return os.fspath(path).lower().endswith(".onnx")


def load_face_model(
    path: Union[str, os.PathLike],
    device: Union[str, torch.device] = "cpu",
    threads: Optional[int] = None,
    **load_options,
) -> nn.Module:
    """A face model in eval mode from a run folder, one of our checkpoints, official weights
    (``lafs.models.load_model``, which also gets ``load_options``) or an ``.onnx`` file
    (:class:`OnnxModel`, run by onnxruntime with ``threads`` intra-op threads)."""
    if is_onnx_path(path):
        return OnnxModel(path, device=device, threads=threads)
    from lafs.models import load_model

    return load_model(path, device=device, **load_options)


class FaceEmbedder:
    """Flip-averaged, L2-normalised embeddings of aligned 112x112 faces.

    model: a path (see :func:`load_face_model`) or a module mapping images
    ``[B, 3, 112, 112]`` in [-1, 1] to embeddings ``[B, D]``.  ``device`` is the
    torch device (for ONNX files, ``cuda`` picks onnxruntime's CUDA provider when
    installed); ``threads`` sets onnxruntime's intra-op threads; ``batch_size``
    faces go through the model at once (with their mirror images: twice as many).
    """

    def __init__(
        self,
        model: Union[nn.Module, str, os.PathLike],
        device: Union[str, torch.device] = "cpu",
        batch_size: int = 64,
        threads: Optional[int] = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.model = model if isinstance(model, nn.Module) else load_face_model(model, device, threads)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @property
    def backend(self) -> str:
        """'onnxruntime' for an ONNX file, 'torch' otherwise."""
        return "onnxruntime" if isinstance(self.model, OnnxModel) else "torch"

    @property
    def embedding_dim(self) -> Optional[int]:
        return getattr(self.model, "embedding_dim", None)

    def embed(self, faces, color: str = "rgb") -> np.ndarray:
        """faces -> float32 [N, D], each row of unit length.

        faces: aligned crops, uint8 ``[N, 112, 112, 3]`` (or one ``[112, 112, 3]``)
        in the channel order ``color`` ('rgb', or 'bgr' as OpenCV and insightface
        read images), or float ``[N, 3, 112, 112]`` already scaled to [-1, 1]
        (channels in the order ``color``); a numpy array or a tensor.
        """
        batch = _as_batch(faces, color)
        if len(batch) == 0:
            return np.zeros((0, self.embedding_dim or 0), np.float32)
        embeddings, _ = embed_with_flip(
            self.model, batch, batch_size=self.batch_size, device=self.device if self.backend == "torch" else None
        )
        return embeddings

    def embed_images(self, images: Sequence[np.ndarray], five_points, color: str = "rgb") -> np.ndarray:
        """Align each image by its five points (insightface's ``norm_crop``), then :meth:`embed`.

        images: uint8 ``[H, W, 3]`` arrays (or one array); five_points ``[N, 5, 2]``
        (or ``[5, 2]`` for one image): left eye, right eye, nose tip, left and right
        mouth corner, (x, y) pixels, left meaning the image's left.
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        points = np.asarray(five_points, dtype=np.float32)
        if points.ndim == 2:
            points = points[None]
        if points.ndim != 3 or points.shape[1:] != (5, 2) or len(points) != len(images):
            raise ValueError(f"five_points must be [N, 5, 2] for N = {len(images)} images; got shape {points.shape}")
        aligned = [align_face(np.asarray(image), p) for image, p in zip(images, points)]
        if not aligned:
            return self.embed(np.zeros((0, 112, 112, 3), np.uint8), color)
        return self.embed(np.stack(aligned), color)


def _as_batch(faces, color: str) -> np.ndarray:
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    array = faces.detach().cpu().numpy() if isinstance(faces, torch.Tensor) else np.asarray(faces)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"faces must be uint8 [N, 112, 112, 3] or float [N, 3, 112, 112]; got shape {array.shape}")
    channels_last = array.dtype == np.uint8 and array.shape[-1] == 3
    if color == "bgr":
        array = array[..., ::-1] if channels_last else array[:, ::-1]
    return np.ascontiguousarray(array)
