"""The same public call timed in two checkouts of this repository, in alternating subprocesses.

    python benchmarks/checkout_before_after.py --before /path/to/old/checkout [--case margin] [--rounds 7]

For changes that should not change speed (a refactor): each checkout must have its extension built in
place (``LAFS_KERNELS_SKIP_CUDA=1 python setup.py build_ext --inplace`` there); every round runs one
subprocess per checkout (the order alternates between rounds, ABBA), each importing its own
``lafs_kernels`` / ``lafs`` through ``PYTHONPATH``, warming up and timing the case with one thread.
Printed: per checkout the median time, and the median over rounds of before / after with its range.

Cases (public signatures that both checkouts share):

* ``margin``: ``margin_softmax_cross_entropy`` forward + backward, CosFace (s=64, m3=0.4 given explicitly),
  B=256, D=512, C=100,000, float32; timed with the thread's CPU time, so a busy machine's waiting is left out.
* ``supervised``: ``python -m lafs.train supervised`` of the demo recipe for ``--steps`` steps (one thread,
  no plots, no validation); the run's own images/s (wall clock: needs an idle machine).
* ``views`` / ``pretrain_step``: our path's ``MultiViewBuilder`` call (``per_image`` landmarks), or its whole DINO
  step, in ``bench_pretrain_views.py``'s ``--pretrain-case`` ("paper layout" or "default run"), built by each
  checkout's own benchmark module; thread CPU time, as ``margin``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MARGIN = """
import json, time, torch, lafs_kernels
torch.set_num_threads(1)
assert lafs_kernels.__file__.startswith({root!r}), lafs_kernels.__file__
from lafs_kernels import margin_softmax_cross_entropy as loss_fn
g = torch.Generator().manual_seed(0)
emb = torch.randn(256, 512, generator=g, requires_grad=True)
weight = (0.01 * torch.randn(100_000, 512, generator=g)).requires_grad_()
labels = torch.randint(0, 100_000, (256,), generator=g)
def call():
    loss = loss_fn(emb, weight, labels, s=64.0, m1=1.0, m2=0.0, m3=0.4)
    torch.autograd.grad(loss, (emb, weight))
call()
"""


PRETRAIN = """
import json, sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {benchmarks!r})
from _allocator import fix_malloc_thresholds
fix_malloc_thresholds()
import bench_pretrain_views as bench
import lafs_kernels
assert lafs_kernels.__file__.startswith({root!r}), lafs_kernels.__file__
trainer, images = bench.build_trainer("per_image", {case!r})
call = bench.{what}_case(trainer, images)
for _ in range(2):
    call()
"""


# Appended to each case's code, which defines call() and warms it up: the median thread CPU time of {calls} calls.
TIMED_CALLS = """
times = []
for _ in range({calls}):
    start = time.thread_time()
    call()
    times.append(time.thread_time() - start)
print(json.dumps({{"seconds": sorted(times)[len(times) // 2]}}))
"""


def run_margin(root: Path, calls: int) -> float:
    return _run_code(root, (MARGIN + TIMED_CALLS).format(root=str(root), calls=calls))


def run_pretrain(root: Path, what: str, case: str, calls: int) -> float:
    code = (PRETRAIN + TIMED_CALLS).format(
        benchmarks=str(root / "benchmarks"), root=str(root), case=case, what=what, calls=calls
    )
    return _run_code(root, code)


def _run_code(root: Path, code: str) -> float:
    out = _checked(
        subprocess.run([sys.executable, "-c", code], env=_env(root), cwd=root, capture_output=True, text=True)
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def run_supervised(root: Path, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        batch = 32
        overrides = [
            f"optim.epochs={steps * batch / 3072:.6f}",
            "train.plots=false",
            "val.every_steps=0",
            "val.pairs=20",
            "train.cpu_threads=1",
        ]
        cmd = [sys.executable, "-m", "lafs.train", "supervised", "--out", tmp, *overrides]
        _checked(subprocess.run(cmd, env=_env(root), cwd=root, capture_output=True, text=True))
        summary = json.loads((Path(tmp) / "summary.json").read_text())
        return 1.0 / summary["images_per_s"]  # seconds per image


def _checked(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, done.args[:4]))} ... failed:\n{done.stderr[-3000:]}")
    return done


def _env(root: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the other checkout (extension built in place)")
    parser.add_argument("--after", type=Path, default=ROOT, help="default: this checkout")
    parser.add_argument("--case", choices=("margin", "supervised", "views", "pretrain_step"), default="margin")
    parser.add_argument("--pretrain-case", default="paper layout", help="views / pretrain_step: the layout")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per subprocess (median kept)")
    parser.add_argument("--steps", type=int, default=96, help="supervised: training steps per subprocess")
    args = parser.parse_args(argv)

    runs = {
        "margin": lambda root: run_margin(root, args.calls),
        "supervised": lambda root: run_supervised(root, args.steps),
        "views": lambda root: run_pretrain(root, "builder", args.pretrain_case, args.calls),
        "pretrain_step": lambda root: run_pretrain(root, "step", args.pretrain_case, args.calls),
    }
    run = runs[args.case]
    times = {"before": [], "after": []}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for name in order:
            times[name].append(run(args.before if name == "before" else args.after))
        ratio = times["before"][-1] / times["after"][-1]
        print(f"round {r}: before {times['before'][-1]:.4g} s, after {times['after'][-1]:.4g} s, ratio {ratio:.3f}")
    load.append(os.getloadavg()[0])
    ratios = sorted(b / a for b, a in zip(times["before"], times["after"]))
    unit = "s per image (wall clock)" if args.case == "supervised" else "s per call (thread CPU time)"
    print(
        f"{args.case}: before {statistics.median(times['before']):.4g} / after {statistics.median(times['after']):.4g} "
        f"{unit}; before/after median {statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f}, "
        f"{args.rounds} rounds; >1: after is faster); load average {load[0]:.2f} -> {load[1]:.2f}"
    )


if __name__ == "__main__":
    main()
