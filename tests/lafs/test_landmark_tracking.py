"""The landmark tracking score: ~1 for landmarks that follow the face, ~0 for a layout that does not."""

import numpy as np
import pytest
import torch

from lafs.eval import landmark_tracking as lt
from lafs.models import create_landmark_cnn


@pytest.fixture(scope="module")
def faces():
    """60 held-out faces at difficulty 1.0 with their true five points [60, 5, 2]."""
    return lt.tracking_faces(1.0, count=60)


def _seed(rng) -> int:
    return int(torch.randint(0, 2**31, (), generator=rng))


def _following(points, generator, num_landmarks=49, noise=0.0):
    """Landmarks that are a fixed random affine function of the true points (plus optional noise)."""
    flat = points.reshape(len(points), -1)
    mixing = generator.normal(size=(flat.shape[1], 2 * num_landmarks)) / flat.shape[1]
    marks = flat @ mixing + generator.uniform(0, 100, size=2 * num_landmarks)
    return (marks + generator.normal(0.0, noise, marks.shape)).reshape(len(points), num_landmarks, 2)


def test_the_tracking_faces_are_the_held_out_set_of_the_issue(faces):
    images, points = faces
    assert images.shape == (60, 112, 112, 3) and images.dtype == np.uint8
    assert points.shape == (60, 5, 2)
    from lafs.data import SyntheticFaces

    again = SyntheticFaces(60, 1, seed=777, identity_offset=5000, difficulty=1.0).render(7)
    np.testing.assert_array_equal(images[7], again[0])
    np.testing.assert_array_equal(points[7], again[2])


def test_landmarks_that_follow_the_true_points_score_one(faces, rng):
    _, points = faces
    generator = np.random.default_rng(_seed(rng))
    assert lt.tracking_score(_following(points, generator), points) > 0.999
    # 0.3 px of noise on landmarks that follow points moving by ~4 px still explains most of it
    assert lt.tracking_score(_following(points, generator, noise=0.3), points) > 0.8


def test_a_constant_layout_scores_zero(faces, rng):
    _, points = faces
    generator = np.random.default_rng(_seed(rng))
    layout = np.tile(generator.uniform(0, 111, size=(1, 49, 2)), (len(points), 1, 1))
    assert abs(lt.tracking_score(layout, points)) < 0.05
    # a layout that jitters at random, unrelated to the face, explains nothing either
    jitter = layout + generator.normal(0.0, 3.0, layout.shape)
    assert lt.tracking_score(jitter, points) < 0.1


def test_landmarks_of_other_faces_score_zero(faces, rng):
    """Landmarks that follow the points of a different face carry nothing about this one."""
    _, points = faces
    generator = np.random.default_rng(_seed(rng))
    marks = _following(points, generator)
    shuffled = marks[generator.permutation(len(marks))]
    assert lt.tracking_score(shuffled, points) < 0.2
    assert lt.tracking_score(marks, points) > 0.999


def test_spread_is_the_mean_std_over_images():
    points = np.zeros((4, 2, 2))
    points[:, 0, 0] = [0, 2, 0, 2]  # std 1 in one of four coordinates
    assert lt.spread(points) == pytest.approx(0.25)
    assert lt.spread(np.ones((5, 3, 2))) == 0.0


def test_an_untrained_landmark_cnn_is_a_fixed_grid_and_scores_zero(faces):
    images, points = faces
    cnn = create_landmark_cnn("part_fvit_nano")
    marks = lt.predict_landmarks(cnn, images)
    assert marks.shape == (60, 49, 2)
    assert lt.spread(marks) < 1e-3
    assert abs(lt.tracking_score(marks, points)) < 0.05


def test_measure_reports_each_difficulty_once():
    cnn = create_landmark_cnn("part_fvit_nano")
    results = lt.measure(cnn, [0.2, 1.0, 1.0], count=20, keep=True)
    assert list(results) == ["difficulty_0.2", "difficulty_1"]
    assert results["difficulty_1"]["true_spread_px"] > results["difficulty_0.2"]["true_spread_px"]
    assert results["difficulty_1"]["landmarks"].shape == (20, 49, 2)
    assert "R^2" in lt.summary_line(results)


def test_bad_shapes_are_refused(faces):
    _, points = faces
    with pytest.raises(ValueError, match="same N"):
        lt.tracking_score(np.zeros((10, 49, 2)), points)
    with pytest.raises(ValueError, match="too few"):
        lt.tracking_score(np.zeros((6, 49, 2)), points[:6])


# ---------------------------------------------------------------- in a training run


def test_a_supervised_run_reports_the_tracking_score(tmp_path):
    import json

    from lafs.train.__main__ import main

    out = tmp_path / "run"
    assert (
        main(["supervised", "--config", "tiny", "train.stop_after_steps=2", "train.plots=true", "--out", str(out)]) == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    tracking = summary["landmark_tracking"]
    assert set(tracking) == {"difficulty_1"}  # the tiny recipe trains at difficulty 1.0
    assert tracking["difficulty_1"]["faces"] == 20 and tracking["difficulty_1"]["true_spread_px"] > 3.0
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged[-1]["landmark_tracking"] == tracking and logged[-1]["step"] == 2
    assert (out / "landmarks.png").stat().st_size > 20_000


def test_real_data_leaves_the_score_out_and_says_so(tmp_path, capsys):
    from types import SimpleNamespace as NS

    from lafs.train import landmark_report
    from lafs.train.distributed import init_distributed
    from lafs.train.loop import RunFolder

    cfg = NS(data=NS(source="rec"), val=NS(landmark_faces=400), train=NS(plots=False))
    run = RunFolder(tmp_path, init_distributed())
    assert landmark_report.report(None, cfg, run, None, step=7) is None
    assert "left out" in capsys.readouterr().out
    assert "no five points" in run.read_log()[-1]["note"] and run.read_log()[-1]["step"] == 7


def test_too_few_tracking_faces_are_refused_before_training():
    from lafs.train import config as config_mod

    tree = config_mod.demo_stage_tree(config_mod.load_recipe("tiny"), "supervised")
    tree = config_mod.apply_overrides(tree, config_mod.parse_overrides(["val.landmark_faces=5"]))
    with pytest.raises(config_mod.ConfigError, match="landmark_faces"):
        config_mod.resolve_stage("supervised", tree)


def test_the_picture_shows_the_faces_of_extreme_pose(faces):
    from lafs.train.plots import _pose_examples

    _, points = faces
    before = dict(_pose_examples(points))
    turned, moved = [i for i in range(len(points)) if i not in before][:2]
    changed = points.copy()
    centre = changed[turned].mean(axis=0)
    turn = np.array([[np.cos(0.6), -np.sin(0.6)], [np.sin(0.6), np.cos(0.6)]])
    changed[turned] = (changed[turned] - centre) @ turn.T + centre  # turned by 34 degrees: the most rolled
    changed[moved] += [25.0, 0.0]  # moved right by 25 px: the largest x shift
    examples = dict(_pose_examples(changed))
    assert examples[turned].startswith("roll +") and examples[moved].startswith("shift x +")
    assert len(examples) <= 7
