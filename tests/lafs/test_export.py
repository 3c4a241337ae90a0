"""lafs.export: the gather's export form, ONNX files that insightface's model zoo runs, torch.export.

Faces: the sample photos inside the insightface package, aligned with norm_crop from
five points marked by hand (tests/data/insightface_sample_faces.json), and synthetic
faces aligned from the five points SyntheticFaces renders.
"""

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from lafs.deploy import FaceEmbedder, OnnxModel
from lafs.eval.align import align_face
from lafs.eval.embed import to_model_input
from lafs.export import ExportCheckError, PartFViTExportForm, export_form_gather, export_onnx, export_program
from lafs.export.__main__ import main as export_main
from lafs.export.to_onnx import _keep_insightface_normalisation
from lafs.models import PartFViT, atomic_save, create_model, load_model, model_to_dict
from lafs_kernels import landmark_patch_gather

from helpers.models import official_state_of, randomize_, synthetic_photos
from tolerances import assert_close

FACES_FILE = Path(__file__).parents[1] / "data" / "insightface_sample_faces.json"
MIN_COSINE = 0.9999  # per face, the bar for float32 files
# The export form normalises the grid to [-1, 1] and grid_sample maps it back: float32 rounding moves a sample
# by up to ~1e-5 px, times an image gradient of up to 2 per px for noise in [-1, 1] (max seen: 1.27e-5 over
# 200 seeds of 4 x 196 patches).
GATHER_SCALE = 3

pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")  # inside norm_crop


# ---------------------------------------------------------------- faces and models


def insightface_faces() -> tuple[list[str], np.ndarray]:
    """(names, aligned BGR uint8 [N, 112, 112, 3]) of the hand-marked faces in insightface's sample images."""
    import insightface

    root = Path(insightface.__file__).parent / "data" / "images"
    spec = json.loads(FACES_FILE.read_text())["faces"]
    crops = []
    for face in spec:
        image = cv2.imread(str(root / face["image"]))
        assert image is not None, f"insightface no longer ships {face['image']}"
        crops.append(align_face(image, np.array(face["points"], np.float32)))
    return [face["name"] for face in spec], np.stack(crops)


def synthetic_faces_bgr(count: int, seed: int = 0) -> np.ndarray:
    images, points = synthetic_photos(count, seed)
    return np.stack([align_face(image, p)[:, :, ::-1] for image, p in zip(images, points)])


def all_faces_bgr(synthetic: int = 4) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([insightface_faces()[1], synthetic_faces_bgr(synthetic)]))


def landmark_spread(model: PartFViT, faces_bgr: np.ndarray) -> float:
    """Mean distance (px) of the faces' landmarks from their average: > 0 means the gather sees moving centres."""
    with torch.no_grad():
        landmarks = model.landmark_cnn(to_model_input(np.ascontiguousarray(faces_bgr[..., ::-1]), "cpu"))
    return float((landmarks - landmarks.mean(0)).norm(dim=-1).mean())


def torch_embeddings(model: nn.Module, faces_bgr: np.ndarray) -> torch.Tensor:
    """The PyTorch model's raw embeddings (no flip) of aligned BGR faces: [N, D]."""
    with torch.no_grad():
        return model(to_model_input(np.ascontiguousarray(faces_bgr[..., ::-1]), "cpu")).float()


def cosines(a, b) -> torch.Tensor:
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def get_insightface_model(path):
    import insightface

    return insightface.model_zoo.get_model(str(path))


def check_against_insightface_and_embedder(
    model: PartFViT, onnx_path, faces_bgr: np.ndarray, min_cosine: float = MIN_COSINE, torch_source=None
) -> None:
    """The file in insightface (get_feat) and FaceEmbedder's two backends give the model's embeddings, face by face.

    torch_source: what FaceEmbedder's PyTorch backend loads (default: ``model`` itself)."""
    zoo_model = get_insightface_model(onnx_path)
    assert type(zoo_model).__name__ == "ArcFaceONNX"
    assert (zoo_model.input_mean, zoo_model.input_std, zoo_model.input_size) == (127.5, 127.5, (112, 112))
    insightface_features = zoo_model.get_feat(list(faces_bgr))
    expected = torch_embeddings(model, faces_bgr)
    assert insightface_features.shape == tuple(expected.shape)
    per_face = cosines(insightface_features, expected)
    assert per_face.min() >= min_cosine, f"insightface get_feat vs PyTorch, per-face cosine {per_face.tolist()}"

    onnx_features = FaceEmbedder(onnx_path).embed(faces_bgr, color="bgr")
    torch_embedder = FaceEmbedder(model if torch_source is None else torch_source)
    assert torch_embedder.backend == "torch"
    torch_features = torch_embedder.embed(faces_bgr, color="bgr")
    per_face = cosines(onnx_features, torch_features)
    assert per_face.min() >= min_cosine, f"FaceEmbedder onnxruntime vs torch, per-face cosine {per_face.tolist()}"
    np.testing.assert_allclose(np.linalg.norm(onnx_features, axis=1), 1.0, rtol=1e-5)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A part_fvit_nano run folder after 8 supervised steps of the tiny recipe (lafs.train's own output)."""
    from lafs.train.runner import run_command

    out = tmp_path_factory.mktemp("export") / "nano_run"
    run_command("supervised", recipe="tiny", overrides=["model.overrides={}", "val.bins=[]"], out=out)
    return out


@pytest.fixture(scope="module")
def moving_nano():
    """part_fvit_nano with random weights whose landmarks move from face to face."""
    return randomize_(create_model("part_fvit_nano"), head_std=0.5)


# ---------------------------------------------------------------- the gather's export form


def test_export_form_gather_equals_the_op(rng):
    """One grid_sample on a [B, L*P, P, 2] grid equals our op in eval mode, token layout included."""
    for patch_size in (8, 5, 1):
        images = torch.rand(3, 3, 112, 112, generator=rng) * 2 - 1
        # inside, on and beyond the borders (zero padding), fractional positions
        landmarks = torch.rand(3, 40, 2, generator=rng) * 130 - 9
        landmarks[:, :4] = torch.tensor([[0.0, 0.0], [111.0, 111.0], [0.0, 111.0], [55.5, 0.25]])
        ours = landmark_patch_gather(images, landmarks, patch_size)
        export_form = export_form_gather(images, landmarks, patch_size)
        assert export_form.shape == ours.shape == (3, 40, patch_size * patch_size * 3)
        assert_close(export_form, ours, scale=GATHER_SCALE)
        # the op's feature f = (i*P + j)*C + c, i the x offset: moving one landmark right by a whole pixel
        # shifts its patch by one i step
        shifted = landmark_patch_gather(images, landmarks + torch.tensor([1.0, 0.0]), patch_size)
        if patch_size > 1:
            step = patch_size * 3
            assert_close(export_form[..., step:], shifted[..., :-step], scale=GATHER_SCALE)


def test_export_form_gather_in_onnxruntime_equals_the_op(tmp_path, rng):
    """The same comparison through ONNX GridSample as onnxruntime runs it; prints the measured error."""
    import onnxruntime

    class Gather(nn.Module):
        def forward(self, images, landmarks):
            return export_form_gather(images, landmarks, 8)

    images = torch.rand(2, 3, 112, 112, generator=rng) * 2 - 1
    landmarks = torch.rand(2, 196, 2, generator=rng) * 120 - 4
    path = tmp_path / "gather.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Gather(),
            (images, landmarks),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["images", "landmarks"],
            output_names=["tokens"],
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens = torch.from_numpy(session.run(None, {"images": images.numpy(), "landmarks": landmarks.numpy()})[0])
    ours = landmark_patch_gather(images, landmarks, 8)
    print(
        f"export-form gather (onnxruntime GridSample) vs landmark_patch_gather: max abs error "
        f"{(tokens - ours).abs().max().item():.2e}"
    )
    assert_close(tokens, ours, scale=GATHER_SCALE)


def test_export_form_model_equals_the_model_and_leaves_it_unchanged(moving_nano, rng):
    images = torch.rand(2, 3, 112, 112, generator=rng) * 2 - 1
    weights = {k: v.clone() for k, v in moving_nano.state_dict().items()}
    form = PartFViTExportForm(moving_nano)
    half = PartFViTExportForm(moving_nano, half=True)
    with torch.no_grad():
        expected = moving_nano(images)
        assert_close(form(images), expected, scale=10)  # the gather's grid rounding, through the transformer
        half_embeddings = half(images)  # float16 on the CPU is slow in eager PyTorch: two images
        assert half_embeddings.dtype == torch.float32 and cosines(half_embeddings, expected).min() >= 0.999
    for key, value in moving_nano.state_dict().items():  # the half copy did not convert the caller's model
        assert value.dtype == weights[key].dtype and torch.equal(value, weights[key]), key


# ---------------------------------------------------------------- ONNX files in insightface and FaceEmbedder


def test_trained_run_exports_from_the_command_line_and_runs_in_insightface(trained_run, tmp_path, capsys):
    out = tmp_path / "nano.onnx"
    assert export_main([str(trained_run), str(out)]) == 0
    assert "per-face cosine" in capsys.readouterr().out
    model = load_model(trained_run)
    check_against_insightface_and_embedder(model, out, all_faces_bgr())


def test_model_with_moving_landmarks_runs_in_insightface(moving_nano, tmp_path):
    faces = all_faces_bgr()
    assert landmark_spread(moving_nano, faces) > 1.0, "the landmarks must differ between faces for this test"
    result = export_onnx(moving_nano, tmp_path / "nano.onnx")
    assert result.min_cosine >= MIN_COSINE and result.precision == "float32"
    check_against_insightface_and_embedder(moving_nano, result.path, faces)
    # dynamic batch: one face, then many
    session = OnnxModel(result.path)
    images = to_model_input(np.ascontiguousarray(faces[..., ::-1]), "cpu")
    for batch in (images[:1], images.repeat(3, 1, 1, 1)):
        assert_close(session(batch), torch_embeddings(moving_nano, faces).repeat(3, 1)[: len(batch)], scale=10)
    # an empty batch too: the graph's reshapes keep the batch as their only free size
    import onnxruntime

    raw = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    empty = raw.run(None, {raw.get_inputs()[0].name: np.zeros((0, 3, 112, 112), np.float32)})[0]
    assert empty.shape == (0, moving_nano.embedding_dim)
    # without spin-waiting (as the embedding benchmark runs it) the same numbers
    quiet = OnnxModel(result.path, spin=False)
    assert quiet.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert_close(quiet(images[:2]), session(images[:2]), scale=1)


def test_float16_file_runs_in_insightface(moving_nano, tmp_path):
    result = export_onnx(moving_nano, tmp_path / "nano_fp16.onnx", half=True)
    assert result.precision == "float16" and result.min_cosine >= 0.999
    import onnx

    proto = onnx.load(str(result.path))
    initializer_types = {init.data_type for init in proto.graph.initializer if len(init.dims) >= 2}
    assert onnx.TensorProto.FLOAT16 in initializer_types  # the weights really are float16
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # the interface is not
    check_against_insightface_and_embedder(moving_nano, result.path, all_faces_bgr(), min_cosine=0.999)


@pytest.mark.slow
def test_official_architecture_exports_from_an_official_state_dict(tmp_path):
    """part_fvit_b (the released weights' architecture) with random weights, saved with the official key names."""
    model = randomize_(create_model("part_fvit_b"), head_std=0.2)
    path = tmp_path / "part_fvit_b_official.pt"
    torch.save({"state_dict": official_state_of(model)}, path)
    loaded = load_model(path)
    faces = all_faces_bgr(synthetic=1)[[3, -1]]  # Ross and a synthetic face: a big model on 2 CPU cores
    assert landmark_spread(loaded, faces) > 1.0
    result = export_onnx(path, tmp_path / "part_fvit_b.onnx", check=False)  # checked here, face by face
    check_against_insightface_and_embedder(loaded, result.path, faces, torch_source=path)


def test_insightface_keeps_mean_and_std_when_early_nodes_are_named_sub_and_mul(tmp_path):
    """insightface reads a Sub and a Mul among the first 8 nodes as normalisation inside the graph (mean 0,
    std 1 outside); the exporter renames such nodes."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Sub", ["input", "c"], ["a"], name="Sub_0"),
        helper.make_node("Mul", ["a", "c"], ["b"], name="Mul_1"),
        helper.make_node("ReduceMean", ["b", "axes"], ["embedding"], name="ReduceMean_2", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3])],
        [
            helper.make_tensor("c", TensorProto.FLOAT, [], [0.5]),
            helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
        ],
    )
    # The IR version the opset needs, not onnx's newest: onnxruntime 1.30 (beside onnx 1.23.1) reads up to IR 13.
    opsets = [helper.make_opsetid("", 18)]
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    before, after = tmp_path / "before.onnx", tmp_path / "after.onnx"
    onnx.save(proto, str(before))
    assert get_insightface_model(before).input_mean == 0.0
    _keep_insightface_normalisation(proto)
    onnx.save(proto, str(after))
    assert get_insightface_model(after).input_mean == 127.5


def test_export_check_catches_a_file_that_differs(moving_nano, tmp_path, monkeypatch):
    """The export check can fail: a form that skips the landmark CNN's output does not pass it."""
    import lafs.export.to_onnx as to_onnx

    class Broken(PartFViTExportForm):
        def forward(self, images):
            return super().forward(images.flip(3))

    monkeypatch.setattr(to_onnx, "PartFViTExportForm", Broken)
    with pytest.raises(ExportCheckError, match="per-face cosine"):
        export_onnx(moving_nano, tmp_path / "broken.onnx")
    assert not (tmp_path / "broken.onnx").exists()


def test_export_check_names_a_model_that_is_itself_broken(tmp_path):
    model = create_model("part_fvit_nano").eval()
    with torch.no_grad():
        model.transformer.mlp_head[0].weight.fill_(float("nan"))
    with pytest.raises(ExportCheckError, match="the PyTorch model itself gives non-finite embeddings"):
        export_onnx(model, tmp_path / "nan.onnx")
    assert not (tmp_path / "nan.onnx").exists()


def test_export_command_reports_mistakes_in_one_line(tmp_path, trained_run, capsys):
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("not a checkpoint")
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "a.onnx")], "no such checkpoint file or run folder"),
        ([str(not_a_model), str(tmp_path / "a.onnx")], "cannot read"),
        ([str(trained_run), str(tmp_path / "a.txt")], "name it .onnx"),
        ([str(trained_run), str(tmp_path / "a.onnx"), "--opset", "15"], "GridSample needs opset 16 or later"),
        ([str(trained_run), str(tmp_path / "a.onnx"), "--opset", "30"], "writes up to 20"),
        ([str(trained_run), str(tmp_path / "a.onnx"), "--device", "xyz"], "--device 'xyz'"),
        ([str(trained_run), str(tmp_path / "no" / "a.pt2")], "no folder"),
        ([str(trained_run), str(tmp_path / "dir.pt2")], "it is a folder"),
    ]
    (tmp_path / "dir.pt2").mkdir()
    for argv, message in cases:
        assert export_main(argv) == 1
        error = capsys.readouterr().err
        assert error.startswith("lafs.export: ") and message in error and error.count("\n") == 1, error
    assert not (tmp_path / "a.onnx").exists()


# ---------------------------------------------------------------- torch.export


def test_torch_export_with_the_fused_gather_equals_eager(moving_nano, tmp_path, rng):
    moving_nano.train()  # the program is the eval-mode model (Dropout off) and the caller's flag comes back
    program = export_program(moving_nano)
    assert moving_nano.training
    moving_nano.eval()
    gathers = [n for n in program.graph.nodes if "landmark_patch_gather" in str(n.target)]
    assert len(gathers) == 1  # the custom op stays one node (traced through its fake kernel)
    path = tmp_path / "nano.pt2"
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    for batch in (1, 5):
        images = torch.rand(batch, 3, 112, 112, generator=rng) * 2 - 1
        with torch.no_grad():
            expected = moving_nano(images)
            assert_close(program.module()(images), expected)
            assert_close(loaded(images), expected)


def test_export_command_writes_a_torch_export_program(trained_run, tmp_path, rng):
    out = tmp_path / "nano.pt2"
    assert export_main([str(trained_run), str(out)]) == 0
    images = torch.rand(3, 3, 112, 112, generator=rng) * 2 - 1
    with torch.no_grad():
        assert_close(torch.export.load(str(out)).module()(images), load_model(trained_run)(images))


def test_checkpoint_file_of_ours_exports(moving_nano, tmp_path):
    path = tmp_path / "nano.pt"
    atomic_save(model_to_dict(moving_nano), path)
    result = export_onnx(path, tmp_path / "from_file.onnx")
    assert result.min_cosine >= MIN_COSINE


def test_spatial_readout_model_exports_and_runs_in_insightface(tmp_path):
    """The landmark_readout_grid option (adaptive pooling to 2 x 2 cells) survives export."""
    model = randomize_(create_model("part_fvit_nano", landmark_readout_grid=2), head_std=0.5)
    faces = all_faces_bgr()
    assert landmark_spread(model, faces) > 1.0, "the landmarks must differ between faces for this test"
    result = export_onnx(model, tmp_path / "spatial.onnx")
    assert result.min_cosine >= MIN_COSINE
    check_against_insightface_and_embedder(model, result.path, faces)
