// CPU kernels of the landmark patch gather (SPEC section 1).
//
// All P*P samples of one patch share the same fractional weights (fx, fy), so
// a patch is a separable 2x2 filter over a (P+1) x (P+1) integer window of the
// image whose top-left pixel is (x0, y0) = floor(centre - P/2 - 0.5):
//   window[u][v][c] = image[c, y0 + v, x0 + u]        (zero outside the image)
//   rows[i][v][c]   = (1-fx) window[i][v][c] + fx window[i+1][v][c]
//   token[i][j][c]  = (1-fy) rows[i][j][c]   + fy rows[i][j+1][c]
// The buffers are laid out so that both filter passes run over contiguous
// runs of floats (the compiler vectorises them) and the last pass writes the
// token in its final order f = (i*P + j)*C + c.
//
// Backward, per patch, with g[i][j][c] the token gradient:
//   g_rows[i][v]  = (1-fy) g[i][v] + fy g[i][v-1]                 (g outside 0..P-1 is 0)
//   g_window[u]   = (1-fx) g_rows[u] + fx g_rows[u-1]             -> added to the image gradient
//   d/dfx = sum g_rows[i][v][c] * (window[i+1][v][c] - window[i][v][c])
//   d/dfy = sum g[i][j][c]      * (rows[i][j+1][c]   - rows[i][j][c])
// The landmark gradient is a reduction over the window of one patch (no
// atomics); the image gradient is accumulated one image per task, so tasks
// never write to the same pixels.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

// Where one patch lies: window origin and the shared fractional weights.
template <typename acc_t>
struct PatchWindow {
  int64_t x0 = 0, y0 = 0;
  acc_t fx = 0, fy = 0;
  // Rows/columns of the window inside the image: u in [u_lo, u_hi), v in [v_lo, v_hi).
  int64_t u_lo = 0, u_hi = 0, v_lo = 0, v_hi = 0;
  bool visible = false;  // false for non-finite centres and windows entirely outside
};

template <typename acc_t>
PatchWindow<acc_t> locate(acc_t cx, acc_t cy, int64_t P, int64_t H, int64_t W) {
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
  int64_t n() const { return P() + 1; }
  int64_t run() const { return n() * C(); }   // one window column, [v][c]
  int64_t out_run() const { return P() * C(); }  // one token row, [j][c]
};

// window[(u*n + v)*C + c] = image[c, y0+v, x0+u], zero outside the image.
template <int kP, int kC, typename scalar_t, typename acc_t>
void load_window(const scalar_t* img, const ImageGeometry& g, Dims<kP, kC> d, const PatchWindow<acc_t>& w,
                 acc_t* window) {
  const int64_t n = d.n(), C = d.C();
  if (w.u_lo > 0 || w.v_lo > 0 || w.u_hi < n || w.v_hi < n) std::fill(window, window + n * n * C, acc_t(0));
  for (int64_t u = w.u_lo; u < w.u_hi; ++u) {
    const scalar_t* column = img + (w.x0 + u) * g.sW;
    acc_t* out = window + u * n * C;
    for (int64_t v = w.v_lo; v < w.v_hi; ++v) {
      const scalar_t* pixel = column + (w.y0 + v) * g.sH;
      for (int64_t c = 0; c < C; ++c) out[v * C + c] = static_cast<acc_t>(pixel[c * g.sC]);
    }
  }
}

// rows[i][t] = (1-fx) window[i][t] + fx window[i+1][t], i < P, t < n*C.
template <int kP, int kC, typename acc_t>
void filter_x(const acc_t* window, Dims<kP, kC> d, acc_t fx, acc_t* rows) {
  const int64_t run = d.run();
  for (int64_t i = 0; i < d.P(); ++i) {
    const acc_t* a = window + i * run;
    const acc_t* b = a + run;
    acc_t* r = rows + i * run;
    for (int64_t t = 0; t < run; ++t) r[t] = a[t] + fx * (b[t] - a[t]);
  }
}

// filter_x straight from the image, for windows entirely inside it (most
// patches): skips the copy into the window buffer.
template <int kP, int kC, typename scalar_t, typename acc_t>
void filter_x_inside(const scalar_t* img, const ImageGeometry& g, Dims<kP, kC> d, const PatchWindow<acc_t>& w,
                     acc_t* rows) {
  const int64_t n = d.n(), C = d.C(), run = d.run();
  for (int64_t v = 0; v < n; ++v) {
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* pixel = img + c * g.sC + (w.y0 + v) * g.sH + w.x0 * g.sW;
      acc_t* out = rows + v * C + c;
      acc_t left = static_cast<acc_t>(pixel[0]);
      for (int64_t i = 0; i < d.P(); ++i) {
        const acc_t right = static_cast<acc_t>(pixel[(i + 1) * g.sW]);
        out[i * run] = left + w.fx * (right - left);
        left = right;
      }
    }
  }
}

// token[i][j][c] = (1-fy) rows[i][j][c] + fy rows[i][j+1][c].
template <int kP, int kC, typename scalar_t, typename acc_t>
void filter_y(const acc_t* rows, Dims<kP, kC> d, acc_t fy, scalar_t* token) {
  const int64_t run = d.run(), out_run = d.out_run(), C = d.C();
  for (int64_t i = 0; i < d.P(); ++i) {
    const acc_t* a = rows + i * run;
    const acc_t* b = a + C;
    scalar_t* out = token + i * out_run;
    for (int64_t t = 0; t < out_run; ++t) out[t] = static_cast<scalar_t>(a[t] + fy * (b[t] - a[t]));
  }
}

void check_inputs(const at::Tensor& image, const at::Tensor& centres, int64_t patch_size) {
  TORCH_CHECK(image.dim() == 4, "_patch_gather: image must be [B, C, H, W], got ", image.sizes());
  TORCH_CHECK(centres.dim() == 3 && centres.size(2) == 2 && centres.size(0) == image.size(0),
              "_patch_gather: centres must be [B, K, 2] with B = ", image.size(0), ", got ", centres.sizes());
  TORCH_CHECK(centres.scalar_type() == at::kFloat || centres.scalar_type() == at::kDouble,
              "_patch_gather: centres must be float32 or float64, got ", centres.scalar_type());
  TORCH_CHECK(image.device() == centres.device(), "_patch_gather: image and centres are on different devices");
  TORCH_CHECK(patch_size >= 1, "_patch_gather: patch_size must be >= 1, got ", patch_size);
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

template <typename scalar_t, int kP, int kC>
void forward_kernel(const at::Tensor& image, const at::Tensor& centres_in, Dims<kP, kC> d, at::Tensor& tokens) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = image.size(0), K = centres_in.size(1), P = d.P(), C = d.C(), F = P * P * C;
  const ImageGeometry geo = geometry_of(image);
  const int64_t sB = image.stride(0);
  const at::Tensor centres = centres_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* ctr = centres.data_ptr<acc_t>();
  const scalar_t* img = image.data_ptr<scalar_t>();
  scalar_t* out = tokens.data_ptr<scalar_t>();
  at::parallel_for(0, B * K, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> window(d.n() * d.run()), rows(P * d.run());
    for (int64_t bk = begin; bk < end; ++bk) {
      const auto w = locate<acc_t>(ctr[2 * bk], ctr[2 * bk + 1], P, geo.H, geo.W);
      if (!w.visible) {
        std::fill(out + bk * F, out + (bk + 1) * F, scalar_t(0));
        continue;
      }
      const scalar_t* image_b = img + (bk / K) * sB;
      if (w.u_lo == 0 && w.v_lo == 0 && w.u_hi == d.n() && w.v_hi == d.n()) {
        filter_x_inside(image_b, geo, d, w, rows.data());
      } else {
        load_window(image_b, geo, d, w, window.data());
        filter_x(window.data(), d, w.fx, rows.data());
      }
      filter_y(rows.data(), d, w.fy, out + bk * F);
    }
  });
}

at::Tensor patch_gather_fwd_cpu(const at::Tensor& image, const at::Tensor& centres, int64_t patch_size) {
  check_inputs(image, centres, patch_size);
  const int64_t B = image.size(0), K = centres.size(1), C = image.size(1);
  auto tokens = at::empty({B, K, patch_size * patch_size * C}, image.options());
  if (B * K == 0) return tokens;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "_patch_gather_fwd", [&] {
    with_dims(patch_size, C, [&](auto d) { forward_kernel<scalar_t>(image, centres, d, tokens); });
  });
  return tokens;
}

// Scratch buffers of one task.  g_rows has a zero row before and after the
// P rows of the backward y filter, so that g_rows(u-1) and g_rows(u) exist for
// every window column u = 0..P.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> g, window, rows, g_rows, g_window, lanes_fx, lanes_fy;
  Scratch(int64_t P, int64_t C)
      : g(P * P * C), window((P + 1) * (P + 1) * C), rows(P * (P + 1) * C), g_rows((P + 2) * (P + 1) * C, 0),
        g_window((P + 1) * (P + 1) * C), lanes_fx((P + 1) * C), lanes_fy(P * C) {}
};

// Gradient of one patch with token gradient g [P][P][C].  Adds the window
// gradient to grad_img (when not null) and returns (d/dfx, d/dfy) when need_centre.
template <int kP, int kC, typename scalar_t, typename acc_t>
std::pair<acc_t, acc_t> patch_backward(const scalar_t* img, const ImageGeometry& geo, acc_t* grad_img,
                                       const ImageGeometry& grad_geo, Dims<kP, kC> d, const PatchWindow<acc_t>& w,
                                       bool need_centre, Scratch<acc_t>& s) {
  const int64_t P = d.P(), C = d.C(), run = d.run(), out_run = d.out_run();
  const acc_t* g = s.g.data();
  acc_t* g_rows = s.g_rows.data() + run;  // row -1 and row P stay zero
  // g_rows[i][v] = (1-fy) g[i][v] + fy g[i][v-1] over v = 0..P.
  for (int64_t i = 0; i < P; ++i) {
    const acc_t* gi = g + i * out_run;
    acc_t* r = g_rows + i * run;
    for (int64_t t = 0; t < C; ++t) r[t] = (1 - w.fy) * gi[t];
    for (int64_t t = C; t < out_run; ++t) r[t] = (1 - w.fy) * gi[t] + w.fy * gi[t - C];
    for (int64_t t = out_run; t < run; ++t) r[t] = w.fy * gi[t - C];
  }
  acc_t d_fx = 0, d_fy = 0;
  if (need_centre) {
    acc_t* window = s.window.data();
    acc_t* rows = s.rows.data();
    load_window(img, geo, d, w, window);
    filter_x(window, d, w.fx, rows);
    // Per-lane partial sums first: a single running sum would be a serial
    // dependency chain the compiler may not reorder into vector adds.
    acc_t* lanes_fx = s.lanes_fx.data();
    acc_t* lanes_fy = s.lanes_fy.data();
    std::fill(lanes_fx, lanes_fx + run, acc_t(0));
    std::fill(lanes_fy, lanes_fy + out_run, acc_t(0));
    for (int64_t i = 0; i < P; ++i) {
      const acc_t* gi = g + i * out_run;
      const acc_t* r = rows + i * run;
      const acc_t* gr = g_rows + i * run;
      const acc_t* left = window + i * run;
      const acc_t* right = left + run;
      for (int64_t t = 0; t < out_run; ++t) lanes_fy[t] += gi[t] * (r[t + C] - r[t]);
      for (int64_t t = 0; t < run; ++t) lanes_fx[t] += gr[t] * (right[t] - left[t]);
    }
    for (int64_t t = 0; t < out_run; ++t) d_fy += lanes_fy[t];
    for (int64_t t = 0; t < run; ++t) d_fx += lanes_fx[t];
  }
  if (grad_img != nullptr) {
    for (int64_t u = w.u_lo; u < w.u_hi; ++u) {
      const acc_t* right = g_rows + u * run;  // g_rows(u), zero for u = P
      const acc_t* left = right - run;         // g_rows(u-1), zero for u = 0
      acc_t* gw = s.g_window.data();
      for (int64_t t = 0; t < run; ++t) gw[t] = (1 - w.fx) * right[t] + w.fx * left[t];
      acc_t* column = grad_img + (w.x0 + u) * grad_geo.sW;
      for (int64_t v = w.v_lo; v < w.v_hi; ++v) {
        acc_t* pixel = column + (w.y0 + v) * grad_geo.sH;
        for (int64_t c = 0; c < C; ++c) pixel[c * grad_geo.sC] += gw[v * C + c];
      }
    }
  }
  return {d_fx, d_fy};
}

template <typename scalar_t, int kP, int kC>
void backward_kernel(const at::Tensor& grad_tokens_in, const at::Tensor& image, const at::Tensor& centres_in,
                     Dims<kP, kC> d, at::Tensor& grad_acc, at::Tensor& grad_centres) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool need_image_grad = grad_acc.defined(), need_centre_grad = grad_centres.numel() > 0;
  const int64_t B = image.size(0), K = centres_in.size(1), P = d.P(), C = d.C(), F = P * P * C;
  const ImageGeometry geo = geometry_of(image);
  const int64_t sB = image.stride(0);
  const at::Tensor centres = centres_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* ctr = centres.data_ptr<acc_t>();
  const scalar_t* img = image.data_ptr<scalar_t>();
  const auto* gtok = grad_tokens_in.data_ptr<scalar_t>();
  acc_t* gctr = need_centre_grad ? grad_centres.data_ptr<acc_t>() : nullptr;
  acc_t* gimg = need_image_grad ? grad_acc.data_ptr<acc_t>() : nullptr;
  const ImageGeometry grad_geo = need_image_grad ? geometry_of(grad_acc) : geo;
  const int64_t grad_sB = need_image_grad ? grad_acc.stride(0) : 0;
  // With an image gradient a task owns whole images, so no two tasks write the
  // same pixel; otherwise a task is a single patch.
  const int64_t tasks = need_image_grad ? B : B * K;
  const int64_t patches_per_task = need_image_grad ? K : 1;
  at::parallel_for(0, tasks, need_image_grad ? 1 : 16, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch(P, C);
    for (int64_t task = begin; task < end; ++task) {
      for (int64_t bk = task * patches_per_task; bk < (task + 1) * patches_per_task; ++bk) {
        const int64_t b = bk / K;
        const auto w = locate<acc_t>(ctr[2 * bk], ctr[2 * bk + 1], P, geo.H, geo.W);
        if (!w.visible) continue;  // zero patch: zero gradients
        for (int64_t f = 0; f < F; ++f) scratch.g[f] = static_cast<acc_t>(gtok[bk * F + f]);
        const auto dfxy = patch_backward(img + b * sB, geo, gimg ? gimg + b * grad_sB : nullptr, grad_geo, d, w,
                                         need_centre_grad, scratch);
        if (gctr) {
          gctr[2 * bk] = dfxy.first;
          gctr[2 * bk + 1] = dfxy.second;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> patch_gather_bwd_cpu(const at::Tensor& grad_tokens_in, const at::Tensor& image,
                                                        const at::Tensor& centres, int64_t patch_size,
                                                        bool need_image_grad, bool need_centre_grad,
                                                        bool deterministic) {
  // Always deterministic: each image's gradient is summed by one task in a fixed order.
  (void)deterministic;
  check_inputs(image, centres, patch_size);
  const int64_t B = image.size(0), K = centres.size(1), C = image.size(1);
  const int64_t F = patch_size * patch_size * C;
  TORCH_CHECK(grad_tokens_in.dim() == 3 && grad_tokens_in.size(0) == B && grad_tokens_in.size(1) == K &&
                  grad_tokens_in.size(2) == F,
              "_patch_gather_bwd: grad_tokens must be [", B, ", ", K, ", ", F, "], got ", grad_tokens_in.sizes());
  const auto acc_type = image.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_acc = need_image_grad ? at::zeros_like(image, image.options().dtype(acc_type)) : at::Tensor();
  at::Tensor grad_centres = need_centre_grad ? at::zeros({B, K, 2}, centres.options().dtype(acc_type))
                                             : at::empty({0}, centres.options());
  if ((need_image_grad || need_centre_grad) && B * K > 0) {
    const auto grad_tokens = grad_tokens_in.to(image.scalar_type()).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "_patch_gather_bwd", [&] {
      with_dims(patch_size, C, [&](auto d) {
        backward_kernel<scalar_t>(grad_tokens, image, centres, d, grad_acc, grad_centres);
      });
    });
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
