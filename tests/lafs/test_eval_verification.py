"""lafs.eval.verification: safe .bin loading, the 10-fold protocol, the flip-test embedding."""

import datetime
import os
import pickle
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score
from sklearn.metrics.pairwise import paired_euclidean_distances
from sklearn.model_selection import KFold

from lafs.eval.verification import UnsafePickleError, embed_with_flip, evaluate, load_bin, verify_model

from helpers.eval_data import TinyFaceNet, encode_png, make_pairs, synthetic_pairs, write_bin
from tolerances import assert_close

# ---------------------------------------------------------------- load_bin


@pytest.mark.parametrize(
    "py2_style,array_bins,protocol,numpy_flags",
    [
        (False, False, 5, False),
        (False, True, 4, False),
        (False, True, 5, False),
        (True, False, 2, False),
        (True, True, 2, False),
        (False, False, 2, False),
        (False, False, 0, True),
        (False, True, 4, True),
    ],
)
def test_load_bin_reads_images_and_pairs(tmp_path, rng, py2_style, array_bins, protocol, numpy_flags):
    """Python 2 byte strings, Python 3 bytes at protocols 0-2 (through _codecs.encode), arrays, and
    issame as numpy booleans all load."""
    images, issame = synthetic_pairs(rng, 10)  # the fewest pairs the 10-fold protocol takes
    path = tmp_path / "set.bin"
    flags = np.array(issame, dtype=np.bool_) if numpy_flags else issame
    write_bin(path, images, flags, py2_style=py2_style, array_bins=array_bins, protocol=protocol)
    if py2_style:
        with pytest.raises(UnicodeDecodeError):
            pickle.loads(path.read_bytes())  # why old files need encoding='bytes'
    loaded, loaded_issame = load_bin(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (20, 112, 112, 3)
    np.testing.assert_array_equal(loaded, images)
    assert loaded_issame == issame


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_load_bin_refuses_a_pickle_that_runs_code(tmp_path, rng):
    images, issame = make_pairs(rng, 2)
    bins = [encode_png(image) for image in images]
    witness, marker = tmp_path / "plain_pickle_ran", tmp_path / "load_bin_ran"
    # the same payload does run code under plain pickle.load
    pickle.loads(pickle.dumps((bins, [True, _RunsCode(witness)])))
    assert witness.exists()
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps((bins, [issame[0], _RunsCode(marker)])))
    with pytest.raises(UnsafePickleError) as error:
        load_bin(path)
    assert not marker.exists()
    assert str(path) in str(error.value) and f"{os.system.__module__}.system" in str(error.value)


def test_load_bin_refuses_other_globals(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps(([datetime.date(2020, 1, 1)], [])))  # not what a .bin holds
    with pytest.raises(UnsafePickleError, match="datetime.date"):
        load_bin(path)


def test_load_bin_bad_content(tmp_path, rng):
    images, issame = make_pairs(rng, 10)
    path = tmp_path / "bad.bin"
    bins = [encode_png(image) for image in images]
    bins[3] = b"not an image"
    path.write_bytes(pickle.dumps((bins, issame)))
    with pytest.raises(ValueError, match=r"bad\.bin: image 3 .*could not be decoded"):
        load_bin(path)
    path.write_bytes(pickle.dumps((bins[:3], issame)))
    with pytest.raises(ValueError, match=r"bad\.bin: 3 images for 10 pairs"):
        load_bin(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"bad\.bin: not a readable"):
        load_bin(path)


@pytest.mark.parametrize("empty", [b"", np.zeros(0, np.uint8)], ids=["bytes", "array"])
def test_load_bin_empty_image_names_file_and_index(tmp_path, rng, empty):
    """An empty payload made OpenCV assert (cv2.error) instead of a ValueError naming the image."""
    images, issame = make_pairs(rng, 10)
    bins = [encode_png(image) for image in images]
    bins[5] = empty
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps((bins, issame)))
    with pytest.raises(ValueError, match=r"bad\.bin: image 5 is empty \(0 bytes\)"):
        load_bin(path)


@pytest.mark.parametrize("flag", ["False", "True", None, 2, -1, 0.0, 1.0, b"1", np.str_("0"), np.int64(3)])
def test_load_bin_refuses_issame_entries_that_are_not_booleans(tmp_path, rng, flag):
    """bool("False") is True and bool(None) is False: read as flags, such a list scored 100 %."""
    images, issame = make_pairs(rng, 10)
    bins = [encode_png(image) for image in images]
    labels = list(issame)
    labels[7] = flag
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps((bins, labels)))
    with pytest.raises(ValueError, match=rf"bad\.bin: issame\[7\] is {re.escape(repr(flag))}, expected a boolean"):
        load_bin(path)
    path.write_bytes(pickle.dumps((bins, ["False"] * 10)))  # the whole list
    with pytest.raises(ValueError, match=r"bad\.bin: issame\[0\] is 'False'"):
        load_bin(path)


def test_load_bin_takes_integer_flags(tmp_path, rng):
    images, issame = make_pairs(rng, 10)
    bins = [encode_png(image) for image in images]
    path = tmp_path / "set.bin"
    for flags in ([int(flag) for flag in issame], np.array(issame, dtype=np.int64), np.array(issame, dtype=np.uint8)):
        path.write_bytes(pickle.dumps((bins, flags)))
        loaded, loaded_issame = load_bin(path)
        assert loaded_issame == issame and all(type(flag) is bool for flag in loaded_issame)


def test_load_bin_bad_structure(tmp_path, rng):
    """Each of these ended in a TypeError / ZeroDivisionError / nrof_folds error naming no file."""
    images, issame = make_pairs(rng, 10)
    bins = [encode_png(image) for image in images]
    path = tmp_path / "bad.bin"
    cases = [
        ((bins, 5), r"bad\.bin: the pair labels \(issame\) is a int, expected a list"),
        ((bins, "TFTF"), r"bad\.bin: the pair labels \(issame\) is a str"),
        ((bins, np.zeros((10, 1), bool)), r"bad\.bin: the pair labels \(issame\) is a ndarray of shape \(10, 1\)"),
        ((None, issame), r"bad\.bin: the image list \(bins\) is a NoneType, expected a list"),
        (([], []), r"bad\.bin: 0 pairs; the 10-fold protocol needs at least 10"),
        ((bins[:8], issame[:4]), r"bad\.bin: 4 pairs; the 10-fold protocol needs at least 10"),
    ]
    for content, message in cases:
        path.write_bytes(pickle.dumps(content))
        with pytest.raises(ValueError, match=message):
            load_bin(path)


# ---------------------------------------------------------------- evaluate


def sklearn_protocol(embeddings: np.ndarray, issame: np.ndarray):
    """The protocol written directly with scikit-learn: returns (fold accuracies, chosen thresholds)."""
    distances = paired_euclidean_distances(embeddings[0::2], embeddings[1::2]) ** 2
    thresholds = np.arange(0, 4, 0.01)
    accuracies, chosen = [], []
    for train, test in KFold(n_splits=10, shuffle=False).split(distances):
        best_threshold, best_accuracy = None, -1.0
        for threshold in thresholds:
            accuracy = accuracy_score(issame[train], distances[train] < threshold)
            if accuracy > best_accuracy:
                best_threshold, best_accuracy = threshold, accuracy
        chosen.append(best_threshold)
        accuracies.append(accuracy_score(issame[test], distances[test] < best_threshold))
    return np.array(accuracies), np.array(chosen)


def test_evaluate_matches_sklearn(rng):
    num_pairs, dim = 203, 8  # not a multiple of 10: uneven folds
    issame = (torch.rand(num_pairs, generator=rng) < 0.5).numpy()
    first = torch.nn.functional.normalize(torch.randn(num_pairs, dim, generator=rng, dtype=torch.float64), dim=1)
    noise = torch.randn(num_pairs, dim, generator=rng, dtype=torch.float64) * torch.rand(num_pairs, 1, generator=rng)
    other = torch.randn(num_pairs, dim, generator=rng, dtype=torch.float64)
    second = torch.where(torch.from_numpy(issame)[:, None], first + noise, other)
    second = torch.nn.functional.normalize(second, dim=1)
    embeddings = torch.stack([first, second], dim=1).reshape(-1, dim).numpy()

    result = evaluate(embeddings, issame.tolist())
    expected_accuracies, expected_thresholds = sklearn_protocol(embeddings, issame)
    np.testing.assert_array_equal(result.best_thresholds, expected_thresholds)
    np.testing.assert_array_equal(result.accuracies, expected_accuracies)
    assert result.accuracy == pytest.approx(expected_accuracies.mean())
    assert result.std == pytest.approx(expected_accuracies.std())
    assert 0.6 < result.accuracy < 1.0  # the data separates the pairs partly: a non-trivial case


def test_evaluate_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[2N, D\] = \[40, D\] for 20 pairs"):
        evaluate(np.zeros((39, 4)), [True] * 20)
    with pytest.raises(ValueError, match="nrof_folds"):
        evaluate(np.zeros((10, 4)), [True] * 5)


# ---------------------------------------------------------------- embedding and the whole protocol


def test_embed_with_flip_matches_direct_computation(rng):
    model = TinyFaceNet(rng).train()
    images, _ = make_pairs(rng, 5)
    embeddings, xnorm = embed_with_flip(model, images, batch_size=3, device="cpu")
    assert model.training  # restored: training calls this
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 127.5 - 1.0
        model64 = TinyFaceNet(rng).double()
        model64.load_state_dict(model.state_dict())
        raw, raw_flip = model64(x), model64(x.flip(3))
        expected = torch.nn.functional.normalize(raw + raw_flip, dim=1)
        expected_xnorm = torch.cat([raw.norm(dim=1), raw_flip.norm(dim=1)]).mean().item()
    assert_close(torch.from_numpy(embeddings), expected.float())
    assert xnorm == pytest.approx(expected_xnorm, rel=1e-5)
    float_input = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    from_float, _ = embed_with_flip(model, float_input, batch_size=10)
    assert_close(torch.from_numpy(from_float), torch.from_numpy(embeddings))


def test_verify_model_on_a_bin(tmp_path, rng):
    images, issame = make_pairs(rng, 60)
    write_bin(tmp_path / "lfw.bin", images, issame)
    loaded, loaded_issame = load_bin(tmp_path / "lfw.bin")
    model = TinyFaceNet(rng)
    result = verify_model(model, loaded, loaded_issame, batch_size=32, device="cpu")
    embeddings, xnorm = embed_with_flip(model, loaded, batch_size=7)
    expected = evaluate(embeddings, loaded_issame)
    assert result["accuracy"] == pytest.approx(expected.accuracy)
    assert result["std"] == pytest.approx(expected.std)
    assert result["threshold"] == pytest.approx(expected.threshold)
    assert result["xnorm"] == pytest.approx(xnorm, rel=1e-5)
    assert result["num_pairs"] == 60
    assert result["accuracy"] > 0.9  # a noisy copy is nearer than an unrelated image


def test_verify_model_with_pair_index_equals_pair_ordered_images(rng):
    """Distinct images + pair_index give the result of the same pairs written out in .bin order."""
    images, _ = make_pairs(rng, 20)  # 40 images, used here as a pool
    generator = np.random.default_rng(int(torch.randint(0, 2**31, (), generator=rng)))
    pair_index = generator.integers(0, len(images), size=60)
    issame = generator.random(30) < 0.5
    model = TinyFaceNet(rng)
    indexed = verify_model(model, images, issame, batch_size=16, device="cpu", pair_index=pair_index)
    ordered = verify_model(model, images[pair_index], issame, batch_size=16, device="cpu")
    for key in ("accuracy", "std", "threshold"):
        assert indexed[key] == pytest.approx(ordered[key], abs=1e-6), key
    assert indexed["num_pairs"] == 30
    with pytest.raises(ValueError, match="pair_index has shape"):
        verify_model(model, images, issame, pair_index=pair_index[:-2])
    with pytest.raises(ValueError, match="outside"):
        verify_model(model, images, issame, pair_index=np.append(pair_index[:-1], len(images)))
