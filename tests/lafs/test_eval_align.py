"""lafs.eval.align: five-point alignment to the ArcFace template, on synthetic and real faces."""

import cv2
import numpy as np
import pytest
import torch
from insightface.data import get_image

from lafs.data import SyntheticFaces
from lafs.eval.align import ARCFACE_TEMPLATE, align_face

from helpers.eval_data import place_in_canvas

CENTRE = slice(16, 96)  # the face, away from the black border a warp may bring in


def centre_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b)[CENTRE, CENTRE].mean())


def test_alignment_recovers_a_face_moved_by_a_similarity(rng):
    faces = SyntheticFaces(3, 2, seed=int(torch.randint(0, 1000, (1,), generator=rng)))
    for index in range(len(faces)):
        face, _, points = faces.render(index)
        canvas, moved_points = place_in_canvas(face, points, rng)
        recovered = align_face(canvas, moved_points)
        # the fit is equivariant: aligning the moved face equals aligning the face where it was drawn
        expected = align_face(face, points)
        assert recovered.shape == (112, 112, 3) and recovered.dtype == np.uint8
        assert centre_difference(recovered, expected) < 3.0, f"face {index}"
        misplaced = align_face(canvas, moved_points + np.float32([6, 0]))
        assert centre_difference(misplaced, expected) > 3.0, f"face {index}: the check cannot tell a 6 px error"


# Five landmarks of the frontal face in the centre of insightface's t1.jpg (1280x886), read off the
# image by eye (left eye, right eye, nose tip, left and right mouth corner), x, y in pixels.
T1_FIVE_POINTS = np.float32([[491, 321], [538, 332], [508, 359], [490, 375], [526, 385]])


def eye_offsets(crop: np.ndarray, radius: int = 9) -> np.ndarray:
    """Offset [2, 2] of the darkest spot near each template eye from that eye (pixels)."""
    gray = cv2.GaussianBlur(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 1.5)
    offsets = []
    for x, y in np.round(ARCFACE_TEMPLATE[:2]).astype(int):
        window = gray[y - radius : y + radius + 1, x - radius : x + radius + 1]
        dy, dx = np.unravel_index(np.argmin(window), window.shape)
        offsets.append((x - radius + dx, y - radius + dy))
    return np.array(offsets) - ARCFACE_TEMPLATE[:2]


def vertical_offset_to(crop: np.ndarray, reference: np.ndarray, radius: int = 10) -> int:
    """Vertical shift that best matches the reference crop's eye-to-mouth region (normalised correlation)."""

    def gray(image):
        return cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 1.0)

    top, left = 40, 28
    correlation = cv2.matchTemplate(gray(crop), gray(reference)[top:100, left:84], cv2.TM_CCOEFF_NORMED)
    column = correlation[top - radius : top + radius + 1, left - radius : left + radius + 1].max(axis=1)
    return int(np.argmax(column)) - radius


def test_alignment_of_a_real_photo():
    photo = np.ascontiguousarray(get_image("t1", to_rgb=True))
    assert photo.shape == (886, 1280, 3)
    aligned = align_face(photo, T1_FIVE_POINTS)
    # insightface's Tom Hanks sample is an aligned ArcFace crop: the reference for where a face sits
    reference = np.ascontiguousarray(get_image("Tom_Hanks_54745", to_rgb=True))
    assert np.abs(eye_offsets(aligned)).max() <= 4, eye_offsets(aligned)
    assert abs(vertical_offset_to(aligned, reference)) <= 2
    # the same checks reject a crop from landmarks 10 px too low
    misaligned = align_face(photo, T1_FIVE_POINTS + np.float32([0, 10]))
    assert np.abs(eye_offsets(misaligned)).max() > 4 or abs(vertical_offset_to(misaligned, reference)) > 2


@pytest.mark.parametrize("points,match", [(np.zeros((4, 2)), r"shape \(5, 2\)"), (np.full((5, 2), np.nan), "finite")])
def test_align_rejects_bad_landmarks(points, match):
    with pytest.raises(ValueError, match=match):
        align_face(np.zeros((50, 50, 3), np.uint8), points)
