"""Runs the Triton margin kernels (interpreted) where an int32 offset would pass 2^31 elements.

A chunk of C classes gives the backward a [B, C] gradient: with B * C >= 2^31 (B = 1024 rows and a chunk of 2M
classes) ``rows * C`` wraps in int32, and a class chunk past 2^31 / D rows of W (4M classes at D = 512) wraps
``cols * stride_w``.  On a GPU a wrapped offset is an illegal address or a silent write elsewhere; interpreted,
a segmentation fault.  So this runs in its own process (``test_margin_softmax.py`` starts it): one program
block at such an offset, its results against the same block at small offsets.  The large tensors are
address space only (``torch.empty``): the kernels touch a few pages of them.

Prints ``equal <forward> <backward>``; exits 3 when the address space cannot be had (the test then skips).
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from lafs_kernels.triton import margin_softmax as kernels  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
from helpers.triton_interpreter import fix_interpreter_scalar_index  # noqa: E402

fix_interpreter_scalar_index()  # as tests/conftest.py does for the suite: this process does not run it

D = 16
BLOCKS = dict(BLOCK_B=16, BLOCK_C=32, BLOCK_D=16, IEEE=True, UPCAST=False)  # float16: no upcast needed
ROWS = 17  # two row blocks: row 16 is the first of the second


def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, D, generator=gen).half()
    w = torch.randn(64, D, generator=gen).half()
    labels = torch.randint(0, 64, (ROWS, 1), generator=gen)
    target = torch.randn(ROWS, 1, generator=gen)
    grad_target = torch.rand(ROWS, 1, generator=gen)
    return x, w, 1 / x.float().norm(dim=1), labels, target, grad_target


def backward_rows(classes):
    """g and radial of the second row block, first class block, with ``classes`` classes in the chunk: row 16 of
    g starts at element 16 * classes."""
    x, w, inv_x, labels, target, grad_target = inputs()
    labels = labels % 32
    lse, grad_lse = torch.full((ROWS,), 70.0), torch.ones(ROWS)
    g = torch.empty(ROWS * classes, dtype=torch.float16)
    radial = torch.empty(2 * classes)
    kernels._backward_kernel[(2, 1)](
        *(x, w, inv_x, labels, target, torch.ones(ROWS, 1), lse, grad_lse, grad_target, torch.zeros(ROWS), g, radial),
        *(ROWS, classes, D, 64.0, x.stride(0), w.stride(0)),
        T=1,
        **BLOCKS,
    )
    return g.view(ROWS, classes)[16:, :32].clone(), radial.view(2, classes)[1, :32].clone()


def forward_stats(stride_w):
    """The forward's statistics [5, 16] of rows 0..15 over the second class block, which holds class 32 alone
    (C = 33), with W's rows ``stride_w`` apart: class 32 starts at element 32 * stride_w."""
    x, w, inv_x, labels, target, _ = inputs()
    w_strided = torch.empty(32 * stride_w + D, dtype=torch.float16)
    w_strided.as_strided((33, D), (stride_w, 1)).copy_(w[:33])
    stats = torch.empty(5, ROWS, 2)
    kernels._forward_kernel[(1, 2)](
        *(x, w_strided, inv_x, labels, target, stats[0], stats[1], stats[2], stats[3], stats[4]),
        *(ROWS, 33, D, 64.0, x.stride(0), stride_w, 2),
        T=1,
        **BLOCKS,
    )
    return stats[:, :16, 1].clone()


def main():
    classes, stride = 2**27, 2**26  # 16 * 2^27 = 32 * 2^26 = 2^31
    try:
        torch.empty(ROWS * classes, dtype=torch.float16)
        torch.empty(32 * stride + D, dtype=torch.float16)
    except (RuntimeError, MemoryError) as exc:
        needed = (ROWS * classes + 32 * stride + D) * 2 / 2**30
        print(f"offsets past 2**31 elements need {needed:.1f} GiB of address space (never written); refused: {exc}")
        return 3
    g_small, radial_small = backward_rows(32)
    g_big, radial_big = backward_rows(classes)
    backward = torch.equal(g_small, g_big) and torch.equal(radial_small, radial_big)
    forward = torch.equal(forward_stats(D), forward_stats(stride))
    print(f"equal {forward} {backward}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
