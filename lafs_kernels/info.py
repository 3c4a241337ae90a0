"""``python -m lafs_kernels.info``: versions, build record, and per op which
backends can run on this machine and why the others cannot."""

from __future__ import annotations

import json
import platform

import torch

from . import _dispatch, _extension


def collect() -> dict:
    """Everything ``info`` prints, as a dict (also saved with benchmark results)."""
    import lafs_kernels  # registers the ops' backends

    triton_reason = _dispatch.triton_missing_reason()
    triton_version = None
    if triton_reason is None:
        import triton

        triton_version = triton.__version__
    loaded, ext_reason = _extension.load()
    return {
        "lafs_kernels": lafs_kernels.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version or f"unavailable: {triton_reason}",
        "triton_interpret": _dispatch.triton_interpret(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "extension_loaded": loaded if loaded else f"no: {ext_reason}",
        "extension_cuda_runtime": _extension.cuda_runtime_version(),
        "build_info": _extension.build_info(),
        "ops": {
            op: {device: backends.availability(device) for device in ("cpu", "cuda")}
            for op, backends in sorted(_dispatch.REGISTRY.items())
        },
    }


def format_report(info: dict) -> str:
    lines = []
    for key in (
        "lafs_kernels",
        "python",
        "platform",
        "torch",
        "torch_cuda",
        "triton",
        "triton_interpret",
        "cuda_devices",
        "extension_loaded",
        "extension_cuda_runtime",
    ):
        lines.append(f"{key:>24}: {info[key]}")
    lines.append(f"{'build_info':>24}: {json.dumps(info['build_info'])}")
    for op, per_device in info["ops"].items():
        lines.append(f"\n{op}")
        for device, backends in per_device.items():
            for name, reasons in backends.items():
                status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
                lines.append(f"  {device:>5} {name:>8}  {status}")
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lafs_kernels.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else format_report(info))


if __name__ == "__main__":
    main()
