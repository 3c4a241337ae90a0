"""The one conversion every dataset ends with: an aligned uint8 crop to the model's input.

Datasets hand their optional ``transform`` a uint8 ``[112,112,3]`` RGB numpy
array (HWC, what cv2 and numpy augmentations work on) and expect the same kind
of array back; :func:`to_model_tensor` then makes the float input.
"""

import os

import cv2
import numpy as np
import torch

IMAGE_SIZE = 112


def to_model_tensor(image: np.ndarray, source: str = "image") -> torch.Tensor:
    """uint8 ``[112,112,3]`` RGB -> float32 ``[3,112,112]`` in [-1, 1] (insightface: (x - 127.5) / 127.5).

    ``source`` names the image (file and record) in the error raised for a wrong shape or dtype.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise TypeError(f"{source}: expected a uint8 numpy array [112,112,3] (after transform), got {kind}")
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(
            f"{source}: expected an aligned {IMAGE_SIZE}x{IMAGE_SIZE} RGB crop [112,112,3], got shape {image.shape}; "
            "align faces first (python -m lafs.data pack --align) or resize them in the transform"
        )
    # numpy rather than torch ops: in DataLoader workers torch's intra-op threads only add overhead here.
    chw = image.transpose(2, 0, 1).astype(np.float32)
    chw -= 127.5
    chw /= 127.5
    return torch.from_numpy(chw)


def apply_transform(image: np.ndarray, transform, source: str) -> torch.Tensor:
    """Run the optional uint8-HWC ``transform`` and convert the result with :func:`to_model_tensor`."""
    if transform is not None:
        image = transform(image)
    return to_model_tensor(image, source)


def read_image_bgr(path) -> np.ndarray:
    """Decode an image file to a uint8 ``[H,W,3]`` array in cv2's BGR order; clear error when unreadable."""
    data = np.fromfile(str(path), dtype=np.uint8) if os.path.isfile(path) else None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
    if image is None:
        reason = "no such file" if data is None else "empty file" if not data.size else "not a decodable image"
        raise ValueError(f"cannot read image {path}: {reason}")
    return image
