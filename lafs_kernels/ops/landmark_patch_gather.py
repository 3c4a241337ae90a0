"""Landmark-centred patch gather (SPEC section 1): P x P patches around landmarks as tokens.

Shapes:
  image        [B, C, H, W]  float32 / float16 / bfloat16 / float64, any strides
  landmarks    [N, L, 2]     pixel coordinates (x along W, y along H); N a multiple of B,
                             row n belongs to image n % B (view-major: row v*B + b is view v of image b)
  index        [N, K]        int64 in [0, L): which landmarks become tokens (repeats allowed)
  view_affine  [N, 4]        optional (scale_x, scale_y, offset_x, offset_y) per row
  tokens       [N, K, P*P*C] dtype of ``image``; feature ``f = (i*P + j)*C + c`` where
                             i is the x offset, j the y offset, c the channel

Token k samples bilinearly (zero padding, like ``grid_sample(align_corners=False)``)
at ``x_i = lx + i - P/2 - 0.5`` and ``y_j = ly + j - P/2 - 0.5``.  With a view affine
these are view coordinates, mapped into the source image as
``(scale_x * x_i + offset_x, scale_y * y_j + offset_y)`` before sampling, so a
random resized crop (and flip) of the image is sampled without materialising it:
a crop box ``(x0, y0, w, h)`` resized to ``S x S`` (bilinear, align_corners=False,
no antialias) is ``scale_x = w/S, offset_x = x0 + 0.5*w/S - 0.5`` (y alike) and its
horizontal flip ``scale_x = -w/S, offset_x = x0 + (S - 0.5)*w/S - 0.5``
(:func:`crop_affine` builds these).  Non-finite centres or affines give a zero patch
and zero gradients; the affine gets no gradient.

Structure: selecting landmarks (``index`` or ``num_samples`` drawn from the
generator) and jitter are plain torch and produce ``centres [N, K, 2]``, so
autograd sums the landmark gradient over repeated indices and every backend
sees the same centres for the same generator state.  The custom op
``lafs_kernels::landmark_patch_gather`` then gathers patches at those centres
with one of the backends below; its backward is the custom op
``lafs_kernels::landmark_patch_gather_backward``.  Both take the backend name as
an argument, so ``torch.compile`` traces each as one node.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .. import _extension
from .._dispatch import (
    Backend,
    OpBackends,
    deterministic_requested,
    register,
    requires_extension,
    requires_triton,
    select_for_tensor,
)

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

BACKENDS = register(
    OpBackends(
        op="landmark_patch_gather",
        backends=(
            Backend("torch", frozenset({"cpu", "cuda"})),
            Backend("cpu", frozenset({"cpu"}), checks=(requires_extension("cpu"),)),
            # The Triton image gradient uses float atomics: no deterministic mode.
            Backend(
                "triton",
                frozenset({"cpu", "cuda"}),
                dtypes=TRITON_DTYPES,
                checks=(requires_triton,),
                deterministic=False,
            ),
            Backend("cuda", frozenset({"cuda"}), checks=(requires_extension("cuda"),)),
        ),
        preference={"cuda": ["cuda", "triton", "torch"], "cpu": ["cpu", "torch"]},
    )
)


# --------------------------------------------------------------------------- reference (torch backend)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bilinear_taps(image: Tensor, centres: Tensor, patch_size: int, view_affine: Optional[Tensor] = None):
    """The four bilinear taps of every sample of every patch.

    Yields ``(dx, dy, weight_x [N,K,P], weight_y [N,K,P], inside [N,K,P,P],
    flat [N,K,P,P])``: tap (dx, dy) of sample (i, j) is pixel ``flat`` (index
    into H*W), weighted ``weight_x[i] * weight_y[j]``, and zero where not
    ``inside`` the image.  With ``view_affine`` [N, 4] the positions are mapped
    into the source (computed in float64, weights returned in the centres' dtype).
    """
    H, W = image.shape[-2:]
    P = patch_size
    # A non-finite centre (or affine) gives a zero patch: its positions move to -2, where every tap
    # is outside, and the inputs are made finite first so that no NaN reaches a gradient.
    finite = centres.isfinite().all(dim=-1, keepdim=True)  # [N, K, 1]
    centres = torch.where(finite, centres, torch.zeros_like(centres))
    offsets = torch.arange(P, device=centres.device, dtype=centres.dtype) - P / 2 - 0.5
    if view_affine is None:
        x = centres[..., 0, None] + offsets  # [N, K, P] sample positions along W
        y = centres[..., 1, None] + offsets  # [N, K, P] sample positions along H
    else:
        affine_ok = view_affine.isfinite().all(dim=-1)  # [N]
        finite = finite & affine_ok[:, None, None]
        identity = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=view_affine.dtype, device=view_affine.device)
        a = torch.where(affine_ok[:, None], view_affine, identity).double()[:, None, None, :]  # [N, 1, 1, 4]
        x = a[..., 0] * (centres[..., 0, None].double() + offsets.double()) + a[..., 2]
        y = a[..., 1] * (centres[..., 1, None].double() + offsets.double()) + a[..., 3]
    x = torch.where(finite, x, -2.0)
    y = torch.where(finite, y, -2.0)
    x_floor, y_floor = x.floor(), y.floor()
    fx, fy = (x - x_floor).to(centres.dtype), (y - y_floor).to(centres.dtype)
    for dx, weight_x in ((0, 1 - fx), (1, fx)):
        for dy, weight_y in ((0, 1 - fy), (1, fy)):
            xs, ys = x_floor + dx, y_floor + dy
            inside = ((xs >= 0) & (xs <= W - 1))[..., :, None] & ((ys >= 0) & (ys <= H - 1))[..., None, :]
            flat = ys.clamp(0, H - 1)[..., None, :] * W + xs.clamp(0, W - 1)[..., :, None]
            yield dx, dy, weight_x, weight_y, inside, flat.long()


def _pixels(image: Tensor, rows: int) -> Tensor:
    """[B, C, H, W] -> [N, H*W, C] in the accumulation dtype, row n holding image n % B."""
    B, C, H, W = image.shape
    pixels = image.permute(0, 2, 3, 1).reshape(B, H * W, C).to(_accumulation_dtype(image.dtype))
    return pixels if rows == B else pixels.repeat(rows // B, 1, 1)


def _tap_values(pixels: Tensor, flat: Tensor, inside: Tensor) -> Tensor:
    """pixels [N, H*W, C] at the taps ``flat`` [N, K, P, P] (clamped indices) -> [N, K, P, P, C], zero where the
    tap is outside the image (``inside`` False): a NaN or Inf pixel at the clamped index must not leak out."""
    N, C = pixels.shape[0], pixels.shape[2]
    values = pixels.gather(1, flat.reshape(N, math.prod(flat.shape[1:]), 1).expand(-1, -1, C)).reshape(*flat.shape, C)
    return values.masked_fill(~inside[..., None], 0)


def reference_forward(image: Tensor, centres: Tensor, patch_size: int, view_affine: Optional[Tensor] = None) -> Tensor:
    """tokens [N, K, P*P*C] from image [B, C, H, W], centres [N, K, 2] and view_affine [N, 4] or None (plain torch)."""
    C = image.shape[1]
    N, K, P = centres.shape[0], centres.shape[1], patch_size
    pixels = _pixels(image, N)
    tokens = pixels.new_zeros(N, K, P, P, C)
    for _, _, weight_x, weight_y, inside, flat in _bilinear_taps(image, centres.to(pixels.dtype), P, view_affine):
        values = _tap_values(pixels, flat, inside)
        weight = weight_x[..., :, None] * weight_y[..., None, :] * inside
        tokens += weight[..., None] * values
    return tokens.reshape(N, K, P * P * C).to(image.dtype)


def reference_backward(grad_tokens, image, centres, patch_size, need_image_grad, need_centre_grad, view_affine=None):
    """(grad_image [B,C,H,W] or empty, grad_centres [N,K,2] or empty) of :func:`reference_forward`."""
    B, C, H, W = image.shape
    N, K, P = centres.shape[0], centres.shape[1], patch_size
    pixels = _pixels(image, N)
    grad = grad_tokens.reshape(N, K, P, P, C).to(pixels.dtype)
    grad_pixels = torch.zeros_like(pixels) if need_image_grad else None
    grad_x = pixels.new_zeros(N, K)
    grad_y = pixels.new_zeros(N, K)
    rows = torch.arange(N, device=image.device)[:, None]
    for dx, dy, weight_x, weight_y, inside, flat in _bilinear_taps(image, centres.to(pixels.dtype), P, view_affine):
        if need_image_grad:
            weight = weight_x[..., :, None] * weight_y[..., None, :] * inside
            # index_put_ with accumulate is deterministic on CPU and CUDA.
            taps = K * P * P
            grad_pixels.index_put_((rows, flat.reshape(N, taps)), (weight[..., None] * grad).reshape(N, taps, C), True)
        if need_centre_grad:
            values = _tap_values(pixels, flat, inside)
            grad_value = (grad * values).sum(-1) * inside  # d loss / d (tap value * weight) [N, K, P, P]
            sign_x, sign_y = 2 * dx - 1, 2 * dy - 1  # d weight / d f: -1 for the left/top tap, +1 else
            grad_x += sign_x * (grad_value * weight_y[..., None, :]).sum((-1, -2))
            grad_y += sign_y * (grad_value * weight_x[..., :, None]).sum((-1, -2))
    grad_image = image.new_empty(0)
    if need_image_grad:
        grad_pixels = grad_pixels.reshape(N // max(B, 1), B, H * W, C).sum(0)  # the views of each image, in order
        grad_image = torch.empty_like(image)
        grad_image.copy_(grad_pixels.reshape(B, H, W, C).permute(0, 3, 1, 2))
    if need_centre_grad and view_affine is not None:
        # d sample / d centre = scale (zero where the patch is dropped for a non-finite affine)
        scale = torch.where(view_affine.isfinite().all(-1, keepdim=True), view_affine[:, :2], 0).to(grad_x.dtype)
        grad_x = grad_x * scale[:, 0, None]
        grad_y = grad_y * scale[:, 1, None]
    grad_centres = torch.stack((grad_x, grad_y), dim=-1).to(centres.dtype) if need_centre_grad else centres.new_empty(0)
    return grad_image, grad_centres


# --------------------------------------------------------------------------- backend table


def _triton_module():
    from ..triton import landmark_patch_gather as triton_gather  # imports triton only when used

    return triton_gather


def _forward(backend, image, centres, patch_size, view_affine=None):
    if backend == "torch":
        return reference_forward(image, centres, patch_size, view_affine)
    if backend == "triton":
        return _triton_module().patch_gather_forward(image, centres, patch_size, view_affine)
    _extension.load()  # registers the raw kernels (a no-op after the first call)
    return torch.ops.lafs_kernels._patch_gather_fwd(image, centres, patch_size, view_affine)


def _backward(
    backend, grad_tokens, image, centres, patch_size, need_image_grad, need_centre_grad, deterministic, view_affine=None
):
    if backend == "torch":
        return reference_backward(
            grad_tokens, image, centres, patch_size, need_image_grad, need_centre_grad, view_affine
        )
    if backend == "triton":
        return _triton_module().patch_gather_backward(
            grad_tokens, image, centres, patch_size, need_image_grad, need_centre_grad, view_affine
        )
    _extension.load()
    return torch.ops.lafs_kernels._patch_gather_bwd(
        grad_tokens, image, centres, patch_size, need_image_grad, need_centre_grad, deterministic, view_affine
    )


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("lafs_kernels::landmark_patch_gather", mutates_args=())
def patch_gather_op(
    image: Tensor,
    centres: Tensor,
    patch_size: int,
    backend: str,
    deterministic: bool,
    view_affine: Optional[Tensor] = None,
) -> Tensor:
    """tokens [N, K, P*P*C] at centres [N, K, 2] (already selected and jittered) of image [B, C, H, W]
    (row n: image n % B), through view_affine [N, 4] when given.

    ``deterministic`` only affects the backward pass (image gradient without float atomics).
    """
    return _forward(backend, image, centres, patch_size, view_affine)


@patch_gather_op.register_fake
def _(image, centres, patch_size, backend, deterministic, view_affine=None):
    C = image.shape[1]
    return image.new_empty(centres.shape[0], centres.shape[1], patch_size * patch_size * C)


@torch.library.custom_op("lafs_kernels::landmark_patch_gather_backward", mutates_args=())
def patch_gather_backward_op(
    grad_tokens: Tensor,
    image: Tensor,
    centres: Tensor,
    patch_size: int,
    backend: str,
    need_image_grad: bool,
    need_centre_grad: bool,
    deterministic: bool,
    view_affine: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(grad_image like image or empty, grad_centres [N, K, 2] or empty)."""
    return _backward(
        backend,
        grad_tokens.contiguous(),
        image,
        centres,
        patch_size,
        need_image_grad,
        need_centre_grad,
        deterministic,
        view_affine,
    )


@patch_gather_backward_op.register_fake
def _(
    grad_tokens, image, centres, patch_size, backend, need_image_grad, need_centre_grad, deterministic, view_affine=None
):
    grad_image = torch.empty_like(image) if need_image_grad else image.new_empty(0)
    grad_centres = centres.new_empty(centres.shape) if need_centre_grad else centres.new_empty(0)
    return grad_image, grad_centres


def _setup_context(ctx, inputs, output):
    image, centres, patch_size, backend, deterministic, view_affine = inputs
    ctx.save_for_backward(image, centres, view_affine)
    ctx.patch_size, ctx.backend, ctx.deterministic = patch_size, backend, deterministic


def _backward_formula(ctx, grad_tokens):
    image, centres, view_affine = ctx.saved_tensors
    need_image_grad, need_centre_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_image_grad or need_centre_grad):
        return None, None, None, None, None, None
    grad_image, grad_centres = patch_gather_backward_op(
        grad_tokens,
        image,
        centres,
        ctx.patch_size,
        ctx.backend,
        need_image_grad,
        need_centre_grad,
        ctx.deterministic,
        view_affine,
    )
    # No gradient to view_affine (the agreed API): a crop box is sampled, not learned.
    return (
        grad_image if need_image_grad else None,
        grad_centres if need_centre_grad else None,
        None,
        None,
        None,
        None,
    )


patch_gather_op.register_autograd(_backward_formula, setup_context=_setup_context)


# --------------------------------------------------------------------------- public function


def _check_inputs(image, landmarks, patch_size, index, num_samples, jitter_std, view_affine=None):
    if not isinstance(image, Tensor) or image.dim() != 4:
        raise ValueError(f"image must be a [B, C, H, W] tensor, got {_describe(image)}")
    if image.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"image must be float32, float16, bfloat16 or float64, got {image.dtype}")
    if min(image.shape[1:]) < 1:
        raise ValueError(f"image must have C, H, W >= 1, got shape {tuple(image.shape)}")
    if not isinstance(landmarks, Tensor) or landmarks.dim() != 3 or landmarks.shape[-1] != 2:
        raise ValueError(f"landmarks must be a [N, L, 2] tensor of (x, y), got {_describe(landmarks)}")
    if not landmarks.is_floating_point():
        raise TypeError(f"landmarks must be a floating-point tensor, got {landmarks.dtype}")
    rows, batch = landmarks.shape[0], image.shape[0]
    if rows != batch and (batch == 0 or rows % batch != 0):
        raise ValueError(
            f"landmarks batch {rows} does not match image batch {batch} (nor is it a multiple of it: "
            "row n of the landmarks belongs to image n % B)"
        )
    if landmarks.device != image.device:
        raise ValueError(f"landmarks are on {landmarks.device} but image is on {image.device}")
    if view_affine is not None:
        if not isinstance(view_affine, Tensor) or view_affine.shape != (rows, 4):
            raise ValueError(
                f"view_affine must be a [N, 4] tensor of (scale_x, scale_y, offset_x, offset_y) with N = {rows} "
                f"landmark rows, got {_describe(view_affine)}"
            )
        if not view_affine.is_floating_point():
            raise TypeError(f"view_affine must be a floating-point tensor, got {view_affine.dtype}")
        if view_affine.device != image.device:
            raise ValueError(f"view_affine is on {view_affine.device} but image is on {image.device}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be an int >= 1, got {patch_size!r}")
    if not (isinstance(jitter_std, (int, float)) and math.isfinite(jitter_std) and jitter_std >= 0):
        raise ValueError(f"jitter_std must be a finite number >= 0, got {jitter_std!r}")
    num_landmarks = landmarks.shape[1]
    if index is not None:
        if num_samples is not None:
            raise ValueError("give either index or num_samples, not both")
        if not isinstance(index, Tensor) or index.dim() != 2 or index.shape[0] != rows:
            raise ValueError(f"index must be a [N, K] tensor with N = {rows} landmark rows, got {_describe(index)}")
        if index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"index must be int64 (or int32), got {index.dtype}")
        if index.device != image.device:
            raise ValueError(f"index is on {index.device} but image is on {image.device}")
        # Data-dependent check (one sync); under torch.compile indexing itself still rejects bad indices.
        if index.numel() and not torch.compiler.is_compiling():
            low, high = index.min().item(), index.max().item()
            if low < 0 or high >= num_landmarks:
                raise IndexError(f"index values must lie in [0, {num_landmarks}), got range [{low}, {high}]")


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _generator_of(generator: Union[torch.Generator, int, None]) -> Optional[torch.Generator]:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def draw_index(
    batch: int,
    num_landmarks: int,
    num_samples: int,
    *,
    replacement: bool = True,
    generator: Union[torch.Generator, int, None] = None,
    device: Union[torch.device, str, None] = None,
) -> Tensor:
    """index [batch, num_samples] int64: landmarks drawn uniformly per image, with or
    without replacement, from ``generator`` on its own device (the default
    generator of ``device`` when None), then moved to ``device``."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if num_landmarks < 1 or (not replacement and num_samples > num_landmarks):
        kind = "with" if replacement else "without"
        raise ValueError(f"cannot draw {num_samples} of {num_landmarks} landmarks {kind} replacement")
    generator = _generator_of(generator)
    device = torch.device(device) if device is not None else torch.device("cpu")
    draw_device = generator.device if generator is not None else device
    if replacement:
        index = torch.randint(0, num_landmarks, (batch, num_samples), generator=generator, device=draw_device)
    else:
        scores = torch.rand(batch, num_landmarks, generator=generator, device=draw_device)
        index = scores.argsort(dim=1)[:, :num_samples]
    return index.to(device)


def select_centres(
    landmarks: Tensor,
    *,
    index: Optional[Tensor] = None,
    num_samples: Optional[int] = None,
    replacement: bool = True,
    jitter_std: float = 0.0,
    generator: Union[torch.Generator, int, None] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """centres [B, K, 2] in ``dtype``: landmarks [B, L, 2] selected by ``index`` (or
    ``num_samples`` drawn from ``generator``) plus N(0, jitter_std^2) noise.

    Random numbers come from ``generator`` on its own device (the default
    generator of the landmarks' device when None), drawn in one fixed order
    (indices, then jitter), so the same generator state gives the same centres
    whatever backend gathers the patches.
    """
    generator = _generator_of(generator)
    draw_device = generator.device if generator is not None else landmarks.device
    B, L = landmarks.shape[:2]
    if num_samples is not None:
        index = draw_index(B, L, num_samples, replacement=replacement, generator=generator, device=landmarks.device)
    centres = landmarks.to(dtype)
    if index is not None:
        batch = torch.arange(B, device=landmarks.device)[:, None]
        centres = centres[batch, index.long()]  # backward accumulates over repeated indices
    if jitter_std > 0:
        noise = torch.randn(centres.shape, generator=generator, device=draw_device, dtype=dtype)
        centres = centres + jitter_std * noise.to(landmarks.device)
    return centres


def landmark_patch_gather(
    image: Tensor,
    landmarks: Tensor,
    patch_size: int = 8,
    *,
    index: Optional[Tensor] = None,
    num_samples: Optional[int] = None,
    replacement: bool = True,
    jitter_std: float = 0.0,
    generator: Union[torch.Generator, int, None] = None,
    deterministic: Optional[bool] = None,
    backend: Optional[str] = None,
    view_affine: Optional[Tensor] = None,
) -> Tensor:
    """Sample a P x P patch around each (selected, jittered) landmark: tokens [N, K, P*P*C].

    Args:
      image: [B, C, H, W] float32 / float16 / bfloat16 / float64, any strides.
      landmarks: [N, L, 2] pixel coordinates (x, y), N a multiple of B (row n
        belongs to image n % B; N = B without views); gradients flow to them.
      patch_size: P >= 1.
      index: optional [N, K] int64 in [0, L), repeats allowed; default all L in order.
      num_samples: draw K = num_samples indices per image from ``generator``
        (with replacement unless ``replacement=False``).
      jitter_std: std (pixels) of Gaussian noise added to each selected coordinate.
      generator: torch.Generator or int seed for the random parts.
      deterministic: bitwise-repeatable image gradient (no float atomics);
        None follows ``torch.use_deterministic_algorithms``.
      backend: force 'torch', 'cpu', 'triton' or 'cuda' (else the best available;
        ``LAFS_KERNELS_BACKEND`` also forces one).
      view_affine: optional [N, 4] (scale_x, scale_y, offset_x, offset_y): landmarks
        and jitter are in the coordinates of a view of the image (a resized crop,
        possibly flipped) whose pixel (x, y) lies at (scale_x * x + offset_x,
        scale_y * y + offset_y) of the source image; patches are sampled from the
        source through this map (:func:`crop_affine` builds it from crop boxes).
        No gradient flows to it.
    """
    _check_inputs(image, landmarks, patch_size, index, num_samples, jitter_std, view_affine)
    centres = select_centres(
        landmarks,
        index=index,
        num_samples=num_samples,
        replacement=replacement,
        jitter_std=float(jitter_std),
        generator=generator,
        dtype=_accumulation_dtype(image.dtype),
    )
    deterministic = deterministic_requested(deterministic)
    name = select_for_tensor(
        BACKENDS.op,
        image,
        backend,
        deterministic=deterministic and image.requires_grad,
        requires_grad=image.requires_grad,
    )
    if view_affine is not None:
        view_affine = view_affine.detach().to(_accumulation_dtype(image.dtype)).contiguous()
    return patch_gather_op(image, centres, patch_size, name, deterministic, view_affine)


def crop_affine(boxes: Tensor, size: int, flip: Optional[Tensor] = None) -> Tensor:
    """view_affine [N, 4] of views that are crops ``boxes`` [N, 4] = (x0, y0, w, h) in source pixels
    (the box's left/top edge and its extent) resized to ``size`` x ``size`` with bilinear
    ``align_corners=False`` and no antialias, horizontally flipped where ``flip`` [N] (bool) is set.

    View pixel x lies at source ``x0 + (x + 0.5) * w / size - 0.5``; flipped, view pixel x is unflipped
    pixel ``size - 1 - x``.
    """
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be a [N, 4] tensor of (x0, y0, w, h), got {_describe(boxes)}")
    boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
    x0, y0, w, h = boxes.unbind(-1)
    scale_x, scale_y = w / size, h / size
    offset_x = x0 + 0.5 * scale_x - 0.5
    offset_y = y0 + 0.5 * scale_y - 0.5
    if flip is not None:
        flip = flip.to(device=boxes.device, dtype=torch.bool)
        offset_x = torch.where(flip, x0 + (size - 0.5) * scale_x - 0.5, offset_x)
        scale_x = torch.where(flip, -scale_x, scale_x)
    return torch.stack((scale_x, scale_y, offset_x, offset_y), dim=-1)
