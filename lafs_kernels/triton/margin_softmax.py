"""Triton kernels of the margin-softmax cross-entropy, one class chunk per launch.

Each program owns a ``[BLOCK_B rows, BLOCK_C classes]`` tile: it computes the raw
dot products with ``tl.dot`` over D, the centres' squared norms from the same
loads (W is never normalised in memory), the cosines, the logits with the
margined target logits put in place, and then
* forward: the tile's max, sum of exponentials, logit sum and best cosine per row;
* backward: ``g = dcos / |W_c|`` for the tile and ``sum_b dcos * cos / |W_c|^2`` per
  class, from which the caller's two GEMMs give the gradients of x and W.

The margined target logits and their derivatives are computed by the caller from
the ``B*T`` gathered centres, so no kernel needs ``acos``.  Launchers take tensors
and return tensors; they know nothing of backend selection.
"""

import torch
import triton
import triton.language as tl

from ._launch import on_device_of

# A global read inside a kernel must be a constexpr (the interpreter accepts a plain float; compilation does not).
EPS = tl.constexpr(1e-12)
MAX_GRID_Y = 65535
"""CUDA's limit on gridDim.y: the class blocks of one launch (program id 1) must not exceed it."""


def _blocks(device: torch.device):
    """(BLOCK_B, BLOCK_C, BLOCK_D, num_warps); the interpreter gets small tiles (it runs numpy
    per tile).  On GPU the backward keeps about six [64, 128] float32 tiles live: 8 warps keep
    them in registers.  BLOCK_D 32 for every dtype: with 64 the float32 (exact, non tensor-core)
    forward spilled 1088 bytes per thread on sm_90, and the 16-bit ones 112-208 bytes on sm_80 or
    sm_90 under Triton 3.4-3.6 (none under 3.8); with 32 no kernel spills more than 64 bytes under
    Triton 3.3-3.8 (tests/kernels/triton_gpu_compile.py prints registers and spills)."""
    if device.type == "cuda":
        return 64, 128, 32, 8
    return 16, 32, 16, 4


@triton.jit
def _tile_logits(
    X,
    W,
    INV_X,
    LABELS,
    TARGET,
    B,
    C,
    D,
    s,
    stride_x,
    stride_w,
    T: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """This program's tile (rows from program id 0, classes from program id 1): returns rows [BLOCK_B],
    cols [BLOCK_C], their validity, cos and logits [BLOCK_B, BLOCK_C] (targets margined) and inv_w [BLOCK_C]."""
    local_rows = tl.arange(0, BLOCK_B)
    local_cols = tl.arange(0, BLOCK_C)
    rows = tl.program_id(0) * BLOCK_B + local_rows
    cols = tl.program_id(1) * BLOCK_C + local_cols
    row_ok = rows < B
    col_ok = cols < C
    # The tile's first row of x and of W as int64 offsets: cols * stride_w in int32 wraps past 2^31 / D classes
    # (4M at D = 512); the offsets within the tile stay small.
    x_tile_ptr = X + (tl.program_id(0) * BLOCK_B).to(tl.int64) * stride_x + local_rows[:, None] * stride_x
    w_tile_ptr = W + (tl.program_id(1) * BLOCK_C).to(tl.int64) * stride_w + local_cols[:, None] * stride_w
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    w_sq = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        k_ok = ks < D
        x_tile = tl.load(x_tile_ptr + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_tile = tl.load(w_tile_ptr + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            x_tile = x_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        if IEEE:
            acc = tl.dot(x_tile, tl.trans(w_tile), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_tile, tl.trans(w_tile), acc)
        w32 = w_tile.to(tl.float32)
        w_sq += tl.sum(w32 * w32, 1)
    inv_w = 1.0 / tl.maximum(tl.sqrt(w_sq), EPS)
    inv_x = tl.load(INV_X + rows, mask=row_ok, other=0.0)
    cos = acc * inv_x[:, None] * inv_w[None, :]
    logits = cos * s
    for t in tl.static_range(T):
        label = tl.load(LABELS + rows * T + t, mask=row_ok, other=-1)
        target = tl.load(TARGET + rows * T + t, mask=row_ok, other=0.0)
        logits = tl.where(cols[None, :] == label[:, None], target[:, None], logits)
    return rows, cols, row_ok, col_ok, cos, logits, inv_w


@triton.jit
def _forward_kernel(
    X,
    W,
    INV_X,
    LABELS,
    TARGET,
    OUT_MAX,
    OUT_SUM,
    OUT_LOGIT_SUM,
    OUT_BEST,
    OUT_ARG,
    B,
    C,
    D,
    s,
    stride_x,
    stride_w,
    num_col_blocks,
    T: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows, cols, row_ok, col_ok, cos, logits, inv_w = _tile_logits(
        X,
        W,
        INV_X,
        LABELS,
        TARGET,
        B,
        C,
        D,
        s,
        stride_x,
        stride_w,
        T,
        BLOCK_B,
        BLOCK_C,
        BLOCK_D,
        IEEE,
        UPCAST,
    )
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    tile_max = tl.max(logits, 1)
    tile_sum = tl.sum(tl.exp(logits - tile_max[:, None]), 1)
    logit_sum = tl.sum(tl.where(col_ok[None, :], logits, 0.0), 1)
    cos = tl.where(col_ok[None, :], cos, float("-inf"))
    best = tl.max(cos, 1)
    arg = tl.argmax(cos, 1) + tl.program_id(1) * BLOCK_C
    out = rows.to(tl.int64) * num_col_blocks + tl.program_id(1)
    tl.store(OUT_MAX + out, tile_max, mask=row_ok)
    tl.store(OUT_SUM + out, tile_sum, mask=row_ok)
    tl.store(OUT_LOGIT_SUM + out, logit_sum, mask=row_ok)
    tl.store(OUT_BEST + out, best, mask=row_ok)
    tl.store(OUT_ARG + out, arg, mask=row_ok)


@triton.jit
def _backward_kernel(
    X,
    W,
    INV_X,
    LABELS,
    TARGET,
    DERIV,
    LSE,
    GRAD_LSE,
    GRAD_TARGET,
    GRAD_LOGIT_SUM,
    G,
    RADIAL,
    B,
    C,
    D,
    s,
    stride_x,
    stride_w,
    T: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows, cols, row_ok, col_ok, cos, logits, inv_w = _tile_logits(
        X,
        W,
        INV_X,
        LABELS,
        TARGET,
        B,
        C,
        D,
        s,
        stride_x,
        stride_w,
        T,
        BLOCK_B,
        BLOCK_C,
        BLOCK_D,
        IEEE,
        UPCAST,
    )
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    grad_lse = tl.load(GRAD_LSE + rows, mask=row_ok, other=0.0)
    grad_logit_sum = tl.load(GRAD_LOGIT_SUM + rows, mask=row_ok, other=0.0)
    # d loss / d logit = grad_lse * softmax + grad_logit_sum (+ grad_target at the targets)
    dlogit = tl.exp(logits - lse[:, None]) * grad_lse[:, None] + grad_logit_sum[:, None]
    slope = tl.full([BLOCK_B, BLOCK_C], 1.0, dtype=tl.float32)
    for t in tl.static_range(T):
        label = tl.load(LABELS + rows * T + t, mask=row_ok, other=-1)
        hit = cols[None, :] == label[:, None]
        grad_target = tl.load(GRAD_TARGET + rows * T + t, mask=row_ok, other=0.0)
        deriv = tl.load(DERIV + rows * T + t, mask=row_ok, other=1.0)
        dlogit += tl.where(hit, grad_target[:, None], 0.0)
        slope = tl.where(hit, deriv[:, None], slope)
    dcos = tl.where(row_ok[:, None] & col_ok[None, :], dlogit * slope * s, 0.0)
    nonzero = (inv_w < 0.5 / EPS).to(tl.float32)  # a zero centre has inv_w = 1 / EPS
    radial = tl.sum(dcos * cos, 0) * inv_w * inv_w * nonzero
    tl.store(RADIAL + tl.program_id(0).to(tl.int64) * C + cols, radial, mask=col_ok)
    g = dcos * inv_w[None, :]
    # g [B, C]: rows * C in int32 wraps once B * C reaches 2^31 (B = 1024 with a chunk of 2M classes); the
    # tile's first row in int64, the offsets within the tile (under BLOCK_B * MAX_CLASSES_PER_LAUNCH) in int32.
    in_tile = tl.arange(0, BLOCK_B)[:, None] * C + cols[None, :]
    g_tile = G + (tl.program_id(0) * BLOCK_B).to(tl.int64) * C + in_tile
    tl.store(g_tile, g.to(G.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


COMPILE_OPTIONS = {"enable_fp_fusion": False}
"""For both kernels: a logit rounded as ``cos * s`` in the forward must be rounded the same in the backward,
where ``logit - lse`` would otherwise fuse into an FMA (the product's rounding, up to half an ulp of s,
then reaches the exponent of a class that holds the row's probability, and its gradient p - 1)."""


def max_classes_per_launch(device: torch.device) -> int:
    """The most classes one launch takes: MAX_GRID_Y blocks of BLOCK_C (8,388,480 on CUDA); the chunk loops
    (``lafs_kernels.ops.margin_chunks``) hand the kernels no larger chunks."""
    return MAX_GRID_Y * _blocks(device)[1]


def _common(x: torch.Tensor, inv_x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor):
    # The dot products run on the raw inputs (exact in their dtype, float32 accumulation);
    # the norms are applied to the accumulated tile.
    x, w, inv_x = x.contiguous(), w.contiguous(), inv_x.float().contiguous()
    block_b, block_c, block_d, num_warps = _blocks(w.device)
    grid = (triton.cdiv(x.shape[0], block_b), triton.cdiv(w.shape[0], block_c))
    if grid[1] > MAX_GRID_Y:  # a CUDA launch would fail with "invalid argument"
        raise ValueError(
            f"margin softmax (triton): {w.shape[0]} classes in one chunk; at most "
            f"{max_classes_per_launch(w.device)} fit one launch"
        )
    meta = dict(
        T=labels.shape[1],
        BLOCK_B=block_b,
        BLOCK_C=block_c,
        BLOCK_D=block_d,
        num_warps=num_warps,
        IEEE=w.dtype == torch.float32,
        # The interpreter's tl.dot mis-multiplies bfloat16 (triton 3.8): it gets float32 tiles there.
        UPCAST=w.device.type == "cpu" and w.dtype == torch.bfloat16,
        **COMPILE_OPTIONS,
    )
    return x, w, inv_x, grid, meta


def chunk_forward(x, inv_x, w, labels, target_logit, s: float):
    """One chunk's row statistics.

    x [B, D] embeddings and inv_x [B] their inverse norms; w [c, D] the chunk of W; labels [B, T] int64 columns
    of the targets in this chunk (-1: none); target_logit [B, T] float32 (s * margined cos).
    Returns the chunk's log-sum-exp [B] (float64: the tiles' max plus the log of their shifted sums), logit
    sum [B], best cosine [B] and its column [B].
    """
    x, w, inv_x, grid, meta = _common(x, inv_x, w, labels)
    rows, cols = x.shape[0], grid[1]
    stats = torch.empty(4, rows, cols, dtype=torch.float32, device=x.device)
    arg = torch.empty(rows, cols, dtype=torch.int32, device=x.device)
    with on_device_of(x):
        _forward_kernel[grid](
            x,
            w,
            inv_x,
            labels.contiguous(),
            target_logit.float().contiguous(),
            stats[0],
            stats[1],
            stats[2],
            stats[3],
            arg,
            rows,
            w.shape[0],
            x.shape[1],
            float(s),
            x.stride(0),
            w.stride(0),
            cols,
            **meta,
        )
    tile_max, tile_sum, tile_logit_sum, tile_best = stats
    tile_max, tile_sum = tile_max.double(), tile_sum.double()
    chunk_max = tile_max.max(1).values
    chunk_lse = chunk_max + torch.log((tile_sum * torch.exp(tile_max - chunk_max[:, None])).sum(1))
    best, block = tile_best.max(1, keepdim=True)
    return chunk_lse, tile_logit_sum.sum(1), best[:, 0], arg.gather(1, block)[:, 0].long()


def chunk_backward(
    x, inv_x, w, labels, target_logit, target_derivative, lse, grad_lse, grad_target, grad_logit_sum, s: float
):
    """One chunk's ``g = dcos / |W_c|`` [B, c] (W's dtype) and ``radial`` [c] float32
    (``sum_b dcos * cos / |W_c|^2``, 0 for a zero centre).

    Inputs as :func:`chunk_forward`, plus target_derivative [B, T], lse [B] and the
    gradients of lse [B], target_logit [B, T] and logit sum [B] (all float32).
    """
    x, w, inv_x, grid, meta = _common(x, inv_x, w, labels)
    rows, classes = x.shape[0], w.shape[0]
    g = torch.empty(rows, classes, dtype=w.dtype, device=x.device)
    radial = torch.empty(grid[0], classes, dtype=torch.float32, device=x.device)

    def f32(t):
        return t.float().contiguous()

    with on_device_of(x):
        _backward_kernel[grid](
            x,
            w,
            inv_x,
            labels.contiguous(),
            f32(target_logit),
            f32(target_derivative),
            f32(lse),
            f32(grad_lse),
            f32(grad_target),
            f32(grad_logit_sum),
            g,
            radial,
            rows,
            classes,
            x.shape[1],
            float(s),
            x.stride(0),
            w.stride(0),
            **meta,
        )
    return g, radial.sum(0)
