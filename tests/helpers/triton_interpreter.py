"""The test suite runs the Triton kernels on CPU tensors through Triton's interpreter; Triton 3.6's
interpreter (torch 2.11's) cannot convert its own scalars with NumPy 2.4 and later.  ``tests/conftest.py``
mends it before any test runs."""

import inspect
import operator

import numpy as np


def _scalar_index(self) -> int:
    """``int(tensor)`` of an interpreted scalar, which the interpreter holds as a 1-element array."""
    return int(self.handle.data.reshape(-1)[0]) if self.handle.data.size == 1 else int(self.handle.data)


class _Scope:
    """Stands in for the scope that Triton 3.6 and later pass to ``_patch_lang_tensor``."""

    def set_attr(self, obj, name, value):
        setattr(obj, name, value)


def _call_patch(patch_lang_tensor, tensor_class) -> None:
    """The interpreter's patch on ``tensor_class``: ``(tensor, scope)`` from Triton 3.6 on, ``(tensor)`` before."""
    if len(inspect.signature(patch_lang_tensor).parameters) >= 2:
        patch_lang_tensor(tensor_class, _Scope())
    else:
        patch_lang_tensor(tensor_class)


def interpreter_index_is_broken(patch_lang_tensor) -> bool:
    """Whether the interpreter's ``tensor.__index__`` fails on its own scalars (a runtime loop bound such as
    ``range(0, D, BLOCK_D)``): Triton 3.6 calls ``int()`` on their 1-element arrays, which NumPy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.8 squeezes them first.
    Found by installing the interpreter's patch on a stand-in class and converting one scalar."""

    class Handle:
        data = np.array([1], dtype=np.int32)

    class Tensor:
        handle = Handle()

    try:
        _call_patch(patch_lang_tensor, Tensor)
    except Exception:  # another interpreter than the ones this probe knows: leave it alone
        return False
    try:
        operator.index(Tensor())
    except TypeError:
        return True
    except Exception:  # another interpreter than the one this probe knows: leave it alone
        return False
    return False


def fix_interpreter_scalar_index() -> None:
    """Make the Triton interpreter (TRITON_INTERPRET=1, the kernels on CPU tensors) convert its scalars to
    ints with NumPy 2.4 and later where its own conversion fails (Triton 3.6, which torch 2.11 pins): every
    kernel with a loop over a runtime bound (the margin tiles over D, the colour chain's mean over M) failed
    there. The suite's own mend of a third-party debugging tool, so the package itself patches nothing;
    compiled kernels never use the interpreter; nothing changes where its conversion works."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_lafs_scalar_index", False):
        return
    if not interpreter_index_is_broken(original):
        return

    def patch_lang_tensor(tensor, *scope):
        original(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", _scalar_index)
        else:
            tensor.__index__ = _scalar_index

    patch_lang_tensor._lafs_scalar_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
