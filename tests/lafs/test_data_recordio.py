"""MXNet RecordIO: byte layout from the format's spec, round trips, and errors on damaged files."""

import pickle
import struct

import cv2
import numpy as np
import pytest
import torch

from lafs.data import recordio
from lafs.data.recordio import IRHeader, MXIndexedRecordIO, MXRecordIO, RecordIOError

MAGIC = 0xCED7230A
M = struct.pack("<I", MAGIC)


def part(cflag: int, data: bytes) -> bytes:
    """One part as the spec lays it out: magic, (cflag << 29) | length, data, zero padding to 4 bytes."""
    return struct.pack("<II", MAGIC, (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


def random_bytes(rng: torch.Generator, size: int) -> bytes:
    return bytes(torch.randint(0, 256, (size,), generator=rng, dtype=torch.uint8).tolist())


def write_records(path, payloads, indexed=True):
    if indexed:
        with MXIndexedRecordIO(str(path) + ".idx", path, "w") as writer:
            for key, payload in enumerate(payloads):
                writer.write_idx(key, payload)
    else:
        with MXRecordIO(path, "w") as writer:
            for payload in payloads:
                writer.write(payload)
    return path.read_bytes()


@pytest.mark.parametrize(
    "payload,expected",
    [
        (b"abcde", part(0, b"abcde")),
        (b"abcd", part(0, b"abcd")),
        (b"", part(0, b"")),
        # magic at aligned offsets 4 and 16 splits; the one at offset 10 (unaligned) stays inside a part
        (b"AAAA" + M + b"BB" + M + b"CC" + M + b"xyz", part(1, b"AAAA") + part(2, b"BB" + M + b"CC") + part(3, b"xyz")),
        (M, part(1, b"") + part(3, b"")),
        (M + M + b"q", part(1, b"") + part(2, b"") + part(3, b"q")),
        (b"AAAA" + M, part(1, b"AAAA") + part(3, b"")),
        # magic at offset 2 only (unaligned): one part
        (b"ab" + M + b"cd", part(0, b"ab" + M + b"cd")),
        # aligned magic at offset 4 of a 9-byte record: 4 < floor(9/4)*4 = 8, so it splits
        (b"1234" + M + b"5", part(1, b"1234") + part(3, b"5")),
    ],
)
def test_writer_bytes_follow_the_spec(tmp_path, payload, expected):
    assert write_records(tmp_path / "one.rec", [payload], indexed=False) == expected
    with MXRecordIO(tmp_path / "one.rec", "r") as reader:
        assert reader.read() == payload
        assert reader.read() is None


def test_index_lists_the_offset_of_each_first_part(tmp_path, rng):
    payloads = [random_bytes(rng, int(n)) for n in torch.randint(0, 40, (6,), generator=rng)]
    payloads[2] = payloads[2] + b"\0" * (-len(payloads[2]) % 4) + M + b"tail"
    data = write_records(tmp_path / "x.rec", payloads)
    offsets, position = [], 0
    for payload in payloads:
        offsets.append(position)
        position += len(recordio.encode_record(payload))
    assert position == len(data)
    lines = (tmp_path / "x.rec.idx").read_text().splitlines()
    assert lines == [f"{key}\t{offset}" for key, offset in enumerate(offsets)]


def test_round_trip_with_random_magic_words(tmp_path, rng):
    payloads = []
    for _ in range(20):
        data = bytearray(random_bytes(rng, int(torch.randint(0, 200, (1,), generator=rng))))
        for _ in range(int(torch.randint(0, 4, (1,), generator=rng))):
            if len(data) >= 4:
                at = int(torch.randint(0, len(data) - 3, (1,), generator=rng))
                data[at : at + 4] = M
        payloads.append(bytes(data))
    write_records(tmp_path / "r.rec", payloads)
    with MXRecordIO(tmp_path / "r.rec", "r") as reader:
        assert [reader.read() for _ in payloads] == payloads
        assert reader.read() is None
        reader.reset()
        assert reader.read() == payloads[0]
    reader = MXIndexedRecordIO(str(tmp_path / "r.rec") + ".idx", tmp_path / "r.rec", "r")
    assert reader.keys == list(range(len(payloads)))
    for key in torch.randperm(len(payloads), generator=rng).tolist():
        assert reader.read_idx(key) == payloads[key]
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read_idx(3) == payloads[3]
    reader.close()
    clone.close()


def test_pack_scalar_and_multi_float_labels(rng):
    payload = random_bytes(rng, 13)
    label = float(torch.rand(1, generator=rng))
    packed = recordio.pack(IRHeader(7, label, 5, 9), payload)
    assert packed == struct.pack("<IfQQ", 0, label, 5, 9) + payload  # scalar label: flag forced to 0
    header, rest = recordio.unpack(packed)
    assert header.flag == 0 and header.label == pytest.approx(label, rel=1e-6) and rest == payload
    assert (header.id, header.id2) == (5, 9)

    labels = torch.rand(3, generator=rng).numpy()
    packed = recordio.pack(IRHeader(0, labels, 11, 0), payload)
    assert packed == struct.pack("<IfQQ", 3, 0.0, 11, 0) + labels.astype("<f4").tobytes() + payload
    header, rest = recordio.unpack(packed)
    assert header.flag == 3 and rest == payload
    np.testing.assert_array_equal(header.label, labels.astype(np.float32))


def test_pack_img_round_trip_keeps_bgr_order(rng):
    image = torch.randint(0, 256, (20, 24, 3), generator=rng, dtype=torch.uint8).numpy()
    header, decoded = recordio.unpack_img(recordio.pack_img(IRHeader(0, [2.0, 1.0], 1, 0), image, 3, ".png"))
    np.testing.assert_array_equal(decoded, image)  # png is lossless; channels stay in the given (BGR) order
    np.testing.assert_array_equal(header.label, [2.0, 1.0])
    _, gray = recordio.unpack_img(recordio.pack_img(IRHeader(0, 1.0, 1, 0), image, 3, ".png"), iscolor=0)
    assert gray.shape == image.shape[:2]  # iscolor=0: one channel (the decoder's rounding may differ by 1)
    np.testing.assert_allclose(gray, cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), atol=1)
    smooth = np.full((16, 16, 3), (10, 120, 240), np.uint8)
    _, jpeg = recordio.unpack_img(recordio.pack_img(IRHeader(0, 1.0, 1, 0), smooth, 95))
    assert np.abs(jpeg.astype(int) - smooth).max() <= 3  # blue stays in channel 2
    with pytest.raises(RecordIOError, match="not a decodable image"):
        recordio.unpack_img(recordio.pack(IRHeader(0, 1.0, 4, 0), b"not an image"))


def test_header_read_needs_only_the_record_start(tmp_path, rng):
    labels = torch.rand(2, generator=rng).numpy()
    image_bytes = random_bytes(rng, 64)
    # ids equal to the magic put it at aligned offsets 8 and 16: the header itself is split into parts
    split_header = recordio.pack(IRHeader(0, 3.0, MAGIC, MAGIC), image_bytes)
    write_records(tmp_path / "h.rec", [recordio.pack(IRHeader(0, labels, 0, 0), image_bytes), split_header])
    reader = MXIndexedRecordIO(str(tmp_path / "h.rec") + ".idx", tmp_path / "h.rec", "r")
    header = reader.read_header_idx(0)
    np.testing.assert_array_equal(header.label, labels.astype(np.float32))
    assert reader.read_header_idx(1) == IRHeader(0, 3.0, MAGIC, MAGIC)
    assert reader.read_idx(1) == split_header
    reader.close()


def corrupt_copy(tmp_path, transform):
    payloads = [b"first record..", b"seco" + M + b"nd-record", b"third"]
    data = write_records(tmp_path / "ok.rec", payloads)
    path = tmp_path / "bad.rec"
    path.write_bytes(transform(data))
    (tmp_path / "bad.rec.idx").write_text((tmp_path / "ok.rec.idx").read_text())
    return MXIndexedRecordIO(str(path) + ".idx", path, "r")


def test_truncated_record_names_file_and_key(tmp_path):
    reader = corrupt_copy(tmp_path, lambda data: data[:-6])
    assert reader.read_idx(0) == b"first record.."
    with pytest.raises(RecordIOError, match=r"truncated.*bad\.rec \(key 2\)"):
        reader.read_idx(2)


def test_damaged_magic_names_file_key_and_offset(tmp_path):
    offset = len(recordio.encode_record(b"first record.."))
    reader = corrupt_copy(tmp_path, lambda data: data[:offset] + b"\xff" + data[offset + 1 :])
    with pytest.raises(RecordIOError, match=rf"corrupt.*bad\.rec \(key 1\) at byte {offset}"):
        reader.read_idx(1)


def test_offset_into_the_middle_of_a_record_is_rejected(tmp_path):
    reader = corrupt_copy(tmp_path, lambda data: data)
    second = reader.idx[1]
    reader.idx[1] = second + len(part(1, b"seco"))  # points at the continuation part
    with pytest.raises(RecordIOError, match="continuation flag 3"):
        reader.read_idx(1)
    reader.idx[1] = second + 4
    with pytest.raises(RecordIOError, match="magic"):
        reader.read_idx(1)


def test_index_errors(tmp_path):
    reader = corrupt_copy(tmp_path, lambda data: data)
    with pytest.raises(KeyError, match="key 7 is not in the index"):
        reader.read_idx(7)
    (tmp_path / "bad.rec.idx").write_text("0\t0\nnot-a-line\n")
    with pytest.raises(RecordIOError, match=r"malformed index line 2 in .*bad\.rec\.idx"):
        MXIndexedRecordIO(str(tmp_path / "bad.rec.idx"), tmp_path / "bad.rec", "r")
    with pytest.raises(FileNotFoundError, match="missing.idx"):
        MXIndexedRecordIO(str(tmp_path / "missing.idx"), tmp_path / "bad.rec", "r")


def test_mode_errors(tmp_path):
    with pytest.raises(ValueError, match="invalid flag"):
        MXRecordIO(tmp_path / "a.rec", "a")
    writer = MXRecordIO(tmp_path / "a.rec", "w")
    with pytest.raises(RecordIOError, match="open for writing"):
        writer.read()
    with pytest.raises(RecordIOError, match="cannot pickle a RecordIO writer"):
        pickle.dumps(writer)
    writer.close()
    with pytest.raises(RecordIOError, match="closed"):
        writer.write(b"x")


def test_index_with_a_negative_offset_names_the_line(tmp_path):
    corrupt_copy(tmp_path, lambda data: data).close()
    index = tmp_path / "bad.rec.idx"
    lines = index.read_text().splitlines()
    index.write_text("\n".join([lines[0], "1\t-8", lines[2]]) + "\n")
    with pytest.raises(
        RecordIOError, match=r"malformed index line 2 in .*bad\.rec\.idx: '1\\t-8' has a negative offset"
    ):
        MXIndexedRecordIO(str(index), tmp_path / "bad.rec", "r")


def test_index_with_a_duplicate_key_names_the_key_and_both_lines(tmp_path):
    corrupt_copy(tmp_path, lambda data: data).close()
    index = tmp_path / "bad.rec.idx"
    lines = index.read_text().splitlines()
    index.write_text("\n".join([*lines, "", "01\t0"]) + "\n")  # "01" is key 1 again
    with pytest.raises(RecordIOError, match=r"duplicate key 1 in .*bad\.rec\.idx: lines 2 and 5"):
        MXIndexedRecordIO(str(index), tmp_path / "bad.rec", "r")
    with MXIndexedRecordIO(tmp_path / "w.idx", tmp_path / "w.rec", "w") as writer:
        writer.write_idx(0, b"a")
        with pytest.raises(RecordIOError, match=r"key 0 is already in the index .*w\.idx"):
            writer.write_idx(0, b"b")


def test_index_that_is_not_utf8_text_names_the_file_and_line(tmp_path):
    corrupt_copy(tmp_path, lambda data: data).close()
    index = tmp_path / "bad.rec.idx"
    index.write_bytes(b"0\t0\n\xff\xfe\x00\x01garbage\n")
    with pytest.raises(RecordIOError, match=r"malformed index line 2 in .*bad\.rec\.idx: byte 4 is not UTF-8"):
        MXIndexedRecordIO(str(index), tmp_path / "bad.rec", "r")


def test_empty_image_payload_is_a_recordio_error():
    with pytest.raises(RecordIOError, match="record id 4: empty image payload"):
        recordio.unpack_img(recordio.pack(IRHeader(0, 1.0, 4, 0), b""))
    with pytest.raises(RecordIOError, match="record id 5: empty image payload"):
        recordio.unpack_img(recordio.pack(IRHeader(0, [1.0, 1.0], 5, 0), b""))
