"""What every benchmark shares: device and shape selection, the timer, and
``measure``, which times one case with pytest-benchmark and records its peak
memory and description in ``benchmark.extra_info`` (report.py reads them).

A *case* is a zero-argument function that runs the measured work once
(forward, or forward plus backward) on inputs built beforehand, and returns
the tensors the caller asked for (the output, or the gradients of the
inputs). Those returned tensors are not counted as added memory.

Environment:
  LAFS_BENCH_SMOKE=1      tiny shapes, one round, memory measured in-process:
                          checks that the benchmarks still run (seconds).
  LAFS_BENCH_DEVICE       cpu or cuda (default: cuda when available).
  LAFS_BENCH_BUDGET_S     seconds of timed rounds per case (default 2 on CPU, 1 on GPU).
  LAFS_BENCH_NO_COMPILE=1 skip the torch.compile baselines.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional, Sequence

import torch

import _memory

SMOKE = os.environ.get("LAFS_BENCH_SMOKE", "0") not in ("", "0")
COMPILE = os.environ.get("LAFS_BENCH_NO_COMPILE", "0") in ("", "0")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bench_device() -> str:
    device = os.environ.get("LAFS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("LAFS_BENCH_DEVICE=cuda but no CUDA device is available")
    return device


DEVICE = bench_device()


def device_name(device: str = DEVICE) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def synchronized_timer() -> float:
    """perf_counter after waiting for queued GPU work, so a round times what it launched."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def pick(cpu, gpu, smoke):
    """The parameter list for the current mode (smoke, CPU or GPU)."""
    if SMOKE:
        return smoke
    return gpu if DEVICE == "cuda" else cpu


def grads_of(output: torch.Tensor, inputs: Sequence[torch.Tensor], grad_output=None) -> tuple:
    """Backward without accumulating into ``.grad`` (so repeated rounds allocate the same)."""
    return torch.autograd.grad(output, inputs, grad_output)


def round_budget_s(device: str) -> float:
    """Seconds of timed rounds per case (``LAFS_BENCH_BUDGET_S``; 2 on CPU, 1 on GPU)."""
    return float(os.environ.get("LAFS_BENCH_BUDGET_S", "1" if device == "cuda" else "2"))


def _plan(case: Callable, device: str, warmed_up: bool) -> tuple[int, int]:
    """(rounds, iterations per round) that fill the time budget (after a warm-up call unless ``warmed_up``)."""
    if SMOKE:
        return 1, 1
    if not warmed_up:
        case()  # lazy initialisation, autotuning, compilation
    start = synchronized_timer()
    case()
    once = max(synchronized_timer() - start, 1e-7)
    # A GPU round runs several calls between two synchronisations so launch
    # latency overlaps and the sync costs little.
    min_round_s = 0.02 if device == "cuda" else 0.0
    iterations = max(1, math.ceil(min_round_s / once))
    budget = round_budget_s(device)
    rounds = int(min(100, max(3, budget // (once * iterations))))
    return rounds, iterations


def measure(benchmark, *, op: str, impl: str, ours: bool, mode: str, dtype: str, shape: dict,
            build: Callable[[], Callable], memory_spec: dict, group: Optional[str] = None,
            work: Optional[dict] = None, warmed_up: bool = False) -> None:
    """Time ``build()``'s case with pytest-benchmark and record memory and facts.

    op, impl   what is measured ("landmark_patch_gather", "fused-cpu", ...)
    ours       True for this project's implementation, False for a baseline
    mode       "fwd" or "fwd+bwd"
    shape      the shape parameters, e.g. {"B": 64, "L": 196, "K": 196}
    build      returns the case (inputs are built once, outside the timing)
    memory_spec  {"module": bench file, "kwargs": {...}}: ``build_case(**kwargs)``
               of that file rebuilds the same case in a fresh process (CPU
               memory); None: memory is not measured
    work       {"bytes": minimal bytes moved, "flops": operations} for rates
    warmed_up  the caller has already run the case once (no warm-up call needed)
    """
    device = DEVICE
    case = build()
    rounds, iterations = _plan(case, device, warmed_up)
    benchmark.group = group or " ".join([op, *(f"{k}={v}" for k, v in shape.items()), dtype, mode, device])
    benchmark.extra_info.update(
        op=op, impl=impl, ours=ours, mode=mode, dtype=dtype, device=device, device_name=device_name(device),
        shape=shape, work=work or {}, rounds=rounds, iterations=iterations, smoke=SMOKE,
    )
    benchmark.pedantic(case, rounds=rounds, iterations=iterations)  # _plan has warmed up
    if memory_spec is None:
        return
    if device == "cuda" or SMOKE:
        memory = _memory.in_process(case, device, warm_up=not SMOKE)
    else:
        del case
        memory = _memory.fresh_subprocess(memory_spec)
    benchmark.extra_info.update(memory)


def paired_speedup(ours: Callable, baseline: Callable, baseline_name: str, budget_s: Optional[float] = None,
                   min_pairs: int = 5, max_pairs: int = 40) -> dict:
    """Speed-up of ``ours`` over ``baseline`` from alternating calls: ``{"baseline", "pairs", "ratio_median",
    "ratio_q25", "ratio_q75"}`` with ratio = baseline time / ours time of each pair.

    Each pair times one call of each, in the order ABBA over consecutive pairs, so a machine
    that slows down or speeds up during the measurement (other jobs, clocks) affects both
    sides of a pair alike. Medians of two separate runs of rounds do not have that
    property: on a shared 2-core machine their ratio drifts by several percent.
    Both cases must already be warmed up. ``budget_s`` (default: the round budget) bounds the time.
    """
    budget = round_budget_s(DEVICE) if budget_s is None else budget_s
    ratios, spent, pair = [], 0.0, 0
    while pair < max_pairs and (pair < min_pairs or spent < budget):
        order = (ours, baseline) if pair % 2 == 0 else (baseline, ours)
        seconds = {}
        for case in order:
            start = synchronized_timer()
            case()
            seconds[case] = synchronized_timer() - start
        ratios.append(seconds[baseline] / max(seconds[ours], 1e-9))
        spent += seconds[ours] + seconds[baseline]
        pair += 1
    quantiles = torch.tensor(ratios, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    q25, median, q75 = (float(q) for q in quantiles)
    return {"baseline": baseline_name, "pairs": len(ratios), "ratio_median": median, "ratio_q25": q25,
            "ratio_q75": q75}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **kwargs) -> None:
    """``tests/tolerances.py``'s check (the project keeps its tolerances in one place)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "tolerances.py")
    spec = importlib.util.spec_from_file_location("lafs_test_tolerances", path)
    tolerances = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tolerances)
    tolerances.assert_close(actual, expected, **kwargs)
