"""``python -m lafs.eval verify|ijb``: the verification sets and IJB-B / IJB-C 1:1 from the command line.

    python -m lafs.eval verify --model runs/demo --data faces_webface_112x112 --targets lfw,cfp_fp,agedb_30
    python -m lafs.eval verify --model part_fvit.onnx --data faces_webface_112x112   # an exported model
    python -m lafs.eval ijb --model part_fvit_b.pt --root IJB_release/IJBC --target IJBC --out ijbc_eval

A mistake in the input (a missing or unreadable file, a path that holds no
model) is reported in one line on stderr, with exit status 1.
"""

import argparse
import json
import os
import pickle
import sys

import numpy as np
import torch

from .ijb import FARS, TARGETS, evaluate_ijb
from .plots import plot_roc
from .verification import load_bin, verify_model

DEFAULT_TARGETS = "lfw,cfp_fp,agedb_30"


class UsageError(Exception):
    """A user's mistake (missing or unreadable file, not a model), reported in one line."""


# What reading a bad file raises: the loaders' own errors (IncompatibleCheckpointError and
# verification.UnsafePickleError are a ValueError and an UnpicklingError) and the OS's.
_BAD_INPUT = (OSError, ValueError, pickle.UnpicklingError)


def load_model(path: str, device: torch.device, unsafe_pickle: bool = False):
    """The model to evaluate: a run folder, our checkpoint, an official state dict (``lafs.models.load_model``)
    or an exported ``.onnx`` file (run by onnxruntime); :class:`UsageError` if ``path`` holds no model."""
    from lafs.deploy import load_face_model

    try:
        return load_face_model(path, device=device, unsafe_pickle=unsafe_pickle)
    except _BAD_INPUT as err:
        raise UsageError(f"--model {path}: {err}") from err


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _write_json(data, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as file:
        json.dump(data, file, indent=2)
        file.write("\n")


def run_verify(args) -> dict:
    targets = [name.strip() for name in args.targets.split(",") if name.strip()]
    paths = {name: os.path.join(args.data, f"{name}.bin") for name in targets}
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing:
        raise UsageError(f"verification set(s) not found: {', '.join(missing)}")
    device = _device(args.device)
    model = load_model(args.model, device, args.unsafe_pickle)
    results = {}
    for name, path in paths.items():
        try:
            images, issame = load_bin(path)
        except _BAD_INPUT as err:
            raise UsageError(f"{path}: {err}" if path not in str(err) else str(err)) from err
        results[name] = verify_model(model, images, issame, batch_size=args.batch_size, device=device)
        result = results[name]
        print(
            f"[{name}] Accuracy-Flip: {result['accuracy'] * 100:.2f} ± {result['std'] * 100:.2f} %  "
            f"threshold {result['threshold']:.3f}  XNorm {result['xnorm']:.4f}  ({result['num_pairs']} pairs)",
            flush=True,
        )
    report = {"model": args.model, "data": args.data, "sets": results}
    _write_json(report, args.out)
    print(f"wrote {args.out}")
    return report


def run_ijb(args) -> dict:
    if not os.path.isdir(args.root):
        raise UsageError(f"--root {args.root}: no such folder")
    device = _device(args.device)
    model = load_model(args.model, device, args.unsafe_pickle)
    try:
        result = evaluate_ijb(
            model,
            args.root,
            args.target,
            batch_size=args.batch_size,
            device=device,
            num_workers=args.num_workers,
            block_elements=args.block_elements,
            progress=not args.no_progress,
        )
    except _BAD_INPUT as err:  # ijb's readers name the file and line of a missing or malformed input
        raise UsageError(str(err)) from err
    target = args.target.upper()
    os.makedirs(args.out, exist_ok=True)
    scores_path = os.path.join(args.out, f"{target.lower()}_scores.npy")
    table_path = os.path.join(args.out, f"{target.lower()}_tar_at_far.json")
    plot_path = os.path.join(args.out, f"{target.lower()}_roc.png")
    np.save(scores_path, result.scores)
    table = {f"{far:.0e}": round(tar * 100, 4) for far, tar in result.tar.items()}
    print(f"{target} 1:1 verification, {len(result.scores)} pairs, TAR (%) at FAR:")
    print("  ".join(f"{far:>7}" for far in table))
    print("  ".join(f"{tar:7.2f}" for tar in table.values()))
    report = {
        "model": args.model,
        "root": args.root,
        "target": target,
        "num_pairs": len(result.scores),
        "tar_at_far_percent": table,
    }
    _write_json(report, table_path)
    plot_roc(result.fpr, result.tpr, result.tar, plot_path, f"{target} 1:1 ROC")
    print(f"wrote {scores_path}, {table_path}, {plot_path}")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lafs.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    model_help = (
        "a lafs.train run folder, one of our checkpoint files, an official Part fViT state dict, or an "
        "exported .onnx file (python -m lafs.export; run by onnxruntime)"
    )
    unsafe_help = (
        "UNSAFE: load a --model file with full pickle even when it names globals outside the allow-list "
        "(lafs.models.safe_load); such a file can run any code on this machine. Only for files you trust"
    )
    device_help = "torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ... (default: auto)"

    verify = commands.add_parser(
        "verify",
        help="accuracy with flip (10-fold) on the .bin verification sets",
        description="Accuracy with flip test, mean ± std over 10 folds, best threshold "
        "and XNorm on insightface's .bin verification sets.",
    )
    verify.add_argument("--model", required=True, help=model_help)
    verify.add_argument("--unsafe-pickle", action="store_true", help=unsafe_help)
    verify.add_argument("--data", required=True, help="folder holding <name>.bin for every target")
    verify.add_argument(
        "--targets",
        default=DEFAULT_TARGETS,
        help=f"comma-separated set names, e.g. lfw,cfp_fp,agedb_30,calfw,cplfw (default: {DEFAULT_TARGETS})",
    )
    verify.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per batch; each forward pass also embeds their flips (default: 64)",
    )
    verify.add_argument("--device", default="auto", help=device_help)
    verify.add_argument(
        "--out", default="verification.json", help="JSON file for the results (default: verification.json)"
    )
    verify.set_defaults(run=run_verify)

    ijb = commands.add_parser(
        "ijb",
        help="IJB-B / IJB-C 1:1 verification: TAR at FAR 1e-6 .. 1e-1",
        description="IJB-B / IJB-C 1:1 verification: TAR at FAR "
        + ", ".join(f"{far:.0e}" for far in FARS)
        + "; writes the pair scores (.npy), the table (JSON) and the ROC (PNG).",
    )
    ijb.add_argument("--model", required=True, help=model_help)
    ijb.add_argument("--unsafe-pickle", action="store_true", help=unsafe_help)
    ijb.add_argument("--root", required=True, help="dataset root holding meta/ and loose_crop/ (e.g. IJB_release/IJBC)")
    ijb.add_argument("--target", required=True, type=str.upper, choices=TARGETS, help="IJBB or IJBC")
    ijb.add_argument("--out", default="ijb_eval", help="output folder (default: ijb_eval)")
    ijb.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="images per batch; each forward pass also embeds their flips (default: 128)",
    )
    ijb.add_argument("--device", default="auto", help=device_help)
    ijb.add_argument(
        "--num-workers",
        type=int,
        default=4,
        help="image decoding / alignment worker processes (0: in the main process; default: 4)",
    )
    ijb.add_argument(
        "--block-elements",
        type=int,
        default=1 << 26,
        help="pair scoring computes template similarities in blocks of at most this many entries "
        "(4 bytes each), bounding memory (default: 67108864, 256 MiB)",
    )
    ijb.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ijb.set_defaults(run=run_ijb)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        args.run(args)
    except UsageError as exc:
        print(f"lafs.eval: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
