// CPU kernel of the Part fViT blocks' attention for short sequences: out = softmax(scale q k^T) v, forward and
// backward (lafs_kernels/ops/attention.py; its reference is the same formula in torch ops).
//
// q [B, H, Tq, d], k and v [B, H, T, d], any strides with the last one 1, float32 or float64, d at most
// 4 vectors (64 float32 / 32 float64 values).  The forward returns out [B, H, Tq, d] (a view of a
// [B, Tq, H, d] tensor, so the blocks' transpose back to [B, Tq, H * d] is free) and the log-sum-exp of each
// row of scores, lse [B, H, Tq]; the backward recomputes the probabilities from lse.
//
// One task per (b, h): its keys (transposed, in registers by 16 x 16 tiles on AVX-512) and values are packed into
// zero-padded buffers once, then the queries run in blocks of kRows rows (a last single row, the cls token after
// whole blocks of patch tokens, alone).  A block's scores [kRows, T] stay in L1 between the score product, the
// softmax and the value product, where torch's separate ops write and read a [Tq, T] tensor between each.
// float32 heads are padded to half vectors (8 values: part_fvit_tiny's 24 is one and a half vectors, not two).
// The backward keeps the block's dK and dV contributions in per-task accumulators [T, d], written out once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
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
  typedef T half __attribute__((vector_size(32)));
  using index_t = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef index_t index __attribute__((vector_size(64)));
};

template <typename T>
using Vec = typename Lanes<T>::vec;
template <typename T>
using Half = typename Lanes<T>::half;

template <typename V, typename T>
LAFS_INLINE V load_as(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
LAFS_INLINE Vec<T> load(const T* p) {
  return load_as<Vec<T>>(p);
}

template <typename V, typename T>
LAFS_INLINE void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

LAFS_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A head row of NV full vectors and NH (0 or 1) half vectors, in registers.
template <typename T, int NV, int NH>
struct RowVecs {
  static constexpr int64_t width = NV * Lanes<T>::n + NH * Lanes<T>::n / 2;
  Vec<T> full[NV > 0 ? NV : 1];
  Half<T> half;

  LAFS_INLINE void zero() {
    for (int v = 0; v < NV; ++v) full[v] = Vec<T>{};
    if constexpr (NH > 0) half = Half<T>{};
  }
  LAFS_INLINE void load_from(const T* p) {
    for (int v = 0; v < NV; ++v) full[v] = load(p + v * Lanes<T>::n);
    if constexpr (NH > 0) half = load_as<Half<T>>(p + NV * Lanes<T>::n);
  }
  LAFS_INLINE void store_to(T* p, T factor) const {
    for (int v = 0; v < NV; ++v) store(p + v * Lanes<T>::n, full[v] * factor);
    if constexpr (NH > 0) store(p + NV * Lanes<T>::n, half * factor);
  }
  // this += w * x
  LAFS_INLINE void fma(T w, const RowVecs& x) {
    for (int v = 0; v < NV; ++v) full[v] += w * x.full[v];
    if constexpr (NH > 0) half += w * x.half;
  }
};

// scores[r, j] = sum_c rows[r, c] * cols_t[c, j] for r < R, j < t_pad: rows [R, d] (row stride ld), cols_t
// [d, t_pad] (the other operand transposed and zero-padded), scores [R, t_pad].
template <typename T, int R>
LAFS_INLINE void rows_times_cols(const T* rows, int64_t ld, const T* cols_t, int64_t d, int64_t t_pad, T* scores) {
  constexpr int64_t W = Lanes<T>::n;
  for (int64_t j = 0; j < t_pad; j += W) {
    Vec<T> acc[R] = {};
    for (int64_t c = 0; c < d; ++c) {
      const Vec<T> col = load(cols_t + c * t_pad + j);
      for (int r = 0; r < R; ++r) acc[r] += rows[r * ld + c] * col;
    }
    for (int r = 0; r < R; ++r) store(scores + r * t_pad + j, acc[r]);
  }
}

// out[r, :] = factor * sum_{j < t} weights[r, j] * values[j, :] for r < R: weights [R, t_pad], values [t, width]
// (zero-padded rows), out [R, width].
template <typename T, int R, int NV, int NH>
LAFS_INLINE void weights_times_values(const T* weights, const T* values, int64_t t, int64_t t_pad, T factor, T* out) {
  using Row = RowVecs<T, NV, NH>;
  constexpr int RB = R < (NV + NH <= 2 ? 8 : 4) ? R : (NV + NH <= 2 ? 8 : 4);  // RB rows' accumulators in registers
  for (int r0 = 0; r0 < R; r0 += RB) {
    Row acc[RB];
    for (int r = 0; r < RB; ++r) acc[r].zero();
    for (int64_t j = 0; j < t; ++j) {
      Row value;
      value.load_from(values + j * Row::width);
      for (int r = 0; r < RB; ++r) acc[r].fma(weights[(r0 + r) * t_pad + j], value);
    }
    for (int r = 0; r < RB; ++r) acc[r].store_to(out + (r0 + r) * Row::width, factor);
  }
}

// acc[j, :] += sum_r weights[r, j] * rows[r, :] for j < t: weights [R, t_pad], rows [R, width], acc [t, width].
template <typename T, int R, int NV, int NH>
LAFS_INLINE void accumulate_cols(const T* weights, const T* rows, int64_t t, int64_t t_pad, T* acc) {
  using Row = RowVecs<T, NV, NH>;
  Row row[R];
  for (int r = 0; r < R; ++r) row[r].load_from(rows + r * Row::width);
  for (int64_t j = 0; j < t; ++j) {
    Row sum;
    sum.load_from(acc + j * Row::width);
    for (int r = 0; r < R; ++r) sum.fma(weights[r * t_pad + j], row[r]);
    sum.store_to(acc + j * Row::width, T(1));
  }
}

// Strided [T, d] matrix of one (b, h): element (i, c) at data[i * row_stride + c].
template <typename T>
struct Rows {
  const T* data;
  int64_t row_stride;
  const T* row(int64_t i) const { return data + i * row_stride; }
};

// The first n values at p, zero beyond.
template <typename T>
LAFS_INLINE Vec<T> load_first(const T* p, int64_t n) {
  if (n == Lanes<T>::n) return load(p);
  Vec<T> v = {};
  std::memcpy(&v, p, n * sizeof(T));
  return v;
}

// dst [d, t_pad] = src^T, zero beyond t.
template <typename T>
void pack_transposed_scalar(Rows<T> src, int64_t t, int64_t d, int64_t t_pad, T* dst) {
  for (int64_t c = 0; c < d; ++c) {
    T* out = dst + c * t_pad;
    for (int64_t i = 0; i < t; ++i) out[i] = src.data[i * src.row_stride + c];
    std::fill(out + t, out + t_pad, T(0));
  }
}

#if (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
// One stage of a W x W tile's transpose in registers: swaps the off-diagonal B x B blocks of every 2B x 2B block.
template <typename T, int64_t B>
__attribute__((target(LAFS_AVX512), always_inline)) inline void swap_off_diagonal_blocks(Vec<T>* tile) {
  constexpr int64_t W = Lanes<T>::n;
  using Index = typename Lanes<T>::index;
  // lanes of (tile[i], tile[i + B]) that form the new rows i (first W) and i + B (last W)
  static constexpr std::array<typename Lanes<T>::index_t, 2 * W> lanes = [] {
    std::array<typename Lanes<T>::index_t, 2 * W> m{};
    for (int64_t j = 0; j < W; ++j) {
      m[j] = (j & B) ? W + j - B : j;
      m[W + j] = (j & B) ? W + j : j + B;
    }
    return m;
  }();
  const Index low = load_as<Index>(lanes.data()), high = load_as<Index>(lanes.data() + W);
#pragma GCC unroll 16
  for (int64_t i = 0; i < W; ++i) {
    if (i & B) continue;
    const Vec<T> upper = tile[i], lower = tile[i + B];
    tile[i] = __builtin_shuffle(upper, lower, low);
    tile[i + B] = __builtin_shuffle(upper, lower, high);
  }
}

// The same as pack_transposed_scalar by W x W tiles transposed in registers (log2(W) stages).  Only the AVX-512
// build has it: GCC's lowering of these two-source shuffles for narrower vectors is slow to compile and to run.
template <typename T>
__attribute__((target(LAFS_AVX512))) void pack_transposed_avx512(Rows<T> src, int64_t t, int64_t d, int64_t t_pad,
                                                                T* dst) {
  constexpr int64_t W = Lanes<T>::n;
  for (int64_t j0 = 0; j0 < t_pad; j0 += W) {
    for (int64_t c0 = 0; c0 < d; c0 += W) {
      const int64_t cols = std::min(W, d - c0);
      Vec<T> tile[W];
#pragma GCC unroll 16
      for (int64_t r = 0; r < W; ++r) tile[r] = j0 + r < t ? load_first(src.row(j0 + r) + c0, cols) : Vec<T>{};
      if constexpr (W == 16) swap_off_diagonal_blocks<T, 8>(tile);
      swap_off_diagonal_blocks<T, 4>(tile);
      swap_off_diagonal_blocks<T, 2>(tile);
      swap_off_diagonal_blocks<T, 1>(tile);
#pragma GCC unroll 16
      for (int64_t c = 0; c < W; ++c) {
        if (c < cols) store(dst + (c0 + c) * t_pad + j0, tile[c]);
      }
    }
  }
}
#endif

// dst [d, t_pad] = src^T, zero beyond t (src [t, d]).
template <typename T>
void pack_transposed(Rows<T> src, int64_t t, int64_t d, int64_t t_pad, T* dst) {
#if (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
  if (lafs_isa::kIsa == lafs_isa::Isa::avx512) return pack_transposed_avx512(src, t, d, t_pad, dst);
#endif
  pack_transposed_scalar(src, t, d, t_pad, dst);
}

// dst [rows, width] = factor * src rows first..first + rows (rows beyond count and columns beyond d zero).
template <typename T>
LAFS_INLINE void pack_rows(Rows<T> src, int64_t first, int64_t rows, int64_t count, int64_t d, int64_t width,
                           T factor, T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    T* out = dst + r * width;
    if (first + r < count) {
      const T* row = src.row(first + r);
      for (int64_t c = 0; c < d; ++c) out[c] = factor * row[c];
      std::fill(out + d, out + width, T(0));
    } else {
      std::fill(out, out + width, T(0));
    }
  }
}

// Softmax of each row of scores [R, t_pad] over its first t entries, in place (zero beyond t); the row's
// log-sum-exp goes to lse[r].  The padding is set to -inf first, so every loop runs over whole vectors.
template <typename T, int R>
LAFS_INLINE void softmax_rows(T* scores, int64_t t, int64_t t_pad, T* lse) {
  for (int r = 0; r < R; ++r) {
    T* s = scores + r * t_pad;
    std::fill(s + t, s + t_pad, -std::numeric_limits<T>::infinity());
    T top = s[0];
#pragma omp simd reduction(max : top)
    for (int64_t j = 0; j < t_pad; ++j) top = s[j] > top ? s[j] : top;
    T sum = T(0);
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < t_pad; ++j) {
      s[j] = exp_acc(s[j] - top);
      sum += s[j];
    }
    const T inv = T(1) / sum;
#pragma omp simd
    for (int64_t j = 0; j < t_pad; ++j) s[j] *= inv;
    lse[r] = top + std::log(sum);
  }
}

// tq query rows, t keys, head width d (d_pad: padded_width), keys rounded up to vectors (t_pad).
struct Shape {
  int64_t tq, t, d, d_pad, t_pad;
};

// Calls body(first, std::integral_constant<int, R>) for each block of R query rows: kRows, or (float32) 1 for a
// sequence's single last row (a cls token after whole blocks of patch tokens); other short last blocks are padded
// to kRows.  float64 always takes kRows, for the build time (see padded_width).
template <typename T, typename Body>
LAFS_INLINE void for_row_blocks(int64_t tq, Body&& body) {
  for (int64_t first = 0; first < tq; first += kRows) {
    if (tq - first == 1 && sizeof(T) == 4) {
      body(first, std::integral_constant<int, 1>{});
    } else {
      body(first, std::integral_constant<int, kRows>{});
    }
  }
}

template <typename T, int NV, int NH>
LAFS_INLINE void forward_pair_nv(Rows<T> q, Rows<T> k, Rows<T> v, T scale, const Shape& s, T* out, int64_t out_stride,
                                 T* lse, T* scratch) {
  T* keys_t = scratch;                       // [d, t_pad]
  T* values = keys_t + s.d * s.t_pad;        // [t, d_pad]
  T* queries = values + s.t * s.d_pad;       // [kRows, d_pad]
  T* probs = queries + kRows * s.d_pad;      // [kRows, t_pad]
  T* block_out = probs + kRows * s.t_pad;    // [kRows, d_pad]
  pack_transposed(k, s.t, s.d, s.t_pad, keys_t);
  pack_rows(v, 0, s.t, s.t, s.d, s.d_pad, T(1), values);
  for_row_blocks<T>(s.tq, [&](int64_t first, auto rows) LAFS_INLINE_LAMBDA {
    constexpr int R = decltype(rows)::value;
    T block_lse[R];
    pack_rows(q, first, R, s.tq, s.d, s.d_pad, scale, queries);
    rows_times_cols<T, R>(queries, s.d_pad, keys_t, s.d, s.t_pad, probs);
    softmax_rows<T, R>(probs, s.t, s.t_pad, block_lse);
    weights_times_values<T, R, NV, NH>(probs, values, s.t, s.t_pad, T(1), block_out);
    for (int64_t r = 0; r < R && first + r < s.tq; ++r) {
      std::memcpy(out + (first + r) * out_stride, block_out + r * s.d_pad, s.d * sizeof(T));
      lse[first + r] = block_lse[r];
    }
  });
}

// Calls body(NV, NH) for the padded head width d_pad (padded_width): NV full vectors and NH half vectors.
template <typename T, typename Body>
LAFS_INLINE void for_head_width(int64_t d_pad, Body&& body) {
  using std::integral_constant;
  if constexpr (sizeof(T) == 4) {
    switch (d_pad) {
      case 8: return body(integral_constant<int, 0>{}, integral_constant<int, 1>{});
      case 16: return body(integral_constant<int, 1>{}, integral_constant<int, 0>{});
      case 24: return body(integral_constant<int, 1>{}, integral_constant<int, 1>{});
      case 32: return body(integral_constant<int, 2>{}, integral_constant<int, 0>{});
      case 48: return body(integral_constant<int, 3>{}, integral_constant<int, 0>{});
    }
  }
  return body(integral_constant<int, kMaxVecs>{}, integral_constant<int, 0>{});
}

template <typename T>
LAFS_INLINE void forward_pair_body(Rows<T> q, Rows<T> k, Rows<T> v, T scale, const Shape& s, T* out,
                                   int64_t out_stride, T* lse, T* scratch) {
  for_head_width<T>(s.d_pad, [&](auto nv, auto nh) LAFS_INLINE_LAMBDA {
    forward_pair_nv<T, decltype(nv)::value, decltype(nh)::value>(q, k, v, scale, s, out, out_stride, lse, scratch);
  });
}

template <typename T, int NV, int NH>
LAFS_INLINE void backward_pair_nv(Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> out, Rows<T> grad_out, const T* lse,
                                  T scale, const Shape& s, T* grad_q, T* grad_k, T* grad_v, int64_t grad_stride,
                                  int64_t grad_q_stride, T* scratch) {
  T* keys_t = scratch;                        // [d, t_pad]
  T* values_t = keys_t + s.d * s.t_pad;       // [d, t_pad]
  T* keys = values_t + s.d * s.t_pad;         // [t, d_pad]
  T* acc_k = keys + s.t * s.d_pad;            // [t, d_pad]
  T* acc_v = acc_k + s.t * s.d_pad;           // [t, d_pad]
  T* queries = acc_v + s.t * s.d_pad;         // [kRows, d_pad]: scale * q
  T* grads = queries + kRows * s.d_pad;       // [kRows, d_pad]: d out
  T* probs = grads + kRows * s.d_pad;         // [kRows, t_pad]
  T* dprobs = probs + kRows * s.t_pad;        // [kRows, t_pad]
  T* block_grad = dprobs + kRows * s.t_pad;   // [kRows, d_pad]
  pack_transposed(k, s.t, s.d, s.t_pad, keys_t);
  pack_transposed(v, s.t, s.d, s.t_pad, values_t);
  pack_rows(k, 0, s.t, s.t, s.d, s.d_pad, T(1), keys);
  std::fill(acc_k, acc_k + 2 * s.t * s.d_pad, T(0));
  for_row_blocks<T>(s.tq, [&](int64_t first, auto rows) LAFS_INLINE_LAMBDA {
    constexpr int R = decltype(rows)::value;
    pack_rows(q, first, R, s.tq, s.d, s.d_pad, scale, queries);
    pack_rows(grad_out, first, R, s.tq, s.d, s.d_pad, T(1), grads);
    rows_times_cols<T, R>(queries, s.d_pad, keys_t, s.d, s.t_pad, probs);
    rows_times_cols<T, R>(grads, s.d_pad, values_t, s.d, s.t_pad, dprobs);
    for (int r = 0; r < R; ++r) {
      // Rows beyond tq have zero gradients, so they add nothing to dK and dV whatever their probabilities.
      const bool real = first + r < s.tq;
      const T row_lse = real ? lse[first + r] : T(0);
      T dot = T(0);
      if (real) {
        const T* o = out.row(first + r);
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < s.d; ++c) dot += o[c] * grads[r * s.d_pad + c];
      }
      T* p = probs + r * s.t_pad;
      T* dp = dprobs + r * s.t_pad;
      std::fill(p + s.t, p + s.t_pad, -std::numeric_limits<T>::infinity());  // so that p and dp are 0 there
#pragma omp simd
      for (int64_t j = 0; j < s.t_pad; ++j) {
        p[j] = exp_acc(p[j] - row_lse);
        dp[j] = p[j] * (dp[j] - dot);
      }
    }
    accumulate_cols<T, R, NV, NH>(probs, grads, s.t, s.t_pad, acc_v);
    accumulate_cols<T, R, NV, NH>(dprobs, queries, s.t, s.t_pad, acc_k);
    weights_times_values<T, R, NV, NH>(dprobs, keys, s.t, s.t_pad, scale, block_grad);
    for (int64_t r = 0; r < R && first + r < s.tq; ++r) {
      std::memcpy(grad_q + (first + r) * grad_q_stride, block_grad + r * s.d_pad, s.d * sizeof(T));
    }
  });
  for (int64_t j = 0; j < s.t; ++j) {
    std::memcpy(grad_k + j * grad_stride, acc_k + j * s.d_pad, s.d * sizeof(T));
    std::memcpy(grad_v + j * grad_stride, acc_v + j * s.d_pad, s.d * sizeof(T));
  }
}

template <typename T>
LAFS_INLINE void backward_pair_body(Rows<T> q, Rows<T> k, Rows<T> v, Rows<T> out, Rows<T> grad_out, const T* lse,
                                    T scale, const Shape& s, T* grad_q, T* grad_k, T* grad_v, int64_t grad_stride,
                                    int64_t grad_q_stride, T* scratch) {
  for_head_width<T>(s.d_pad, [&](auto nv, auto nh) LAFS_INLINE_LAMBDA {
    backward_pair_nv<T, decltype(nv)::value, decltype(nh)::value>(q, k, v, out, grad_out, lse, scale, s, grad_q,
                                                                  grad_k, grad_v, grad_stride, grad_q_stride, scratch);
  });
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

// The head width the kernel computes with: float32 widths up to 32 rounded up to half vectors (8 values), wider
// ones to 48 or 64; float64 (which serves the tests, where speed does not matter) at 4 vectors.  Each width is an
// instantiation of every block routine, so fewer widths keep the build time down.
int64_t padded_width(int64_t d, int64_t element_size) {
  if (element_size == 8) return kMaxVecs * Lanes<double>::n;
  return d <= 32 ? round_up(d, 8) : d <= 48 ? 48 : 64;
}

Shape shape_of(const at::Tensor& q, const at::Tensor& k) {
  const int64_t lanes = 64 / q.element_size();
  return {q.size(2), k.size(2), q.size(3), padded_width(q.size(3), q.element_size()), round_up(k.size(2), lanes)};
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
    const int64_t scratch = s.d * s.t_pad + s.t * s.d_pad + kRows * (2 * s.d_pad + s.t_pad);
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
    // keys_t, values_t, keys, acc_k, acc_v, queries, grads, probs, dprobs, block_grad of backward_pair_nv
    const int64_t scratch = 2 * s.d * s.t_pad + 3 * s.t * s.d_pad + kRows * (3 * s.d_pad + 2 * s.t_pad);
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
