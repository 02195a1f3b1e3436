// Row kernels shared by modulated_layer_norm_kernel.cu and gated_residual_kernel.cu.
//
// Dtypes: T is the residual stream (x, x_new, dxn, dx), L the branch (y, the LN output out / h,
// dh, dy), M the modulation (gate, shift, scale). Either L == T (any float type) or T = M = float
// with L = fp16/bf16 (bf16 autocast: fp32 residual stream, bf16 Linear inputs/outputs); see
// DIT_DISPATCH_BRANCH_TYPES in common.h. Arithmetic is in acc_t<T> (fp32, fp64 for double);
// results are rounded once to their storage dtype. VEC = kVec16<T> elements per pack, so a branch
// pack is VEC * sizeof(L) bytes (8 for bf16 with fp32 T: still one vector instruction).
//
// Forward (mln_forward_kernel):  one warp per row r = (n, t) of D elements.
//   [RESIDUAL] v = x + gate[n] * y, rounded to T and stored as x_new (the residual stream; the
//   statistics see exactly the stored values); otherwise v = x.  mu = mean(v), var = mean((v - mu)^2)
//   (two passes over the row held in registers, fp32 / fp64), rstd = (var + eps)^-1/2,
//   out = (v - mu) * rstd * (1 + scale[n]) + shift[n], rounded to L.
//   Rows are vectorised with 16-byte packs when D and every pointer allow it, else scalar; the first
//   kCachePacks packs of each lane stay in registers, longer rows re-read the remainder (any D works).
//
// Backward (mln_backward_kernel): one CTA per (sample n, tile of tokens), 8 warps, processing its tile
//   in sub-tiles of 8 rows:  (1) one warp per row computes mean(g), mean(g * xhat) with
//   g = dh * (1 + scale[n]);  (2) threads own column packs and walk the 8 rows (re-read from L1/L2):
//     dxn_total = rstd * (g - mean(g) - xhat * mean(g * xhat)) [if dh] + dxn [if given]
//     dx = dxn_total [if wanted, in T];  dy = gate[n] * dxn_total [if gate, in L]
//   and accumulate the per-sample column sums  sum dh, sum dh * xhat, sum dxn_total * y  in shared
//   memory (each column has one owning thread). A CTA writes its fp32 partial sums to a workspace
//   (N, tiles, nq, D); mln_column_finalize_kernel adds the tiles in a fixed order. No atomics:
//   bit-wise deterministic for a given shape and device.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <array>
#include <climits>

#include "../common.h"
#include "cuda_utils.cuh"

namespace dit {
namespace {

constexpr int kFwdWarps = 4;                        // rows in flight per forward CTA (one warp each)
constexpr int kBwdThreads = 256;                    // backward CTA size
constexpr int kBwdSub = kBwdThreads / kWarpSize;    // rows per backward sub-tile (one per warp)
// Backward statistics phase: packs per lane loaded before use. 2 raised the bf16 kernel from
// ~75 to 128 registers (3 -> 2 CTAs per SM); occupancy wins for the element phase.
constexpr int kBatch = 1;
constexpr int64_t kDefaultSmem = 48 * 1024;         // dynamic shared memory without opt-in

// Packs per lane kept in registers by the forward. The compiler holds them as fp32/fp64 values,
// so budget ~48 accumulator registers: 6 packs of 8 (bf16/fp16), 12 of 4 (fp32), 12 of 2 (fp64),
// i.e. rows with D <= 1536 (768 for fp64) stay register-resident; the scalar path keeps 24
// elements (D <= 768). Longer rows re-read the remainder from L1/L2 (any D works).
template <int VEC>
constexpr int kCachePacks = VEC == 1 ? 24 : (48 / VEC < 12 ? 48 / VEC : 12);

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return 1.0 / sqrt(v); }

// Coherent (plain) pack load, for data this kernel itself wrote earlier.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack_rw(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------
template <typename T, typename M, typename L>
struct FwdArgs {
  const T* x;          // (rows, D) contiguous
  const L* y;          // (rows, D) [RESIDUAL] branch dtype
  const M* gate;       // (N, D) row stride gate_stride [RESIDUAL]
  const M* shift;      // (N, D) row stride shift_stride
  const M* scale;      // (N, D) row stride scale_stride
  int64_t gate_stride, shift_stride, scale_stride;
  T* x_new;            // (rows, D) [RESIDUAL]
  L* out;              // (rows, D) branch dtype
  float* mean;         // (rows,)
  float* rstd;         // (rows,)
  int64_t rows, tokens;
  int dim;
  double eps;
};

template <typename T, typename M, typename L, int VEC, bool RESIDUAL>
__global__ void __launch_bounds__(kFwdWarps* kWarpSize) mln_forward_kernel(FwdArgs<T, M, L> a) {
  using acc = acc_t<T>;
  using PT = Pack<T, VEC>;
  using PL = Pack<L, VEC>;
  using PM = Pack<M, VEC>;
  constexpr int NC = kCachePacks<VEC>;
  const int lane = threadIdx.x % kWarpSize;
  const int nvec = a.dim / VEC;
  const acc inv_dim = acc(1) / static_cast<acc>(a.dim);
  const acc eps = static_cast<acc>(a.eps);

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kFwdWarps + threadIdx.x / kWarpSize; row < a.rows;
       row += static_cast<int64_t>(gridDim.x) * kFwdWarps) {
    const int64_t n = row / a.tokens;
    const int64_t base = row * a.dim;
    const M* gate_n = RESIDUAL ? a.gate + n * a.gate_stride : nullptr;

    // The LN input pack v (x, or x + gate * y rounded to T as the residual stream is stored).
    auto input_pack = [&](int v) -> PT {
      PT p = load_pack<T, VEC>(a.x + base + static_cast<int64_t>(v) * VEC);
      if constexpr (RESIDUAL) {
        const PL q = load_pack<L, VEC>(a.y + base + static_cast<int64_t>(v) * VEC);
        const PM g = load_pack<M, VEC>(gate_n + static_cast<int64_t>(v) * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          p[e] = static_cast<T>(static_cast<acc>(p[e]) + static_cast<acc>(g[e]) * static_cast<acc>(q[e]));
      }
      return p;
    };
    // Re-read of an uncached pack: RESIDUAL reads back the x_new this thread stored in pass 1.
    auto reread_pack = [&](int v) -> PT {
      if constexpr (RESIDUAL) {
        return load_pack_rw<T, VEC>(a.x_new + base + static_cast<int64_t>(v) * VEC);
      } else {
        return load_pack<T, VEC>(a.x + base + static_cast<int64_t>(v) * VEC);
      }
    };

    // Pass 1: load (and cache) the row, sum.
    PT cache[NC];
    acc sum = 0;
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      const int v = i * kWarpSize + lane;
      if (v < nvec) {
        cache[i] = input_pack(v);
        if constexpr (RESIDUAL) store_pack<T, VEC>(a.x_new + base + static_cast<int64_t>(v) * VEC, cache[i]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) sum += static_cast<acc>(cache[i][e]);
      }
    }
    for (int v = NC * kWarpSize + lane; v < nvec; v += kWarpSize) {
      const PT p = input_pack(v);
      if constexpr (RESIDUAL) store_pack<T, VEC>(a.x_new + base + static_cast<int64_t>(v) * VEC, p);
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum += static_cast<acc>(p[e]);
    }
    const acc mu = warp_reduce_sum(sum) * inv_dim;

    // Pass 2: centred sum of squares (no E[x^2] - mu^2 cancellation).
    acc sq = 0;
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      const int v = i * kWarpSize + lane;
      if (v < nvec) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc c = static_cast<acc>(cache[i][e]) - mu;
          sq += c * c;
        }
      }
    }
    for (int v = NC * kWarpSize + lane; v < nvec; v += kWarpSize) {
      const PT p = reread_pack(v);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc c = static_cast<acc>(p[e]) - mu;
        sq += c * c;
      }
    }
    const acc rs = rsqrt_acc(warp_reduce_sum(sq) * inv_dim + eps);
    if (lane == 0) {
      a.mean[row] = static_cast<float>(mu);
      a.rstd[row] = static_cast<float>(rs);
    }

    // Pass 3: normalise, modulate, store.
    const M* shift_n = a.shift + n * a.shift_stride;
    const M* scale_n = a.scale + n * a.scale_stride;
    auto emit = [&](int v, const PT& p) {
      const PM sh = load_pack<M, VEC>(shift_n + static_cast<int64_t>(v) * VEC);
      const PM sc = load_pack<M, VEC>(scale_n + static_cast<int64_t>(v) * VEC);
      PL o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc xhat = (static_cast<acc>(p[e]) - mu) * rs;
        o[e] = static_cast<L>(xhat * (acc(1) + static_cast<acc>(sc[e])) + static_cast<acc>(sh[e]));
      }
      store_pack<L, VEC>(a.out + base + static_cast<int64_t>(v) * VEC, o);
    };
#pragma unroll
    for (int i = 0; i < NC; ++i) {
      const int v = i * kWarpSize + lane;
      if (v < nvec) emit(v, cache[i]);
    }
    for (int v = NC * kWarpSize + lane; v < nvec; v += kWarpSize) emit(v, reread_pack(v));
  }
}

// True when a (rows, D) or (N, D)-with-row-stride tensor can be read with Pack<E, VEC>.
template <typename E, int VEC>
inline bool pack_ok(const void* p, int64_t row_stride) {
  return p == nullptr || (is_aligned(p, detail::pack_align<E, VEC>()) && row_stride % VEC == 0);
}

template <typename T, typename M, typename L, bool RESIDUAL>
void launch_mln_forward(const FwdArgs<T, M, L>& a) {
  constexpr int V = kVec16<T>;  // the residual dtype sets the pack width (branch packs: V * sizeof(L) B)
  const bool vec = a.dim % V == 0 && pack_ok<T, V>(a.x, a.dim) && pack_ok<L, V>(a.out, a.dim) &&
                   pack_ok<M, V>(a.shift, a.shift_stride) && pack_ok<M, V>(a.scale, a.scale_stride) &&
                   (!RESIDUAL || (pack_ok<L, V>(a.y, a.dim) && pack_ok<T, V>(a.x_new, a.dim) &&
                                  pack_ok<M, V>(a.gate, a.gate_stride)));
  const int64_t blocks = std::min<int64_t>(ceil_div(a.rows, kFwdWarps), static_cast<int64_t>(sm_count()) * 32);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (vec) {
    mln_forward_kernel<T, M, L, V, RESIDUAL>
        <<<static_cast<unsigned>(blocks), kFwdWarps * kWarpSize, 0, stream>>>(a);
  } else {
    mln_forward_kernel<T, M, L, 1, RESIDUAL>
        <<<static_cast<unsigned>(blocks), kFwdWarps * kWarpSize, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------
template <typename T, typename M, typename L>
struct BwdArgs {
  const L* dh = nullptr;     // (rows, D) grad of the LN output (branch dtype); null: no LN branch
  const T* dxn = nullptr;    // (rows, D) grad arriving directly at the LN input stream; null: none
  const T* xn = nullptr;     // (rows, D) LN input (needed with dh)
  const float* mean = nullptr;
  const float* rstd = nullptr;
  const M* scale = nullptr;  // (N, D), row stride scale_stride (needed with dh)
  const L* y = nullptr;      // (rows, D) gated branch, branch dtype (needed with gate)
  const M* gate = nullptr;   // (N, D), row stride gate_stride; null: no gated residual
  int64_t scale_stride = 0, gate_stride = 0;
  T* dx = nullptr;           // (rows, D) total grad of the LN input; null: not written
  L* dy = nullptr;           // (rows, D) gate * dx, branch dtype (written iff gate)
  void* ws = nullptr;        // (N, tiles, nq, D) acc_t<T> partial column sums
  int64_t tokens = 0, tile_rows = 0;
  int tiles = 1, dim = 0, nq = 0;  // nq = 2 * (dh != null) + (gate != null)
};

template <typename T, typename M, typename L, int VEC>
__global__ void __launch_bounds__(kBwdThreads) mln_backward_kernel(BwdArgs<T, M, L> a) {
  using acc = acc_t<T>;
  using PT = Pack<T, VEC>;
  using PL = Pack<L, VEC>;
  using PM = Pack<M, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc* col = reinterpret_cast<acc*>(smem_raw);  // (nq, D) column sums of this CTA
  __shared__ acc stats[kBwdSub][4];              // mu, rstd, mean(g), mean(g * xhat) per sub-tile row

  const int64_t n = blockIdx.x / a.tiles;
  const int64_t tile = blockIdx.x % a.tiles;
  const int64_t t_begin = tile * a.tile_rows;
  const int64_t t_end = t_begin + a.tile_rows < a.tokens ? t_begin + a.tile_rows : a.tokens;
  const int dim = a.dim;
  const int nvec = dim / VEC;
  const bool has_dh = a.dh != nullptr;
  const bool has_dxn = a.dxn != nullptr;
  const bool has_gate = a.gate != nullptr;
  const int q_gate = has_dh ? 2 : 0;
  const acc inv_dim = acc(1) / static_cast<acc>(dim);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const M* scale_n = has_dh ? a.scale + n * a.scale_stride : nullptr;
  const M* gate_n = has_gate ? a.gate + n * a.gate_stride : nullptr;

  for (int i = threadIdx.x; i < a.nq * dim; i += blockDim.x) col[i] = acc(0);
  __syncthreads();

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kBwdSub) {
    const int sub = t_end - t0 < kBwdSub ? static_cast<int>(t_end - t0) : kBwdSub;

    // (1) row statistics of the LN backward, one warp per row.
    if (has_dh) {
      if (warp < sub) {
        const int64_t row = n * a.tokens + t0 + warp;
        const int64_t base = row * dim;
        const acc mu = a.mean[row];
        const acc rs = a.rstd[row];
        acc sg = 0, sgx = 0;
        for (int v0 = lane; v0 < nvec; v0 += kBatch * kWarpSize) {
          PL d[kBatch];
          PT xv[kBatch];
          PM sc[kBatch];
#pragma unroll
          for (int b = 0; b < kBatch; ++b) {
            const int v = v0 + b * kWarpSize;
            if (v < nvec) {
              d[b] = load_pack<L, VEC>(a.dh + base + static_cast<int64_t>(v) * VEC);
              xv[b] = load_pack<T, VEC>(a.xn + base + static_cast<int64_t>(v) * VEC);
              sc[b] = load_pack<M, VEC>(scale_n + static_cast<int64_t>(v) * VEC);
            }
          }
#pragma unroll
          for (int b = 0; b < kBatch; ++b) {
            if (v0 + b * kWarpSize < nvec) {
#pragma unroll
              for (int e = 0; e < VEC; ++e) {
                const acc xhat = (static_cast<acc>(xv[b][e]) - mu) * rs;
                const acc g = static_cast<acc>(d[b][e]) * (acc(1) + static_cast<acc>(sc[b][e]));
                sg += g;
                sgx += g * xhat;
              }
            }
          }
        }
        sg = warp_reduce_sum(sg);
        sgx = warp_reduce_sum(sgx);
        if (lane == 0) {
          stats[warp][0] = mu;
          stats[warp][1] = rs;
          stats[warp][2] = sg * inv_dim;
          stats[warp][3] = sgx * inv_dim;
        }
      }
      __syncthreads();
    }

    // (2) element-wise grads; each thread owns column packs v and walks the sub-tile rows
    // (re-reading dh and xn of the rows phase (1) just touched: L1/L2 hits).
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t cofs = static_cast<int64_t>(v) * VEC;
      PM sc, gt;
      if (has_dh) sc = load_pack<M, VEC>(scale_n + cofs);
      if (has_gate) gt = load_pack<M, VEC>(gate_n + cofs);
      acc c_sh[VEC], c_sc[VEC], c_g[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) c_sh[e] = c_sc[e] = c_g[e] = acc(0);
      for (int s = 0; s < sub; ++s) {
        const int64_t off = (n * a.tokens + t0 + s) * dim + cofs;
        acc tot[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) tot[e] = acc(0);
        if (has_dh) {
          const acc mu = stats[s][0], rs = stats[s][1], mg = stats[s][2], mgx = stats[s][3];
          const PL d = load_pack<L, VEC>(a.dh + off);
          const PT xv = load_pack<T, VEC>(a.xn + off);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const acc de = static_cast<acc>(d[e]);
            const acc xhat = (static_cast<acc>(xv[e]) - mu) * rs;
            const acc g = de * (acc(1) + static_cast<acc>(sc[e]));
            tot[e] = rs * (g - mg - xhat * mgx);
            c_sh[e] += de;
            c_sc[e] += de * xhat;
          }
        }
        if (has_dxn) {
          const PT o = load_pack<T, VEC>(a.dxn + off);
#pragma unroll
          for (int e = 0; e < VEC; ++e) tot[e] += static_cast<acc>(o[e]);
        }
        if (a.dx != nullptr) {
          PT w;
#pragma unroll
          for (int e = 0; e < VEC; ++e) w[e] = static_cast<T>(tot[e]);
          store_pack<T, VEC>(a.dx + off, w);
        }
        if (has_gate) {
          const PL yv = load_pack<L, VEC>(a.y + off);
          PL w;
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            w[e] = static_cast<L>(static_cast<acc>(gt[e]) * tot[e]);
            c_g[e] += tot[e] * static_cast<acc>(yv[e]);
          }
          store_pack<L, VEC>(a.dy + off, w);
        }
      }
      // This thread is the only one touching columns [cofs, cofs + VEC).
      if (has_dh) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          col[cofs + e] += c_sh[e];
          col[dim + cofs + e] += c_sc[e];
        }
      }
      if (has_gate) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) col[q_gate * dim + cofs + e] += c_g[e];
      }
    }
    __syncthreads();  // stats[] is rewritten by the next sub-tile
  }

  acc* ws = reinterpret_cast<acc*>(a.ws) + (n * a.tiles + tile) * a.nq * dim;
  for (int i = threadIdx.x; i < a.nq * dim; i += blockDim.x) ws[i] = col[i];
}

// out_q[n, d] = sum over tiles (in order) of ws[n, tile, q, d], cast to M.
template <typename acc, typename M>
__global__ void mln_column_finalize_kernel(const acc* __restrict__ ws, M* out0, M* out1, M* out2, int64_t samples,
                                           int tiles, int nq, int dim) {
  const int64_t total = samples * nq * dim;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % dim;
    const int64_t rest = i / dim;
    const int q = static_cast<int>(rest % nq);
    const int64_t n = rest / nq;
    acc s = acc(0);
    for (int t = 0; t < tiles; ++t) s += ws[((n * tiles + t) * nq + q) * dim + d];
    M* out = q == 0 ? out0 : (q == 1 ? out1 : out2);
    out[n * dim + d] = static_cast<M>(s);
  }
}

// Runs the backward. `outs` are the nq (N, D) contiguous outputs in order
// [sum dh, sum dh * xhat] (if dh) then [sum dxn_total * y] (if gate).
template <typename T, typename M, typename L>
void launch_mln_backward(BwdArgs<T, M, L> a, int64_t samples, std::array<M*, 3> outs, const at::Tensor& like) {
  using acc = acc_t<T>;
  constexpr int V = kVec16<T>;
  TORCH_INTERNAL_ASSERT(a.nq == 2 * (a.dh != nullptr) + (a.gate != nullptr));
  TORCH_INTERNAL_ASSERT(a.nq >= 1 && samples >= 1 && a.tokens >= 1 && a.dim >= 1);
  // Token tiles per sample: enough CTAs to fill the GPU, few enough to keep the workspace small.
  const int64_t max_tiles = ceil_div(a.tokens, kBwdSub);
  int64_t tiles = std::min<int64_t>(max_tiles, std::max<int64_t>(1, ceil_div(static_cast<int64_t>(sm_count()) * 8, samples)));
  a.tile_rows = ceil_div(ceil_div(a.tokens, tiles), kBwdSub) * kBwdSub;
  tiles = ceil_div(a.tokens, a.tile_rows);  // every tile is non-empty
  a.tiles = static_cast<int>(tiles);
  TORCH_CHECK(samples * tiles <= INT_MAX, "dit_kernels: too many rows for the backward grid (N = ", samples, ")");

  auto ws = at::empty({samples * tiles * a.nq * a.dim},
                      like.options().dtype(std::is_same_v<acc, double> ? at::kDouble : at::kFloat));
  a.ws = ws.data_ptr();

  const bool vec = a.dim % V == 0 && pack_ok<L, V>(a.dh, a.dim) && pack_ok<T, V>(a.dxn, a.dim) &&
                   pack_ok<T, V>(a.xn, a.dim) && pack_ok<L, V>(a.y, a.dim) && pack_ok<T, V>(a.dx, a.dim) &&
                   pack_ok<L, V>(a.dy, a.dim) && pack_ok<M, V>(a.scale, a.scale_stride) &&
                   pack_ok<M, V>(a.gate, a.gate_stride);
  const int64_t smem = static_cast<int64_t>(a.nq) * a.dim * static_cast<int64_t>(sizeof(acc));
  auto kernel = vec ? mln_backward_kernel<T, M, L, V> : mln_backward_kernel<T, M, L, 1>;
  // Without opt-in a launch may use 48 KB of static + dynamic shared memory together (the default
  // max dynamic size is 48 KB minus the static stats[] array), so opt in when the sum exceeds it.
  const int64_t static_smem = 4 * kBwdSub * static_cast<int64_t>(sizeof(acc));
  if (smem + static_smem > kDefaultSmem) {
    const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    TORCH_CHECK(smem + static_smem <= optin,
                "dit_kernels backward: hidden size D = ", a.dim, " needs ", smem,
                " bytes of shared memory per block, more than the device allows (", optin, ")");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  kernel<<<static_cast<unsigned>(samples * tiles), kBwdThreads, static_cast<size_t>(smem), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t total = samples * a.nq * a.dim;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, 256), static_cast<int64_t>(sm_count()) * 32);
  mln_column_finalize_kernel<acc, M><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      reinterpret_cast<const acc*>(a.ws), outs[0], outs[1], outs[2], samples, a.tiles, a.nq, a.dim);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------
// Host-side checks
// ------------------------------------------------------------------------------------------

// Row stride of an (N, D) modulation tensor, 0 when it has a single row (any stride is legal there).
inline int64_t mod_stride(const at::Tensor& t) { return t.size(0) <= 1 ? 0 : t.stride(0); }

// An (N, T, D) tensor on like's device with like's shape and (when check_dtype) like's dtype.
inline void check_rows_tensor(const at::Tensor& t, const at::Tensor& like, const char* name,
                              bool check_dtype = true) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the activations are on ",
              like.device());
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have shape (N, T, D) = ", like.sizes(), ", got ", t.sizes());
  if (check_dtype) {
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(), ", got ",
                t.scalar_type());
  }
}

// A branch (N, T, D) tensor: like's shape and device, dtype by the branch rule against like.
inline void check_branch_tensor(const at::Tensor& t, const at::Tensor& like, const char* name,
                                const char* like_name) {
  check_rows_tensor(t, like, name, /*check_dtype=*/false);
  check_branch_dtype(t.scalar_type(), like.scalar_type(), name, like_name);
}

inline void check_stats_tensor(const at::Tensor& t, int64_t n, int64_t tokens, const at::Tensor& like,
                               const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == tokens, name, " must have shape (N, T) = (", n, ", ",
              tokens, "), got ", t.sizes());
}

inline void check_dim_fits(const at::Tensor& x) {
  TORCH_CHECK(x.size(2) <= INT_MAX / 4, "dit_kernels: hidden size D = ", x.size(2), " is too large");
}

}  // namespace
}  // namespace dit
