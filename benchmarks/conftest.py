"""pytest configuration of the benchmarks: ``pytest benchmarks --benchmark-only``.

* Collects ``bench_*.py`` (the project's ``testpaths`` is ``tests``, so
  ``make test`` never runs them).
* Saves the run as JSON under ``benchmarks/results/<device>_torch<version>_<time>.json``
  unless ``--benchmark-json`` names a file (nothing is saved in smoke mode).
* Adds the environment to the JSON's ``machine_info`` under ``lafs``: versions
  of torch/Triton/CUDA, the GPU, the extension's build record, the load average
  when the session started and when it ended (each benchmark also records the
  load and the other processes' CPU use while it ran: ``_harness.compare``).
* Fixes glibc's malloc thresholds for the whole run (``_allocator``): no timing
  depends on page faults left over from what ran before it.
* ``LAFS_BENCH_SMOKE=1 pytest benchmarks --benchmark-disable -q`` runs every
  benchmark once on tiny shapes: a quick check that they still run.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

import pytest
import torch
from _allocator import fix_malloc_thresholds

import _harness

MALLOC = fix_malloc_thresholds()
RESULTS_DIR = Path(__file__).parent / "results"
SESSION_START_LOAD = os.getloadavg()


def pytest_collect_file(file_path: Path, parent):
    # a file named on the command line is collected by pytest itself
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def environment_slug() -> str:
    """Short file-name-safe description of where the run happens."""
    if _harness.DEVICE == "cuda":
        where = f"cuda-{torch.cuda.get_device_name(0)}"
    else:
        where = f"cpu-{os.cpu_count()}cores-{platform.machine()}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", f"{where}_torch{torch.__version__}")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    benchmark_off = config.getoption("benchmark_disable", False) or config.getoption("benchmark_skip", False)
    if config.getoption("benchmark_json", None) is None and not _harness.SMOKE and not benchmark_off:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        RESULTS_DIR.mkdir(exist_ok=True)
        config.option.benchmark_json = RESULTS_DIR / f"{environment_slug()}_{stamp}.json"


def pytest_benchmark_update_machine_info(config, machine_info):
    from lafs_kernels import info

    lafs = info.collect()
    lafs.pop("ops", None)  # availability per backend: `python -m lafs_kernels.info` shows it
    lafs.update(
        bench_device=_harness.DEVICE,
        device_name=_harness.device_name(),
        torch_threads=torch.get_num_threads(),
        cpu_load_1_5_15min=os.getloadavg(),
        cpu_load_at_start_1_5_15min=SESSION_START_LOAD,
        smoke=_harness.SMOKE,
        malloc=MALLOC,
    )
    machine_info["lafs"] = lafs
