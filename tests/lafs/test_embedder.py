"""lafs.FaceEmbedder: every kind of model file, the flip protocol, channel orders, five-point alignment, errors."""

import warnings

import numpy as np
import pytest
import torch

import lafs
from lafs.deploy import FaceEmbedder, OnnxModel, load_face_model
from lafs.eval.align import align_face
from lafs.eval.embed import to_model_input
from lafs.export import export_onnx
from lafs.models import atomic_save, create_model, model_to_dict

from helpers.models import randomize_, synthetic_photos

pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # inside norm_crop


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One part_fvit_nano with random weights (landmarks that move) as a module, our checkpoint and an ONNX file.
    (Official state dicts: tests/lafs/test_export.py's part_fvit_b test.)"""
    folder = tmp_path_factory.mktemp("embedder")
    model = randomize_(create_model("part_fvit_nano"), head_std=0.5, seed=3)
    ours = folder / "nano.pt"
    atomic_save(model_to_dict(model), ours)
    onnx = export_onnx(model, folder / "nano.onnx").path
    return {"module": model, "ours": ours, "onnx": onnx}


@pytest.fixture(scope="module")
def faces():
    images, _ = synthetic_photos(3, seed=7)
    return np.stack(images)  # RGB uint8 [3, 112, 112, 3]


def flip_protocol(model, rgb_faces) -> np.ndarray:
    """normalise(model(x) + model(mirror x)), written out."""
    images = to_model_input(rgb_faces, "cpu")
    with torch.no_grad():
        both = model(images) + model(images.flip(3))
    return torch.nn.functional.normalize(both, dim=1).numpy()


def test_every_model_file_gives_the_flip_protocol_embeddings(files, faces):
    expected = flip_protocol(files["module"], faces)
    for kind in ("module", "ours", "onnx"):
        embedder = FaceEmbedder(files[kind], batch_size=2)  # batches of 2 and 1
        assert embedder.backend == ("onnxruntime" if kind == "onnx" else "torch")
        features = embedder.embed(faces)
        assert features.dtype == np.float32 and features.shape == (3, files["module"].embedding_dim)
        np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
        cos = (features * expected).sum(1)
        assert cos.min() >= 0.9999, (kind, cos)


def test_top_level_name_and_single_face(files, faces):
    assert lafs.FaceEmbedder is FaceEmbedder
    embedder = lafs.FaceEmbedder(files["onnx"])
    np.testing.assert_allclose(embedder.embed(faces[2]), embedder.embed(faces)[2:3], atol=1e-6)


def test_bgr_and_float_inputs_give_the_same_embeddings(files, faces):
    embedder = FaceEmbedder(files["module"])
    rgb = embedder.embed(faces)
    np.testing.assert_allclose(embedder.embed(np.ascontiguousarray(faces[..., ::-1]), color="bgr"), rgb, atol=1e-6)
    np.testing.assert_allclose(embedder.embed(torch.from_numpy(faces)), rgb, atol=1e-6)
    floats = to_model_input(faces, "cpu")
    np.testing.assert_allclose(embedder.embed(floats), rgb, atol=1e-6)
    np.testing.assert_allclose(embedder.embed(floats.flip(1), color="bgr"), rgb, atol=1e-6)
    assert not np.allclose(embedder.embed(np.ascontiguousarray(faces[..., ::-1])), rgb, atol=1e-3), (
        "swapping the channels must change the embedding, or the colour test above proves nothing"
    )


def test_embed_images_aligns_by_five_points(files):
    images, points = synthetic_photos(3, seed=11)
    shifted = [np.roll(image, (9, -6), axis=(0, 1)) for image in images]  # the face moved inside the photo
    moved_points = points + np.array([-6, 9], np.float32)
    embedder = FaceEmbedder(files["onnx"])
    aligned = np.stack([align_face(image, p) for image, p in zip(shifted, moved_points)])
    np.testing.assert_allclose(embedder.embed_images(shifted, moved_points), embedder.embed(aligned), atol=1e-6)
    np.testing.assert_allclose(
        embedder.embed_images(shifted[0], moved_points[0]), embedder.embed(aligned[:1]), atol=1e-6
    )


def test_empty_batch_and_bad_input(files, faces):
    embedder = FaceEmbedder(files["onnx"])
    assert embedder.embed(faces[:0]).shape == (0, files["module"].embedding_dim)
    with pytest.raises(ValueError, match="color"):
        embedder.embed(faces, color="hsv")
    with pytest.raises(ValueError, match=r"\[N, 112, 112, 3\]"):
        embedder.embed(faces[0, 0])
    with pytest.raises(ValueError, match=r"shape \(2, 3, 64, 64\): faces must be aligned 112x112 crops"):
        embedder.embed(np.zeros((2, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="five_points"):
        embedder.embed_images([faces[0], faces[1]], np.zeros((1, 5, 2)))
    with pytest.raises(ValueError, match="batch_size"):
        FaceEmbedder(files["onnx"], batch_size=0)


def test_files_that_are_not_face_models_are_refused(tmp_path, files):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        load_face_model(garbage)
    with pytest.raises(FileNotFoundError, match="no such ONNX model file"):
        load_face_model(tmp_path / "missing.onnx")
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
    )
    wrong = tmp_path / "wrong_shape.onnx"
    # The IR version the opset needs, not onnx's newest: onnxruntime 1.30 (beside onnx 1.23.1) reads up to IR 13.
    opsets = [helper.make_opsetid("", 17)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    onnx.save(model, str(wrong))
    with pytest.raises(ValueError, match=r"one input \[batch, 3, S, S\]"):
        OnnxModel(wrong)


def scaled(rgb_faces) -> np.ndarray:
    """uint8 [N, 112, 112, 3] -> float32 [N, 3, 112, 112] in [-1, 1], the documented float input."""
    return (rgb_faces.transpose(0, 3, 1, 2).astype(np.float32) - 127.5) / 127.5


def test_float_faces_must_be_scaled_to_minus_one_one(files, faces):
    embedder = FaceEmbedder(files["module"])
    with pytest.raises(ValueError, match=r"range from 0 to 255.*\(x - 127\.5\) / 127\.5"):
        embedder.embed(faces.transpose(0, 3, 1, 2).astype(np.float32))
    with pytest.raises(ValueError, match=r"range from -1\.5 to"):
        embedder.embed(scaled(faces) * 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real faces in [-1, 1] (and rounding just past it) warn about nothing
        expected = embedder.embed(faces)
        np.testing.assert_allclose(embedder.embed(scaled(faces)), expected, atol=1e-6)
        embedder.embed(np.clip(scaled(faces) * 1.0005, -1.0005, 1.0005))
    # 0..1 images lie inside [-1, 1]: only a warning (a very bright face has no negative value either)
    with pytest.warns(UserWarning, match=r"no negative value.*0\.\.1 images"):
        embedder.embed(faces.transpose(0, 3, 1, 2).astype(np.float32) / 255)


def test_three_dimensional_input_is_one_colour_face_or_refused(files, faces):
    embedder = FaceEmbedder(files["module"])
    expected = embedder.embed(faces)
    gray = faces[..., 0]  # three grayscale faces [3, 112, 112], not one channels-first face
    with pytest.raises(ValueError, match=r"could be 3 grayscale faces.*convert grayscale faces to 3 channels"):
        embedder.embed(gray)
    for array in (gray[:2], gray[:1], gray[0], faces[..., :1]):
        with pytest.raises(ValueError, match="grayscale faces\\? convert them to 3 channels"):
            embedder.embed(array)
    # the documented single faces still work: uint8 [112, 112, 3] and float [3, 112, 112]
    np.testing.assert_allclose(embedder.embed(faces[1]), expected[1:2], atol=1e-6)
    np.testing.assert_allclose(embedder.embed(scaled(faces)[1]), expected[1:2], atol=1e-6)
    # and a channels-first uint8 face, as a batch of one
    np.testing.assert_allclose(embedder.embed(faces[1:2].transpose(0, 3, 1, 2)), expected[1:2], atol=1e-6)


@pytest.mark.parametrize("kind", ["module", "onnx"])
def test_non_finite_faces_are_refused_with_their_index(files, faces, kind):
    images = scaled(faces)
    images[1, 0, 50, 50] = np.nan
    images[2, :, 60, 60] = np.inf
    embedder = FaceEmbedder(files[kind], batch_size=2)
    with pytest.raises(ValueError, match=r"faces 1, 2 \(of 3\) hold NaN or Inf"):
        embedder.embed(images)
    with pytest.raises(ValueError, match=r"face 0 \(of 1\) holds NaN or Inf"):
        embedder.embed(np.full((3, 112, 112), np.nan, np.float32))
    # the evaluation's shared entry refuses them too
    with pytest.raises(ValueError, match=r"images \[1, 2\] of this batch of 3 hold NaN or Inf"):
        to_model_input(images, "cpu")


def test_errors_name_the_callers_array_and_its_dtype(files, faces):
    embedder = FaceEmbedder(files["module"], batch_size=3)
    four = np.concatenate([faces, faces[:1]])
    with pytest.raises(ValueError, match=r"got float32 with shape \(4, 112, 112, 3\): float faces are channels-first"):
        embedder.embed(four.astype(np.float32))
    with pytest.raises(ValueError, match=r"dtype int64 with shape \(4, 112, 112, 3\).*astype\(np\.uint8\)"):
        embedder.embed(four.astype(np.int64))
    with pytest.raises(ValueError, match=r"dtype bool with shape \(4, 112, 112, 3\)"):
        embedder.embed(four > 128)
    with pytest.raises(ValueError, match=r"dtype torch\.int64"):
        to_model_input(torch.from_numpy(four.astype(np.int64)), "cpu")
    with pytest.raises(ValueError, match=r"shape \(4, 112, 112, 4\): 4 channels"):
        embedder.embed(np.concatenate([four, four[..., :1]], axis=-1))
    with pytest.raises(ValueError, match="list of arrays of one shape"):
        embedder.embed([faces[0], faces[1][:100]])
    with pytest.raises(ValueError, match=r"image 0 is uint8 with shape \(112, 112\) \(grayscale"):
        embedder.embed_images(faces[0, ..., 0], np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"images must be uint8 \[H, W, 3\]; image 1 is float32"):
        embedder.embed_images([faces[0], faces[1].astype(np.float32)], np.zeros((2, 5, 2)))
    # an empty list is an empty batch, as an empty array is
    assert embedder.embed([]).shape == embedder.embed(faces[:0]).shape == (0, files["module"].embedding_dim)
    assert embedder.embed(torch.from_numpy(faces[:0])).shape == (0, files["module"].embedding_dim)
    assert embedder.embed(list(faces)).shape == (3, files["module"].embedding_dim)


def test_a_model_object_keeps_its_device():
    """Faces go to the device of a model passed as an object (a CUDA model with the default device would
    otherwise get CPU faces); a device that disagrees with the model's is refused."""
    model = create_model("part_fvit_nano").eval()
    assert FaceEmbedder(model).device == torch.device("cpu")
    meta = create_model("part_fvit_nano").to("meta")
    assert FaceEmbedder(meta).device == torch.device("meta")
    with pytest.raises(ValueError, match="the model is on cpu, device='meta'"):
        FaceEmbedder(model, device="meta")
