"""Training curves: every logged accuracy series gets its own labelled line."""

import matplotlib.pyplot as plt

from lafs.train import plots


def _legend_labels(monkeypatch, log, tmp_path) -> list[str]:
    figures = []
    original_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    plots.curves(log, tmp_path / "curves.png", title="t")
    original_close("all")
    assert (tmp_path / "curves.png").stat().st_size > 5_000
    (figure,) = figures
    return [text.get_text() for axes in figure.axes if axes.get_legend() for text in axes.get_legend().get_texts()]


def test_pretraining_curves_show_student_and_view_retrieval(monkeypatch, tmp_path):
    log = [{"step": s, "loss": 8.0 - s / 10} for s in range(1, 5)]
    log += [
        {
            "step": s,
            "val_accuracy": 0.5,
            "val_student_accuracy": 0.48,
            "val_view_retrieval": 0.05,
            "val_student_view_retrieval": 0.06,
        }
        for s in (2, 4)
    ]
    assert _legend_labels(monkeypatch, log, tmp_path) == [
        "verification",
        "verification (student)",
        "view retrieval",
        "view retrieval (student)",
    ]


def test_supervised_curves_have_no_pretraining_lines(monkeypatch, tmp_path):
    log = [{"step": s, "loss": 30.0 - s, "acc": s / 10} for s in range(1, 5)] + [{"step": 4, "val_accuracy": 0.7}]
    assert _legend_labels(monkeypatch, log, tmp_path) == ["training batches", "verification"]
