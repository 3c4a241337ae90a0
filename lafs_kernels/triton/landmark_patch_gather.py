"""Triton kernels of the landmark patch gather (SPEC section 1) and their launchers.

One program handles a tile of ``BLOCK_K`` patches x ``BLOCK_F`` token features;
feature ``f = (i*P + j)*C + c`` samples the image at
``(x0 + i + dx, y0 + j + dy)`` for the four taps (dx, dy), where
``(x0, y0) = floor(centre - P/2 - 0.5)`` and the fractional part gives the
bilinear weights shared by the whole patch.

Backward: the image gradient is accumulated with float32 atomics into a
float32 buffer whatever the image dtype (so it is not bitwise repeatable); the
centre gradient is a reduction over the features of each patch within one
program, so it needs no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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
def _patch_tile(centres_ptr, num_patches, C, H, W, P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr):
    """This program's tile of BLOCK_K patches x BLOCK_F features (feature f = (x_offset * P + y_offset) * C + c).

    Returns patch ids [BLOCK_K] and their validity, the channel of each feature [BLOCK_F], the tile's
    validity [BLOCK_K, BLOCK_F], each feature's top-left tap (xs, ys) [BLOCK_K, BLOCK_F] and the
    patches' bilinear fractions (fx, fy) [BLOCK_K].
    """
    patch = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    patch_ok = patch < num_patches
    x0, y0, fx, fy = _patch_geometry(centres_ptr, patch, patch_ok, H, W, P)
    f = tl.arange(0, BLOCK_F)
    tile_ok = patch_ok[:, None] & (f < P * P * C)[None, :]
    xs = x0[:, None] + (f // (P * C))[None, :]
    ys = y0[:, None] + ((f // C) % P)[None, :]
    return patch, patch_ok, f % C, tile_ok, xs, ys, fx, fy


@triton.jit
def _forward_kernel(
    image_ptr, centres_ptr, tokens_ptr,
    num_patches, K, C, H, W,
    stride_b, stride_c, stride_h, stride_w,
    P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
):
    patch, patch_ok, c, tile_ok, xs, ys, fx, fy = _patch_tile(centres_ptr, num_patches, C, H, W, P, BLOCK_K, BLOCK_F)
    base = image_ptr + (patch // K).to(tl.int64)[:, None] * stride_b + c[None, :] * stride_c
    acc = tl.zeros((BLOCK_K, BLOCK_F), dtype=tl.float32)
    for dy in tl.static_range(2):
        wy = (fy if dy == 1 else 1.0 - fy)[:, None]
        y = ys + dy
        y_ok = (y >= 0) & (y < H)
        for dx in tl.static_range(2):
            wx = (fx if dx == 1 else 1.0 - fx)[:, None]
            x = xs + dx
            ok = tile_ok & y_ok & (x >= 0) & (x < W)
            value = tl.load(base + y * stride_h + x * stride_w, mask=ok, other=0.0).to(tl.float32)
            acc += wx * wy * value
    out = tokens_ptr + patch.to(tl.int64)[:, None] * (P * P * C) + tl.arange(0, BLOCK_F)[None, :]
    tl.store(out, acc.to(tokens_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _backward_kernel(
    grad_tokens_ptr, image_ptr, centres_ptr, grad_image_ptr, grad_centres_ptr,
    num_patches, K, C, H, W,
    stride_b, stride_c, stride_h, stride_w,
    P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr,
    NEED_IMAGE_GRAD: tl.constexpr, NEED_CENTRE_GRAD: tl.constexpr,
):
    patch, patch_ok, c, tile_ok, xs, ys, fx, fy = _patch_tile(centres_ptr, num_patches, C, H, W, P, BLOCK_K, BLOCK_F)
    features = patch.to(tl.int64)[:, None] * (P * P * C) + tl.arange(0, BLOCK_F)[None, :]
    grad = tl.load(grad_tokens_ptr + features, mask=tile_ok, other=0.0)
    grad = grad.to(tl.float32)
    b = (patch // K).to(tl.int64)[:, None]
    image_base = image_ptr + b * stride_b + c[None, :] * stride_c
    # The float32 image-gradient buffer is contiguous [B, C, H, W].
    grad_base = grad_image_ptr + (b * C + c[None, :]) * H * W
    grad_fx = tl.zeros((BLOCK_K, BLOCK_F), dtype=tl.float32)
    grad_fy = tl.zeros((BLOCK_K, BLOCK_F), dtype=tl.float32)
    for dy in tl.static_range(2):
        wy = (fy if dy == 1 else 1.0 - fy)[:, None]
        y = ys + dy
        y_ok = (y >= 0) & (y < H)
        for dx in tl.static_range(2):
            wx = (fx if dx == 1 else 1.0 - fx)[:, None]
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
        tl.store(grad_centres_ptr + 2 * patch, tl.sum(grad_fx, axis=1), mask=patch_ok)
        tl.store(grad_centres_ptr + 2 * patch + 1, tl.sum(grad_fy, axis=1), mask=patch_ok)


def _launch_config(num_patches: int, features: int):
    block_f = triton.next_power_of_2(features)
    block_k = max(1, TILE_ELEMENTS // block_f)
    return block_k, block_f, (triton.cdiv(num_patches, block_k),)


def patch_gather_forward(image: torch.Tensor, centres: torch.Tensor, patch_size: int) -> torch.Tensor:
    """tokens [B, K, P*P*C] (image dtype) from image [B, C, H, W] and centres [B, K, 2]."""
    B, C, H, W = image.shape
    K, P = centres.shape[1], patch_size
    tokens = torch.empty(B, K, P * P * C, dtype=image.dtype, device=image.device)
    if B * K == 0:
        return tokens
    centres = centres.to(torch.float32).contiguous()
    block_k, block_f, grid = _launch_config(B * K, P * P * C)
    _forward_kernel[grid](
        image, centres, tokens, B * K, K, C, H, W, *image.stride(),
        P=P, BLOCK_K=block_k, BLOCK_F=block_f,
    )
    return tokens


def patch_gather_backward(grad_tokens, image, centres, patch_size, need_image_grad, need_centre_grad):
    """(grad_image like image or empty, grad_centres [B, K, 2] in centres' dtype or empty)."""
    B, C, H, W = image.shape
    K, P = centres.shape[1], patch_size
    grad_buffer = torch.zeros(B, C, H, W, dtype=torch.float32, device=image.device) if need_image_grad else None
    grad_centres = torch.zeros(B, K, 2, dtype=torch.float32, device=image.device) if need_centre_grad else None
    if B * K > 0 and (need_image_grad or need_centre_grad):
        block_k, block_f, grid = _launch_config(B * K, P * P * C)
        unused = torch.empty(1, dtype=torch.float32, device=image.device)
        _backward_kernel[grid](
            grad_tokens.contiguous(), image, centres.to(torch.float32).contiguous(),
            grad_buffer if need_image_grad else unused, grad_centres if need_centre_grad else unused,
            B * K, K, C, H, W, *image.stride(),
            P=P, BLOCK_K=block_k, BLOCK_F=block_f,
            NEED_IMAGE_GRAD=need_image_grad, NEED_CENTRE_GRAD=need_centre_grad, num_warps=BACKWARD_NUM_WARPS,
        )
    grad_image = image.new_empty(0)
    if need_image_grad:
        grad_image = torch.empty_like(image)
        grad_image.copy_(grad_buffer)
    grad_centres = grad_centres.to(centres.dtype) if need_centre_grad else centres.new_empty(0)
    return grad_image, grad_centres
