"""lafs.FaceEmbedder: every kind of model file, the flip protocol, channel orders, five-point alignment, errors."""

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
    with pytest.raises(ValueError, match=r"expected images \[B,3,112,112\]"):
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
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(wrong))
    with pytest.raises(ValueError, match=r"one input \[batch, 3, S, S\]"):
        OnnxModel(wrong)
