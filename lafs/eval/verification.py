"""The insightface verification sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW): 10-fold accuracy with flip.

Protocol (``docs/DATA.md``): decode each image to RGB, scale to [-1, 1], embed
it and its horizontal flip, sum the two and L2-normalise. XNorm is the mean L2
norm of the raw embeddings (originals and flips). A pair's distance is the
squared L2 distance of its two normalised embeddings; it is called "same" when
the distance is below the threshold (strictly, as insightface does). Thresholds
``0, 0.01, ..., 3.99``; the pairs are cut into 10 contiguous folds (KFold without
shuffling); for each fold the first threshold of highest accuracy on the other
nine folds is applied to it. The result is the mean and std of the fold accuracies.
"""

import io
import os
import pickle
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from .embed import (
    IMAGE_SIZE,
    as_numpy,
    batch_slices,
    embed_original_and_flip,
    evaluation_mode,
    model_device_and_dtype,
)

THRESHOLDS = np.arange(0, 4, 0.01)
NROF_FOLDS = 10  # the protocol's folds; a .bin must hold at least this many pairs

# The only globals a .bin pickle may name: what numpy arrays (the images, in some
# files) pickle through: _reconstruct + ndarray + dtype up to protocol 4,
# _frombuffer + dtype at protocol 5 (Python 3.8+'s HIGHEST_PROTOCOL); numpy scalars
# (numpy.bool_ flags in issame) through scalar + dtype; and _codecs.encode, through which
# Python 3 writes bytes at protocol 2 or lower (a codec turns a str into bytes, it runs no
# code). Containers, Python 2 byte strings and booleans need no global.
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """A .bin file names a global outside ``ALLOWED_GLOBALS`` (it could run code when loaded)."""


class _BinUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self._path}: refusing to load: the pickle names the global {module}.{name}, which a "
                f"verification .bin never holds (allowed: {', '.join(sorted(m + '.' + n for m, n in ALLOWED_GLOBALS))})"
            )
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            # numpy >= 2 warns on the old module path; it is the same function.
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def _decode_image(encoded, path: str, index: int) -> np.ndarray:
    if isinstance(encoded, np.ndarray):
        encoded = encoded.tobytes()
    if not isinstance(encoded, (bytes, bytearray)):
        raise ValueError(f"{path}: image {index} is a {type(encoded).__name__}, expected encoded image bytes")
    if not encoded:  # OpenCV asserts on an empty buffer (cv2.error, not None)
        raise ValueError(f"{path}: image {index} is empty (0 bytes), expected encoded image bytes")
    bgr = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path}: image {index} ({len(encoded)} bytes) could not be decoded")
    if bgr.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"{path}: image {index} decodes to shape {bgr.shape}, expected (112, 112, 3)")
    return bgr[:, :, ::-1]


def _is_flag(flag) -> bool:
    """A pair label: a bool, numpy.bool_, or an integer 0 / 1 (``bool("False")`` is True, so nothing else)."""
    if isinstance(flag, (bool, np.bool_)):
        return True
    return isinstance(flag, (int, np.integer)) and flag in (0, 1)


def _sequence(value, path: str, what: str):
    """``value`` if it is a list, tuple or 1-D array, else a ValueError naming ``path``."""
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1):
        return value
    shape = f" of shape {value.shape}" if isinstance(value, np.ndarray) else ""
    raise ValueError(f"{path}: {what} is a {type(value).__name__}{shape}, expected a list")


def load_bin(path: str | os.PathLike) -> tuple[np.ndarray, list[bool]]:
    """Read a verification ``.bin`` safely.

    Returns ``(images uint8 [2N,112,112,3] RGB, issame list[bool] of N)``; pair i is
    images ``2i`` and ``2i+1``. Raises ``UnsafePickleError`` for a pickle that names
    any global other than numpy's array reconstruction, ``ValueError`` for a file
    whose content is not ``(bins, issame)`` of matching lengths, an ``issame`` entry that is not
    a boolean (or 0 / 1), fewer than ``NROF_FOLDS`` pairs, or an image that fails to decode.
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        payload = file.read()
    try:
        loaded = _BinUnpickler(io.BytesIO(payload), path).load()
    except UnsafePickleError:
        raise
    except Exception as error:
        raise ValueError(f"{path}: not a readable verification .bin pickle ({error})") from error
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(loaded).__name__}")
    bins = _sequence(loaded[0], path, "the image list (bins)")
    issame = _sequence(loaded[1], path, "the pair labels (issame)")
    for index, flag in enumerate(issame):
        if not _is_flag(flag):
            raise ValueError(f"{path}: issame[{index}] is {flag!r}, expected a boolean (True / False or 1 / 0)")
    issame = [bool(flag) for flag in issame]
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; expected {2 * len(issame)}")
    if len(issame) < NROF_FOLDS:
        raise ValueError(f"{path}: {len(issame)} pairs; the {NROF_FOLDS}-fold protocol needs at least {NROF_FOLDS}")
    images = np.empty((len(bins), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for index, encoded in enumerate(bins):
        images[index] = _decode_image(encoded, path, index)
    return images, issame


@dataclass(frozen=True)
class VerificationResult:
    """Per-fold results of ``evaluate``: ``accuracies`` and ``best_thresholds``, both ``[nrof_folds]``."""

    accuracies: np.ndarray
    best_thresholds: np.ndarray

    @property
    def accuracy(self) -> float:
        return float(self.accuracies.mean())

    @property
    def std(self) -> float:
        return float(self.accuracies.std())

    @property
    def threshold(self) -> float:
        """Mean over the folds of the threshold chosen on the other folds."""
        return float(self.best_thresholds.mean())


def _accuracy_per_threshold(distances: np.ndarray, actual_issame: np.ndarray) -> np.ndarray:
    """distances, actual_issame: [M] -> accuracy of ``distance < t`` for every t in THRESHOLDS, [T]."""
    predicted = distances[None, :] < THRESHOLDS[:, None]
    return (predicted == actual_issame[None, :]).mean(axis=1)


def evaluate(embeddings, issame, nrof_folds: int = NROF_FOLDS) -> VerificationResult:
    """10-fold verification accuracy of pairs of normalised embeddings.

    embeddings: ``[2N, D]`` in pair order (flip-summed and L2-normalised); issame: N booleans.
    Returns the accuracy of each held-out fold and the threshold chosen for it.  Distances are formed in
    float64 (insightface's in float32: a few pairs in a million fall on the other side of a 0.01 threshold
    step, far below the accuracy's printed digits).
    """
    embeddings = as_numpy(embeddings).astype(np.float64)
    actual_issame = np.asarray(issame, dtype=bool)
    num_pairs = actual_issame.shape[0]
    if embeddings.ndim != 2 or embeddings.shape[0] != 2 * num_pairs:
        raise ValueError(
            f"expected embeddings [2N, D] = [{2 * num_pairs}, D] for {num_pairs} pairs, got {embeddings.shape}"
        )
    if not 2 <= nrof_folds <= num_pairs:
        raise ValueError(f"nrof_folds must be between 2 and the number of pairs ({num_pairs}), got {nrof_folds}")
    distances = np.square(embeddings[0::2] - embeddings[1::2]).sum(axis=1)
    # KFold(shuffle=False): contiguous folds, the first (num_pairs % folds) one pair longer.
    fold_sizes = np.full(nrof_folds, num_pairs // nrof_folds)
    fold_sizes[: num_pairs % nrof_folds] += 1
    fold_ends = np.cumsum(fold_sizes)
    accuracies = np.empty(nrof_folds)
    best_thresholds = np.empty(nrof_folds)
    for fold, (start, end) in enumerate(zip(fold_ends - fold_sizes, fold_ends)):
        in_test = np.zeros(num_pairs, bool)
        in_test[start:end] = True
        train_accuracy = _accuracy_per_threshold(distances[~in_test], actual_issame[~in_test])
        best = int(np.argmax(train_accuracy))  # argmax: the first threshold of highest accuracy
        best_thresholds[fold] = THRESHOLDS[best]
        accuracies[fold] = np.mean((distances[in_test] < THRESHOLDS[best]) == actual_issame[in_test])
    return VerificationResult(accuracies, best_thresholds)


def embed_with_flip(model: nn.Module, images, batch_size: int = 64, device=None) -> tuple[np.ndarray, float]:
    """Embed images with the flip test.

    images: ``[N,3,112,112]`` float in [-1, 1], or uint8 ``[N,3,112,112]`` / ``[N,112,112,3]``.
    Returns ``(embeddings float32 [N, D]``: L2-normalised sum of the image's and its flip's
    embedding, ``xnorm``: mean L2 norm of the raw embeddings of images and flips).
    The model is used on ``device`` (default: where its parameters are) in eval mode;
    its training flag is restored afterwards.
    """
    model_device, dtype = model_device_and_dtype(model)
    device = torch.device(device) if device is not None else model_device
    chunks, norm_sum = [], 0.0
    with evaluation_mode(model), torch.inference_mode():
        for batch in batch_slices(len(images), batch_size):
            original, flipped = embed_original_and_flip(model, images[batch], device, dtype)
            norm_sum += (original.norm(dim=1).sum() + flipped.norm(dim=1).sum()).item()
            chunks.append(torch.nn.functional.normalize(original + flipped, dim=1).cpu())
    xnorm = norm_sum / (2 * len(images))
    return torch.cat(chunks).numpy(), xnorm


def verify_model(
    model: nn.Module, images, issame, batch_size: int = 64, device=None, nrof_folds: int = NROF_FOLDS, pair_index=None
) -> dict:
    """Run the whole verification protocol for one set.

    images: ``[2N,3,112,112]`` float in [-1, 1] or uint8 (``[2N,112,112,3]`` as ``load_bin`` returns);
    issame: N booleans. With ``pair_index`` (int ``[2N]``) ``images`` are ``M`` distinct images
    ``[M,...]``, each embedded once, and pair ``i`` is ``images[pair_index[2i]], images[pair_index[2i+1]]``.
    Returns ``{"accuracy": mean fold accuracy, "std": std over folds,
    "threshold": mean chosen threshold, "xnorm": mean raw embedding norm, "num_pairs": N}``; with
    ``pair_index`` the XNorm is the mean over the M distinct images (a .bin's 2N images count a repeated
    image each time it appears).
    """
    if pair_index is None:
        if len(images) != 2 * len(issame):
            raise ValueError(f"{len(images)} images for {len(issame)} pairs; expected {2 * len(issame)}")
    else:
        pair_index = np.asarray(pair_index, dtype=np.int64)
        if pair_index.shape != (2 * len(issame),):
            raise ValueError(
                f"pair_index has shape {pair_index.shape} for {len(issame)} pairs; expected ({2 * len(issame)},)"
            )
        if len(pair_index) and not 0 <= pair_index.min() <= pair_index.max() < len(images):
            raise ValueError(
                f"pair_index holds values outside [0, {len(images)}): {pair_index.min()}..{pair_index.max()}"
            )
    embeddings, xnorm = embed_with_flip(model, images, batch_size=batch_size, device=device)
    if pair_index is not None:
        embeddings = embeddings[pair_index]
    result = evaluate(embeddings, issame, nrof_folds=nrof_folds)
    return {
        "accuracy": result.accuracy,
        "std": result.std,
        "threshold": result.threshold,
        "xnorm": xnorm,
        "num_pairs": len(issame),
    }
