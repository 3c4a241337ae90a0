"""Build both packages and the one compiled extension, lafs_kernels._C.

Environment:
  LAFS_KERNELS_SKIP_CUDA=1   build the CPU kernels only, even where nvcc exists.
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0": A100 and H100/H200).
  MAX_JOBS                   parallel compile jobs (honoured by torch's ninja build).
  CUDA_HOME                  CUDA toolkit; found from /usr/local/cuda or nvcc when unset.

The build imports the torch of the environment: install with
`pip install --no-build-isolation .` so the extension matches the torch you run.
"""

import glob
import json
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def find_cuda_home():
    """CUDA toolkit root, or None.  torch guesses it from `which nvcc`, which is
    wrong when nvcc on the PATH is a wrapper script outside the toolkit."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isdir(os.path.join(home, "include")):
            return home
    return None


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension is imported
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    """(build CUDA?, reason) -- CUDA sources compile whenever nvcc and a CUDA torch exist."""
    if os.environ.get("LAFS_KERNELS_SKIP_CUDA", "0") not in ("", "0"):
        return False, "LAFS_KERNELS_SKIP_CUDA is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"nvcc in {cuda_home}"


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


build_cuda, cuda_reason = want_cuda()
cpu_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
cuda_sources = sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp")
cxx_flags = ["-O3", "-fopenmp"]  # torch adds the C++ standard it needs (C++20 for 2.14)
define_macros = []
if build_cuda:
    define_macros.append(("LAFS_WITH_CUDA", None))
    ext = CUDAExtension(
        "lafs_kernels._C",
        cpu_sources + cuda_sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "lafs_kernels._C",
        cpu_sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

build_info = {
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cuda_home": cuda_home,
    "cuda_arch_list": os.environ["TORCH_CUDA_ARCH_LIST"] if build_cuda else None,
    "backends_compiled": ["cpu", "cuda"] if build_cuda else ["cpu"],
    "cuda_note": cuda_reason,
}
with open(os.path.join(ROOT, "lafs_kernels", "_build_info.json"), "w") as f:
    json.dump(build_info, f, indent=2)
print(f"lafs_kernels build: {build_info}")

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
