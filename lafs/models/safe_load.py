"""The one loader of checkpoint files: nothing in a file runs code unless the caller says so.

Every path that reads a ``.pt`` / ``.pth`` file (``load_model``, ``load_official_pretraining``,
``init.landmark`` / ``init.pretrained``, ``--resume``, ``python -m lafs.eval``) calls
:func:`load_checkpoint`.  It uses ``torch.load(weights_only=True)``, which rebuilds tensors and
plain Python values (dict, list, tuple, str, int, float, bool, None) and nothing that could call a
function, plus the few globals in :data:`ALLOWED_GLOBALS`, which the files we know of need:

* NumPy arrays of numeric dtypes and NumPy scalars: the NumPy random state in our training
  checkpoints (``rng``), and the scalars an original training script may leave in its ``args``;
* ``argparse.Namespace``: the ``args`` that the original LAFS (DINO) pretraining script saves.

A file that names any other global (a class, a function: what a pickle uses to run code) is
refused with :class:`UnsafeCheckpointError`, naming the file and the globals, before anything in
it is called.  ``unsafe_pickle=True`` (``--unsafe-pickle`` on ``python -m lafs.train`` and
``python -m lafs.eval``, or the :func:`allow_unsafe_pickle` context) loads it with the full
pickle machinery instead: the file can then run any code, so only do that for a file you trust.

Needs torch >= 2.6 (``safe_globals`` with named entries; earlier weights-only loading had a known
code-execution hole, CVE-2025-32434), which ``pyproject.toml`` requires.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import io
import os
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]

_NUMPY_ARRAY = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
_NUMPY_SCALAR = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
# Numeric and boolean dtypes only (no object, string or void dtypes).
_NUMPY_DTYPE_CLASSES = sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}, key=lambda t: t.__name__)

#: name -> object of every global a checkpoint may name beyond torch's weights-only set.
ALLOWED_GLOBALS: dict[str, Any] = {
    # NumPy arrays and scalars under NumPy 2 and NumPy 1 names.
    "numpy._core.multiarray._reconstruct": _NUMPY_ARRAY,
    "numpy.core.multiarray._reconstruct": _NUMPY_ARRAY,
    "numpy._core.multiarray.scalar": _NUMPY_SCALAR,
    "numpy.core.multiarray.scalar": _NUMPY_SCALAR,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    **{f"numpy.dtypes.{cls.__name__}": cls for cls in _NUMPY_DTYPE_CLASSES},
    # The original LAFS pretraining checkpoints' "args".
    "argparse.Namespace": argparse.Namespace,
}

_OPT_IN: contextvars.ContextVar[bool] = contextvars.ContextVar("lafs_unsafe_pickle", default=False)

UNSAFE_HINT = (
    "If you trust the file, load it with unsafe_pickle=True (python -m lafs.train / python -m lafs.eval: "
    "--unsafe-pickle): it can then run any code."
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint that would need globals outside the allow-list: ``.path`` and ``.globals`` (names)."""

    def __init__(self, path: PathLike, wanted: list[str]):
        self.path, self.globals = Path(path), list(wanted)
        super().__init__(
            f"{path}: refusing to load: its pickle names the global(s) {', '.join(wanted)}, which "
            f"loading would call or build. Checkpoints load tensors, plain Python values, NumPy arrays "
            f"and argparse.Namespace only. {UNSAFE_HINT}"
        )


@contextlib.contextmanager
def allow_unsafe_pickle(enabled: bool = True) -> Iterator[None]:
    """Within the block, every :func:`load_checkpoint` loads with full pickle (the CLIs' ``--unsafe-pickle``)."""
    token = _OPT_IN.set(bool(enabled))
    try:
        yield
    finally:
        _OPT_IN.reset(token)


def unsafe_pickle_allowed(unsafe_pickle: bool = False) -> bool:
    """Whether a load may run code: the argument, or an enclosing :func:`allow_unsafe_pickle`."""
    return bool(unsafe_pickle) or _OPT_IN.get()


def load_checkpoint(path: PathLike, *, unsafe_pickle: bool = False) -> Any:
    """The object saved in ``path`` (``torch.save`` or plain pickle), on the CPU, without running code.

    Raises :class:`UnsafeCheckpointError` (file and globals named) for a file that needs anything
    outside the allow-list; ``unsafe_pickle=True`` loads such a file anyway (it can run code).
    A file that is not a readable checkpoint (empty, truncated, another format) raises ``ValueError``
    naming it; a missing file ``FileNotFoundError``.
    """
    path = Path(path)
    if unsafe_pickle_allowed(unsafe_pickle):
        warnings.warn(f"{path}: loading with full pickle (unsafe_pickle): the file can run code", stacklevel=2)
        return torch.load(path, map_location="cpu", weights_only=False)
    allowed = [(obj, name) for name, obj in ALLOWED_GLOBALS.items()] + _NUMPY_DTYPE_CLASSES
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except pickle.UnpicklingError as err:
        safe = _torch_safe_globals()
        wanted = [name for name in pickle_globals(path) if name not in ALLOWED_GLOBALS and name not in safe]
        if wanted:
            raise UnsafeCheckpointError(path, wanted) from None
        reason = (str(err).split("WeightsUnpickler error:")[-1].strip().splitlines() or [""])[0]
        # Not a global: a damaged file, or a pickle instruction the weights-only unpickler refuses.
        raise ValueError(f"{path}: not a checkpoint that loads without running code ({reason})") from None
    except Exception as err:  # EOFError, torch's zip reader (OSError), a stray opcode: a damaged or foreign file
        raise ValueError(
            f"{path}: not a readable torch checkpoint (empty, truncated or another format): {type(err).__name__}: {err}"
        ) from None


def _torch_safe_globals() -> set[str]:
    """Names torch's weights-only unpickler allows by itself (tensors, storages, dtypes, OrderedDict...)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except Exception:  # a private helper: without it the error lists torch's own globals too
        return set()


def pickle_globals(path: PathLike) -> list[str]:
    """``module.name`` of every global the pickle(s) in ``path`` name, read from the opcodes (nothing runs)."""
    with open(path, "rb") as f:
        data = f.read()
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            pickles = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    else:
        pickles = [data]
    found: list[str] = []
    for payload in pickles:
        for name in _scan(payload):
            if name not in found:
                found.append(name)
    return found


def _scan(payload: bytes) -> list[str]:
    """Globals of consecutive pickles in ``payload`` (a legacy torch file holds several), up to an unreadable byte."""
    names, stream = [], io.BytesIO(payload)
    while stream.tell() < len(payload):
        strings, memo, memo_count, last = [], {}, 0, None
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                pushed = None
                if opcode.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and ("UNICODE" in opcode.name or "STRING" in opcode.name):
                    pushed = arg
                elif opcode.name == "MEMOIZE":
                    if last is not None:
                        memo[memo_count] = last
                    memo_count += 1
                elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and last is not None:
                    memo[arg] = last
                elif opcode.name in ("GET", "BINGET", "LONG_BINGET") and arg in memo:
                    pushed = memo[arg]
                if pushed is not None:
                    strings.append(pushed)
                if opcode.name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    last = pushed
                if opcode.name == "STOP":
                    break
            else:
                break
        except Exception:
            break
    return names
