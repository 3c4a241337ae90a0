// CUDA kernels of the landmark patch gather (SPEC section 1).
//
// Same math as csrc/cpu/landmark_patch_gather.cpp: the window origin of a
// patch is (x0, y0) = floor(centre - P/2 - 0.5) and its fractions (fx, fy)
// are shared by all P*P samples; token feature f = (i*P + j)*C + c is
//   r0 = v00 + fx (v10 - v00),  r1 = v01 + fx (v11 - v01),  out = r0 + fy (r1 - r0)
// with v[dx][dy] = image[c, y0+j+dy, x0+i+dx] (zero outside the image).
//
// Rows: centres [N, K, 2] with N a multiple of B; row n samples image n % B.  With a view
// affine ([N, 4] = scale_x, scale_y, offset_x, offset_y) sample i of a patch lies at
// X_i = scale_x * (cx + i - P/2 - 0.5) + offset_x of the source (Y_j alike), computed in
// double as the CPU kernels do, each column / row with its own taps and fraction; the
// landmark gradient is scale_x * sum_i dL/dX_i.
//
// Kernels:
//   forward_kernel          one thread per token feature (coalesced writes).
//   centre_grad_kernel      one warp per patch and a warp reduction (no atomics).
//   image_grad_atomic_kernel  one thread per token feature, float atomics into
//                           an accumulation buffer (fast, not bitwise repeatable).
//   image_grad_gather_kernel  deterministic: one thread per image pixel and
//                           channel sums, in row and patch order (rows b, b+B, ...),
//                           the taps of every patch whose window covers it; each
//                           pixel is written once, without atomics.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>

namespace {

constexpr int kThreads = 256;
constexpr int kTile = 16;            // image_grad_gather_kernel: kTile x kTile pixels per block
constexpr int kChunk = kTile * kTile;  // patches whose geometry a block stages in shared memory at once
constexpr int kFarAway = INT_MIN / 2;  // window origin of an invisible patch: covers no pixel

template <typename acc_t>
struct PatchGeometry {
  int x0, y0;
  acc_t fx, fy;
  bool visible;  // false for non-finite centres and windows entirely outside the image
};

template <typename acc_t>
__device__ __forceinline__ PatchGeometry<acc_t> locate(const acc_t* centres, int64_t bk, int P, int H, int W) {
  const acc_t shift = acc_t(P) / 2 + acc_t(0.5);
  const acc_t x = centres[2 * bk] - shift, y = centres[2 * bk + 1] - shift;
  PatchGeometry<acc_t> g{kFarAway, kFarAway, acc_t(0), acc_t(0), false};
  // Beyond these bounds every tap is outside the image; the comparisons also
  // reject NaN and infinities before the float -> int conversion.
  if (!(x > -acc_t(P + 1) && x < acc_t(W) && y > -acc_t(P + 1) && y < acc_t(H))) return g;
  const acc_t xf = floor(x), yf = floor(y);
  g.x0 = static_cast<int>(xf);
  g.y0 = static_cast<int>(yf);
  g.fx = x - xf;
  g.fy = y - yf;
  g.visible = true;
  return g;
}

// Source taps of sample t along one axis of an affine row: lower tap lo (and lo + 1), the
// fraction, and which of the two lie inside [0, size).  Both outside (or NaN): no taps.
template <typename acc_t>
struct AxisTap {
  int lo;
  acc_t frac;
  bool in_lo, in_hi;
};

__device__ __forceinline__ double affine_position(double centre, double scale, double offset, int t, int P) {
  return scale * ((centre - (double(P) / 2 + 0.5)) + double(t)) + offset;
}

template <typename acc_t>
__device__ __forceinline__ AxisTap<acc_t> axis_tap(acc_t centre, acc_t scale, acc_t offset, int t, int P, int size) {
  const double p = affine_position(centre, scale, offset, t, P);
  if (!(p > -1.0 && p < double(size))) return {kFarAway, acc_t(0), false, false};
  const double pf = floor(p);
  const int lo = static_cast<int>(pf);
  return {lo, static_cast<acc_t>(p - pf), lo >= 0, lo + 1 < size};
}

// Row n's affine, or none.  finite is false for a non-finite affine or centre: zero patch.
template <typename acc_t>
struct RowAffine {
  acc_t sx, sy, ox, oy;
  bool finite;
};

template <typename acc_t>
__device__ __forceinline__ RowAffine<acc_t> row_affine(const acc_t* affine, int64_t n, acc_t cx, acc_t cy) {
  const acc_t* a = affine + 4 * n;
  RowAffine<acc_t> r{a[0], a[1], a[2], a[3], false};
  r.finite = isfinite(cx) && isfinite(cy) && isfinite(r.sx) && isfinite(r.sy) && isfinite(r.ox) && isfinite(r.oy);
  return r;
}

// The four taps of sample (i, j) of an affine patch, zero outside the image.
template <typename scalar_t, typename acc_t>
struct AffineSample {
  acc_t v00, v10, v01, v11, fx, fy;  // v[dx][dy]
};

struct Strides {
  int64_t b, c, h, w;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// image[c, y, x] of one image (base already offset to image b, channel c), zero outside.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t tap(const scalar_t* __restrict__ base, int x, int y, int H, int W, const Strides& s) {
  if (static_cast<unsigned>(x) >= static_cast<unsigned>(W) || static_cast<unsigned>(y) >= static_cast<unsigned>(H)) {
    return acc_t(0);
  }
  return static_cast<acc_t>(base[y * s.h + x * s.w]);
}

// The four taps of feature f of patch bk.
template <typename scalar_t, typename acc_t>
struct Taps {
  acc_t v00, v10, v01, v11;  // v[dx][dy]
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Taps<scalar_t, acc_t> load_taps(const scalar_t* __restrict__ image, int64_t b, int c,
                                                           int x, int y, int H, int W, const Strides& s) {
  const scalar_t* base = image + b * s.b + c * s.c;
  return {tap<scalar_t, acc_t>(base, x, y, H, W, s), tap<scalar_t, acc_t>(base, x + 1, y, H, W, s),
          tap<scalar_t, acc_t>(base, x, y + 1, H, W, s), tap<scalar_t, acc_t>(base, x + 1, y + 1, H, W, s)};
}

// Feature f -> (i, j, c) with f = (i*P + j)*C + c.
struct Feature {
  int i, j, c;
};

__device__ __forceinline__ Feature split_feature(int f, int P, int C) {
  const int i = f / (P * C);
  const int rest = f - i * P * C;
  const int j = rest / C;
  return {i, j, rest - j * C};
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ AffineSample<scalar_t, acc_t> affine_sample(const scalar_t* __restrict__ image, int64_t b,
                                                                       const Feature& q, const RowAffine<acc_t>& a,
                                                                       acc_t cx, acc_t cy, int P, int H, int W,
                                                                       const Strides& s) {
  const AxisTap<acc_t> tx = axis_tap(cx, a.sx, a.ox, q.i, P, W);
  const AxisTap<acc_t> ty = axis_tap(cy, a.sy, a.oy, q.j, P, H);
  const scalar_t* base = image + b * s.b + q.c * s.c;
  auto at = [&](bool ok, int x, int y) { return ok ? static_cast<acc_t>(base[y * s.h + x * s.w]) : acc_t(0); };
  return {at(tx.in_lo && ty.in_lo, tx.lo, ty.lo), at(tx.in_hi && ty.in_lo, tx.lo + 1, ty.lo),
          at(tx.in_lo && ty.in_hi, tx.lo, ty.lo + 1), at(tx.in_hi && ty.in_hi, tx.lo + 1, ty.lo + 1), tx.frac, ty.frac};
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ image, const acc_t* __restrict__ centres,
                               const acc_t* __restrict__ affine, scalar_t* __restrict__ tokens, index_t total, int K,
                               int B, int P, int C, int H, int W, Strides s) {
  const index_t F = static_cast<index_t>(P) * P * C;
  for (index_t e = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t nk = e / F;
    const int64_t n = nk / K, b = n % B;
    const Feature q = split_feature(static_cast<int>(e - nk * F), P, C);
    acc_t out = acc_t(0);
    if (affine != nullptr) {
      const acc_t cx = centres[2 * nk], cy = centres[2 * nk + 1];
      const RowAffine<acc_t> a = row_affine(affine, n, cx, cy);
      if (a.finite) {
        const auto v = affine_sample<scalar_t, acc_t>(image, b, q, a, cx, cy, P, H, W, s);
        const acc_t r0 = v.v00 + v.fx * (v.v10 - v.v00);
        const acc_t r1 = v.v01 + v.fx * (v.v11 - v.v01);
        out = r0 + v.fy * (r1 - r0);
      }
    } else {
      const PatchGeometry<acc_t> g = locate(centres, nk, P, H, W);
      if (g.visible) {
        const auto v = load_taps<scalar_t, acc_t>(image, b, q.c, g.x0 + q.i, g.y0 + q.j, H, W, s);
        const acc_t r0 = v.v00 + g.fx * (v.v10 - v.v00);
        const acc_t r1 = v.v01 + g.fx * (v.v11 - v.v01);
        out = r0 + g.fy * (r1 - r0);
      }
    }
    tokens[e] = static_cast<scalar_t>(out);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

// grad_centres[bk] = (d/dfx, d/dfy) of sum_f grad[f] * token[f]; one warp per patch.
template <typename scalar_t, typename acc_t>
__global__ void centre_grad_kernel(const scalar_t* __restrict__ grad_tokens, const scalar_t* __restrict__ image,
                                   const acc_t* __restrict__ centres, const acc_t* __restrict__ affine,
                                   acc_t* __restrict__ grad_centres, int64_t num_patches, int K, int B, int P, int C,
                                   int H, int W, Strides s) {
  const int lane = threadIdx.x % 32;
  const int F = P * P * C;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t nk = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32; nk < num_patches;
       nk += warps) {
    const int64_t n = nk / K, b = n % B;
    acc_t d_fx = acc_t(0), d_fy = acc_t(0);
    if (affine != nullptr) {
      const acc_t cx = centres[2 * nk], cy = centres[2 * nk + 1];
      const RowAffine<acc_t> a = row_affine(affine, n, cx, cy);
      if (a.finite) {  // uniform across the warp
        for (int f = lane; f < F; f += 32) {
          const Feature q = split_feature(f, P, C);
          const auto v = affine_sample<scalar_t, acc_t>(image, b, q, a, cx, cy, P, H, W, s);
          const acc_t grad = static_cast<acc_t>(grad_tokens[nk * F + f]);
          const acc_t r0 = v.v00 + v.fx * (v.v10 - v.v00);
          const acc_t r1 = v.v01 + v.fx * (v.v11 - v.v01);
          d_fx += grad * ((1 - v.fy) * (v.v10 - v.v00) + v.fy * (v.v11 - v.v01));
          d_fy += grad * (r1 - r0);
        }
        d_fx = warp_sum(d_fx) * a.sx;
        d_fy = warp_sum(d_fy) * a.sy;
      }
    } else {
      const PatchGeometry<acc_t> g = locate(centres, nk, P, H, W);
      if (g.visible) {  // uniform across the warp
        for (int f = lane; f < F; f += 32) {
          const Feature q = split_feature(f, P, C);
          const auto v = load_taps<scalar_t, acc_t>(image, b, q.c, g.x0 + q.i, g.y0 + q.j, H, W, s);
          const acc_t grad = static_cast<acc_t>(grad_tokens[nk * F + f]);
          const acc_t r0 = v.v00 + g.fx * (v.v10 - v.v00);
          const acc_t r1 = v.v01 + g.fx * (v.v11 - v.v01);
          d_fx += grad * ((1 - g.fy) * (v.v10 - v.v00) + g.fy * (v.v11 - v.v01));
          d_fy += grad * (r1 - r0);
        }
        d_fx = warp_sum(d_fx);
        d_fy = warp_sum(d_fy);
      }
    }
    if (lane == 0) {
      grad_centres[2 * nk] = d_fx;
      grad_centres[2 * nk + 1] = d_fy;
    }
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void image_grad_atomic_kernel(const scalar_t* __restrict__ grad_tokens, const acc_t* __restrict__ centres,
                                         const acc_t* __restrict__ affine, acc_t* __restrict__ grad_image,
                                         index_t total, int K, int B, int P, int C, int H, int W, Strides gs) {
  const index_t F = static_cast<index_t>(P) * P * C;
  for (index_t e = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t nk = e / F;
    const int64_t n = nk / K;
    const Feature q = split_feature(static_cast<int>(e - nk * F), P, C);
    int x, y;
    acc_t fx, fy;
    if (affine != nullptr) {
      const acc_t cx = centres[2 * nk], cy = centres[2 * nk + 1];
      const RowAffine<acc_t> a = row_affine(affine, n, cx, cy);
      if (!a.finite) continue;
      const AxisTap<acc_t> tx = axis_tap(cx, a.sx, a.ox, q.i, P, W);
      const AxisTap<acc_t> ty = axis_tap(cy, a.sy, a.oy, q.j, P, H);
      x = tx.lo, y = ty.lo, fx = tx.frac, fy = ty.frac;  // kFarAway taps fail the bounds test below
    } else {
      const PatchGeometry<acc_t> g = locate(centres, nk, P, H, W);
      if (!g.visible) continue;
      x = g.x0 + q.i, y = g.y0 + q.j, fx = g.fx, fy = g.fy;
    }
    const acc_t grad = static_cast<acc_t>(grad_tokens[e]);
    acc_t* base = grad_image + (n % B) * gs.b + q.c * gs.c;
    const acc_t wx[2] = {1 - fx, fx}, wy[2] = {1 - fy, fy};
#pragma unroll
    for (int dy = 0; dy < 2; ++dy) {
#pragma unroll
      for (int dx = 0; dx < 2; ++dx) {
        const int xt = x + dx, yt = y + dy;
        if (static_cast<unsigned>(xt) < static_cast<unsigned>(W) && static_cast<unsigned>(yt) < static_cast<unsigned>(H)) {
          atomicAdd(base + yt * gs.h + xt * gs.w, grad * wx[dx] * wy[dy]);
        }
      }
    }
  }
}

// Deterministic image gradient.  Block (blockIdx.x = b*C + c, blockIdx.y = tile)
// covers a kTile x kTile tile of image b, channel c, and adds the rows of every view of
// image b (n = b, b + B, ...) in order.  Patches are staged in shared memory kChunk at a
// time (their tap bounding box, and the fractions or, with an affine, the centre); every
// thread walks them in order.
template <typename scalar_t, typename acc_t>
__global__ void image_grad_gather_kernel(const scalar_t* __restrict__ grad_tokens, const acc_t* __restrict__ centres,
                                         const acc_t* __restrict__ affine, scalar_t* __restrict__ grad_image, int K,
                                         int B, int views, int P, int C, int H, int W, int tiles_x, Strides gs) {
  __shared__ int s_x0[kChunk], s_y0[kChunk], s_x1[kChunk], s_y1[kChunk];
  __shared__ acc_t s_fx[kChunk], s_fy[kChunk];
  const int b = blockIdx.x / C, c = blockIdx.x - b * C;
  const int x = (blockIdx.y % tiles_x) * kTile + threadIdx.x % kTile;
  const int y = (blockIdx.y / tiles_x) * kTile + threadIdx.x / kTile;
  const int F = P * P * C;
  acc_t sum = acc_t(0);
  for (int view = 0; view < views; ++view) {
    const int64_t n = static_cast<int64_t>(view) * B + b;
    RowAffine<acc_t> a{acc_t(1), acc_t(1), acc_t(0), acc_t(0), true};
    if (affine != nullptr) a = row_affine(affine, n, acc_t(0), acc_t(0));
    for (int k0 = 0; k0 < K; k0 += kChunk) {
      __syncthreads();
      if (k0 + static_cast<int>(threadIdx.x) < K) {
        const int64_t nk = n * K + k0 + threadIdx.x;
        const int t = threadIdx.x;
        if (affine == nullptr) {
          const PatchGeometry<acc_t> g = locate(centres, nk, P, H, W);
          s_x0[t] = g.x0;
          s_y0[t] = g.y0;
          s_x1[t] = g.x0 + P;  // an invisible patch (kFarAway) covers no pixel
          s_y1[t] = g.y0 + P;
          s_fx[t] = g.fx;
          s_fy[t] = g.fy;
        } else {
          const acc_t cx = centres[2 * nk], cy = centres[2 * nk + 1];
          s_fx[t] = cx;
          s_fy[t] = cy;
          s_x0[t] = s_y0[t] = kFarAway;
          s_x1[t] = s_y1[t] = kFarAway;
          if (a.finite && isfinite(cx) && isfinite(cy)) {
            // Bounding box of the taps: positions are monotone in the sample index.  Clamped
            // first (taps beyond [-2, size + 1] are outside anyway) so the int conversion is defined.
            auto bounds = [&](acc_t centre, acc_t scale, acc_t offset, int size, int& lo, int& hi) {
              double p0 = affine_position(centre, scale, offset, 0, P);
              double p1 = affine_position(centre, scale, offset, P - 1, P);
              p0 = fmin(fmax(p0, -2.0), size + 1.0);
              p1 = fmin(fmax(p1, -2.0), size + 1.0);
              lo = static_cast<int>(floor(fmin(p0, p1)));
              hi = static_cast<int>(floor(fmax(p0, p1))) + 1;
            };
            bounds(cx, a.sx, a.ox, W, s_x0[t], s_x1[t]);
            bounds(cy, a.sy, a.oy, H, s_y0[t], s_y1[t]);
          }
        }
      }
      __syncthreads();
      const int count = min(kChunk, K - k0);
      for (int t = 0; t < count; ++t) {
        if (x < s_x0[t] || x > s_x1[t] || y < s_y0[t] || y > s_y1[t]) continue;
        const scalar_t* grad = grad_tokens + (n * K + k0 + t) * F + c;
        if (affine == nullptr) {
          // Window-relative position; this pixel is tap (dx, dy) of sample (i, j) = (u - dx, v - dy).
          const int u = x - s_x0[t], v = y - s_y0[t];
          const acc_t fx = s_fx[t], fy = s_fy[t];
#pragma unroll
          for (int dx = 0; dx < 2; ++dx) {
            const int i = u - dx;
            if (i < 0 || i >= P) continue;
            const acc_t wx = dx ? fx : 1 - fx;
#pragma unroll
            for (int dy = 0; dy < 2; ++dy) {
              const int j = v - dy;
              if (j < 0 || j >= P) continue;
              const acc_t wy = dy ? fy : 1 - fy;
              sum += wx * wy * static_cast<acc_t>(grad[(i * P + j) * C]);
            }
          }
        } else {
          // The samples whose taps land on this pixel, found with the forward's own tap function.
          const acc_t cx = s_fx[t], cy = s_fy[t];
          for (int j = 0; j < P; ++j) {
            const AxisTap<acc_t> ty = axis_tap(cy, a.sy, a.oy, j, P, H);
            acc_t wy;
            if (ty.in_lo && ty.lo == y) {
              wy = 1 - ty.frac;
            } else if (ty.in_hi && ty.lo + 1 == y) {
              wy = ty.frac;
            } else {
              continue;
            }
            for (int i = 0; i < P; ++i) {
              const AxisTap<acc_t> tx = axis_tap(cx, a.sx, a.ox, i, P, W);
              acc_t wx;
              if (tx.in_lo && tx.lo == x) {
                wx = 1 - tx.frac;
              } else if (tx.in_hi && tx.lo + 1 == x) {
                wx = tx.frac;
              } else {
                continue;
              }
              sum += wx * wy * static_cast<acc_t>(grad[(i * P + j) * C]);
            }
          }
        }
      }
    }
  }
  if (x < W && y < H) grad_image[b * gs.b + c * gs.c + y * gs.h + x * gs.w] = static_cast<scalar_t>(sum);
}

void check_inputs(const at::Tensor& image, const at::Tensor& centres, int64_t patch_size,
                  const c10::optional<at::Tensor>& view_affine) {
  TORCH_CHECK(image.dim() == 4, "_patch_gather: image must be [B, C, H, W], got ", image.sizes());
  const int64_t B = image.size(0);
  TORCH_CHECK(centres.dim() == 3 && centres.size(2) == 2 && (B > 0 ? centres.size(0) % B == 0 : centres.size(0) == 0),
              "_patch_gather: centres must be [N, K, 2] with N a multiple of B = ", B, ", got ", centres.sizes());
  TORCH_CHECK(centres.scalar_type() == at::kFloat || centres.scalar_type() == at::kDouble,
              "_patch_gather: centres must be float32 or float64, got ", centres.scalar_type());
  TORCH_CHECK(image.device() == centres.device(), "_patch_gather: image and centres are on different devices");
  TORCH_CHECK(patch_size >= 1, "_patch_gather: patch_size must be >= 1, got ", patch_size);
  TORCH_CHECK(image.size(2) < INT_MAX / 2 && image.size(3) < INT_MAX / 2 && patch_size < 46000,
              "_patch_gather: image or patch too large for 32-bit pixel indices");
  if (view_affine.has_value()) {
    const auto& a = *view_affine;
    TORCH_CHECK(a.dim() == 2 && a.size(0) == centres.size(0) && a.size(1) == 4,
                "_patch_gather: view_affine must be [N, 4] with N = ", centres.size(0), ", got ", a.sizes());
    TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
                "_patch_gather: view_affine must be float32 or float64, got ", a.scalar_type());
    TORCH_CHECK(a.device() == image.device(), "_patch_gather: image and view_affine are on different devices");
  }
}

int blocks_for(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 30));
}

// Calls fn(index_t{}) with int32 indices when they cannot overflow, else int64.
// The grid-stride loops reach e + stride < 2 * total + kThreads.
template <typename Fn>
void with_index_type(int64_t total, Fn&& fn) {
  if (total <= (INT_MAX - kThreads) / 2) {
    fn(int32_t{});
  } else {
    fn(int64_t{});
  }
}

// The affine as acc_t [N, 4] contiguous, or an undefined tensor.
template <typename acc_t>
at::Tensor affine_as(const c10::optional<at::Tensor>& view_affine) {
  if (!view_affine.has_value()) return at::Tensor();
  return view_affine->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

at::Tensor patch_gather_fwd_cuda(const at::Tensor& image, const at::Tensor& centres_in, int64_t patch_size,
                                 const c10::optional<at::Tensor>& view_affine) {
  check_inputs(image, centres_in, patch_size, view_affine);
  const c10::cuda::CUDAGuard guard(image.device());
  const int64_t B = image.size(0), N = centres_in.size(0), K = centres_in.size(1), C = image.size(1);
  const int64_t H = image.size(2), W = image.size(3);
  const int64_t P = patch_size, total = N * K * P * P * C;
  auto tokens = at::empty({N, K, P * P * C}, image.options());
  if (total == 0) return tokens;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "_patch_gather_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor centres = centres_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const at::Tensor affine = affine_as<acc_t>(view_affine);
    with_index_type(total, [&](auto index) {
      using index_t = decltype(index);
      forward_kernel<scalar_t, acc_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          image.data_ptr<scalar_t>(), centres.data_ptr<acc_t>(), ptr_or_null<acc_t>(affine),
          tokens.data_ptr<scalar_t>(), static_cast<index_t>(total), K, B, P, C, H, W, strides_of(image));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return tokens;
}

std::tuple<at::Tensor, at::Tensor> patch_gather_bwd_cuda(const at::Tensor& grad_tokens_in, const at::Tensor& image,
                                                         const at::Tensor& centres_in, int64_t patch_size,
                                                         bool need_image_grad, bool need_centre_grad,
                                                         bool deterministic,
                                                         const c10::optional<at::Tensor>& view_affine) {
  check_inputs(image, centres_in, patch_size, view_affine);
  const c10::cuda::CUDAGuard guard(image.device());
  const int64_t B = image.size(0), N = centres_in.size(0), K = centres_in.size(1), C = image.size(1);
  const int64_t H = image.size(2), W = image.size(3);
  const int64_t P = patch_size, F = P * P * C, total = N * K * F;
  TORCH_CHECK(grad_tokens_in.dim() == 3 && grad_tokens_in.size(0) == N && grad_tokens_in.size(1) == K &&
                  grad_tokens_in.size(2) == F,
              "_patch_gather_bwd: grad_tokens must be [", N, ", ", K, ", ", F, "], got ", grad_tokens_in.sizes());
  TORCH_CHECK(grad_tokens_in.device() == image.device(), "_patch_gather_bwd: grad_tokens is on another device");
  deterministic = deterministic || at::globalContext().deterministicAlgorithms();
  const auto acc_type = image.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_image = at::empty({0}, image.options());
  at::Tensor grad_centres = at::empty({0}, centres_in.options());
  if (!need_image_grad && !need_centre_grad) return {grad_image, grad_centres};
  const at::Tensor grad_tokens = grad_tokens_in.to(image.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "_patch_gather_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor centres = centres_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const at::Tensor affine = affine_as<acc_t>(view_affine);
    const acc_t* affine_ptr = ptr_or_null<acc_t>(affine);
    if (need_centre_grad) {
      auto grad = at::zeros({N, K, 2}, centres.options());
      if (N * K > 0) {
        const int64_t blocks = std::min<int64_t>((N * K * 32 + kThreads - 1) / kThreads, int64_t(1) << 30);
        centre_grad_kernel<scalar_t, acc_t><<<static_cast<int>(blocks), kThreads, 0, stream>>>(
            grad_tokens.data_ptr<scalar_t>(), image.data_ptr<scalar_t>(), centres.data_ptr<acc_t>(), affine_ptr,
            grad.data_ptr<acc_t>(), N * K, K, B, P, C, H, W, strides_of(image));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      grad_centres = grad.to(centres_in.scalar_type());
    }
    if (!need_image_grad) return;
    if (deterministic) {
      grad_image = at::empty_like(image);
      if (grad_image.numel() == 0) return;
      const int tiles_x = static_cast<int>((W + kTile - 1) / kTile);
      const int64_t tiles = tiles_x * ((H + kTile - 1) / kTile);
      TORCH_CHECK(tiles <= 65535, "_patch_gather_bwd: image too large for the deterministic CUDA kernel");
      TORCH_CHECK(B * C < INT_MAX, "_patch_gather_bwd: too many images x channels");
      const dim3 grid(static_cast<unsigned>(B * C), static_cast<unsigned>(tiles));
      image_grad_gather_kernel<scalar_t, acc_t><<<grid, kTile * kTile, 0, stream>>>(
          grad_tokens.data_ptr<scalar_t>(), centres.data_ptr<acc_t>(), affine_ptr, grad_image.data_ptr<scalar_t>(),
          K, B, N / B, P, C, H, W, tiles_x, strides_of(grad_image));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      auto grad = at::zeros_like(image, image.options().dtype(acc_type));
      if (total > 0) {
        with_index_type(total, [&](auto index) {
          using index_t = decltype(index);
          image_grad_atomic_kernel<scalar_t, acc_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
              grad_tokens.data_ptr<scalar_t>(), centres.data_ptr<acc_t>(), affine_ptr, grad.data_ptr<acc_t>(),
              static_cast<index_t>(total), K, B, P, C, H, W, strides_of(grad));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      grad_image = grad.scalar_type() == image.scalar_type() ? grad : grad.to(image.scalar_type());
    }
  });
  return {grad_image, grad_centres};
}

}  // namespace

TORCH_LIBRARY_IMPL(lafs_kernels, CUDA, m) {
  m.impl("_patch_gather_fwd", &patch_gather_fwd_cuda);
  m.impl("_patch_gather_bwd", &patch_gather_bwd_cuda);
}
