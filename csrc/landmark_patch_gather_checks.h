// Argument checks shared by the CPU and CUDA kernels of the landmark patch gather (SPEC section 1).
#pragma once

#include <ATen/ATen.h>

namespace lafs_kernels {

// image [B, C, H, W]; centres [N, K, 2] with N a multiple of B (row n samples image n % B);
// view_affine [N, 4] (scale_x, scale_y, offset_x, offset_y), optional; all on one device.
inline void check_patch_gather_inputs(const at::Tensor& image, const at::Tensor& centres, int64_t patch_size,
                                      const c10::optional<at::Tensor>& view_affine) {
  TORCH_CHECK(image.dim() == 4, "_patch_gather: image must be [B, C, H, W], got ", image.sizes());
  const int64_t B = image.size(0);
  TORCH_CHECK(centres.dim() == 3 && centres.size(2) == 2 && (B > 0 ? centres.size(0) % B == 0 : centres.size(0) == 0),
              "_patch_gather: centres must be [N, K, 2] with N a multiple of B = ", B, ", got ", centres.sizes());
  TORCH_CHECK(centres.scalar_type() == at::kFloat || centres.scalar_type() == at::kDouble,
              "_patch_gather: centres must be float32 or float64, got ", centres.scalar_type());
  TORCH_CHECK(image.device() == centres.device(), "_patch_gather: image and centres are on different devices");
  TORCH_CHECK(patch_size >= 1, "_patch_gather: patch_size must be >= 1, got ", patch_size);
  if (view_affine.has_value()) {
    const auto& a = *view_affine;
    TORCH_CHECK(a.dim() == 2 && a.size(0) == centres.size(0) && a.size(1) == 4,
                "_patch_gather: view_affine must be [N, 4] with N = ", centres.size(0), ", got ", a.sizes());
    TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
                "_patch_gather: view_affine must be float32 or float64, got ", a.scalar_type());
    TORCH_CHECK(a.device() == image.device(), "_patch_gather: image and view_affine are on different devices");
  }
}

}  // namespace lafs_kernels
