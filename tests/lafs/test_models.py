"""lafs.models: shapes, the original's numerics, official state dicts, our checkpoint format."""

import json
import math
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lafs.models import (
    IncompatibleCheckpointError,
    LandmarkCNN,
    PartTransformer,
    atomic_save,
    create_landmark_cnn,
    create_model,
    create_transformer,
    load_model,
    load_official_state_dict,
    model_from_dict,
    model_to_dict,
)
from lafs.models import transformer as transformer_module
from lafs.models.official import infer_official_config
from lafs.models.safe_load import load_checkpoint
from lafs.models.transformer import ATTENTION_FORMS, EXPLICIT_MAX_KEYS

from conftest import RUN_SALT
from helpers.models import official_key, official_state_of, randomize_
from helpers.skips import CPU_KERNELS_MISSING, CPU_KERNELS_SKIP_REASON
from tolerances import assert_close

SHAPES = json.loads((Path(__file__).parents[1] / "data" / "lafs_official_state_dict_shapes.json").read_text())
PART_FVIT_B = SHAPES["part_fvit_b_webface"]
LANDMARK_NET = SHAPES["landmark_cnn_for_lafs"]


def images(rng, batch, size=112):
    return torch.rand(batch, 3, size, size, generator=rng) * 2 - 1


def random_state(shapes: dict, rng) -> dict:
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(0, 1000, shape, generator=rng)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=rng) + 0.5
        else:
            state[key] = torch.randn(shape, generator=rng) * 0.05
    return state


def shapes_b(depth: int) -> dict:
    """The official Part fViT-B shapes with only the first ``depth`` transformer blocks."""
    return {
        k: s for k, s in PART_FVIT_B.items() if not k.startswith("transformer.layers.") or int(k.split(".")[2]) < depth
    }


def tensor_sums(tensors) -> list:
    return sorted((tuple(t.shape), float(t.sum())) for t in tensors)


@pytest.fixture(scope="module")
def model_b():
    return create_model("part_fvit_b")


@pytest.fixture(scope="module")
def official_b():
    return random_state(PART_FVIT_B, torch.Generator().manual_seed(RUN_SALT))


# ---------------------------------------------------------------- architecture


def test_part_fvit_b_matches_the_official_key_layout_and_parameter_count(model_b):
    ours = {official_key(k): tuple(v.shape) for k, v in model_b.state_dict().items()}
    official = {k: tuple(s) for k, s in PART_FVIT_B.items() if k != "loss.weight"}
    assert ours == official
    numel = sum(v.numel() for v in model_b.state_dict().values())
    assert numel == sum(math.prod(s) for s in official.values())


@pytest.mark.parametrize("name, dim, num_landmarks", [("part_fvit_tiny", 96, 196), ("part_fvit_nano", 64, 49)])
def test_small_presets_shapes_and_landmark_range(name, dim, num_landmarks, rng):
    model = create_model(name).eval()
    embeddings, landmarks = model.forward_with_landmarks(images(rng, 3))
    assert embeddings.shape == (3, dim)
    assert landmarks.shape == (3, num_landmarks, 2)
    assert landmarks.min() >= 0 and landmarks.max() <= 111
    flat = landmarks.flatten(1)
    assert_close(flat.amin(1), torch.zeros(3))
    assert_close(flat.amax(1), torch.full((3,), 111.0))


def test_landmarks_are_the_min_max_scaled_head_outputs_read_as_xy_pairs(rng):
    cnn = create_landmark_cnn("part_fvit_nano").eval()
    x = images(rng, 2)
    raw = cnn.raw_outputs(x)
    expected = torch.empty(2, 49, 2)
    for b in range(2):
        lo, hi = raw[b].min(), raw[b].max()
        for n in range(49):
            expected[b, n, 0] = (raw[b, 2 * n] - lo) / (hi - lo) * 111
            expected[b, n, 1] = (raw[b, 2 * n + 1] - lo) / (hi - lo) * 111
    assert_close(cnn(x), expected, scale=10)


def test_readout_grid_head_reads_the_quadrant_means_channel_major(rng):
    """landmark_readout_grid=2: the head is one linear map of the four quadrant means of the trunk's last
    features (a 4 x 4 map at 112 px), flattened channel by channel, computed here by slicing."""
    cnn = create_landmark_cnn("part_fvit_nano", landmark_readout_grid=2).eval()
    head = cnn.output_layer[1]
    with torch.no_grad():
        head.weight.normal_(0.0, 0.05, generator=rng)
    x = images(rng, 2)
    features = cnn.features(x)
    assert features.shape[2:] == (4, 4)
    quadrants = [features[:, :, i : i + 2, j : j + 2].mean(dim=(2, 3)) for i in (0, 2) for j in (0, 2)]
    cells = torch.stack(quadrants, dim=2).flatten(1)  # [B, C * 4], index c * 4 + cell
    assert head.in_features == features.shape[1] * 4
    assert_close(cnn.raw_outputs(x), cells @ head.weight.T + head.bias, scale=10)


def test_readout_grid_starts_as_the_same_fixed_grid_and_round_trips(tmp_path, rng):
    plain = create_model("part_fvit_nano").train()
    spatial = create_model("part_fvit_nano", landmark_readout_grid=2).train()
    x = images(rng, 3)
    assert torch.equal(spatial.landmark_cnn(x), plain.landmark_cnn(x))
    assert spatial.arch_config()["landmark_readout_grid"] == 2 and plain.arch_config()["landmark_readout_grid"] == 1
    randomize_(spatial, head_std=0.5)
    spatial.eval()
    atomic_save(model_to_dict(spatial), tmp_path / "spatial.pt")
    loaded = load_model(tmp_path / "spatial.pt")
    assert loaded.landmark_cnn.readout_grid == 2 and torch.equal(loaded(x), spatial(x))
    with pytest.raises(ValueError, match="readout_grid"):
        create_landmark_cnn("part_fvit_nano", landmark_readout_grid=0)


def test_a_readout_grid_model_does_not_load_into_the_original_head(tmp_path):
    from lafs.train.weights import ArchitectureMismatchError, load_landmark_cnn

    atomic_save(model_to_dict(create_model("part_fvit_nano", landmark_readout_grid=2)), tmp_path / "spatial.pt")
    with pytest.raises(ArchitectureMismatchError, match="readout_grid"):
        load_landmark_cnn(create_landmark_cnn("part_fvit_nano"), str(tmp_path / "spatial.pt"))


def test_landmark_cnn_default_is_the_official_trunk():
    cnn = LandmarkCNN()
    keys = {"stn." + k if k.startswith("features.") else k: tuple(v.shape) for k, v in cnn.state_dict().items()}
    official = {k: tuple(s) for k, s in PART_FVIT_B.items() if k.startswith(("stn.", "output_layer."))}
    assert keys == official


def test_attention_scales_scores_by_model_width_not_head_width(rng):
    dim, heads, dim_head = 48, 3, 8
    transformer = PartTransformer(
        num_landmarks=5, patch_size=2, dim=dim, depth=1, heads=heads, dim_head=dim_head, mlp_dim=32
    ).double()
    attention = transformer.layers[0][0].fn.fn
    with torch.no_grad():  # scores large enough that the scale matters
        attention.to_qkv.weight.normal_(std=0.3, generator=rng)
    x = torch.randn(2, 6, dim, generator=rng, dtype=torch.float64)

    q, k, v = attention.to_qkv(x).chunk(3, dim=-1)
    split = lambda t: t.view(2, 6, heads, dim_head).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)

    def direct(scale):
        weights = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
        return attention.to_out((weights @ v).transpose(1, 2).reshape(2, 6, heads * dim_head))

    out = attention(x)
    assert_close(out, direct(dim**-0.5))
    assert (out - direct(dim_head**-0.5)).abs().max() > 0.1 * out.abs().max()


def direct_transformer(t: PartTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The original ViT forward written out: tokens [B, K, P*P*3] -> cls through LayerNorm [B, dim]."""
    b, k, _ = tokens.shape
    d, h, dh = t.dim, t.heads, t.dim_head
    x = torch.cat([t.cls_token.expand(b, 1, d), tokens @ t.patch_to_embedding.weight.T + t.patch_to_embedding.bias], 1)
    x = x + t.pos_embedding[:, : k + 1]
    for attn_block, ff_block in t.layers:
        norm, attn = attn_block.fn.norm, attn_block.fn.fn
        y = F.layer_norm(x, (d,), norm.weight, norm.bias)
        q, kk, v = (z.view(b, k + 1, h, dh).transpose(1, 2) for z in (y @ attn.to_qkv.weight.T).chunk(3, -1))
        a = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(d), -1) @ v
        x = x + a.transpose(1, 2).reshape(b, k + 1, h * dh) @ attn.to_out[0].weight.T + attn.to_out[0].bias
        norm, net = ff_block.fn.norm, ff_block.fn.fn.net
        y = F.layer_norm(x, (d,), norm.weight, norm.bias)
        x = x + F.gelu(y @ net[0].weight.T + net[0].bias) @ net[3].weight.T + net[3].bias
    head = t.mlp_head[0]
    return F.layer_norm(x[:, 0], (d,), head.weight, head.bias)


def original_gather(x: torch.Tensor, landmarks: torch.Tensor, p: int) -> torch.Tensor:
    """The original per-landmark grid_sample, mosaic and rearrange into tokens [B, L, P*P*C]."""
    b, c, size, _ = x.shape
    offsets = torch.arange(p, dtype=x.dtype) - p / 2
    grid_i, grid_j = torch.meshgrid(offsets, offsets, indexing="ij")
    grid = torch.stack([grid_i, grid_j], dim=-1)  # [P, P, 2]: (x offset of row i, y offset of column j)
    patches = [
        F.grid_sample(x, (grid + landmarks[:, n, None, None, :]) / (size * 0.5) - 1, align_corners=False)
        for n in range(landmarks.shape[1])
    ]
    r = math.isqrt(len(patches))
    mosaic = torch.stack(patches, 2).reshape(b, c, r, r, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, r * p, r * p)
    return mosaic.view(b, c, r, p, r, p).permute(0, 2, 4, 3, 5, 1).reshape(b, r * r, p * p * c)


def randomise(module: torch.nn.Module, rng, std: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=rng, dtype=p.dtype) * std)


def test_transformer_matches_a_direct_float64_computation(rng):
    t = PartTransformer(num_landmarks=6, patch_size=2, dim=16, depth=2, heads=2, dim_head=4, mlp_dim=24).double().eval()
    randomise(t, rng, 0.1)
    tokens = torch.randn(3, 6, 12, generator=rng, dtype=torch.float64)
    assert_close(t(tokens), direct_transformer(t, tokens))
    assert_close(t(tokens[:, :4]), direct_transformer(t, tokens[:, :4]))


def test_part_fvit_matches_the_original_forward_in_float64(rng):
    model = create_model("part_fvit_nano").double().eval()
    randomise(model, rng, 0.05)
    x = images(rng, 2).double()
    raw = model.landmark_cnn.output_layer(model.landmark_cnn.features(x).mean(dim=(-2, -1)))
    low, high = raw.min(1, keepdim=True)[0], raw.max(1, keepdim=True)[0]
    landmarks = ((raw - low) / (high - low) * 111).view(2, 49, 2)
    expected = direct_transformer(model.transformer, original_gather(x, landmarks, 8))
    embeddings, predicted = model.forward_with_landmarks(x)
    assert predicted.dtype == torch.float64
    assert_close(predicted, landmarks)
    assert_close(embeddings, expected)


def test_index_gives_each_token_the_position_of_its_landmark(rng):
    t = PartTransformer(num_landmarks=10, patch_size=2, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32)
    t = t.double().eval()
    with torch.no_grad():
        t.pos_embedding.normal_(generator=rng)
    full = torch.randn(2, 10, 12, generator=rng, dtype=torch.float64)
    index = torch.randint(0, 10, (2, 4), generator=rng)
    tokens = torch.gather(full, 1, index[..., None].expand(-1, -1, 12))
    out = t(tokens, index)

    # The cls output does not depend on token order once positions travel with the landmark.
    perm = torch.randperm(4, generator=rng)
    assert_close(t(tokens[:, perm], index[:, perm]), out)
    # Positions are pos_embedding[1 + index]: moving every token to other landmarks changes the result.
    assert (t(tokens, (index + 1) % 10) - out).abs().max() > 1e-6
    # Without an index a K-token input takes the first K + 1 positions, as the original.
    assert_close(t(tokens), t(tokens, torch.arange(4).expand(2, 4)))
    assert_close(t(full), t(full, torch.arange(10).expand(2, 10)))


def test_transformer_rejects_bad_tokens_and_index(rng):
    t = create_transformer("part_fvit_nano")
    tokens = torch.randn(2, 5, 192, generator=rng)
    with pytest.raises(ValueError, match="index values must lie in"):
        t(tokens, torch.full((2, 5), 49))
    with pytest.raises(ValueError, match=r"index must be \[B, K\]"):
        t(tokens, torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="tokens"):
        t(torch.randn(2, 5, 100, generator=rng))
    with pytest.raises(ValueError, match="positions"):
        t(torch.randn(1, 50, 192, generator=rng))


def test_layer_ids_for_layer_wise_lr_decay():
    t = create_transformer("part_fvit_tiny")
    ids = {name: t.layer_id(name) for name, _ in t.named_parameters()}
    assert ids["pos_embedding"] == ids["cls_token"] == ids["patch_to_embedding.weight"] == 0
    assert ids["layers.0.0.fn.fn.to_qkv.weight"] == 1 and ids["layers.3.1.fn.fn.net.3.bias"] == 4
    assert ids["mlp_head.0.weight"] == t.num_layer_groups - 1 == 5
    scales = t.layer_lr_scales(0.5)
    assert scales["mlp_head.0.bias"] == 1.0 and scales["layers.3.0.fn.norm.weight"] == 0.5
    assert scales["cls_token"] == 0.5**5
    with pytest.raises(KeyError):
        t.layer_id("loss.weight")


def test_landmarks_stay_float32_under_bfloat16_autocast(rng):
    model = create_model("part_fvit_nano").eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings, landmarks = model.forward_with_landmarks(images(rng, 2))
    assert landmarks.dtype == torch.float32 and embeddings.shape == (2, 64)
    assert landmarks.min() >= 0 and landmarks.max() <= 111


def test_gradient_reaches_the_landmark_cnn_through_the_gather(rng):
    model = create_model("part_fvit_nano").train()
    model.landmark_cnn.output_layer[0].p = 0.0
    # The head starts as a fixed grid (zero weights), which blocks the trunk's gradient at step 0 by design;
    # give it weights as after some training.
    with torch.no_grad():
        model.landmark_cnn.output_layer[1].weight.normal_(0.0, 0.01, generator=rng)
    model(images(rng, 2)).square().sum().backward()
    assert model.landmark_cnn.output_layer[1].weight.grad.abs().sum() > 0
    assert model.landmark_cnn.features[0][0].weight.grad.abs().sum() > 0


def test_landmark_head_starts_as_a_fixed_grid(rng):
    """At initialisation every image gets the same landmarks, spread over the whole face, in train mode too."""
    model = create_model("part_fvit_nano").train()
    landmarks = model.landmark_cnn(images(rng, 3))
    assert torch.equal(landmarks[0], landmarks[1]) and torch.equal(landmarks[1], landmarks[2])
    assert len({tuple(p) for p in landmarks[0].tolist()}) == model.landmark_cnn.num_landmarks
    assert landmarks[0].min() == 0 and landmarks[0].max() == 111


def test_part_fvit_b_trains_with_the_originals_dropout(rng):
    """The original builds Part fViT-B with dropout=0.1, emb_dropout=0.1 (and drop path 0.1) for training;
    in eval mode none of them acts, so embeddings are deterministic."""
    model = create_model("part_fvit_b", depth=1)
    rates = {type(m).__name__ + str(m.p) for m in model.transformer.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {"Dropout0.1"}
    assert model.transformer.dropout.p == 0.1
    assert model.transformer.arch_config()["dropout"] == 0.1
    assert model.transformer.arch_config()["emb_dropout"] == 0.1
    x = images(rng, 2)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_presets_reject_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("part_fvit_xl")
    with pytest.raises(ValueError, match="depht"):
        create_model("part_fvit_tiny", depht=2)


# ---------------------------------------------------------------- official weights


def _ours_of(model, official_name):
    ours = {official_key(k): v for k, v in model.state_dict().items()}
    return ours[official_name]


def test_official_part_fvit_b_loads_strictly_and_runs(model_b, official_b, rng):
    result = load_official_state_dict(model_b, official_b)
    assert sorted(result.loaded) == ["landmark_cnn", "transformer"]
    assert torch.equal(result.classifier_weight, official_b["loss.weight"])
    body = [v for k, v in official_b.items() if k != "loss.weight"]
    assert tensor_sums(model_b.state_dict().values()) == tensor_sums(body)
    for key in (
        "stn.features.4.conv.5.fc.0.weight",
        "output_layer.1.bias",
        "pos_embedding",
        "transformer.layers.7.0.fn.fn.to_qkv.weight",
        "mlp_head.0.weight",
    ):
        assert torch.equal(_ours_of(model_b, key), official_b[key]), key

    with torch.no_grad():
        embeddings, landmarks = model_b.eval().forward_with_landmarks(images(rng, 1))
    assert embeddings.shape == (1, 768) and landmarks.shape == (1, 196, 2)
    assert torch.isfinite(embeddings).all() and landmarks.min() >= 0 and landmarks.max() <= 111


@pytest.mark.parametrize("wrap", ["module", "module_backbone", "state_dict", "model"])
def test_official_wrappers_and_prefixes_are_removed(wrap, rng):
    model = create_model("part_fvit_b", depth=1)
    official = random_state(shapes_b(depth=1), rng)
    state = {
        "module": {"module." + k: v for k, v in official.items()},
        "module_backbone": {"module.backbone." + k: v for k, v in official.items()},
        "state_dict": {"state_dict": {"module." + k: v for k, v in official.items()}},
        "model": {"model": official, "epoch": 3},
    }[wrap]
    result = load_official_state_dict(model, state)
    assert sorted(result.loaded) == ["landmark_cnn", "transformer"]
    assert torch.equal(result.classifier_weight, official["loss.weight"])
    body = [v for k, v in official.items() if k != "loss.weight"]
    assert tensor_sums(model.state_dict().values()) == tensor_sums(body)


def test_pretraining_checkpoint_loads_teacher_by_default_and_student_on_request(rng):
    transformer = create_transformer("part_fvit_b", depth=2)
    shapes = {k: s for k, s in shapes_b(depth=2).items() if not k.startswith(("stn.", "output_layer.", "loss."))}
    teacher = random_state(shapes, rng)
    student = {k: v + 1 for k, v in teacher.items()}
    dino_head = {"head.mlp.0.weight": torch.randn(32, 768, generator=rng), "head.last_layer.weight_g": torch.ones(8, 1)}
    checkpoint = {
        "student": {
            **{"module.backbone." + k: v for k, v in student.items()},
            **{"module." + k: v for k, v in dino_head.items()},
        },
        "teacher": {**{"backbone." + k: v for k, v in teacher.items()}, **dino_head},
        "epoch": 10,
    }
    result = load_official_state_dict(transformer, checkpoint)
    assert result.loaded == ["transformer"] and result.classifier_weight is None
    assert set(dino_head) <= set(result.ignored)
    assert torch.equal(transformer.pos_embedding, teacher["pos_embedding"])
    net = transformer.layers[1][1].fn.fn.net
    assert torch.equal(net[3].weight, teacher["transformer.layers.1.1.fn.fn.net.3.weight"])

    load_official_state_dict(transformer, checkpoint, which="student")
    assert torch.equal(transformer.pos_embedding, student["pos_embedding"])


def test_pretraining_checkpoint_into_part_fvit_keeps_the_landmark_cnn(rng):
    model = create_model("part_fvit_b", depth=1)
    before = model.landmark_cnn.output_layer[1].weight.clone()
    shapes = {k: s for k, s in shapes_b(depth=1).items() if not k.startswith(("stn.", "output_layer.", "loss."))}
    teacher = random_state(shapes, rng)
    result = load_official_state_dict(model, {"teacher": {"backbone." + k: v for k, v in teacher.items()}})
    assert result.loaded == ["transformer"]
    assert torch.equal(model.landmark_cnn.output_layer[1].weight, before)
    assert torch.equal(model.transformer.cls_token, teacher["cls_token"])


def test_lafs_landmark_network_loads_into_a_landmark_cnn(rng):
    state = random_state(LANDMARK_NET, rng)
    cnn = LandmarkCNN()
    result = load_official_state_dict(cnn, {"state_dict": state})
    assert result.loaded == ["landmark_cnn"]
    assert {"mask_token", "global_token.1.weight", "pos_embedding"} <= set(result.ignored)
    assert torch.equal(cnn.output_layer[1].weight, state["output_layer.1.weight"])
    assert torch.equal(cnn.features[15].conv[8].running_var, state["stn.features.15.conv.8.running_var"])


def test_wrong_architecture_fails_with_every_offending_key_listed(rng, official_b):
    tiny = create_model("part_fvit_tiny")
    with pytest.raises(IncompatibleCheckpointError) as err:
        load_official_state_dict(tiny, official_b)
    message = str(err.value)
    assert "shape mismatch" in message and "pos_embedding" in message and "unexpected" in message

    model = create_model("part_fvit_b", depth=2)
    two_layers = {k: v for k, v in official_b.items() if k in shapes_b(depth=2)}
    load_official_state_dict(model, two_layers)
    without_layer_1 = {k: v for k, v in two_layers.items() if not k.startswith("transformer.layers.1.")}
    with pytest.raises(IncompatibleCheckpointError, match=r"(?s)missing \(11\).*layers\.1\.0\.fn\.norm\.weight"):
        load_official_state_dict(model, without_layer_1)
    with pytest.raises(IncompatibleCheckpointError, match="foo.bar"):
        load_official_state_dict(model, {**two_layers, "foo.bar": torch.zeros(1)})


# ---------------------------------------------------------------- our format


def test_our_format_round_trips_through_a_file_with_identical_outputs(tmp_path, rng):
    model = create_model("part_fvit_tiny", depth=2).eval()
    x = images(rng, 2)
    expected = model(x)
    atomic_save(model_to_dict(model), tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    assert not loaded.training and loaded.arch_config() == model.arch_config()
    assert torch.equal(loaded(x), expected)
    rebuilt = model_from_dict(model_to_dict(create_transformer("part_fvit_nano")))
    assert isinstance(rebuilt, PartTransformer) and rebuilt.dim == 64


def test_load_model_from_a_run_folder_prefers_best_then_last(tmp_path, rng):
    best, last = create_model("part_fvit_nano").eval(), create_model("part_fvit_nano").eval()
    run = tmp_path / "runs" / "demo"
    x = images(rng, 1)
    training_state = {
        "step": 7,
        "numpy_rng": np.random.default_rng(0).bit_generator.state,
        "legacy_rng": np.random.get_state(),
    }
    atomic_save({"model": model_to_dict(last), **training_state}, run / "checkpoints" / "last.pt")
    assert torch.equal(load_model(run)(x), last(x))
    atomic_save({"model": model_to_dict(best), "step": 5}, run / "checkpoints" / "best.pt")
    assert torch.equal(load_model(run)(x), best(x))


def test_load_model_reads_an_official_state_dict_file(tmp_path, rng):
    source = create_model("part_fvit_b", dim=128, depth=2, heads=2, mlp_dim=256).eval()
    atomic_save({"state_dict": {"module." + k: v for k, v in official_state_of(source).items()}}, tmp_path / "o.pth")
    loaded = load_model(tmp_path / "o.pth")
    assert loaded.arch_config() == source.arch_config()
    x = images(rng, 1)
    assert torch.equal(loaded(x), source(x))


def test_load_model_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="best.pt"):
        load_model(tmp_path)
    torch.save({"weights": [1, 2, 3]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="odd.pt.*unknown checkpoint format"):
        load_model(tmp_path / "odd.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.pt"):
        load_model(tmp_path / "text.pt")


def test_damaged_and_foreign_files_are_named_in_one_clear_error(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(create_model("part_fvit_nano").state_dict(), tmp_path / "whole.pt")
    (tmp_path / "half.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:5000])
    for name in ("empty.pt", "half.pt"):
        with pytest.raises(ValueError, match=f"{name}: not a readable torch checkpoint"):
            load_checkpoint(tmp_path / name)
        with pytest.raises(ValueError, match=name):
            load_model(tmp_path / name)


def test_an_arch_is_checked_against_its_weights_before_anything_is_built(tmp_path):
    """The arch of a lafs/v1 file comes from the file: a few KB must not ask for a million blocks, and
    an arch that does not fit its weights is named, key by key."""
    saved = model_to_dict(create_model("part_fvit_nano"))
    cases = {
        "depth 1000000, its state dict holds 3 transformer layers": {"depth": 10**6},
        "lists 1000000 landmark blocks": {"landmark_blocks": [[3, 16, 16, False, "RE", 2]] * 10**6},
        r"transformer.cls_token: file \(1, 1, 64\) vs arch \(1, 1, 1000000000\)": {"dim": 10**9},
        "cannot build a PartFViT": {"mlp_dim": "wide"},
    }
    for message, change in cases.items():
        torch.save({**saved, "arch": {**saved["arch"], **change}}, tmp_path / "bad.pt")
        with pytest.raises(IncompatibleCheckpointError, match=f"bad.pt: .*{message}"):
            load_model(tmp_path / "bad.pt")
    with pytest.raises(IncompatibleCheckpointError, match="needs 'arch' and 'state_dict' mappings"):
        model_from_dict({k: v for k, v in saved.items() if k != "arch"})


def test_official_layer_numbers_and_positions_are_checked(official_b):
    stray = {k.replace("transformer.layers.11.", "transformer.layers.999999."): v for k, v in official_b.items()}
    with pytest.raises(IncompatibleCheckpointError, match=r"not numbered 0\.\.11: found \['999999'\]"):
        infer_official_config(stray)
    with pytest.raises(IncompatibleCheckpointError, match=r"pos_embedding must be \[1, L \+ 1, dim\]; got \(5,\)"):
        infer_official_config({**official_b, "pos_embedding": torch.zeros(5)})


def test_atomic_save_replaces_whole_files_and_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "ckpt.pt"
    atomic_save({"a": torch.ones(3)}, target)
    atomic_save({"a": torch.zeros(3)}, target)
    assert torch.equal(torch.load(target)["a"], torch.zeros(3))
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a lambda cannot be pickled
        atomic_save({"bad": lambda: None}, target)
    assert torch.equal(torch.load(target)["a"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_atomic_save_gives_the_file_the_mode_open_would(tmp_path):
    """Not mkstemp's owner-only 0600: a checkpoint or exported program is as readable as any other file."""
    old = os.umask(0o027)
    try:
        atomic_save({"a": torch.ones(3)}, tmp_path / "ckpt.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt.pt").stat().st_mode) == 0o640


def test_channels_last_landmark_cnn_matches_nchw(rng):
    """Weights stored NHWC (train.channels_last): the same landmarks and gradients as NCHW, NHWC inputs fed."""
    nchw = create_model("part_fvit_nano").train()
    nchw.landmark_cnn.output_layer[0].p = 0.0
    with torch.no_grad():  # a head that moves the landmarks, as after some training
        nchw.landmark_cnn.output_layer[1].weight.normal_(0.0, 0.05, generator=rng)
    nhwc = create_model("part_fvit_nano").train()
    nhwc.load_state_dict(nchw.state_dict())
    nhwc.landmark_cnn.output_layer[0].p = 0.0
    nhwc.landmark_cnn.to(memory_format=torch.channels_last)
    assert nhwc.landmark_cnn.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    batch = images(rng, 4)
    outputs = [model.forward_with_landmarks(batch) for model in (nchw, nhwc)]
    torch.testing.assert_close(outputs[1][1], outputs[0][1], atol=1e-3, rtol=0)
    torch.testing.assert_close(outputs[1][0], outputs[0][0], atol=1e-4, rtol=1e-4)
    for embeddings, _ in outputs:
        embeddings.square().sum().backward()
    stem = [model.landmark_cnn.features[0][0].weight.grad for model in (nchw, nhwc)]
    torch.testing.assert_close(stem[1], stem[0], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("with_index", [False, True])
def test_last_block_runs_the_cls_row_only_with_every_tokens_result(rng, with_index):
    """The output is the cls token, so the last block's attention, projection and MLP run for that row only;
    output and every gradient equal the full block's (float64), stochastic depth included (one draw per image)."""
    t = PartTransformer(num_landmarks=10, patch_size=2, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32, drop_path=0.3)
    t = t.double().train()
    randomise(t, rng, 0.1)
    tokens = torch.randn(5, 6, 12, generator=rng, dtype=torch.float64)
    index = torch.randint(0, 10, (5, 6), generator=rng) if with_index else None
    seen, results = [], {}
    t.layers[-1][1].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    seed = int(torch.randint(0, 2**31, (), generator=rng))  # the same stochastic-depth draws for both
    for cls_only in (True, False):
        t.last_block_cls_only = cls_only
        t.zero_grad()
        leaf = tokens.clone().requires_grad_(True)
        torch.manual_seed(seed)
        out = t(leaf, index)
        (out * torch.arange(16, dtype=torch.float64)).sum().backward()
        results[cls_only] = [out, leaf.grad, *(p.grad for p in t.parameters())]
    assert seen == [1, 7]  # the last MLP saw the cls row only, then all 1 + 6 tokens
    for ours, full in zip(results[True], results[False]):
        assert_close(ours, full)


@pytest.mark.parametrize("num_tokens", [6, EXPLICIT_MAX_KEYS + 4])  # keys at most the threshold, and beyond
def test_every_attention_form_gives_the_same_output_and_gradients(rng, num_tokens):
    """ "explicit" (the released code's separate ops), torch's fused kernel and "auto" agree in float64, output
    and every gradient, for the full blocks and the cls-row-only last block."""
    t = PartTransformer(num_landmarks=200, patch_size=2, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=32).double()
    randomise(t, rng, 0.1)
    tokens = torch.randn(3, num_tokens, 12, generator=rng, dtype=torch.float64)
    weights = torch.randn(16, generator=rng, dtype=torch.float64)
    results = {}
    for form in ATTENTION_FORMS:
        t.attention_form = form
        t.zero_grad()
        leaf = tokens.clone().requires_grad_(True)
        out = t(leaf)
        (out * weights).sum().backward()
        results[form] = [out, leaf.grad, *(p.grad for p in t.parameters())]
    for form in set(ATTENTION_FORMS) - {"explicit"}:
        for value, explicit in zip(results[form], results["explicit"]):
            assert_close(value, explicit)


@pytest.mark.parametrize(
    "form, num_tokens, dim_head, expected",
    [
        ("auto", EXPLICIT_MAX_KEYS - 1, 8, {}),  # every block at most EXPLICIT_MAX_KEYS keys: the separate ops
        ("auto", EXPLICIT_MAX_KEYS, 8, {"kernel": 1}),  # the full block; the cls-row block takes the separate ops
        ("auto", EXPLICIT_MAX_KEYS, 40, {"sdpa": 1}),  # float64 heads of 40 are beyond the C++ kernel
        ("sdpa", 5, 8, {"sdpa": 2}),
        ("kernel", 5, 8, {"kernel": 2}),
        ("explicit", 150, 8, {}),
    ],
)
def test_attention_form_decides_which_kernel_runs(rng, monkeypatch, form, num_tokens, dim_head, expected):
    """On the CPU "auto" takes the separate ops up to EXPLICIT_MAX_KEYS keys (cls token included) or
    EXPLICIT_MAX_QUERIES queries, our C++ kernel beyond where it can run, else torch's fused kernel; the other
    forms always take theirs.  Two blocks: one full, one for the cls row only; float64."""
    if "kernel" in expected and CPU_KERNELS_MISSING:
        pytest.skip(CPU_KERNELS_SKIP_REASON)
    calls = []
    for name, module, attr in (
        ("sdpa", transformer_module.F, "scaled_dot_product_attention"),
        ("kernel", transformer_module.kernel_attention, "attention"),
        ("kernel", transformer_module.kernel_attention, "attention_qkv"),
    ):
        original = getattr(module, attr)
        monkeypatch.setattr(module, attr, lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k))
    t = PartTransformer(num_landmarks=200, patch_size=2, dim=16, depth=2, heads=2, dim_head=dim_head, mlp_dim=32)
    t = t.double()
    t.attention_form = form
    assert all(layer[0].fn.fn.form == form for layer in t.layers)
    t(torch.randn(2, num_tokens, 12, generator=rng, dtype=torch.float64))
    assert {name: calls.count(name) for name in set(calls)} == expected


def test_an_unknown_attention_form_is_refused():
    t = PartTransformer(num_landmarks=4, patch_size=2, dim=8, depth=1, heads=2, dim_head=4, mlp_dim=8)
    with pytest.raises(ValueError, match="'flash'"):
        t.attention_form = "flash"
    assert t.attention_form == "auto"


def test_compute_as_released_runs_every_token_and_the_explicit_form():
    t = PartTransformer(num_landmarks=4, patch_size=2, dim=8, depth=2, heads=2, dim_head=4, mlp_dim=8)
    assert (t.last_block_cls_only, t.attention_form) == (True, "auto")
    assert t.compute_as_released() is t
    assert (t.last_block_cls_only, t.attention_form) == (False, "explicit")
    assert {layer[0].fn.fn.form for layer in t.layers} == {"explicit"}


def test_a_transformer_without_blocks_returns_the_normed_cls_token(rng):
    t = PartTransformer(num_landmarks=4, patch_size=2, dim=8, depth=0, heads=2, dim_head=4, mlp_dim=8).double()
    tokens = torch.randn(3, 4, 12, generator=rng, dtype=torch.float64)
    expected = t.mlp_head((t.cls_token + t.pos_embedding[:, :1]).expand(3, 1, 8)[:, 0])
    for cls_only in (True, False):
        t.last_block_cls_only = cls_only
        assert_close(t(tokens), expected)
