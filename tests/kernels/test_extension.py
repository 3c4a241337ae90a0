"""The compiled extension: built as the toolchain allows, loaded or explained."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import lafs_kernels
from lafs_kernels import _extension

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def toolchain_present() -> bool:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return torch.version.cuda is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


def test_extension_loads_with_cpu_kernels():
    loaded, reason = _extension.load()
    assert loaded, reason
    assert _extension.missing_reason("cpu") is None
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lafs_kernels::_patch_gather_fwd", "CPU")


@pytest.mark.skipif(
    os.environ.get("LAFS_KERNELS_SKIP_CUDA", "0") not in ("", "0"), reason="CUDA build skipped on purpose"
)
def test_cuda_kernels_were_compiled_when_the_toolchain_is_present():
    if not toolchain_present():
        pytest.skip("no nvcc / CUDA build of torch here")
    info = _extension.build_info()
    assert "cuda" in info["backends_compiled"], info
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lafs_kernels::_patch_gather_fwd", "CUDA")
    major = int(torch.version.cuda.split(".")[0])
    assert _extension.cuda_runtime_version() // 1000 == major
    for arch in ("8.0", "9.0"):
        assert arch in info["cuda_arch_list"]


def test_build_info_records_versions():
    info = _extension.build_info()
    assert info["torch"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda


def test_version_mismatch_warns_with_both_versions(monkeypatch):
    stale = dict(_extension.build_info(), torch="1.0.0")
    reason = _extension._version_mismatch(stale)
    assert "1.0.0" in reason and torch.__version__ in reason


def test_import_without_the_extension_uses_the_reference(tmp_path):
    """A copy of the package with no _C and no build record still imports and computes."""
    shutil.copytree(
        os.path.join(REPO, "lafs_kernels"),
        tmp_path / "lafs_kernels",
        ignore=shutil.ignore_patterns("_C*.so", "_build_info.json", "__pycache__"),
    )
    code = (
        # An editable install maps lafs_kernels._C to the checkout by name; drop that finder so the
        # copy is what a user without a build would have.
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import torch, lafs_kernels, json\n"
        "from lafs_kernels import info\n"
        "img = torch.rand(1, 3, 16, 16); lm = torch.rand(1, 4, 2) * 15\n"
        "tok = lafs_kernels.landmark_patch_gather(img, lm, 4)\n"
        "assert tok.shape == (1, 4, 48), tok.shape\n"
        "print(json.dumps(info.collect(), default=str))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LAFS_KERNELS_BACKEND",)}
    env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "not built" in report["extension_loaded"]
    gather_cpu = report["ops"]["landmark_patch_gather"]["cpu"]
    assert gather_cpu["torch"] == [] and any("not built" in r for r in gather_cpu["cpu"])


def test_info_command_tells_the_truth():
    out = subprocess.run([sys.executable, "-m", "lafs_kernels.info", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["torch"] == torch.__version__
    assert report["extension_loaded"] is True
    gather_cpu = report["ops"]["landmark_patch_gather"]["cpu"]
    assert gather_cpu["cpu"] == [] and gather_cpu["torch"] == []
    if not torch.cuda.is_available():
        gather_cuda = report["ops"]["landmark_patch_gather"]["cuda"]
        assert any("no CUDA device" in r for r in gather_cuda["cuda"])
    text = subprocess.run([sys.executable, "-m", "lafs_kernels.info"], capture_output=True, text=True).stdout
    assert "landmark_patch_gather" in text and "margin_softmax_cross_entropy" in text
    assert lafs_kernels.__version__ in text
