"""Running a face model on aligned 112x112 crops, with the horizontal-flip view.

Both protocols embed every image and its mirror image; they differ only in what
they do with the two embeddings (``verification`` normalises their sum,
``ijb`` weights the raw sum), so the forward pass lives here once.
"""

import contextlib

import numpy as np
import torch
from torch import nn

IMAGE_SIZE = 112


def to_model_input(images, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Convert a batch of aligned crops to the model's input.

    images: uint8 ``[B,112,112,3]`` (RGB, as decoded) or ``[B,3,112,112]``, or a
    float ``[B,3,112,112]`` already scaled to [-1, 1]; a numpy array or a tensor.
    Returns ``[B,3,112,112]`` of ``dtype`` on ``device``, in [-1, 1].
    Raises ``ValueError`` for other dtypes, other shapes and float images holding NaN or Inf
    (the model could embed those as ordinary-looking faces).
    """
    batch = torch.as_tensor(images)
    if batch.dtype != torch.uint8 and not batch.is_floating_point():
        raise ValueError(
            f"images must be uint8 or floating point in [-1, 1], got dtype {batch.dtype} (shape {tuple(batch.shape)})"
        )
    if batch.ndim != 4:
        raise ValueError(f"expected a batch of images [B,3,112,112] or [B,112,112,3], got shape {tuple(batch.shape)}")
    if batch.dtype == torch.uint8 and batch.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3):
        batch = batch.permute(0, 3, 1, 2)
    if batch.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images [B,3,112,112] (or uint8 [B,112,112,3]), got shape {tuple(batch.shape)}")
    batch = batch.to(device, non_blocking=True)
    if batch.dtype == torch.uint8:
        # the insightface scaling: (x - 127.5) / 127.5
        return (batch.to(dtype) - 127.5) / 127.5
    finite = torch.isfinite(batch).flatten(1).all(1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"images {bad[:10]} of this batch of {len(batch)} hold NaN or Inf values")
    return batch.to(dtype)


def model_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first floating parameter (CPU float32 if it has none)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.float32


@contextlib.contextmanager
def evaluation_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block and restore its training flag after (training calls us)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def embed_original_and_flip(model: nn.Module, images, device: torch.device, dtype: torch.dtype = torch.float32):
    """Embed a batch and its horizontal flip in one forward pass.

    images: as for ``to_model_input``. Returns ``(embeddings [B,D], flipped_embeddings [B,D])``,
    raw (not normalised) float32 on ``device``. Call under ``torch.inference_mode()``.
    """
    batch = to_model_input(images, device, dtype)
    both = model(torch.cat([batch, torch.flip(batch, dims=[3])]))
    if both.ndim != 2 or both.shape[0] != 2 * batch.shape[0]:
        raise ValueError(
            f"the model must map images [B,3,112,112] to embeddings [B,D]; for B={2 * batch.shape[0]} "
            f"it returned shape {tuple(both.shape)}"
        )
    original, flipped = both.float().chunk(2)
    return original, flipped


def batch_slices(num_items: int, batch_size: int):
    """Yield ``slice`` objects covering ``range(num_items)`` in batches of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, num_items, batch_size):
        yield slice(start, min(start + batch_size, num_items))


def as_numpy(array) -> np.ndarray:
    """A numpy view of a tensor (moved to CPU) or an array-like."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)
