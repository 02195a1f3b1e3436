// CUDA kernels for the adaLN-Zero gated residual (x + gate[n] * y) and its fusion with the next
// modulated LayerNorm.
//
// Formulas (gate, shift, scale per sample n, broadcast over the T tokens):
//   gated_residual:  out = x + gate_n * y
//     backward: dx = dout (not computed here), dy = gate_n * dout, dgate_n = sum_t dout * y
//   gated_residual_modulated_layer_norm:
//     x_new = x + gate_n * y (rounded to x.dtype: the stored residual stream),
//     h = LN(x_new) * (1 + scale_n) + shift_n   (two-pass fp32 statistics, saved mean/rstd)
//     backward (dx_new_ext and/or dh may be absent):
//       dx_new = dx_new_ext + rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dh * (1 + scale_n)
//       dx = dx_new,  dy = gate_n * dx_new,  dgate_n = sum_t dx_new * y,
//       dshift_n = sum_t dh,  dscale_n = sum_t dh * xhat
//
// Dtypes: the residual stream (x, x_new, out, grad_out / dx_new_ext, dx) is in x.dtype; the branch
// (y, h, dh, dy) in y.dtype, which is x.dtype or, with float32 x and float32 gate/shift/scale,
// float16/bfloat16 (bf16 autocast keeps the residual stream fp32 while Linears read and write bf16:
// taking y and returning h in bf16 here saves the model two cast passes and their fp32 copies).
// Arithmetic is fp32 (fp64 for double); every output is rounded once to its storage dtype.
//
// Parallelisation:
//   gated_residual forward - one warp per row, 4 rows per CTA, grid-stride over rows: for the DiT
//     widths the tier kernel loads the whole row (x, y, gate) before storing it (one trip per row);
//     else 4 x 16-byte packs per lane in flight (scalar fallback for odd D / unaligned pointers).
//   fused forward - mln_forward_tier_kernel / mln_forward_kernel<RESIDUAL> (modulated_layer_norm.cuh):
//     one warp per row, the row of x_new is built and kept in registers, stored once, normalised
//     from registers.
//   backwards - mln_backward_tier_kernel (one pass, DiT widths) or mln_backward_kernel (generic),
//     see modulated_layer_norm.cuh; fp32 partials reduced in a fixed order by a second kernel
//     (deterministic, no atomics).
//
// Memory-traffic floor at DiT-XL/2 training shape (N = 256, T = 256, D = 1152, bf16), one
// (N, T, D) pass = 151.0 MB:
//   gated_residual fwd: read x, y + write out = 453 MB;  bwd: read dout, y + write dy = 453 MB.
//   fused fwd: read x, y + write x_new, h = 604 MB (+ 0.5 MB mean/rstd, ~1.8 MB modulation).
//   fused bwd: read dx_new_ext, dh, x_new, y + write dx, dy = 906 MB (+ workspace ~18 MB r+w).
//   At 4.8 TB/s (H200 peak): 94 / 94 / 126 / 189 us.
// Mixed layout (x, x_new, dx fp32; y, h, dh, dy bf16; 75.5 M elements), bytes per element:
//   gated_residual fwd: x 4 + y 2 + out 4 = 10 (755 MB);  bwd: dout 4 + y 2 + dy 2 = 8 (604 MB).
//   fused fwd: read x 4 + y 2, write x_new 4 + h 2 = 12 B/elem = 906 MB (189 us), vs 28 B/elem
//   (2.1 GB, 440 us) for the fp32 op (16) plus the two casts the model needed before
//   (y bf16 -> fp32: 6, h fp32 -> bf16: 6).
//   fused bwd: read dx_new_ext 4 + dh 2 + x_new 4 + y 2, write dx 4 + dy 2 = 18 B/elem = 1359 MB.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../common.h"
#include "modulated_layer_norm.cuh"

namespace {

constexpr int kGrUnroll = 4;  // packs per lane in flight in the gated-residual forward

// x, out: residual dtype T; y: branch dtype L; gate: M.
template <typename T, typename M, typename L, int VEC>
__global__ void __launch_bounds__(dit::kFwdWarps* dit::kWarpSize)
    gated_residual_kernel(const T* __restrict__ x, const L* __restrict__ y, const M* __restrict__ gate,
                          int64_t gate_stride, T* __restrict__ out, int64_t rows, int64_t tokens, int dim) {
  using acc = acc_t<T>;
  using PT = dit::Pack<T, VEC>;
  using PL = dit::Pack<L, VEC>;
  using PM = dit::Pack<M, VEC>;
  const int lane = threadIdx.x % dit::kWarpSize;
  const int nvec = dim / VEC;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * dit::kFwdWarps + threadIdx.x / dit::kWarpSize; row < rows;
       row += static_cast<int64_t>(gridDim.x) * dit::kFwdWarps) {
    const int64_t base = row * dim;
    const M* gate_n = gate + (row / tokens) * gate_stride;
    for (int v0 = 0; v0 < nvec; v0 += kGrUnroll * dit::kWarpSize) {
      PT xs[kGrUnroll];
      PL ys[kGrUnroll];
      PM gs[kGrUnroll];
#pragma unroll
      for (int u = 0; u < kGrUnroll; ++u) {
        const int v = v0 + u * dit::kWarpSize + lane;
        if (v < nvec) {
          xs[u] = dit::load_pack<T, VEC>(x + base + static_cast<int64_t>(v) * VEC);
          ys[u] = dit::load_pack<L, VEC>(y + base + static_cast<int64_t>(v) * VEC);
          gs[u] = dit::load_pack<M, VEC>(gate_n + static_cast<int64_t>(v) * VEC);
        }
      }
#pragma unroll
      for (int u = 0; u < kGrUnroll; ++u) {
        const int v = v0 + u * dit::kWarpSize + lane;
        if (v < nvec) {
          PT o;
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            o[e] = static_cast<T>(static_cast<acc>(xs[u][e]) + static_cast<acc>(gs[u][e]) * static_cast<acc>(ys[u][e]));
          dit::store_pack<T, VEC>(out + base + static_cast<int64_t>(v) * VEC, o);
        }
      }
    }
  }
}

// Registers (32-bit words) a tier gated residual keeps live per thread: one row's x, y, gate packs.
template <typename T, typename M, typename L, int VEC, int PPL>
constexpr int kGrTierWords = PPL * VEC * static_cast<int>(sizeof(T) + sizeof(L) + sizeof(M)) / 4;

// Gated residual specialised on PPL packs per lane (dit::RowTiers): one warp per row, every load of
// the row (x, y, gate) issued before the first store, one memory round trip per row.
template <typename T, typename M, typename L, int VEC, int PPL>
__global__ void __launch_bounds__(dit::kFwdWarps* dit::kWarpSize,
                                  dit::min_blocks_for(dit::kFwdWarps* dit::kWarpSize, kGrTierWords<T, M, L, VEC, PPL>))
    gated_residual_tier_kernel(const T* __restrict__ x, const L* __restrict__ y, const M* __restrict__ gate,
                               int64_t gate_stride, T* __restrict__ out, int64_t rows, int64_t tokens, int dim) {
  using acc = acc_t<T>;
  using PT = dit::Pack<T, VEC>;
  using PL = dit::Pack<L, VEC>;
  using PM = dit::Pack<M, VEC>;
  constexpr int kFull = dit::full_packs<VEC, PPL>();
  const int lane = threadIdx.x % dit::kWarpSize;
  const int nvec = dim / VEC;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * dit::kFwdWarps + threadIdx.x / dit::kWarpSize; row < rows;
       row += static_cast<int64_t>(gridDim.x) * dit::kFwdWarps) {
    const int64_t base = row * dim;
    const M* __restrict__ gate_n = gate + (row / tokens) * gate_stride;
    PT xs[PPL];
    PL ys[PPL];
    PM gs[PPL];
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int v = i * dit::kWarpSize + lane;
      if (i < kFull || v < nvec) {
        const int64_t c = static_cast<int64_t>(v) * VEC;
        xs[i] = dit::load_pack<T, VEC>(x + base + c);
        ys[i] = dit::load_pack<L, VEC>(y + base + c);
        gs[i] = dit::load_pack<M, VEC>(gate_n + c);
      }
    }
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int v = i * dit::kWarpSize + lane;
      if (i < kFull || v < nvec) {
        PT o;
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          o[e] = static_cast<T>(static_cast<acc>(xs[i][e]) + static_cast<acc>(gs[i][e]) * static_cast<acc>(ys[i][e]));
        dit::store_pack<T, VEC>(out + base + static_cast<int64_t>(v) * VEC, o);
      }
    }
  }
}

template <typename T, typename M, typename L>
void launch_gated_residual(const T* x, const L* y, const M* gate, int64_t gate_stride, T* out, int64_t rows,
                           int64_t tokens, int dim) {
  constexpr int V = dit::kVec16<T>;  // y packs are V * sizeof(L) bytes
  const bool vec = dim % V == 0 && dit::pack_ok<T, V>(x, dim) && dit::pack_ok<L, V>(y, dim) &&
                   dit::pack_ok<T, V>(out, dim) && dit::pack_ok<M, V>(gate, gate_stride);
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned threads = dit::kFwdWarps * dit::kWarpSize;
  if (vec && dit::with_row_tier<V>(dim / V, [&](auto ppl) {
        constexpr int P = decltype(ppl)::value;
        auto kernel = gated_residual_tier_kernel<T, M, L, V, P>;
        const int64_t blocks = std::min<int64_t>(dit::ceil_div(rows, dit::kFwdWarps),
                                                 static_cast<int64_t>(dit::sm_count()) *
                                                     dit::resident_blocks(kernel, static_cast<int>(threads)));
        kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(x, y, gate, gate_stride, out, rows, tokens, dim);
      })) {
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t blocks =
      std::min<int64_t>(dit::ceil_div(rows, dit::kFwdWarps), static_cast<int64_t>(dit::sm_count()) * 32);
  if (vec) {
    gated_residual_kernel<T, M, L, V>
        <<<static_cast<unsigned>(blocks), threads, 0, stream>>>(x, y, gate, gate_stride, out, rows, tokens, dim);
  } else {
    gated_residual_kernel<T, M, L, 1>
        <<<static_cast<unsigned>(blocks), threads, 0, stream>>>(x, y, gate, gate_stride, out, rows, tokens, dim);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x (N, T, D) float CUDA (the residual stream); y (the branch) x's shape and device, dtype x.dtype
// or float16/bfloat16 with float32 x; gate (N, D) any row stride, x.dtype or float32 (float32 when
// the branch dtype differs).
void check_pair_and_gate(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const char* x_name,
                         const char* y_name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kDouble,
              x_name, " must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3, x_name, " must have shape (N, T, D), got ", x.sizes());
  TORCH_CHECK(x.is_cuda(), x_name, " must be a CUDA tensor, got device ", x.device());
  dit::check_dim_fits(x);
  dit::check_branch_tensor(y, x, y_name, x_name);
  DIT_CHECK_MOD(gate, x.size(0), x.size(2));
  DIT_CHECK_SAME_DEVICE(x, gate);
  dit::check_mixed_mod(gate, y.scalar_type(), x.scalar_type(), "gate");
}

}  // namespace

// x, y: (N, T, D), last dim contiguous; y in x.dtype or (float32 x, gate) float16/bfloat16;
// gate: (N, D) any row stride. Returns x + gate[:, None] * y, (N, T, D) contiguous in x.dtype.
at::Tensor gated_residual_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate) {
  check_pair_and_gate(x, y, gate, "x", "y");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor yc = y.contiguous();
  auto out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  DIT_DISPATCH_BRANCH_TYPES(x.scalar_type(), y.scalar_type(), gate.scalar_type(), "gated_residual_cuda", [&] {
    launch_gated_residual<scalar_t, mod_t, branch_t>(xc.data_ptr<scalar_t>(), yc.data_ptr<branch_t>(),
                                                     gate.data_ptr<mod_t>(), dit::mod_stride(gate),
                                                     out.data_ptr<scalar_t>(), x.size(0) * x.size(1), x.size(1),
                                                     static_cast<int>(x.size(2)));
  });
  return out;
}

// grad_out: (N, T, D) in the residual dtype (x.dtype of the forward); y: (N, T, D) in the branch
// dtype (grad_out.dtype, or float16/bfloat16 with float32 grad_out and gate); gate: (N, D) any row stride.
// Returns dy = gate * grad_out (N, T, D) in y.dtype, dgate = sum_t grad_out * y (N, D) in gate.dtype.
std::tuple<at::Tensor, at::Tensor> gated_residual_backward_cuda(const at::Tensor& grad_out, const at::Tensor& y,
                                                                const at::Tensor& gate) {
  check_pair_and_gate(grad_out, y, gate, "grad_out", "y");
  const int64_t N = y.size(0), T = y.size(1), D = y.size(2);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor go = grad_out.contiguous();
  const at::Tensor yc = y.contiguous();
  auto dy = at::empty_like(yc, at::MemoryFormat::Contiguous);
  if (y.numel() == 0) return {dy, at::zeros({N, D}, gate.options())};
  auto dgate = at::empty({N, D}, gate.options());
  DIT_DISPATCH_BRANCH_TYPES(go.scalar_type(), y.scalar_type(), gate.scalar_type(),
                            "gated_residual_backward_cuda", [&] {
    dit::BwdArgs<scalar_t, mod_t, branch_t> a{};
    a.dxn = go.data_ptr<scalar_t>();
    a.y = yc.data_ptr<branch_t>();
    a.gate = gate.data_ptr<mod_t>();
    a.gate_stride = dit::mod_stride(gate);
    a.dy = dy.data_ptr<branch_t>();
    a.tokens = T;
    a.dim = static_cast<int>(D);
    a.nq = 1;
    dit::launch_mln_backward<dit::kBwdGr, scalar_t, mod_t, branch_t>(a, N, {dgate.data_ptr<mod_t>(), nullptr, nullptr}, yc);
  });
  return {dy, dgate};
}

// x, y: (N, T, D), y in x.dtype or (float32 x and modulation) float16/bfloat16;
// gate, shift, scale: (N, D) any row stride, one dtype (x.dtype or float32).
// Returns x_new = x + gate * y (N, T, D) in x.dtype, h = LN(x_new) * (1 + scale) + shift (N, T, D)
// in y.dtype, and the LN statistics mean, rstd (N, T) float32 of x_new.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_residual_modulated_layer_norm_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& shift,
    const at::Tensor& scale, double eps) {
  check_pair_and_gate(x, y, gate, "x", "y");
  DIT_CHECK_MOD(shift, x.size(0), x.size(2));
  DIT_CHECK_MOD(scale, x.size(0), x.size(2));
  DIT_CHECK_SAME_DEVICE(x, shift);
  DIT_CHECK_SAME_DEVICE(x, scale);
  TORCH_CHECK(shift.scalar_type() == gate.scalar_type() && scale.scalar_type() == gate.scalar_type(),
              "shift and scale must have the dtype of gate (", gate.scalar_type(), "), got ", shift.scalar_type(),
              " and ", scale.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor yc = y.contiguous();
  auto x_new = at::empty_like(xc, at::MemoryFormat::Contiguous);
  auto h = at::empty(xc.sizes(), xc.options().dtype(y.scalar_type()));  // branch dtype, contiguous
  auto mean = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kFloat));
  auto rstd = at::empty_like(mean);
  if (x.numel() == 0) return {x_new, h, mean, rstd};
  DIT_DISPATCH_BRANCH_TYPES(x.scalar_type(), y.scalar_type(), gate.scalar_type(),
                            "gated_residual_modulated_layer_norm_cuda", [&] {
    dit::FwdArgs<scalar_t, mod_t, branch_t> a{};
    a.x = xc.data_ptr<scalar_t>();
    a.y = yc.data_ptr<branch_t>();
    a.gate = gate.data_ptr<mod_t>();
    a.shift = shift.data_ptr<mod_t>();
    a.scale = scale.data_ptr<mod_t>();
    a.gate_stride = dit::mod_stride(gate);
    a.shift_stride = dit::mod_stride(shift);
    a.scale_stride = dit::mod_stride(scale);
    a.x_new = x_new.data_ptr<scalar_t>();
    a.out = h.data_ptr<branch_t>();
    a.mean = mean.data_ptr<float>();
    a.rstd = rstd.data_ptr<float>();
    a.rows = x.size(0) * x.size(1);
    a.tokens = x.size(1);
    a.dim = static_cast<int>(x.size(2));
    a.eps = eps;
    dit::launch_mln_forward<scalar_t, mod_t, branch_t, true>(a);
  });
  return {x_new, h, mean, rstd};
}

// grad_x_new: (N, T, D) in x_new.dtype, grad_h: (N, T, D) in y.dtype (h's dtype), each optional
// (absent = zero); x_new, y: (N, T, D), y in x_new.dtype or (float32 x_new and modulation)
// float16/bfloat16; gate, scale: (N, D) any row stride, one dtype; mean, rstd: (N, T) float32.
// Returns dx (= total grad of x_new) (N, T, D) in x_new.dtype, dy (N, T, D) in y.dtype;
// dgate, dshift, dscale (N, D) contiguous in gate.dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_residual_modulated_layer_norm_backward_cuda(const std::optional<at::Tensor>& grad_x_new,
                                                  const std::optional<at::Tensor>& grad_h, const at::Tensor& x_new,
                                                  const at::Tensor& y, const at::Tensor& gate, const at::Tensor& scale,
                                                  const at::Tensor& mean, const at::Tensor& rstd) {
  check_pair_and_gate(x_new, y, gate, "x_new", "y");
  const int64_t N = x_new.size(0), T = x_new.size(1), D = x_new.size(2);
  DIT_CHECK_MOD(scale, N, D);
  DIT_CHECK_SAME_DEVICE(x_new, scale);
  TORCH_CHECK(scale.scalar_type() == gate.scalar_type(), "scale must have the dtype of gate (", gate.scalar_type(),
              "), got ", scale.scalar_type());
  const bool has_dxn = grad_x_new.has_value() && grad_x_new->defined();
  const bool has_dh = grad_h.has_value() && grad_h->defined();
  if (has_dxn) dit::check_rows_tensor(*grad_x_new, x_new, "grad_x_new");
  if (has_dh) {
    dit::check_rows_tensor(*grad_h, y, "grad_h");  // h (and its grad) are in y's branch dtype
    dit::check_stats_tensor(mean, N, T, x_new, "mean");
    dit::check_stats_tensor(rstd, N, T, x_new, "rstd");
  }
  const c10::cuda::CUDAGuard guard(x_new.device());
  const at::Tensor xc = x_new.contiguous();
  const at::Tensor yc = y.contiguous();
  const at::Tensor dxn = has_dxn ? grad_x_new->contiguous() : at::Tensor();
  const at::Tensor dh = has_dh ? grad_h->contiguous() : at::Tensor();
  const at::Tensor mc = has_dh ? mean.contiguous() : at::Tensor();
  const at::Tensor rc = has_dh ? rstd.contiguous() : at::Tensor();
  auto dx = at::empty_like(xc, at::MemoryFormat::Contiguous);
  auto dy = at::empty_like(yc, at::MemoryFormat::Contiguous);
  if (x_new.numel() == 0) {
    auto zeros = [&] { return at::zeros({N, D}, gate.options()); };  // empty sums are zero
    return {dx, dy, zeros(), zeros(), zeros()};
  }
  // Without an LN gradient dshift = dscale = 0 and the kernel skips the LN branch.
  auto dgate = at::empty({N, D}, gate.options());
  auto dshift = has_dh ? at::empty({N, D}, gate.options()) : at::zeros({N, D}, gate.options());
  auto dscale = has_dh ? at::empty({N, D}, gate.options()) : at::zeros({N, D}, gate.options());
  DIT_DISPATCH_BRANCH_TYPES(x_new.scalar_type(), y.scalar_type(), gate.scalar_type(),
                            "gated_residual_modulated_layer_norm_backward_cuda", [&] {
    dit::BwdArgs<scalar_t, mod_t, branch_t> a{};
    if (has_dh) {
      a.dh = dh.data_ptr<branch_t>();
      a.xn = xc.data_ptr<scalar_t>();
      a.mean = mc.data_ptr<float>();
      a.rstd = rc.data_ptr<float>();
      a.scale = scale.data_ptr<mod_t>();
      a.scale_stride = dit::mod_stride(scale);
    }
    if (has_dxn) a.dxn = dxn.data_ptr<scalar_t>();
    a.y = yc.data_ptr<branch_t>();
    a.gate = gate.data_ptr<mod_t>();
    a.gate_stride = dit::mod_stride(gate);
    a.dx = dx.data_ptr<scalar_t>();
    a.dy = dy.data_ptr<branch_t>();
    a.tokens = T;
    a.dim = static_cast<int>(D);
    a.nq = has_dh ? 3 : 1;
    std::array<mod_t*, 3> outs{};
    if (has_dh) {
      outs = {dshift.data_ptr<mod_t>(), dscale.data_ptr<mod_t>(), dgate.data_ptr<mod_t>()};
    } else {
      outs = {dgate.data_ptr<mod_t>(), nullptr, nullptr};
    }
    dit::launch_mln_backward<dit::kBwdFused, scalar_t, mod_t, branch_t>(a, N, outs, xc);
  });
  return {dx, dy, dgate, dshift, dscale};
}

TORCH_LIBRARY_IMPL(dit_kernels, CUDA, m) {
  m.impl("gated_residual", &gated_residual_cuda);
  m.impl("_gated_residual_backward", &gated_residual_backward_cuda);
  m.impl("gated_residual_modulated_layer_norm", &gated_residual_modulated_layer_norm_cuda);
  m.impl("_gated_residual_modulated_layer_norm_backward", &gated_residual_modulated_layer_norm_backward_cuda);
}
