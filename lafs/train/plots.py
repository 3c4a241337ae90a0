"""Pictures of a run: ``curves.png`` (loss and accuracy vs step) and ``landmarks.png``."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


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
        ax_acc.plot([r["step"] for r in train], [r["acc"] for r in train], label="training batches",
                    color="tab:orange")
    if val:
        ax_acc.plot([r["step"] for r in val], [r["val_accuracy"] for r in val], "o-", label="verification",
                    color="tab:green")
    # Pretraining also logs the student's verification and the label-free view retrieval.
    for key, label, style in (("val_student_accuracy", "verification (student)", ("o--", "tab:olive")),
                              ("val_view_retrieval", "view retrieval", ("s-", "tab:purple")),
                              ("val_student_view_retrieval", "view retrieval (student)", ("s--", "tab:pink"))):
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
            ax.add_patch(Rectangle((x - patch / 2 - 1.0, y - patch / 2 - 1.0), patch, patch, fill=False,
                                   linewidth=0.4, edgecolor="yellow", alpha=0.6))
        ax.scatter(pts[:, 0], pts[:, 1], s=3, c="red")
    fig.suptitle(f"predicted landmarks ({points.shape[1]}) and their {patch}x{patch} patches")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
