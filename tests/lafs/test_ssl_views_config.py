"""The views.landmarks / views.local_positions options: their values, errors, and the default run's setting."""

from pathlib import Path

import pytest

from lafs.train import config as cfgmod


def pretrain_config(*overrides):
    tree = cfgmod.demo_stage_tree(cfgmod.load_recipe("demo"), "pretrain")
    tree = cfgmod.apply_overrides(tree, cfgmod.parse_overrides(list(overrides)))
    refs = {"supervised": Path(__file__)}  # any existing path stands for the supervised run folder
    return cfgmod.resolve_stage("pretrain", tree, source="test", refs=refs)


def test_default_run_uses_per_image_landmarks_and_landmark_positions():
    cfg = pretrain_config()
    assert cfg.views.landmarks == "per_image" and cfg.views.local_positions is None


def test_options_take_their_choices_and_name_bad_values():
    cfg = pretrain_config("views.landmarks=per_view", "views.local_positions=first")
    assert (cfg.views.landmarks, cfg.views.local_positions) == ("per_view", "first")
    with pytest.raises(cfgmod.ConfigError, match="views.landmarks"):
        pretrain_config("views.landmarks=per_crop")
    with pytest.raises(cfgmod.ConfigError, match="views.local_positions"):
        pretrain_config("views.local_positions=middle")
