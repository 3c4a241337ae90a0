// CPU kernel of DINO's per-pixel colour chain on pixels of patch tokens (LAFS pretraining's fused
// view path; the reference is lafs_kernels/ops/dino_colour.py, on images [N, 3, H, W]).
//
// pixels [N, T, 3] in [-1, 1] (RGB last, T pixels per view); mean_pixels [N, M, 3] or none: the
// pixels whose mean gray the contrast blends with (none: the view's own pixels); factors [N, 4]
// (brightness, contrast and saturation factors, hue shift in turns), order [N, 4] (the jitter's
// op order, a permutation of 0..3), jitter / gray / solarize [N] bool.  Per view, on x in [0, 1]:
// the four jitter ops in the view's order where jitter is set (each blend clamped to [0, 1]),
// grayscale where gray is set, solarisation (x >= 1/2 -> 1 - x) where solarize is set; back in
// [-1, 1], each pixel is multiplied by its pixel_weights [N, T] entry where given (the fused view
// path's zero padding of samples beyond the view's edge).  Returns [N, T, 3] in [-1, 1].
//
// The contrast's mean is taken over mean_pixels after the jitter ops that come before the
// contrast, accumulated in double.  Pixels go through the chain in blocks of kBlock, split into
// channel rows, so every op is one vector loop over a block in L1 (the reference's tensor ops
// make one pass over all pixels per op).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "isa_variants.h"

// Without trapping math GCC turns the hue's selects and floor into vector blends and rounds.
#pragma GCC optimize("no-trapping-math")

namespace {

constexpr int64_t kBlock = 256;
enum Op : int64_t { kBrightness = 0, kContrast = 1, kSaturation = 2, kHue = 3 };

template <typename T>
struct ViewColour {
  T factor[3];  // brightness, contrast, saturation
  T keep[3];    // 1 - factor: the weight of the blend's other image
  T six_shift;  // 6 * hue shift: the shift in sixths of a turn
  int64_t order[4];
};

template <typename T>
LAFS_INLINE T luma(T r, T g, T b) {
  return T(0.299) * r + T(0.587) * g + T(0.114) * b;
}

template <typename T>
LAFS_INLINE T clamp01(T v) {
  return v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
}

template <typename T>
LAFS_INLINE T max_of(T a, T b) {
  return a > b ? a : b;
}

template <typename T>
LAFS_INLINE T min_of(T a, T b) {
  return a < b ? a : b;
}

// One channel of the hue rotation: value - chroma * clamp(min(k, 4 - k), 0, 1), k = (offset + sixths) mod 6.
template <typename T>
LAFS_INLINE T hue_channel(T sixths, T offset, T value, T chroma) {
  const T a = sixths + offset;
  T k = a - T(6) * __builtin_floor(a / T(6));
  k = min_of(k, T(4) - k);
  return value - clamp01(k) * chroma;
}

// RGB -> hue rotated by six_shift sixths of a turn -> RGB (n = 5, 3, 1 for r, g, b: the HSV -> RGB
// formula), with the hue in sixths from the largest channel's sector.
template <typename T>
LAFS_INLINE void shift_hue(T& r, T& g, T& b, T six_shift) {
  const T value = max_of(max_of(r, g), b);
  const T chroma = value - min_of(min_of(r, g), b);
  T sixths = value == r ? g - b : (value == g ? (b - r) + T(2) * chroma : (r - g) + T(4) * chroma);
  sixths = sixths / max_of(chroma, std::numeric_limits<T>::min()) + six_shift;
  const T r_out = hue_channel(sixths, T(5), value, chroma);
  const T g_out = hue_channel(sixths, T(3), value, chroma);
  const T b_out = hue_channel(sixths, T(1), value, chroma);
  r = r_out;
  g = g_out;
  b = b_out;
}

// The first `stages` jitter ops of the view's order on a block of count pixels (channel rows).
template <typename T>
LAFS_INLINE void jitter_block(T* r, T* g, T* b, int64_t count, const ViewColour<T>& view, int64_t stages, T mean) {
  for (int64_t s = 0; s < stages; ++s) {
    const int64_t op = view.order[s];
    if (op == kHue) {
      const T shift = view.six_shift;
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) shift_hue(r[i], g[i], b[i], shift);
      continue;
    }
    const T f = view.factor[op], keep = view.keep[op];
    if (op == kSaturation) {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) {
        const T other = luma(r[i], g[i], b[i]) * keep;
        r[i] = clamp01(r[i] * f + other);
        g[i] = clamp01(g[i] * f + other);
        b[i] = clamp01(b[i] * f + other);
      }
      continue;
    }
    const T other = (op == kContrast ? mean : T(0)) * keep;
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) {
      r[i] = clamp01(r[i] * f + other);
      g[i] = clamp01(g[i] * f + other);
      b[i] = clamp01(b[i] * f + other);
    }
  }
}

// Interleaved [count, 3] in [-1, 1] -> channel rows in [0, 1].
template <typename T>
LAFS_INLINE void split_block(const T* src, int64_t count, T* r, T* g, T* b) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    r[i] = src[3 * i] * T(0.5) + T(0.5);
    g[i] = src[3 * i + 1] * T(0.5) + T(0.5);
    b[i] = src[3 * i + 2] * T(0.5) + T(0.5);
  }
}

// Sum of the gray of count pixels after the jitter stages [0, stages), in double.
template <typename T>
LAFS_INLINE double gray_sum_block_body(const T* src, int64_t count, const ViewColour<T>& view, int64_t stages, T* r,
                                       T* g, T* b) {
  split_block(src, count, r, g, b);
  jitter_block(r, g, b, count, view, stages, T(0));
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < count; ++i) sum += static_cast<double>(luma(r[i], g[i], b[i]));
  return sum;
}

// The whole chain on count pixels, src -> dst (interleaved, [-1, 1]), output pixel i times weight[i]
// (ones without pixel weights: x * 1 is x exactly); r, g, b: scratch rows.
template <typename T>
LAFS_INLINE void colour_block_body(const T* src, T* dst, int64_t count, const ViewColour<T>& view, int64_t stages,
                                   T mean, bool gray, bool invert, const T* weight, T* r, T* g, T* b) {
  split_block(src, count, r, g, b);
  jitter_block(r, g, b, count, view, stages, mean);
  if (gray) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) r[i] = g[i] = b[i] = luma(r[i], g[i], b[i]);
  }
  const T half = invert ? T(0.5) : std::numeric_limits<T>::infinity();  // x >= half -> 1 - x
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const T rv = r[i] >= half ? T(1) - r[i] : r[i];
    const T gv = g[i] >= half ? T(1) - g[i] : g[i];
    const T bv = b[i] >= half ? T(1) - b[i] : b[i];
    dst[3 * i] = (rv * T(2) - T(1)) * weight[i];
    dst[3 * i + 1] = (gv * T(2) - T(1)) * weight[i];
    dst[3 * i + 2] = (bv * T(2) - T(1)) * weight[i];
  }
}

LAFS_ISA_VARIANTS(double, gray_sum_block,
                  (const T* src, int64_t count, const ViewColour<T>& view, int64_t stages, T* r, T* g, T* b),
                  (src, count, view, stages, r, g, b))
LAFS_ISA_VARIANTS(void, colour_block,
                  (const T* src, T* dst, int64_t count, const ViewColour<T>& view, int64_t stages, T mean, bool gray,
                   bool invert, const T* weight, T* r, T* g, T* b),
                  (src, dst, count, view, stages, mean, gray, invert, weight, r, g, b))

template <typename T>
void colour_views(const at::Tensor& pixels, const at::Tensor& mean_pixels, const at::Tensor& factors,
                  const at::Tensor& order, const at::Tensor& jitter, const at::Tensor& gray,
                  const at::Tensor& solarize, const at::Tensor& weights, at::Tensor& out) {
  const int64_t N = pixels.size(0), count = pixels.size(1);
  const bool own_mean = !mean_pixels.defined();
  const int64_t mean_count = own_mean ? count : mean_pixels.size(1);
  const T* px = pixels.const_data_ptr<T>();
  const T* mean_px = own_mean ? px : mean_pixels.const_data_ptr<T>();
  const T* factors_p = factors.const_data_ptr<T>();
  const int64_t* order_p = order.const_data_ptr<int64_t>();
  const bool* jitter_p = jitter.const_data_ptr<bool>();
  const bool* gray_p = gray.const_data_ptr<bool>();
  const bool* solarize_p = solarize.const_data_ptr<bool>();
  const T* weights_p = weights.defined() ? weights.const_data_ptr<T>() : nullptr;
  T* out_p = out.mutable_data_ptr<T>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    alignas(64) T r[kBlock], g[kBlock], b[kBlock], ones[kBlock];
    std::fill(ones, ones + kBlock, T(1));
    for (int64_t n = begin; n < end; ++n) {
      ViewColour<T> view;
      for (int op = 0; op < 3; ++op) {
        view.factor[op] = factors_p[4 * n + op];
        view.keep[op] = T(1) - view.factor[op];
      }
      view.six_shift = T(6) * factors_p[4 * n + kHue];
      int64_t contrast_stage = -1;
      for (int s = 0; s < 4; ++s) {
        view.order[s] = order_p[4 * n + s];
        if (view.order[s] == kContrast) contrast_stage = s;
      }
      const int64_t stages = jitter_p[n] ? 4 : 0;
      T mean = T(0);
      if (stages && contrast_stage >= 0) {
        double sum = 0.0;
        const T* src = mean_px + n * mean_count * 3;
        for (int64_t i0 = 0; i0 < mean_count; i0 += kBlock) {
          sum += gray_sum_block<T>(src + 3 * i0, min_of(kBlock, mean_count - i0), view, contrast_stage, r, g, b);
        }
        mean = static_cast<T>(sum / static_cast<double>(mean_count));
      }
      const T* src = px + n * count * 3;
      T* dst = out_p + n * count * 3;
      const T* weight = weights_p == nullptr ? nullptr : weights_p + n * count;
      for (int64_t i0 = 0; i0 < count; i0 += kBlock) {
        colour_block<T>(src + 3 * i0, dst + 3 * i0, min_of(kBlock, count - i0), view, stages, mean, gray_p[n],
                        solarize_p[n], weight == nullptr ? ones : weight + i0, r, g, b);
      }
    }
  });
}

at::Tensor dino_colour_cpu(const at::Tensor& pixels, const std::optional<at::Tensor>& mean_pixels,
                           const at::Tensor& factors, const at::Tensor& order, const at::Tensor& jitter,
                           const at::Tensor& gray, const at::Tensor& solarize,
                           const std::optional<at::Tensor>& pixel_weights) {
  TORCH_CHECK(pixels.dim() == 3 && pixels.size(2) == 3 && pixels.is_contiguous(),
              "_dino_colour: pixels must be a contiguous [N, T, 3]");
  const int64_t N = pixels.size(0);
  const at::Tensor means = mean_pixels.value_or(at::Tensor());
  TORCH_CHECK(!means.defined() || (means.dim() == 3 && means.size(0) == N && means.size(2) == 3 &&
                                   means.is_contiguous() && means.scalar_type() == pixels.scalar_type()),
              "_dino_colour: mean_pixels must be a contiguous [N, M, 3] in the pixels' dtype");
  TORCH_CHECK(factors.sizes() == at::IntArrayRef({N, 4}) && factors.is_contiguous() &&
                  factors.scalar_type() == pixels.scalar_type(),
              "_dino_colour: factors must be a contiguous [N, 4] in the pixels' dtype");
  TORCH_CHECK(order.sizes() == at::IntArrayRef({N, 4}) && order.is_contiguous() && order.scalar_type() == at::kLong,
              "_dino_colour: order must be a contiguous int64 [N, 4]");
  for (const at::Tensor* flag : {&jitter, &gray, &solarize}) {
    TORCH_CHECK(flag->dim() == 1 && flag->size(0) == N && flag->is_contiguous() && flag->scalar_type() == at::kBool,
                "_dino_colour: jitter, gray and solarize must be contiguous bool [N]");
  }
  const at::Tensor weights = pixel_weights.value_or(at::Tensor());
  TORCH_CHECK(!weights.defined() || (weights.sizes() == at::IntArrayRef({N, pixels.size(1)}) &&
                                     weights.is_contiguous() && weights.scalar_type() == pixels.scalar_type()),
              "_dino_colour: pixel_weights must be a contiguous [N, T] in the pixels' dtype");
  const int64_t* order_p = order.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < 4 * N; ++i) {
    TORCH_CHECK(order_p[i] >= 0 && order_p[i] < 4, "_dino_colour: order must hold op ids 0..3, got ", order_p[i],
                " for view ", i / 4);
  }
  at::Tensor out = at::empty_like(pixels);
  if (pixels.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(pixels.scalar_type(), "_dino_colour", [&] {
    colour_views<scalar_t>(pixels, means, factors, order, jitter, gray, solarize, weights, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lafs_kernels, CPU, m) { m.impl("_dino_colour", &dino_colour_cpu); }
