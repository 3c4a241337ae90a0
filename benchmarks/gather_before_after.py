"""CPU gather kernels of a git revision ("before") against this checkout ("after"), interleaved.

    PYTHONPATH=$PWD python benchmarks/gather_before_after.py [--before REV] [--rounds 15] [--threads 2]

Builds ``csrc/cpu/landmark_patch_gather.cpp`` of ``REV`` (default: the commit before the
issue-18 rewrite) with ``torch.utils.cpp_extension.load`` into a temporary directory, under
its own op namespace (``lafs_gather_before``), so both versions run in one process; the
package itself only ever holds the current kernels.

Shapes (issue 18): B=64, 112x112 float32 RGB, L=196 landmarks (some off the image), P=8;
K=196 (all landmarks) and K=36 (drawn with replacement, the local views).  Modes:
``fwd`` (the raw forward kernel), ``bwd`` (the raw backward kernel, image and landmark
gradients, deterministic), and ``op fwd`` / ``op fwd+bwd`` (the public function in
training mode, image and landmarks requiring grad, with its Python wrapper and the
landmark selection).  Each round times before and after back to back (the order alternates
between rounds, ABBA) and records the ratio before/after; printed: the median ratio,
its spread (min..max and the quartiles) over rounds, the median times, and the load
average before and after.

``--clock cpu`` (with ``--threads 1``) times with the thread's CPU time instead of the wall clock: on a
loaded machine a process waits for a core longer than it computes, and two OpenMP threads wait for each
other at every barrier, so wall-clock ratios there mostly measure the other jobs.  CPU time still includes
the page faults and the cache misses the other jobs cause, but not the waiting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from _allocator import fix_malloc_thresholds

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "csrc/cpu/landmark_patch_gather.cpp"
DEFAULT_BEFORE = "e0085da"  # main before the issue-18 / issue-21 gather rewrite
NAMESPACE = "lafs_gather_before"
SCHEMAS = f"""
TORCH_LIBRARY({NAMESPACE}, m) {{
  m.def("_patch_gather_fwd(Tensor image, Tensor centres, int patch_size) -> Tensor");
  m.def("_patch_gather_bwd(Tensor grad_tokens, Tensor image, Tensor centres, int patch_size, "
        "bool need_image_grad, bool need_centre_grad, bool deterministic) -> (Tensor, Tensor)");
}}
"""
B, L, P, SIZE = 64, 196, 8, 112


def build_before(rev: str):
    """The ``before`` kernels as torch.ops.lafs_gather_before (compiled once per revision)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:{KERNEL}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    if "view_affine" in source:
        raise SystemExit(f"{rev} already has the new kernel signature; pick an older revision")
    source = source.replace("TORCH_LIBRARY_IMPL(lafs_kernels,", f"TORCH_LIBRARY_IMPL({NAMESPACE},") + SCHEMAS
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    build_dir = Path(tempfile.gettempdir()) / f"lafs_gather_before_{digest}"
    build_dir.mkdir(exist_ok=True)
    path = build_dir / "gather_before.cpp"
    path.write_text(source)
    from torch.utils.cpp_extension import load

    load(
        name=f"gather_before_{digest}",
        sources=[str(path)],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, NAMESPACE)


def make_inputs(K: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, SIZE, SIZE, generator=gen) * 2 - 1
    landmarks = torch.rand(B, L, 2, generator=gen) * (SIZE + 8) - 4
    index = torch.randint(0, L, (B, K), generator=gen) if K != L else None
    grad = torch.randn(B, K, P * P * 3, generator=gen)
    return image, landmarks, index, grad


def cases(before_ops, K: int):
    """{mode: (before_fn, after_fn)} on the same inputs."""
    from lafs_kernels import landmark_patch_gather
    from lafs_kernels.ops import landmark_patch_gather as module

    after_ops = torch.ops.lafs_kernels
    image, landmarks, index, grad = make_inputs(K)
    centres = landmarks if index is None else landmarks.gather(1, index[..., None].expand(-1, -1, 2))
    centres = centres.contiguous()

    def raw(ops):
        return {
            "fwd": lambda: ops._patch_gather_fwd(image, centres, P),
            "bwd": lambda: ops._patch_gather_bwd(grad, image, centres, P, True, True, True),
        }

    def op(ops):
        def fwd_kernel(backend, image, centres, patch_size, view_affine=None):
            return ops._patch_gather_fwd(image, centres, patch_size)

        def bwd_kernel(
            backend, grad_tokens, image, centres, patch_size, need_image, need_centre, det, view_affine=None
        ):
            return ops._patch_gather_bwd(grad_tokens, image, centres, patch_size, need_image, need_centre, det)

        im = image.clone().requires_grad_()
        lm = landmarks.clone().requires_grad_()

        def with_kernels(fn):
            def run():
                saved = module._forward, module._backward
                module._forward, module._backward = fwd_kernel, bwd_kernel
                try:
                    return fn()
                finally:
                    module._forward, module._backward = saved

            return run

        forward = lambda: landmark_patch_gather(im, lm, P, index=index, backend="cpu")  # noqa: E731
        return {
            "op fwd": with_kernels(forward),
            "op fwd+bwd": with_kernels(lambda: torch.autograd.grad(forward(), (im, lm), grad)),
        }

    before = {**raw(before_ops), **op(before_ops)}
    after = {**raw(after_ops), **op(after_ops)}
    return {mode: (before[mode], after[mode]) for mode in before}


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_once(fn, iterations: int, clock=time.perf_counter) -> float:
    start = clock()
    for _ in range(iterations):
        fn()
    return (clock() - start) / iterations


def compare(before_fn, after_fn, rounds: int, budget_s: float, clock=time.perf_counter):
    """Per-round (before_s, after_s), the two timed back to back, order alternating."""
    for fn in (before_fn, after_fn, before_fn, after_fn):
        fn()  # warm-up
    single = max(time_once(before_fn, 1), time_once(after_fn, 1), 1e-6)
    iterations = max(1, int(budget_s / rounds / 2 / single))
    pairs = []
    for r in range(rounds):
        if r % 2 == 0:
            b = time_once(before_fn, iterations, clock)
            a = time_once(after_fn, iterations, clock)
        else:
            a = time_once(after_fn, iterations, clock)
            b = time_once(before_fn, iterations, clock)
        pairs.append((b, a))
    return pairs, iterations


def check_same_results(before_ops, K: int):
    """The before and after kernels agree (a wrong kernel must not be timed as a speed-up)."""
    image, landmarks, index, grad = make_inputs(K, seed=1)
    centres = (landmarks if index is None else landmarks.gather(1, index[..., None].expand(-1, -1, 2))).contiguous()
    new, old = torch.ops.lafs_kernels, before_ops
    torch.testing.assert_close(
        new._patch_gather_fwd(image, centres, P), old._patch_gather_fwd(image, centres, P), rtol=0, atol=0
    )
    gi_new, gc_new = new._patch_gather_bwd(grad, image, centres, P, True, True, True)
    gi_old, gc_old = old._patch_gather_bwd(grad, image, centres, P, True, True, True)
    torch.testing.assert_close(gi_new, gi_old, rtol=0, atol=0)
    torch.testing.assert_close(gc_new, gc_old, rtol=1e-5, atol=1e-4)


def quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return q[0], q[2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=DEFAULT_BEFORE, help="git revision of the 'before' kernel")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budget-s", type=float, default=6.0, help="seconds of timing per case (both versions)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--modes", default="fwd,bwd,op fwd,op fwd+bwd")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall clock, or the thread's CPU time (needs --threads 1)",
    )
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: use it with --threads 1")
    torch.set_num_threads(args.threads)
    malloc = fix_malloc_thresholds()
    from lafs_kernels import _extension

    _extension.load()
    before_ops = build_before(args.before)
    modes = [m.strip() for m in args.modes.split(",")]
    results = []
    print(
        f"before = {args.before}:{KERNEL}, after = this checkout; {args.threads} threads, {args.rounds} rounds, "
        f"{args.clock} clock; malloc: {malloc}; ratio = before / after time (>1: after is faster)"
    )
    for K in (196, 36):
        check_same_results(before_ops, K)
        for mode, (before_fn, after_fn) in cases(before_ops, K).items():
            if mode not in modes:
                continue
            load_start = os.getloadavg()[0]
            pairs, iterations = compare(before_fn, after_fn, args.rounds, args.budget_s, CLOCKS[args.clock])
            load_end = os.getloadavg()[0]
            ratios = [b / a for b, a in pairs]
            q1, q3 = quartiles(ratios)
            row = {
                "K": K,
                "mode": mode,
                "ratio_median": statistics.median(ratios),
                "ratio_q1": q1,
                "ratio_q3": q3,
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "before_ms": 1e3 * statistics.median(b for b, _ in pairs),
                "after_ms": 1e3 * statistics.median(a for _, a in pairs),
                "rounds": args.rounds,
                "iterations": iterations,
                "load": [load_start, load_end],
            }
            results.append(row)
            print(
                f"K={K:3d} {mode:11s} ratio {row['ratio_median']:.2f}x (quartiles {q1:.2f}-{q3:.2f}, "
                f"range {row['ratio_min']:.2f}-{row['ratio_max']:.2f})  before {row['before_ms']:.2f} ms  "
                f"after {row['after_ms']:.2f} ms  load {load_start:.2f}->{load_end:.2f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "before": args.before,
                    "threads": args.threads,
                    "clock": args.clock,
                    "malloc": malloc,
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
