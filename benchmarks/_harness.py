"""What every benchmark shares: device and shape selection, the timer, and
``compare``, which times our implementation and every baseline of one case
*interleaved*: in each round every implementation runs once (in an order
that rotates from round to round), so a machine that slows down or speeds up
during the measurement affects all of them alike. ``compare`` records the
per-round times of each implementation, its peak added memory, the work done
per call, and how busy the machine was (load average, and the CPU time other
processes used while the rounds ran) in ``benchmark.extra_info``; report.py
turns that into ratios (the median of the per-round ratios and its spread)
and refuses to print a headline for a case measured on a busy machine.

A *case* is a zero-argument function that runs the measured work once
(forward, or forward plus backward) on inputs built beforehand, and returns
the tensors the caller asked for (the output, or the gradients of the
inputs). Those returned tensors are not counted as added memory.

Adding a benchmark (e.g. ``bench_pretrain_views.py``, ``bench_embedding.py``):
a ``bench_*.py`` file in this folder whose test functions take pytest-benchmark's
``benchmark`` fixture and call ``compare(benchmark, op=..., title=..., mode=...,
dtype=..., shape={...}, impls=[Impl(name, ours, build, memory_spec), ...],
work={"bytes"|"flops"|"images": per call})``. It is collected by
``pytest benchmarks`` (so by ``make bench`` and by the smoke test), and
report.py shows it with no change there: its table comes from ``title``,
``shape`` and the implementations, its rate from the kind of ``work``. Targets
and the README's headline rows are data in ``benchmarks/targets.json``.

Environment:
  LAFS_BENCH_SMOKE=1      tiny shapes, two rounds, memory measured in-process:
                          checks that the benchmarks still run (seconds).
  LAFS_BENCH_DEVICE       cpu or cuda (default: cuda when available).
  LAFS_BENCH_BUDGET_S     seconds of timed rounds per implementation (default 2 on CPU, 1 on GPU).
  LAFS_BENCH_NO_COMPILE=1 skip the torch.compile baselines.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import resource
import time
from typing import Callable, Optional, Sequence

import torch

import _memory

SMOKE = os.environ.get("LAFS_BENCH_SMOKE", "0") not in ("", "0")
COMPILE = os.environ.get("LAFS_BENCH_NO_COMPILE", "0") in ("", "0")
SCHEMA = 2  # extra_info layout that report.py reads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_ROUNDS, MAX_ROUNDS = 7, 100


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
    """Seconds of timed rounds per implementation (``LAFS_BENCH_BUDGET_S``; 2 on CPU, 1 on GPU)."""
    return float(os.environ.get("LAFS_BENCH_BUDGET_S", "1" if device == "cuda" else "2"))


@dataclasses.dataclass
class Impl:
    """One implementation of a case: ``build()`` returns the case (inputs built once, outside the timing).

    ours         True for this project's implementation, False for a baseline
    memory_spec  {"module": bench file, "kwargs": {...}}: ``build_case(**kwargs)`` of that file rebuilds the
                 same case in a fresh process (CPU memory); None: memory is not measured
    """

    name: str
    ours: bool
    build: Callable[[], Callable]
    memory_spec: Optional[dict] = None

    @classmethod
    def rebuildable(cls, name: str, ours: bool, module: str, build_case: Callable, **kwargs) -> "Impl":
        """``build_case(**kwargs)`` of bench file ``module``, with the memory spec that rebuilds it elsewhere."""
        return cls(name, ours, functools.partial(build_case, **kwargs), {"module": module, "kwargs": kwargs})


def _cpu_seconds() -> Optional[tuple[float, float]]:
    """(CPU seconds every process of the machine has used, CPU seconds of this process and its children)."""
    own = sum(
        getattr(resource.getrusage(who), field)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for field in ("ru_utime", "ru_stime")
    )
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal; guest is inside user
    return busy / os.sysconf("SC_CLK_TCK"), own


class MachineActivity:
    """Load average and other processes' CPU use over a stretch of time (``start()`` ... ``stop()``)."""

    def start(self) -> "MachineActivity":
        self.load_before = list(os.getloadavg())
        self.cpu_before = _cpu_seconds()
        self.wall_before = time.perf_counter()
        return self

    def stop(self) -> dict:
        wall = max(time.perf_counter() - self.wall_before, 1e-9)
        cpu_after = _cpu_seconds()
        other = None
        # /proc/stat counts in clock ticks (10 ms): shorter stretches say nothing reliable.
        if self.cpu_before is not None and cpu_after is not None and wall >= 0.5:
            other = max(0.0, (cpu_after[0] - self.cpu_before[0]) - (cpu_after[1] - self.cpu_before[1])) / wall
        return {
            "load_before": self.load_before,
            "load_after": list(os.getloadavg()),
            "other_cpu_cores": other,
            "cores": os.cpu_count(),
            "timed_s": wall,
        }


def _timed(case: Callable, iterations: int) -> float:
    """Seconds per call of ``case`` over ``iterations`` back-to-back calls."""
    start = synchronized_timer()
    for _ in range(iterations):
        case()
    return (synchronized_timer() - start) / iterations


def plan_rounds(once_s: Sequence[float], device: str) -> tuple[int, list[int]]:
    """(rounds, calls per slot of each implementation) from one call's time of each.

    Every implementation gets the same number of calls per slot: on the CPU one (perf_counter resolves
    microseconds); on a GPU as many as the fastest needs for a 20 ms slot, so launch latency overlaps and the
    synchronisation costs little. (A fast implementation given more back-to-back calls than its baseline would
    find its data and code warm where the baseline does not: measured, that alone raised the gather's ratio by
    25-40%.) The rounds fill the budget of every implementation together, a multiple of their number so that
    each runs first, second, ... equally often.
    """
    n = len(once_s)
    if SMOKE:
        return n * math.ceil(2 / n), [1] * n
    if device == "cuda":
        calls = max(max(1, math.ceil(0.02 / max(t, 1e-7))) for t in once_s)
    else:
        calls = 1
    round_s = sum(once_s) * calls
    budget = round_budget_s(device) * n
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget // max(round_s, 1e-9))))
    rounds = n * math.ceil(rounds / n)
    return (rounds if rounds <= MAX_ROUNDS else n * (MAX_ROUNDS // n)), [calls] * n


def interleaved_rounds(cases: dict[str, Callable], rounds: int, iterations: dict[str, int]) -> dict[str, list]:
    """Seconds per call of every case in every round: ``{name: [round 0, round 1, ...]}``.

    Round r runs the cases in their order rotated by r: with a number of rounds that is a multiple of the
    number of cases (``plan_rounds``), each runs first (and last) equally often.
    """
    names = list(cases)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_timed(cases[name], iterations[name]))
    return times


def compare(
    benchmark,
    *,
    op: str,
    title: str,
    mode: str,
    dtype: str,
    shape: dict,
    impls: Sequence[Impl],
    work: Optional[dict] = None,
    ladder: Optional[Sequence[str]] = None,
    role: Optional[str] = None,
    group: Optional[str] = None,
    warmed_up: Sequence[str] = (),
) -> None:
    """Time every implementation of one case interleaved, round by round, and record memory and facts.

    op, title  what is measured ("landmark_patch_gather", "Landmark patch gather"): report.py makes one
               table per op, titled ``title``
    mode       "fwd", "fwd+bwd", or the kind of step ("supervised", "pretrain")
    shape      the shape parameters, e.g. {"B": 64, "L": 196, "K": 196}
    impls      ours and every baseline (:class:`Impl`)
    work       per call: {"bytes": minimal bytes moved} | {"flops": operations} | {"images": count}; report.py
               turns it into a rate (GB/s, GFLOP/s, img/s)
    ladder     names in order (e.g. original, original + non-kernel changes, ours): report.py also shows the
               speed-up of each rung over the one before, so a change's share of the total is visible
    role       "ceiling": the case measures the device's limit for its kind of work (a copy for bytes):
               report.py states the other cases' rates as a share of it
    warmed_up  names whose case the caller has already run once
    """
    device = DEVICE
    if len({impl.name for impl in impls}) != len(impls) or not impls:
        raise ValueError(f"compare needs distinct implementation names, got {[impl.name for impl in impls]}")
    cases = {impl.name: impl.build() for impl in impls}
    once = []
    for name, case in cases.items():
        if name not in warmed_up and not SMOKE:
            case()  # lazy initialisation, autotuning, compilation
        once.append(_timed(case, 1))
    rounds, iterations = plan_rounds(once, device)
    iterations = dict(zip(cases, iterations))
    benchmark.group = group or " ".join([op, *(f"{k}={v}" for k, v in shape.items()), dtype, mode, device])
    activity = MachineActivity().start()

    times = {}
    # pytest-benchmark's own statistics then describe the whole measurement (one "round" of it); report.py
    # reads the per-implementation times from extra_info.
    benchmark.pedantic(lambda: times.update(interleaved_rounds(cases, rounds, iterations)), rounds=1, iterations=1)
    machine = activity.stop()
    records = []
    for impl in impls:
        record = {
            "name": impl.name,
            "ours": impl.ours,
            "times_s": times[impl.name],
            "iterations": iterations[impl.name],
        }
        if impl.memory_spec is not None:
            if device == "cuda" or SMOKE:
                record.update(_memory.in_process(cases[impl.name], device, warm_up=not SMOKE))
            else:
                record.update(_memory.fresh_subprocess(impl.memory_spec))
        records.append(record)
    benchmark.extra_info.update(
        schema=SCHEMA,
        op=op,
        title=title,
        mode=mode,
        dtype=dtype,
        device=device,
        device_name=device_name(device),
        shape=shape,
        work=work or {},
        impls=records,
        rounds=rounds,
        ladder=list(ladder or []),
        role=role,
        machine=machine,
        smoke=SMOKE,
    )


def measure(*args, **kwargs):
    """Replaced by :func:`compare`: a benchmark times ours and its baselines in one test, interleaved."""
    raise TypeError(
        "_harness.measure() times one implementation alone and was replaced by _harness.compare(), "
        "which times ours and every baseline interleaved round by round: pass them all as impls=[Impl(...)]"
        " (see the _harness docstring)"
    )


def paired_speedup(*args, **kwargs):
    """Replaced by :func:`compare` (every baseline is timed interleaved with ours)."""
    raise TypeError(
        "_harness.paired_speedup() was replaced by _harness.compare(), which interleaves every "
        "implementation of a case in each round"
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **kwargs) -> None:
    """``tests/tolerances.py``'s check (the project keeps its tolerances in one place)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "tolerances.py")
    spec = importlib.util.spec_from_file_location("lafs_test_tolerances", path)
    tolerances = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tolerances)
    tolerances.assert_close(actual, expected, **kwargs)
