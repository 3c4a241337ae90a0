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
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from lafs.eval.align import align_face
from lafs.eval.embed import IMAGE_SIZE
from lafs.eval.verification import embed_with_flip

from .onnx_model import OnnxModel

COLORS = ("rgb", "bgr")
INPUT_LAYOUTS = (
    "uint8 [N, 112, 112, 3] (or one face [112, 112, 3]) or float [N, 3, 112, 112] in [-1, 1] (or one [3, 112, 112])"
)
RANGE_TOLERANCE = 1e-3  # float faces may exceed [-1, 1] by this much (rounding)


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
    torch device (default: a module's own device, else the CPU; for ONNX files, ``cuda`` picks
    onnxruntime's CUDA provider when installed); ``threads`` sets onnxruntime's intra-op threads; ``batch_size``
    faces go through the model at once (with their mirror images: twice as many).
    """

    def __init__(
        self,
        model: Union[nn.Module, str, os.PathLike],
        device: Union[str, torch.device, None] = None,
        batch_size: int = 64,
        threads: Optional[int] = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(model, nn.Module):
            # A model object stays where it is: the faces go to its device.
            held = next((p.device for p in model.parameters()), None)
            if device is not None and held is not None and torch.device(device) != held:
                raise ValueError(f"the model is on {held}, device={device!r}: move the model, or leave device unset")
            self.device = torch.device(device) if device is not None else held or torch.device("cpu")
            self.model = model
        else:
            self.device = torch.device(device if device is not None else "cpu")
            self.model = load_face_model(model, self.device, threads)
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
        read images), or float ``[N, 3, 112, 112]`` (or one ``[3, 112, 112]``)
        already scaled to [-1, 1] with ``(x - 127.5) / 127.5`` (channels in the
        order ``color``); a numpy array, a tensor, or a list of faces (an empty
        list gives ``[0, D]``).  A uint8 ``[N, 3, 112, 112]`` batch is read
        channels-first; a 3-D uint8 array must be one ``[112, 112, 3]`` face
        (a uint8 ``[3, 112, 112]`` is refused: it could be 3 grayscale faces).

        Raises ``ValueError`` for grayscale or other shapes, dtypes other than
        uint8 and floating point (int64, bool: convert to uint8), float values
        outside [-1, 1] (0..255 floats) and faces holding NaN or Inf.  Float
        faces with no negative value at all (as 0..1 images have; a real face
        scaled to [-1, 1] almost always has pixels darker than 127.5) only get
        a ``UserWarning``, since a very bright face can be legitimate.
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
        if isinstance(images, np.ndarray) and images.ndim in (2, 3):
            images = [images]
        for index, image in enumerate(images):
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                gray = " (grayscale: convert it to 3 channels)" if image.ndim == 2 or image.shape[2:] == (1,) else ""
                raise ValueError(
                    f"images must be uint8 [H, W, 3]; image {index} is {image.dtype} with shape {image.shape}{gray}"
                )
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
    """The caller's faces as one checked batch: uint8 ``[N, 112, 112, 3]`` / ``[N, 3, 112, 112]`` or float
    ``[N, 3, 112, 112]`` in [-1, 1] with finite values, channels in RGB order.  Every error names the
    caller's array (its shape and dtype), not a batch slice."""
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    if isinstance(faces, torch.Tensor):
        tensor = faces.detach().cpu()
        array = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    elif isinstance(faces, (list, tuple)) and len(faces) == 0:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    else:
        try:
            array = np.asarray(faces)
        except ValueError as err:  # a list of arrays of different shapes
            raise ValueError(f"faces must be one array, or a list of arrays of one shape: {err}") from None
    if array.shape == (0,):
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    is_uint8 = array.dtype == np.uint8
    is_float = np.issubdtype(array.dtype, np.floating)
    if not (is_uint8 or is_float):
        hint = ""
        if np.issubdtype(array.dtype, np.integer):
            hint = "; for 0..255 pixel values use .astype(np.uint8)"
        raise ValueError(
            f"faces must be uint8 (0..255) or floating point (scaled to [-1, 1]); got dtype {array.dtype} "
            f"with shape {array.shape}{hint}"
        )
    hwc, chw = (IMAGE_SIZE, IMAGE_SIZE, 3), (3, IMAGE_SIZE, IMAGE_SIZE)
    if array.ndim == 3 and ((is_uint8 and array.shape == hwc) or (is_float and array.shape == chw)):
        batch = array[None]  # one face
    elif array.ndim == 4 and (array.shape[1:] == chw or (is_uint8 and array.shape[1:] == hwc)):
        batch = array
    else:
        raise ValueError(_shape_problem(array.shape, array.dtype))
    if is_float:
        _check_float_faces(batch)
    if color == "bgr":
        channels_last = is_uint8 and batch.shape[-1] == 3
        batch = batch[..., ::-1] if channels_last else batch[:, ::-1]
    return np.ascontiguousarray(batch)


def _shape_problem(shape: tuple, dtype) -> str:
    """Why faces of this shape and dtype are refused, with a hint where the mistake is a common one."""
    size = IMAGE_SIZE
    message = f"faces must be {INPUT_LAYOUTS}; got {dtype} with shape {shape}"
    is_uint8 = dtype == np.uint8
    if shape == (3, size, size) and is_uint8:
        return (
            f"{message}: a uint8 [3, {size}, {size}] could be 3 grayscale faces or one channels-first face, "
            f"so it is refused. Pass one colour face as [{size}, {size}, 3] (or [1, 3, {size}, {size}]); "
            "convert grayscale faces to 3 channels"
        )
    one_channel = (len(shape) in (2, 3) and shape[-2:] == (size, size)) or shape[-3:] in (
        (size, size, 1),
        (1, size, size),
    )
    if one_channel:
        return f"{message}: grayscale faces? convert them to 3 channels, [N, {size}, {size}, 3]"
    if shape[-3:] in ((size, size, 4), (4, size, size)):
        return f"{message}: 4 channels (RGBA?): drop the alpha channel"
    if not is_uint8 and shape[-3:] == (size, size, 3):
        return (
            f"{message}: float faces are channels-first: pass uint8 [N, {size}, {size}, 3], "
            f"or transpose to [N, 3, {size}, {size}] scaled with (x - 127.5) / 127.5"
        )
    if len(shape) in (3, 4) and (3 in shape[-3:]):
        return f"{message}: faces must be aligned {size}x{size} crops (embed_images aligns photos by their five points)"
    return message


def _check_float_faces(batch: np.ndarray) -> None:
    """Refuse non-finite values (naming the faces) and values outside [-1, 1]; warn when no value is negative."""
    if batch.size == 0:
        return
    finite = np.isfinite(batch.reshape(len(batch), -1)).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite).tolist()
        listing = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        faces = "face" if len(bad) == 1 else "faces"
        verb = "holds" if len(bad) == 1 else "hold"
        raise ValueError(f"{faces} {listing} (of {len(batch)}) {verb} NaN or Inf values; a face must be finite")
    low, high = float(batch.min()), float(batch.max())
    if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"float faces must be scaled to [-1, 1]; these range from {low:g} to {high:g}. "
            "Pass uint8 faces [N, 112, 112, 3], or scale 0..255 pixels with (x - 127.5) / 127.5"
        )
    if low >= 0:
        warnings.warn(
            f"float faces hold no negative value (they range from {low:g} to {high:g}): are they 0..1 images? "
            "Faces scaled to [-1, 1] with (x - 127.5) / 127.5 almost always have some (from any pixel "
            "channel darker than 127.5). Pass uint8 faces, or scale 0..1 images with x * 2 - 1",
            UserWarning,
            stacklevel=4,
        )
