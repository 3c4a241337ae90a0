"""``python -m lafs.export RUN_OR_CHECKPOINT OUT.onnx|OUT.pt2``: a trained Part fViT for serving.

    python -m lafs.export runs/demo/supervised part_fvit.onnx          # ONNX, float32, dynamic batch
    python -m lafs.export part_fvit_b.pt part_fvit_b_fp16.onnx --fp16   # official weights, transformer in float16
    python -m lafs.export runs/demo/supervised part_fvit.pt2           # torch.export program (AOTInductor)

The ONNX file runs unchanged in insightface (``insightface.model_zoo.get_model(OUT.onnx).get_feat([face_bgr, ...])``),
in onnxruntime, and in ``lafs.FaceEmbedder`` / ``python -m lafs.eval verify --model OUT.onnx``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys

import torch

from lafs.models.checkpoint import atomic_write

from .to_onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, ExportCheckError

FORMATS = (".onnx", ".pt2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lafs.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model", help="a lafs.train run folder, one of our checkpoint files, or an official Part fViT state dict"
    )
    parser.add_argument("out", help="output file: .onnx (ONNX graph) or .pt2 (torch.export program)")
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="ONNX only: the transformer in float16 (input, landmark CNN, landmark coordinates, "
        "gather and output stay float32)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {MIN_OPSET} (GridSample) to {MAX_OPSET} (default: {DEFAULT_OPSET})",
    )
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="ONNX only: skip running the written file through onnxruntime against the PyTorch model",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device to trace on (default: cpu); a .pt2 program runs on the device it was exported on",
    )
    return parser


class UsageError(Exception):
    """A mistake in the command line or its files, reported in one line."""


def load_or_explain(path: str, device: str):
    """``lafs.models.load_model(path)``; a file or folder that is not a model raises :class:`UsageError`."""
    from lafs.models import load_model

    try:
        torch_device = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"--device {device!r}: {err}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: no CUDA device is available here")
    try:
        return load_model(path, device=torch_device)
    except (OSError, ValueError, pickle.UnpicklingError) as err:  # IncompatibleCheckpointError is a ValueError
        raise UsageError(str(err)) from err


def run(args) -> str:
    suffix = next((s for s in FORMATS if args.out.lower().endswith(s)), None)
    if suffix is None:
        raise UsageError(f"output {args.out!r}: name it .onnx (ONNX graph) or .pt2 (torch.export program)")
    if suffix == ".pt2" and (args.fp16 or args.opset != DEFAULT_OPSET):
        raise UsageError("--fp16 and --opset apply to ONNX output only")
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise UsageError(
            f"--opset {args.opset}: GridSample needs opset {MIN_OPSET} or later, and torch's exporter writes up to "
            f"{MAX_OPSET}"
        )
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {args.out}: no folder {parent}")
    if os.path.isdir(args.out):
        raise UsageError(f"cannot write {args.out}: it is a folder")
    model = load_or_explain(args.model, args.device)
    if suffix == ".onnx":
        from .to_onnx import export_onnx

        result = export_onnx(model, args.out, half=args.fp16, opset=args.opset, check=not args.no_check)
        check = (
            ""
            if result.min_cosine is None
            else f"; onnxruntime vs PyTorch: per-face cosine >= {result.min_cosine:.7f}, "
            f"max abs difference {result.max_abs_error:.2e}"
        )
        return f"wrote {result.path} (ONNX opset {result.opset}, {result.precision}, dynamic batch{check})"

    from .program import export_program

    program = export_program(model)
    try:
        atomic_write(args.out, lambda file: torch.export.save(program, file))  # a reader never sees half a file
    except RuntimeError as err:  # torch's writer; an OSError is reported by main
        raise UsageError(f"cannot write {args.out}: {err}") from None
    return f"wrote {args.out} (torch.export program, dynamic batch, {args.device})"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            print(run(args))
        except OSError as err:  # the model loaded (load_or_explain): the output cannot be written
            raise UsageError(f"cannot write {args.out}: {err}") from err
    except (UsageError, ExportCheckError) as exc:
        print(f"lafs.export: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
