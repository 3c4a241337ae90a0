"""Test data of the evaluation code: verification .bin files, loose face crops, a tiny IJB folder, a tiny model."""

import copy
import io
import math
import os
import pickle
import struct
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from insightface.utils.face_align import norm_crop
from sklearn.metrics import roc_curve

from lafs.data import SyntheticFaces


def random_faces(rng: torch.Generator, count: int) -> np.ndarray:
    """Smooth random RGB images uint8 [count,112,112,3] (stand-ins for aligned faces)."""
    coarse = torch.rand(count, 3, 8, 8, generator=rng)
    smooth = torch.nn.functional.interpolate(coarse, size=(112, 112), mode="bilinear", align_corners=False)
    return (smooth * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_pairs(rng: torch.Generator, num_pairs: int, noise: float = 12.0) -> tuple[np.ndarray, list[bool]]:
    """Pairs of images: "same" pairs are one image and a noisy copy, others two unrelated images.

    Returns (images uint8 [2N,112,112,3] RGB, issame list of N).
    """
    issame = (torch.rand(num_pairs, generator=rng) < 0.5).tolist()
    firsts = random_faces(rng, num_pairs)
    others = random_faces(rng, num_pairs)
    noisy = np.clip(firsts + noise * torch.randn(firsts.shape, generator=rng).numpy(), 0, 255).astype(np.uint8)
    seconds = np.where(np.array(issame)[:, None, None, None], noisy, others)
    images = np.stack([firsts, seconds], axis=1).reshape(-1, 112, 112, 3)
    return images, issame


def synthetic_pairs(rng: torch.Generator, num_pairs: int) -> tuple[np.ndarray, list[bool]]:
    """Pairs of synthetic faces: two images of one identity, or of two identities.

    Returns (images uint8 [2N,112,112,3] RGB, issame list of N).
    """
    seed = int(torch.randint(0, 1000, (1,), generator=rng))
    faces = SyntheticFaces(num_identities=4, images_per_identity=4, seed=seed)
    issame = (torch.rand(num_pairs, generator=rng) < 0.5).tolist()
    images = []
    for same in issame:
        first, second = torch.randperm(4, generator=rng)[:2].tolist()
        image_a, image_b = torch.randperm(4, generator=rng)[:2].tolist()
        images.append(faces.render(4 * first + image_a)[0])
        images.append(faces.render(4 * (first if same else second) + image_b)[0])
    return np.stack(images), issame


def encode_png(rgb: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", rgb[:, :, ::-1])
    assert ok
    return encoded.tobytes()


class _Python2StylePickler(pickle._Pickler):
    """Writes byte strings as Python 2 ``str`` (BINSTRING), as the old .bin files hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def write_bin(path, images: np.ndarray, issame, *, py2_style=False, array_bins=False, protocol=pickle.HIGHEST_PROTOCOL):
    """Write a verification .bin: (encoded PNGs, issame) pickled like insightface's files."""
    bins = [encode_png(image) for image in images]
    if array_bins:
        bins = [np.frombuffer(encoded, np.uint8) for encoded in bins]
    buffer = io.BytesIO()
    if py2_style:
        _Python2StylePickler(buffer, protocol=2).dump((bins, list(issame)))
    else:  # issame as given: a list of bool or numpy.bool_, or a numpy array
        pickle.dump((bins, issame if isinstance(issame, np.ndarray) else list(issame)), buffer, protocol=protocol)
    with open(path, "wb") as file:
        file.write(buffer.getvalue())


class TinyFaceNet(torch.nn.Module):
    """A stand-in face model: [B,3,112,112] in [-1,1] -> [B,16], not flip invariant."""

    def __init__(self, rng: torch.Generator):
        super().__init__()
        self.pool = torch.nn.AvgPool2d(14)
        self.proj = torch.nn.Linear(3 * 8 * 8, 16)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=rng) * 0.2)
            self.proj.bias.copy_(torch.randn(16, generator=rng))

    def forward(self, x):
        return self.proj(self.pool(x).flatten(1))


def place_in_canvas(face: np.ndarray, points: np.ndarray, rng: torch.Generator, size=(260, 240)):
    """Warp a 112x112 face into a larger canvas with a random similarity transform.

    Returns (canvas uint8 [H,W,3], the points moved with the face [5,2]).
    """
    width, height = size
    scale = 1.3 + 0.7 * torch.rand(1, generator=rng).item()
    angle = math.radians(60 * torch.rand(1, generator=rng).item() - 30)
    rotation = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shift = 30 * torch.rand(2, generator=rng).numpy() - 15
    translation = np.array([width / 2, height / 2]) - rotation @ np.array([56.0, 56.0]) + shift
    matrix = np.concatenate([rotation, translation[:, None]], axis=1)
    canvas = cv2.warpAffine(face, matrix, (width, height), flags=cv2.INTER_CUBIC)
    return canvas, (points @ rotation.T + translation).astype(np.float32)


@dataclass
class IJBFolder:
    root: str
    names: list
    template_ids: list
    media_ids: list
    points: np.ndarray  # [I,5,2] in the loose crops
    faceness: np.ndarray  # [I]
    pairs: list  # (template 1, template 2, label)


def write_ijb_folder(
    root, rng: torch.Generator, target="ijbc", num_identities=3, templates_per_identity=2, images_per_template=3
) -> IJBFolder:
    """Loose crops of synthetic faces (each moved into a larger canvas by a random similarity),
    with their five points, faceness scores, templates of two media, and every template pair."""
    faces = SyntheticFaces(
        num_identities,
        templates_per_identity * images_per_template,
        seed=int(torch.randint(0, 1000, (1,), generator=rng)),
    )
    os.makedirs(os.path.join(root, "meta"))
    os.makedirs(os.path.join(root, "loose_crop"))
    template_pool = torch.randperm(9000, generator=rng)[: num_identities * templates_per_identity] + 1000
    names, template_ids, media_ids, points, identities = [], [], [], [], {}
    for index in range(len(faces)):
        face, label, face_points = faces.render(index)
        template = int(template_pool[index // images_per_template])
        identities[template] = label
        canvas, moved = place_in_canvas(face, face_points, rng)
        name = f"{index + 1}.jpg"
        cv2.imwrite(os.path.join(root, "loose_crop", name), canvas[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        names.append(name)
        template_ids.append(template)
        media_ids.append(1 + (index % images_per_template) // 2)  # media 1: two images, media 2: the rest
        points.append(moved)
    faceness = (0.3 + 0.7 * torch.rand(len(names), generator=rng)).numpy().astype(np.float32)
    templates = sorted(identities)
    pairs = [(a, b, int(identities[a] == identities[b])) for i, a in enumerate(templates) for b in templates[i + 1 :]]
    with open(os.path.join(root, "meta", f"{target}_face_tid_mid.txt"), "w") as file:
        file.writelines(f"{n} {t} {m}\n" for n, t, m in zip(names, template_ids, media_ids))
    with open(os.path.join(root, "meta", f"{target}_name_5pts_score.txt"), "w") as file:
        for name, five, score in zip(names, points, faceness):
            file.write(" ".join([name, *(f"{v:.4f}" for v in five.reshape(-1)), f"{score:.6f}"]) + "\n")
    with open(os.path.join(root, "meta", f"{target}_template_pair_label.txt"), "w") as file:
        file.writelines(f"{a} {b} {label}\n" for a, b, label in pairs)
    return IJBFolder(str(root), names, template_ids, media_ids, np.array(points), faceness, pairs)


def expected_pair_scores(model: torch.nn.Module, folder: IJBFolder, dtype=torch.float64) -> np.ndarray:
    """The protocol written out directly (in ``dtype``, all images in one batch)."""
    model = copy.deepcopy(model).to(dtype).eval()
    crops = []
    for name, five in zip(folder.names, folder.points):
        rgb = cv2.imread(os.path.join(folder.root, "loose_crop", name))[:, :, ::-1]
        crops.append(norm_crop(np.ascontiguousarray(rgb), np.round(five, 4)))
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).to(dtype) / 127.5 - 1
    with torch.no_grad():
        summed = (model(x) + model(x.flip(3))).double().numpy()
    scores_as_written = np.array([float(f"{score:.6f}") for score in folder.faceness])
    image_features = summed * scores_as_written[:, None]
    templates = {}
    for feature, template, medium in zip(image_features, folder.template_ids, folder.media_ids):
        templates.setdefault(template, {}).setdefault(medium, []).append(feature)
    normalised = {}
    for template, media in templates.items():
        total = sum(np.mean(features, axis=0) for features in media.values())
        normalised[template] = total / np.linalg.norm(total)
    return np.array([normalised[a] @ normalised[b] for a, b, _ in folder.pairs])


def direct_tar_at_far(labels, scores, fars):
    fpr, tpr, _ = roc_curve(labels, scores)
    result = {}
    for far in fars:
        # nearest FPR first, then the highest TPR
        order = np.lexsort((-tpr, np.abs(fpr - far)))
        result[far] = tpr[order[0]]
    return result
