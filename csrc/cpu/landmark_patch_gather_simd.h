// P = 8, float32 patches of the landmark patch gather with explicit 8-lane vectors, one token row
// (the 8 x offsets of a patch) per vector.  Included twice by landmark_patch_gather.cpp, inside its
// anonymous namespace: once as namespace sse2 (two SSE registers per row; SSE2 is part of x86-64)
// and once, under `#pragma GCC target("avx2")`, as namespace avx2 (one AVX register), chosen at run
// time.  The arithmetic is the same operations in the same order as the generic kernels (no FMA
// contraction: neither target enables it), so both give bitwise the same results as each other and
// as the generic code.  Uses no library templates (their instantiations could leak one target's
// code into the other).
//
// Needs before inclusion: LAFS_SIMD_AVX2 (0 or 1), ImageGeometry, PatchWindow<float>.

#if LAFS_SIMD_AVX2
struct V8 {
  __m256 v;
};
using Splat = __m256;
inline Splat splat8(float f) { return _mm256_set1_ps(f); }
inline V8 load8(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void store8(float* p, const V8& a) { _mm256_storeu_ps(p, a.v); }
inline void stream8(float* p, const V8& a) { _mm256_stream_ps(p, a.v); }  // p 32-byte aligned
inline V8 zero8() { return {_mm256_setzero_ps()}; }
inline V8 add8(const V8& a, const V8& b) { return {_mm256_add_ps(a.v, b.v)}; }
inline V8 sub8(const V8& a, const V8& b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline V8 mul8(const V8& a, const V8& b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline V8 scale8(Splat f, const V8& a) { return {_mm256_mul_ps(f, a.v)}; }
// lane u <- lane u-1, lane 0 <- 0
inline V8 shift_up8(const V8& a) {
  const __m256 moved = _mm256_permutevar8x32_ps(a.v, _mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6));
  return {_mm256_blend_ps(moved, _mm256_setzero_ps(), 0x01)};
}
// Lanes lo <= u < hi of p[u], zero elsewhere (the other lanes are not read).
inline V8 load8_range(const float* p, int64_t lo, int64_t hi) {
  const __m256i u = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(u, _mm256_set1_epi32(static_cast<int>(lo) - 1)),
                                      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(hi)), u));
  return {_mm256_maskload_ps(p, in)};
}
inline float last8(const V8& a) {
  const __m128 hi = _mm256_extractf128_ps(a.v, 1);
  return _mm_cvtss_f32(_mm_shuffle_ps(hi, hi, _MM_SHUFFLE(3, 3, 3, 3)));
}
// (a, b) = (s[0..7], s[1..8]) from scalars, in registers.
inline void from9(const float s[9], V8& a, V8& b) {
  a = {_mm256_setr_ps(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])};
  b = {_mm256_setr_ps(s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8])};
}
// out[q] = column q of the 8 x 8 matrix whose rows are in[0..7].
inline void transpose8(V8 in[8], V8 out[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(in[0].v, in[1].v), t1 = _mm256_unpackhi_ps(in[0].v, in[1].v);
  const __m256 t2 = _mm256_unpacklo_ps(in[2].v, in[3].v), t3 = _mm256_unpackhi_ps(in[2].v, in[3].v);
  const __m256 t4 = _mm256_unpacklo_ps(in[4].v, in[5].v), t5 = _mm256_unpackhi_ps(in[4].v, in[5].v);
  const __m256 t6 = _mm256_unpacklo_ps(in[6].v, in[7].v), t7 = _mm256_unpackhi_ps(in[6].v, in[7].v);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  out[0] = {_mm256_permute2f128_ps(u0, u4, 0x20)};
  out[1] = {_mm256_permute2f128_ps(u1, u5, 0x20)};
  out[2] = {_mm256_permute2f128_ps(u2, u6, 0x20)};
  out[3] = {_mm256_permute2f128_ps(u3, u7, 0x20)};
  out[4] = {_mm256_permute2f128_ps(u0, u4, 0x31)};
  out[5] = {_mm256_permute2f128_ps(u1, u5, 0x31)};
  out[6] = {_mm256_permute2f128_ps(u2, u6, 0x31)};
  out[7] = {_mm256_permute2f128_ps(u3, u7, 0x31)};
}
#else
struct V8 {
  __m128 lo, hi;
};
using Splat = __m128;
inline Splat splat8(float f) { return _mm_set1_ps(f); }
inline V8 load8(const float* p) { return {_mm_loadu_ps(p), _mm_loadu_ps(p + 4)}; }
inline void store8(float* p, const V8& v) {
  _mm_storeu_ps(p, v.lo);
  _mm_storeu_ps(p + 4, v.hi);
}
inline void stream8(float* p, const V8& v) {  // p 16-byte aligned
  _mm_stream_ps(p, v.lo);
  _mm_stream_ps(p + 4, v.hi);
}
inline V8 zero8() { return {_mm_setzero_ps(), _mm_setzero_ps()}; }
inline V8 add8(const V8& a, const V8& b) { return {_mm_add_ps(a.lo, b.lo), _mm_add_ps(a.hi, b.hi)}; }
inline V8 sub8(const V8& a, const V8& b) { return {_mm_sub_ps(a.lo, b.lo), _mm_sub_ps(a.hi, b.hi)}; }
inline V8 mul8(const V8& a, const V8& b) { return {_mm_mul_ps(a.lo, b.lo), _mm_mul_ps(a.hi, b.hi)}; }
inline V8 scale8(Splat f, const V8& a) { return {_mm_mul_ps(f, a.lo), _mm_mul_ps(f, a.hi)}; }
// lane u <- lane u-1, lane 0 <- 0
inline V8 shift_up8(const V8& a) {
  const __m128 lo = _mm_castsi128_ps(_mm_slli_si128(_mm_castps_si128(a.lo), 4));
  const __m128 t = _mm_shuffle_ps(a.lo, a.hi, _MM_SHUFFLE(0, 0, 3, 3));  // a3 a3 a4 a4
  return {lo, _mm_shuffle_ps(t, a.hi, _MM_SHUFFLE(2, 1, 2, 0))};           // a3 a4 a5 a6
}
inline float last8(const V8& a) { return _mm_cvtss_f32(_mm_shuffle_ps(a.hi, a.hi, _MM_SHUFFLE(3, 3, 3, 3))); }
// (a, b) = (s[0..7], s[1..8]) from scalars, in registers (a copy through memory would stall each
// vector load on the scalar stores it reads).
inline void from9(const float s[9], V8& a, V8& b) {
  a = {_mm_setr_ps(s[0], s[1], s[2], s[3]), _mm_setr_ps(s[4], s[5], s[6], s[7])};
  b = {_mm_setr_ps(s[1], s[2], s[3], s[4]), _mm_setr_ps(s[5], s[6], s[7], s[8])};
}
// out[q] = column q of the 8 x 8 matrix whose rows are in[0..7].
inline void transpose8(V8 in[8], V8 out[8]) {
  __m128 a0 = in[0].lo, a1 = in[1].lo, a2 = in[2].lo, a3 = in[3].lo;
  __m128 b0 = in[0].hi, b1 = in[1].hi, b2 = in[2].hi, b3 = in[3].hi;
  __m128 c0 = in[4].lo, c1 = in[5].lo, c2 = in[6].lo, c3 = in[7].lo;
  __m128 d0 = in[4].hi, d1 = in[5].hi, d2 = in[6].hi, d3 = in[7].hi;
  _MM_TRANSPOSE4_PS(a0, a1, a2, a3);
  _MM_TRANSPOSE4_PS(b0, b1, b2, b3);
  _MM_TRANSPOSE4_PS(c0, c1, c2, c3);
  _MM_TRANSPOSE4_PS(d0, d1, d2, d3);
  out[0] = {a0, c0};
  out[1] = {a1, c1};
  out[2] = {a2, c2};
  out[3] = {a3, c3};
  out[4] = {b0, d0};
  out[5] = {b1, d1};
  out[6] = {b2, d2};
  out[7] = {b3, d3};
}
#endif

// a + f (b - a)
inline V8 lerp8(const V8& a, const V8& b, Splat f) { return add8(a, scale8(f, sub8(b, a))); }
inline float sum8(const V8& a) {
  float lanes[8];
  store8(lanes, a);
  float s = 0;
  for (int i = 0; i < 8; ++i) s += lanes[i];
  return s;
}

// Lanes T[c*8 + j] (vector over i) -> token [i][j][c].  Row r = j*C + c of the (8C) x 8 matrix
// [(j, c)][i] is T[c*8 + j]; its k-th block of 8 rows, transposed, is columns 8k..8k+7 of
// the token rows i.  kStream: non-temporal stores (token 32-byte aligned), for C = 3 in address
// order so that each cache line is completed by consecutive stores.
template <int kC, bool kStream = false>
inline void lanes_to_token8(const V8* T, int64_t C_rt, float* token) {
  const int64_t C = kC > 0 ? kC : C_rt, row = 8 * C;
  if constexpr (kStream && kC == 3) {
    V8 out[3][8];
    for (int64_t k = 0; k < 3; ++k) {
      V8 in[8];
      for (int64_t q = 0; q < 8; ++q) {
        const int64_t r = 8 * k + q;
        in[q] = T[(r % 3) * 8 + r / 3];
      }
      transpose8(in, out[k]);
    }
    for (int64_t i = 0; i < 8; ++i) {
      for (int64_t k = 0; k < 3; ++k) stream8(token + i * 24 + 8 * k, out[k][i]);
    }
    return;
  }
  for (int64_t k = 0; k < C; ++k) {
    V8 in[8], out[8];
    for (int64_t q = 0; q < 8; ++q) {
      const int64_t r = 8 * k + q;
      in[q] = T[(r % C) * 8 + r / C];
    }
    transpose8(in, out);
    for (int64_t i = 0; i < 8; ++i) {
      if constexpr (kStream) {
        stream8(token + i * row + 8 * k, out[i]);
      } else {
        store8(token + i * row + 8 * k, out[i]);
      }
    }
  }
}

template <int kC>
inline void token_to_lanes8(const float* token, int64_t C_rt, V8* G) {
  const int64_t C = kC > 0 ? kC : C_rt, row = 8 * C;
  for (int64_t k = 0; k < C; ++k) {
    V8 in[8], out[8];
    for (int64_t i = 0; i < 8; ++i) in[i] = load8(token + i * row + 8 * k);
    transpose8(in, out);
    for (int64_t q = 0; q < 8; ++q) {
      const int64_t r = 8 * k + q;
      G[(r % C) * 8 + r / C] = out[q];
    }
  }
}

// Window row v of channel c: (a, b) = (w[u], w[u+1]), u = 0..7, from the image itself or, for a row
// that leaves the image, with zeros outside: masked loads (AVX2, unit stride), else from scalars
// assembled in registers (a copy through memory would stall each vector load on the scalar stores
// it reads).
inline void window_row8(const float* row, const ImageGeometry& g, const PatchWindow<float>& w, bool direct, V8& a,
                        V8& b) {
  if (direct) {
    const float* p = row + w.x0;
    a = load8(p);
    b = load8(p + 1);
    return;
  }
#if LAFS_SIMD_AVX2
  if (g.sW == 1) {
    const float* p = row + w.x0;
    a = load8_range(p, w.u_lo, w.u_hi);
    b = load8_range(p + 1, w.u_lo - 1, w.u_hi - 1);
    return;
  }
#endif
  float s[9];
  for (int64_t u = 0; u < 9; ++u) s[u] = (u >= w.u_lo && u < w.u_hi) ? row[(w.x0 + u) * g.sW] : 0.f;
  from9(s, a, b);
}

// h[v] = w[v][i] + fx (w[v][i+1] - w[v][i]) for v = 0..8 of channel c (zero rows outside).
inline void rows8(const float* img_c, const ImageGeometry& g, const PatchWindow<float>& w, bool direct, float* seg,
                  V8 h[9], V8* d_w = nullptr) {
  (void)seg;
  const Splat fx = splat8(w.fx);
  for (int64_t v = 0; v < 9; ++v) {
    if (v < w.v_lo || v >= w.v_hi) {
      h[v] = zero8();
      if (d_w) d_w[v] = zero8();
      continue;
    }
    V8 a, b;
    window_row8(img_c + (w.y0 + v) * g.sH, g, w, direct, a, b);
    h[v] = lerp8(a, b, fx);
    if (d_w) d_w[v] = sub8(b, a);
  }
}

// Whole window inside a unit-stride image (most patches): no per-row tests, each window row
// loaded once and filtered straight into the two token rows that use it.
inline bool interior8(const ImageGeometry& g, const PatchWindow<float>& w) {
  return w.u_lo == 0 && w.u_hi == 9 && w.v_lo == 0 && w.v_hi == 9 && g.sW == 1;
}

template <int kC>
void identity_forward8(const float* img, const ImageGeometry& g, int64_t C_rt, const PatchWindow<float>& w,
                       float* seg, V8* T) {
  const int64_t C = kC > 0 ? kC : C_rt;
  const bool direct = w.u_lo == 0 && w.u_hi == 9 && g.sW == 1;
  const Splat fy = splat8(w.fy);
  if (interior8(g, w)) {
    const Splat fx = splat8(w.fx);
    for (int64_t c = 0; c < C; ++c) {
      const float* p = img + c * g.sC + w.y0 * g.sH + w.x0;
      V8 top = lerp8(load8(p), load8(p + 1), fx);
      for (int64_t j = 0; j < 8; ++j) {
        p += g.sH;
        const V8 bottom = lerp8(load8(p), load8(p + 1), fx);
        T[c * 8 + j] = lerp8(top, bottom, fy);
        top = bottom;
      }
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    V8 h[9];
    rows8(img + c * g.sC, g, w, direct, seg, h);
    for (int64_t j = 0; j < 8; ++j) T[c * 8 + j] = lerp8(h[j], h[j + 1], fy);
  }
}

template <int kC>
void identity_backward8(const float* img, const ImageGeometry& g, float* grad_img, const ImageGeometry& gg,
                        int64_t C_rt, const PatchWindow<float>& w, bool need_centre, const V8* G, float* seg,
                        float& d_fx, float& d_fy) {
  const int64_t C = kC > 0 ? kC : C_rt;
  const bool direct = w.u_lo == 0 && w.u_hi == 9 && g.sW == 1;
  const bool direct_grad = w.u_lo == 0 && w.u_hi == 9 && gg.sW == 1;
  const Splat fy = splat8(w.fy), one_fy = splat8(1 - w.fy);
  const Splat fx = splat8(w.fx), one_fx = splat8(1 - w.fx);
  V8 acc_x = zero8(), acc_y = zero8();
  const bool interior = interior8(g, w) && gg.sW == 1;
  for (int64_t c = 0; c < C; ++c) {
    const V8* Gc = G + c * 8;
    if (interior) {
      // The general loop below without its per-row tests; the same arithmetic in the same order.
      const float* p = img + c * g.sC + w.y0 * g.sH + w.x0;
      float* q = grad_img == nullptr ? nullptr : grad_img + c * gg.sC + w.y0 * gg.sH + w.x0;
      V8 h_prev = zero8();
      V8 G_prev = zero8();
      for (int64_t v = 0; v < 9; ++v) {
        const V8 G_v = v < 8 ? Gc[v] : zero8();
        const V8 gh = v == 0 ? scale8(one_fy, G_v)
                             : (v == 8 ? scale8(fy, G_prev) : add8(scale8(one_fy, G_v), scale8(fy, G_prev)));
        if (need_centre) {
          const V8 a = load8(p), b = load8(p + 1);
          const V8 h = lerp8(a, b, fx);
          acc_x = add8(acc_x, mul8(gh, sub8(b, a)));
          if (v > 0) acc_y = add8(acc_y, mul8(G_prev, sub8(h, h_prev)));
          h_prev = h;
          p += g.sH;
        }
        if (q != nullptr) {
          const V8 gw = add8(scale8(one_fx, gh), scale8(fx, shift_up8(gh)));
          store8(q, add8(load8(q), gw));
          q[8] += w.fx * last8(gh);
          q += gg.sH;
        }
        G_prev = G_v;
      }
      continue;
    }
    V8 gh[9];  // gh[v] = (1-fy) G[v] + fy G[v-1]
    gh[0] = scale8(one_fy, Gc[0]);
    for (int64_t v = 1; v < 8; ++v) gh[v] = add8(scale8(one_fy, Gc[v]), scale8(fy, Gc[v - 1]));
    gh[8] = scale8(fy, Gc[7]);
    if (need_centre) {
      V8 h[9], d_w[9];
      rows8(img + c * g.sC, g, w, direct, seg, h, d_w);
      for (int64_t v = 0; v < 9; ++v) acc_x = add8(acc_x, mul8(gh[v], d_w[v]));
      for (int64_t j = 0; j < 8; ++j) acc_y = add8(acc_y, mul8(Gc[j], sub8(h[j + 1], h[j])));
    }
    if (grad_img != nullptr) {
      float* grad_c = grad_img + c * gg.sC;
      for (int64_t v = w.v_lo; v < w.v_hi; ++v) {
        // gw[u] = (1-fx) gh[v][u] + fx gh[v][u-1], u = 0..8 (gh[v][-1] = gh[v][8] = 0)
        const V8 gw = add8(scale8(one_fx, gh[v]), scale8(fx, shift_up8(gh[v])));
        const float gw_last = w.fx * last8(gh[v]);
        float* row = grad_c + (w.y0 + v) * gg.sH;
        if (direct_grad) {
          float* p = row + w.x0;
          store8(p, add8(load8(p), gw));
          p[8] += gw_last;
        } else {
          float lanes[9];
          store8(lanes, gw);
          lanes[8] = gw_last;
          for (int64_t u = w.u_lo; u < w.u_hi; ++u) row[(w.x0 + u) * gg.sW] += lanes[u];
        }
      }
    }
  }
  d_fx = need_centre ? sum8(acc_x) : 0.f;
  d_fy = need_centre ? sum8(acc_y) : 0.f;
}
