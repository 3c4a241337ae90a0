"""Recipes, overrides and the errors a bad configuration gives before any training starts."""

import subprocess
import sys

import pytest
import torch
import yaml

from lafs.train import config as cfgmod
from lafs.train.__main__ import main


def test_every_recipe_resolves_or_asks_for_its_data(tmp_path):
    """Built-in recipes hold only known keys; the real-data ones stop at the missing data.root."""
    recipes = sorted(p.stem for p in cfgmod.RECIPE_DIR.glob("*.yaml"))
    assert {
        "demo",
        "webface4m_supervised",
        "webface4m_pretrain",
        "webface4m_finetune",
        "ms1mv3_supervised",
        "ms1mv3_pretrain",
        "ms1mv3_finetune",
    } <= set(recipes)
    for name in recipes:
        tree = cfgmod.load_recipe(name)
        if cfgmod.is_demo_recipe(tree):
            stages = cfgmod.resolve_demo(tree, {"supervised": tmp_path, "pretrain": tmp_path})
            assert stages["finetune"].init.landmark == str(tmp_path)
            assert stages["scratch"].init.pretrained is None and stages["scratch"].init.landmark is None
            continue
        stage = name.split("_")[1]
        with pytest.raises(cfgmod.ConfigError, match="data.root is required"):
            cfgmod.resolve_stage(stage, tree)
        (tmp_path / "train.rec").write_bytes(b"")
        (tmp_path / "train.idx").write_text("")
        extra = [("init.landmark", str(tmp_path))] if stage != "supervised" else []
        tree = cfgmod.apply_overrides(tree, [("data.root", str(tmp_path))] + extra)
        cfg = cfgmod.resolve_stage(stage, tree)
        assert cfg.loss.s == 64.0 if stage != "pretrain" else cfg.dino.student_temp == 0.1


def test_a_recipe_with_a_base_changes_only_what_it_sets(tmp_path):
    demo = cfgmod.load_recipe("demo")
    (tmp_path / "wide.yaml").write_text(
        "base: demo\ndata: {synthetic: {pose_difficulty: 1.0}}\nmodel: {overrides: {landmark_readout_grid: 2}}\n"
    )
    (tmp_path / "wider.yaml").write_text("base: wide.yaml\nsupervised: {optim: {epochs: 20}}\n")
    tree = cfgmod.load_recipe(str(tmp_path / "wider.yaml"))
    assert tree["data"]["synthetic"] == {**demo["data"]["synthetic"], "pose_difficulty": 1.0}
    assert tree["model"]["overrides"] == {**demo["model"]["overrides"], "landmark_readout_grid": 2}
    assert tree["supervised"]["optim"] == {**demo["supervised"]["optim"], "epochs": 20}
    assert {k: v for k, v in tree.items() if k not in ("data", "model", "supervised")} == {
        k: v for k, v in demo.items() if k not in ("data", "model", "supervised")
    }
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(cfgmod.ConfigError, match="loop"):
        cfgmod.load_recipe(str(tmp_path / "a.yaml"))
    (tmp_path / "bad.yaml").write_text("base: [demo]\n")
    with pytest.raises(cfgmod.ConfigError, match="base must be"):
        cfgmod.load_recipe(str(tmp_path / "bad.yaml"))


def test_paper_settings_in_recipes():
    ms1 = cfgmod.load_recipe("ms1mv3_finetune")
    web = cfgmod.load_recipe("webface4m_finetune")
    assert ms1["optim"]["layer_decay"] == web["optim"]["layer_decay"] == 0.58
    assert web["aug"]["mixup_prob"] == 0.1 and ms1["aug"]["mixup_prob"] == 0.2
    assert ms1["data"]["color"] == "bgr" and web["data"]["color"] == "rgb"
    for name in ("webface4m_supervised", "ms1mv3_supervised"):
        loss = cfgmod.load_recipe(name)["loss"]
        assert (loss["type"], loss["s"], loss["m"]) == ("cosface", 64.0, 0.4)


def test_overrides_are_typed_and_dotted():
    parsed = cfgmod.parse_overrides(["optim.lr=5e-4", "val.bins=[]", "data.root=null", "train.original_path=true"])
    assert parsed == [("optim.lr", 5e-4), ("val.bins", []), ("data.root", None), ("train.original_path", True)]
    tree = cfgmod.demo_stage_tree(cfgmod.load_recipe("demo"), "supervised")
    cfg = cfgmod.resolve_stage("supervised", cfgmod.apply_overrides(tree, parsed[:1] + [("optim.epochs", 3)]))
    assert cfg.optim.lr == 5e-4 and cfg.optim.epochs == 3.0 and isinstance(cfg.optim.epochs, float)


@pytest.mark.parametrize(
    "text, amp",
    [
        ("off", "off"),
        ("'off'", "off"),
        ("false", "off"),
        ("no", "off"),
        ("true", "auto"),
        ("bf16", "bf16"),
    ],
)
def test_amp_reads_yaml_booleans_as_off_and_auto(text, amp):
    tree = cfgmod.demo_stage_tree(cfgmod.load_recipe("demo"), "supervised")
    overrides = cfgmod.parse_overrides([f"train.amp={text}"])
    assert cfgmod.resolve_stage("supervised", cfgmod.apply_overrides(tree, overrides)).train.amp == amp


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1", "optim.lr must be >= 0"),
        ("optim.lr=fast", "optim.lr must be float"),
        ("optim.lrr=1e-3", "did you mean optim.lr"),
        ("loss.type=softmax", "loss.type must be one of cosface, arcface"),
        ("optim.warmup_epochs=100", "warmup_epochs .* exceeds optim.epochs"),
        ("optim.batch_size=0", "optim.batch_size must be >= 1"),
        ("train.original_path=1", "train.original_path must be bool"),
        ("train.amp=1", "train.amp must be str"),
        ("train.amp=fp8", "train.amp must be one of auto, bf16, fp16, off"),
        ("data.source=rec", "data.root is required"),
        ("val.bins=[/no/such/lfw.bin]", "is not a file"),
        ("seed=-1", "seed must be >= 0"),
        ("seed=9223372036854775808", "seed must be <= 9223372036854775807"),
    ],
)
def test_bad_values_name_the_problem(override, message):
    tree = cfgmod.demo_stage_tree(cfgmod.load_recipe("demo"), "supervised")
    with pytest.raises(cfgmod.ConfigError, match=message):
        cfgmod.resolve_stage("supervised", cfgmod.apply_overrides(tree, cfgmod.parse_overrides([override])))


def test_stage_reference_outside_the_demo_is_an_error():
    tree = cfgmod.demo_stage_tree(cfgmod.load_recipe("demo"), "pretrain")
    with pytest.raises(cfgmod.ConfigError, match="only the demo provides"):
        cfgmod.resolve_stage("pretrain", tree)


def test_cli_reports_config_errors_before_training(tmp_path, capsys):
    code = main(["supervised", "optim.lr=-3", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "optim.lr must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    code = main(["supervised", "data.source=rec", f"data.root={tmp_path}", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "has no train.rec" in capsys.readouterr().err


def test_missing_recipe_and_malformed_yaml(tmp_path):
    with pytest.raises(cfgmod.ConfigError, match="no recipe named 'nope'"):
        cfgmod.load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(cfgmod.ConfigError, match="not valid YAML"):
        cfgmod.load_recipe(str(bad))


def test_help_documents_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "lafs.train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for stage_schema in cfgmod.SCHEMAS.values():
        for opt in stage_schema:
            assert f"  {opt.key}=" in out, opt.key
    for flag in ("--config", "--out", "--resume", "--original-path"):
        assert flag in out


def test_resolved_config_round_trips_through_yaml(tmp_path):
    stages = cfgmod.resolve_demo(cfgmod.load_recipe("demo"), {"supervised": tmp_path, "pretrain": tmp_path})
    for name, cfg in stages.items():
        path = tmp_path / f"{name}.yaml"
        cfgmod.dump(cfg, path)
        stage = name if name in ("supervised", "pretrain") else "finetune"  # scratch, finetune-seed1, ...
        again = cfgmod.resolve_stage(stage, yaml.safe_load(path.read_text()))
        assert again == cfg


@pytest.mark.parametrize("stage_name", ["supervised", "finetune"])
def test_aug_flip_mirrors_training_images(stage_name):
    """aug.flip=1 mirrors every training image, aug.flip=0 none (supervised: the flip alone)."""
    from lafs.train.runner import stage_class

    tree = cfgmod.load_recipe("tiny")
    image = torch.rand(3, 112, 112) * 2 - 1
    seen = {}
    for flip in (0.0, 1.0):
        overrides = [("aug.flip", flip)]
        if stage_name == "finetune":
            overrides += [("aug.randaugment", False), ("init.landmark", None), ("init.pretrained", None)]
        stage_tree = cfgmod.apply_overrides(cfgmod.demo_stage_tree(tree, stage_name), overrides)
        cfg = cfgmod.resolve_stage(stage_name, stage_tree)
        transform = stage_class(stage_name)(cfg, run=None, dist=_OneProcess()).transform()
        seen[flip] = image if transform is None else transform(image)
    assert torch.equal(seen[0.0], image)
    # The fine-tuning stage goes through uint8: equal to 1/255 of the range.
    torch.testing.assert_close(seen[1.0], image.flip(-1), atol=1.0 / 127.5, rtol=0)
    assert not torch.allclose(seen[1.0], image, atol=0.1)


def test_released_fine_tuning_augmentations_do_what_they_say():
    """aug.resized_crop_scale, aug.colour_jitter and aug.erasing_prob (the released fine-tuning's random resized
    crop, colour jitter and random erasing), each alone on a face, drawn from the global RNG as SeededItems seeds it."""
    from lafs.train.runner import stage_class

    base = [("aug.flip", 0.0), ("aug.randaugment", False), ("init.landmark", None), ("init.pretrained", None)]
    tree = cfgmod.demo_stage_tree(cfgmod.load_recipe("tiny"), "finetune")
    image = torch.linspace(-0.9, 0.9, 112)[None, None, :].expand(3, 112, 112).contiguous()  # a horizontal ramp

    def apply(*options, seed=0):
        cfg = cfgmod.resolve_stage("finetune", cfgmod.apply_overrides(tree, base + list(options)))
        transform = stage_class("finetune")(cfg, run=None, dist=_OneProcess()).transform()
        if transform is None:
            return image
        torch.manual_seed(seed)
        return transform(image)

    assert torch.equal(apply(), image)
    cropped = apply(("aug.resized_crop_scale", [0.5, 0.6]))
    assert cropped.shape == image.shape and (cropped[0, 56, -1] - cropped[0, 56, 0]) < 1.6  # a narrower ramp
    jittered = apply(("aug.colour_jitter", 0.1))
    assert not torch.allclose(jittered, image, atol=2 / 127.5) and (jittered - image).abs().max() < 0.5
    erased = [apply(("aug.erasing_prob", 1.0), seed=seed) for seed in range(20)]
    for out in erased:
        black = (out == -1).all(0)  # value 0 on the uint8 form
        assert 0.02 * 112 * 112 * 0.9 <= black.sum() <= 0.1 * 112 * 112 * 1.1
    assert not torch.equal(erased[0], erased[1])  # the rectangle is drawn per image
    with pytest.raises(cfgmod.ConfigError, match="aug.resized_crop_scale must be null or"):
        cfgmod.resolve_stage("finetune", cfgmod.apply_overrides(tree, base + [("aug.resized_crop_scale", [0.9])]))


def test_pretraining_refuses_recognition_options_and_passes_betas():
    tree = cfgmod.apply_overrides(
        cfgmod.demo_stage_tree(cfgmod.load_recipe("tiny"), "pretrain"), [("init.landmark", "/tmp")]
    )
    for key, value in (("optim.layer_decay", 0.5), ("optim.landmark_lr_scale", 2.0)):
        with pytest.raises(cfgmod.ConfigError, match=f"{key} has no effect in pretraining"):
            cfgmod.resolve_stage("pretrain", cfgmod.apply_overrides(tree, [(key, value)]))
    from lafs.ssl.step import DINOSettings

    cfg = cfgmod.resolve_stage("pretrain", cfgmod.apply_overrides(tree, [("optim.betas", [0.5, 0.6])]))
    assert DINOSettings.from_config(cfg, iters_per_epoch=4, amp_dtype=None).betas == (0.5, 0.6)


def test_original_path_reaches_every_stage_of_the_demo(monkeypatch):
    from lafs.train import runner

    seen = {}

    def capture(command, *, recipe, overrides, out, resume=False):
        tree = cfgmod.apply_overrides(cfgmod.load_recipe(recipe), cfgmod.parse_overrides(overrides))
        refs = {"supervised": out / "supervised", "pretrain": out / "pretrain"}
        seen.update({name: c.train.original_path for name, c in cfgmod.resolve_demo(tree, refs).items()})
        return {}

    monkeypatch.setattr(runner, "run_command", capture)
    assert main(["--original-path", "--config", "tiny", "--out", "/tmp/unused"]) == 0
    assert seen and all(seen.values()), seen


@pytest.mark.parametrize("original", [False, True])
def test_landmark_cnn_runs_channels_last_except_on_the_original_path(original):
    from lafs.train.runner import stage_class

    tree = cfgmod.demo_stage_tree(cfgmod.load_recipe("tiny"), "supervised")
    cfg = cfgmod.resolve_stage("supervised", cfgmod.apply_overrides(tree, [("train.original_path", original)]))
    stage = stage_class("supervised")(cfg, run=None, dist=_OneProcess())
    stage.build()
    stem = stage.model.landmark_cnn.features[0][0].weight
    assert stem.is_contiguous(memory_format=torch.channels_last) == (not original)
    assert stem.is_contiguous() == original


class _OneProcess:
    device = torch.device("cpu")
    enabled = False
    rank = 0
    world_size = 1
    is_main = True
