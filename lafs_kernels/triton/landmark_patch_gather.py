"""Triton kernels of the landmark patch gather (SPEC section 1) and their launchers.

One program handles a tile of ``BLOCK_K`` patches x ``BLOCK_F`` token features;
patch ``n*K + k`` (row n of the centres) samples image ``n % B``.  Without an affine,
feature ``f = (i*P + j)*C + c`` samples the image at ``(x0 + i + dx, y0 + j + dy)``
for the four taps (dx, dy), where ``(x0, y0) = floor(centre - P/2 - 0.5)`` and the
fractional part gives the bilinear weights shared by the whole patch.  With a view
affine (``AFFINE``: [N, 4] = scale_x, scale_y, offset_x, offset_y per row) each
feature has its own source position ``X = scale_x * (cx + i - P/2 - 0.5) + offset_x``
(Y alike), taps and fractions; the landmark gradient is ``scale_x * sum dL/dX``.

Backward: the image gradient is accumulated with float32 atomics into a
float32 buffer whatever the image dtype (so it is not bitwise repeatable); the
centre gradient is a reduction over the features of each patch within one
program, so it needs no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import on_device_of

TILE_ELEMENTS = 2048  # patches x features per program
# The backward with both gradients keeps more tiles live: with 4 warps its sm_90 build spilled 144 bytes
# per thread (255 registers), with 8 it needs 184 registers and no spill (tests/kernels/triton_gpu_compile.py).
BACKWARD_NUM_WARPS = 8


@triton.jit
def _patch_geometry(centres_ptr, patch, patch_ok, H, W, P: tl.constexpr):
    """Window origin (x0, y0) int32 and fractions (fx, fy) of each patch [BLOCK_K]."""
    cx = tl.load(centres_ptr + 2 * patch, mask=patch_ok, other=float("nan"))
    cy = tl.load(centres_ptr + 2 * patch + 1, mask=patch_ok, other=float("nan"))
    x = cx - (P / 2 + 0.5)
    y = cy - (P / 2 + 0.5)
    # Beyond these bounds every tap is outside the image; NaN fails them too.
    # Such patches move to a point whose whole window is outside: zero patch.
    visible = (x > -(P + 1.0)) & (x < W) & (y > -(P + 1.0)) & (y < H)
    x = tl.where(visible, x, -(P + 2.0))
    y = tl.where(visible, y, -(P + 2.0))
    x_floor = tl.floor(x)
    y_floor = tl.floor(y)
    return x_floor.to(tl.int32), y_floor.to(tl.int32), x - x_floor, y - y_floor


@triton.jit
def _source_position(centre, scale, offset, offsets, size):
    """Source position [BLOCK_K, BLOCK_F] of view position centre + offsets, clamped to [-2, size + 1]
    (beyond it every tap is outside anyway; keeps the int conversion defined) and NaN-free."""
    p = scale[:, None] * (centre[:, None] + offsets) + offset[:, None]
    p = tl.where(p == p, p, -2.0)
    return tl.minimum(tl.maximum(p, -2.0), size + 1.0)


@triton.jit
def _patch_tile(
    centres_ptr,
    affine_ptr,
    num_patches,
    K,
    C,
    H,
    W,
    P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    AFFINE: tl.constexpr,
):
    """This program's tile of BLOCK_K patches x BLOCK_F features (feature f = (x_offset * P + y_offset) * C + c).

    Returns patch ids [BLOCK_K] and their validity, the channel of each feature [BLOCK_F], the tile's
    validity [BLOCK_K, BLOCK_F], each feature's top-left tap (xs, ys) [BLOCK_K, BLOCK_F], the bilinear
    fractions (fx, fy) (broadcastable to [BLOCK_K, BLOCK_F]) and d position / d centre (scale_x,
    scale_y) [BLOCK_K] (1 without an affine, 0 for a dropped patch).
    """
    patch = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    patch_ok = patch < num_patches
    f = tl.arange(0, BLOCK_F)
    tile_ok = patch_ok[:, None] & (f < P * P * C)[None, :]
    i = (f // (P * C))[None, :]
    j = ((f // C) % P)[None, :]
    if AFFINE:
        row = patch // K
        cx = tl.load(centres_ptr + 2 * patch, mask=patch_ok, other=float("nan"))
        cy = tl.load(centres_ptr + 2 * patch + 1, mask=patch_ok, other=float("nan"))
        sx = tl.load(affine_ptr + 4 * row, mask=patch_ok, other=float("nan"))
        sy = tl.load(affine_ptr + 4 * row + 1, mask=patch_ok, other=float("nan"))
        ox = tl.load(affine_ptr + 4 * row + 2, mask=patch_ok, other=float("nan"))
        oy = tl.load(affine_ptr + 4 * row + 3, mask=patch_ok, other=float("nan"))
        inf = float("inf")
        # Non-finite centre or affine: a zero patch with zero gradients.
        finite = (
            (tl.abs(cx) < inf)
            & (tl.abs(cy) < inf)
            & (tl.abs(sx) < inf)
            & (tl.abs(sy) < inf)
            & (tl.abs(ox) < inf)
            & (tl.abs(oy) < inf)
        )
        cx = tl.where(finite, cx, -1e9)
        cy = tl.where(finite, cy, -1e9)
        sx = tl.where(finite, sx, 0.0)
        sy = tl.where(finite, sy, 0.0)
        ox = tl.where(finite, ox, -(P + 2.0))
        oy = tl.where(finite, oy, -(P + 2.0))
        x = _source_position(cx, sx, ox, i - (P / 2 + 0.5), W)
        y = _source_position(cy, sy, oy, j - (P / 2 + 0.5), H)
        x_floor = tl.floor(x)
        y_floor = tl.floor(y)
        return (
            patch,
            patch_ok,
            f % C,
            tile_ok,
            x_floor.to(tl.int32),
            y_floor.to(tl.int32),
            x - x_floor,
            y - y_floor,
            sx,
            sy,
        )
    else:
        x0, y0, fx, fy = _patch_geometry(centres_ptr, patch, patch_ok, H, W, P)
        one = tl.full((BLOCK_K,), 1.0, tl.float32)
        return patch, patch_ok, f % C, tile_ok, x0[:, None] + i, y0[:, None] + j, fx[:, None], fy[:, None], one, one


@triton.jit
def _forward_kernel(
    image_ptr,
    centres_ptr,
    affine_ptr,
    tokens_ptr,
    num_patches,
    K,
    B,
    C,
    H,
    W,
    stride_b,
    stride_c,
    stride_h,
    stride_w,
    P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    AFFINE: tl.constexpr,
):
    patch, patch_ok, c, tile_ok, xs, ys, fx, fy, _, _ = _patch_tile(
        centres_ptr, affine_ptr, num_patches, K, C, H, W, P, BLOCK_K, BLOCK_F, AFFINE
    )
    base = image_ptr + (patch // K % B).to(tl.int64)[:, None] * stride_b + c[None, :] * stride_c
    acc = tl.zeros((BLOCK_K, BLOCK_F), dtype=tl.float32)
    for dy in tl.static_range(2):
        wy = fy if dy == 1 else 1.0 - fy
        y = ys + dy
        y_ok = (y >= 0) & (y < H)
        for dx in tl.static_range(2):
            wx = fx if dx == 1 else 1.0 - fx
            x = xs + dx
            ok = tile_ok & y_ok & (x >= 0) & (x < W)
            value = tl.load(base + y * stride_h + x * stride_w, mask=ok, other=0.0).to(tl.float32)
            acc += wx * wy * value
    out = tokens_ptr + patch.to(tl.int64)[:, None] * (P * P * C) + tl.arange(0, BLOCK_F)[None, :]
    tl.store(out, acc.to(tokens_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _backward_kernel(
    grad_tokens_ptr,
    image_ptr,
    centres_ptr,
    affine_ptr,
    grad_image_ptr,
    grad_centres_ptr,
    num_patches,
    K,
    B,
    C,
    H,
    W,
    stride_b,
    stride_c,
    stride_h,
    stride_w,
    P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    NEED_IMAGE_GRAD: tl.constexpr,
    NEED_CENTRE_GRAD: tl.constexpr,
    AFFINE: tl.constexpr,
):
    patch, patch_ok, c, tile_ok, xs, ys, fx, fy, scale_x, scale_y = _patch_tile(
        centres_ptr, affine_ptr, num_patches, K, C, H, W, P, BLOCK_K, BLOCK_F, AFFINE
    )
    features = patch.to(tl.int64)[:, None] * (P * P * C) + tl.arange(0, BLOCK_F)[None, :]
    grad = tl.load(grad_tokens_ptr + features, mask=tile_ok, other=0.0)
    grad = grad.to(tl.float32)
    b = (patch // K % B).to(tl.int64)[:, None]
    image_base = image_ptr + b * stride_b + c[None, :] * stride_c
    # The float32 image-gradient buffer is contiguous [B, C, H, W].
    grad_base = grad_image_ptr + (b * C + c[None, :]) * H * W
    grad_fx = tl.zeros((BLOCK_K, BLOCK_F), dtype=tl.float32)
    grad_fy = tl.zeros((BLOCK_K, BLOCK_F), dtype=tl.float32)
    for dy in tl.static_range(2):
        wy = fy if dy == 1 else 1.0 - fy
        y = ys + dy
        y_ok = (y >= 0) & (y < H)
        for dx in tl.static_range(2):
            wx = fx if dx == 1 else 1.0 - fx
            x = xs + dx
            ok = tile_ok & y_ok & (x >= 0) & (x < W)
            if NEED_IMAGE_GRAD:
                tl.atomic_add(grad_base + y * W + x, grad * wx * wy, mask=ok)
            if NEED_CENTRE_GRAD:
                value = tl.load(image_base + y * stride_h + x * stride_w, mask=ok, other=0.0).to(tl.float32)
                # d weight / d f is -1 for the left/top tap and +1 for the right/bottom one.
                grad_fx += (2 * dx - 1) * wy * grad * value
                grad_fy += (2 * dy - 1) * wx * grad * value
    if NEED_CENTRE_GRAD:
        tl.store(grad_centres_ptr + 2 * patch, scale_x * tl.sum(grad_fx, axis=1), mask=patch_ok)
        tl.store(grad_centres_ptr + 2 * patch + 1, scale_y * tl.sum(grad_fy, axis=1), mask=patch_ok)


def _launch_config(num_patches: int, features: int):
    block_f = triton.next_power_of_2(features)
    block_k = max(1, TILE_ELEMENTS // block_f)
    return block_k, block_f, (triton.cdiv(num_patches, block_k),)


def _affine_arg(view_affine, like):
    """(pointer argument, AFFINE flag): float32 [N, 4] or a placeholder."""
    if view_affine is None:
        return torch.empty(1, dtype=torch.float32, device=like.device), False
    return view_affine.to(torch.float32).contiguous(), True


def patch_gather_forward(
    image: torch.Tensor, centres: torch.Tensor, patch_size: int, view_affine: torch.Tensor | None = None
) -> torch.Tensor:
    """tokens [N, K, P*P*C] (image dtype) from image [B, C, H, W], centres [N, K, 2] (row n: image n % B)
    and view_affine [N, 4] or None."""
    B, C, H, W = image.shape
    N, K, P = centres.shape[0], centres.shape[1], patch_size
    tokens = torch.empty(N, K, P * P * C, dtype=image.dtype, device=image.device)
    if N * K == 0:
        return tokens
    centres = centres.to(torch.float32).contiguous()
    affine, has_affine = _affine_arg(view_affine, image)
    block_k, block_f, grid = _launch_config(N * K, P * P * C)
    with on_device_of(image):
        _forward_kernel[grid](
            image,
            centres,
            affine,
            tokens,
            N * K,
            K,
            B,
            C,
            H,
            W,
            *image.stride(),
            P=P,
            BLOCK_K=block_k,
            BLOCK_F=block_f,
            AFFINE=has_affine,
        )
    return tokens


def patch_gather_backward(grad_tokens, image, centres, patch_size, need_image_grad, need_centre_grad, view_affine=None):
    """(grad_image like image or empty, grad_centres [N, K, 2] in centres' dtype or empty)."""
    B, C, H, W = image.shape
    N, K, P = centres.shape[0], centres.shape[1], patch_size
    grad_buffer = torch.zeros(B, C, H, W, dtype=torch.float32, device=image.device) if need_image_grad else None
    grad_centres = torch.zeros(N, K, 2, dtype=torch.float32, device=image.device) if need_centre_grad else None
    if N * K > 0 and (need_image_grad or need_centre_grad):
        block_k, block_f, grid = _launch_config(N * K, P * P * C)
        unused = torch.empty(1, dtype=torch.float32, device=image.device)
        affine, has_affine = _affine_arg(view_affine, image)
        with on_device_of(image):
            _backward_kernel[grid](
                grad_tokens.contiguous(),
                image,
                centres.to(torch.float32).contiguous(),
                affine,
                grad_buffer if need_image_grad else unused,
                grad_centres if need_centre_grad else unused,
                N * K,
                K,
                B,
                C,
                H,
                W,
                *image.stride(),
                P=P,
                BLOCK_K=block_k,
                BLOCK_F=block_f,
                NEED_IMAGE_GRAD=need_image_grad,
                NEED_CENTRE_GRAD=need_centre_grad,
                AFFINE=has_affine,
                num_warps=BACKWARD_NUM_WARPS,
            )
    grad_image = image.new_empty(0)
    if need_image_grad:
        grad_image = torch.empty_like(image)
        grad_image.copy_(grad_buffer)
    grad_centres = grad_centres.to(centres.dtype) if need_centre_grad else centres.new_empty(0)
    return grad_image, grad_centres
