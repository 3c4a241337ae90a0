// CPU kernel of the Part fViT blocks' attention for short sequences: out = softmax(scale q k^T) v, forward and
// backward (lafs_kernels/ops/attention.py; its reference is the same formula in torch ops).
//
// q [B, H, Tq, d], k and v [B, H, T, d], any strides with the last one 1, float32 or float64, d at most
// 4 vectors (64 float32 / 32 float64 values).  The forward returns out [B, H, Tq, d] (a view of a
// [B, Tq, H, d] tensor, so the blocks' transpose back to [B, Tq, H * d] is free) and the log-sum-exp of each
// row of scores, lse [B, H, Tq]; the backward recomputes the probabilities from lse.
//
// One task per (b, h): its keys (transposed) and values are packed into zero-padded buffers once, then the
// queries run in blocks of kRows rows.  A block's scores [kRows, T] stay in L1 between the score product, the
// softmax and the value product, where torch's separate ops write and read a [Tq, T] tensor between each.
// The backward keeps the block's dK and dV contributions in per-task accumulators [T, d], written out once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "exp_f32.h"
#include "isa_variants.h"

// The 64-byte vectors are passed only between always-inline functions.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

using lafs_math::exp_acc;

constexpr int64_t kRows = 8;     // query rows per block
constexpr int64_t kMaxVecs = 4;  // head width limit, in vectors

template <typename T>
struct Lanes {
  static constexpr int64_t n = 64 / sizeof(T);  // one 64-byte vector
  typedef T vec __attribute__((vector_size(64)));
};

template <typename T>
using Vec = typename Lanes<T>::vec;

template <typename T>
LAFS_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
LAFS_INLINE void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

LAFS_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }


// scores[r, j] = sum_c rows[r, c] * cols_t[c, j] for r < kRows, j < t_pad: rows [kRows, d] (stride d),
// cols_t [d, t_pad] (the other operand transposed and zero-padded), scores [kRows, t_pad].
template <typename T>
LAFS_INLINE void rows_times_cols(const T* rows, const T* cols_t, int64_t d, int64_t t_pad, T* scores) {
  constexpr int64_t W = Lanes<T>::n;
  for (int64_t j = 0; j < t_pad; j += W) {
    Vec<T> acc[kRows] = {};
    for (int64_t c = 0; c < d; ++c) {
      const Vec<T> col = load(cols_t + c * t_pad + j);
      for (int64_t r = 0; r < kRows; ++r) acc[r] += rows[r * d + c] * col;
    }
    for (int64_t r = 0; r < kRows; ++r) store(scores + r * t_pad + j, acc[r]);
  }
}

// out[r, :] = factor * sum_{j < t} weights[r, j] * values[j, :] for r < kRows: weights [kRows, t_pad],
// values [t, NV * W] (zero-padded rows), out [kRows, NV * W].
template <typename T, int NV>
LAFS_INLINE void weights_times_values(const T* weights, const T* values, int64_t t, int64_t t_pad, T factor, T* out) {
  constexpr int64_t W = Lanes<T>::n;
  constexpr int64_t R = NV <= 2 ? 8 : 4;  // R * NV accumulators, within the 32 vector registers
  for (int64_t r0 = 0; r0 < kRows; r0 += R) {
    Vec<T> acc[R][NV] = {};
    for (int64_t j = 0; j < t; ++j) {
      Vec<T> value[NV];
      for (int v = 0; v < NV; ++v) value[v] = load(values + j * NV * W + v * W);
      for (int64_t r = 0; r < R; ++r) {
        const T w = weights[(r0 + r) * t_pad + j];
        for (int v = 0; v < NV; ++v) acc[r][v] += w * value[v];
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      for (int v = 0; v < NV; ++v) store(out + (r0 + r) * NV * W + v * W, acc[r][v] * factor);
    }
  }
}

// acc[j, :] += sum_r weights[r, j] * rows[r, :] for j < t: weights [kRows, t_pad], rows [kRows, NV * W],
// acc [t, NV * W].
template <typename T, int NV>
LAFS_INLINE void accumulate_cols(const T* weights, const T* rows, int64_t t, int64_t t_pad, T* acc) {
  constexpr int64_t W = Lanes<T>::n;
  Vec<T> row[kRows][NV];
  for (int64_t r = 0; r < kRows; ++r) {
    for (int v = 0; v < NV; ++v) row[r][v] = load(rows + r * NV * W + v * W);
  }
  for (int64_t j = 0; j < t; ++j) {
    Vec<T> sum[NV];
    for (int v = 0; v < NV; ++v) sum[v] = load(acc + j * NV * W + v * W);
    for (int64_t r = 0; r < kRows; ++r) {
      const T w = weights[r * t_pad + j];
      for (int v = 0; v < NV; ++v) sum[v] += w * row[r][v];
    }
    for (int v = 0; v < NV; ++v) store(acc + j * NV * W + v * W, sum[v]);
  }
}

// Strided [T, d] matrix of one (b, h): element (i, c) at data[i * row_stride + c].
template <typename T>
struct Rows {
  const T* data;
  int64_t row_stride;
  const T* row(int64_t i) const { return data + i * row_stride; }
};

// dst [d, t_pad] = src^T, zero beyond t.
template <typename T>
void pack_transposed(Rows<T> src, int64_t t, int64_t d, int64_t t_pad, T* dst) {
  for (int64_t c = 0; c < d; ++c) {
    T* out = dst + c * t_pad;
    for (int64_t i = 0; i < t; ++i) out[i] = src.data[i * src.row_stride + c];
    std::fill(out + t, out + t_pad, T(0));
  }
}

// dst [rows, width] = factor * src rows first..first + rows (rows beyond count and columns beyond d zero).
template <typename T>
void pack_rows(Rows<T> src, int64_t first, int64_t rows, int64_t count, int64_t d, int64_t width, T factor, T* dst) {
  std::fill(dst, dst + rows * width, T(0));
  for (int64_t r = 0; r < rows && first + r < count; ++r) {
    const T* row = src.row(first + r);
    for (int64_t c = 0; c < d; ++c) dst[r * width + c] = factor * row[c];
  }
}

// max of x[0..n), n >= 1, in vectors (a scalar loop is one long dependency chain).
template <typename T>
LAFS_INLINE T row_max(const T* x, int64_t n) {
  constexpr int64_t W = Lanes<T>::n;
  T top = x[0];
  if (n >= W) {
    Vec<T> tops = load(x);
    for (int64_t j = W; j + W <= n; j += W) {
      const Vec<T> v = load(x + j);
      tops = v > tops ? v : tops;
    }
    for (int64_t l = 0; l < W; ++l) top = tops[l] > top ? tops[l] : top;
  }
  for (int64_t j = n / W * W; j < n; ++j) top = x[j] > top ? x[j] : top;
  return top;
}

// Softmax of each row of scores [kRows, t_pad] over its first t entries, in place (zero beyond t); the row's
// log-sum-exp goes to lse[r].
template <typename T>
LAFS_INLINE void softmax_rows(T* scores, int64_t t, int64_t t_pad, T* lse) {
  for (int64_t r = 0; r < kRows; ++r) {
    T* s = scores + r * t_pad;
    const T top = row_max(s, t);
    T sum = T(0);
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < t; ++j) {
      s[j] = exp_acc(s[j] - top);
      sum += s[j];
    }
    const T inv = T(1) / sum;
#pragma omp simd
    for (int64_t j = 0; j < t; ++j) s[j] *= inv;
    for (int64_t j = t; j < t_pad; ++j) s[j] = T(0);
    lse[r] = top + std::log(sum);
  }
}

struct Shape {
  int64_t tq, t, d, d_pad, t_pad;
};

template <typename T, int NV>
LAFS_INLINE void forward_pair_nv(Rows<T> q, Rows<T> k, Rows<T> v, T scale, const Shape& s, T* out, int64_t out_stride,
                                 T* lse, T* scratch) {
  T* keys_t = scratch;                     // [d, t_pad]
  T* values = keys_t + s.d * s.t_pad;      // [t, d_pad]
  T* queries = values + s.t * s.d_pad;     // [kRows, d]
  T* probs = queries + kRows * s.d;        // [kRows, t_pad]
  T* block_out = probs + kRows * s.t_pad;  // [kRows, d_pad]
  T block_lse[kRows];
  pack_transposed(k, s.t, s.d, s.t_pad, keys_t);
  pack_rows(v, 0, s.t, s.t, s.d, s.d_pad, T(1), values);
  for (int64_t first = 0; first < s.tq; first += kRows) {
    pack_rows(q, first, kRows, s.tq, s.d, s.d, scale, queries);
    rows_times_cols(queries, keys_t, s.d, s.t_pad, probs);
    softmax_rows(probs, s.t, s.t_pad, block_lse);
    weights_times_values<T, NV>(probs, values, s.t, s.t_pad, T(1), block_out);
    for (int64_t r = 0; r < kRows && first + r < s.tq; ++r) {
      std::memcpy(out + (first + r) * out_stride, block_out + r * s.d_pad, s.d * sizeof(T));
      lse[first + r] = block_lse[r];
    }
  }
}

template <typename T>
LAFS_INLINE void forward_pair_body(Rows<T> q, Rows<T> k, Rows<T> v, T scale, const Shape& s, T* out,
                                   int64_t out_stride, T* lse, T* scratch) {
  switch (s.d_pad / Lanes<T>::n) {
    case 1: return forward_pair_nv<T, 1>(q, k, v, scale, s, out, out_stride, lse, scratch);
    case 2: return forward_pair_nv<T, 2>(q, k, v, scale, s, out, out_stride, lse, scratch);
    case 3: return forward_pair_nv<T, 3>(q, k, v, scale, s, out, out_stride, lse, scratch);
    default: return forward_pair_nv<T, 4>(q, k, v, scale, s, out, out_stride, lse, scratch);
  }
}

template <typename T, int NV>
LAFS_INLINE void backward_pair_nv(Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> out, Rows<T> grad_out, const T* lse,
                                  T scale, const Shape& s, T* grad_q, T* grad_k, T* grad_v, int64_t grad_stride,
                                  int64_t grad_q_stride, T* scratch) {
  T* keys_t = scratch;                        // [d, t_pad]
  T* values_t = keys_t + s.d * s.t_pad;       // [d, t_pad]
  T* keys = values_t + s.d * s.t_pad;         // [t, d_pad]
  T* acc_k = keys + s.t * s.d_pad;            // [t, d_pad]
  T* acc_v = acc_k + s.t * s.d_pad;           // [t, d_pad]
  T* queries = acc_v + s.t * s.d_pad;         // [kRows, d]: scale * q
  T* queries_pad = queries + kRows * s.d;     // [kRows, d_pad]: scale * q
  T* grads = queries_pad + kRows * s.d_pad;   // [kRows, d]: d out
  T* grads_pad = grads + kRows * s.d;         // [kRows, d_pad]: d out
  T* probs = grads_pad + kRows * s.d_pad;     // [kRows, t_pad]
  T* dprobs = probs + kRows * s.t_pad;        // [kRows, t_pad]
  T* block_grad = dprobs + kRows * s.t_pad;   // [kRows, d_pad]
  pack_transposed(k, s.t, s.d, s.t_pad, keys_t);
  pack_transposed(v, s.t, s.d, s.t_pad, values_t);
  pack_rows(k, 0, s.t, s.t, s.d, s.d_pad, T(1), keys);
  std::fill(acc_k, acc_k + 2 * s.t * s.d_pad, T(0));
  for (int64_t first = 0; first < s.tq; first += kRows) {
    pack_rows(q, first, kRows, s.tq, s.d, s.d, scale, queries);
    pack_rows(q, first, kRows, s.tq, s.d, s.d_pad, scale, queries_pad);
    pack_rows(grad_out, first, kRows, s.tq, s.d, s.d, T(1), grads);
    pack_rows(grad_out, first, kRows, s.tq, s.d, s.d_pad, T(1), grads_pad);
    rows_times_cols(queries, keys_t, s.d, s.t_pad, probs);
    rows_times_cols(grads, values_t, s.d, s.t_pad, dprobs);
    for (int64_t r = 0; r < kRows; ++r) {
      // Rows beyond tq have zero gradients, so they add nothing to dK and dV whatever their probabilities.
      const bool real = first + r < s.tq;
      const T row_lse = real ? lse[first + r] : T(0);
      T dot = T(0);
      if (real) {
        const T* o = out.row(first + r);
        for (int64_t c = 0; c < s.d; ++c) dot += o[c] * grads[r * s.d + c];
      }
      T* p = probs + r * s.t_pad;
      T* dp = dprobs + r * s.t_pad;
#pragma omp simd
      for (int64_t j = 0; j < s.t; ++j) {
        p[j] = exp_acc(p[j] - row_lse);
        dp[j] = p[j] * (dp[j] - dot);
      }
      for (int64_t j = s.t; j < s.t_pad; ++j) p[j] = dp[j] = T(0);
    }
    accumulate_cols<T, NV>(probs, grads_pad, s.t, s.t_pad, acc_v);
    accumulate_cols<T, NV>(dprobs, queries_pad, s.t, s.t_pad, acc_k);
    weights_times_values<T, NV>(dprobs, keys, s.t, s.t_pad, scale, block_grad);
    for (int64_t r = 0; r < kRows && first + r < s.tq; ++r) {
      std::memcpy(grad_q + (first + r) * grad_q_stride, block_grad + r * s.d_pad, s.d * sizeof(T));
    }
  }
  for (int64_t j = 0; j < s.t; ++j) {
    std::memcpy(grad_k + j * grad_stride, acc_k + j * s.d_pad, s.d * sizeof(T));
    std::memcpy(grad_v + j * grad_stride, acc_v + j * s.d_pad, s.d * sizeof(T));
  }
}

template <typename T>
LAFS_INLINE void backward_pair_body(Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> out, Rows<T> grad_out, const T* lse,
                                    T scale, const Shape& s, T* grad_q, T* grad_k, T* grad_v, int64_t grad_stride,
                                    int64_t grad_q_stride, T* scratch) {
  switch (s.d_pad / Lanes<T>::n) {
    case 1:
      return backward_pair_nv<T, 1>(q, k, v, out, grad_out, lse, scale, s, grad_q, grad_k, grad_v, grad_stride,
                                    grad_q_stride, scratch);
    case 2:
      return backward_pair_nv<T, 2>(q, k, v, out, grad_out, lse, scale, s, grad_q, grad_k, grad_v, grad_stride,
                                    grad_q_stride, scratch);
    case 3:
      return backward_pair_nv<T, 3>(q, k, v, out, grad_out, lse, scale, s, grad_q, grad_k, grad_v, grad_stride,
                                    grad_q_stride, scratch);
    default:
      return backward_pair_nv<T, 4>(q, k, v, out, grad_out, lse, scale, s, grad_q, grad_k, grad_v, grad_stride,
                                    grad_q_stride, scratch);
  }
}

LAFS_ISA_VARIANTS(void, forward_pair,
                  (Rows<T> q, Rows<T> k, Rows<T> v, T scale, const Shape& s, T* out, int64_t out_stride, T* lse,
                   T* scratch),
                  (q, k, v, scale, s, out, out_stride, lse, scratch))
LAFS_ISA_VARIANTS(void, backward_pair,
                  (Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> out, Rows<T> grad_out, const T* lse, T scale,
                   const Shape& s, T* grad_q, T* grad_k, T* grad_v, int64_t grad_stride, int64_t grad_q_stride,
                   T* scratch),
                  (q, k, v, out, grad_out, lse, scale, s, grad_q, grad_k, grad_v, grad_stride, grad_q_stride,
                   scratch))

// (b, h) pair p of a [B, H, T, d] tensor as rows.
template <typename T>
Rows<T> pair_rows(const at::Tensor& x, int64_t p, int64_t heads) {
  const int64_t b = p / heads, h = p % heads;
  return {x.const_data_ptr<T>() + b * x.stride(0) + h * x.stride(1), x.stride(2)};
}

void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k and v must be [B, H, T, d]; got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              op, ": q [B, H, Tq, d] and k, v [B, H, T, d] disagree: ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              op, ": q, k and v must all be float32 or all float64");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, op, ": the last dimension must be dense");
  TORCH_CHECK(k.size(2) >= 1, op, ": at least one key is needed");
  const int64_t lanes = 64 / q.element_size();
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxVecs * lanes, op, ": head width d must be in [1, ",
              kMaxVecs * lanes, "] for ", q.scalar_type(), "; got ", q.size(3));
}

Shape shape_of(const at::Tensor& q, const at::Tensor& k) {
  const int64_t lanes = 64 / q.element_size();
  return {q.size(2), k.size(2), q.size(3), round_up(q.size(3), lanes), round_up(k.size(2), lanes)};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     double scale) {
  check_inputs("_attention_fwd", q, k, v);
  const int64_t B = q.size(0), H = q.size(1);
  const Shape s = shape_of(q, k);
  at::Tensor out = at::empty({B, s.tq, H, s.d}, q.options());
  at::Tensor lse = at::empty({B, H, s.tq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "_attention_fwd", [&] {
    // keys_t, values, queries, probs, block_out of forward_pair_nv
    const int64_t scratch = s.d * s.t_pad + s.t * s.d_pad + kRows * (s.d + s.t_pad + s.d_pad);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buffer(scratch);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / H, h = p % H;
        forward_pair<scalar_t>(pair_rows<scalar_t>(q, p, H), pair_rows<scalar_t>(k, p, H),
                               pair_rows<scalar_t>(v, p, H), static_cast<scalar_t>(scale), s,
                               out.mutable_data_ptr<scalar_t>() + (b * s.tq * H + h) * s.d, H * s.d,
                               lse.mutable_data_ptr<scalar_t>() + p * s.tq, buffer.data());
      }
    });
  });
  return {out.permute({0, 2, 1, 3}), lse};
}

// The gradients of q, k and v into grad_q [B, H, Tq, d] and grad_k, grad_v [B, H, T, d]: views of any layout
// whose last dimension is dense and whose k and v rows share one stride.
void run_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, double scale, at::Tensor& grad_q,
                  at::Tensor& grad_k, at::Tensor& grad_v) {
  check_inputs(op, q, k, v);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.stride(3) == 1 &&
                  out.stride(3) == 1 && grad_out.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              op, ": grad_out and out must be like q, ", q.sizes(), " with a dense last dimension");
  const int64_t B = q.size(0), H = q.size(1);
  const Shape s = shape_of(q, k);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, H, s.tq}) && lse.is_contiguous() &&
                  lse.scalar_type() == q.scalar_type(),
              op, ": lse must be a contiguous [B, H, Tq] in q's dtype");
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "_attention_bwd", [&] {
    // keys_t, values_t, keys, acc_k, acc_v, queries(_pad), grads(_pad), probs, dprobs, block_grad of backward_pair_nv
    const int64_t scratch = 2 * s.d * s.t_pad + 3 * s.t * s.d_pad + kRows * (2 * s.d + 3 * s.d_pad + 2 * s.t_pad);
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buffer(scratch);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / H, h = p % H;
        const auto pair_of = [&](at::Tensor& x) {
          return x.mutable_data_ptr<scalar_t>() + b * x.stride(0) + h * x.stride(1);
        };
        backward_pair<scalar_t>(pair_rows<scalar_t>(q, p, H), pair_rows<scalar_t>(k, p, H),
                                pair_rows<scalar_t>(v, p, H), pair_rows<scalar_t>(out, p, H),
                                pair_rows<scalar_t>(grad_out, p, H), lse.const_data_ptr<scalar_t>() + p * s.tq,
                                static_cast<scalar_t>(scale), s, pair_of(grad_q), pair_of(grad_k), pair_of(grad_v),
                                grad_k.stride(2), grad_q.stride(2), buffer.data());
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 double scale) {
  check_inputs("_attention_bwd", q, k, v);
  const int64_t B = q.size(0), H = q.size(1), d = q.size(3);
  at::Tensor grad_q = at::empty({B, q.size(2), H, d}, q.options()).permute({0, 2, 1, 3});
  at::Tensor grad_k = at::empty({B, k.size(2), H, d}, q.options()).permute({0, 2, 1, 3});
  at::Tensor grad_v = at::empty({B, k.size(2), H, d}, q.options()).permute({0, 2, 1, 3});
  run_backward("_attention_bwd", grad_out, q, k, v, out, lse, scale, grad_q, grad_k, grad_v);
  return {grad_q, grad_k, grad_v};
}

// q, k, v [B, H, T, d] as views of one packed qkv [B, T, 3, H, d].
std::array<at::Tensor, 3> unpack_qkv(const at::Tensor& qkv) {
  return {qkv.select(2, 0).permute({0, 2, 1, 3}), qkv.select(2, 1).permute({0, 2, 1, 3}),
          qkv.select(2, 2).permute({0, 2, 1, 3})};
}

at::Tensor attention_qkv_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                 const at::Tensor& lse, double scale) {
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3 && qkv.is_contiguous(),
              "_attention_qkv_bwd: qkv must be a contiguous [B, T, 3, H, d]; got ", qkv.sizes());
  const auto [q, k, v] = unpack_qkv(qkv);
  at::Tensor grad = at::empty_like(qkv);
  auto [grad_q, grad_k, grad_v] = unpack_qkv(grad);
  run_backward("_attention_qkv_bwd", grad_out, q, k, v, out, lse, scale, grad_q, grad_k, grad_v);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(lafs_kernels, CPU, m) {
  m.impl("_attention_fwd", &attention_fwd_cpu);
  m.impl("_attention_bwd", &attention_bwd_cpu);
  m.impl("_attention_qkv_bwd", &attention_qkv_bwd_cpu);
}
