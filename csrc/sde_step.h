// Host-side input checks shared by the CPU and CUDA kernels of sde_euler_maruyama_step and
// sde_euler_maruyama_step_table. Header-only so both translation units
// (g++ and nvcc) see one definition.
#pragma once
#include <optional>

#include "common.h"

namespace dit_sde {

// x (B, C, *spatial) is read as (B, C, S); out (B or 2B, C_out >= C, *spatial) as
// (rows, C_out, S) with any batch/channel strides and a contiguous spatial block.
struct StepGeometry {
  int64_t B = 0, C = 0, S = 1;       // batch, channels of x, flattened spatial size
  int64_t out_sb = 0, out_sc = 0;    // element strides of out over batch rows and channels
  bool cfg = false;                  // out holds [cond; uncond] (2B rows)
  int64_t guided = 0;                // channels [0, guided) receive CFG (clamped to C)
};

// True when dims 2.. of t are laid out like a contiguous tensor (size-1 dims ignored).
// An empty tensor qualifies: nothing is read (and .contiguous() would return it unchanged).
inline bool spatially_contiguous(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// `out` must already have a contiguous spatial block (see spatial_view).
inline StepGeometry check_step_inputs(const at::Tensor& x, const at::Tensor& out, int64_t guided_channels,
                                      const std::optional<at::Tensor>& noise) {
  DIT_CHECK_FLOAT(x);
  DIT_CHECK_FLOAT(out);
  TORCH_CHECK(x.dim() >= 2, "sde_euler_maruyama_step: x must have shape (B, C, ...), got ", x.sizes());
  DIT_CHECK_SAME_DEVICE(x, out);
  StepGeometry g;
  g.B = x.size(0);
  g.C = x.size(1);
  g.S = g.B * g.C == 0 ? 1 : x.numel() / (g.B * g.C);
  bool shape_ok = out.dim() == x.dim() && (out.size(0) == g.B || out.size(0) == 2 * g.B) && out.size(1) >= g.C;
  for (int64_t d = 2; shape_ok && d < x.dim(); ++d) shape_ok = out.size(d) == x.size(d);
  TORCH_CHECK(shape_ok, "sde_euler_maruyama_step: out must have shape (", g.B, " or ", 2 * g.B, ", >= ", g.C,
              ", *x.shape[2:]) matching x ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(guided_channels >= 0, "sde_euler_maruyama_step: guided_channels must be >= 0, got ", guided_channels);
  g.cfg = out.size(0) == 2 * g.B && g.B > 0;
  g.guided = std::min<int64_t>(guided_channels, g.C);
  TORCH_INTERNAL_ASSERT(spatially_contiguous(out));
  g.out_sb = out.stride(0);
  g.out_sc = out.stride(1);
  if (noise.has_value()) {
    const at::Tensor& z = *noise;
    DIT_CHECK_FLOAT(z);
    DIT_CHECK_SAME_DEVICE(x, z);
    TORCH_CHECK(z.sizes() == x.sizes(), "sde_euler_maruyama_step: noise must have the shape of x ", x.sizes(),
                ", got ", z.sizes());
  }
  return g;
}

// coeffs (S_steps, 3) float32/float64 rows [coef_x, coef_out, noise_std]; step: one int64 element.
inline void check_table_inputs(const at::Tensor& x, const at::Tensor& coeffs, const at::Tensor& step) {
  TORCH_CHECK(coeffs.dim() == 2 && coeffs.size(1) == 3 && coeffs.size(0) >= 1,
              "sde_euler_maruyama_step_table: coeffs must have shape (steps, 3) = [coef_x, coef_out, noise_std] "
              "per step, got ", coeffs.sizes());
  TORCH_CHECK(coeffs.scalar_type() == at::kFloat || coeffs.scalar_type() == at::kDouble,
              "sde_euler_maruyama_step_table: coeffs must be float32 or float64, got ", coeffs.scalar_type());
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kLong,
              "sde_euler_maruyama_step_table: step must be a one-element int64 tensor, got ", step.scalar_type(),
              " of shape ", step.sizes());
  DIT_CHECK_SAME_DEVICE(x, coeffs);
  DIT_CHECK_SAME_DEVICE(x, step);
}

// The explicit noise as a contiguous tensor of the accumulation dtype (fp64 for fp64 x, else
// fp32): a no-op for the usual fp32 noise, a small copy otherwise (ref: noise.to(acc)).
inline at::Tensor noise_in_acc(const at::Tensor& noise, const at::Tensor& x) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return noise.to(acc).contiguous();
}

// out with a contiguous spatial block (a no-op for model outputs and their channel slices).
inline at::Tensor spatial_view(const at::Tensor& out) {
  return spatially_contiguous(out) ? out : out.contiguous();
}

}  // namespace dit_sde
