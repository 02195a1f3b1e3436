// Row helpers shared by the CPU modulated LayerNorm kernels
// (modulated_layer_norm_kernel.cpp, gated_residual_kernel.cpp).
//
// Layout: activations (N, T, D) with unit inner stride and any (N, T) strides; modulation
// (N, D) with any row stride (0 when shared) and unit inner stride; statistics (N, T) fp32.
// Accumulation in acc_t<scalar_t> (fp32, fp64 for double); statistics by two passes.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "../common.h"

namespace dit_cpu {

// Backward reductions run over (sample n, block of kDBlock features) tasks: every
// d_shift/d_scale/d_gate element is one sequential sum over t (deterministic, no atomics),
// and N = 1 still gives ceil(D / kDBlock) parallel tasks.
constexpr int64_t kDBlock = 128;

// Unit stride in the last dimension (empty tensors and D = 1 have any strides).
inline bool unit_inner_stride(const at::Tensor& t) { return t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1; }

// Rows per parallel_for task: about 16K elements each.
inline int64_t row_grain(int64_t D) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)); }

// (N, T, D) tensor with unit inner stride, addressed by row.
template <typename T>
struct Rows {
  T* p;
  int64_t sn, st;
  T* row(int64_t n, int64_t t) const { return p + n * sn + t * st; }
};

// Read-only row view of an input.
template <typename T>
Rows<const T> rows_of(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1)};
}

// (N, D) modulation with any row stride.
template <typename T>
struct ModRows {
  const T* p;
  int64_t sn;
  const T* row(int64_t n) const { return p + n * sn; }
};

template <typename T>
ModRows<T> mod_rows_of(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.size(0) > 1 ? t.stride(0) : 0};
}

// One row: two-pass mean / variance of xr, then y = xhat * (1 + scale) + shift, stored as out_t
// (x's dtype, or the half branch dtype with an fp32 x).
template <typename scalar_t, typename mod_t, typename out_t>
inline void mln_row_forward(const scalar_t* xr, const mod_t* sh, const mod_t* sc, int64_t D, double eps,
                            out_t* yr, float* mean_out, float* rstd_out) {
  using acc = acc_t<scalar_t>;
  acc sum = 0;
  for (int64_t d = 0; d < D; ++d) sum += static_cast<acc>(xr[d]);
  const acc mu = sum / static_cast<acc>(D);
  acc var = 0;
  for (int64_t d = 0; d < D; ++d) {
    const acc c = static_cast<acc>(xr[d]) - mu;
    var += c * c;
  }
  const acc rs = acc(1) / std::sqrt(var / static_cast<acc>(D) + static_cast<acc>(eps));
  *mean_out = static_cast<float>(mu);
  *rstd_out = static_cast<float>(rs);
  for (int64_t d = 0; d < D; ++d) {
    const acc xhat = (static_cast<acc>(xr[d]) - mu) * rs;
    yr[d] = static_cast<out_t>(xhat * (acc(1) + static_cast<acc>(sc[d])) + static_cast<acc>(sh[d]));
  }
}

// Backward, phase 1 (parallel over rows): per-row coefficients of the LN input gradient,
//   g = dy * (1 + scale);  c1 = mean_d(g);  c2 = mean_d(g * xhat)
// so that dx = rstd * (g - c1 - xhat * c2). coefs holds (c1, c2) per row, row r = n*T + t.
// dy is in the branch dtype grad_t (x's dtype, or half with an fp32 x).
template <typename scalar_t, typename mod_t, typename grad_t>
void mln_backward_row_coefs(const Rows<const grad_t>& dy, const Rows<const scalar_t>& x,
                            const ModRows<mod_t>& scale, const float* mean, const float* rstd, int64_t N,
                            int64_t T, int64_t D, acc_t<scalar_t>* coefs) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, N * T, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / T, t = r % T;
      const scalar_t* xr = x.row(n, t);
      const grad_t* dyr = dy.row(n, t);
      const mod_t* sc = scale.row(n);
      const acc mu = mean[r], rs = rstd[r];
      acc s1 = 0, s2 = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc xhat = (static_cast<acc>(xr[d]) - mu) * rs;
        const acc g = static_cast<acc>(dyr[d]) * (acc(1) + static_cast<acc>(sc[d]));
        s1 += g;
        s2 += g * xhat;
      }
      coefs[2 * r] = s1 / static_cast<acc>(D);
      coefs[2 * r + 1] = s2 / static_cast<acc>(D);
    }
  });
}

}  // namespace dit_cpu
