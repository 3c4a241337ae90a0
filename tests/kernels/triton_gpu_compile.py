"""Compile every Triton kernel of lafs_kernels for Ampere (sm_80) or Hopper (sm_90) without a GPU.

The interpreter (TRITON_INTERPRET=1, how the suite runs the kernels here) never lowers a kernel to
PTX, so type errors, layouts the compiler rejects and tiles that do not fit in shared memory would first
show on a GPU. ``triton.compile`` with an explicit target runs the whole pipeline (TTIR -> TTGIR -> LLVM IR
-> PTX -> cubin through the ptxas bundled with Triton) on a CPU machine.

Each variant is a kernel specialised as its launcher specialises it on a CUDA device (dtypes, constexprs,
num_warps). Prints one JSON line per variant: name, ok, error, shared memory bytes, PTX size, and the
cubin's registers and spills when ``cuobjdump`` is found. Must run without TRITON_INTERPRET (with it,
``triton.jit`` builds interpreter functions that cannot be compiled); the test runs it in a subprocess.

usage: python tests/kernels/triton_gpu_compile.py [--arch 90|80] [--only NAME_SUBSTRING]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_gpu_compile: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lafs_kernels.triton import dino_colour as colour  # noqa: E402
from lafs_kernels.triton import landmark_patch_gather as gather  # noqa: E402
from lafs_kernels.triton import margin_softmax as margin  # noqa: E402

TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CUDA = torch.device("cuda")


def _signature(fn, types: dict, constexprs: dict) -> dict:
    """Every argument of ``fn`` typed: pointers and scalars from ``types``, the rest constexpr."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        else:
            raise KeyError(f"{fn.__name__}: no type for argument {name}")
    return signature


def gather_variants():
    """The patch gather as the demo and the paper run it: P=8, C=3 (F=192), with and without a view affine."""
    patch, channels = 8, 3
    block_k, block_f, _ = gather._launch_config(1024, patch * patch * channels)
    scalars = {
        n: "i32" for n in ("num_patches", "K", "B", "C", "H", "W", "stride_b", "stride_c", "stride_h", "stride_w")
    }
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = TRITON_TYPE[dtype]
        for affine in (False, True):
            suffix = "_affine" if affine else ""
            const = {"P": patch, "BLOCK_K": block_k, "BLOCK_F": block_f, "AFFINE": affine}
            types = dict(scalars, image_ptr=f"*{t}", centres_ptr="*fp32", affine_ptr="*fp32", tokens_ptr=f"*{t}")
            yield f"gather_forward_{t}{suffix}", gather._forward_kernel, types, const, {}
            for need_image, need_centres in ((True, True), (True, False), (False, True)):
                const = {
                    "P": patch,
                    "BLOCK_K": block_k,
                    "BLOCK_F": block_f,
                    "AFFINE": affine,
                    "NEED_IMAGE_GRAD": need_image,
                    "NEED_CENTRE_GRAD": need_centres,
                }
                types = dict(
                    scalars,
                    grad_tokens_ptr=f"*{t}",
                    image_ptr=f"*{t}",
                    centres_ptr="*fp32",
                    affine_ptr="*fp32",
                    grad_image_ptr="*fp32",
                    grad_centres_ptr="*fp32",
                )
                yield (
                    f"gather_backward_{t}_image{int(need_image)}_centres{int(need_centres)}{suffix}",
                    gather._backward_kernel,
                    types,
                    const,
                    {"num_warps": gather.BACKWARD_NUM_WARPS},
                )


def margin_variants():
    """The margin softmax with its CUDA tiles; T=1 (hard labels) and T=2 (mixup's two labels)."""
    scalars = {n: "i32" for n in ("B", "C", "D", "stride_x", "stride_w", "num_col_blocks")}
    scalars["s"] = "fp32"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = TRITON_TYPE[dtype]
        block_b, block_c, block_d, num_warps = margin._blocks(CUDA)
        options = {"num_warps": num_warps, **margin.COMPILE_OPTIONS}
        for labels in (1, 2):
            const = {
                "T": labels,
                "BLOCK_B": block_b,
                "BLOCK_C": block_c,
                "BLOCK_D": block_d,
                "IEEE": dtype == torch.float32,
                "UPCAST": False,
            }
            forward = dict(
                scalars,
                X=f"*{t}",
                W=f"*{t}",
                INV_X="*fp32",
                LABELS="*i64",
                TARGET="*fp32",
                OUT_MAX="*fp32",
                OUT_SUM="*fp32",
                OUT_LOGIT_SUM="*fp32",
                OUT_BEST="*fp32",
                OUT_ARG="*i32",
            )
            yield f"margin_forward_{t}_T{labels}", margin._forward_kernel, forward, const, options
            backward = dict(
                scalars,
                X=f"*{t}",
                W=f"*{t}",
                INV_X="*fp32",
                LABELS="*i64",
                TARGET="*fp32",
                DERIV="*fp32",
                LSE="*fp32",
                GRAD_LSE="*fp32",
                GRAD_TARGET="*fp32",
                GRAD_LOGIT_SUM="*fp32",
                G=f"*{t}",
                RADIAL="*fp32",
            )
            yield f"margin_backward_{t}_T{labels}", margin._backward_kernel, backward, const, options


def colour_variants():
    """DINO's colour chain on token pixels (the contrast's mean from view samples or the pixels: the same kernel),
    with and without pixel weights (the view builder's edge weights)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = TRITON_TYPE[dtype]
        types = dict(
            pixels_ptr=f"*{t}",
            mean_pixels_ptr=f"*{t}",
            out_ptr=f"*{t}",
            factors_ptr="*fp32",
            order_ptr="*i32",
            flags_ptr="*i8",
            weights_ptr=f"*{t}",
            T="i32",
            M="i32",
        )
        for weights in (False, True):
            constexprs = {"HAS_WEIGHTS": weights, "BLOCK": colour.BLOCK}
            yield f"dino_colour_{t}{'_weighted' if weights else ''}", colour._colour_kernel, types, constexprs, {}


def _cuobjdump() -> str | None:
    """Triton's bundled cuobjdump, else the CUDA toolkit's."""
    import triton.backends.nvidia as nvidia_backend

    candidates = (
        os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "cuobjdump"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
        shutil.which("cuobjdump") or "",
    )
    return next((p for p in candidates if p and os.access(p, os.X_OK)), None)


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread, stack and local (spill) bytes per thread from ``cuobjdump --dump-resource-usage``
    (empty without the tool)."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}


def compile_variant(name, fn, types, constexprs, options, arch: int = 90) -> dict:
    try:
        source = ASTSource(fn=fn, signature=_signature(fn, types, constexprs), constexprs=constexprs)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # the point is to report it
        cause = f" (caused by {type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
        return {"name": name, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[-1200:]}{cause[:1500]}"}
    cubin = kernel.asm.get("cubin", b"")
    return {
        "name": name,
        "ok": bool(cubin),
        "error": None if cubin else "no cubin",
        "shared": kernel.metadata.shared,
        "num_warps": kernel.metadata.num_warps,
        "ptx_chars": len(kernel.asm.get("ptx", "")),
        **_resource_usage(cubin),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=(80, 90), help="compute capability x 10")
    parser.add_argument("--only", default="", help="compile only variants whose name contains this")
    args = parser.parse_args(argv)
    failed = 0
    for variant in (*gather_variants(), *margin_variants(), *colour_variants()):
        if args.only not in variant[0]:
            continue
        result = compile_variant(*variant, arch=args.arch)
        failed += not result["ok"]
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
