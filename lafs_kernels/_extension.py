"""Loading the compiled extension ``lafs_kernels._C`` and its build record.

Importing lafs_kernels never fails because of the extension: when it is
missing, was built for another torch, or fails to load, the reference
backends still work and :func:`missing_reason` says what happened
(``python -m lafs_kernels.info`` prints it).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import warnings
from typing import Optional

import torch

_BUILD_INFO_PATH = os.path.join(os.path.dirname(__file__), "_build_info.json")


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """The record written by setup.py at build time ({} when there was no build)."""
    try:
        with open(_BUILD_INFO_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _version_mismatch(info: dict) -> Optional[str]:
    built_torch, built_cuda = info.get("torch"), info.get("torch_cuda")
    if built_torch and built_torch != torch.__version__:
        return f"lafs_kernels._C was built against torch {built_torch}, but torch {torch.__version__} is installed"
    if "cuda" in info.get("backends_compiled", []) and built_cuda != torch.version.cuda:
        return (
            f"lafs_kernels._C was built against CUDA {built_cuda}, but the installed torch uses CUDA "
            f"{torch.version.cuda}"
        )
    return None


@functools.lru_cache(maxsize=None)
def load() -> tuple[bool, Optional[str]]:
    """Import the extension once.  Returns (loaded, reason it is not)."""
    info = build_info()
    mismatch = _version_mismatch(info)
    if mismatch:
        warnings.warn(
            f"{mismatch}; rebuild it (pip install --no-build-isolation .). Using the other backends.", stacklevel=2
        )
        return False, mismatch
    try:
        importlib.import_module("lafs_kernels._C")
    except ImportError as exc:
        if not info:
            return False, "the compiled extension lafs_kernels._C is not built (pip install --no-build-isolation .)"
        return False, f"lafs_kernels._C failed to load: {exc}"
    return True, None


def missing_reason(kind: str) -> Optional[str]:
    """None when the extension has ``kind`` ('cpu' or 'cuda') kernels, else why not."""
    loaded, reason = load()
    if not loaded:
        return reason
    compiled = build_info().get("backends_compiled", ["cpu"])
    if kind not in compiled:
        note = build_info().get("cuda_note", "")
        return f"the extension was built without {kind} kernels" + (f" ({note})" if note else "")
    return None


def cuda_runtime_version() -> int:
    """CUDA runtime the CUDA kernels were compiled against (e.g. 13000), 0 if none."""
    if not load()[0]:
        return 0
    return int(torch.ops.lafs_kernels._cuda_runtime_version())
