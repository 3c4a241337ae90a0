"""insightface RecordIO face data sets (``train.rec``, ``train.idx``, optional ``property``)."""

import os
from pathlib import Path

import cv2
import numpy as np
import torch

from .image import apply_transform
from .recordio import MXIndexedRecordIO, RecordIOError, unpack_img

COLORS = ("rgb", "bgr")
# Largest class label: float32 labels hold every whole number exactly only up to 2**24.
MAX_LABEL = 2**24


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

    Labels must be whole numbers from 0 to 2**24 (the integers a float32 label holds
    exactly).  Without ``property``, a largest label that would make ``num_classes``
    exceed both the number of images and twice the number of distinct labels is refused
    as damage (one stray label of 3e9 would size the classifier for 3e9 classes); real
    sets are far from it (MS1MV3: 93,431 classes for 5.1M images; WebFace4M: 205,990 for
    4.2M).  A set that really uses so few of its label numbers declares its class count
    in ``property`` (at most 2**24 + 1 classes).  In the flat layout, an index entry that points at
    another key's record (each packer in use stores the key as the header's ``id``) is refused when
    the set opens; in the face2rec layout such an entry shows as a label that differs from its
    identity's when the record is read.

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
            if path.is_dir():
                raise IsADirectoryError(f"{path} is a folder: a RecordIO data set needs train.rec and train.idx files")
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
        self.num_classes = _num_classes(self.root / "property", self.labels, self.keys, self.rec_path)
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
        value = _class_of(header.label)
        if value != self.labels[index]:
            raise RecordIOError(
                f"{source}: the record's label {value:g} differs from the identity ranges "
                f"of the header records ({self.labels[index]})"
            )
        label = int(self.labels[index])
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
        values = np.empty(len(keys), dtype=np.float64)
        ids = np.empty(len(keys), dtype=np.int64)
        for position, key in enumerate(keys.tolist()):
            header = record.read_header_idx(key)
            values[position], ids[position] = _class_of(header.label), min(header.id, 2**63 - 1)  # id is uint64
        labels = _class_labels(values, keys, record.uri)
        _check_record_ids(record, keys, ids)
        return "flat", keys, labels

    image_end, identity_end = _header_range(record, first)
    keys = np.arange(1, image_end, dtype=np.int64)
    # Count the absent keys from the index side: the header's numbers may be huge, the index is not.
    present = sum(1 for key in record.idx if isinstance(key, int) and 1 <= key < identity_end)
    if present < identity_end - 1:
        first_absent = next(key for key in range(1, identity_end) if key not in record.idx)
        identities = (
            f"identity keys {image_end}..{identity_end - 1}" if identity_end > image_end else "no identity records"
        )
        raise RecordIOError(
            f"{record.idx_path}: the header record (key 0) announces image keys 1..{image_end - 1} and "
            f"{identities}, but {identity_end - 1 - present} are missing (first: {first_absent}); "
            f"the index lists {len(record.keys)} keys"
        )
    values = np.zeros(len(keys), dtype=np.float64)
    sources = keys.copy()  # the key whose record holds each label
    known = np.zeros(len(keys), dtype=bool)
    # Each identity record holds [start, end) of its image keys; the class is the label of its first image.
    for identity_key in range(image_end, identity_end):
        start, end = (float(v) for v in _label_array(record, identity_key)[:2])
        if not (start.is_integer() and end.is_integer() and 1 <= start < end <= image_end):
            raise RecordIOError(
                f"{record.uri} (key {identity_key}): identity range [{start:g}, {end:g}) is not a range "
                f"of the image keys 1..{image_end - 1}"
            )
        start, end = int(start), int(end)
        values[start - 1 : end - 1] = _class_of(record.read_header_idx(start).label)
        sources[start - 1 : end - 1] = start
        known[start - 1 : end - 1] = True
    for position in np.flatnonzero(~known):  # no identity records (or incomplete ones): read the labels one by one
        values[position] = _class_of(record.read_header_idx(int(keys[position])).label)
    return "header", keys, _class_labels(values, sources, record.uri)


def _check_record_ids(record: MXIndexedRecordIO, keys: np.ndarray, ids: np.ndarray):
    """Refuse an index whose entries point at other keys' records.

    MXNet's im2rec, insightface's packers and ``lafs.data pack`` store each record's key as its
    ``IRHeader.id``.  Where most records of a set carry their own key, one that carries another key is
    read under the wrong label: the ``.idx`` has swapped or stale offsets.  Sets whose packer numbered
    its records otherwise (fewer than half carry their key) are not judged.
    """
    wrong = np.flatnonzero(ids != keys)
    if wrong.size == 0 or 2 * wrong.size > len(keys):
        return
    key, carried = int(keys[wrong[0]]), int(ids[wrong[0]])
    raise RecordIOError(
        f"{record.idx_path} (key {key}): the entry points at byte {record.idx[key]}, the record of key "
        f"{carried} (its header's id), while {len(keys) - wrong.size} of {len(keys)} records carry their own "
        f"key; {wrong.size} entries disagree: the index does not match {record.uri} (swapped or stale offsets?)"
    )


def _header_range(record: MXIndexedRecordIO, first) -> tuple:
    """(image_end, identity_end) from the header record ``[N+1, N+1+num_ids]``."""
    image_end, identity_end = (float(v) for v in first.label[:2])
    where = f"{record.uri} (key 0): the header record [{image_end:g}, {identity_end:g}]"
    if not (image_end.is_integer() and identity_end.is_integer() and 1 <= image_end <= identity_end):
        raise RecordIOError(
            f"{where} is not [N+1, N+1+num_ids]: two whole numbers with 1 <= N+1 <= N+1+num_ids "
            f"(N images, num_ids identity records)"
        )
    image_end, identity_end = int(image_end), int(identity_end)
    return image_end, identity_end


def _label_array(record: MXIndexedRecordIO, key: int) -> np.ndarray:
    header = record.read_header_idx(key)
    if header.flag < 2:
        raise RecordIOError(
            f"{record.uri} (key {key}): an identity record needs two float labels "
            f"[start, end), found flag {header.flag}"
        )
    return header.label


def _class_labels(values, keys, uri) -> np.ndarray:
    """Stored (float) class labels -> int64, refusing any that is not a whole number in 0..MAX_LABEL;
    ``keys[i]`` is the record that holds ``values[i]`` (named in the error)."""
    values = np.asarray(values, dtype=np.float64)
    checks = (
        (lambda v: ~np.isfinite(v), "is not a finite number"),
        (lambda v: v != np.floor(v), "is not a whole number"),
        (lambda v: v < 0, "is negative"),
        (lambda v: v > MAX_LABEL, f"is above {MAX_LABEL} (2**24, the largest whole number a float32 label holds)"),
    )
    for test, problem in checks:
        bad = np.flatnonzero(test(values))
        if bad.size:
            others = f" ({bad.size} records have such labels)" if bad.size > 1 else ""
            raise RecordIOError(
                f"{uri} (key {int(keys[bad[0]])}): class label {np.float32(values[bad[0]])!s} {problem}{others}"
            )
    return values.astype(np.int64)


def _num_classes(property_path: Path, labels: np.ndarray, keys: np.ndarray, uri) -> int:
    from_labels = int(labels.max()) + 1
    if property_path.exists() and not property_path.is_file():
        raise ValueError(f"{property_path} is not a file: 'property' holds 'num_classes,height,width'")
    if not property_path.is_file():
        if from_labels > len(labels):  # only then can the labels be too sparse: count the distinct ones
            distinct = len(np.unique(labels))
            if from_labels > 2 * distinct:
                raise RecordIOError(
                    f"{uri} (key {int(keys[np.argmax(labels)])}): class label {from_labels - 1} would make "
                    f"{from_labels} classes, but the set has {len(labels)} images with {distinct} distinct labels "
                    f"(a damaged label?); if the labels are really this sparse, declare num_classes in {property_path}"
                )
        return from_labels
    try:
        text = property_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"malformed {property_path}: byte {error.start} is not UTF-8 text; "
            f"expected 'num_classes,height,width' on the first line"
        ) from None
    first_line = text.strip().splitlines()[:1]
    try:
        declared = int(first_line[0].split(",")[0])
    except (IndexError, ValueError):
        raise ValueError(
            f"malformed {property_path}: expected 'num_classes,height,width' on the first line, "
            f"got {first_line[0] if first_line else 'an empty file'!r}"
        ) from None
    if not 1 <= declared <= MAX_LABEL + 1:
        raise ValueError(
            f"{property_path} declares {declared} classes: num_classes must be from 1 to {MAX_LABEL + 1} "
            f"(class labels are whole numbers up to 2**24, the largest a float32 label holds exactly)"
        )
    if declared < from_labels:
        raise ValueError(
            f"{property_path} declares {declared} classes but the records use labels up to {from_labels - 1}"
        )
    return declared
