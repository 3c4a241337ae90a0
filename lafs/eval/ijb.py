"""IJB-B / IJB-C 1:1 verification: template features, pair scores, TAR at FAR.

Protocol (``docs/DATA.md``): under the dataset root, ``meta/<t>_face_tid_mid.txt``
(image name, template id, media id), ``meta/<t>_name_5pts_score.txt`` (image name,
five x,y landmarks, faceness score; the same images in the same order) and
``meta/<t>_template_pair_label.txt`` (template 1, template 2, label); images in
``loose_crop/``. Each image is aligned with ``norm_crop``; its feature is
(embedding of the image + embedding of its flip) x faceness score. A template's
feature is the sum over its media of the mean feature of the media's images,
L2-normalised; a pair's score is the dot product of its two template features.

Bad input is never skipped, because the protocol scores every listed pair from
every listed image: a missing meta file, a malformed line, a landmark or faceness
score that is not finite, an image that cannot be decoded, a name mismatch between
the two image lists, a pair naming a template without images, or a pair list
without both genuine and impostor pairs raises an error naming the file (and line).
"""

import os
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from sklearn.metrics import roc_curve
from torch import nn
from tqdm import tqdm

from .align import align_face
from .embed import IMAGE_SIZE, embed_original_and_flip, evaluation_mode, model_device_and_dtype

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TARGETS = ("IJBB", "IJBC")


# ---------------------------------------------------------------- metric


def roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.metrics.roc_curve(labels, scores)`` -> (fpr, tpr), both nondecreasing."""
    fpr, tpr, _ = roc_curve(np.asarray(labels), np.asarray(scores))
    return fpr, tpr


def tar_at_far_from_roc(fpr: np.ndarray, tpr: np.ndarray, fars=FARS) -> dict:
    """For each FAR the TPR of the ROC point whose FPR is nearest to it (ties: the highest TPR)."""
    result = {}
    for far in fars:
        distance = np.abs(fpr - far)
        result[far] = float(tpr[distance == distance.min()].max())
    return result


def tar_at_far(labels, scores, fars=FARS) -> dict:
    """TAR (a fraction) at each FAR in ``fars`` from pair ``labels`` (1 = same) and ``scores`` [P]."""
    return tar_at_far_from_roc(*roc_points(labels, scores), fars)


# ---------------------------------------------------------------- meta files


@dataclass
class IJBProtocol:
    """The meta files of one IJB set.

    image_paths: I paths under ``loose_crop``; template_ids, media_ids: int64 ``[I]``;
    landmarks: float32 ``[I,5,2]``; faceness: float32 ``[I]``; pairs: int64 ``[P,2]``
    template ids; labels: int64 ``[P]``; landmark_file, pair_file: the files they came from.
    """

    image_paths: list
    template_ids: np.ndarray
    media_ids: np.ndarray
    landmarks: np.ndarray
    faceness: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray
    landmark_file: str
    pair_file: str


def meta_path(root, target: str, suffix: str) -> str:
    """``<root>/meta/<t>_<suffix>.txt`` (t = ``ijbb`` / ``ijbc``); FileNotFoundError names it when absent."""
    if target.upper() not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    path = os.path.join(os.fspath(root), "meta", f"{target.lower()}_{suffix}.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IJB meta file missing: {path}")
    return path


def _split_lines(path: str, num_fields: int, description: str):
    """Yield (line number, fields) of every non-empty line, checking the field count."""
    with open(path) as file:
        for line_number, line in enumerate(file, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != num_fields:
                raise ValueError(
                    f"{path}:{line_number}: expected {num_fields} values ({description}), "
                    f"got {len(fields)}: {line.strip()!r}"
                )
            yield line_number, fields


def _parse(path: str, line_number: int, value: str, kind, what: str):
    try:
        return kind(value)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise ValueError(f"{path}:{line_number}: {what} {value!r} is not {expected}") from None


def read_face_tid_mid(path: str) -> tuple[list, np.ndarray, np.ndarray]:
    """``<t>_face_tid_mid.txt`` -> (image names [I], template ids int64 [I], media ids int64 [I])."""
    names, templates, media = [], [], []
    for line_number, (name, template, medium) in _split_lines(path, 3, "image name, template id, media id"):
        names.append(name)
        templates.append(_parse(path, line_number, template, int, "template id"))
        media.append(_parse(path, line_number, medium, int, "media id"))
    return names, np.array(templates, np.int64), np.array(media, np.int64)


def read_five_points(path: str) -> tuple[list, np.ndarray, np.ndarray]:
    """``<t>_name_5pts_score.txt`` -> (image names [I], landmarks float32 [I,5,2], faceness float32 [I])."""
    names, values, line_numbers = [], [], []
    for line_number, fields in _split_lines(path, 12, "image name, 10 landmark coordinates, faceness score"):
        names.append(fields[0])
        values.append([_parse(path, line_number, value, float, "value") for value in fields[1:]])
        line_numbers.append(line_number)
    with np.errstate(over="ignore"):  # a value beyond float32's range becomes inf, refused below
        values = np.array(values, np.float32).reshape(-1, 11)
    finite = np.isfinite(values)
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        what = "faceness score" if column == 10 else f"landmark {'xy'[column % 2]}{column // 2 + 1}"
        raise ValueError(
            f"{path}:{line_numbers[row]}: {what} is {values[row, column]} (as float32), expected a finite number"
        )
    return names, values[:, :10].reshape(-1, 5, 2), values[:, 10]


def read_pairs(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``<t>_template_pair_label.txt`` -> (template id pairs int64 [P,2], labels int64 [P] of 0 / 1)."""
    try:
        with warnings.catch_warnings():  # an empty file: "input contained no data", reported below instead
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(path, dtype=np.int64, ndmin=2)  # C parser: IJB-C has 15.6M lines
    except ValueError:
        table = None
    if table is not None and table.size == 0:
        raise ValueError(f"{path}: lists no pairs")
    if table is None or table.shape[1] != 3 or not np.isin(table[:, 2], (0, 1)).all():
        _raise_at_bad_pair_line(path)
    labels = table[:, 2].copy()
    for label, kind in ((1, "genuine"), (0, "impostor")):
        if not (labels == label).any():
            raise ValueError(
                f"{path}: no pair has label {label} ({kind}); TAR at FAR needs both genuine (1) and impostor (0) pairs"
            )
    return table[:, :2].copy(), labels


def _raise_at_bad_pair_line(path: str):
    """The slow pass, only to name the line the fast parser rejected."""
    for line_number, fields in _split_lines(path, 3, "template 1, template 2, label"):
        values = [_parse(path, line_number, value, int, "value") for value in fields]
        if values[2] not in (0, 1):
            raise ValueError(f"{path}:{line_number}: label {values[2]}, expected 0 or 1")
    raise ValueError(f"{path}: cannot be read as lines of three integers")


def read_protocol(root, target: str) -> IJBProtocol:
    """Read and cross-check the three meta files of ``target`` (``IJBB`` or ``IJBC``) under ``root``."""
    tid_mid_file = meta_path(root, target, "face_tid_mid")
    landmark_file = meta_path(root, target, "name_5pts_score")
    pair_file = meta_path(root, target, "template_pair_label")
    names, template_ids, media_ids = read_face_tid_mid(tid_mid_file)
    landmark_names, landmarks, faceness = read_five_points(landmark_file)
    if not names and not landmark_names:
        raise ValueError(f"{tid_mid_file} and {landmark_file} list no images")
    if len(landmark_names) != len(names):
        raise ValueError(f"{landmark_file} lists {len(landmark_names)} images, {tid_mid_file} lists {len(names)}")
    for index, (name, landmark_name) in enumerate(zip(names, landmark_names)):
        if name != landmark_name:
            raise ValueError(
                f"{landmark_file}: image {index + 1} is {landmark_name!r} but {tid_mid_file} lists {name!r} there "
                "(the two files must list the same images in the same order)"
            )
    pairs, labels = read_pairs(pair_file)
    image_dir = os.path.join(os.fspath(root), "loose_crop")
    return IJBProtocol(
        image_paths=[os.path.join(image_dir, name) for name in names],
        template_ids=template_ids,
        media_ids=media_ids,
        landmarks=landmarks,
        faceness=faceness,
        pairs=pairs,
        labels=labels,
        landmark_file=landmark_file,
        pair_file=pair_file,
    )


# ---------------------------------------------------------------- templates


class TemplateAccumulator:
    """Builds template features from image features arriving in any order and batch size.

    A template's feature is sum over its media of the mean over the media's images,
    i.e. sum over its images of feature / (number of images of that template and media).
    Memory: ``[T, D]`` for T templates, whatever the number of images.
    """

    def __init__(self, template_ids: np.ndarray, media_ids: np.ndarray):
        self.template_ids, template_rows = np.unique(template_ids, return_inverse=True)
        _, group, group_sizes = np.unique(
            np.stack([template_ids, media_ids], axis=1), axis=0, return_inverse=True, return_counts=True
        )
        self._rows = torch.from_numpy(template_rows.reshape(-1))
        self._weights = torch.from_numpy(1.0 / group_sizes[group.reshape(-1)])
        self._sums = None  # float64 [T, D] on the features' device, created by the first add

    def add(self, image_indices, features: torch.Tensor) -> None:
        """features ``[B, D]`` of the images ``image_indices`` ``[B]`` (indices into the image list)."""
        if self._sums is None:
            self._sums = torch.zeros(
                len(self.template_ids), features.shape[1], dtype=torch.float64, device=features.device
            )
        image_indices = torch.as_tensor(image_indices)
        weights = self._weights[image_indices].to(features.device)
        self._sums.index_add_(0, self._rows[image_indices].to(features.device), features.double() * weights[:, None])

    def features(self) -> torch.Tensor:
        """L2-normalised template features float32 ``[T, D]``, rows in the order of ``self.template_ids``."""
        if self._sums is None:
            raise ValueError("no image features were added (the image list has no images)")
        return torch.nn.functional.normalize(self._sums, dim=1).float()


def aggregate_templates(image_features, template_ids, media_ids) -> tuple[np.ndarray, np.ndarray]:
    """image_features ``[I, D]`` -> (sorted unique template ids [T], normalised features float32 [T, D])."""
    accumulator = TemplateAccumulator(np.asarray(template_ids), np.asarray(media_ids))
    accumulator.add(np.arange(len(template_ids)), torch.as_tensor(np.asarray(image_features)))
    return accumulator.template_ids, accumulator.features().numpy()


def template_rows(template_ids: np.ndarray, pairs: np.ndarray, pair_file: str = "pairs") -> np.ndarray:
    """Rows int64 ``[P, 2]`` of the pairs' templates in sorted ``template_ids [T]``.

    A pair naming a template that has no images raises an error naming ``pair_file`` and the line.
    """
    rows = np.minimum(np.searchsorted(template_ids, pairs), len(template_ids) - 1)
    unknown = template_ids[rows] != pairs
    if unknown.any():
        line, column = np.argwhere(unknown)[0]
        raise ValueError(
            f"{pair_file}:{line + 1}: template {pairs[line, column]} has no images (it is not in the face_tid_mid file)"
        )
    return rows


def score_pairs(
    template_ids: np.ndarray,
    template_features: torch.Tensor,
    pairs: np.ndarray,
    pair_file: str = "pairs",
    block_elements: int = 1 << 26,
) -> np.ndarray:
    """Dot-product scores float32 ``[P]`` of template id pairs ``[P, 2]``.

    template_ids: sorted ``[T]`` with normalised features ``[T, D]`` (on any device).
    The pairs are grouped by their first template and scored a block of first
    templates at a time as one matrix product ``[B, D] x [D, T]`` with
    ``B * T <= block_elements``. For IJB-C (15.6M pairs, 23k templates) this is far
    faster than gathering two feature rows per pair, which is bound by memory traffic.
    """
    rows = template_rows(template_ids, pairs, pair_file)
    order = np.argsort(rows[:, 0], kind="stable")
    first_sorted = rows[order, 0]
    num_templates = len(template_ids)
    block = max(1, block_elements // num_templates)
    scores = np.empty(len(pairs), np.float32)
    device = template_features.device
    for start in range(0, num_templates, block):
        low, high = np.searchsorted(first_sorted, [start, start + block])
        if low == high:
            continue
        selected = order[low:high]
        similarities = template_features[start : start + block] @ template_features.T
        first = torch.from_numpy(rows[selected, 0] - start).to(device)
        second = torch.from_numpy(rows[selected, 1]).to(device)
        scores[selected] = similarities[first, second].cpu().numpy()
    return scores


# ---------------------------------------------------------------- images


class AlignedIJBFaces(torch.utils.data.Dataset):
    """Item ``i``: (aligned RGB crop uint8 ``[112,112,3]``, i) of image ``i`` of the protocol."""

    def __init__(self, protocol: IJBProtocol):
        self.protocol = protocol

    def __len__(self) -> int:
        return len(self.protocol.image_paths)

    def __getitem__(self, index: int):
        path = self.protocol.image_paths[index]
        where = f"image of {self.protocol.landmark_file} line {index + 1}"
        if not os.path.isfile(path):  # checked first: OpenCV's imread also prints a warning of its own
            raise ValueError(f"{path}: no such image file ({where})")
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{path}: cannot be decoded ({where})")
        aligned = align_face(np.ascontiguousarray(bgr[:, :, ::-1]), self.protocol.landmarks[index])
        return torch.from_numpy(aligned), index


class _FacesOrErrors(torch.utils.data.Dataset):
    """``AlignedIJBFaces`` for the DataLoader: item ``i`` is (crop, i, "") or, when image ``i`` raises a
    ValueError (a missing or undecodable image), (a black crop, i, the error's message).

    A worker's exception reaches the main process as its whole traceback inside a new message
    ("Caught ValueError in DataLoader worker process 0 ..."); passing the message on as data lets
    ``template_features`` raise it as the one-line error it was.
    """

    def __init__(self, faces: AlignedIJBFaces):
        self.faces = faces

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, index: int):
        try:
            return (*self.faces[index], "")
        except ValueError as error:
            return torch.zeros(IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8), index, str(error)


def template_features(
    model: nn.Module,
    protocol: IJBProtocol,
    batch_size: int = 128,
    device=None,
    num_workers: int = 4,
    progress: bool = True,
) -> tuple[np.ndarray, torch.Tensor]:
    """Embed every image (+ flip, times faceness) and aggregate per template; ``num_workers`` decoding
    processes, at most one per CPU this process may use.

    Returns (sorted template ids [T], normalised template features float32 [T, D] on ``device``).
    """
    model_device, dtype = model_device_and_dtype(model)
    device = torch.device(device) if device is not None else model_device
    loader = torch.utils.data.DataLoader(
        _FacesOrErrors(AlignedIJBFaces(protocol)),
        batch_size=batch_size,
        num_workers=min(num_workers, len(os.sched_getaffinity(0))),  # more than the CPUs only adds a warning
        pin_memory=device.type == "cuda",
    )  # no cv2.setNumThreads in the workers: in a forked child it waits forever on the parent's pool
    accumulator = TemplateAccumulator(protocol.template_ids, protocol.media_ids)
    faceness = torch.from_numpy(protocol.faceness)
    with evaluation_mode(model), torch.inference_mode():
        for images, indices, errors in tqdm(loader, desc="IJB images", unit="batch", disable=not progress):
            failed = next((error for error in errors if error), None)
            if failed is not None:
                raise ValueError(failed)
            original, flipped = embed_original_and_flip(model, images, device, dtype)
            weights = faceness[indices].to(device)
            accumulator.add(indices, (original + flipped) * weights[:, None])
    return accumulator.template_ids, accumulator.features()


@dataclass
class IJBResult:
    """scores float32 [P] and labels int64 [P] of the listed pairs; tar: FAR -> TAR fraction; fpr, tpr: the ROC."""

    scores: np.ndarray
    labels: np.ndarray
    tar: dict
    fpr: np.ndarray
    tpr: np.ndarray


def evaluate_ijb(
    model: nn.Module,
    root,
    target: str,
    batch_size: int = 128,
    device=None,
    num_workers: int = 4,
    block_elements: int = 1 << 26,
    fars=FARS,
    progress: bool = True,
) -> IJBResult:
    """The whole IJB-B / IJB-C 1:1 protocol for one model."""
    protocol = read_protocol(root, target)
    template_ids, features = template_features(model, protocol, batch_size, device, num_workers, progress)
    scores = score_pairs(template_ids, features, protocol.pairs, protocol.pair_file, block_elements)
    fpr, tpr = roc_points(protocol.labels, scores)
    return IJBResult(scores, protocol.labels, tar_at_far_from_roc(fpr, tpr, fars), fpr, tpr)
