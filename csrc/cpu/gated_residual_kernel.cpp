// CPU kernels for the adaLN-Zero gated residual and its fusion with the next modulated LN.
//
//   gated_residual:                      out = x + gate[n] * y
//   gated_residual_modulated_layer_norm: x_new = x + gate[n] * y   (stored in x.dtype)
//                                        h = LN(x_new) * (1 + scale[n]) + shift[n]
// Forward: parallel over rows (n, t); x_new is rounded to x.dtype before the LN statistics,
// as the residual stream is stored (two-pass fp32 statistics, fp64 for double).
// Backward: dx_new = grad_x_new + LN-backward(grad_h); dx = dx_new, dy = gate * dx_new,
// d_gate[n] = sum_t dx_new * y, d_shift[n] = sum_t grad_h, d_scale[n] = sum_t grad_h * xhat.
// Row coefficients of the LN backward are computed parallel over rows; everything else
// parallel over (sample, feature block) tasks with sequential sums over t (deterministic,
// no atomics, independent of the thread count).
//
// Layout: x, y, grads (N, T, D) unit inner stride, any (N, T) strides; gate, shift, scale
// (N, D) any row stride (0 = shared), unit inner stride, one dtype: x.dtype or fp32.
// Dtypes: scalar_t for the residual stream (x, x_new, grad_x_new, dx); branch_t for the branch
// (y, h, grad_h, dy): equal to scalar_t, or fp16/bf16 with an fp32 residual (common.h).
#include <optional>
#include <vector>

#include "modulated_layer_norm_cpu.h"

namespace {

using namespace dit_cpu;

// ---- gated residual ---------------------------------------------------------------------

// out = x + gate * y for one row, in the accumulator type, rounded once to scalar_t. Shared by
// both forwards so the residual stream of the fused op equals gated_residual bit for bit.
template <typename scalar_t, typename mod_t, typename branch_t>
inline void gated_residual_row(const scalar_t* x, const branch_t* y, const mod_t* gate, scalar_t* out, int64_t D) {
  using acc = acc_t<scalar_t>;
  for (int64_t d = 0; d < D; ++d) {
    out[d] = static_cast<scalar_t>(static_cast<acc>(x[d]) + static_cast<acc>(gate[d]) * static_cast<acc>(y[d]));
  }
}

template <typename scalar_t, typename mod_t, typename branch_t>
void gr_forward_cpu_impl(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, at::Tensor& out) {
  const int64_t T = x.size(1), D = x.size(2);
  const auto xr = rows_of<scalar_t>(x);
  const auto yr = rows_of<branch_t>(y);
  const auto gr = mod_rows_of<mod_t>(gate);
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, x.size(0) * T, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / T, t = r % T;
      const scalar_t* xrow = xr.row(n, t);
      const branch_t* yrow = yr.row(n, t);
      const mod_t* g = gr.row(n);
      gated_residual_row(xrow, yrow, g, op + r * D, D);
    }
  });
}

template <typename scalar_t, typename mod_t, typename branch_t>
void gr_backward_cpu_impl(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& gate, at::Tensor& dy,
                          at::Tensor& dgate) {
  using acc = acc_t<scalar_t>;
  const int64_t N = y.size(0), T = y.size(1), D = y.size(2);
  const auto gor = rows_of<scalar_t>(grad_out);
  const auto yr = rows_of<branch_t>(y);
  const auto gr = mod_rows_of<mod_t>(gate);
  branch_t* dyp = dy.data_ptr<branch_t>();
  mod_t* dgp = dgate.data_ptr<mod_t>();
  const int64_t nblk = (D + kDBlock - 1) / kDBlock;
  at::parallel_for(0, N * nblk, 1, [&](int64_t begin, int64_t end) {
    acc dg[kDBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nblk, d0 = (task % nblk) * kDBlock, d1 = std::min(D, d0 + kDBlock);
      std::fill(dg, dg + kDBlock, acc(0));
      const mod_t* g = gr.row(n);
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* gorow = gor.row(n, t);
        const branch_t* yrow = yr.row(n, t);
        branch_t* dyrow = dyp + (n * T + t) * D;
        for (int64_t d = d0; d < d1; ++d) {
          const acc go = static_cast<acc>(gorow[d]);
          dyrow[d] = static_cast<branch_t>(static_cast<acc>(g[d]) * go);
          dg[d - d0] += go * static_cast<acc>(yrow[d]);
        }
      }
      for (int64_t d = d0; d < d1; ++d) dgp[n * D + d] = static_cast<mod_t>(dg[d - d0]);
    }
  });
}

// ---- gated residual + modulated LayerNorm ------------------------------------------------

template <typename scalar_t, typename mod_t, typename branch_t>
void grmln_forward_cpu_impl(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                            const at::Tensor& shift, const at::Tensor& scale, double eps, at::Tensor& x_new,
                            at::Tensor& h, at::Tensor& mean, at::Tensor& rstd) {
  const int64_t T = x.size(1), D = x.size(2);
  const auto xr = rows_of<scalar_t>(x);
  const auto yr = rows_of<branch_t>(y);
  const auto gr = mod_rows_of<mod_t>(gate);
  const auto sh = mod_rows_of<mod_t>(shift);
  const auto sc = mod_rows_of<mod_t>(scale);
  scalar_t* xnp = x_new.data_ptr<scalar_t>();
  branch_t* hp = h.data_ptr<branch_t>();
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, x.size(0) * T, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / T, t = r % T;
      const scalar_t* xrow = xr.row(n, t);
      const branch_t* yrow = yr.row(n, t);
      const mod_t* g = gr.row(n);
      scalar_t* xnrow = xnp + r * D;
      gated_residual_row(xrow, yrow, g, xnrow, D);
      // The row was just written: the statistics passes read it from cache.
      mln_row_forward<scalar_t, mod_t, branch_t>(xnrow, sh.row(n), sc.row(n), D, eps, hp + r * D, mp + r, rp + r);
    }
  });
}

template <typename scalar_t, typename mod_t, typename branch_t>
void grmln_backward_cpu_impl(const std::optional<at::Tensor>& grad_x_new, const std::optional<at::Tensor>& grad_h,
                             const at::Tensor& x_new, const at::Tensor& y, const at::Tensor& gate,
                             const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd,
                             at::Tensor& dx, at::Tensor& dy, at::Tensor& dgate, at::Tensor& dshift,
                             at::Tensor& dscale) {
  using acc = acc_t<scalar_t>;
  const int64_t N = x_new.size(0), T = x_new.size(1), D = x_new.size(2);
  const bool has_gx = grad_x_new.has_value() && grad_x_new->defined();
  const bool has_gh = grad_h.has_value() && grad_h->defined();
  const auto xnr = rows_of<scalar_t>(x_new);
  const auto yr = rows_of<branch_t>(y);
  const auto gxr = has_gx ? rows_of<scalar_t>(*grad_x_new) : Rows<const scalar_t>{nullptr, 0, 0};
  const auto ghr = has_gh ? rows_of<branch_t>(*grad_h) : Rows<const branch_t>{nullptr, 0, 0};
  const auto gr = mod_rows_of<mod_t>(gate);
  const auto sc = mod_rows_of<mod_t>(scale);
  const float* mp = mean.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  std::vector<acc> coefs;
  if (has_gh) {
    coefs.resize(2 * N * T);
    mln_backward_row_coefs<scalar_t, mod_t, branch_t>(ghr, xnr, sc, mp, rp, N, T, D, coefs.data());
  }
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  branch_t* dyp = dy.data_ptr<branch_t>();
  mod_t* dgp = dgate.data_ptr<mod_t>();
  mod_t* dshp = dshift.data_ptr<mod_t>();
  mod_t* dscp = dscale.data_ptr<mod_t>();
  const int64_t nblk = (D + kDBlock - 1) / kDBlock;
  at::parallel_for(0, N * nblk, 1, [&](int64_t begin, int64_t end) {
    acc dg[kDBlock], dsh[kDBlock], dsc[kDBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nblk, d0 = (task % nblk) * kDBlock, d1 = std::min(D, d0 + kDBlock);
      std::fill(dg, dg + kDBlock, acc(0));
      std::fill(dsh, dsh + kDBlock, acc(0));
      std::fill(dsc, dsc + kDBlock, acc(0));
      const mod_t* g = gr.row(n);
      const mod_t* s = sc.row(n);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = n * T + t;
        const scalar_t* xnrow = xnr.row(n, t);
        const branch_t* yrow = yr.row(n, t);
        scalar_t* dxrow = dxp + r * D;
        branch_t* dyrow = dyp + r * D;
        const scalar_t* gxrow = has_gx ? gxr.row(n, t) : nullptr;
        const branch_t* ghrow = has_gh ? ghr.row(n, t) : nullptr;
        const acc mu = mp[r], rs = rp[r];
        const acc c1 = has_gh ? coefs[2 * r] : acc(0), c2 = has_gh ? coefs[2 * r + 1] : acc(0);
        for (int64_t d = d0; d < d1; ++d) {
          acc dxn = has_gx ? static_cast<acc>(gxrow[d]) : acc(0);
          if (has_gh) {
            const acc xhat = (static_cast<acc>(xnrow[d]) - mu) * rs;
            const acc gh = static_cast<acc>(ghrow[d]);
            dxn += rs * (gh * (acc(1) + static_cast<acc>(s[d])) - c1 - xhat * c2);
            dsh[d - d0] += gh;
            dsc[d - d0] += gh * xhat;
          }
          dxrow[d] = static_cast<scalar_t>(dxn);
          dyrow[d] = static_cast<branch_t>(static_cast<acc>(g[d]) * dxn);
          dg[d - d0] += dxn * static_cast<acc>(yrow[d]);
        }
      }
      for (int64_t d = d0; d < d1; ++d) {
        dgp[n * D + d] = static_cast<mod_t>(dg[d - d0]);
        dshp[n * D + d] = static_cast<mod_t>(dsh[d - d0]);
        dscp[n * D + d] = static_cast<mod_t>(dsc[d - d0]);
      }
    }
  });
}

// ---- input checks --------------------------------------------------------------------------

// a, b: (N, T, D) float, same shape, unit inner stride. Same dtype unless b_may_be_branch: then b's
// dtype follows the branch rule against a (dit::check_branch_dtype).
void check_pair(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                bool b_may_be_branch = false) {
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16 ||
                  a.scalar_type() == at::kDouble,
              a_name, " must be float32, float16, bfloat16 or float64, got ", a.scalar_type());
  TORCH_CHECK(a.dim() == 3, a_name, " must have shape (N, T, D), got ", a.sizes());
  TORCH_CHECK(b.sizes() == a.sizes(), b_name, " must have the shape of ", a_name, " ", a.sizes(), ", got ", b.sizes());
  if (b_may_be_branch) {
    dit::check_branch_dtype(b.scalar_type(), a.scalar_type(), b_name, a_name);
  } else {
    TORCH_CHECK(b.scalar_type() == a.scalar_type(), b_name, " must have the dtype of ", a_name, " (", a.scalar_type(),
                "), got ", b.scalar_type());
  }
  TORCH_CHECK(unit_inner_stride(a) && unit_inner_stride(b), a_name, " and ", b_name,
              " must have unit stride in their last dimension");
  TORCH_CHECK(a.device() == b.device(), a_name, " is on ", a.device(), " but ", b_name, " is on ", b.device());
}

// A modulation tensor of x: (N, D), any row stride, dtype of `like` (x.dtype or fp32 for all).
void check_mod(const at::Tensor& m, const char* name, const at::Tensor& x, const at::Tensor& like) {
  DIT_CHECK_FLOAT(m);
  TORCH_CHECK(m.dim() == 2 && m.size(0) == x.size(0) && m.size(1) == x.size(2), name, " must have shape (N, D) = (",
              x.size(0), ", ", x.size(2), "), got ", m.sizes());
  TORCH_CHECK(unit_inner_stride(m), name, " must have unit stride in its last dimension");
  TORCH_CHECK(m.scalar_type() == like.scalar_type(), name, " must have the dtype of gate (", like.scalar_type(),
              "), got ", m.scalar_type());
  TORCH_CHECK(m.device() == x.device(), name, " is on ", m.device(), " but x is on ", x.device());
}

// (N, T) fp32 row statistics.
void check_stats(const at::Tensor& s, const char* name, const at::Tensor& x) {
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(0) == x.size(0) && s.size(1) == x.size(1),
              name, " must be float32 (N, T) = (", x.size(0), ", ", x.size(1), "), got ", s.sizes(), " ",
              s.scalar_type());
  TORCH_CHECK(s.device() == x.device(), name, " is on ", s.device(), " but x is on ", x.device());
}

at::Tensor empty_rows(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace

// x, y: (N, T, D), y in x.dtype or a branch dtype; gate: (N, D). Returns x + gate[:, None] * y,
// (N, T, D) contiguous, x.dtype.
at::Tensor gated_residual_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate) {
  check_pair(x, "x", y, "y", /*b_may_be_branch=*/true);
  check_mod(gate, "gate", x, gate);
  dit::check_mixed_mod(gate, y.scalar_type(), x.scalar_type(), "gate");
  auto out = empty_rows(x);
  if (x.numel() == 0) return out;
  DIT_DISPATCH_BRANCH_TYPES(x.scalar_type(), y.scalar_type(), gate.scalar_type(), "gated_residual_cpu",
                            [&] { gr_forward_cpu_impl<scalar_t, mod_t, branch_t>(x, y, gate, out); });
  return out;
}

// grad_out: (N, T, D) in x.dtype; y: (N, T, D) in x.dtype or a branch dtype; gate: (N, D).
// Returns dy = gate * grad_out (N, T, D) in y.dtype and dgate = sum_t grad_out * y (N, D) in
// gate.dtype. (dx = grad_out needs no kernel.)
std::tuple<at::Tensor, at::Tensor> gated_residual_backward_cpu(const at::Tensor& grad_out, const at::Tensor& y,
                                                               const at::Tensor& gate) {
  check_pair(grad_out, "grad_out", y, "y", /*b_may_be_branch=*/true);
  check_mod(gate, "gate", grad_out, gate);
  dit::check_mixed_mod(gate, y.scalar_type(), grad_out.scalar_type(), "gate");
  auto dy = empty_rows(y);
  auto dgate = at::zeros({y.size(0), y.size(2)}, gate.options());
  if (y.numel() == 0) return {dy, dgate};
  DIT_DISPATCH_BRANCH_TYPES(grad_out.scalar_type(), y.scalar_type(), gate.scalar_type(), "gated_residual_backward_cpu",
                            [&] { gr_backward_cpu_impl<scalar_t, mod_t, branch_t>(grad_out, y, gate, dy, dgate); });
  return {dy, dgate};
}

// x, y: (N, T, D), y in x.dtype or a branch dtype; gate, shift, scale: (N, D) one dtype. Returns
// x_new (N, T, D) contiguous in x.dtype, h (N, T, D) contiguous in y.dtype, and the fp32 LN
// statistics of x_new: mean, rstd (N, T).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_residual_modulated_layer_norm_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& shift,
    const at::Tensor& scale, double eps) {
  check_pair(x, "x", y, "y", /*b_may_be_branch=*/true);
  check_mod(gate, "gate", x, gate);
  check_mod(shift, "shift", x, gate);
  check_mod(scale, "scale", x, gate);
  dit::check_mixed_mod(gate, y.scalar_type(), x.scalar_type(), "gate");
  auto x_new = empty_rows(x);
  auto h = empty_rows(y);
  auto mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  auto rstd = at::empty_like(mean);
  if (x.numel() == 0) return {x_new, h, mean, rstd};
  DIT_DISPATCH_BRANCH_TYPES(x.scalar_type(), y.scalar_type(), gate.scalar_type(),
                            "gated_residual_modulated_layer_norm_cpu", [&] {
                              grmln_forward_cpu_impl<scalar_t, mod_t, branch_t>(x, y, gate, shift, scale, eps, x_new,
                                                                                h, mean, rstd);
                            });
  return {x_new, h, mean, rstd};
}

// grad_x_new (x_new.dtype), grad_h (y.dtype): (N, T, D) or None (an unused output); x_new, y:
// (N, T, D), y in x_new.dtype or a branch dtype; gate, scale: (N, D); mean, rstd: (N, T) fp32.
// Returns dx (x_new.dtype), dy (y.dtype) (N, T, D) and dgate, dshift, dscale (N, D) in gate.dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_residual_modulated_layer_norm_backward_cpu(const std::optional<at::Tensor>& grad_x_new,
                                                 const std::optional<at::Tensor>& grad_h, const at::Tensor& x_new,
                                                 const at::Tensor& y, const at::Tensor& gate,
                                                 const at::Tensor& scale, const at::Tensor& mean,
                                                 const at::Tensor& rstd) {
  check_pair(x_new, "x_new", y, "y", /*b_may_be_branch=*/true);
  if (grad_x_new.has_value() && grad_x_new->defined()) check_pair(x_new, "x_new", *grad_x_new, "grad_x_new");
  if (grad_h.has_value() && grad_h->defined()) check_pair(y, "y", *grad_h, "grad_h");
  check_mod(gate, "gate", x_new, gate);
  check_mod(scale, "scale", x_new, gate);
  dit::check_mixed_mod(gate, y.scalar_type(), x_new.scalar_type(), "gate");
  check_stats(mean, "mean", x_new);
  check_stats(rstd, "rstd", x_new);
  auto dx = empty_rows(x_new);
  auto dy = empty_rows(y);
  auto dgate = at::zeros({x_new.size(0), x_new.size(2)}, gate.options());
  auto dshift = at::zeros_like(dgate);
  auto dscale = at::zeros_like(dgate);
  if (x_new.numel() == 0) return {dx, dy, dgate, dshift, dscale};
  auto mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  DIT_DISPATCH_BRANCH_TYPES(x_new.scalar_type(), y.scalar_type(), gate.scalar_type(),
                            "gated_residual_modulated_layer_norm_backward_cpu", [&] {
                              grmln_backward_cpu_impl<scalar_t, mod_t, branch_t>(grad_x_new, grad_h, x_new, y, gate,
                                                                                 scale, mean_c, rstd_c, dx, dy, dgate,
                                                                                 dshift, dscale);
                            });
  return {dx, dy, dgate, dshift, dscale};
}

TORCH_LIBRARY_IMPL(dit_kernels, CPU, m) {
  m.impl("gated_residual", &gated_residual_cpu);
  m.impl("_gated_residual_backward", &gated_residual_backward_cpu);
  m.impl("gated_residual_modulated_layer_norm", &gated_residual_modulated_layer_norm_cpu);
  m.impl("_gated_residual_modulated_layer_norm_backward", &gated_residual_modulated_layer_norm_backward_cpu);
}
