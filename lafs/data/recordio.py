"""MXNet RecordIO in pure Python, byte-compatible with MXNet / dmlc-core, under MXNet's names.

Format (dmlc-core ``recordio.h``): a record is stored as one or more parts;
each part is ``uint32 magic = 0xced7230a``, ``uint32 lrec = cflag << 29 | length``,
``length`` bytes, zero padding to a multiple of 4.  The writer splits a record
wherever the magic occurs at a 4-byte-aligned offset of the payload (dropping
those four bytes; cflag 1 = first part, 2 = middle, 3 = last, 0 = unsplit);
the reader joins the parts and puts the magic back between them.

Record payloads of image sets start with a 24-byte header ``IRHeader(flag,
label, id, id2)`` (``'<IfQQ'``); ``flag > 0`` means ``flag`` float32 labels
follow the header and the header's label field is 0.

Code written for ``mxnet.recordio`` ports by changing the import::

    from lafs.data import recordio
    record = recordio.MXIndexedRecordIO("train.idx", "train.rec", "r")
    header, image = recordio.unpack_img(record.read_idx(1))   # BGR, as in MXNet
"""

import numbers
import os
import struct
from collections import namedtuple

import cv2
import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART_HEADER = struct.Struct("<II")
_LENGTH_MASK = (1 << 29) - 1
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = """Image record header: flag (0, or the number of float labels), label, id, id2."""


class RecordIOError(ValueError):
    """A RecordIO file that does not follow the format (corrupt, truncated, or a wrong offset)."""


class MXRecordIO:
    """Sequential RecordIO reader (``flag='r'``) or writer (``flag='w'``), as ``mxnet.recordio.MXRecordIO``.

    The file opens in the constructor.  A reader used in a forked process (DataLoader
    workers) reopens its file there, since forked processes share one file position;
    a pickled reader reopens in the process that unpickles it.  Also a context manager.
    """

    def __init__(self, uri, flag: str):
        if flag not in ("r", "w"):
            raise ValueError(f"invalid flag {flag!r} for {uri}: use 'r' (read) or 'w' (write)")
        self.uri = os.fspath(uri)
        self.flag = flag
        self.is_open = False
        self.open()

    def open(self):
        """(Re)open the file: reading starts at the beginning, writing truncates."""
        try:
            self.handle = open(self.uri, "rb" if self.flag == "r" else "wb")
        except OSError as error:
            raise FileNotFoundError(
                f"cannot open RecordIO file {self.uri} for {'reading' if self.flag == 'r' else 'writing'}: {error}"
            ) from error
        self.writable = self.flag == "w"
        self.is_open = True
        self.pid = os.getpid()

    def close(self):
        if self.is_open:
            self.handle.close()
            self.is_open = False

    def reset(self):
        """Back to the first record (reopens the file, as MXNet does)."""
        self.close()
        self.open()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        if getattr(self, "is_open", False):
            self.close()

    def __getstate__(self):
        if self.writable:
            raise RecordIOError(f"cannot pickle a RecordIO writer ({self.uri}); pickle readers only")
        state = self.__dict__.copy()
        state.pop("handle", None)
        state["is_open"] = False
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.open()

    def tell(self) -> int:
        """Byte position where the next record will be written or read."""
        self._check_open()
        return self.handle.tell()

    def write(self, buf: bytes):
        """Append one record (any bytes, under 512 MiB), split into parts at aligned magic words."""
        self._check_open()
        if not self.writable:
            raise RecordIOError(f"{self.uri} is open for reading; open it with flag 'w' to write")
        self.handle.write(encode_record(buf))

    def read(self):
        """The next record's bytes, or None at the end of the file."""
        self._check_open()
        if self.writable:
            raise RecordIOError(f"{self.uri} is open for writing; open it with flag 'r' to read")
        return self._read_record(self.handle.tell())

    def _check_open(self):
        if not self.is_open:
            raise RecordIOError(f"{self.uri} is closed")
        if self.pid != os.getpid():
            if self.writable:
                raise RecordIOError(f"{self.uri} was opened for writing in another process")
            self.handle = open(self.uri, "rb")
            self.pid = os.getpid()

    def _read_record(self, offset: int, what: str = "", limit=None):
        """Read the record starting at ``offset`` (the current position); None at a clean end of file.

        With ``limit``, stop once the first ``limit`` bytes of the record are known (header reads).
        """
        where = f"{self.uri}{what} at byte {offset}"
        parts = []
        size = 0
        while True:
            position = self.handle.tell()
            head = self.handle.read(_PART_HEADER.size)
            if not head and not parts:
                return None
            if len(head) < _PART_HEADER.size:
                raise RecordIOError(
                    f"truncated RecordIO file {where}: the part header at byte {position} has {len(head)} of 8 bytes"
                )
            magic, lrec = _PART_HEADER.unpack(head)
            if magic != MAGIC:
                raise RecordIOError(
                    f"corrupt RecordIO file {where}: expected the magic 0x{MAGIC:08x} at byte "
                    f"{position}, found 0x{magic:08x} (wrong offset in the .idx, or a damaged file)"
                )
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if (cflag in (0, 1)) != (not parts):
                raise RecordIOError(
                    f"corrupt RecordIO file {where}: part at byte {position} has continuation "
                    f"flag {cflag}, which cannot {'start' if not parts else 'continue'} a record"
                )
            enough = limit is not None and size + length >= limit
            wanted = limit - size if enough else (length + 3) & ~3
            data = self.handle.read(wanted)
            if len(data) < wanted:
                raise RecordIOError(
                    f"truncated RecordIO file {where}: the part at byte {position} declares "
                    f"{length} bytes but the file ends after {len(data)}"
                )
            parts.append(data[:length])
            size += length + 4
            if enough or cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)


class MXIndexedRecordIO(MXRecordIO):
    """RecordIO with a text index (``key<TAB>offset`` lines), as ``mxnet.recordio.MXIndexedRecordIO``.

    ``keys`` lists the keys in file order; ``idx`` maps key -> byte offset.
    """

    def __init__(self, idx_path, uri, flag: str, key_type=int):
        self.idx_path = os.fspath(idx_path)
        self.key_type = key_type
        self.idx = {}
        self.keys = []
        super().__init__(uri, flag)

    def open(self):
        super().open()
        self.idx = {}
        self.keys = []
        if self.writable:
            self.fidx = open(self.idx_path, "w")
            return
        self.fidx = None
        try:
            with open(self.idx_path, "rb") as index_file:
                data = index_file.read()
        except OSError as error:
            raise FileNotFoundError(f"cannot read the RecordIO index {self.idx_path}: {error}") from error
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            raise RecordIOError(
                f"malformed index line {line} in {self.idx_path}: byte {error.start} is not UTF-8 text "
                f"({error.reason}); a RecordIO index holds key<TAB>offset text lines"
            ) from None
        line_of = {}  # key -> the index line that named it first
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.strip().split("\t")
            try:
                key, offset = self.key_type(fields[0]), int(fields[1])
            except (IndexError, ValueError) as error:
                raise RecordIOError(
                    f"malformed index line {number} in {self.idx_path}: {line.strip()!r} (expected key<TAB>offset)"
                ) from error
            if offset < 0:
                raise RecordIOError(
                    f"malformed index line {number} in {self.idx_path}: {line.strip()!r} has a negative offset"
                )
            if key in line_of:
                raise RecordIOError(
                    f"duplicate key {key!r} in {self.idx_path}: lines {line_of[key]} and {number} "
                    f"(each record needs its own key)"
                )
            line_of[key] = number
            self.idx[key] = offset
            self.keys.append(key)

    def close(self):
        if self.is_open and self.fidx is not None:
            self.fidx.close()
            self.fidx = None
        super().close()

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("fidx", None)
        return state

    def seek(self, idx):
        """Move to the record of key ``idx``."""
        self._check_open()
        self.handle.seek(self._offset(idx))

    def read_idx(self, idx) -> bytes:
        """The record of key ``idx``."""
        self._check_open()
        offset = self._offset(idx)
        self.handle.seek(offset)
        record = self._read_record(offset, f" (key {idx!r})")
        if record is None:
            raise RecordIOError(
                f"truncated RecordIO file {self.uri} (key {idx!r}): the index points at byte "
                f"{offset}, at or past the end of the file"
            )
        return record

    def read_header_idx(self, idx) -> IRHeader:
        """Only the IRHeader (with its float labels) of key ``idx``, without reading the image bytes
        (not in MXNet; used to collect the labels of a data set quickly)."""
        self._check_open()
        offset = self._offset(idx)
        what = f" (key {idx!r})"
        self.handle.seek(offset)
        prefix = self._read_record(offset, what, limit=_IR_SIZE)
        flag = struct.unpack_from("<I", prefix)[0] if prefix is not None and len(prefix) >= 4 else 0
        if flag > 0:
            self.handle.seek(offset)
            prefix = self._read_record(offset, what, limit=_IR_SIZE + 4 * flag)
        if prefix is None:
            raise RecordIOError(
                f"truncated RecordIO file {self.uri}{what}: the index points at byte "
                f"{offset}, at or past the end of the file"
            )
        try:
            return unpack(prefix)[0]
        except RecordIOError as error:
            raise RecordIOError(f"{self.uri}{what}: {error}") from None

    def write_idx(self, idx, buf: bytes):
        """Append a record under key ``idx`` and index it."""
        key = self.key_type(idx)
        if key in self.idx:
            raise RecordIOError(f"key {key!r} is already in the index {self.idx_path}: each record needs its own key")
        position = self.tell()
        self.write(buf)
        self.fidx.write(f"{key}\t{position}\n")
        self.idx[key] = position
        self.keys.append(key)

    def _offset(self, idx) -> int:
        try:
            return self.idx[idx]
        except KeyError:
            raise KeyError(f"key {idx!r} is not in the index {self.idx_path} ({len(self.keys)} keys)") from None


def encode_record(buf: bytes) -> bytes:
    """The on-disk bytes of one record: parts split at 4-byte-aligned magic words, zero padded."""
    buf = bytes(buf)
    if len(buf) >= 1 << 29:
        raise ValueError(f"a RecordIO record must be under 512 MiB, got {len(buf)} bytes")
    out = []
    start = 0
    # Only aligned positions whose 4 bytes all lie inside the record are magic candidates.
    aligned_end = len(buf) // 4 * 4
    position = buf.find(_MAGIC_BYTES)
    while 0 <= position < aligned_end:
        if position % 4 == 0 and position + 4 <= aligned_end:
            out.append(_PART_HEADER.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (position - start)))
            out.append(buf[start:position])
            start = position + 4
            position = buf.find(_MAGIC_BYTES, start)
        else:
            position = buf.find(_MAGIC_BYTES, position + 1)
    out.append(_PART_HEADER.pack(MAGIC, ((3 if start > 0 else 0) << 29) | (len(buf) - start)))
    out.append(buf[start:])
    out.append(b"\0" * (-len(buf) % 4))
    return b"".join(out)


def pack(header, s: bytes) -> bytes:
    """Header + payload as one record.  A scalar label gives flag 0; a sequence of labels
    gives flag = their count, stored as float32 after the header (header label 0)."""
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        header = header._replace(flag=0)
    else:
        label = np.asarray(header.label, dtype=np.float32).ravel()
        header = header._replace(flag=label.size, label=0)
        s = label.tobytes() + bytes(s)
    return struct.pack(_IR_FORMAT, *header) + bytes(s)


def unpack(s: bytes):
    """Record -> (IRHeader, payload bytes).  With flag > 0 the header's label is a float32 array."""
    if len(s) < _IR_SIZE:
        raise RecordIOError(f"record of {len(s)} bytes is shorter than the {_IR_SIZE}-byte IRHeader")
    header = IRHeader(*struct.unpack(_IR_FORMAT, s[:_IR_SIZE]))
    s = s[_IR_SIZE:]
    if header.flag > 0:
        if len(s) < 4 * header.flag:
            raise RecordIOError(f"record header announces {header.flag} float labels but only {len(s)} bytes follow it")
        header = header._replace(label=np.frombuffer(s, np.float32, header.flag))
        s = s[4 * header.flag :]
    return header, s


def unpack_img(s: bytes, iscolor: int = -1):
    """Record -> (IRHeader, image) decoded with ``cv2.imdecode(buf, iscolor)``: BGR order for colour
    images, as MXNet returns (-1: as stored, 1: 3-channel colour, 0: grayscale)."""
    header, payload = unpack(s)
    if not payload:
        raise RecordIOError(f"record id {header.id}: empty image payload (the record holds only its header)")
    image = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), iscolor)
    if image is None:
        raise RecordIOError(f"record id {header.id}: the {len(payload)}-byte payload is not a decodable image")
    return header, image


def pack_img(header, img: np.ndarray, quality: int = 95, img_fmt: str = ".jpg") -> bytes:
    """Encode a BGR (cv2-order) image with cv2 and pack it; ``quality`` is the JPEG quality
    or the PNG compression level, as in MXNet."""
    fmt = img_fmt.lower()
    if fmt in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif fmt == ".png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, quality]
    else:
        raise ValueError(f"unsupported image format {img_fmt!r}: use '.jpg' or '.png'")
    ok, encoded = cv2.imencode(fmt, img, params)
    if not ok:
        raise ValueError(f"cv2 could not encode an image of shape {np.shape(img)} as {fmt}")
    return pack(header, encoded.tobytes())
