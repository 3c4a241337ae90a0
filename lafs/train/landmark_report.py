"""The landmark report of a supervised or fine-tuning run: tracking score in the log and summary, landmarks.png.

One call at the end of a stage (``SupervisedStage.finish``): on synthetic data it
measures the landmark tracking score (:mod:`lafs.eval.landmark_tracking`) at the
recipe's difficulty and at difficulty 1.0, writes it to ``log.jsonl`` and prints it,
and draws ``landmarks.png`` (mean layout and faces of different pose); on real data,
which has no five points, it says so and draws the landmarks on held-out images.
"""

from __future__ import annotations

from lafs.eval import landmark_tracking

from . import plots

REPORTED_DIFFICULTY = 1.0  # besides the recipe's own: the full nuisance strength of SyntheticFaces
LEFT_OUT = "landmark tracking: left out (real data has no five points to compare the landmarks with)"
SKIPPED = "landmark tracking: skipped (val.landmark_faces=0)"


def report(model, cfg, run, sample_images, *, step: int, device=None) -> dict | None:
    """Tracking results ``{"difficulty_<d>": {"score", "spread_px", ...}}`` (None on real data, or with
    ``val.landmark_faces=0``)."""
    if cfg.data.source != "synthetic" or cfg.val.landmark_faces == 0:
        note = LEFT_OUT if cfg.data.source != "synthetic" else SKIPPED
        print(note, flush=True)
        run.log({"step": step, "landmark_tracking": None, "note": note})
        if cfg.train.plots:
            plots.landmarks(model, sample_images, run.path / "landmarks.png", device=device)
        return None
    synthetic = cfg.data.synthetic
    settings = [(synthetic.difficulty, synthetic.pose_difficulty), REPORTED_DIFFICULTY]
    results = landmark_tracking.measure(
        model.landmark_cnn,
        settings,
        synthetic.colours,
        device=device,
        count=cfg.val.landmark_faces,
        keep=cfg.train.plots,
    )
    print(landmark_tracking.summary_line(results), flush=True)
    if cfg.train.plots:
        plots.landmark_tracking(results, run.path / "landmarks.png", patch=model.patch_size)
    numbers = {
        name: {k: v for k, v in entry.items() if k not in ("images", "points", "landmarks")}
        for name, entry in results.items()
    }
    run.log({"step": step, "landmark_tracking": numbers})
    return numbers
