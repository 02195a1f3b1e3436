// CPU kernels for modulated LayerNorm: y = (x - mean) * rstd * (1 + scale[n]) + shift[n].
//
// Forward: parallel over rows (n, t); two-pass fp32 statistics (fp64 for double).
// Backward: phase 1 parallel over rows computes the two row means of the LN input
// gradient; phase 2 parallel over (sample, feature block) writes dx and the per-sample
// sums d_shift[n] = sum_t dy, d_scale[n] = sum_t dy * xhat, each a sequential loop over t
// (deterministic, independent of the thread count).
//
// Layout: x, dy (N, T, D) unit inner stride, any (N, T) strides; shift, scale (N, D) any
// row stride (0 = shared), unit inner stride, dtype x.dtype or fp32; mean, rstd (N, T) fp32.
// y and dy are in the branch dtype branch_t: x.dtype, or fp16/bf16 with an fp32 x (autocast).
#include <optional>
#include <vector>

#include "modulated_layer_norm_cpu.h"

namespace {

using namespace dit_cpu;

template <typename scalar_t, typename mod_t, typename branch_t>
void mln_forward_cpu_impl(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                          at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  const int64_t T = x.size(1), D = x.size(2);
  const auto xr = rows_of<scalar_t>(x);
  const auto sh = mod_rows_of<mod_t>(shift);
  const auto sc = mod_rows_of<mod_t>(scale);
  branch_t* yp = y.data_ptr<branch_t>();
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, x.size(0) * T, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / T, t = r % T;
      mln_row_forward<scalar_t, mod_t, branch_t>(xr.row(n, t), sh.row(n), sc.row(n), D, eps, yp + r * D, mp + r,
                                                 rp + r);
    }
  });
}

template <typename scalar_t, typename mod_t, typename branch_t>
void mln_backward_cpu_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
                           const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dshift,
                           at::Tensor& dscale) {
  using acc = acc_t<scalar_t>;
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2);
  const auto xr = rows_of<scalar_t>(x);
  const auto dyr = rows_of<branch_t>(dy);
  const auto sc = mod_rows_of<mod_t>(scale);
  const float* mp = mean.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  std::vector<acc> coefs(2 * N * T);
  mln_backward_row_coefs<scalar_t, mod_t, branch_t>(dyr, xr, sc, mp, rp, N, T, D, coefs.data());

  scalar_t* dxp = dx.data_ptr<scalar_t>();
  mod_t* dshp = dshift.data_ptr<mod_t>();
  mod_t* dscp = dscale.data_ptr<mod_t>();
  const int64_t nblk = (D + kDBlock - 1) / kDBlock;
  at::parallel_for(0, N * nblk, 1, [&](int64_t begin, int64_t end) {
    acc dsh[kDBlock], dsc[kDBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nblk, d0 = (task % nblk) * kDBlock, d1 = std::min(D, d0 + kDBlock);
      std::fill(dsh, dsh + kDBlock, acc(0));
      std::fill(dsc, dsc + kDBlock, acc(0));
      const mod_t* s = sc.row(n);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = n * T + t;
        const scalar_t* xrow = xr.row(n, t);
        const branch_t* dyrow = dyr.row(n, t);
        scalar_t* dxrow = dxp + r * D;
        const acc mu = mp[r], rs = rp[r], c1 = coefs[2 * r], c2 = coefs[2 * r + 1];
        for (int64_t d = d0; d < d1; ++d) {
          const acc xhat = (static_cast<acc>(xrow[d]) - mu) * rs;
          const acc g0 = static_cast<acc>(dyrow[d]);
          const acc g = g0 * (acc(1) + static_cast<acc>(s[d]));
          dxrow[d] = static_cast<scalar_t>(rs * (g - c1 - xhat * c2));
          dsh[d - d0] += g0;
          dsc[d - d0] += g0 * xhat;
        }
      }
      for (int64_t d = d0; d < d1; ++d) {
        dshp[n * D + d] = static_cast<mod_t>(dsh[d - d0]);
        dscp[n * D + d] = static_cast<mod_t>(dsc[d - d0]);
      }
    }
  });
}

// x: (N, T, D) float, unit inner stride; shift, scale: (N, D), same dtype, any row stride.
void check_mln_inputs(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  DIT_CHECK_FLOAT(x);
  DIT_CHECK_DIM(x, 3, "(N, T, D)");
  TORCH_CHECK(unit_inner_stride(x), "x must have unit stride in its last dimension");
  DIT_CHECK_MOD(shift, x.size(0), x.size(2));
  DIT_CHECK_MOD(scale, x.size(0), x.size(2));
  TORCH_CHECK(shift.scalar_type() == scale.scalar_type(), "shift and scale must share a dtype, got ",
              shift.scalar_type(), " and ", scale.scalar_type());
  DIT_CHECK_SAME_DEVICE(x, shift);
  DIT_CHECK_SAME_DEVICE(x, scale);
}

}  // namespace

// x: (N, T, D); shift, scale: (N, D). Returns y (N, T, D) contiguous in out_dtype (default
// x.dtype; fp16/bf16 allowed with an fp32 x) and the fp32 row statistics mean, rstd (N, T).
std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_layer_norm_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                                        const at::Tensor& scale, double eps,
                                                                        std::optional<at::ScalarType> out_dtype) {
  check_mln_inputs(x, shift, scale);
  const at::ScalarType y_type = out_dtype.value_or(x.scalar_type());
  dit::check_branch_dtype(y_type, x.scalar_type(), "out_dtype", "x");
  dit::check_mixed_mod(shift, y_type, x.scalar_type(), "shift");
  auto y = at::empty(x.sizes(), x.options().dtype(y_type).memory_format(at::MemoryFormat::Contiguous));
  auto mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  auto rstd = at::empty_like(mean);
  if (x.numel() == 0) return {y, mean, rstd};
  DIT_DISPATCH_BRANCH_TYPES(x.scalar_type(), y_type, shift.scalar_type(), "modulated_layer_norm_cpu", [&] {
    mln_forward_cpu_impl<scalar_t, mod_t, branch_t>(x, shift, scale, eps, y, mean, rstd);
  });
  return {y, mean, rstd};
}

// grad_y, x: (N, T, D) unit inner stride, grad_y in the forward's y dtype; scale: (N, D);
// mean, rstd: (N, T) fp32. Returns dx (N, T, D) in x.dtype, dshift and dscale (N, D) in scale.dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_layer_norm_backward_cpu(const at::Tensor& grad_y,
                                                                                 const at::Tensor& x,
                                                                                 const at::Tensor& scale,
                                                                                 const at::Tensor& mean,
                                                                                 const at::Tensor& rstd) {
  DIT_CHECK_FLOAT(x);
  DIT_CHECK_DIM(x, 3, "(N, T, D)");
  TORCH_CHECK(unit_inner_stride(x), "x must have unit stride in its last dimension");
  DIT_CHECK_MOD(scale, x.size(0), x.size(2));
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "grad_y must have the shape of x ", x.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(unit_inner_stride(grad_y), "grad_y must have unit stride in its last dimension");
  for (const auto* s : {&mean, &rstd}) {
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->dim() == 2 && s->size(0) == x.size(0) &&
                    s->size(1) == x.size(1),
                "mean and rstd must be float32 (N, T) = (", x.size(0), ", ", x.size(1), "), got ", s->sizes(), " ",
                s->scalar_type());
  }
  DIT_CHECK_SAME_DEVICE(x, grad_y);
  DIT_CHECK_SAME_DEVICE(x, scale);
  dit::check_branch_dtype(grad_y.scalar_type(), x.scalar_type(), "grad_y", "x");
  dit::check_mixed_mod(scale, grad_y.scalar_type(), x.scalar_type(), "scale");
  auto dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  auto dshift = at::zeros({x.size(0), x.size(2)}, scale.options());
  auto dscale = at::zeros({x.size(0), x.size(2)}, scale.options());
  if (x.numel() == 0) return {dx, dshift, dscale};
  auto mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  DIT_DISPATCH_BRANCH_TYPES(x.scalar_type(), grad_y.scalar_type(), scale.scalar_type(),
                            "modulated_layer_norm_backward_cpu", [&] {
                              mln_backward_cpu_impl<scalar_t, mod_t, branch_t>(grad_y, x, scale, mean_c, rstd_c, dx,
                                                                               dshift, dscale);
                            });
  return {dx, dshift, dscale};
}

TORCH_LIBRARY_IMPL(dit_kernels, CPU, m) {
  m.impl("modulated_layer_norm", &modulated_layer_norm_cpu);
  m.impl("_modulated_layer_norm_backward", &modulated_layer_norm_backward_cpu);
}
