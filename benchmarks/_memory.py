"""Peak memory a case adds beyond its inputs and parameters.

``added_bytes = peak - before - bytes of the tensors the case returns``: the
inputs (and parameters) exist before; the returned output or gradients are
what every implementation must produce, so what remains is the workspace an
implementation needs on top (logits, one-hots, sampling grids, saved
activations...).

* GPU: CUDA memory statistics (``max_memory_allocated`` after
  ``reset_peak_memory_stats``), in the benchmark's own process.
* CPU: the peak resident size of a fresh subprocess that builds the case,
  runs it once to warm up, then resets the kernel's high-water mark
  (``/proc/self/clear_refs``) and runs it once more. glibc's mmap threshold is
  fixed so that freed large blocks go back to the system instead of being
  kept resident, which would hide the second run's allocations.

Run as a script it is that subprocess:
``python benchmarks/_memory.py '{"module": "<bench file>", "kwargs": {...}}'``
prints one JSON line.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import resource
import subprocess
import sys

import torch

_MARK = "LAFS_MEMORY_RESULT "
# Blocks above 64 KiB are mmapped and returned to the OS on free (a fixed
# threshold also turns off glibc's dynamic raising of it).
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _returned_bytes(result) -> int:
    tensors = result if isinstance(result, (tuple, list)) else (result,)
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_in_process(case, warm_up: bool = True) -> dict:
    if warm_up:  # lazily loaded code and thread pools are not the case's memory
        case()
    gc.collect()
    before = _status_kib("VmRSS") * 1024
    resettable = _reset_peak_rss()
    result = case()
    if resettable:
        peak = _status_kib("VmHWM") * 1024
        method = "cpu peak RSS (VmHWM reset before the call)"
    else:  # no clear_refs: the process-lifetime peak, valid when set-up peaked below `before`
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        method = "cpu peak RSS (ru_maxrss)"
    return {"peak_added_bytes": max(0, peak - before - _returned_bytes(result)), "memory_method": method}


def _cuda_in_process(case, warm_up: bool = True) -> dict:
    if warm_up:
        case()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = case()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {
        "peak_added_bytes": max(0, peak - before - _returned_bytes(result)),
        "memory_method": "cuda max_memory_allocated",
    }


def in_process(case, device: str, warm_up: bool = True) -> dict:
    """Added memory of ``case`` measured in this process (after one warm-up call unless told not to)."""
    return _cuda_in_process(case, warm_up) if device == "cuda" else _cpu_in_process(case, warm_up)


def fresh_subprocess(spec: dict, timeout_s: float = 600) -> dict:
    """Added memory of ``module.build_case(**kwargs)`` measured in a new CPU process."""
    env = dict(os.environ, **_MALLOC_ENV, LAFS_BENCH_DEVICE="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])
    raise RuntimeError(
        f"memory subprocess for {spec} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


def _load_module(path: str):
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv) -> None:
    spec = json.loads(argv[1])
    module = _load_module(spec["module"])
    case = module.build_case(**spec["kwargs"])
    print(_MARK + json.dumps(_cpu_in_process(case)), flush=True)


if __name__ == "__main__":
    main(sys.argv)
