// Schemas of the raw kernels in lafs_kernels._C.  These are backend kernels
// without autograd: the public ops (Python `torch.library.custom_op`s in
// lafs_kernels/ops/) call them and own the autograd formulas.  CPU
// implementations live in csrc/cpu/, CUDA ones in csrc/cuda/.
#include <Python.h>
#include <torch/library.h>

#ifdef LAFS_WITH_CUDA
int64_t lafs_cuda_runtime_version();  // csrc/cuda/runtime_version.cu
#else
static int64_t lafs_cuda_runtime_version() { return 0; }
#endif

TORCH_LIBRARY(lafs_kernels, m) {
  // Landmark patch gather (SPEC section 1) on already selected and jittered
  // centres.  image [B, C, H, W]; centres [N, K, 2] (x, y) in pixels with N a
  // multiple of B (row n samples image n % B), float32 (float64 for float64
  // images: gradcheck and the golden outputs need it); view_affine [N, 4]
  // (scale_x, scale_y, offset_x, offset_y) maps the sample positions of row n
  // into the source image, None: identity.  Returns tokens [N, K, P*P*C] in
  // image's dtype.
  m.def("_patch_gather_fwd(Tensor image, Tensor centres, int patch_size, Tensor? view_affine=None) -> Tensor");
  // Gradients of _patch_gather_fwd.  grad_tokens [N, K, P*P*C].  Returns
  // (grad_image [B, C, H, W] or an empty tensor, grad_centres [N, K, 2] in the centres' dtype
  // or an empty tensor).  deterministic=True avoids float atomics.  No gradient to view_affine.
  m.def(
      "_patch_gather_bwd(Tensor grad_tokens, Tensor image, Tensor centres, int patch_size, "
      "bool need_image_grad, bool need_centre_grad, bool deterministic, Tensor? view_affine=None) "
      "-> (Tensor, Tensor)");
  // Margin-softmax cross-entropy (SPEC section 2): the elementwise work on one class chunk of the
  // chunked backend (csrc/cpu/margin_softmax.cpp).  raw [B, n] = s * <x_b/|x_b|, W_j> (float32 or
  // float64), inv_w [n] = 1/max(|W_j|, eps), labels [B, T] int64 class ids, first [B, T] bool (first
  // occurrence of the class among the row's targets), start: the chunk's first class,
  // target_logit [B, T] the margined target logits.  Returns lse [B] (float64), logit_sum [B], the
  // largest plain logit [B] and its column in the chunk [B] (int64).
  m.def(
      "_margin_chunk_fwd(Tensor raw, Tensor inv_w, Tensor labels, Tensor first, int start, "
      "Tensor target_logit) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward of one chunk: overwrites raw with g = dcos / |W_j| [B, n] and returns
  // sum_b g * raw [n].  d loss / d logit = grad_lse * exp(logit - lse) (+ grad_logit_sum, + grad_target at
  // the targets): lse [B] and grad_lse [B] in raw's dtype (the caller passes lse rounded and the rounding's
  // factor exp(lse_rounded - lse) folded into grad_lse); grad_target [B, T] and grad_logit_sum [B] are the
  // gradients of the forward's statistics (None: zero).
  m.def(
      "_margin_chunk_bwd(Tensor(a!) raw, Tensor inv_w, Tensor labels, Tensor first, int start, "
      "Tensor target_logit, Tensor target_derivative, Tensor lse, Tensor grad_lse, Tensor? grad_target, "
      "Tensor? grad_logit_sum, float s) -> Tensor");
  // DINO's view augmentation in LAFS pretraining (lafs_kernels/ops/gaussian_blur.py, dino_colour.py).  Separable
  // Gaussian blur, reflect padding: image [B, C, H, W], kernel_x / kernel_y [N, 2R+1] along W / H
  // in the image's dtype, source_index [N] int64 (output n blurs image source_index[n]; None: N = B);
  // returns [N, C, H, W].
  m.def("_gaussian_blur(Tensor image, Tensor kernel_x, Tensor kernel_y, Tensor? source_index=None) -> Tensor");
  // The per-pixel colour chain on token pixels: pixels [N, T, 3] in [-1, 1], mean_pixels [N, M, 3]
  // (the contrast's mean gray; None: the pixels themselves), factors [N, 4] in the pixels' dtype,
  // order [N, 4] int64, jitter / gray / solarize [N] bool, pixel_weights [N, T] (each output pixel's factor
  // after the chain; None: 1).  Returns [N, T, 3] in [-1, 1].
  m.def(
      "_dino_colour(Tensor pixels, Tensor? mean_pixels, Tensor factors, Tensor order, Tensor jitter, "
      "Tensor gray, Tensor solarize, Tensor? pixel_weights=None) -> Tensor");
  // Attention of the Part fViT blocks for short sequences (lafs_kernels/ops/attention.py; CPU only).
  // q [B, H, Tq, d], k and v [B, H, T, d] with a dense last dimension.  Returns out [B, H, Tq, d] =
  // softmax(scale q k^T) v and the rows' log-sum-exp of the scaled scores, lse [B, H, Tq].
  m.def("_attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  // Gradients of _attention_fwd for grad_out [B, H, Tq, d], given its out and lse: (grad_q, grad_k, grad_v).
  m.def(
      "_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) "
      "-> (Tensor, Tensor, Tensor)");
  // The same gradients for q, k, v given as one contiguous qkv [B, T, 3, H, d] (q = qkv[:, :, 0] as [B, H, T, d]),
  // written straight into grad_qkv [B, T, 3, H, d].
  m.def("_attention_qkv_bwd(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, float scale) -> Tensor");
  // CUDA runtime version the CUDA kernels were compiled against (e.g. 13000),
  // 0 when they were not compiled; `info` and the import check compare it.
  m.def("_cuda_runtime_version() -> int", &lafs_cuda_runtime_version);
}

// The extension is loaded as a Python module; the ops register themselves
// through the static initialisers above, so the module itself is empty.
static struct PyModuleDef lafs_kernels_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&lafs_kernels_C_module); }
