"""Tolerances, in one place, for comparing a backend with the float64 reference.

float32 results are judged by absolute and relative tolerances.  A float16 /
bfloat16 result is judged against how far the same-dtype PyTorch computation
is from float64: the backend's error may be at most ``LOW_PRECISION_FACTOR``
times that error (plus a small floor for the case where the reference happens
to be exact).
"""

import math

import torch

ATOL_RTOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

LOW_PRECISION_FACTOR = 2.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype=None, scale=1.0, msg=""):
    """Compare with the per-dtype tolerance of ``dtype`` (default: actual's).

    ``scale`` widens both tolerances for quantities that sum many terms (for
    example a gradient accumulated over a whole patch).
    """
    dtype = dtype or actual.dtype
    atol, rtol = ATOL_RTOL[dtype]
    torch.testing.assert_close(
        actual.detach().to(torch.float64).cpu(),
        expected.detach().to(torch.float64).cpu(),
        atol=atol * scale,
        rtol=rtol * scale,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype=None, scale=1.0, msg=""):
    """Row by row, with the relative tolerance taken of the row's largest ``|expected|``: for rows computed from
    a few large terms, as the gradient of a zero vector's normalisation (~1/eps, where an element that cancels
    to 1e9 among 1e13s carries the rounding error of the 1e13s)."""
    dtype = dtype or actual.dtype
    atol, rtol = ATOL_RTOL[dtype]
    a = actual.detach().to(torch.float64).cpu().flatten(1)
    e = expected.detach().to(torch.float64).cpu().flatten(1)
    bound = scale * (atol + rtol * e.abs().amax(dim=1, keepdim=True))
    error = (a - e).abs()
    assert torch.isfinite(a).all() and (error <= bound).all(), (
        f"{msg} off by {(error / bound).max().item():.2f} x the row-relative tolerance"
    )


def assert_close_low_precision(actual, same_dtype_reference, float64_reference, *, floor=None, msg=""):
    """Low-precision check: |actual - ref64| <= factor * |same_dtype_ref - ref64| + floor (max norms)."""
    ref64 = float64_reference.detach().to(torch.float64).cpu()
    err_ours = (actual.detach().to(torch.float64).cpu() - ref64).abs().max().item()
    err_torch = (same_dtype_reference.detach().to(torch.float64).cpu() - ref64).abs().max().item()
    if floor is None:
        floor = ATOL_RTOL[actual.dtype][0] * max(1.0, ref64.abs().max().item())
    bound = LOW_PRECISION_FACTOR * err_torch + floor
    assert err_ours <= bound, (
        f"{msg} max error {err_ours:.3e} vs float64 exceeds {LOW_PRECISION_FACTOR} x same-dtype PyTorch error "
        f"{err_torch:.3e} + {floor:.1e}"
    )


def assert_float32_sum_close(actual: torch.Tensor, terms: torch.Tensor, *, dim: int = -1, msg=""):
    """``actual`` is a float32 sum of ``terms`` along ``dim``: judged against the float64 sum by the
    summation error bound sqrt(n) * 2^-24 * sum|x| (a tolerance relative to the sum itself fails by chance
    where the terms cancel)."""
    terms64 = terms.detach().to(torch.float64).cpu()
    bound = 2.0**-24 * math.sqrt(terms.shape[dim]) * terms64.abs().sum(dim)
    error = (actual.detach().to(torch.float64).cpu() - terms64.sum(dim)).abs()
    assert (error <= bound).all(), f"{msg} float32 sum off by {(error / bound).max().item():.2f} x its error bound"
