"""Every Triton kernel compiles for Ampere (sm_80) and Hopper (sm_90) on this CPU machine, as its launchers
specialise it, and fits the chip.

The interpreter the other kernel tests use accepts code the compiler rejects: a plain-float global read
inside the margin kernels (``EPS``) passed every interpreted test and failed to compile; this test found it
(and the same mistake again in the colour kernel's float32 tiny).
Runs ``triton_gpu_compile.py`` in a subprocess without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("triton_gpu_compile.py")
REPO = SCRIPT.parents[2]
# Largest shared memory per block (opted in) of the A100 (163 KiB) and the H100/H200 (227 KiB): a kernel
# asking more fails to launch.
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
# Register spills per thread (cuobjdump's STACK) allowed: the tiles were chosen so that none spills more
# than a few words (the float32 margin forward spilled 1088 bytes on sm_90 with BLOCK_D 64).
MAX_SPILL_BYTES = 64
EXPECTED = (
    {f"gather_forward_{t}{a}" for t in ("fp32", "bf16", "fp16") for a in ("", "_affine")}
    | {
        f"gather_backward_{t}_image{i}_centres{c}{a}"
        for t in ("fp32", "bf16", "fp16")
        for i, c in ((1, 1), (1, 0), (0, 1))
        for a in ("", "_affine")
    }
    | {f"margin_{d}_{t}_T{n}" for d in ("forward", "backward") for t in ("fp32", "bf16", "fp16") for n in (1, 2)}
    | {f"dino_colour_{t}{w}" for t in ("fp32", "bf16", "fp16") for w in ("", "_weighted")}
)


@pytest.fixture(scope="module", params=[90, 80], ids=["sm90", "sm80"])
def compiled(request):
    pytest.importorskip("triton.backends.nvidia")
    from helpers.skips import TRITON_MISSING, TRITON_SKIP_REASON

    if TRITON_MISSING:  # a Triton the package does not use (too old) is not compiled for
        pytest.skip(TRITON_SKIP_REASON)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", str(request.param)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return request.param, out, {r["name"]: r for r in results}


def test_every_triton_kernel_compiles(compiled):
    _, out, results = compiled
    failures = {name: r["error"] for name, r in results.items() if not r["ok"]}
    assert not failures, json.dumps(failures, indent=1)
    assert out.returncode == 0, out.stderr[-3000:]
    assert set(results) == EXPECTED


def test_compiled_kernels_fit_the_chip(compiled):
    arch, _, results = compiled
    for name, r in results.items():
        assert r["shared"] <= MAX_SHARED_BYTES[arch], f"sm_{arch} {name} asks {r['shared']} bytes of shared memory"
        # what a launch of num_warps warps needs from the 64K registers of an SM
        if "reg" in r:
            assert r["reg"] * 32 * r["num_warps"] <= 65536, (
                f"sm_{arch} {name}: {r['reg']} registers x {r['num_warps']} warps"
            )
            assert r["stack"] <= MAX_SPILL_BYTES, f"sm_{arch} {name} spills {r['stack']} bytes per thread"
    print(
        "\n".join(
            f"sm_{arch} {n}: {r['shared']} B shared, {r.get('reg', '?')} registers, {r.get('stack', '?')} B stack"
            for n, r in sorted(results.items())
        )
    )
