// CPU kernels of the landmark patch gather (SPEC section 1), with an optional per-row view affine.
//
// Rows: centres [N, K, 2] with N a multiple of B; row n samples image n % B.
//
// Lane layout.  A patch is computed channel by channel with the x offset i in
// the innermost (vector) position: lanes[(c*P + j)*P + i] = token value of
// sample (i, j) in channel c.  Along x the image is contiguous in the usual
// NCHW layout, so every pass over a patch row is a run of P contiguous floats
// the compiler vectorises; the token order f = (i*P + j)*C + c is reached by
// one transposition at the end (the backward transposes the token gradient
// first).
//
// Identity rows (no affine).  All P*P samples share the fractions (fx, fy), so
// a patch is a separable 2x2 filter over the (P+1) x (P+1) window whose top-left
// pixel is (x0, y0) = floor(centre - P/2 - 0.5), per channel c:
//   h[v][i]  = w[v][i] + fx (w[v][i+1] - w[v][i])      w[v][u] = image[c, y0+v, x0+u] (0 outside)
//   t[j][i]  = h[j][i] + fy (h[j+1][i] - h[j][i])
// Backward with G[j][i] the token gradient:
//   gh[v][i] = (1-fy) G[v][i] + fy G[v-1][i]             (G outside 0..P-1 is 0)
//   gw[v][u] = (1-fx) gh[v][u] + fx gh[v][u-1]            -> added to the image gradient
//   d/dfx    = sum gh[v][i] (w[v][i+1] - w[v][i]),  d/dfy = sum G[j][i] (h[j+1][i] - h[j][i])
//
// Affine rows (view_affine [N, 4] = scale_x, scale_y, offset_x, offset_y).  Sample i of a
// patch sits at X_i = scale_x * (cx + i - P/2 - 0.5) + offset_x in the source (Y_j alike);
// each column i and row j has its own taps (lo = floor, lo + 1) and fraction, computed once
// per patch in double precision.  The same filter runs with per-column fractions
// (rows of the source read through the column taps) and the landmark gradient is
// scale_x * sum_i dL/dX_i (scale_y * sum_j dL/dY_j).
//
// The landmark gradient is a reduction inside one patch (no atomics).  The image
// gradient is accumulated one image per task (all rows n = b, b+B, ... in order), so
// tasks never write the same pixels and the result is bitwise repeatable.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../landmark_patch_gather_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#define LAFS_GATHER_SSE 1
#endif

namespace {

// Where one identity patch lies: window origin and the shared fractional weights.
template <typename acc_t>
struct PatchWindow {
  int64_t x0 = 0, y0 = 0;
  acc_t fx = 0, fy = 0;
  // Rows/columns of the window inside the image: u in [u_lo, u_hi), v in [v_lo, v_hi).
  int64_t u_lo = 0, u_hi = 0, v_lo = 0, v_hi = 0;
  bool visible = false;  // false for non-finite centres and windows entirely outside
};

template <typename acc_t>
inline PatchWindow<acc_t> locate(acc_t cx, acc_t cy, int64_t P, int64_t H, int64_t W) {
  PatchWindow<acc_t> w;
  const acc_t shift = acc_t(P) / 2 + acc_t(0.5);
  const acc_t x = cx - shift, y = cy - shift;
  // Beyond these bounds every tap is outside the image; the comparisons also
  // reject NaN and infinities before the float -> int conversion.
  if (!(x > -acc_t(P + 1) && x < acc_t(W) && y > -acc_t(P + 1) && y < acc_t(H))) return w;
  const acc_t xf = std::floor(x), yf = std::floor(y);
  w.x0 = static_cast<int64_t>(xf);
  w.y0 = static_cast<int64_t>(yf);
  w.fx = x - xf;
  w.fy = y - yf;
  const int64_t n = P + 1;
  w.u_lo = std::max<int64_t>(0, -w.x0);
  w.u_hi = std::min<int64_t>(n, W - w.x0);
  w.v_lo = std::max<int64_t>(0, -w.y0);
  w.v_hi = std::min<int64_t>(n, H - w.y0);
  w.visible = w.u_lo < w.u_hi && w.v_lo < w.v_hi;
  return w;
}

struct ImageGeometry {
  int64_t C, H, W, sC, sH, sW;
};

// Patch and channel counts.  The kernels are instantiated for the common sizes
// with compile-time constants (kP, kC > 0), which lets the compiler unroll and
// vectorise the small inner loops, and once with run-time sizes (0) for the rest.
template <int kP, int kC>
struct Dims {
  int64_t p, c;
  int64_t P() const { return kP > 0 ? kP : p; }
  int64_t C() const { return kC > 0 ? kC : c; }
};

// Per-task buffers (one allocation per task, not per patch).
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> lanes, h, seg, gh, acc_x, acc_y;
  // Affine taps: per column / row, the lower tap, its fraction and which taps lie inside.
  std::vector<int64_t> x_lo, y_lo;
  std::vector<acc_t> x_frac, y_frac, d_x, d_y, row_h, row_d, row_g;
  std::vector<uint8_t> x_in_lo, x_in_hi, y_in_lo, y_in_hi;
  Scratch(int64_t P, int64_t C)
      : lanes(C * P * P), h(2 * (P + 1) * P), seg(2 * (P + 2)), gh((P + 1) * (P + 2), 0), acc_x(P + 1),
        acc_y(P), x_lo(P), y_lo(P), x_frac(P), y_frac(P), d_x(P), d_y(P), row_h(2 * P * P), row_d(2 * P * P),
        row_g(2 * P * P), x_in_lo(P), x_in_hi(P), y_in_lo(P), y_in_hi(P) {}
};

// --------------------------------------------------------------------------- identity rows

// One window row w[u] = image[c, y, x0 + u] for u = 0..P: a pointer to the pixels when
// the whole row lies inside a unit-stride image, else copied into seg with zeros outside.
template <typename scalar_t, typename acc_t>
struct WindowRow {
  const scalar_t* direct = nullptr;
  const acc_t* copied = nullptr;
};

template <typename scalar_t, typename acc_t>
WindowRow<scalar_t, acc_t> window_row(const scalar_t* row, const ImageGeometry& g, int64_t n,
                                      const PatchWindow<acc_t>& w, bool direct, acc_t* seg) {
  if (direct) return {row + w.x0, nullptr};
  for (int64_t u = 0; u < n; ++u) {
    seg[u] = (u >= w.u_lo && u < w.u_hi) ? static_cast<acc_t>(row[(w.x0 + u) * g.sW]) : acc_t(0);
  }
  return {nullptr, seg};
}

// h[i] = w[i] + f (w[i+1] - w[i]), i < P.
template <int kP, typename scalar_t, typename acc_t, typename src_t>
inline void lerp_x(const src_t* w, int64_t P_rt, acc_t f, acc_t* h) {
  const int64_t P = kP > 0 ? kP : P_rt;
  for (int64_t i = 0; i < P; ++i) {
    const acc_t a = static_cast<acc_t>(w[i]), b = static_cast<acc_t>(w[i + 1]);
    h[i] = a + f * (b - a);
  }
}

// h[v][i] of channel c for v = 0..P (zero rows outside the image).
template <int kP, int kC, typename scalar_t, typename acc_t>
void identity_rows(const scalar_t* img_c, const ImageGeometry& g, Dims<kP, kC> d, const PatchWindow<acc_t>& w,
                   bool direct, acc_t* seg, acc_t* h) {
  const int64_t P = d.P(), n = P + 1;
  for (int64_t v = 0; v < n; ++v) {
    acc_t* hv = h + v * P;
    if (v < w.v_lo || v >= w.v_hi) {
      std::fill(hv, hv + P, acc_t(0));
      continue;
    }
    const auto row = window_row(img_c + (w.y0 + v) * g.sH, g, n, w, direct, seg);
    if (row.direct) {
      lerp_x<kP, scalar_t>(row.direct, P, w.fx, hv);
    } else {
      lerp_x<kP, scalar_t>(row.copied, P, w.fx, hv);
    }
  }
}

// lanes[(c*P + j)*P + i] of an identity patch.
template <int kP, int kC, typename scalar_t, typename acc_t>
void identity_forward(const scalar_t* img, const ImageGeometry& g, Dims<kP, kC> d, const PatchWindow<acc_t>& w,
                      Scratch<acc_t>& s) {
  const int64_t P = d.P(), C = d.C();
  const bool direct = w.u_lo == 0 && w.u_hi == P + 1 && g.sW == 1;
  acc_t* h = s.h.data();
  for (int64_t c = 0; c < C; ++c) {
    identity_rows(img + c * g.sC, g, d, w, direct, s.seg.data(), h);
    acc_t* t = s.lanes.data() + c * P * P;
    for (int64_t j = 0; j < P; ++j) {
      const acc_t* a = h + j * P;
      const acc_t* b = a + P;
      for (int64_t i = 0; i < P; ++i) t[j * P + i] = a[i] + w.fy * (b[i] - a[i]);
    }
  }
}

// Gradients of one identity patch from the token gradient in lanes (G, per channel).  Adds the
// window gradient to grad_img (when not null) and returns (d/dfx, d/dfy) when need_centre.
template <int kP, int kC, typename scalar_t, typename acc_t>
std::pair<acc_t, acc_t> identity_backward(const scalar_t* img, const ImageGeometry& g, acc_t* grad_img,
                                          const ImageGeometry& gg, Dims<kP, kC> d, const PatchWindow<acc_t>& w,
                                          bool need_centre, Scratch<acc_t>& s) {
  const int64_t P = d.P(), C = d.C(), n = P + 1, stride = P + 2;
  const bool direct = w.u_lo == 0 && w.u_hi == n && g.sW == 1;
  const bool direct_grad = w.u_lo == 0 && w.u_hi == n && gg.sW == 1;
  acc_t* acc_x = s.acc_x.data();
  acc_t* acc_y = s.acc_y.data();
  if (need_centre) {
    // Per-lane partial sums: a single running sum would be a serial dependency chain.
    std::fill(acc_x, acc_x + n, acc_t(0));
    std::fill(acc_y, acc_y + P, acc_t(0));
  }
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* G = s.lanes.data() + c * P * P;
    // gh[v][1 + i] = (1-fy) G[v][i] + fy G[v-1][i]; gh[v][0] and gh[v][P+1] stay zero.
    acc_t* gh = s.gh.data();
    for (int64_t i = 0; i < P; ++i) gh[1 + i] = (1 - w.fy) * G[i];
    for (int64_t v = 1; v < P; ++v) {
      for (int64_t i = 0; i < P; ++i) gh[v * stride + 1 + i] = (1 - w.fy) * G[v * P + i] + w.fy * G[(v - 1) * P + i];
    }
    for (int64_t i = 0; i < P; ++i) gh[P * stride + 1 + i] = w.fy * G[(P - 1) * P + i];
    if (need_centre) {
      acc_t* h = s.h.data();
      const scalar_t* img_c = img + c * g.sC;
      for (int64_t v = 0; v < n; ++v) {
        acc_t* hv = h + v * P;
        if (v < w.v_lo || v >= w.v_hi) {
          std::fill(hv, hv + P, acc_t(0));
          continue;
        }
        const auto row = window_row(img_c + (w.y0 + v) * g.sH, g, n, w, direct, s.seg.data());
        const acc_t* ghv = gh + v * stride + 1;
        if (row.direct) {
          lerp_x<kP, scalar_t>(row.direct, P, w.fx, hv);
          for (int64_t i = 0; i < P; ++i) {
            acc_x[i] += ghv[i] * (static_cast<acc_t>(row.direct[i + 1]) - static_cast<acc_t>(row.direct[i]));
          }
        } else {
          lerp_x<kP, scalar_t>(row.copied, P, w.fx, hv);
          for (int64_t i = 0; i < P; ++i) acc_x[i] += ghv[i] * (row.copied[i + 1] - row.copied[i]);
        }
      }
      for (int64_t j = 0; j < P; ++j) {
        for (int64_t i = 0; i < P; ++i) acc_y[i] += G[j * P + i] * (h[(j + 1) * P + i] - h[j * P + i]);
      }
    }
    if (grad_img != nullptr) {
      acc_t* grad_c = grad_img + c * gg.sC;
      acc_t* gw = s.seg.data();
      for (int64_t v = w.v_lo; v < w.v_hi; ++v) {
        const acc_t* right = gh + v * stride + 1;  // gh(v)[u], zero for u = P
        const acc_t* left = right - 1;              // gh(v)[u-1], zero for u = 0
        for (int64_t u = 0; u < n; ++u) gw[u] = (1 - w.fx) * right[u] + w.fx * left[u];
        acc_t* row = grad_c + (w.y0 + v) * gg.sH;
        if (direct_grad) {
          acc_t* px = row + w.x0;
          for (int64_t u = 0; u < n; ++u) px[u] += gw[u];
        } else {
          for (int64_t u = w.u_lo; u < w.u_hi; ++u) row[(w.x0 + u) * gg.sW] += gw[u];
        }
      }
    }
  }
  acc_t d_fx = 0, d_fy = 0;
  if (need_centre) {
    for (int64_t i = 0; i < P; ++i) d_fx += acc_x[i];
    for (int64_t i = 0; i < P; ++i) d_fy += acc_y[i];
  }
  return {d_fx, d_fy};
}

// --------------------------------------------------------------------------- affine rows

template <typename acc_t>
struct Affine {
  acc_t sx, sy, ox, oy;
};

// Taps of the P samples along one axis, p_t = scale * (centre + t - P/2 - 0.5) + offset,
// computed in double.  Returns whether any tap lies inside [0, size).
template <typename acc_t>
bool axis_taps(double centre, double scale, double offset, int64_t P, int64_t size, int64_t* lo, acc_t* frac,
               uint8_t* in_lo, uint8_t* in_hi) {
  const double start = centre - (double(P) / 2 + 0.5);
  bool any = false;
  for (int64_t t = 0; t < P; ++t) {
    const double p = scale * (start + double(t)) + offset;
    // Both taps outside (and NaN): the sample is zero whatever the fraction.
    if (!(p > -1.0 && p < double(size))) {
      lo[t] = 0;
      frac[t] = 0;
      in_lo[t] = in_hi[t] = 0;
      continue;
    }
    const double pf = std::floor(p);
    lo[t] = static_cast<int64_t>(pf);
    frac[t] = static_cast<acc_t>(p - pf);
    in_lo[t] = lo[t] >= 0;
    in_hi[t] = lo[t] + 1 < size;
    any = true;
  }
  return any;
}

template <typename acc_t>
bool affine_taps(acc_t cx, acc_t cy, const Affine<acc_t>& a, int64_t P, const ImageGeometry& g, Scratch<acc_t>& s) {
  if (!(std::isfinite(cx) && std::isfinite(cy) && std::isfinite(a.sx) && std::isfinite(a.sy) &&
        std::isfinite(a.ox) && std::isfinite(a.oy))) {
    return false;
  }
  const bool x_any = axis_taps<acc_t>(cx, a.sx, a.ox, P, g.W, s.x_lo.data(), s.x_frac.data(), s.x_in_lo.data(),
                                      s.x_in_hi.data());
  const bool y_any = axis_taps<acc_t>(cy, a.sy, a.oy, P, g.H, s.y_lo.data(), s.y_frac.data(), s.y_in_lo.data(),
                                      s.y_in_hi.data());
  return x_any && y_any;
}

// Source row y read through the column taps: lo[i] = w(y, x_lo[i]), hi[i] = w(y, x_lo[i] + 1),
// zero outside the image (and everything zero for a row outside).
template <typename scalar_t, typename acc_t>
void affine_row_taps(const scalar_t* img_c, const ImageGeometry& g, int64_t P, int64_t y, bool row_in,
                     const Scratch<acc_t>& s, acc_t* lo, acc_t* hi) {
  if (!row_in) {
    std::fill(lo, lo + P, acc_t(0));
    std::fill(hi, hi + P, acc_t(0));
    return;
  }
  const scalar_t* row = img_c + y * g.sH;
  for (int64_t i = 0; i < P; ++i) {
    const int64_t x = s.x_lo[i];
    lo[i] = s.x_in_lo[i] ? static_cast<acc_t>(row[x * g.sW]) : acc_t(0);
    hi[i] = s.x_in_hi[i] ? static_cast<acc_t>(row[(x + 1) * g.sW]) : acc_t(0);
  }
}

// The source rows [first, first + count) read by the visible samples of an affine patch.  When there
// are at most 2P of them (|scale_y| <= 2, every crop of the views pipeline) each is filtered along x
// once and shared by the samples that read it (the per-sample loop filters 2P rows).
template <typename acc_t>
bool shared_rows(const Scratch<acc_t>& s, int64_t P, int64_t& first, int64_t& count) {
  int64_t lo = 0, hi = -1;
  for (int64_t j = 0; j < P; ++j) {
    if (!(s.y_in_lo[j] || s.y_in_hi[j])) continue;
    if (hi < lo) {
      lo = s.y_lo[j];
      hi = s.y_lo[j] + 1;
    }
    lo = std::min(lo, s.y_lo[j]);
    hi = std::max(hi, s.y_lo[j] + 1);
  }
  first = lo;
  count = hi - lo + 1;
  return count <= 2 * P;
}

// h[r][i] (and d[r][i] = hi - lo, when d is not null) of source rows first + r: row r read through
// the column taps and filtered along x; zero for rows outside the image.
template <typename scalar_t, typename acc_t>
void filter_shared_rows(const scalar_t* img_c, const ImageGeometry& g, int64_t P, int64_t first, int64_t count,
                        Scratch<acc_t>& s, acc_t* h, acc_t* d) {
  acc_t* lo = s.seg.data();
  acc_t* hi = lo + (P + 2);
  for (int64_t r = 0; r < count; ++r) {
    const int64_t y = first + r;
    affine_row_taps(img_c, g, P, y, y >= 0 && y < g.H, s, lo, hi);
    for (int64_t i = 0; i < P; ++i) h[r * P + i] = lo[i] + s.x_frac[i] * (hi[i] - lo[i]);
    if (d != nullptr) {
      for (int64_t i = 0; i < P; ++i) d[r * P + i] = hi[i] - lo[i];
    }
  }
}

template <int kP, int kC, typename scalar_t, typename acc_t>
void affine_forward(const scalar_t* img, const ImageGeometry& g, Dims<kP, kC> d, Scratch<acc_t>& s) {
  const int64_t P = d.P(), C = d.C();
  int64_t first, count;
  if (shared_rows(s, P, first, count)) {
    acc_t* h = s.row_h.data();
    for (int64_t c = 0; c < C; ++c) {
      filter_shared_rows(img + c * g.sC, g, P, first, count, s, h, static_cast<acc_t*>(nullptr));
      acc_t* t = s.lanes.data() + c * P * P;
      for (int64_t j = 0; j < P; ++j) {
        if (!(s.y_in_lo[j] || s.y_in_hi[j])) {
          std::fill(t + j * P, t + (j + 1) * P, acc_t(0));
          continue;
        }
        const acc_t* top = h + (s.y_lo[j] - first) * P;
        const acc_t* bottom = top + P;
        const acc_t fy = s.y_frac[j];
        for (int64_t i = 0; i < P; ++i) t[j * P + i] = top[i] + fy * (bottom[i] - top[i]);
      }
    }
    return;
  }
  acc_t* top = s.h.data();
  acc_t* bottom = top + P;
  acc_t* lo = s.seg.data();
  acc_t* hi = lo + (P + 2);
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* img_c = img + c * g.sC;
    acc_t* t = s.lanes.data() + c * P * P;
    for (int64_t j = 0; j < P; ++j) {
      const int64_t y = s.y_lo[j];
      affine_row_taps(img_c, g, P, y, s.y_in_lo[j], s, lo, hi);
      for (int64_t i = 0; i < P; ++i) top[i] = lo[i] + s.x_frac[i] * (hi[i] - lo[i]);
      affine_row_taps(img_c, g, P, y + 1, s.y_in_hi[j], s, lo, hi);
      for (int64_t i = 0; i < P; ++i) bottom[i] = lo[i] + s.x_frac[i] * (hi[i] - lo[i]);
      const acc_t fy = s.y_frac[j];
      for (int64_t i = 0; i < P; ++i) t[j * P + i] = top[i] + fy * (bottom[i] - top[i]);
    }
  }
}

// Gradients of one affine patch (token gradient in lanes); returns (dL/dcx, dL/dcy).
template <int kP, int kC, typename scalar_t, typename acc_t>
std::pair<acc_t, acc_t> affine_backward(const scalar_t* img, const ImageGeometry& g, acc_t* grad_img,
                                        const ImageGeometry& gg, Dims<kP, kC> d, const Affine<acc_t>& a,
                                        bool need_centre, Scratch<acc_t>& s) {
  const int64_t P = d.P(), C = d.C();
  acc_t* d_x = s.d_x.data();  // dL/dX_i
  acc_t* d_y = s.d_y.data();  // dL/dY_j
  if (need_centre) {
    std::fill(d_x, d_x + P, acc_t(0));
    std::fill(d_y, d_y + P, acc_t(0));
  }
  int64_t first, count;
  if (shared_rows(s, P, first, count)) {
    acc_t* h = s.row_h.data();
    acc_t* dh = s.row_d.data();
    acc_t* gr = s.row_g.data();
    for (int64_t c = 0; c < C; ++c) {
      const acc_t* G = s.lanes.data() + c * P * P;
      if (need_centre) {
        filter_shared_rows(img + c * g.sC, g, P, first, count, s, h, dh);
        for (int64_t j = 0; j < P; ++j) {
          if (!(s.y_in_lo[j] || s.y_in_hi[j])) continue;
          const int64_t r = s.y_lo[j] - first;
          const acc_t fy = s.y_frac[j];
          const acc_t* Gj = G + j * P;
          acc_t dy = 0;
          for (int64_t i = 0; i < P; ++i) {
            d_x[i] += Gj[i] * (1 - fy) * dh[r * P + i];
            d_x[i] += Gj[i] * fy * dh[(r + 1) * P + i];
            dy += Gj[i] * (h[(r + 1) * P + i] - h[r * P + i]);
          }
          d_y[j] += dy;
        }
      }
      if (grad_img != nullptr) {
        // Gradient of each shared row, then through the column taps into the image.
        std::fill(gr, gr + count * P, acc_t(0));
        for (int64_t j = 0; j < P; ++j) {
          if (!(s.y_in_lo[j] || s.y_in_hi[j])) continue;
          const int64_t r = s.y_lo[j] - first;
          const acc_t fy = s.y_frac[j];
          for (int64_t i = 0; i < P; ++i) {
            gr[r * P + i] += (1 - fy) * G[j * P + i];
            gr[(r + 1) * P + i] += fy * G[j * P + i];
          }
        }
        acc_t* grad_c = grad_img + c * gg.sC;
        for (int64_t r = 0; r < count; ++r) {
          const int64_t y = first + r;
          if (y < 0 || y >= gg.H) continue;
          acc_t* row = grad_c + y * gg.sH;
          for (int64_t i = 0; i < P; ++i) {
            const int64_t x = s.x_lo[i];
            if (s.x_in_lo[i]) row[x * gg.sW] += (1 - s.x_frac[i]) * gr[r * P + i];
            if (s.x_in_hi[i]) row[(x + 1) * gg.sW] += s.x_frac[i] * gr[r * P + i];
          }
        }
      }
    }
    acc_t gx = 0, gy = 0;
    if (need_centre) {
      for (int64_t i = 0; i < P; ++i) gx += d_x[i];
      for (int64_t j = 0; j < P; ++j) gy += d_y[j];
    }
    return {a.sx * gx, a.sy * gy};
  }
  acc_t* top = s.h.data();
  acc_t* bottom = top + P;
  acc_t* lo = s.seg.data();
  acc_t* hi = lo + (P + 2);
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* G = s.lanes.data() + c * P * P;
    if (need_centre) {
      const scalar_t* img_c = img + c * g.sC;
      for (int64_t j = 0; j < P; ++j) {
        const int64_t y = s.y_lo[j];
        const acc_t fy = s.y_frac[j];
        const acc_t* Gj = G + j * P;
        affine_row_taps(img_c, g, P, y, s.y_in_lo[j], s, lo, hi);
        for (int64_t i = 0; i < P; ++i) {
          top[i] = lo[i] + s.x_frac[i] * (hi[i] - lo[i]);
          d_x[i] += Gj[i] * (1 - fy) * (hi[i] - lo[i]);
        }
        affine_row_taps(img_c, g, P, y + 1, s.y_in_hi[j], s, lo, hi);
        acc_t dy = 0;
        for (int64_t i = 0; i < P; ++i) {
          bottom[i] = lo[i] + s.x_frac[i] * (hi[i] - lo[i]);
          d_x[i] += Gj[i] * fy * (hi[i] - lo[i]);
          dy += Gj[i] * (bottom[i] - top[i]);
        }
        d_y[j] += dy;
      }
    }
    if (grad_img != nullptr) {
      acc_t* grad_c = grad_img + c * gg.sC;
      for (int64_t j = 0; j < P; ++j) {
        const acc_t fy = s.y_frac[j];
        for (int64_t dy = 0; dy < 2; ++dy) {
          if (!(dy ? s.y_in_hi[j] : s.y_in_lo[j])) continue;
          const acc_t wy = dy ? fy : 1 - fy;
          acc_t* row = grad_c + (s.y_lo[j] + dy) * gg.sH;
          for (int64_t i = 0; i < P; ++i) {
            const acc_t gy = wy * G[j * P + i];
            const int64_t x = s.x_lo[i];
            if (s.x_in_lo[i]) row[x * gg.sW] += (1 - s.x_frac[i]) * gy;
            if (s.x_in_hi[i]) row[(x + 1) * gg.sW] += s.x_frac[i] * gy;
          }
        }
      }
    }
  }
  acc_t gx = 0, gy = 0;
  if (need_centre) {
    for (int64_t i = 0; i < P; ++i) gx += d_x[i];
    for (int64_t j = 0; j < P; ++j) gy += d_y[j];
  }
  return {a.sx * gx, a.sy * gy};
}

// --------------------------------------------------------------------------- layout

// tokens [i][j][c] <- lanes [c][j][i]
template <int kP, int kC, typename scalar_t, typename acc_t>
void lanes_to_token(const acc_t* lanes, Dims<kP, kC> d, scalar_t* token) {
  const int64_t P = d.P(), C = d.C();
  for (int64_t i = 0; i < P; ++i) {
    for (int64_t j = 0; j < P; ++j) {
      for (int64_t c = 0; c < C; ++c) token[(i * P + j) * C + c] = static_cast<scalar_t>(lanes[(c * P + j) * P + i]);
    }
  }
}

// lanes [c][j][i] <- token gradient [i][j][c]
template <int kP, int kC, typename scalar_t, typename acc_t>
void token_to_lanes(const scalar_t* token, Dims<kP, kC> d, acc_t* lanes) {
  const int64_t P = d.P(), C = d.C();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j = 0; j < P; ++j) {
      for (int64_t i = 0; i < P; ++i) lanes[(c * P + j) * P + i] = static_cast<acc_t>(token[(i * P + j) * C + c]);
    }
  }
}


// --------------------------------------------------------------------------- P = 8, float32: SIMD

#ifdef LAFS_GATHER_SSE
namespace sse2 {
#define LAFS_SIMD_AVX2 0
#include "landmark_patch_gather_simd.h"
#undef LAFS_SIMD_AVX2
}  // namespace sse2

// GCC only: clang ignores `#pragma GCC target`, and the AVX2 intrinsics need it.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LAFS_GATHER_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#define LAFS_SIMD_AVX2 1
#include "landmark_patch_gather_simd.h"
#undef LAFS_SIMD_AVX2
}  // namespace avx2
#pragma GCC pop_options
#endif

// AVX2 when the CPU has it, unless LAFS_KERNELS_CPU_SIMD=sse2 (to compare the two).
inline bool use_avx2() {
#ifdef LAFS_GATHER_AVX2
  static const bool avx2 = [] {
    const char* forced = std::getenv("LAFS_KERNELS_CPU_SIMD");
    if (forced != nullptr && std::string(forced) == "sse2") return false;
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return avx2;
#else
  return false;
#endif
}

// Lane buffer of one task: C*8 vectors of 8 floats, 32-byte aligned, for either instruction set.
struct Lanes8 {
  std::vector<float> storage;
  float* data = nullptr;
  Lanes8(bool used, int64_t C) : storage(used ? C * 64 + 8 : 0) {
    if (used) {
      const auto address = reinterpret_cast<std::uintptr_t>(storage.data());
      data = storage.data() + ((32 - address % 32) % 32) / sizeof(float);
    }
  }
  template <typename V>
  V* as() {
    return reinterpret_cast<V*>(data);
  }
};

template <int kC, bool kStream>
inline void forward8(const float* img, const ImageGeometry& g, int64_t C, const PatchWindow<float>& w, float* seg,
                     Lanes8& T, float* token) {
#ifdef LAFS_GATHER_AVX2
  if (use_avx2()) {
    avx2::identity_forward8<kC>(img, g, C, w, seg, T.as<avx2::V8>());
    avx2::lanes_to_token8<kC, kStream>(T.as<avx2::V8>(), C, token);
    return;
  }
#endif
  sse2::identity_forward8<kC>(img, g, C, w, seg, T.as<sse2::V8>());
  sse2::lanes_to_token8<kC, kStream>(T.as<sse2::V8>(), C, token);
}

template <int kC>
inline std::pair<float, float> backward8(const float* img, const ImageGeometry& g, float* grad_img,
                                         const ImageGeometry& gg, int64_t C, const PatchWindow<float>& w,
                                         bool need_centre, const float* grad_token, float* seg, Lanes8& G) {
  float d_fx = 0, d_fy = 0;
#ifdef LAFS_GATHER_AVX2
  if (use_avx2()) {
    avx2::token_to_lanes8<kC>(grad_token, C, G.as<avx2::V8>());
    avx2::identity_backward8<kC>(img, g, grad_img, gg, C, w, need_centre, G.as<avx2::V8>(), seg, d_fx, d_fy);
    return {d_fx, d_fy};
  }
#endif
  sse2::token_to_lanes8<kC>(grad_token, C, G.as<sse2::V8>());
  sse2::identity_backward8<kC>(img, g, grad_img, gg, C, w, need_centre, G.as<sse2::V8>(), seg, d_fx, d_fy);
  return {d_fx, d_fy};
}
#endif  // LAFS_GATHER_SSE


#ifndef LAFS_GATHER_SSE
struct Lanes8 {  // unused without SSE: the generic kernels run instead
  Lanes8(bool, int64_t) {}
};
#endif

// --------------------------------------------------------------------------- drivers

// Patches of one image land at random places, so their window rows miss the caches (the hardware
// prefetchers see no stream).  The next row's image is prefetched into L2 in address order
// instead, a share of its cache lines per patch: always in the backward with both gradients
// (a task spends long enough on each image to hide it), never in a backward that does not read
// the image (the image gradient alone: 1.2x faster at K=36 without it), else when the K patches of
// a row read most of the image (K (P+1)^2 >= H W; measured at K=36 of 196 the forward was slower
// with it).
struct ImagePrefetch {
  const char* base = nullptr;  // null: off
  int64_t lines = 0, done = 0;
  // Call at patch k of the row, k = 0..K-1 (the image changes at k = 0).
  void step(const void* next_image, int64_t k, int64_t K) {
    if (base == nullptr) return;
    if (k == 0 || next_image != base) {
      base = static_cast<const char*>(next_image);
      done = k * lines / K;
    }
    for (const int64_t target = (k + 1) * lines / K; done < target; ++done) __builtin_prefetch(base + 64 * done, 0, 2);
  }
};

ImagePrefetch image_prefetch(const at::Tensor& image, int64_t K, int64_t P, bool always) {
  ImagePrefetch p;
  const int64_t H = image.size(2), W = image.size(3), bytes = image.stride(0) * image.element_size();
  if (image.is_contiguous() && (always || K * (P + 1) * (P + 1) >= H * W) && image.size(0) > 1) {
    p.base = static_cast<const char*>(image.data_ptr());
    p.lines = (bytes + 63) / 64;
  }
  return p;
}


ImageGeometry geometry_of(const at::Tensor& t) {
  return {t.size(1), t.size(2), t.size(3), t.stride(1), t.stride(2), t.stride(3)};
}

// Calls fn(Dims<kP, kC>{P, C}) with the sizes as compile-time constants where instantiated.
template <typename Fn>
void with_dims(int64_t P, int64_t C, Fn&& fn) {
  if (P == 8 && C == 3) return fn(Dims<8, 3>{P, C});
  if (C == 3) return fn(Dims<0, 3>{P, C});
  if (C == 1) return fn(Dims<0, 1>{P, C});
  fn(Dims<0, 0>{P, C});
}

template <typename acc_t>
struct Rows {
  const acc_t* centres;  // [N, K, 2]
  const acc_t* affine;   // [N, 4] or null
  Affine<acc_t> of(int64_t n) const {
    const acc_t* a = affine + 4 * n;
    return {a[0], a[1], a[2], a[3]};
  }
};

template <typename acc_t>
at::Tensor as_acc(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

template <typename scalar_t, int kP, int kC>
void forward_kernel(const at::Tensor& image, const at::Tensor& centres_in, const c10::optional<at::Tensor>& affine_in,
                    Dims<kP, kC> d, at::Tensor& tokens) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kFloat32 = std::is_same<scalar_t, float>::value;
  const int64_t B = image.size(0), N = centres_in.size(0), K = centres_in.size(1), P = d.P(), C = d.C();
  const int64_t F = P * P * C;
  const ImageGeometry geo = geometry_of(image);
  const int64_t sB = image.stride(0);
  const at::Tensor centres = as_acc<acc_t>(centres_in);
  const at::Tensor affine = affine_in.has_value() ? as_acc<acc_t>(*affine_in) : at::Tensor();
  const Rows<acc_t> rows{centres.data_ptr<acc_t>(), affine.defined() ? affine.data_ptr<acc_t>() : nullptr};
  const scalar_t* img = image.data_ptr<scalar_t>();
  scalar_t* out = tokens.data_ptr<scalar_t>();
  const ImagePrefetch prefetch = rows.affine == nullptr ? image_prefetch(image, K, P, false) : ImagePrefetch{};
  // Tokens larger than the caches are written with streaming stores: no read for ownership
  // of each output line, which is a third of the memory traffic.
  const bool stream = kFloat32 && P == 8 && tokens.nbytes() >= (int64_t(8) << 20) &&
                      reinterpret_cast<std::uintptr_t>(out) % 32 == 0 && (F * sizeof(scalar_t)) % 32 == 0;
  at::parallel_for(0, N * K, 64, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(P, C);
#ifdef LAFS_GATHER_SSE
    Lanes8 T(kFloat32 && P == 8, C);
#endif
    ImagePrefetch next = prefetch;
    for (int64_t nk = begin; nk < end; ++nk) {
      const int64_t n = nk / K;
      const scalar_t* image_n = img + (n % B) * sB;
      next.step(img + ((n + 1) % B) * sB, nk % K, K);
      const acc_t cx = rows.centres[2 * nk], cy = rows.centres[2 * nk + 1];
      bool visible;
      if (rows.affine != nullptr) {
        visible = affine_taps(cx, cy, rows.of(n), P, geo, s);
        if (visible) affine_forward(image_n, geo, d, s);
      } else {
        const auto w = locate<acc_t>(cx, cy, P, geo.H, geo.W);
        visible = w.visible;
#ifdef LAFS_GATHER_SSE
        if constexpr (kFloat32) {
          if (visible && P == 8) {
            if (stream) {
              forward8<kC, true>(image_n, geo, C, w, s.seg.data(), T, out + nk * F);
            } else {
              forward8<kC, false>(image_n, geo, C, w, s.seg.data(), T, out + nk * F);
            }
            continue;
          }
        }
#endif
        if (visible) identity_forward(image_n, geo, d, w, s);
      }
      if (visible) {
        lanes_to_token(s.lanes.data(), d, out + nk * F);
      } else {
        std::fill(out + nk * F, out + (nk + 1) * F, scalar_t(0));
      }
    }
#ifdef LAFS_GATHER_SSE
    if (stream) _mm_sfence();  // streaming stores are weakly ordered
#endif
  });
}

at::Tensor patch_gather_fwd_cpu(const at::Tensor& image, const at::Tensor& centres, int64_t patch_size,
                                const c10::optional<at::Tensor>& view_affine) {
  lafs_kernels::check_patch_gather_inputs(image, centres, patch_size, view_affine);
  const int64_t N = centres.size(0), K = centres.size(1), C = image.size(1);
  auto tokens = at::empty({N, K, patch_size * patch_size * C}, image.options());
  if (N * K == 0) return tokens;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "_patch_gather_fwd", [&] {
    with_dims(patch_size, C, [&](auto d) { forward_kernel<scalar_t>(image, centres, view_affine, d, tokens); });
  });
  return tokens;
}

template <typename scalar_t, int kP, int kC>
void backward_kernel(const at::Tensor& grad_tokens, const at::Tensor& image, const at::Tensor& centres_in,
                     const c10::optional<at::Tensor>& affine_in, Dims<kP, kC> d, at::Tensor& grad_acc,
                     bool zero_per_image, at::Tensor& grad_centres) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kFloat32 = std::is_same<scalar_t, float>::value;
  const bool need_image_grad = grad_acc.defined(), need_centre_grad = grad_centres.numel() > 0;
  const int64_t B = image.size(0), N = centres_in.size(0), K = centres_in.size(1), P = d.P(), C = d.C();
  const int64_t F = P * P * C, views = N / B;
  const ImageGeometry geo = geometry_of(image);
  const int64_t sB = image.stride(0);
  const at::Tensor centres = as_acc<acc_t>(centres_in);
  const at::Tensor affine = affine_in.has_value() ? as_acc<acc_t>(*affine_in) : at::Tensor();
  const Rows<acc_t> rows{centres.data_ptr<acc_t>(), affine.defined() ? affine.data_ptr<acc_t>() : nullptr};
  const scalar_t* img = image.data_ptr<scalar_t>();
  const auto* gtok = grad_tokens.data_ptr<scalar_t>();
  acc_t* gctr = need_centre_grad ? grad_centres.data_ptr<acc_t>() : nullptr;
  acc_t* gimg = need_image_grad ? grad_acc.data_ptr<acc_t>() : nullptr;
  const ImageGeometry grad_geo = need_image_grad ? geometry_of(grad_acc) : geo;
  const int64_t grad_sB = need_image_grad ? grad_acc.stride(0) : 0;
  const int64_t image_numel = geo.C * geo.H * geo.W;

  auto patch = [&](int64_t nk, acc_t* grad_image_n, Scratch<acc_t>& s, Lanes8& G) {
    const int64_t n = nk / K;
    const scalar_t* image_n = img + (n % B) * sB;
    const acc_t cx = rows.centres[2 * nk], cy = rows.centres[2 * nk + 1];
    std::pair<acc_t, acc_t> dc{0, 0};
    if (rows.affine != nullptr) {
      const Affine<acc_t> a = rows.of(n);
      if (affine_taps(cx, cy, a, P, geo, s)) {
        token_to_lanes(gtok + nk * F, d, s.lanes.data());
        dc = affine_backward(image_n, geo, grad_image_n, grad_geo, d, a, need_centre_grad, s);
      }
    } else {
      const auto w = locate<acc_t>(cx, cy, P, geo.H, geo.W);
#ifdef LAFS_GATHER_SSE
      if constexpr (kFloat32) {
        if (w.visible && P == 8) {
          dc = backward8<kC>(image_n, geo, grad_image_n, grad_geo, C, w, need_centre_grad, gtok + nk * F,
                             s.seg.data(), G);
          if (gctr) {
            gctr[2 * nk] = dc.first;
            gctr[2 * nk + 1] = dc.second;
          }
          return;
        }
      }
#endif
      if (w.visible) {  // else: zero patch, zero gradients
        token_to_lanes(gtok + nk * F, d, s.lanes.data());
        dc = identity_backward(image_n, geo, grad_image_n, grad_geo, d, w, need_centre_grad, s);
      }
    }
    if (gctr) {
      gctr[2 * nk] = dc.first;
      gctr[2 * nk + 1] = dc.second;
    }
  };

  const ImagePrefetch prefetch =
      rows.affine == nullptr && need_centre_grad ? image_prefetch(image, K, P, need_image_grad) : ImagePrefetch{};
  if (need_image_grad) {
    // One task per image: it owns that image's gradient and adds the rows of every
    // view of it (n = b, b + B, ...) in a fixed order.
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc_t> s(P, C);
      Lanes8 G(kFloat32 && P == 8, C);
      ImagePrefetch next = prefetch;
      for (int64_t b = begin; b < end; ++b) {
        acc_t* grad_b = gimg + b * grad_sB;
        if (zero_per_image) std::fill(grad_b, grad_b + image_numel, acc_t(0));
        for (int64_t v = 0; v < views; ++v) {
          const int64_t n = v * B + b;
          for (int64_t nk = n * K; nk < (n + 1) * K; ++nk) {
            if (v == 0) next.step(img + ((b + 1) % B) * sB, nk - n * K, K);
            patch(nk, grad_b, s, G);
          }
        }
      }
    });
  } else {
    at::parallel_for(0, N * K, 64, [&](int64_t begin, int64_t end) {
      Scratch<acc_t> s(P, C);
      Lanes8 G(kFloat32 && P == 8, C);
      ImagePrefetch next = prefetch;
      for (int64_t nk = begin; nk < end; ++nk) {
        next.step(img + ((nk / K + 1) % B) * sB, nk % K, K);
        patch(nk, nullptr, s, G);
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> patch_gather_bwd_cpu(const at::Tensor& grad_tokens_in, const at::Tensor& image,
                                                        const at::Tensor& centres, int64_t patch_size,
                                                        bool need_image_grad, bool need_centre_grad,
                                                        bool deterministic,
                                                        const c10::optional<at::Tensor>& view_affine) {
  // Always deterministic: each image's gradient is summed by one task in a fixed order.
  (void)deterministic;
  lafs_kernels::check_patch_gather_inputs(image, centres, patch_size, view_affine);
  const int64_t N = centres.size(0), K = centres.size(1), C = image.size(1);
  const int64_t F = patch_size * patch_size * C;
  TORCH_CHECK(grad_tokens_in.dim() == 3 && grad_tokens_in.size(0) == N && grad_tokens_in.size(1) == K &&
                  grad_tokens_in.size(2) == F,
              "_patch_gather_bwd: grad_tokens must be [", N, ", ", K, ", ", F, "], got ", grad_tokens_in.sizes());
  const auto acc_type = image.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_acc;
  bool zero_per_image = false;
  if (need_image_grad) {
    // Same layout as the image.  When each image's gradient is one dense block, the task
    // that owns the image zeroes it (in parallel, and while it is about to be in cache).
    grad_acc = at::empty_like(image, image.options().dtype(acc_type));
    zero_per_image = image.size(0) > 0 && grad_acc.is_non_overlapping_and_dense() &&
                     grad_acc.stride(0) == image.size(1) * image.size(2) * image.size(3);
    if (!zero_per_image) grad_acc.zero_();
  }
  at::Tensor grad_centres = need_centre_grad ? at::zeros({N, K, 2}, centres.options().dtype(acc_type))
                                             : at::empty({0}, centres.options());
  if ((need_image_grad || need_centre_grad) && N * K > 0) {
    const auto grad_tokens = grad_tokens_in.to(image.scalar_type()).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "_patch_gather_bwd", [&] {
      with_dims(patch_size, C, [&](auto d) {
        backward_kernel<scalar_t>(grad_tokens, image, centres, view_affine, d, grad_acc, zero_per_image,
                                  grad_centres);
      });
    });
  } else if (zero_per_image) {
    grad_acc.zero_();
  }
  at::Tensor grad_image = at::empty({0}, image.options());
  if (need_image_grad) grad_image = grad_acc.scalar_type() == image.scalar_type() ? grad_acc : grad_acc.to(image.scalar_type());
  if (need_centre_grad) grad_centres = grad_centres.to(centres.scalar_type());
  return {grad_image, grad_centres};
}

}  // namespace

TORCH_LIBRARY_IMPL(lafs_kernels, CPU, m) {
  m.impl("_patch_gather_fwd", &patch_gather_fwd_cpu);
  m.impl("_patch_gather_bwd", &patch_gather_bwd_cpu);
}
