// CUDA kernels for modulated LayerNorm (non-affine LN + adaLN modulation).
//
// Formula, row r = (n, t), x_r in R^D:
//   mu_r = mean_d x_rd,  var_r = mean_d (x_rd - mu_r)^2,  rstd_r = (var_r + eps)^-1/2,
//   xhat_r = (x_r - mu_r) * rstd_r,   y_r = xhat_r * (1 + scale_n) + shift_n.
// Backward (g_r = dy_r * (1 + scale_n)):
//   dx_r = rstd_r * (g_r - mean_d g_r - xhat_r * mean_d(g_r * xhat_r)),
//   dshift_n = sum_t dy_(n,t),  dscale_n = sum_t dy_(n,t) * xhat_(n,t).
//
// Dtypes: y (and grad_y) are in the branch dtype out_dtype (default x.dtype); with a float32 x and
// float32 shift/scale it may be float16/bfloat16 (bf16 autocast: the fp32 residual stream feeds a
// bf16 Linear directly, without a separate cast pass). x and dx share x.dtype; statistics and all
// arithmetic are fp32 (fp64 for double) and each output is rounded once.
//
// Parallelisation (kernels in modulated_layer_norm.cuh):
//   forward  - one warp per row, 4 rows per CTA, grid-stride over the N*T rows; the row stays in
//              registers (16-byte packs when D and the pointers allow, scalar otherwise) for the
//              two-pass fp32 (fp64 for double) statistics; shift/scale rows are read through __ldg
//              (L1/L2-resident: each sample's rows are reused by its T tokens). For the DiT widths
//              the tier kernel issues the row's x, shift and scale loads together (one trip per row).
//   backward - tier (DiT widths): one pass, a warp per row with the row in registers, per-warp
//              column sums in shared memory, persistent CTAs over (sample, 64-row) items; generic:
//              one CTA per (sample, token tile) in 8-row sub-tiles. Either way fp32 per-item/tile
//              partials go to a workspace and a second kernel sums them in a fixed order
//              (deterministic, no atomics).
//
// Memory-traffic floor at DiT-XL/2 training shape (N = 256, T = 256, D = 1152, bf16):
//   one (N, T, D) pass = 151.0 MB.  forward: read x + write y = 302 MB (+ 0.5 MB mean/rstd,
//   1.2 MB modulation).  backward: read dy, x + write dx = 453 MB (+ 0.5 MB stats, workspace
//   N*tiles*2*D*4 B ~ 12 MB written and read back).  At 4.8 TB/s peak (H200): 63 us / 94 us.
// Mixed layout (x, dx fp32; y, dy bf16; 75.5 M elements): forward reads x 4 B + writes y 2 B
//   = 6 B/elem = 453 MB (94 us); backward reads dy 2 B + x 4 B, writes dx 4 B = 10 B/elem = 755 MB
//   (157 us). An fp32 op plus a separate y fp32->bf16 cast would move 8 + 6 = 14 B/elem.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../common.h"
#include "modulated_layer_norm.cuh"

namespace {

void check_mln_inputs_cuda(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  DIT_CHECK_FLOAT(x);
  DIT_CHECK_DIM(x, 3, "(N, T, D)");
  DIT_CHECK_CUDA(x);
  dit::check_dim_fits(x);
  DIT_CHECK_MOD(shift, x.size(0), x.size(2));
  DIT_CHECK_MOD(scale, x.size(0), x.size(2));
  TORCH_CHECK(shift.scalar_type() == scale.scalar_type(), "shift and scale must share a dtype, got ",
              shift.scalar_type(), " and ", scale.scalar_type());
  DIT_CHECK_SAME_DEVICE(x, shift);
  DIT_CHECK_SAME_DEVICE(x, scale);
}

}  // namespace

// x: (N, T, D), last dim contiguous (other strides: copied to contiguous);
// shift, scale: (N, D), any row stride (0 = shared), unit inner stride, x.dtype or float32;
// out_dtype: dtype of y, x.dtype (default) or float16/bfloat16 with float32 x, shift, scale.
// Returns y (N, T, D) contiguous in out_dtype, mean and rstd (N, T) float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_layer_norm_cuda(const at::Tensor& x, const at::Tensor& shift,
                                                                         const at::Tensor& scale, double eps,
                                                                         std::optional<at::ScalarType> out_dtype) {
  check_mln_inputs_cuda(x, shift, scale);
  const at::ScalarType branch = out_dtype.value_or(x.scalar_type());
  dit::check_branch_dtype(branch, x.scalar_type(), "out_dtype", "x");
  dit::check_mixed_mod(shift, branch, x.scalar_type(), "shift");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  auto y = at::empty(xc.sizes(), xc.options().dtype(branch));
  auto mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  auto rstd = at::empty_like(mean);
  if (x.numel() == 0) return {y, mean, rstd};
  DIT_DISPATCH_BRANCH_TYPES(x.scalar_type(), branch, shift.scalar_type(), "modulated_layer_norm_cuda", [&] {
    dit::FwdArgs<scalar_t, mod_t, branch_t> a{};
    a.x = xc.data_ptr<scalar_t>();
    a.shift = shift.data_ptr<mod_t>();
    a.scale = scale.data_ptr<mod_t>();
    a.shift_stride = dit::mod_stride(shift);
    a.scale_stride = dit::mod_stride(scale);
    a.out = y.data_ptr<branch_t>();
    a.mean = mean.data_ptr<float>();
    a.rstd = rstd.data_ptr<float>();
    a.rows = x.size(0) * x.size(1);
    a.tokens = x.size(1);
    a.dim = static_cast<int>(x.size(2));
    a.eps = eps;
    dit::launch_mln_forward<scalar_t, mod_t, branch_t, false>(a);
  });
  return {y, mean, rstd};
}

// grad_y, x: (N, T, D); grad_y in y's (branch) dtype: x.dtype, or float16/bfloat16 with float32 x
// and scale; scale: (N, D) as in the forward; mean, rstd: (N, T) float32.
// Returns dx (N, T, D) x.dtype, dshift and dscale (N, D) contiguous in scale.dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_layer_norm_backward_cuda(const at::Tensor& grad_y,
                                                                                  const at::Tensor& x,
                                                                                  const at::Tensor& scale,
                                                                                  const at::Tensor& mean,
                                                                                  const at::Tensor& rstd) {
  DIT_CHECK_FLOAT(x);
  DIT_CHECK_DIM(x, 3, "(N, T, D)");
  DIT_CHECK_CUDA(x);
  dit::check_dim_fits(x);
  DIT_CHECK_MOD(scale, x.size(0), x.size(2));
  DIT_CHECK_SAME_DEVICE(x, scale);
  dit::check_branch_tensor(grad_y, x, "grad_y", "x");
  dit::check_mixed_mod(scale, grad_y.scalar_type(), x.scalar_type(), "scale");
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2);
  dit::check_stats_tensor(mean, N, T, x, "mean");
  dit::check_stats_tensor(rstd, N, T, x, "rstd");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dy = grad_y.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor mc = mean.contiguous();
  const at::Tensor rc = rstd.contiguous();
  auto dx = at::empty_like(xc, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) {
    return {dx, at::zeros({N, D}, scale.options()), at::zeros({N, D}, scale.options())};
  }
  auto dshift = at::empty({N, D}, scale.options());
  auto dscale = at::empty({N, D}, scale.options());
  DIT_DISPATCH_BRANCH_TYPES(x.scalar_type(), dy.scalar_type(), scale.scalar_type(),
                            "modulated_layer_norm_backward_cuda", [&] {
    dit::BwdArgs<scalar_t, mod_t, branch_t> a{};
    a.dh = dy.data_ptr<branch_t>();
    a.xn = xc.data_ptr<scalar_t>();
    a.mean = mc.data_ptr<float>();
    a.rstd = rc.data_ptr<float>();
    a.scale = scale.data_ptr<mod_t>();
    a.scale_stride = dit::mod_stride(scale);
    a.dx = dx.data_ptr<scalar_t>();
    a.tokens = T;
    a.dim = static_cast<int>(D);
    a.nq = 2;
    dit::launch_mln_backward<dit::kBwdLn, scalar_t, mod_t, branch_t>(
        a, N, {dshift.data_ptr<mod_t>(), dscale.data_ptr<mod_t>(), nullptr}, xc);
  });
  return {dx, dshift, dscale};
}

TORCH_LIBRARY_IMPL(dit_kernels, CUDA, m) {
  m.impl("modulated_layer_norm", &modulated_layer_norm_cuda);
  m.impl("_modulated_layer_norm_backward", &modulated_layer_norm_backward_cuda);
}
