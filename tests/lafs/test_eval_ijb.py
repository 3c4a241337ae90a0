"""lafs.eval.ijb: TAR@FAR, template aggregation, pair scores, meta files, the whole protocol on a tiny folder."""

import os
import re

import numpy as np
import pytest
import torch

from lafs.eval.ijb import FARS, aggregate_templates, evaluate_ijb, read_protocol, score_pairs, tar_at_far

from helpers.eval_data import TinyFaceNet, direct_tar_at_far, expected_pair_scores, write_ijb_folder
from tolerances import assert_close

# ---------------------------------------------------------------- TAR at FAR


def test_tar_at_far_matches_roc_curve(rng):
    num_pairs = 20000
    labels = (torch.rand(num_pairs, generator=rng) < 0.1).long()
    scores = torch.randn(num_pairs, generator=rng) + 2.5 * labels
    scores = (scores * 20).round() / 20  # ties in the scores
    tar = tar_at_far(labels.numpy(), scores.numpy())
    expected = direct_tar_at_far(labels.numpy(), scores.numpy(), FARS)
    assert list(tar) == list(FARS)
    for far in FARS:
        assert tar[far] == pytest.approx(expected[far], abs=1e-12)
    assert tar[1e-1] > tar[1e-3]  # a real ROC, not a constant


def test_tar_at_far_equidistant_points_take_the_higher_tar():
    # ROC points (0, 1/3) and (0.2, 2/3) are both 0.1 from FAR 0.1
    positives, negatives = [0.9, 0.7, 0.3], [0.8, 0.5, 0.4, 0.2, 0.1]
    labels = [1] * len(positives) + [0] * len(negatives)
    tar = tar_at_far(labels, positives + negatives, fars=(0.1,))
    assert tar[0.1] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- templates and scores


def test_template_aggregation_hand_built():
    features = np.array(
        [
            [1.0, 0.0, 0.0],  # template 7, media 1
            [3.0, 0.0, 0.0],  # template 7, media 1
            [0.0, 1.0, 0.0],  # template 7, media 2
            [0.0, 0.0, 2.0],  # template 3, media 1
            [0.0, 4.0, 4.0],  # template 9, media 1 (same media id as in template 7: a different group)
            [0.0, 0.0, 4.0],  # template 9, media 5
        ]
    )
    template_ids, template_features = aggregate_templates(features, [7, 7, 7, 3, 9, 9], [1, 1, 2, 1, 1, 5])
    np.testing.assert_array_equal(template_ids, [3, 7, 9])
    # 7: mean([1,0,0],[3,0,0]) + [0,1,0] = [2,1,0]; 3: [0,0,2]; 9: [0,4,4] + [0,0,4] = [0,4,8]
    expected = np.array([[0, 0, 1], [2 / np.sqrt(5), 1 / np.sqrt(5), 0], [0, 1 / np.sqrt(5), 2 / np.sqrt(5)]])
    np.testing.assert_allclose(template_features, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block_elements", [1, 5, 100])  # one, two and all first templates per block
def test_score_pairs_in_blocks_and_unknown_templates(block_elements):
    template_ids = np.array([3, 7, 9])
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    pairs = np.array([[3, 7], [7, 9], [9, 3], [7, 7], [3, 9], [9, 7]])
    scores = score_pairs(template_ids, features, pairs, block_elements=block_elements)
    np.testing.assert_allclose(scores, [0.6, 0.8, 0.0, 1.0, 0.0, 0.8], atol=1e-7)
    with pytest.raises(ValueError, match=r"pairs.txt:4: template 8 has no images"):
        score_pairs(template_ids, features, np.array([[3, 7], [7, 9], [9, 3], [7, 8]]), "pairs.txt", block_elements)


# ---------------------------------------------------------------- the whole protocol


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # inside insightface's norm_crop
def test_evaluate_ijb_matches_direct_computation(tmp_path, rng):
    folder = write_ijb_folder(tmp_path / "IJBC", rng)
    model = TinyFaceNet(rng)
    result = evaluate_ijb(
        model, folder.root, "IJBC", batch_size=4, device="cpu", num_workers=0, block_elements=7, progress=False
    )
    expected = expected_pair_scores(model, folder)
    assert_close(torch.from_numpy(result.scores), torch.from_numpy(expected).float(), scale=10)
    np.testing.assert_array_equal(result.labels, [label for _, _, label in folder.pairs])
    expected_tar = direct_tar_at_far(result.labels, result.scores, FARS)
    assert result.tar == pytest.approx(expected_tar)


# ---------------------------------------------------------------- bad input


def _meta(root, suffix):
    return os.path.join(root, "meta", f"ijbb_{suffix}.txt")


def _replace_line(path, line_number, text):
    with open(path) as file:
        lines = file.readlines()
    lines[line_number - 1] = text + "\n"
    with open(path, "w") as file:
        file.writelines(lines)


@pytest.fixture
def small_folder(tmp_path, rng):
    """Four images, one per template, of two identities: six pairs, genuine and impostor."""
    return write_ijb_folder(
        tmp_path / "IJBB", rng, target="ijbb", num_identities=2, templates_per_identity=2, images_per_template=1
    )


def test_missing_meta_file(small_folder):
    os.remove(_meta(small_folder.root, "template_pair_label"))
    with pytest.raises(FileNotFoundError, match=r"meta file missing: .*ijbb_template_pair_label\.txt"):
        read_protocol(small_folder.root, "IJBB")
    with pytest.raises(FileNotFoundError, match=r"ijbc_face_tid_mid\.txt"):
        read_protocol(small_folder.root, "IJBC")


def test_landmark_row_with_wrong_number_of_values(small_folder):
    path = _meta(small_folder.root, "name_5pts_score")
    _replace_line(path, 2, "2.jpg 1 2 3 4 5 6 7 8 9 0.9")
    with pytest.raises(ValueError, match=r"ijbb_name_5pts_score\.txt:2: expected 12 values .*got 11"):
        read_protocol(small_folder.root, "IJBB")
    _replace_line(path, 2, "2.jpg 1 2 3 4 5 6 7 8 9 x 0.9")
    with pytest.raises(ValueError, match=r"ijbb_name_5pts_score\.txt:2: value 'x' is not a number"):
        read_protocol(small_folder.root, "IJBB")


def test_image_lists_must_agree(small_folder):
    _replace_line(_meta(small_folder.root, "face_tid_mid"), 2, "other.jpg 5 1")
    with pytest.raises(ValueError, match=r"image 2 is '2.jpg' but .*ijbb_face_tid_mid\.txt lists 'other.jpg'"):
        read_protocol(small_folder.root, "IJBB")
    _replace_line(_meta(small_folder.root, "face_tid_mid"), 2, "2.jpg five 1")
    with pytest.raises(ValueError, match=r"ijbb_face_tid_mid\.txt:2: template id 'five' is not an integer"):
        read_protocol(small_folder.root, "IJBB")


def test_bad_pair_lines(small_folder):
    path = _meta(small_folder.root, "template_pair_label")
    with open(path, "a") as file:
        file.write("5 6\n")
    appended = len(small_folder.pairs) + 1
    with pytest.raises(ValueError, match=rf"ijbb_template_pair_label\.txt:{appended}: expected 3 values"):
        read_protocol(small_folder.root, "IJBB")
    _replace_line(path, 2, "5 6 2")
    with pytest.raises(ValueError, match=r"ijbb_template_pair_label\.txt:2: label 2, expected 0 or 1"):
        read_protocol(small_folder.root, "IJBB")


def test_template_without_images(small_folder, rng):
    with open(_meta(small_folder.root, "template_pair_label"), "a") as file:
        file.write(f"{small_folder.template_ids[0]} 99999 0\n")
    appended = len(small_folder.pairs) + 1
    with pytest.raises(ValueError, match=rf"ijbb_template_pair_label\.txt:{appended}: template 99999 has no images"):
        evaluate_ijb(TinyFaceNet(rng), small_folder.root, "IJBB", num_workers=0, progress=False)


def test_undecodable_image(small_folder, rng):
    with open(os.path.join(small_folder.root, "loose_crop", "2.jpg"), "wb") as file:
        file.write(b"not a jpeg")
    expected = r"loose_crop/2\.jpg: cannot be decoded .*ijbb_name_5pts_score\.txt line 2"
    with pytest.raises(ValueError, match=expected):
        evaluate_ijb(TinyFaceNet(rng), small_folder.root, "IJBB", num_workers=0, progress=False)


@pytest.mark.parametrize(
    "column,text,message",
    [
        (1, "nan", "landmark x1 is nan"),
        (4, "-inf", "landmark y2 is -inf"),
        (9, "1e39", "landmark x5 is inf"),  # beyond float32
        (11, "nan", "faceness score is nan"),
        (11, "inf", "faceness score is inf"),
    ],
)
def test_landmarks_and_scores_must_be_finite(small_folder, column, text, message):
    """A NaN landmark failed later without naming the file; a NaN score failed inside scikit-learn."""
    path = _meta(small_folder.root, "name_5pts_score")
    with open(path) as file:
        fields = file.readlines()[2].split()
    fields[column] = text
    _replace_line(path, 3, " ".join(fields))
    with pytest.raises(ValueError, match=rf"ijbb_name_5pts_score\.txt:3: {message} \(as float32\), expected a finite"):
        read_protocol(small_folder.root, "IJBB")


@pytest.mark.parametrize("label,missing", [(1, "label 0 \\(impostor\\)"), (0, "label 1 \\(genuine\\)")])
def test_pairs_need_both_labels(small_folder, label, missing):
    """With one label the ROC is undefined (a numpy 'zero-size array' error came from tar_at_far)."""
    with open(_meta(small_folder.root, "template_pair_label"), "w") as file:
        file.writelines(f"{a} {b} {label}\n" for a, b, _ in small_folder.pairs)
    with pytest.raises(ValueError, match=rf"ijbb_template_pair_label\.txt: no pair has {missing}"):
        read_protocol(small_folder.root, "IJBB")


def test_empty_lists(small_folder):
    pair_file = _meta(small_folder.root, "template_pair_label")
    with open(pair_file, "w") as file:
        file.write("\n")
    with pytest.raises(ValueError, match=r"ijbb_template_pair_label\.txt: lists no pairs"):
        read_protocol(small_folder.root, "IJBB")
    for suffix in ("face_tid_mid", "name_5pts_score"):
        open(_meta(small_folder.root, suffix), "w").close()
    with pytest.raises(ValueError, match=r"ijbb_face_tid_mid\.txt and .*ijbb_name_5pts_score\.txt list no images"):
        read_protocol(small_folder.root, "IJBB")


@pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # inside insightface's norm_crop
def test_image_error_in_a_worker_is_the_original_message(small_folder, rng):
    """A DataLoader worker's ValueError came back as 'Caught ValueError in DataLoader worker process 0'
    followed by the worker's whole traceback."""
    os.remove(os.path.join(small_folder.root, "loose_crop", "3.jpg"))
    with pytest.raises(ValueError) as error:
        evaluate_ijb(TinyFaceNet(rng), small_folder.root, "IJBB", batch_size=2, num_workers=2, progress=False)
    message = str(error.value)
    assert "\n" not in message and "DataLoader" not in message, message
    assert re.fullmatch(r".*loose_crop/3\.jpg: no such image file \(.*ijbb_name_5pts_score\.txt line 3\)", message)
