"""ROC plot of an IJB evaluation (matplotlib's Agg canvas, no display needed)."""

import numpy as np
from matplotlib.figure import Figure


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, tar: dict, path, title: str) -> None:
    """Save the ROC (TAR against log FAR) with the TAR@FAR table's points marked, as a PNG at ``path``."""
    figure = Figure(figsize=(6, 4.5), dpi=120)
    axes = figure.add_subplot()
    shown = fpr > 0  # FAR 0 has no place on a log axis
    axes.semilogx(fpr[shown], tpr[shown] * 100, color="tab:blue", linewidth=1.5)
    fars = np.array(sorted(tar))
    axes.plot(fars, [tar[far] * 100 for far in fars], "o", color="tab:red", markersize=4, label="TAR @ FAR")
    for far in fars:
        axes.annotate(
            f"{tar[far] * 100:.2f}", (far, tar[far] * 100), textcoords="offset points", xytext=(4, -10), fontsize=7
        )
    axes.set_xlim(min(fars.min(), 1e-6) / 2, 1)
    axes.set_ylim(0, 100.5)
    axes.set_xlabel("False accept rate")
    axes.set_ylabel("True accept rate (%)")
    axes.set_title(title)
    axes.grid(True, which="both", linewidth=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
