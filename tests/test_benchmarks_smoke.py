"""The benchmark suites still run (tiny shapes, two interleaved rounds): they must not rot
between the runs that measure. Every ``benchmarks/bench_*.py`` is collected (a new suite is
checked without being listed here). Each benchmark checks ours against its baseline before
timing, so this also fails on a mismatch; the JSON it writes goes through report.py."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmarks_and_report_run_in_smoke_mode(tmp_path):
    env = dict(os.environ, LAFS_BENCH_SMOKE="1")
    results = tmp_path / "smoke.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks",
            "--benchmark-only",
            "--benchmark-json",
            str(results),
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout and "skipped" not in out.stdout
    command = [sys.executable, "benchmarks/report.py", str(results), "--out", str(tmp_path / "RESULTS.md")]
    report = subprocess.run(
        command + ["--charts", "none"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert report.returncode == 0, report.stderr[-2000:]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "### Landmark patch gather" in text and "### Training step" in text and "### Margin softmax" in text
    assert "not judged: a smoke run" in text or "not judged" in text
    # A smoke run is plumbing, not a measurement: it never reaches a README.
    readme = tmp_path / "README.md"
    readme.write_text("<!-- benchmarks:begin -->\n<!-- benchmarks:end -->\n")
    refused = subprocess.run(
        command + ["--charts", "none", "--readme", str(readme)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "is a smoke run" in refused.stderr, refused.stderr[-2000:]
    assert "| case |" not in readme.read_text()
