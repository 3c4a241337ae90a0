"""Why a kernel backend cannot run in this environment, as the dispatcher says it, for the tests' skips."""

import pytest

from lafs_kernels import _dispatch, _extension

# Triton missing, failing to import, or older than the releases the kernels are tested with.
TRITON_MISSING = _dispatch.triton_missing_reason()
TRITON_SKIP_REASON = f"Triton kernels cannot run here: {TRITON_MISSING}"
NEEDS_TRITON = pytest.mark.skipif(TRITON_MISSING is not None, reason=TRITON_SKIP_REASON)

# The C++ extension not built or not loadable (a source checkout before `pip install --no-build-isolation .`).
CPU_KERNELS_MISSING = _extension.missing_reason("cpu")
CPU_KERNELS_SKIP_REASON = f"C++ kernels not built: {CPU_KERNELS_MISSING}"
NEEDS_CPU_KERNELS = pytest.mark.skipif(CPU_KERNELS_MISSING is not None, reason=CPU_KERNELS_SKIP_REASON)
