"""The backend-selection mechanism shared by every op."""

import pytest
import torch

from lafs_kernels import _dispatch
from lafs_kernels._dispatch import Backend, BackendUnavailableError, Call, OpBackends


def always_missing(call):
    return ["the widget library is not installed"]


def make_op():
    return OpBackends(
        op="demo_op",
        backends=[
            Backend("torch", frozenset({"cpu", "cuda"})),
            Backend("fast", frozenset({"cpu"}), dtypes=(torch.float32,), deterministic=False),
            Backend("broken", frozenset({"cpu"}), checks=(always_missing,)),
        ],
        preference={"cpu": ["broken", "fast", "torch"]},
    )


CPU32 = Call(device=torch.device("cpu"), dtype=torch.float32)


def test_automatic_choice_falls_back_silently():
    op = make_op()
    assert op.select(CPU32) == "fast"
    assert op.select(Call(device=torch.device("cpu"), dtype=torch.float16)) == "torch"
    assert op.select(Call(device=torch.device("cpu"), dtype=torch.float32, deterministic=True)) == "torch"


def test_forced_backend_that_cannot_run_lists_every_reason():
    op = make_op()
    call = Call(device=torch.device("cpu"), dtype=torch.float16, deterministic=True)
    with pytest.raises(BackendUnavailableError) as err:
        op.select(call, backend="fast")
    message = str(err.value)
    assert "float16" in message and "deterministic" in message and "backend=" in message
    with pytest.raises(BackendUnavailableError, match="widget library"):
        op.select(CPU32, backend="broken")


def test_unknown_backend_names_the_ones_that_exist():
    with pytest.raises(BackendUnavailableError, match="torch, fast, broken"):
        make_op().select(CPU32, backend="nope")


def test_environment_variable_forces_and_argument_wins(monkeypatch):
    op = make_op()
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "torch")
    assert op.select(CPU32) == "torch"
    assert op.select(CPU32, backend="fast") == "fast"
    monkeypatch.setenv(_dispatch.ENV_BACKEND, "broken")
    with pytest.raises(BackendUnavailableError, match=_dispatch.ENV_BACKEND):
        op.select(CPU32)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = _dispatch.requires_triton(CPU32)
    assert any("TRITON_INTERPRET=1" in r for r in reasons)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not any("TRITON_INTERPRET" in r for r in _dispatch.requires_triton(CPU32))


@pytest.mark.parametrize(
    "version, usable", [("2.3.1", False), ("3.2.0", False), ("3.3.0", True), ("3.6.0", True), ("3.8.0+git1a2b", True)]
)
def test_a_triton_older_than_the_tested_ones_is_not_used(monkeypatch, version, usable):
    """Triton 3.2 (torch 2.6's) aborts in the margin kernel: a release older than MIN_TRITON counts as missing,
    so CUDA falls back to the other kernels and a forced backend="triton" says why."""
    triton = pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", version)
    _dispatch.triton_missing_reason.cache_clear()
    try:
        reason = _dispatch.triton_missing_reason()
        assert (reason is None) == usable, reason
        if not usable:
            assert f"triton {version} is older than 3.3" in reason
            with pytest.raises(BackendUnavailableError, match="older than 3.3"):
                _dispatch.REGISTRY["margin_softmax_cross_entropy"].select(CPU32, backend="triton", env=False)
    finally:
        monkeypatch.undo()
        _dispatch.triton_missing_reason.cache_clear()


def test_deterministic_follows_torch_setting():
    assert _dispatch.deterministic_requested(True) is True
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert _dispatch.deterministic_requested(None) is True
        assert _dispatch.deterministic_requested(False) is False
        torch.use_deterministic_algorithms(False)
        assert _dispatch.deterministic_requested(None) is False
    finally:
        torch.use_deterministic_algorithms(previous)


def test_every_public_op_is_registered_with_a_reference_backend():
    import lafs_kernels  # noqa: F401  (registers the ops)

    assert {"landmark_patch_gather", "margin_softmax_cross_entropy"} <= set(_dispatch.REGISTRY)
    for op in _dispatch.REGISTRY.values():
        assert "torch" in op.names
        assert op.availability("cpu")["torch"] == []
