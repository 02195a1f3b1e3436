// CPU kernels for modulated LayerNorm: y = (x - mean) * rstd * (1 + scale[n]) + shift[n].
// Parallel over rows (n, t) in the forward and over samples n in the backward, where the
// per-sample sums d_shift[n] = sum_t dy, d_scale[n] = sum_t dy * xhat run in a fixed order
// (deterministic). Statistics: two-pass mean/variance in fp32 (fp64 for double inputs).
#include <ATen/Parallel.h>

#include <vector>

#include "../common.h"

namespace {

template <typename scalar_t, typename mod_t>
void mln_forward_cpu_impl(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                          at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  using acc = acc_t<scalar_t>;
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const mod_t* shp = shift.data_ptr<mod_t>();
  const mod_t* scp = scale.data_ptr<mod_t>();
  const int64_t sh_stride = shift.stride(0), sc_stride = scale.stride(0);
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, N * T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / T;
      const scalar_t* xr = xp + r * D;
      acc sum = 0;
      for (int64_t d = 0; d < D; ++d) sum += static_cast<acc>(xr[d]);
      const acc mu = sum / D;
      acc var = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc c = static_cast<acc>(xr[d]) - mu;
        var += c * c;
      }
      const acc rs = acc(1) / std::sqrt(var / D + static_cast<acc>(eps));
      mp[r] = static_cast<float>(mu);
      rp[r] = static_cast<float>(rs);
      const mod_t* sh = shp + n * sh_stride;
      const mod_t* sc = scp + n * sc_stride;
      scalar_t* yr = yp + r * D;
      for (int64_t d = 0; d < D; ++d) {
        const acc xhat = (static_cast<acc>(xr[d]) - mu) * rs;
        yr[d] = static_cast<scalar_t>(xhat * (acc(1) + static_cast<acc>(sc[d])) + static_cast<acc>(sh[d]));
      }
    }
  });
}

template <typename scalar_t, typename mod_t>
void mln_backward_cpu_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
                           const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx, at::Tensor& dshift,
                           at::Tensor& dscale) {
  using acc = acc_t<scalar_t>;
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const mod_t* scp = scale.data_ptr<mod_t>();
  const int64_t sc_stride = scale.stride(0);
  const float* mp = mean.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  mod_t* dshp = dshift.data_ptr<mod_t>();
  mod_t* dscp = dscale.data_ptr<mod_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> dsh(D), dsc(D);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(dsh.begin(), dsh.end(), acc(0));
      std::fill(dsc.begin(), dsc.end(), acc(0));
      const mod_t* sc = scp + n * sc_stride;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = n * T + t;
        const scalar_t* xr = xp + r * D;
        const scalar_t* dyr = dyp + r * D;
        const acc mu = mp[r], rs = rp[r];
        acc mean_g = 0, mean_gx = 0;
        for (int64_t d = 0; d < D; ++d) {
          const acc xhat = (static_cast<acc>(xr[d]) - mu) * rs;
          const acc g = static_cast<acc>(dyr[d]) * (acc(1) + static_cast<acc>(sc[d]));
          mean_g += g;
          mean_gx += g * xhat;
          dsh[d] += static_cast<acc>(dyr[d]);
          dsc[d] += static_cast<acc>(dyr[d]) * xhat;
        }
        mean_g /= D;
        mean_gx /= D;
        scalar_t* dxr = dxp + r * D;
        for (int64_t d = 0; d < D; ++d) {
          const acc xhat = (static_cast<acc>(xr[d]) - mu) * rs;
          const acc g = static_cast<acc>(dyr[d]) * (acc(1) + static_cast<acc>(sc[d]));
          dxr[d] = static_cast<scalar_t>(rs * (g - mean_g - xhat * mean_gx));
        }
      }
      for (int64_t d = 0; d < D; ++d) {
        dshp[n * D + d] = static_cast<mod_t>(dsh[d]);
        dscp[n * D + d] = static_cast<mod_t>(dsc[d]);
      }
    }
  });
}

void check_mln_inputs(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale) {
  DIT_CHECK_FLOAT(x);
  DIT_CHECK_DIM(x, 3, "(N, T, D)");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous (N, T, D)");
  DIT_CHECK_MOD(shift, x.size(0), x.size(2));
  DIT_CHECK_MOD(scale, x.size(0), x.size(2));
  TORCH_CHECK(shift.scalar_type() == scale.scalar_type(), "shift and scale must share a dtype");
  DIT_CHECK_SAME_DEVICE(x, shift);
  DIT_CHECK_SAME_DEVICE(x, scale);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_layer_norm_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                                        const at::Tensor& scale, double eps) {
  check_mln_inputs(x, shift, scale);
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  auto rstd = at::empty_like(mean);
  if (x.numel() == 0) return {y, mean, rstd};
  DIT_DISPATCH_MOD_TYPE(x.scalar_type(), shift.scalar_type(), "modulated_layer_norm_cpu",
                        [&] { mln_forward_cpu_impl<scalar_t, mod_t>(x, shift, scale, eps, y, mean, rstd); });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> modulated_layer_norm_backward_cpu(const at::Tensor& grad_y,
                                                                                 const at::Tensor& x,
                                                                                 const at::Tensor& scale,
                                                                                 const at::Tensor& mean,
                                                                                 const at::Tensor& rstd) {
  DIT_CHECK_DIM(x, 3, "(N, T, D)");
  DIT_CHECK_MOD(scale, x.size(0), x.size(2));
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "grad_y must match x in shape and dtype");
  auto dy = grad_y.contiguous();
  auto xc = x.contiguous();
  auto dx = at::empty_like(xc);
  auto dshift = at::zeros({x.size(0), x.size(2)}, scale.options());
  auto dscale = at::zeros({x.size(0), x.size(2)}, scale.options());
  if (x.numel() == 0) return {dx, dshift, dscale};
  DIT_DISPATCH_MOD_TYPE(x.scalar_type(), scale.scalar_type(), "modulated_layer_norm_backward_cpu", [&] {
    mln_backward_cpu_impl<scalar_t, mod_t>(dy, xc, scale, mean.contiguous(), rstd.contiguous(), dx, dshift, dscale);
  });
  return {dx, dshift, dscale};
}

TORCH_LIBRARY_IMPL(dit_kernels, CPU, m) {
  m.impl("modulated_layer_norm", &modulated_layer_norm_cpu);
  m.impl("_modulated_layer_norm_backward", &modulated_layer_norm_backward_cpu);
}
