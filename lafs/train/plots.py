"""Pictures of a run: ``curves.png`` (loss and accuracy vs step) and ``landmarks.png`` (the landmarks on
held-out faces; on synthetic faces their mean layout and how they move with the pose)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402
from matplotlib.patches import Circle, Rectangle  # noqa: E402


def curves(log: list[dict], path: Path, title: str = "") -> None:
    """Training loss, training accuracy and verification accuracy (and, in pretraining, the student's and
    the view retrieval) against the optimizer step."""
    train = [r for r in log if "loss" in r]
    val = [r for r in log if "val_accuracy" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    if train and "acc" in train[0]:
        ax_acc.plot([r["step"] for r in train], [r["acc"] for r in train], label="training batches", color="tab:orange")
    if val:
        ax_acc.plot(
            [r["step"] for r in val], [r["val_accuracy"] for r in val], "o-", label="verification", color="tab:green"
        )
    # Pretraining also logs the student's verification and the label-free view retrieval.
    for key, label, style in (
        ("val_student_accuracy", "verification (student)", ("o--", "tab:olive")),
        ("val_view_retrieval", "view retrieval", ("s-", "tab:purple")),
        ("val_student_view_retrieval", "view retrieval (student)", ("s--", "tab:pink")),
    ):
        points = [r for r in val if key in r]
        if points:
            ax_acc.plot([r["step"] for r in points], [r[key] for r in points], style[0], label=label, color=style[1])
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.grid(alpha=0.3)
    if ax_acc.has_data():
        ax_acc.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def landmarks(model, images: torch.Tensor, path: Path, device=None, columns: int = 4) -> None:
    """Faces (float [N,3,112,112] in [-1, 1], or uint8 [N,112,112,3]) with the predicted landmarks
    of ``model.landmark_cnn`` and their P x P patch boxes."""
    from lafs.eval.embed import evaluation_mode, to_model_input

    device = device or next(model.parameters()).device
    batch = to_model_input(images, device)
    with evaluation_mode(model):
        points = model.landmark_cnn(batch).float().cpu()
    pictures = ((batch.float().cpu().permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1)
    patch = model.patch_size
    rows = (len(pictures) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, picture, pts in zip(axes.flat, pictures, points):
        ax.imshow(picture.numpy(), extent=(-0.5, picture.shape[1] - 0.5, picture.shape[0] - 0.5, -0.5))
        # SPEC: a patch centred on (x, y) samples x + a_i - 0.5 for a_i = -P/2 .. P/2 - 1.
        for x, y in pts.tolist():
            ax.add_patch(
                Rectangle(
                    (x - patch / 2 - 1.0, y - patch / 2 - 1.0),
                    patch,
                    patch,
                    fill=False,
                    linewidth=0.4,
                    edgecolor="yellow",
                    alpha=0.6,
                )
            )
        ax.scatter(pts[:, 0], pts[:, 1], s=3, c="red")
    fig.suptitle(f"predicted landmarks ({points.shape[1]}) and their {patch}x{patch} patches")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pose_examples(points, count: int = 7) -> list[tuple[int, str]]:
    """(index, why) of faces at the extremes of roll, yaw and shift, judged from their true five points [N,5,2]:
    the eye line's angle, the nose tip's offset from the eyes' midpoint, the eyes' midpoint."""
    import numpy as np

    points = np.asarray(points, dtype=np.float64)
    eyes = points[:, 1] - points[:, 0]
    middle = (points[:, 0] + points[:, 1]) / 2
    measures = (
        ("roll", np.degrees(np.arctan2(eyes[:, 1], eyes[:, 0])), "deg"),
        ("yaw: nose", points[:, 2, 0] - middle[:, 0], "px"),
        ("shift x", middle[:, 0], "px"),
        ("shift y", middle[:, 1], "px"),
    )
    chosen: list[tuple[int, str]] = []
    for name, values, unit in measures:
        deviation = values - values.mean()
        for index in (int(np.argmin(deviation)), int(np.argmax(deviation))):
            if index not in [i for i, _ in chosen]:
                chosen.append((index, f"{name} {deviation[index]:+.0f} {unit}"))
    return chosen[:count]


def landmark_tracking(results: dict, path: Path, patch: int = 8, columns: int = 4) -> None:
    """``landmarks.png`` of a run on synthetic faces: the mean layout of the predicted landmarks over the
    held-out tracking faces (circles: each landmark's spread across images) and faces of different pose
    with their landmarks (red), the mean layout (grey) joined to them, and the true five points (cyan).

    ``results``: :func:`lafs.eval.landmark_tracking.measure` with ``keep=True``; the faces come from its
    last (hardest) difficulty."""
    import numpy as np

    from lafs.eval.landmark_tracking import setting_name

    entry = list(results.values())[-1]
    images, points, marks = entry["images"], entry["points"], entry["landmarks"]
    mean = marks.mean(axis=0)
    radius = np.sqrt(marks.var(axis=0).sum(axis=1))
    examples = _pose_examples(points, 2 * columns - 1)
    rows = (1 + len(examples) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    extent = (-0.5, images.shape[2] - 0.5, images.shape[1] - 0.5, -0.5)
    ax = axes.flat[0]
    ax.imshow(images.mean(axis=0).astype(np.uint8), extent=extent)
    for (x, y), r in zip(mean, radius):
        ax.add_patch(Circle((x, y), max(r, 0.3), fill=False, linewidth=0.6, edgecolor="yellow"))
    ax.scatter(mean[:, 0], mean[:, 1], s=4, c="red")
    ax.scatter(points[:, :, 0].mean(0), points[:, :, 1].mean(0), s=30, c="cyan", marker="+", linewidths=0.8)
    ax.set_title(f"mean layout of {len(images)} faces\n(circles: spread, mean {entry['spread_px']:.1f} px)", fontsize=8)
    for ax, (index, why) in zip(axes.flat[1:], examples):
        ax.imshow(images[index], extent=extent)
        ax.plot(
            np.stack([mean[:, 0], marks[index, :, 0]]),
            np.stack([mean[:, 1], marks[index, :, 1]]),
            color="yellow",
            linewidth=0.7,
        )
        ax.scatter(mean[:, 0], mean[:, 1], s=2, c="0.6")
        ax.scatter(marks[index, :, 0], marks[index, :, 1], s=4, c="red")
        ax.scatter(points[index, :, 0], points[index, :, 1], s=30, c="cyan", marker="+", linewidths=0.8)
        ax.set_title(f"face {index}: {why}", fontsize=8)
    scores = ", ".join(f"{r['score']:.2f} at {setting_name(r)}" for r in results.values())
    fig.suptitle(
        f"predicted landmarks ({marks.shape[1]}, {patch}x{patch} patches) on held-out faces: red; "
        f"true five points: cyan\nlandmark tracking R^2 {scores}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
