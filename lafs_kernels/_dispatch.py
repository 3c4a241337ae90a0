"""Backend selection, one mechanism for every op.

Backends:
  ``torch``   the pure-PyTorch reference; runs everywhere.
  ``cpu``     the C++ kernels of the compiled extension ``lafs_kernels._C``.
  ``triton``  Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1``.
  ``cuda``    the CUDA kernels of ``lafs_kernels._C``.
An op may add its own (the margin loss has ``chunked``, its blockwise path in PyTorch ops; its
``cpu`` backend is that path with the elementwise work of each chunk in C++ kernels).

Each op builds an :class:`OpBackends` from :class:`Backend` declarations: the
devices and dtypes a backend supports, what it needs installed, and any
call-specific limits.  ``select`` answers with a backend name:

* a backend forced by ``backend=`` or ``LAFS_KERNELS_BACKEND`` that cannot run
  raises :class:`BackendUnavailableError` listing every reason;
* otherwise the first backend of the device's preference list that can run is
  chosen, silently falling back down the list.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from . import _extension

ENV_BACKEND = "LAFS_KERNELS_BACKEND"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call; the message lists why."""


@dataclass(frozen=True)
class Call:
    """The facts about one call that decide which backend may run it."""

    device: torch.device
    dtype: torch.dtype
    deterministic: bool = False
    requires_grad: bool = False


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The oldest Triton the kernels are tested with: 3.3 (torch 2.7's) to 3.8 (torch 2.14's) pass the kernel tests
# under the interpreter and compile for sm_80 / sm_90 (docs/AUDITS.md). Triton 3.2 (torch 2.6's) aborts in the
# margin kernel under its interpreter, so older releases are not used.
MIN_TRITON = (3, 3)


@functools.lru_cache(maxsize=None)
def triton_missing_reason() -> Optional[str]:
    """None when a Triton the kernels are tested with can be imported, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install must not break import of lafs_kernels
        return f"triton failed to import: {exc}"
    version = re.match(r"(\d+)\.(\d+)", getattr(triton, "__version__", ""))
    if version is None or tuple(map(int, version.groups())) < MIN_TRITON:
        found, oldest = getattr(triton, "__version__", "?"), ".".join(map(str, MIN_TRITON))
        return f"triton {found} is older than {oldest}, the oldest these kernels are tested with"
    return None


def requires_triton(call: Call) -> list[str]:
    reasons = []
    missing = triton_missing_reason()
    if missing:
        reasons.append(missing)
    if call.device.type == "cpu" and not triton_interpret():
        reasons.append("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    return reasons


def requires_extension(kind: str) -> Callable[[Call], list[str]]:
    """Requirement that the compiled extension has ``kind`` ('cpu' or 'cuda') kernels."""

    def check(call: Call) -> list[str]:
        reason = _extension.missing_reason(kind)
        return [reason] if reason else []

    check.__name__ = f"requires_{kind}_extension"
    return check


@dataclass(frozen=True)
class Backend:
    """What one backend of one op supports.

    ``checks`` are extra functions ``Call -> list of reasons`` (installation
    state, determinism, call-specific limits); an empty list means it can run.
    """

    name: str
    devices: frozenset
    dtypes: tuple = FLOAT_DTYPES
    checks: tuple = ()
    deterministic: bool = True

    def why_not(self, call: Call) -> list[str]:
        reasons = []
        if call.device.type not in self.devices:
            reasons.append(f"runs on {'/'.join(sorted(self.devices))} tensors, got {call.device.type}")
        elif call.device.type == "cuda" and not torch.cuda.is_available():
            reasons.append("no CUDA device is available")
        if call.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"supports dtypes {names}, got {str(call.dtype).replace('torch.', '')}")
        if call.deterministic and not self.deterministic:
            reasons.append("has no deterministic mode")
        for check in self.checks:
            reasons.extend(check(call))
        return reasons


@dataclass
class OpBackends:
    """The backends of one op and their order of preference per device type."""

    op: str
    backends: Sequence[Backend]
    preference: dict = field(default_factory=dict)

    def __post_init__(self):
        self._by_name = {b.name: b for b in self.backends}

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def why_not(self, name: str, call: Call) -> list[str]:
        return self._by_name[name].why_not(call)

    def select(self, call: Call, backend: Optional[str] = None, env: bool = True) -> str:
        """The backend for ``call``: ``backend`` if given, else ``LAFS_KERNELS_BACKEND`` (unless ``env`` is
        False: the view-augmentation ops lack some of the other ops' backends, so forcing e.g. the gather's
        cuda for a run must not stop them), else the first of the device's preference that can run."""
        from_env = os.environ.get(ENV_BACKEND) if env else None
        forced, source = (backend, "backend=") if backend else (from_env or None, ENV_BACKEND)
        if forced:
            if forced not in self._by_name:
                raise BackendUnavailableError(
                    f"{self.op}: unknown backend {forced!r} (from {source}); this op has {', '.join(self.names)}"
                )
            reasons = self.why_not(forced, call)
            if reasons:
                raise BackendUnavailableError(
                    f"{self.op}: backend {forced!r} (from {source}) cannot run this call: " + "; ".join(reasons)
                )
            return forced
        for name in self.preference.get(call.device.type, self.names):
            if not self.why_not(name, call):
                return name
        reasons = {name: self.why_not(name, call) for name in self.names}
        raise BackendUnavailableError(f"{self.op}: no backend can run this call: {reasons}")

    def availability(self, device: str, dtype: torch.dtype = torch.float32) -> dict:
        """{backend name: list of reasons it cannot run} for a typical call on ``device``."""
        call = Call(device=torch.device(device), dtype=dtype)
        return {name: self.why_not(name, call) for name in self.names}


def reference_and_kernels(op: str, triton: bool = False) -> OpBackends:
    """Backends of an op with a PyTorch reference (``torch``, any device), a C++ kernel (``cpu``: float32 /
    float64) and, with ``triton``, a Triton kernel (``triton``: float32 / bfloat16 / float16), preferred on CUDA."""
    backends = [
        Backend("torch", frozenset({"cpu", "cuda"})),
        Backend("cpu", frozenset({"cpu"}), dtypes=(torch.float32, torch.float64), checks=(requires_extension("cpu"),)),
    ]
    if triton:
        triton_dtypes = (torch.float32, torch.bfloat16, torch.float16)
        backends.append(Backend("triton", frozenset({"cpu", "cuda"}), dtypes=triton_dtypes, checks=(requires_triton,)))
    return OpBackends(
        op=op,
        backends=tuple(backends),
        preference={"cpu": ["cpu", "torch"], "cuda": ["triton", "torch"] if triton else ["torch"]},
    )


REGISTRY: dict[str, OpBackends] = {}


def register(op_backends: OpBackends) -> OpBackends:
    """Make an op's backends known to ``python -m lafs_kernels.info``."""
    REGISTRY[op_backends.op] = op_backends
    return op_backends


def deterministic_requested(deterministic: Optional[bool]) -> bool:
    """``deterministic=None`` follows ``torch.use_deterministic_algorithms``."""
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    return bool(deterministic)


def call_of(tensor: torch.Tensor, *, deterministic: bool = False, requires_grad: bool = False) -> Call:
    return Call(device=tensor.device, dtype=tensor.dtype, deterministic=deterministic, requires_grad=requires_grad)


# torch.compile runs the selection once while tracing (it reads files and the environment, which Dynamo
# cannot trace) and bakes the chosen name into the graph.
@torch.compiler.assume_constant_result
def select_for(
    op: str,
    device: str,
    dtype: torch.dtype,
    deterministic: bool,
    requires_grad: bool,
    backend: Optional[str],
    env: bool = True,
) -> str:
    """``REGISTRY[op].select`` for a call described by plain values, usable inside ``torch.compile``."""
    call = Call(device=torch.device(device), dtype=dtype, deterministic=deterministic, requires_grad=requires_grad)
    return REGISTRY[op].select(call, backend, env=env)


def select_for_tensor(
    op: str, tensor: torch.Tensor, backend: Optional[str] = None, *, deterministic=False, requires_grad=False
) -> str:
    """The backend of ``op`` for a call on ``tensor``'s device and dtype (see :func:`select_for`)."""
    return select_for(op, str(tensor.device), tensor.dtype, bool(deterministic), bool(requires_grad), backend)
