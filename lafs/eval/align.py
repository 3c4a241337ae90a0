"""Face alignment to the ArcFace 112x112 template from five landmarks (insightface's ``norm_crop``)."""

import warnings

import numpy as np
from insightface.utils.face_align import arcface_dst, norm_crop

# Left eye, right eye, nose tip, left and right mouth corner in the 112x112 crop.
ARCFACE_TEMPLATE = np.array(arcface_dst, dtype=np.float32)


def align_face(image: np.ndarray, five_points) -> np.ndarray:
    """Warp ``image`` uint8 ``[H,W,3]`` so that ``five_points [5,2]`` (x, y pixels) land on the template.

    The similarity transform is the least-squares fit from the points to
    ``ARCFACE_TEMPLATE``; pixels from outside the image are 0. Returns uint8 ``[112,112,3]``
    in the channel order of ``image``.
    """
    points = np.asarray(five_points, dtype=np.float32)
    if points.shape != (5, 2):
        raise ValueError(f"expected five landmarks of shape (5, 2), got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"landmarks must be finite, got {points.tolist()}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an image [H,W,3], got shape {image.shape}")
    with warnings.catch_warnings():
        # scikit-image >= 0.26 deprecates the estimate() call inside norm_crop; same result.
        warnings.simplefilter("ignore", FutureWarning)
        return norm_crop(image, points)
