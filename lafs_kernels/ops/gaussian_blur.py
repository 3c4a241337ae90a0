"""Separable Gaussian blur with one sigma per image (DINO's blur in LAFS pretraining's views).

Shapes:
  images        [B, C, H, W]  float, any strides
  sigma         [N]           blur sigma along W in pixels (float64); ``sigma_y`` [N] along H (None: the same)
  source_index  [N]           int64, optional: output n blurs ``images[source_index[n]]`` (None: N = B, image n),
                              without copying the sources out first
  returns       [N, C, H, W]  the images' dtype

Taps ``-radius..radius`` of ``exp(-t^2 / (2 sigma^2))``, normalised in float64; taps below ``eps * 1e-6`` of
the images' dtype (they cannot change a sum in that dtype) or below its smallest normal number are set to zero,
then the taps are cast to it.  Reflect padding (the edge pixel is not repeated; ``radius`` must be smaller than H
and W); the blur runs along W, then along H.  Backends: ``torch`` (two depthwise ``conv2d`` calls on the padded
image, as torchvision's tensor ``gaussian_blur``) and ``cpu`` (the C++ kernel, ``csrc/cpu/gaussian_blur.cpp``:
float32 / float64 on CPU tensors).  ``LAFS_KERNELS_BACKEND`` does not apply here; ``backend=`` does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dispatch import Call, reference_and_kernels, register
from ._autocast import autocast_off

BACKENDS = register(reference_and_kernels("gaussian_blur"))


def gaussian_kernels(sigma: Tensor, radius: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``[N, 2 * radius + 1]`` normalised Gaussian taps in ``dtype``, one row per ``sigma [N]``, computed in float64;
    taps below ``finfo(dtype).eps * 1e-6`` or ``finfo(dtype).tiny`` (float16's is larger) are zero."""
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma.to(torch.float64).cpu()[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    # A narrow sigma's outer taps would otherwise be subnormal in float32, and a multiply by a subnormal
    # is several times slower on x86 (for sigmas of 0.3-0.5 the CPU kernel took 4.7x, conv2d 3.2x longer); zeros
    # also let the CPU kernel skip the outer taps of a narrow sigma.
    info = torch.finfo(dtype)
    return kernel.masked_fill(kernel < max(info.eps * 1e-6, info.tiny), 0.0).to(dtype)


def _blur_torch(images: Tensor, kernel_x: Tensor, kernel_y: Tensor, radius: int) -> Tensor:
    n, c, h, w = images.shape
    kernel_x, kernel_y = kernel_x.repeat_interleave(c, dim=0), kernel_y.repeat_interleave(c, dim=0)
    flat = F.pad(images.reshape(1, n * c, h, w), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernel_x[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel_y[:, None, :, None], groups=n * c)
    return flat.view(n, c, h, w)


def gaussian_blur(
    images: Tensor,
    sigma: Tensor,
    sigma_y: Optional[Tensor] = None,
    radius: int = 6,
    backend: Optional[str] = None,
    source_index: Optional[Tensor] = None,
) -> Tensor:
    """Blur ``images [B, C, H, W]``: output n is image ``source_index[n]`` (or n) blurred with ``sigma[n]`` along W
    and ``sigma_y[n]`` along H; see the module docstring.  ``backend``: "torch" or "cpu" (None: the best that can
    run)."""
    if images.dim() != 4:
        raise ValueError(f"gaussian_blur needs images [N, C, H, W], got shape {tuple(images.shape)}")
    batch, _, h, w = images.shape
    n = batch
    if source_index is not None:
        if source_index.dim() != 1 or source_index.dtype != torch.int64:
            raise ValueError(
                f"gaussian_blur: source_index must be int64 [N], got {tuple(source_index.shape)} {source_index.dtype}"
            )
        n = source_index.shape[0]
        if n and (int(source_index.min()) < 0 or int(source_index.max()) >= batch):
            raise ValueError(
                f"gaussian_blur: source_index must lie in [0, {batch}), got range "
                f"[{int(source_index.min())}, {int(source_index.max())}]"
            )
    for name, s in (("sigma", sigma), ("sigma_y", sigma if sigma_y is None else sigma_y)):
        if s.shape != (n,):
            raise ValueError(f"gaussian_blur: {name} must be [N] = [{n}], got {tuple(s.shape)}")
        if not bool((s > 0).all()):
            raise ValueError(f"gaussian_blur: {name} must be > 0, got min {float(s.min())}")
    if not 0 <= radius < min(h, w):
        raise ValueError(
            f"gaussian_blur: radius must be in [0, min(H, W)) for reflect padding, got {radius} for {h}x{w}"
        )
    kernel_x = gaussian_kernels(sigma, radius, images.dtype).to(images.device)
    kernel_y = kernel_x if sigma_y is None else gaussian_kernels(sigma_y, radius, images.dtype).to(images.device)
    name = BACKENDS.select(Call(device=images.device, dtype=images.dtype), backend, env=False)
    if name == "cpu":
        return torch.ops.lafs_kernels._gaussian_blur(
            images.contiguous(),
            kernel_x,
            kernel_y,
            None if source_index is None else source_index.to(images.device).contiguous(),
        )
    if source_index is not None:
        images = images.index_select(0, source_index.to(images.device))
    # Under autocast conv2d would run (and return) in bfloat16 / float16: the blur keeps the images' dtype.
    with autocast_off(images):
        return _blur_torch(images, kernel_x, kernel_y, radius)
