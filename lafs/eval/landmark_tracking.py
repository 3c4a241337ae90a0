"""Do the landmarks find the face?  The landmark tracking score of a Part fViT landmark CNN.

Part fViT's landmark CNN learns without landmark labels; what it is meant to
learn is to put its patches on facial parts, per image.  The measure: render
held-out synthetic faces (``SyntheticFaces`` seed 777, identities from 5000
on, one image each, so none was trained on) with their true five points, run
the landmark CNN, and predict the true five points from the predicted
landmarks with a ridge regression, cross-validated over the faces:

* ``score``: R^2 of that prediction (variance-weighted over the 10 coordinates
  of the five points): 1 when the landmarks move with the face, ~0 when they
  carry nothing about where the face is (e.g. a fixed grid);
* ``spread_px``: how much the predicted landmarks move across images (the std
  over images of each coordinate, averaged over the 2L coordinates), beside
  ``true_spread_px``, the same for the true five points.

Real data has no five points, so runs on it leave the score out.
"""

from __future__ import annotations

import numpy as np
import torch

TRACKING_SEED = 777
TRACKING_IDENTITY_OFFSET = 5000
TRACKING_FACES = 400
RIDGE_ALPHAS = tuple(np.logspace(-3, 4, 15))


def tracking_faces(
    difficulty: float,
    colours: str = "per_image",
    count: int = TRACKING_FACES,
    pose_difficulty: float | None = None,
    seed: int = TRACKING_SEED,
    identity_offset: int = TRACKING_IDENTITY_OFFSET,
):
    """``count`` held-out synthetic faces, one per identity: (images uint8 [N,112,112,3], points float32 [N,5,2])."""
    from lafs.data import SyntheticFaces

    faces = SyntheticFaces(
        count,
        1,
        seed=seed,
        identity_offset=identity_offset,
        difficulty=difficulty,
        colours=colours,
        pose_difficulty=pose_difficulty,
    )
    rendered = [faces.render(i) for i in range(count)]
    return np.stack([r[0] for r in rendered]), np.stack([r[2] for r in rendered]).astype(np.float32)


@torch.no_grad()
def predict_landmarks(landmark_cnn: torch.nn.Module, images, device=None, batch_size: int = 100) -> np.ndarray:
    """The landmark CNN in eval mode on uint8 [N,112,112,3] (or float [N,3,112,112] in [-1, 1]) images:
    float32 [N, L, 2] pixel (x, y)."""
    from lafs.eval.embed import evaluation_mode, model_device_and_dtype, to_model_input

    device = device or model_device_and_dtype(landmark_cnn)[0]
    out = []
    with evaluation_mode(landmark_cnn):
        for start in range(0, len(images), batch_size):
            batch = to_model_input(images[start : start + batch_size], device)
            out.append(landmark_cnn(batch).float().cpu().numpy())
    return np.concatenate(out)


def spread(points: np.ndarray) -> float:
    """points [N, K, 2] -> std over the N images of each of the 2K coordinates, averaged (pixels)."""
    points = np.asarray(points, dtype=np.float64)
    return float(points.reshape(len(points), -1).std(axis=0).mean())


def tracking_score(landmarks: np.ndarray, points: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated R^2 of ``points`` [N, 5, 2] predicted from ``landmarks`` [N, L, 2].

    Each fold fits standardisation and a ridge regression (its strength chosen by
    leave-one-out among ``RIDGE_ALPHAS`` within the training folds) on the other folds'
    faces and predicts this fold's; R^2 is variance-weighted over the 10 target coordinates.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    landmarks = np.asarray(landmarks, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    if landmarks.ndim != 3 or points.ndim != 3 or len(landmarks) != len(points):
        raise ValueError(
            f"expected landmarks [N, L, 2] and points [N, K, 2] of the same N; got {landmarks.shape} and {points.shape}"
        )
    if len(points) < 2 * folds:
        raise ValueError(f"{len(points)} faces are too few for {folds}-fold cross-validation")
    features = landmarks.reshape(len(landmarks), -1)
    targets = points.reshape(len(points), -1)
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
    predicted = cross_val_predict(model, features, targets, cv=KFold(folds, shuffle=True, random_state=seed))
    return float(r2_score(targets, predicted, multioutput="variance_weighted"))


def _setting(item) -> tuple[float, float | None]:
    difficulty, pose = item if isinstance(item, (tuple, list)) else (item, None)
    difficulty = float(difficulty)
    pose = None if pose is None or float(pose) == difficulty else float(pose)
    return difficulty, pose


def measure(
    landmark_cnn: torch.nn.Module,
    settings,
    colours: str = "per_image",
    device=None,
    count: int = TRACKING_FACES,
    keep: bool = False,
) -> dict:
    """Tracking score and spreads for each setting (a difficulty, or a pair (difficulty, pose_difficulty)):
    ``{"difficulty_<d>[_pose_<p>]": {"difficulty", "pose_difficulty", "score", "spread_px", "true_spread_px",
    "faces"}}``; with ``keep`` each entry also holds ``images``, ``points`` and ``landmarks`` (for the picture)."""
    results = {}
    for difficulty, pose in dict.fromkeys(_setting(item) for item in settings):
        images, points = tracking_faces(difficulty, colours, count, pose_difficulty=pose)
        landmarks = predict_landmarks(landmark_cnn, images, device)
        entry = {
            "difficulty": difficulty,
            "pose_difficulty": difficulty if pose is None else pose,
            "score": tracking_score(landmarks, points),
            "spread_px": spread(landmarks),
            "true_spread_px": spread(points),
            "faces": int(count),
        }
        if keep:
            entry.update(images=images, points=points, landmarks=landmarks)
        results[f"difficulty_{difficulty:g}" + ("" if pose is None else f"_pose_{pose:g}")] = entry
    return results


def setting_name(entry: dict) -> str:
    """``difficulty 0.2`` or ``difficulty 0.2 (pose 1)``."""
    name = f"difficulty {entry['difficulty']:g}"
    if entry["pose_difficulty"] != entry["difficulty"]:
        name += f" (pose {entry['pose_difficulty']:g})"
    return name


def summary_line(results: dict) -> str:
    """One log line: ``landmark tracking R^2 0.93 (difficulty 0.2), ...; spread 3.1 px (true 2.1 px), ...``."""
    parts = [
        f"R^2 {r['score']:.3f} at {setting_name(r)} (landmark spread {r['spread_px']:.2f} px, "
        f"true five points {r['true_spread_px']:.2f} px)"
        for r in results.values()
    ]
    return "landmark tracking: " + "; ".join(parts)
