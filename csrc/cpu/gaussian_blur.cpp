// CPU kernel of the separable Gaussian blur with one kernel per image (DINO's blur in LAFS
// pretraining: the fused view path blurs a blurred view's source image with the view's sigma).
//
// image [B, C, H, W]; kernel_x [N, 2R+1] (along W) and kernel_y [N, 2R+1] (along H) in the
// image's dtype; source_index [N] (output n blurs image source_index[n], read in place; none: N = B,
// image n); reflect padding (the edge pixel is not repeated), R < H and R < W.  Each plane is
// blurred along W into a buffer, then along H: the order of PyTorch's reference, two depthwise
// conv2d calls on the padded image.  Per output pixel the taps are summed in ascending order; the
// zero taps at either end of an image's kernel are skipped (a narrow sigma's, which the Python side
// zeroes below its dtype's resolution), so a narrow blur costs its own width, not the call's R.
//
// Why not conv2d: for N * C groups of one channel each oneDNN runs the depthwise convolution at a
// few GFLOP/s here; these loops run along rows, the taps outermost, so every tap is one vector
// multiply-add over a row that stays in L1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "isa_variants.h"

namespace {

// acc[x] = sum_k taps[k] * rows[k][x] for x < width, k ascending.
template <typename T>
LAFS_INLINE void taps_row_body(const T* const* rows, const T* taps, int64_t count, T* acc, int64_t width) {
  const T first = taps[0];
  const T* row = rows[0];
#pragma omp simd
  for (int64_t x = 0; x < width; ++x) acc[x] = first * row[x];
  for (int64_t k = 1; k < count; ++k) {
    const T w = taps[k];
    row = rows[k];
#pragma omp simd
    for (int64_t x = 0; x < width; ++x) acc[x] += w * row[x];
  }
}

LAFS_ISA_VARIANTS(void, taps_row, (const T* const* rows, const T* taps, int64_t count, T* acc, int64_t width),
                  (rows, taps, count, acc, width))

// Reflect index into [0, n): -1 -> 1, n -> n - 2 (needs |overhang| < n).
LAFS_INLINE int64_t reflect(int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); }

// [first, last] of the nonzero taps of kernel[0..count) (first > last when every tap is zero).
template <typename T>
std::pair<int64_t, int64_t> nonzero_span(const T* kernel, int64_t count) {
  int64_t first = 0, last = count - 1;
  while (first < count && kernel[first] == T(0)) ++first;
  while (last >= first && kernel[last] == T(0)) --last;
  return {first, last};
}

// Output plane (n, c) is plane c of image source[n] (image n without source) blurred.
template <typename T>
void blur_planes(const at::Tensor& image, const at::Tensor& kernel_x, const at::Tensor& kernel_y,
                 const int64_t* source, at::Tensor& out) {
  const int64_t N = out.size(0), C = image.size(1), H = image.size(2), W = image.size(3);
  const int64_t count = kernel_x.size(1), R = count / 2;
  const T* in_p = image.const_data_ptr<T>();
  const T* kx_p = kernel_x.const_data_ptr<T>();
  const T* ky_p = kernel_y.const_data_ptr<T>();
  T* out_p = out.mutable_data_ptr<T>();
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> padded(W + 2 * R), horizontal(H * W);
    std::vector<const T*> rows(count);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / C, c = plane % C;
      const T* src = in_p + ((source == nullptr ? n : source[n]) * C + c) * H * W;
      const T* kx = kx_p + n * count;
      const T* ky = ky_p + n * count;
      T* dst = out_p + plane * H * W;
      const auto [x_first, x_last] = nonzero_span(kx, count);
      const auto [y_first, y_last] = nonzero_span(ky, count);
      if (x_first > x_last || y_first > y_last) {  // an all-zero kernel (only from a caller's own taps)
        std::fill(dst, dst + H * W, T(0));
        continue;
      }
      for (int64_t k = 0; k < count; ++k) rows[k] = padded.data() + k;
      for (int64_t y = 0; y < H; ++y) {  // along W, through a reflect-padded copy of the row
        const T* row = src + y * W;
        for (int64_t x = 0; x < W; ++x) padded[x + R] = row[x];
        for (int64_t i = 1; i <= R; ++i) {
          padded[R - i] = row[i];
          padded[R + W - 1 + i] = row[W - 1 - i];
        }
        taps_row<T>(rows.data() + x_first, kx + x_first, x_last - x_first + 1, horizontal.data() + y * W, W);
      }
      for (int64_t y = 0; y < H; ++y) {  // along H: the taps' rows, reflected at the edges
        for (int64_t k = y_first; k <= y_last; ++k) rows[k] = horizontal.data() + reflect(y + k - R, H) * W;
        taps_row<T>(rows.data() + y_first, ky + y_first, y_last - y_first + 1, dst + y * W, W);
      }
    }
  });
}

at::Tensor gaussian_blur_cpu(const at::Tensor& image, const at::Tensor& kernel_x, const at::Tensor& kernel_y,
                             const std::optional<at::Tensor>& source_index) {
  TORCH_CHECK(image.dim() == 4 && image.is_contiguous(), "_gaussian_blur: image must be a contiguous [B, C, H, W]");
  const int64_t N = source_index.has_value() ? source_index->numel() : image.size(0);
  for (const at::Tensor* k : {&kernel_x, &kernel_y}) {
    TORCH_CHECK(k->dim() == 2 && k->size(0) == N && k->is_contiguous() && k->scalar_type() == image.scalar_type(),
                "_gaussian_blur: kernels must be contiguous [N, 2R+1] in the image's dtype (N outputs)");
  }
  const int64_t* source = nullptr;
  if (source_index.has_value()) {
    TORCH_CHECK(source_index->dim() == 1 && source_index->is_contiguous() && source_index->scalar_type() == at::kLong,
                "_gaussian_blur: source_index must be a contiguous int64 [N]");
    source = source_index->const_data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK(source[n] >= 0 && source[n] < image.size(0), "_gaussian_blur: source_index[", n, "] = ", source[n],
                  " is outside [0, ", image.size(0), ")");
    }
  }
  TORCH_CHECK(kernel_x.size(1) == kernel_y.size(1) && kernel_x.size(1) % 2 == 1,
              "_gaussian_blur: both kernels need the same odd length 2R+1");
  const int64_t R = kernel_x.size(1) / 2;
  TORCH_CHECK(R < image.size(2) && R < image.size(3), "_gaussian_blur: reflect padding needs R < H and R < W, got R=",
              R, " for ", image.size(2), " x ", image.size(3));
  at::Tensor out = at::empty({N, image.size(1), image.size(2), image.size(3)}, image.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "_gaussian_blur",
                             [&] { blur_planes<scalar_t>(image, kernel_x, kernel_y, source, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lafs_kernels, CPU, m) { m.impl("_gaussian_blur", &gaussian_blur_cpu); }
