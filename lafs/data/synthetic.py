"""Synthetic aligned faces: the built-in data set that needs no files.

Each identity is a set of face-part parameters (outline, hairline, eyes, brows,
nose, mouth, and part textures: iris tone, brow style, freckles, moles,
stubble, wrinkles) drawn from a seeded generator; each image of an identity
adds nuisances that carry no identity: skin tone, hair and background colour,
background clutter, pose (in-plane rotation, scale, shift, a yaw-like parallax
of the inner parts), expression (smile, open mouth, raised brows, eye
openness), lighting (gradient, brightness, colour cast), blur and noise.  Skin
tone and background are per image on purpose, so that a global colour never
identifies anybody; ``colours="per_identity"`` gives each identity its own skin
tone and hair colour instead (as real people keep theirs across photographs, up to
lighting), with the background still drawn per image.

Faces are drawn around the ArcFace template (eyes near y=52, nose tip near
y=72, mouth corners near y=92 in a 112x112 crop), so they look like
insightface's aligned crops, and every image comes with its five landmarks.
Drawing is a few dozen anti-aliased, sub-pixel cv2 calls per face (about 2 ms
on one free CPU core); ``cache=True`` keeps rendered faces for later epochs.
"""

import math

import cv2
import numpy as np
import torch

from .image import IMAGE_SIZE, apply_transform

# Points are drawn with cv2's fixed-point `shift` for sub-pixel placement.
_SHIFT = 4
_SCALE = 1 << _SHIFT
_CENTER_X = 56.0
_ROTATION_CENTER = (56.0, 62.0)

# Skin RGB from dark to light (a level in [0, 1] between them) and the hair tint scaled by a hair level.
_SKIN_DARK, _SKIN_LIGHT = np.array([95.0, 62.0, 45.0]), np.array([240.0, 205.0, 180.0])
_HAIR_TINT = np.array([1.0, 0.85, 0.7])
COLOUR_MODES = ("per_image", "per_identity")  # SyntheticFaces(colours=...)

# Depth of each part for the yaw-like parallax: the nose moves most, the outline least.
_DEPTH_OUTLINE, _DEPTH_CHEEK, _DEPTH_EYES, _DEPTH_MOUTH, _DEPTH_NOSE = 0.0, 0.35, 0.55, 0.6, 1.0


class SyntheticFaces(torch.utils.data.Dataset):
    """Deterministic synthetic face data set, rendered on the fly.

    Item ``i`` is image ``i % images_per_identity`` of identity ``i // images_per_identity``
    (label = that identity, 0..num_identities-1).  Identities are global indices
    ``identity_offset + label``: data sets with the same ``seed`` and disjoint
    offset ranges hold disjoint identities (held-out verification identities).

    ``difficulty`` scales every per-image nuisance (0: identical images per
    identity apart from the random skin, hair and background colours, 1: the default
    strength; values up to about 2 stay face-like).  ``transform`` receives the
    uint8 ``[112,112,3]`` RGB array and returns one.  ``cache=True`` keeps the
    rendered uint8 images in memory (37 KB each).

    ``colours``: ``"per_image"`` (default) draws skin tone and hair colour for every
    image, so colour carries no identity; ``"per_identity"`` draws them once per
    identity, and each image only varies them slightly (every other nuisance, the
    background included, is the same draw in both modes).

    ``pose_difficulty`` (default: ``difficulty``) scales the pose nuisances alone (in-plane rotation,
    scale, shift, yaw), so a set can have a wide pose range and mild lighting, blur and noise; the
    random draws are the same, so ``pose_difficulty=difficulty`` renders the same images as the default.

    ``difficulty_warmup_epochs`` > 0 makes a curriculum for training:
    ``item_at(i, epoch)`` renders image ``i`` with the nuisances of the same
    random draw scaled down to ``difficulty * min(1, epoch / difficulty_warmup_epochs)`` (the pose
    strength by the same factor)
    (clean faces first, the full nuisances from that epoch on); ``dataset[i]``
    always renders at the full ``difficulty``.

    ``dataset[i] -> (image float32 [3,112,112] in [-1, 1], label int)``;
    ``render(i) -> (rgb uint8 [112,112,3], label, five_points float32 [5,2])``.
    """

    def __init__(
        self,
        num_identities: int,
        images_per_identity: int,
        seed: int = 0,
        identity_offset: int = 0,
        difficulty: float = 1.0,
        transform=None,
        cache: bool = False,
        difficulty_warmup_epochs: float = 0.0,
        colours: str = "per_image",
        pose_difficulty: float | None = None,
    ):
        if num_identities < 1 or images_per_identity < 1:
            raise ValueError(
                f"need at least one identity and one image per identity, got "
                f"num_identities={num_identities}, images_per_identity={images_per_identity}"
            )
        if seed < 0 or identity_offset < 0:
            raise ValueError(f"seed and identity_offset must be non-negative, got {seed}, {identity_offset}")
        if not 0.0 <= difficulty <= 3.0:
            raise ValueError(f"difficulty must be in [0, 3], got {difficulty}")
        if pose_difficulty is not None and not 0.0 <= pose_difficulty <= 3.0:
            raise ValueError(f"pose_difficulty must be in [0, 3] (or None: the difficulty), got {pose_difficulty}")
        if colours not in COLOUR_MODES:
            raise ValueError(f"colours must be one of {COLOUR_MODES}, got {colours!r}")
        if not difficulty_warmup_epochs >= 0.0:
            raise ValueError(f"difficulty_warmup_epochs must be non-negative, got {difficulty_warmup_epochs}")
        self.num_identities = int(num_identities)
        self.images_per_identity = int(images_per_identity)
        self.seed = int(seed)
        self.identity_offset = int(identity_offset)
        self.difficulty = float(difficulty)
        self.pose_difficulty = None if pose_difficulty is None else float(pose_difficulty)
        self.difficulty_warmup_epochs = float(difficulty_warmup_epochs)
        self.colours = colours
        self.transform = transform
        self.labels = np.repeat(np.arange(self.num_identities, dtype=np.int64), self.images_per_identity)
        self.num_classes = self.num_identities
        self._identities = {}
        self._cache = {} if cache else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image, label, _ = self.render(index)
        return apply_transform(image, self.transform, f"SyntheticFaces item {index}"), label

    def difficulty_at(self, epoch: int) -> float:
        """Nuisance strength of training epoch ``epoch`` (the curriculum of ``difficulty_warmup_epochs``)."""
        if self.difficulty_warmup_epochs <= 0.0:
            return self.difficulty
        return self.difficulty * min(1.0, epoch / self.difficulty_warmup_epochs)

    def item_at(self, index: int, epoch: int):
        """``dataset[index]`` as training epoch ``epoch`` sees it (rendered at ``difficulty_at(epoch)``)."""
        difficulty = self.difficulty_at(epoch)
        pose = None
        if self.pose_difficulty is not None:
            ramp = difficulty / self.difficulty if self.difficulty > 0 else 1.0
            pose = self.pose_difficulty * ramp
        image, label, _ = self.render(index, difficulty=difficulty, pose_difficulty=pose)
        return apply_transform(image, self.transform, f"SyntheticFaces item {index}"), label

    def render(self, index: int, difficulty: float | None = None, pose_difficulty: float | None = None):
        """Image ``index`` as (rgb uint8 [112,112,3], label, five_points float32 [5,2] in pixels:
        left eye, right eye, nose tip, left mouth corner, right mouth corner).

        ``difficulty`` (default: the data set's) scales the nuisances of the image's own random draw,
        ``pose_difficulty`` its pose alone (default: the data set's, or ``difficulty`` when that is None)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"SyntheticFaces index {index} out of range for {len(self)} images")
        index = int(index) % len(self)
        difficulty = self.difficulty if difficulty is None else float(difficulty)
        if pose_difficulty is None:
            pose_difficulty = difficulty if self.pose_difficulty is None else self.pose_difficulty
        key = (difficulty, float(pose_difficulty))
        cached = self._cache.get(index) if self._cache is not None else None
        if cached is not None and cached[0] == key:  # one difficulty per image is kept
            _, image, points = cached
            return image.copy(), int(self.labels[index]), points.copy()
        label, image_number = divmod(index, self.images_per_identity)
        identity = self._identity(label)
        rng = np.random.default_rng([self.seed, 2, self.identity_offset + label, image_number])
        nuisance = _sample_nuisance(rng, difficulty, pose_difficulty)
        if self.colours == "per_identity":
            # A stream of its own, so the other nuisances are the same draws as in the per-image mode.
            colour_rng = np.random.default_rng([self.seed, 4, self.identity_offset + label, image_number])
            nuisance.update(_identity_colours(identity, colour_rng))
        image, points = _render_face(identity, nuisance, rng)
        if self._cache is not None:
            self._cache[index] = (key, image, points)
            image, points = image.copy(), points.copy()
        return image, label, points

    def _identity(self, label: int) -> dict:
        if label not in self._identities:
            rng = np.random.default_rng([self.seed, 1, self.identity_offset + label])
            identity = _sample_identity(rng)
            # Used by colours="per_identity" only; a stream of its own leaves the face parts unchanged.
            colour_rng = np.random.default_rng([self.seed, 3, self.identity_offset + label])
            identity["skin_level"] = colour_rng.uniform(0.0, 1.0)
            identity["hair_level"] = colour_rng.uniform(15.0, 110.0)
            self._identities[label] = identity
        return self._identities[label]


def verification_pairs(dataset, num_pairs: int, seed: int = 0):
    """Balanced verification pairs from a data set's identities (e.g. held-out ``SyntheticFaces``).

    Returns ``(images float32 [2N,3,112,112], issame bool [N])`` with pair ``i`` =
    ``images[2i], images[2i+1]`` (the order of insightface's ``.bin`` files): the
    pairs of ``verification_pair_index`` rendered.
    """
    index, issame = verification_pair_index(dataset, num_pairs, seed=seed)
    images = torch.empty(2 * num_pairs, 3, IMAGE_SIZE, IMAGE_SIZE)
    for slot, item in enumerate(index):
        images[slot] = dataset[int(item)][0]
    return images, issame


def verification_pair_index(dataset, num_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Balanced verification pairs as indices into ``dataset``: ``(index int64 [2N], issame bool [N])``,
    pair ``i`` = items ``index[2i], index[2i+1]``.

    The first ``N // 2`` drawn pairs are positive (two different images of one identity)
    and the rest negative (two identities), then the pair order is shuffled.
    """
    if num_pairs < 2:
        raise ValueError(f"num_pairs must be at least 2 (one positive, one negative), got {num_pairs}")
    labels = np.asarray(dataset.labels)
    classes, counts = np.unique(labels, return_counts=True)
    repeated = classes[counts >= 2]
    if len(repeated) == 0 or len(classes) < 2:
        raise ValueError("verification pairs need an identity with at least two images and at least two identities")
    members = {label: np.flatnonzero(labels == label) for label in classes}
    rng = np.random.default_rng(seed)
    num_positive = num_pairs // 2
    pairs = []
    for label in rng.choice(repeated, size=num_positive):
        first, second = rng.choice(members[label], size=2, replace=False)
        pairs.append((first, second, True))
    for _ in range(num_pairs - num_positive):
        label_a, label_b = rng.choice(classes, size=2, replace=False)
        pairs.append((rng.choice(members[label_a]), rng.choice(members[label_b]), False))
    order = rng.permutation(num_pairs)
    index = np.array([[pairs[p][0], pairs[p][1]] for p in order], dtype=np.int64).reshape(-1)
    issame = np.array([pairs[p][2] for p in order], dtype=bool)
    return index, issame


def _sample_identity(rng: np.random.Generator) -> dict:
    """Face-part parameters of one identity, in the canonical (upright, frontal) 112x112 frame."""
    u = rng.uniform
    eye_half_spacing = u(14.0, 21.0)
    return {
        "face_center_y": u(57.0, 63.0),
        "face_half_width": u(33.0, 43.0),
        "face_half_height": u(45.0, 54.0),
        "forehead_power": u(2.0, 3.4),  # superellipse exponents: larger = squarer
        "chin_power": u(1.5, 3.0),
        "jaw_taper": u(0.0, 0.3),
        "hairline_y": u(12.0, 30.0),
        "hairline_curve": u(-8.0, 14.0),
        "hairline_tilt": u(-6.0, 6.0),
        "hair_strands": rng.integers(0, 14),
        "hair_strand_angle": u(-0.8, 0.8),
        "eye_half_spacing": eye_half_spacing,
        "eye_y": u(49.0, 55.0),
        "eye_half_width": u(5.5, 8.5),
        "eye_height_up": u(2.2, 4.6),
        "eye_height_down": u(1.2, 3.4),
        "eye_tilt": u(-0.28, 0.28),
        "iris_radius": u(0.45, 0.75),  # fraction of the eye opening
        "iris_tone": u(0.15, 0.7),  # darkness relative to the sclera
        "lid_thickness": int(rng.integers(1, 3)),
        "brow_gap": u(5.0, 11.0),
        "brow_length": u(11.0, 20.0),
        "brow_offset": u(-3.0, 3.0),
        "brow_thickness": u(1.5, 4.5),
        "brow_taper": u(0.2, 1.0),
        "brow_arch": u(-1.5, 5.0),
        "brow_slope": u(-0.3, 0.3),
        "brow_hatched": bool(rng.random() < 0.35),
        "nose_tip_y": u(68.0, 76.0),
        "nose_length": u(12.0, 24.0),
        "nose_half_width": u(5.0, 10.5),
        "nose_bridge_half_width": u(1.5, 4.5),
        "nostril_radius": u(1.0, 2.6),
        "nose_tip_drop": u(0.5, 4.0),
        "mouth_y": u(88.0, 95.0),
        "mouth_half_width": u(10.0, 17.0),
        "upper_lip": u(1.5, 4.5),
        "lower_lip": u(2.0, 6.0),
        "cupid_bow": u(0.0, 1.8),
        "mouth_curve": u(-2.0, 2.0),
        "lip_tone": u(0.55, 0.9),
        "moles": u([8.0, 20.0], [104.0, 104.0], size=(int(rng.integers(0, 4)), 2)),
        "mole_radius": u(0.8, 2.0),
        "freckles": u([20.0, 55.0], [92.0, 85.0], size=(int(rng.integers(0, 40)) * int(rng.random() < 0.4), 2)),
        "stubble": u([30.0, 80.0], [82.0, 112.0], size=(int(rng.integers(60, 160)) * int(rng.random() < 0.3), 2)),
        "forehead_wrinkles": int(rng.integers(0, 4)),
        "nasolabial_depth": u(0.0, 1.0) * (rng.random() < 0.5),
    }


def _skin(level: float, noise: np.ndarray) -> np.ndarray:
    return _SKIN_DARK + (_SKIN_LIGHT - _SKIN_DARK) * level + noise


def _identity_colours(identity: dict, rng: np.random.Generator) -> dict:
    """Skin and hair RGB of one image of an identity with its own tone: the identity's levels, a
    small per-image variation (a third of the per-image mode's channel noise)."""
    return {
        "skin": _skin(identity["skin_level"], rng.standard_normal(3) * 4.0),
        "hair": identity["hair_level"] * _HAIR_TINT + rng.standard_normal(3) * 3.0,
    }


def _sample_nuisance(rng: np.random.Generator, difficulty: float, pose: float | None = None) -> dict:
    """Per-image nuisances; every strength is proportional to ``difficulty``, the pose's to ``pose``
    (default ``difficulty``)."""
    d = difficulty
    p = difficulty if pose is None else pose
    n = rng.standard_normal
    skin_level = rng.uniform(0.0, 1.0)
    return {
        "angle": float(np.clip(n() * 9.0 * p, -25.0, 25.0)),
        "scale": float(math.exp(np.clip(n() * 0.06 * p, -0.2, 0.2))),
        "shift": np.clip(n(2) * 2.5 * p, -7.0, 7.0),
        "yaw": float(np.clip(n() * 0.35 * p, -0.8, 0.8)),
        "smile": float(n() * 2.0 * d),
        "mouth_open": float(max(0.0, n() * 2.5 * d)),
        "brow_raise": float(n() * 1.5 * d),
        "eye_open": float(math.exp(np.clip(n() * 0.25 * d, -0.9, 0.4))),
        "skin": _skin(skin_level, n(3) * 12.0),
        "hair": rng.uniform(15.0, 110.0) * _HAIR_TINT + n(3) * 8.0,
        "background": rng.uniform(0.0, 255.0, size=3),
        "background_corners": rng.uniform(-40.0, 40.0, size=(4, 3)),
        "clutter": int(rng.poisson(3.0 * d)),
        "light_gradient": rng.uniform(0.0, 0.55 * d),
        "light_angle": rng.uniform(0.0, 2.0 * math.pi),
        "brightness": float(math.exp(np.clip(n() * 0.2 * d, -0.6, 0.5))),
        "color_cast": np.exp(np.clip(n(3) * 0.06 * d, -0.2, 0.2)),
        "blur_sigma": rng.uniform(0.0, 1.1 * d),
        "noise_std": rng.uniform(1.0, 7.0) * d,
    }


class _Pose:
    """Maps canonical points to image pixels: yaw-like parallax by depth, then rotation/scale/shift."""

    def __init__(self, nuisance: dict):
        cx, cy = _ROTATION_CENTER
        angle = math.radians(nuisance["angle"])
        scale = nuisance["scale"]
        cos, sin = scale * math.cos(angle), scale * math.sin(angle)
        tx, ty = nuisance["shift"]
        self.matrix = np.array([[cos, -sin], [sin, cos]])
        self.offset = np.array([cx - cos * cx + sin * cy + tx, cy - sin * cx - cos * cy + ty])
        self.yaw = nuisance["yaw"]

    def __call__(self, points: np.ndarray, depth) -> np.ndarray:
        """points [N,2] canonical, depth scalar or [N] -> [N,2] pixel coordinates."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        x = _CENTER_X + (points[:, 0] - _CENTER_X) * (1.0 - 0.12 * abs(self.yaw)) + self.yaw * 9.0 * np.asarray(depth)
        return np.stack([x, points[:, 1]], axis=1) @ self.matrix.T + self.offset


class _DrawList:
    """Primitives in the canonical frame, drawn in order after one pose transform.

    Colours are ``skin_gain * skin + hair_gain * hair + constant`` so one list
    built per identity serves every image (whose skin and hair colours differ).
    Kinds: ``fill`` (polygons), ``line`` (open polylines), ``pixels`` (one pixel
    per point: freckle and stubble textures), ``disc`` (points[0] centre,
    points[1] x = radius).  A ``fill`` or ``line`` primitive may hold several
    curves of one colour: cv2 draws them in one call (the per-call overhead is
    what the rendering time is made of).
    """

    def __init__(self):
        self.kinds, self.curves, self.depths, self.thickness = [], [], [], []
        self.skin_gain, self.hair_gain, self.constant = [], [], []
        self.points = None  # set by freeze()

    def add(self, kind, curves, depth, skin=0.0, hair=0.0, constant=0.0, thickness=1):
        """``curves``: a list of [N,2] arrays of canonical points (one colour, one cv2 call)."""
        self.kinds.append(kind)
        self.curves.append([np.asarray(c, dtype=np.float64).reshape(-1, 2) for c in curves])
        self.depths.append(depth)
        self.thickness.append(max(1, int(round(thickness))))
        self.skin_gain.append(skin)
        self.hair_gain.append(hair)
        self.constant.append(constant)

    def freeze(self) -> "_DrawList":
        """Concatenate the per-primitive arrays once (lists built per identity are reused by every image)."""
        points = [c for curves in self.curves for c in curves]
        self.points = np.concatenate(points) if points else np.zeros((0, 2))
        counts = [sum(len(c) for c in curves) for curves in self.curves]
        self.point_depths = np.repeat(np.asarray(self.depths, dtype=np.float64), counts)
        self.spans, position = [], 0
        for curves in self.curves:
            spans = []
            for curve in curves:
                spans.append((position, position + len(curve)))
                position += len(curve)
            self.spans.append(spans)
        self.gains = []
        for values in (self.skin_gain, self.hair_gain, self.constant):
            gains = np.empty((len(values), 3))
            for k, value in enumerate(values):
                gains[k] = value
            self.gains.append(gains)
        return self

    def draw(self, canvas: np.ndarray, posed: np.ndarray, fixed: np.ndarray, skin, hair):
        """Draw onto the uint8 RGB canvas; ``posed`` / ``fixed`` are this list's points in pixels
        (float) and in cv2's fixed point (int32)."""
        skin_gain, hair_gain, constant = self.gains
        colors = np.clip(skin_gain * skin + hair_gain * hair + constant, 0.0, 255.0).tolist()
        for k, kind in enumerate(self.kinds):
            color, spans = colors[k], self.spans[k]
            if kind == "fill":
                cv2.fillPoly(canvas, [fixed[a:b] for a, b in spans], color, cv2.LINE_AA, _SHIFT)
            elif kind == "line":
                cv2.polylines(
                    canvas, [fixed[a:b] for a, b in spans], False, color, self.thickness[k], cv2.LINE_AA, _SHIFT
                )
            elif kind == "disc":
                start = spans[0][0]
                radius = int(self.points[start + 1, 0] * _SCALE)
                cv2.circle(canvas, tuple(fixed[start].tolist()), radius, color, -1, cv2.LINE_AA, _SHIFT)
            else:  # pixels
                start, stop = spans[0]
                xy = np.round(posed[start:stop]).astype(np.int64)
                inside = ((xy >= 0) & (xy < canvas.shape[0])).all(axis=1)
                canvas[xy[inside, 1], xy[inside, 0]] = color


def _draw_in_order(canvas: np.ndarray, pose: "_Pose", skin, hair, layers):
    """Draw ``layers`` = [(draw list, vertical shift)] in order, posing all their points at once."""
    lists = [layer.freeze() if layer.points is None else layer for layer, _ in layers]
    points = np.concatenate([layer.points + (0.0, shift) for layer, (_, shift) in zip(lists, layers)])
    posed = pose(points, np.concatenate([layer.point_depths for layer in lists]))
    fixed = np.round(posed * _SCALE).astype(np.int32)
    start = 0
    for layer in lists:
        stop = start + len(layer.points)
        layer.draw(canvas, posed[start:stop], fixed[start:stop], skin, hair)
        start = stop


def _ellipse(cx, cy, rx, ry, count=24):
    t = np.linspace(0.0, 2.0 * math.pi, count, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _outline(p: dict, count: int = 64) -> np.ndarray:
    """Face outline: a superellipse whose upper and lower halves have their own exponents, jaw tapered."""
    t = np.linspace(0.0, 2.0 * math.pi, count, endpoint=False)
    sin, cos = np.sin(t), np.cos(t)
    power = np.where(cos >= 0, p["forehead_power"], p["chin_power"])
    x = np.sign(sin) * np.abs(sin) ** (2.0 / power) * p["face_half_width"]
    x *= 1.0 - p["jaw_taper"] * np.clip(-cos, 0.0, 1.0) ** 2
    y = -np.sign(cos) * np.abs(cos) ** (2.0 / power) * p["face_half_height"]
    return np.stack([_CENTER_X + x, p["face_center_y"] + y], axis=1)


def _hairline(p: dict, x: np.ndarray) -> np.ndarray:
    u = (x - _CENTER_X) / p["face_half_width"]
    return p["hairline_y"] + p["hairline_curve"] * u**2 + p["hairline_tilt"] * u


def _ribbon(center, thickness):
    """Polygon around a centre line with the given per-point thickness."""
    direction = np.gradient(center, axis=0)
    normal = np.stack([-direction[:, 1], direction[:, 0]], axis=1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-9
    offset = normal * (thickness[:, None] * 0.5)
    return np.concatenate([center + offset, (center - offset)[::-1]])


def _build_identity_parts(p: dict) -> dict:
    """Per-identity drawing: the static lists (skin, textures, brows, nose) and the eye geometry."""
    back = _DrawList()
    outline = _outline(p)
    center = np.array([_CENTER_X, p["face_center_y"]])
    back.add("fill", [(outline - center) * 1.07 + center - (0.0, 2.0)], _DEPTH_OUTLINE, hair=1.0)
    strands = []
    for k in range(p["hair_strands"]):
        x0 = _CENTER_X + (k / max(1, p["hair_strands"] - 1) - 0.5) * 1.4 * p["face_half_width"]
        y0 = _hairline(p, np.array([x0]))[0]
        angle = p["hair_strand_angle"] + 0.25 * (k % 3 - 1)
        strands.append([[x0, y0 - 1.0], [x0 + 10.0 * math.sin(angle), y0 - 10.0 * math.cos(angle)]])
    if strands:
        back.add("line", strands, _DEPTH_OUTLINE, hair=0.55)
    skin_area = outline.copy()
    skin_area[:, 1] = np.maximum(skin_area[:, 1], _hairline(p, skin_area[:, 0]))
    back.add("fill", [skin_area], _DEPTH_OUTLINE, skin=1.0)
    wrinkles = []
    for k in range(p["forehead_wrinkles"]):
        x = np.linspace(_CENTER_X - 14.0, _CENTER_X + 14.0, 8)
        y = p["eye_y"] - p["brow_gap"] - 8.0 - 4.0 * k + 1.5 * ((x - _CENTER_X) / 14.0) ** 2
        if y[0] > _hairline(p, x[:1])[0] + 2.0:
            wrinkles.append(np.stack([x, y], 1))
    if wrinkles:
        back.add("line", wrinkles, _DEPTH_CHEEK, skin=0.8)
    back.add("pixels", [p["freckles"]], _DEPTH_CHEEK, skin=0.72)
    back.add("pixels", [p["stubble"]], _DEPTH_MOUTH, skin=0.55, hair=0.1)
    for mole in p["moles"]:
        back.add("disc", [[mole, (p["mole_radius"], 0.0)]], _DEPTH_CHEEK, skin=0.35)
    if p["nasolabial_depth"] > 0:
        folds = [
            [
                [_CENTER_X + side * (p["nose_half_width"] + 2.0), p["nose_tip_y"] - 1.0],
                [_CENTER_X + side * (p["mouth_half_width"] + 3.0), p["mouth_y"] - 1.0],
                [_CENTER_X + side * (p["mouth_half_width"] + 3.5), p["mouth_y"] + 4.0],
            ]
            for side in (-1, 1)
        ]
        back.add("line", folds, _DEPTH_CHEEK, skin=1.0 - 0.3 * p["nasolabial_depth"])

    brows = _DrawList()
    shapes = []
    for side in (-1, 1):
        line, thickness = _brow_line(p, side)
        if p["brow_hatched"]:
            shapes += [
                [[x - side * 0.8, y + t * 0.6], [x + side * 0.8, y - t * 0.6]] for (x, y), t in zip(line, thickness)
            ]
        else:
            shapes.append(_ribbon(line, thickness))
    brows.add("line" if p["brow_hatched"] else "fill", shapes, _DEPTH_EYES, skin=0.15, hair=0.8)

    nose = _DrawList()
    tip_y = p["nose_tip_y"]
    bridges = [
        [
            [_CENTER_X + side * p["nose_bridge_half_width"], tip_y - p["nose_length"]],
            [_CENTER_X + side * p["nose_bridge_half_width"] * 1.3, tip_y - p["nose_length"] * 0.5],
            [_CENTER_X + side * p["nose_half_width"], tip_y - 1.0],
        ]
        for side in (-1, 1)
    ]
    nose.add("line", bridges, 0.8, skin=0.78)
    nostrils = [
        _ellipse(
            _CENTER_X + side * p["nose_half_width"] * 0.5,
            tip_y + 1.0,
            p["nostril_radius"],
            p["nostril_radius"] * 0.6,
            10,
        )
        for side in (-1, 1)
    ]
    nose.add("fill", nostrils, _DEPTH_NOSE, skin=0.35)
    x = np.linspace(-1.0, 1.0, 9)
    nose.add(
        "line",
        [np.stack([_CENTER_X + x * p["nose_half_width"] * 0.8, tip_y + p["nose_tip_drop"] * (1.0 - x**2) - 1.0], 1)],
        _DEPTH_NOSE,
        skin=0.7,
    )
    return {"back": back.freeze(), "brows": brows.freeze(), "nose": nose.freeze(), "eyes": _eye_shapes(p)}


def _eye_shapes(p: dict):
    """Eye opening, upper lid, iris and pupil in eye-local coordinates (eye fully open), per side."""
    half_width = p["eye_half_width"]
    up, down = p["eye_height_up"], p["eye_height_down"]
    s = np.linspace(0.0, math.pi, 12)
    local_x = -np.cos(s) * half_width
    upper = np.stack([local_x, -up * np.sin(s)], axis=1)
    lower = np.stack([local_x[::-1], down * np.sin(s[::-1])], axis=1)
    frac = lambda x: np.clip(1.0 - (x / half_width) ** 2, 0.0, 1.0) ** 0.5  # noqa: E731

    def clip_to_opening(points):
        x = np.clip(points[:, 0], -half_width, half_width)
        return np.stack([x, np.clip(points[:, 1], -up * frac(x), down * frac(x))], axis=1)

    iris_r = p["iris_radius"] * (up + down) * 0.75
    iris = clip_to_opening(_ellipse(0.0, 0.3, iris_r, iris_r, 16))
    pupil = clip_to_opening(_ellipse(0.0, 0.3, 0.45 * iris_r, 0.45 * iris_r, 12))
    shapes = [np.concatenate([upper, lower]), upper, iris, pupil]
    sides = []
    for side in (-1, 1):
        tilt = side * p["eye_tilt"]  # outer corners up for positive tilt, mirrored between the eyes
        rotation = np.array([[math.cos(tilt), math.sin(tilt)], [-math.sin(tilt), math.cos(tilt)]])
        sides.append((rotation, np.array([_CENTER_X + side * p["eye_half_spacing"], p["eye_y"]])))
    return shapes, sides


def _brow_line(p: dict, side: int):
    """Brow centre line (inner end first) and its thickness along the line."""
    u = np.linspace(0.0, 1.0, 10)
    eye_x = _CENTER_X + side * p["eye_half_spacing"]
    inner_x = eye_x - side * (p["brow_length"] * 0.5 - p["brow_offset"])
    x = inner_x + side * p["brow_length"] * u
    y = (
        p["eye_y"]
        - p["brow_gap"]
        - p["brow_arch"] * 4.0 * u * (1.0 - u)
        + p["brow_slope"] * p["brow_length"] * (u - 0.5)
    )
    thickness = p["brow_thickness"] * (1.0 - p["brow_taper"] * 0.6 * u)
    return np.stack([x, y], axis=1), thickness


def _expression_parts(p: dict, parts: dict, nuisance: dict):
    """Eyes (openness) and mouth (smile, opening) of one image, and their canonical landmarks."""
    eyes = _DrawList()
    shapes, sides = parts["eyes"]
    squash = np.array([1.0, nuisance["eye_open"]])
    # per shape (opening, lid, iris, pupil): both eyes, each squashed by the openness then tilted and placed
    both = [[(shape * squash) @ rotation.T + center for rotation, center in sides] for shape in shapes]
    eyes.add("fill", both[0], _DEPTH_EYES, constant=(235.0, 232.0, 225.0))
    eyes.add("fill", both[2], _DEPTH_EYES, constant=np.array([200.0, 170.0, 140.0]) * (1.0 - p["iris_tone"]))
    eyes.add("fill", both[3], _DEPTH_EYES, constant=15.0)
    eyes.add("line", both[1], _DEPTH_EYES, skin=0.3, thickness=p["lid_thickness"])
    eye_centers = np.array([center for _, center in sides])

    mouth = _DrawList()
    half_width = p["mouth_half_width"] * (1.0 + 0.04 * nuisance["smile"])
    u = np.linspace(-1.0, 1.0, 15)
    x = _CENTER_X + u * half_width
    meet = p["mouth_y"] - (p["mouth_curve"] + nuisance["smile"]) * u**2  # where the lips meet
    gap = nuisance["mouth_open"] * (1.0 - u**2)
    upper_top = meet - p["upper_lip"] * (1.0 - u**2) ** 0.7 + p["cupid_bow"] * np.exp(-((u / 0.18) ** 2))
    lower_bottom = meet + gap + p["lower_lip"] * (1.0 - u**2) ** 0.8
    upper_edge, lower_edge = np.stack([x, meet - 0.5 * gap], 1), np.stack([x, meet + 0.5 * gap], 1)
    lip = np.array([0.95, 0.62, 0.62]) * p["lip_tone"]
    mouth.add("fill", [np.concatenate([upper_edge, lower_edge[::-1]])], _DEPTH_MOUTH, constant=(40.0, 20.0, 20.0))
    mouth.add("fill", [np.concatenate([np.stack([x, upper_top], 1), upper_edge[::-1]])], _DEPTH_MOUTH, skin=lip * 0.9)
    mouth.add("fill", [np.concatenate([lower_edge, np.stack([x, lower_bottom], 1)[::-1]])], _DEPTH_MOUTH, skin=lip)
    corners = np.array([[x[0], meet[0]], [x[-1], meet[-1]]])
    return eyes, mouth, eye_centers, corners


def _render_face(p: dict, nuisance: dict, rng: np.random.Generator):
    """Draw one face; returns (rgb uint8 [112,112,3], five points float32 [5,2])."""
    if "_parts" not in p:
        p["_parts"] = _build_identity_parts(p)
    parts = p["_parts"]
    pose = _Pose(nuisance)
    canvas = _background(nuisance, rng)
    skin, hair = nuisance["skin"], nuisance["hair"]
    eyes, mouth, eye_centers, corners = _expression_parts(p, parts, nuisance)
    layers = [
        (parts["back"], 0.0),
        (eyes, 0.0),
        (parts["brows"], -nuisance["brow_raise"]),
        (parts["nose"], 0.0),
        (mouth, 0.0),
    ]
    _draw_in_order(canvas, pose, skin, hair, layers)
    image = _photometric(canvas, nuisance, rng)
    points = np.concatenate(
        [pose(eye_centers, _DEPTH_EYES), pose([[_CENTER_X, p["nose_tip_y"]]], _DEPTH_NOSE), pose(corners, _DEPTH_MOUTH)]
    )
    return image, points.astype(np.float32)


def _background(nuisance: dict, rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB canvas: a bilinear blend of four random corner colours, and a few random blobs (clutter)."""
    corners = np.clip(nuisance["background"] + nuisance["background_corners"], 0, 255).astype(np.uint8)
    canvas = cv2.resize(corners.reshape(2, 2, 3), (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)
    for _ in range(nuisance["clutter"]):
        center, axes = rng.uniform(0, IMAGE_SIZE, 2) * _SCALE, rng.uniform(3, 25, 2) * _SCALE
        cv2.ellipse(
            canvas,
            tuple(center.astype(int).tolist()),
            tuple(axes.astype(int).tolist()),
            0.0,
            0.0,
            360.0,
            rng.uniform(0, 255, 3).tolist(),
            -1,
            cv2.LINE_AA,
            _SHIFT,
        )
    return canvas


# Fixed unit-variance noise; each image reads a random window of it with a random sign
# (drawing fresh Gaussian noise per image costs more than the rest of the rendering).
_NOISE = np.random.default_rng(20240607).standard_normal((2 * IMAGE_SIZE, 2 * IMAGE_SIZE, 3), dtype=np.float32)


def _photometric(canvas: np.ndarray, nuisance: dict, rng: np.random.Generator) -> np.ndarray:
    """Blur, lighting gradient, brightness, colour cast and noise; returns uint8."""
    if nuisance["blur_sigma"] > 0.3:
        canvas = cv2.GaussianBlur(canvas, (0, 0), nuisance["blur_sigma"])
    # The light ramp: a bilinear blend of four corner gains (cv2.resize of a 2x2 image is the fast way).
    direction = np.array([math.cos(nuisance["light_angle"]), math.sin(nuisance["light_angle"])])
    corner_signs = np.array([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    corners = 1.0 + nuisance["light_gradient"] * (corner_signs @ direction)
    gains = (corners[:, None] * (nuisance["brightness"] * nuisance["color_cast"])).astype(np.float32)
    light = cv2.resize(gains.reshape(2, 2, 3), (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR)
    image = canvas.astype(np.float32) * light
    if nuisance["noise_std"] > 0:
        top, left = rng.integers(0, IMAGE_SIZE, 2)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        image += _NOISE[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE] * np.float32(sign * nuisance["noise_std"])
    return np.clip(image, 0.0, 255.0).astype(np.uint8)
