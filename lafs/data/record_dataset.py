"""insightface RecordIO face data sets (``train.rec``, ``train.idx``, optional ``property``)."""

import os
from pathlib import Path

import cv2
import numpy as np
import torch

from .image import apply_transform
from .recordio import MXIndexedRecordIO, RecordIOError, unpack_img

COLORS = ("rgb", "bgr")


class FaceRecordDataset(torch.utils.data.Dataset):
    """Aligned 112x112 faces from an insightface RecordIO folder.

    Both layouts in use are read (``docs/DATA.md``): the face2rec layout
    (record 0 holds ``[N+1, N+1+num_ids]``, images are keys 1..N with labels
    ``[class, aligned]``, keys N+1.. hold each identity's ``[start, end)``) and the
    flat layout (keys from 0, scalar labels).  ``.layout`` says which was found.

    ``color`` is the channel order the set was packed in: ``"rgb"`` (default,
    e.g. WebFace4M) returns the RGB decode, as insightface's loader does;
    ``"bgr"`` (sets packed from BGR arrays, e.g. MS1MV3) swaps the channels of
    that decode so the model still sees true RGB.

    ``transform`` receives a uint8 ``[112,112,3]`` array in that RGB order and
    returns one.  ``dataset[i] -> (image float32 [3,112,112] in [-1, 1], label int)``;
    ``.labels`` (int64, one per item), ``.num_classes`` (from ``property`` when
    present, else ``labels.max() + 1``), ``.keys`` (record key of each item).

    The record file is opened lazily in each process, so the data set is safe
    to use with DataLoader workers.
    """

    def __init__(self, root, color: str = "rgb", transform=None):
        if color not in COLORS:
            raise ValueError(f"color must be one of {COLORS}, got {color!r}")
        self.root = Path(root)
        self.rec_path = self.root / "train.rec"
        self.idx_path = self.root / "train.idx"
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: a RecordIO data set folder needs train.rec and train.idx")
        self.color = color
        self.transform = transform
        with MXIndexedRecordIO(self.idx_path, self.rec_path, "r") as record:
            if not record.keys:
                raise RecordIOError(f"{self.idx_path} lists no records")
            self.layout, self.keys, self.labels = _read_layout(record)
        if len(self.keys) == 0:
            raise RecordIOError(f"{self.rec_path} holds no images")
        self.num_classes = _num_classes(self.root / "property", self.labels)
        self._record = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int):
        key = int(self.keys[index])
        source = f"{self.rec_path} (key {key})"
        try:
            header, image = unpack_img(self._reader().read_idx(key), cv2.IMREAD_COLOR)
        except RecordIOError as error:
            raise RecordIOError(f"{source}: {error}") from None
        label = int(_class_of(header.label))
        if label != self.labels[index]:
            raise RecordIOError(
                f"{source}: the record's label {label} differs from the identity ranges "
                f"of the header records ({self.labels[index]})"
            )
        if self.color == "rgb":
            image = image[:, :, ::-1]  # cv2 decodes to BGR
        return apply_transform(np.ascontiguousarray(image), self.transform, source), label

    def _reader(self) -> MXIndexedRecordIO:
        if self._record is None or self._record_pid != os.getpid():
            self._record = MXIndexedRecordIO(self.idx_path, self.rec_path, "r")
            self._record_pid = os.getpid()
        return self._record

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_record"] = None
        return state


def _class_of(label) -> float:
    """The class of a record label: the scalar, or the first of several floats."""
    return float(label) if np.ndim(label) == 0 else float(label[0])


def _read_layout(record: MXIndexedRecordIO):
    """(layout name, image keys int64 [N], labels int64 [N]) of an open data set."""
    # The header record (key 0, wherever it sits in the file) has two or more float labels and no image.
    first = record.read_header_idx(0) if 0 in record.idx else None
    is_header = first is not None and first.flag >= 2 and len(record.read_idx(0)) == 24 + 4 * first.flag
    if not is_header:
        keys = np.asarray(record.keys, dtype=np.int64)
        labels = np.array([_class_of(record.read_header_idx(int(k)).label) for k in keys], dtype=np.int64)
        _check_labels(labels, record.uri)
        return "flat", keys, labels

    image_end, identity_end = int(first.label[0]), int(first.label[1])
    keys = np.arange(1, image_end, dtype=np.int64)
    absent = [key for key in range(1, max(image_end, identity_end)) if key not in record.idx]
    if absent:
        raise RecordIOError(
            f"{record.idx_path}: the header record announces image keys 1..{image_end - 1} and "
            f"identity keys {image_end}..{identity_end - 1}, but {len(absent)} are missing "
            f"(first: {absent[0]})"
        )
    labels = np.full(len(keys), -1, dtype=np.int64)
    # Each identity record holds [start, end) of its image keys; the class is the label of its first image.
    for identity_key in range(image_end, identity_end):
        start, end = (int(v) for v in _label_array(record, identity_key)[:2])
        if not 1 <= start < end <= image_end:
            raise RecordIOError(
                f"{record.uri} (key {identity_key}): identity range [{start}, {end}) is outside "
                f"the image keys 1..{image_end - 1}"
            )
        labels[start - 1 : end - 1] = int(_class_of(record.read_header_idx(start).label))
    missing = np.flatnonzero(labels < 0)
    for position in missing:  # no identity records (or incomplete ones): read the labels one by one
        labels[position] = int(_class_of(record.read_header_idx(int(keys[position])).label))
    _check_labels(labels, record.uri)
    return "header", keys, labels


def _label_array(record: MXIndexedRecordIO, key: int) -> np.ndarray:
    header = record.read_header_idx(key)
    if header.flag < 2:
        raise RecordIOError(
            f"{record.uri} (key {key}): an identity record needs two float labels "
            f"[start, end), found flag {header.flag}"
        )
    return header.label


def _check_labels(labels: np.ndarray, uri: str):
    if labels.size and labels.min() < 0:
        raise RecordIOError(f"{uri}: negative class label {labels.min()}")


def _num_classes(property_path: Path, labels: np.ndarray) -> int:
    from_labels = int(labels.max()) + 1
    if not property_path.is_file():
        return from_labels
    first_line = property_path.read_text().strip().splitlines()[:1]
    try:
        declared = int(first_line[0].split(",")[0])
    except (IndexError, ValueError):
        raise ValueError(
            f"malformed {property_path}: expected 'num_classes,height,width' on the first line, "
            f"got {first_line[0] if first_line else 'an empty file'!r}"
        ) from None
    if declared < from_labels:
        raise ValueError(
            f"{property_path} declares {declared} classes but the records use labels up to {from_labels - 1}"
        )
    return declared
