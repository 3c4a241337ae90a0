"""benchmarks/gpu_check.sh's test step as the lent GPU machine runs it: that image's Python (torch, Triton, pytest,
no .venv) lacks insightface, which 8 modules of tests/lafs import.  ``pytest -m gpu tests`` collects every module
and, without ``--continue-on-collection-errors``, stops at their import errors before running any GPU test: a
whole lend lost.  These check here what only the lent machine would otherwise show."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
GPU_MODULES = sorted(str(p) for p in (REPO / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text())


def test_modules_with_gpu_tests_import_without_insightface(tmp_path):
    blocked = tmp_path / "insightface"
    blocked.mkdir()
    (blocked / "__init__.py").write_text("raise ImportError('insightface is not installed on the lent GPU image')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider", *GPU_MODULES],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert GPU_MODULES and out.returncode == 0, out.stdout[-3000:]


def test_gpu_check_runs_the_gpu_tests_past_modules_that_do_not_import(tmp_path):
    text = SCRIPT.read_text()
    runs = [line for line in text.splitlines() if "-m pytest -m gpu tests" in line]
    assert runs and all("--continue-on-collection-errors" in line for line in runs), runs
    # The script's classification of collection errors, on a log of pytest's short summary.
    start = text.index("LOST_GPU_MODULES=()")
    function = text[start : text.index("\n}\n", start) + 3]
    gpu_module = next(m for m in GPU_MODULES if "/tests/kernels/" in m)
    log = tmp_path / "tests.log"
    harness = (
        'SUMMARY=/dev/null; FAILED=()\nsay() { echo "say: $*"; }\nfail() { FAILED+=("$1"); echo "fail: $1"; }\n'
        f'{function}\ncheck_collection "$1"\necho "lost=${{#LOST_GPU_MODULES[@]}} failed=${{#FAILED[@]}}"\n'
    )
    for errors, expected in (
        (["ERROR tests/lafs/test_eval_align.py", "ERROR tests/lafs/test_export.py - ImportError"], "lost=0 failed=0"),
        ([f"ERROR {os.path.relpath(gpu_module, REPO)}"], "lost=1 failed=1"),
    ):
        log.write_text("\n".join(["E   ImportError: no insightface", *errors, "1 passed, 2 errors"]) + "\n")
        out = subprocess.run(["bash", "-c", harness, "check", str(log)], cwd=REPO, capture_output=True, text=True)
        assert out.stdout.strip().splitlines()[-1] == expected, out.stdout + out.stderr
