// CPU kernels of the chunked margin-softmax cross-entropy (SPEC section 2): the elementwise
// work on one class chunk, between the GEMMs that lafs_kernels/ops/margin_chunks.py runs (the `cpu`
// backend of the margin loss).
//
// raw[b, j] = s * <x_b / |x_b|, W_j> for the chunk's classes j (one GEMM).  The logit is
// raw * inv_w[j], except at a target's first occurrence in the row, where it is the margined
// target logit.  A target t of row b lies in the chunk when start <= labels[b, t] < start + n.
//
// forward: per row the log-sum-exp (in float64: the row max plus the log of the shifted sum,
//   so the backward's exp(logit - lse) keeps every bit where a target's probability is near 1),
//   the sum of the logits and the largest plain logit (and its first column).  The row is
//   scaled into a buffer of n values that stays in L1/L2 for the exp pass, so raw is read
//   once; PyTorch ops need five passes over [B, n].
// backward: g = dlogit * s * inv_w = dcos / |W_j| written over raw, with
//   dlogit = grad_lse * softmax + grad_logit_sum (+ grad_target at the targets, the target
//   columns then times the margin's derivative), and per class sum_b g * raw (the radial term).
//   Threads own column blocks, so the sums over rows need no reduction across threads.
//
// Float rows use a branch-free exp that the compiler vectorises; the row loops are compiled
// for AVX-512, AVX2 + FMA and the build's default and picked once by the CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "exp_f32.h"
#include "isa_variants.h"

namespace {

using lafs_math::exp_acc;


// buf = raw * inv_w over one row of n values; returns its max and its sum.
template <typename T>
LAFS_INLINE void scale_row_body(const T* raw, const T* inv_w, T* buf, int64_t n, T* max_out, T* sum_out) {
  T m = -std::numeric_limits<T>::infinity(), total = 0;
#pragma omp simd reduction(max : m) reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    const T v = raw[j] * inv_w[j];
    buf[j] = v;
    m = v > m ? v : m;
    total += v;
  }
  *max_out = m;
  *sum_out = total;
}

template <typename T>
LAFS_INLINE T max_row_body(const T* buf, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = buf[j] > m ? buf[j] : m;
  return m;
}

template <typename T>
LAFS_INLINE T sum_exp_row_body(const T* buf, int64_t n, T shift) {
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) total += exp_acc(buf[j] - shift);
  return total;
}

// Over n columns of one row: g = (scale * exp(raw * inv_w - lse) + add) * col_scale written
// over raw, radial += g * raw.
template <typename T>
LAFS_INLINE void grad_row_body(T* raw, const T* inv_w, const T* col_scale, T* radial, int64_t n, T lse, T scale,
                               T add) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T r = raw[j];
    const T g = (scale * exp_acc(r * inv_w[j] - lse) + add) * col_scale[j];
    radial[j] += g * r;
    raw[j] = g;
  }
}


LAFS_ISA_VARIANTS(void, scale_row, (const T* raw, const T* inv_w, T* buf, int64_t n, T* max_out, T* sum_out),
                  (raw, inv_w, buf, n, max_out, sum_out))
LAFS_ISA_VARIANTS(T, max_row, (const T* buf, int64_t n), (buf, n))
LAFS_ISA_VARIANTS(T, sum_exp_row, (const T* buf, int64_t n, T shift), (buf, n, shift))
// The row pass of the backward must round raw * inv_w as the forward did (scale_row stores it) before
// subtracting lse: fused into one FMA, the product's rounding (up to half an ulp of s) would reach the
// exponent of a class that holds the row's probability, and its gradient p - 1.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
LAFS_ISA_VARIANTS(void, grad_row,
                  (T* raw, const T* inv_w, const T* col_scale, T* radial, int64_t n, T lse, T scale, T add),
                  (raw, inv_w, col_scale, radial, n, lse, scale, add))
#pragma GCC pop_options

// Column of target t of row b in the chunk at its first occurrence among the row's targets, else -1.
LAFS_INLINE int64_t first_column(const int64_t* labels, const bool* first, int64_t i, int64_t start, int64_t n) {
  const int64_t col = labels[i] - start;
  return first[i] && col >= 0 && col < n ? col : -1;
}

void check_inputs(const at::Tensor& raw, const at::Tensor& inv_w, const at::Tensor& labels, const at::Tensor& first,
                  const at::Tensor& target_logit) {
  TORCH_CHECK(raw.dim() == 2 && raw.is_contiguous(), "margin chunk kernels: raw must be a contiguous [B, n] tensor");
  TORCH_CHECK(raw.scalar_type() == at::kFloat || raw.scalar_type() == at::kDouble,
              "margin chunk kernels: raw must be float32 or float64, got ", raw.scalar_type());
  const int64_t rows = raw.size(0), n = raw.size(1);
  TORCH_CHECK(inv_w.dim() == 1 && inv_w.size(0) == n && inv_w.is_contiguous() &&
                  inv_w.scalar_type() == raw.scalar_type(),
              "margin chunk kernels: inv_w must be a contiguous [n] tensor of raw's dtype");
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == rows && labels.is_contiguous() &&
                  labels.scalar_type() == at::kLong,
              "margin chunk kernels: labels must be a contiguous int64 [B, T] tensor");
  TORCH_CHECK(first.sizes() == labels.sizes() && first.is_contiguous() && first.scalar_type() == at::kBool,
              "margin chunk kernels: first must be a contiguous bool tensor shaped like labels");
  TORCH_CHECK(target_logit.sizes() == labels.sizes() && target_logit.is_contiguous() &&
                  target_logit.scalar_type() == raw.scalar_type(),
              "margin chunk kernels: target_logit must be contiguous, shaped like labels, in raw's dtype");
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_forward_impl(
    const at::Tensor& raw, const at::Tensor& inv_w, const at::Tensor& labels, const at::Tensor& first,
    int64_t start, const at::Tensor& target_logit) {
  const int64_t rows = raw.size(0), n = raw.size(1), targets = labels.size(1);
  auto lse = at::empty({rows}, raw.options().dtype(at::kDouble));
  auto logit_sum = at::empty({rows}, raw.options());
  auto best = at::empty({rows}, raw.options());
  auto best_column = at::empty({rows}, raw.options().dtype(at::kLong));
  const T* raw_p = raw.const_data_ptr<T>();
  const T* inv_w_p = inv_w.const_data_ptr<T>();
  const int64_t* labels_p = labels.const_data_ptr<int64_t>();
  const bool* first_p = first.const_data_ptr<bool>();
  const T* target_p = target_logit.const_data_ptr<T>();
  double* lse_p = lse.data_ptr<double>();
  T* sum_p = logit_sum.data_ptr<T>();
  T* best_p = best.data_ptr<T>();
  int64_t* column_p = best_column.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(n);
    for (int64_t b = begin; b < end; ++b) {
      T m, total;
      scale_row<T>(raw_p + b * n, inv_w_p, buf.data(), n, &m, &total);
      int64_t column = 0;
      while (column < n - 1 && !(buf[column] == m)) ++column;  // the first maximum, as torch.max
      best_p[b] = m;
      column_p[b] = column;
      // The exp shift is the row's max once the targets are in (no exp overflows, and exactly a target
      // that holds the row's probability): when a target's plain logit was the max, taken again.
      T shift = m;
      bool max_replaced = false;
      for (int64_t t = 0; t < targets; ++t) {
        const int64_t col = first_column(labels_p, first_p, b * targets + t, start, n);
        if (col < 0) continue;
        const T value = target_p[b * targets + t];
        max_replaced = max_replaced || buf[col] == m;
        total += value - buf[col];
        buf[col] = value;
        shift = value > shift ? value : shift;
      }
      if (max_replaced) shift = max_row<T>(buf.data(), n);
      lse_p[b] = static_cast<double>(shift) + std::log(static_cast<double>(sum_exp_row<T>(buf.data(), n, shift)));
      sum_p[b] = total;
    }
  });
  return {lse, logit_sum, best, best_column};
}

template <typename T>
at::Tensor chunk_backward_impl(at::Tensor& raw, const at::Tensor& inv_w, const at::Tensor& labels,
                               const at::Tensor& first, int64_t start, const at::Tensor& target_logit,
                               const at::Tensor& target_derivative, const at::Tensor& lse,
                               const at::Tensor& grad_lse, const at::Tensor& grad_target,
                               const at::Tensor& grad_logit_sum, double s) {
  const int64_t rows = raw.size(0), n = raw.size(1), targets = labels.size(1);
  auto radial = at::zeros({n}, raw.options());
  auto col_scale = (inv_w * s).contiguous();
  T* raw_p = raw.data_ptr<T>();
  const T* inv_w_p = inv_w.const_data_ptr<T>();
  const T* col_scale_p = col_scale.const_data_ptr<T>();
  const int64_t* labels_p = labels.const_data_ptr<int64_t>();
  const bool* first_p = first.const_data_ptr<bool>();
  const T* target_p = target_logit.const_data_ptr<T>();
  const T* derivative_p = target_derivative.const_data_ptr<T>();
  const T* lse_p = lse.const_data_ptr<T>();
  const T* grad_lse_p = grad_lse.const_data_ptr<T>();
  const T* grad_target_p = grad_target.defined() ? grad_target.const_data_ptr<T>() : nullptr;
  const T* grad_sum_p = grad_logit_sum.defined() ? grad_logit_sum.const_data_ptr<T>() : nullptr;
  T* radial_p = radial.data_ptr<T>();
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<int64_t, T>> saved;  // (target, raw at its column) in this block of columns
    for (int64_t b = 0; b < rows; ++b) {
      T* row = raw_p + b * n;
      const int64_t base = b * targets;
      const T add = grad_sum_p ? grad_sum_p[b] : T(0);
      saved.clear();
      for (int64_t t = 0; t < targets; ++t) {
        const int64_t col = first_column(labels_p, first_p, base + t, start, n);
        if (col < begin || col >= end) continue;
        saved.emplace_back(t, row[col]);
        // The plain logit there may exceed lse by far (the margin lowered the target): with raw = 0
        // the row pass adds nothing to the radial sum that would have to be taken back out.
        row[col] = 0;
      }
      grad_row<T>(row + begin, inv_w_p + begin, col_scale_p + begin, radial_p + begin, end - begin, lse_p[b],
                  grad_lse_p[b], add);
      // The target columns again: margined logit, every target's gradient, the margin's derivative.
      for (const auto& [t, r] : saved) {
        const int64_t col = labels_p[base + t] - start;
        T dlogit = grad_lse_p[b] * exp_acc(target_p[base + t] - lse_p[b]) + add;
        for (int64_t u = 0; grad_target_p && u < targets; ++u) {
          if (labels_p[base + u] - start == col) dlogit += grad_target_p[base + u];
        }
        const T g = dlogit * derivative_p[base + t] * col_scale_p[col];
        radial_p[col] += g * r;
        row[col] = g;
      }
    }
  });
  return radial;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> margin_chunk_fwd_cpu(
    const at::Tensor& raw, const at::Tensor& inv_w, const at::Tensor& labels, const at::Tensor& first,
    int64_t start, const at::Tensor& target_logit) {
  check_inputs(raw, inv_w, labels, first, target_logit);
  return AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "_margin_chunk_fwd", [&] {
    return chunk_forward_impl<scalar_t>(raw, inv_w, labels, first, start, target_logit);
  });
}

at::Tensor margin_chunk_bwd_cpu(at::Tensor& raw, const at::Tensor& inv_w, const at::Tensor& labels,
                                const at::Tensor& first, int64_t start, const at::Tensor& target_logit,
                                const at::Tensor& target_derivative, const at::Tensor& lse,
                                const at::Tensor& grad_lse, const std::optional<at::Tensor>& grad_target,
                                const std::optional<at::Tensor>& grad_logit_sum, double s) {
  check_inputs(raw, inv_w, labels, first, target_logit);
  const int64_t rows = raw.size(0);
  auto row_vector_ok = [&](const at::Tensor& v) {
    return v.dim() == 1 && v.size(0) == rows && v.is_contiguous() && v.scalar_type() == raw.scalar_type();
  };
  TORCH_CHECK(row_vector_ok(lse) && row_vector_ok(grad_lse),
              "_margin_chunk_bwd: lse and grad_lse must be contiguous [B] tensors of raw's dtype");
  TORCH_CHECK(target_derivative.sizes() == labels.sizes() && target_derivative.is_contiguous() &&
                  target_derivative.scalar_type() == raw.scalar_type(),
              "_margin_chunk_bwd: target_derivative must be contiguous, shaped like labels, in raw's dtype");
  const at::Tensor grad_target_t = grad_target.value_or(at::Tensor());
  const at::Tensor grad_sum_t = grad_logit_sum.value_or(at::Tensor());
  TORCH_CHECK(!grad_target_t.defined() ||
                  (grad_target_t.sizes() == labels.sizes() && grad_target_t.is_contiguous() &&
                   grad_target_t.scalar_type() == raw.scalar_type()),
              "_margin_chunk_bwd: grad_target must be contiguous, shaped like labels, in raw's dtype");
  TORCH_CHECK(!grad_sum_t.defined() || row_vector_ok(grad_sum_t),
              "_margin_chunk_bwd: grad_logit_sum must be a contiguous [B] tensor of raw's dtype");
  return AT_DISPATCH_FLOATING_TYPES(raw.scalar_type(), "_margin_chunk_bwd", [&] {
    return chunk_backward_impl<scalar_t>(raw, inv_w, labels, first, start, target_logit, target_derivative, lse,
                                         grad_lse, grad_target_t, grad_sum_t, s);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lafs_kernels, CPU, m) {
  m.impl("_margin_chunk_fwd", &margin_chunk_fwd_cpu);
  m.impl("_margin_chunk_bwd", &margin_chunk_bwd_cpu);
}
