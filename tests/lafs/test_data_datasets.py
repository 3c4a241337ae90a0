"""FaceRecordDataset (both layouts, colour option, DataLoader workers), ImageFolderFaces,
``python -m lafs.data pack`` and few-shot subsets."""

import re
import struct

import cv2
import numpy as np
import pytest
import torch

from lafs.data import FaceRecordDataset, ImageFolderFaces, SyntheticFaces, few_shot_subset, recordio
from lafs.data.__main__ import main as data_main
from lafs.data.recordio import IRHeader, MXIndexedRecordIO, RecordIOError


def random_faces(rng, counts):
    """{identity: [uint8 RGB 112x112 images]} with ``counts[i]`` random images for identity i."""
    return {
        i: [torch.randint(0, 256, (112, 112, 3), generator=rng, dtype=torch.uint8).numpy() for _ in range(n)]
        for i, n in enumerate(counts)
    }


def write_folder(root, faces, names=None):
    for identity, images in faces.items():
        folder = root / (names[identity] if names else f"person_{identity:02d}")
        folder.mkdir(parents=True, exist_ok=True)
        for number, image in enumerate(images):
            cv2.imwrite(str(folder / f"{number:03d}.png"), image[:, :, ::-1])
    return root


def expected_tensor(rgb):
    return (torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1) - 127.5) / 127.5  # insightface scaling


def write_rec_by_hand(root, faces, layout, store_bgr=False, identity_records=True):
    """A RecordIO set written record by record following docs/DATA.md (independent of pack_folder)."""
    root.mkdir(parents=True, exist_ok=True)
    order = [(identity, image) for identity, images in faces.items() for image in images]
    with MXIndexedRecordIO(root / "train.idx", root / "train.rec", "w") as writer:
        first = 1 if layout == "header" else 0
        if layout == "header":
            end = len(order) + 1 + (len(faces) if identity_records else 0)
            writer.write_idx(0, recordio.pack(IRHeader(0, [len(order) + 1, end], 0, 0), b""))
        for offset, (identity, image) in enumerate(order):
            label = [float(identity), 1.0] if layout == "header" else float(identity)
            stored = image if store_bgr else image[:, :, ::-1]  # cv2 encodes its input as BGR
            header = IRHeader(0, label, first + offset, 0)
            writer.write_idx(first + offset, recordio.pack_img(header, stored, 3, ".png"))
        if layout == "header" and identity_records:
            start = 1
            for identity, images in faces.items():
                writer.write_idx(
                    len(order) + 1 + identity, recordio.pack(IRHeader(0, [start, start + len(images)], 0, 0), b"")
                )
                start += len(images)
    return [image for _, image in order], np.array([identity for identity, _ in order])


@pytest.mark.parametrize("layout", ["header", "flat"])
def test_record_dataset_reads_both_layouts(tmp_path, rng, layout):
    faces = random_faces(rng, [3, 1, 2])
    images, labels = write_rec_by_hand(tmp_path, faces, layout)
    dataset = FaceRecordDataset(tmp_path)
    assert dataset.layout == layout
    np.testing.assert_array_equal(dataset.labels, labels)
    assert dataset.labels.dtype == np.int64 and dataset.num_classes == 3 and len(dataset) == 6
    for index in torch.randperm(6, generator=rng).tolist():
        image, label = dataset[index]
        assert image.dtype == torch.float32 and image.shape == (3, 112, 112) and label == labels[index]
        torch.testing.assert_close(image, expected_tensor(images[index]), atol=0, rtol=0)


def test_header_layout_without_identity_records_reads_each_label(tmp_path, rng):
    images, labels = write_rec_by_hand(tmp_path, random_faces(rng, [1, 3, 2]), "header", identity_records=False)
    dataset = FaceRecordDataset(tmp_path)
    assert dataset.layout == "header" and dataset.num_classes == 3
    np.testing.assert_array_equal(dataset.labels, labels)
    np.testing.assert_array_equal(dataset.keys, np.arange(1, 7))


def test_bgr_option_swaps_channels_of_bgr_packed_sets(tmp_path, rng):
    faces = random_faces(rng, [2, 2])
    images, _ = write_rec_by_hand(tmp_path, faces, "header", store_bgr=True)
    rgb_decode = FaceRecordDataset(tmp_path, color="rgb")[1][0]
    true_colours = FaceRecordDataset(tmp_path, color="bgr")[1][0]
    torch.testing.assert_close(true_colours, expected_tensor(images[1]), atol=0, rtol=0)
    torch.testing.assert_close(rgb_decode, expected_tensor(images[1][:, :, ::-1]), atol=0, rtol=0)
    with pytest.raises(ValueError, match="color must be one of"):
        FaceRecordDataset(tmp_path, color="hsv")


def test_transform_gets_uint8_rgb_and_property_sets_num_classes(tmp_path, rng):
    faces = random_faces(rng, [2, 2])
    images, _ = write_rec_by_hand(tmp_path, faces, "flat")
    (tmp_path / "property").write_text("10,112,112\n")
    seen = []

    def flip(image):
        seen.append((image.dtype, image.shape))
        return image[:, ::-1]

    dataset = FaceRecordDataset(tmp_path, transform=flip)
    assert dataset.num_classes == 10
    torch.testing.assert_close(dataset[2][0], expected_tensor(images[2][:, ::-1]), atol=0, rtol=0)
    assert seen == [(np.uint8, (112, 112, 3))]
    (tmp_path / "property").write_text("1,112,112\n")
    with pytest.raises(ValueError, match="declares 1 classes"):
        FaceRecordDataset(tmp_path)
    (tmp_path / "property").write_text("classes\n")
    with pytest.raises(ValueError, match="malformed"):
        FaceRecordDataset(tmp_path)


def test_record_dataset_errors_name_file_and_key(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="train.rec"):
        FaceRecordDataset(tmp_path)
    write_rec_by_hand(tmp_path, random_faces(rng, [2, 2]), "flat")
    data = (tmp_path / "train.rec").read_bytes()
    (tmp_path / "train.rec").write_bytes(data[:-100])  # cuts into the image bytes of the last record
    dataset = FaceRecordDataset(tmp_path)  # the labels (record headers) are still readable
    with pytest.raises(RecordIOError, match=r"train\.rec \(key 3\).*truncated"):
        dataset[3]


def test_header_layout_with_keys_missing_from_the_index(tmp_path, rng):
    write_rec_by_hand(tmp_path, random_faces(rng, [2, 2]), "header")
    lines = (tmp_path / "train.idx").read_text().splitlines()
    (tmp_path / "train.idx").write_text("\n".join(line for line in lines if not line.startswith("3\t")) + "\n")
    with pytest.raises(RecordIOError, match=r"train\.idx.*1 are missing \(first: 3\)"):
        FaceRecordDataset(tmp_path)


def test_record_label_disagreeing_with_identity_ranges_is_reported(tmp_path, rng):
    faces = random_faces(rng, [2, 2])
    write_rec_by_hand(tmp_path, faces, "header")
    reader = MXIndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "r")
    records = {key: reader.read_idx(key) for key in reader.keys}
    reader.close()
    header, image_bytes = recordio.unpack(records[4])
    records[4] = recordio.pack(IRHeader(0, [0.0, 1.0], 4, 0), image_bytes)  # identity 1's last image says class 0
    with MXIndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "w") as writer:
        for key in sorted(records):
            writer.write_idx(key, records[key])
    dataset = FaceRecordDataset(tmp_path)
    np.testing.assert_array_equal(dataset.labels, [0, 0, 1, 1])
    with pytest.raises(RecordIOError, match=r"train.rec \(key 4\).*label 0 differs"):
        dataset[3]


def test_dataloader_workers_read_their_own_file(tmp_path, rng):
    faces = random_faces(rng, [4, 4, 4])
    images, labels = write_rec_by_hand(tmp_path, faces, "header")
    dataset = FaceRecordDataset(tmp_path)
    dataset[0]  # the parent opens the file first: forked workers must not share its position
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, shuffle=False)
    batches = list(loader)
    got = torch.cat([batch[0] for batch in batches])
    torch.testing.assert_close(got, torch.stack([expected_tensor(image) for image in images]), atol=0, rtol=0)
    np.testing.assert_array_equal(torch.cat([batch[1] for batch in batches]).numpy(), labels)


def test_image_folder_faces(tmp_path, rng):
    faces = random_faces(rng, [2, 3])
    write_folder(tmp_path, faces, names=["bob", "alice"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    dataset = ImageFolderFaces(tmp_path)
    assert dataset.identities == ["alice", "bob"] and dataset.num_classes == 2
    np.testing.assert_array_equal(dataset.labels, [0, 0, 0, 1, 1])
    image, label = dataset[4]
    torch.testing.assert_close(image, expected_tensor(faces[0][1]), atol=0, rtol=0)
    assert label == 1
    cv2.imwrite(str(tmp_path / "bob" / "big.png"), np.zeros((120, 100, 3), np.uint8))
    with pytest.raises(ValueError, match=r"big\.png.*\(120, 100, 3\)"):
        ImageFolderFaces(tmp_path)[-1]
    (tmp_path / "bob" / "zz.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read image .*zz\.jpg"):
        ImageFolderFaces(tmp_path)[-1]
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderFaces(tmp_path / "empty")


@pytest.mark.parametrize("layout", ["header", "flat"])
def test_pack_cli_writes_what_the_dataset_reads(tmp_path, rng, layout, capsys):
    faces = random_faces(rng, [2, 1, 3])
    write_folder(tmp_path / "src", faces)
    code = data_main(
        ["pack", str(tmp_path / "src"), str(tmp_path / "out"), "--layout", layout, "--format", ".png", "--quiet"]
    )
    assert code == 0 and "packed 6 images of 3 identities" in capsys.readouterr().out
    assert (tmp_path / "out" / "property").read_text().splitlines()[0] == "3,112,112"
    reader = MXIndexedRecordIO(tmp_path / "out" / "train.idx", tmp_path / "out" / "train.rec", "r")
    if layout == "header":
        assert reader.keys == list(range(10))  # header, 6 images, 3 identity ranges
        head = reader.read_idx(0)
        assert head == struct.pack("<IfQQ", 2, 0.0, 0, 0) + np.array([7, 10], "<f4").tobytes()
        np.testing.assert_array_equal(recordio.unpack(reader.read_idx(9))[0].label, [4, 7])
        np.testing.assert_array_equal(recordio.unpack(reader.read_idx(3))[0].label, [1, 1])
    else:
        assert reader.keys == list(range(6))
        assert recordio.unpack(reader.read_idx(5))[0] == IRHeader(0, 2.0, 5, 0)
    reader.close()
    dataset = FaceRecordDataset(tmp_path / "out")
    assert dataset.layout == layout and dataset.num_classes == 3
    np.testing.assert_array_equal(dataset.labels, [0, 0, 1, 2, 2, 2])
    torch.testing.assert_close(dataset[4][0], expected_tensor(faces[2][1]), atol=0, rtol=0)


def test_pack_aligns_with_norm_crop(tmp_path):
    from insightface.utils.face_align import norm_crop

    faces = SyntheticFaces(2, 2, seed=5)
    src = tmp_path / "src"
    lines = []
    for index in range(len(faces)):
        rgb, label, points = faces.render(index)
        # place the face in a larger photo, scaled and shifted, as a detector would see it
        photo = cv2.resize(rgb, (224, 224))
        photo = cv2.copyMakeBorder(photo, 30, 10, 50, 6, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        photo_points = np.round((points * 2.0 + (50.0, 30.0)) * 8.0) / 8.0  # exact in the 3-decimal text file
        path = src / f"id{label}" / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), photo[:, :, ::-1])
        lines.append(f"id{label}/{index}.png " + " ".join(f"{v:.3f}" for v in photo_points.ravel()))
    (tmp_path / "marks.txt").write_text("# path x1 y1 ... x5 y5\n" + "\n".join(lines) + "\n")
    assert (
        data_main(
            [
                "pack",
                str(src),
                str(tmp_path / "out"),
                "--align",
                str(tmp_path / "marks.txt"),
                "--format",
                ".png",
                "--quiet",
            ]
        )
        == 0
    )
    dataset = FaceRecordDataset(tmp_path / "out")
    photo = cv2.imread(str(src / "id1" / "3.png"))
    points = np.round((faces.render(3)[2] * 2.0 + (50.0, 30.0)) * 8.0) / 8.0
    expected = norm_crop(photo, points.astype(np.float32), image_size=112)
    torch.testing.assert_close(dataset[3][0], expected_tensor(expected[:, :, ::-1].copy()), atol=0, rtol=0)


def test_pack_errors(tmp_path, rng, capsys):
    write_folder(tmp_path / "src", random_faces(rng, [1, 1]))
    (tmp_path / "marks.txt").write_text("person_00/000.png 1 2 3\n")
    assert (
        data_main(
            ["pack", str(tmp_path / "src"), str(tmp_path / "out"), "--align", str(tmp_path / "marks.txt"), "--quiet"]
        )
        == 2
    )
    assert "marks.txt line 1: expected an image path and 10 numbers" in capsys.readouterr().err
    (tmp_path / "marks.txt").write_text("person_00/000.png" + " 50" * 10 + "\n")
    assert (
        data_main(
            ["pack", str(tmp_path / "src"), str(tmp_path / "out"), "--align", str(tmp_path / "marks.txt"), "--quiet"]
        )
        == 2
    )
    assert "no landmarks for 1 image(s), e.g. person_01/000.png" in capsys.readouterr().err
    (tmp_path / "src" / "person_01" / "001.jpg").write_bytes(b"\xff\xd8 broken")
    assert data_main(["pack", str(tmp_path / "src"), str(tmp_path / "out"), "--quiet"]) == 2
    assert re.search(r"cannot read image .*person_01/001\.jpg", capsys.readouterr().err)
    assert not (tmp_path / "out" / "train.rec").exists()  # nothing half-written is left
    assert list((tmp_path / "out").iterdir()) == []


def test_few_shot_subset(rng):
    labels = torch.randint(0, 12, (150,), generator=rng).numpy()

    class Labelled:
        def __init__(self, labels):
            self.labels = labels

        def __getitem__(self, index):
            return torch.full((1,), float(index)), int(self.labels[index])

    parent = Labelled(labels)
    seed = int(torch.randint(0, 1000, (1,), generator=rng))
    subset = few_shot_subset(parent, 3, identity_fraction=0.5, seed=seed)
    present = np.unique(labels)
    assert subset.num_classes == int(np.floor(0.5 * len(present) + 0.5))  # rounded half up
    np.testing.assert_array_equal(subset.labels, np.searchsorted(subset.identities, subset.original_labels))
    np.testing.assert_array_equal(subset.original_labels, labels[subset.indices])
    for new_class, identity in enumerate(subset.identities):
        assert (subset.labels == new_class).sum() == min(3, (labels == identity).sum())
    image, label = subset[len(subset) - 1]
    assert float(image) == subset.indices[-1] and subset.identities[label] == labels[subset.indices[-1]]
    again = few_shot_subset(parent, 3, identity_fraction=0.5, seed=seed)
    np.testing.assert_array_equal(again.indices, subset.indices)
    other = few_shot_subset(parent, 3, identity_fraction=0.5, seed=seed + 1)
    assert not np.array_equal(other.indices, subset.indices)
    assert len(few_shot_subset(parent, 1, seed=seed)) == len(present)
    with pytest.raises(ValueError, match="identity_fraction"):
        few_shot_subset(parent, 1, identity_fraction=0.0)


def rewrite_records(root, changes):
    """Rewrite a set's records with ``changes`` {key: function(old record bytes) -> new record bytes}."""
    with MXIndexedRecordIO(root / "train.idx", root / "train.rec", "r") as reader:
        records = {key: reader.read_idx(key) for key in reader.keys}
    with MXIndexedRecordIO(root / "train.idx", root / "train.rec", "w") as writer:
        for key in sorted(records):
            writer.write_idx(key, changes[key](records[key]) if key in changes else records[key])


def relabel(label):
    """A change for :func:`rewrite_records`: the same image under another label."""
    return lambda record: recordio.pack(IRHeader(0, label, 0, 0), recordio.unpack(record)[1])


def test_header_record_announcing_more_keys_than_the_index_fails_at_once(tmp_path, rng):
    write_rec_by_hand(tmp_path, random_faces(rng, [2, 2]), "header")  # header [5, 7]: keys 0..6
    rewrite_records(tmp_path, {0: relabel([5.0, 1e6])})
    with pytest.raises(
        RecordIOError,
        match=r"train\.idx: the header record \(key 0\) announces image keys 1\.\.4 and identity keys "
        r"5\.\.999999, but 999993 are missing \(first: 7\); the index lists 7 keys",
    ):
        FaceRecordDataset(tmp_path)


@pytest.mark.parametrize("label", [[float("nan"), 7.0], [5.0, float("inf")], [-5.0, 7.0], [2.5, 7.0], [5.0, 3.0]])
def test_header_record_that_is_not_a_key_range_is_refused(tmp_path, rng, label):
    write_rec_by_hand(tmp_path, random_faces(rng, [2, 2]), "header")
    rewrite_records(tmp_path, {0: relabel(label)})
    with pytest.raises(
        RecordIOError, match=r"train\.rec \(key 0\): the header record \[.*\] is not \[N\+1, N\+1\+num_ids\]"
    ):
        FaceRecordDataset(tmp_path)


@pytest.mark.parametrize("label", [[float("nan"), 3.0], [1.0, 2.5]])
def test_identity_record_that_is_not_a_key_range_is_refused(tmp_path, rng, label):
    write_rec_by_hand(tmp_path, random_faces(rng, [2, 2]), "header")
    rewrite_records(tmp_path, {5: relabel(label)})
    with pytest.raises(RecordIOError, match=r"train\.rec \(key 5\): identity range \[.*\) is not a range"):
        FaceRecordDataset(tmp_path)


@pytest.mark.parametrize(
    "label,problem",
    [
        (float("nan"), "nan is not a finite number"),
        (float("inf"), "inf is not a finite number"),
        (1.7, "1.7 is not a whole number"),
        (-1.0, "-1.0 is negative"),
        (3e9, r"3e\+09 is above 16777216"),
    ],
)
@pytest.mark.parametrize("layout", ["header", "flat"])
def test_image_label_that_is_not_a_class_number_names_the_key(tmp_path, rng, layout, label, problem):
    write_rec_by_hand(tmp_path, random_faces(rng, [2, 2]), layout)
    key = 3 if layout == "header" else 2  # the first image of identity 1: its label is read in both layouts
    rewrite_records(tmp_path, {key: relabel([label, 1.0] if layout == "header" else label)})
    with pytest.raises(RecordIOError, match=rf"train\.rec \(key {key}\): class label {problem}"):
        FaceRecordDataset(tmp_path)


def test_labels_far_beyond_the_data_need_a_property_file(tmp_path, rng):
    faces = random_faces(rng, [1, 1, 1])
    write_rec_by_hand(tmp_path, {0: faces[0], 1: faces[1], 50: faces[2]}, "flat")
    with pytest.raises(
        RecordIOError,
        match=r"train\.rec \(key 2\): class label 50 would make 51 classes, but the set has 3 images "
        r"with 3 distinct labels .*declare num_classes in .*property",
    ):
        FaceRecordDataset(tmp_path)
    (tmp_path / "property").write_text("51,112,112\n")
    assert FaceRecordDataset(tmp_path).num_classes == 51
    # gaps are accepted while max + 1 stays within the image count or twice the distinct labels
    write_rec_by_hand(tmp_path / "sparse", {0: faces[0], 3: faces[1]}, "flat")
    assert FaceRecordDataset(tmp_path / "sparse").num_classes == 4


def test_property_that_is_not_text_names_the_file(tmp_path, rng):
    write_rec_by_hand(tmp_path, random_faces(rng, [2, 2]), "flat")
    (tmp_path / "property").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"malformed .*property: byte 0 is not UTF-8 text"):
        FaceRecordDataset(tmp_path)


def test_folders_where_files_belong_are_named(tmp_path, rng):
    write_rec_by_hand(tmp_path, random_faces(rng, [2, 2]), "flat")
    (tmp_path / "property").mkdir()
    with pytest.raises(ValueError, match=r"property is not a file"):
        FaceRecordDataset(tmp_path)
    (tmp_path / "property").rmdir()
    (tmp_path / "train.rec").unlink()
    (tmp_path / "train.rec").mkdir()
    with pytest.raises(IsADirectoryError, match=r"train\.rec is a folder"):
        FaceRecordDataset(tmp_path)


@pytest.mark.parametrize("layout", ["header", "flat"])
def test_empty_image_payload_names_file_and_key(tmp_path, rng, layout):
    write_rec_by_hand(tmp_path, random_faces(rng, [2, 2]), layout)
    key = 2
    # keep the header and labels, drop the image bytes
    rewrite_records(tmp_path, {key: lambda record: record[: len(record) - len(recordio.unpack(record)[1])]})
    dataset = FaceRecordDataset(tmp_path)
    with pytest.raises(RecordIOError, match=rf"train\.rec \(key {key}\): record id {key}: empty image payload"):
        dataset[list(dataset.keys).index(key)]


@pytest.mark.parametrize(
    "options,message",
    [
        (["--format", ".png", "--quality", "95"], "quality 95 is not a valid PNG compression level for .png"),
        (["--quality", "101"], "quality 101 is not a valid JPEG quality for .jpg"),
        (["--quality", "-1"], "quality -1 is not a valid JPEG quality"),
    ],
)
def test_pack_quality_out_of_range_is_refused(tmp_path, rng, capsys, options, message):
    write_folder(tmp_path / "src", random_faces(rng, [1, 1]))
    assert data_main(["pack", str(tmp_path / "src"), str(tmp_path / "out"), *options, "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def swap_index_offsets(root, first, second):
    """Exchange the offsets of two keys in ``train.idx`` (a damaged or stale index)."""
    entries = dict(line.split("\t") for line in (root / "train.idx").read_text().splitlines())
    entries[str(first)], entries[str(second)] = entries[str(second)], entries[str(first)]
    (root / "train.idx").write_text("".join(f"{key}\t{offset}\n" for key, offset in entries.items()))


def test_flat_index_pointing_at_other_keys_records_is_refused(tmp_path, rng):
    write_rec_by_hand(tmp_path, random_faces(rng, [2, 2, 2]), "flat")
    swap_index_offsets(tmp_path, 1, 2)  # key 1 (identity 0) would be read as identity 1, and key 2 the other way
    with pytest.raises(
        RecordIOError,
        match=r"train\.idx \(key 1\): the entry points at byte \d+, the record of key 2 .* 4 of 6 records carry "
        r"their own key; 2 entries disagree: the index does not match .*train\.rec",
    ):
        FaceRecordDataset(tmp_path)


def test_flat_set_whose_packer_numbers_records_otherwise_is_read(tmp_path, rng):
    faces = random_faces(rng, [2, 2])
    images, labels = write_rec_by_hand(tmp_path, faces, "flat")
    rewrite_records(tmp_path, {key: relabel(float(labels[key])) for key in range(4)})  # every id 0
    dataset = FaceRecordDataset(tmp_path)
    np.testing.assert_array_equal(dataset.labels, labels)
    torch.testing.assert_close(dataset[3][0], expected_tensor(images[3]))


@pytest.mark.parametrize("declared", [0, 2**24 + 2, 10**12])
def test_property_declaring_an_impossible_class_count_is_refused(tmp_path, rng, declared):
    write_rec_by_hand(tmp_path, random_faces(rng, [2, 2]), "flat")
    (tmp_path / "property").write_text(f"{declared},112,112\n")
    with pytest.raises(
        ValueError, match=rf"property declares {declared} classes: num_classes must be from 1 to 16777217"
    ):
        FaceRecordDataset(tmp_path)
    (tmp_path / "property").write_text(f"{2**24 + 1},112,112\n")
    assert FaceRecordDataset(tmp_path).num_classes == 2**24 + 1


def corrupt_payload(record):
    """A change for :func:`rewrite_records`: the same header and labels, the image bytes garbled."""
    header, payload = recordio.unpack(record)
    return record[: len(record) - len(payload)] + b"\x00" * len(payload)


def resized(size):
    """A change for :func:`rewrite_records`: the same header and labels, the image re-encoded at size x size."""

    def change(record):
        header, image = recordio.unpack_img(record, cv2.IMREAD_COLOR)
        return recordio.pack_img(header, cv2.resize(image, (size, size)), 3, ".png")

    return change


@pytest.mark.parametrize("workers", [0, 2])
def test_check_lists_every_bad_record_by_key(tmp_path, rng, capsys, workers):
    faces = random_faces(rng, [3, 3, 3])
    write_rec_by_hand(tmp_path / "good", faces, "header")
    assert data_main(["check", str(tmp_path / "good"), "--quiet", "--workers", str(workers)]) == 0
    assert "checked 9 images of 3 classes (header layout)" in capsys.readouterr().out

    write_rec_by_hand(tmp_path / "bad", faces, "header")  # image keys 1..9, identity 1 at keys 4..6
    label_of_identity_0 = lambda record: recordio.pack(  # noqa: E731
        IRHeader(0, [0.0, 1.0], 5, 0), recordio.unpack(record)[1]
    )
    rewrite_records(tmp_path / "bad", {2: corrupt_payload, 5: label_of_identity_0, 9: resized(96)})
    assert data_main(["check", str(tmp_path / "bad"), "--quiet", "--workers", str(workers)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("9 images of 3 classes (header layout) in " + str(tmp_path / "bad") + ": 3 bad records")
    assert re.search(r"train\.rec \(key 2\).*not a decodable image", lines[1])
    assert re.search(r"train\.rec \(key 5\).*label 0 differs", lines[2])
    assert re.search(r"train\.rec \(key 9\).*aligned 112x112.*\(96, 96, 3\)", lines[3])
    assert len(lines) == 4


def test_check_of_a_set_that_does_not_open_names_why(tmp_path, rng, capsys):
    write_rec_by_hand(tmp_path, random_faces(rng, [2, 2]), "flat")
    swap_index_offsets(tmp_path, 1, 2)
    assert data_main(["check", str(tmp_path), "--quiet"]) == 2
    assert "the index does not match" in capsys.readouterr().err
    assert data_main(["check", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err
