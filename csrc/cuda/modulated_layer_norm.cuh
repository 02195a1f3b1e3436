// Row kernels shared by modulated_layer_norm_kernel.cu and gated_residual_kernel.cu.
//
// Dtypes: T is the residual stream (x, x_new, dxn, dx), L the branch (y, the LN output out / h,
// dh, dy), M the modulation (gate, shift, scale). Either L == T (any float type) or T = M = float
// with L = fp16/bf16 (bf16 autocast: fp32 residual stream, bf16 Linear inputs/outputs); see
// DIT_DISPATCH_BRANCH_TYPES in common.h. Arithmetic is in acc_t<T> (fp32, fp64 for double);
// results are rounded once to their storage dtype. VEC = kVec16<T> elements per pack, so a branch
// pack is VEC * sizeof(L) bytes (8 for bf16 with fp32 T: still one vector instruction).
//
// Two implementations of each: a specialised one (the "tier" kernels, RowTiers below: 16-byte packs, D in the DiT
// range, not fp64), taken whenever the views' alignment allows, and the generic one for any D, alignment, dtype.
// Their backward column sums (dshift, dscale, dgate) are added in different orders: close, not bitwise equal.
//
// Forward (mln_forward_tier_kernel, mln_forward_kernel):  one warp per row r = (n, t) of D elements.
//   [RESIDUAL] v = x + gate[n] * y, rounded to T and stored as x_new (the residual stream; the
//   statistics see exactly the stored values); otherwise v = x.  mu = mean(v), var = mean((v - mu)^2)
//   (two passes over the row held in registers, fp32 / fp64), rstd = (var + eps)^-1/2,
//   out = (v - mu) * rstd * (1 + scale[n]) + shift[n], rounded to L.
//   Tier: the whole row and its modulation packs in registers, every load issued before the first
//   use (one memory round trip per row). Generic: 16-byte packs when D and every pointer allow it,
//   else scalar; the first kCachePacks packs of each lane stay in registers, longer rows re-read
//   the remainder (any D works).
//
// Backward, tier (mln_backward_tier_kernel): one pass, see the comment at the kernel: warp per row,
//   per-warp column sums in shared memory, persistent CTAs over (sample, 64-row) items, one fp32
//   partial per item; bitwise deterministic on any GPU (the items depend on the shape only).
// Backward, generic (mln_backward_kernel): one CTA per (sample n, tile of tokens), 8 warps, processing its tile
//   in sub-tiles of 8 rows:  (1) one warp per row computes mean(g), mean(g * xhat) with
//   g = dh * (1 + scale[n]);  (2) threads own column packs and walk the 8 rows (re-read from L1/L2):
//     dxn_total = rstd * (g - mean(g) - xhat * mean(g * xhat)) [if dh] + dxn [if given]
//     dx = dxn_total [if wanted, in T];  dy = gate[n] * dxn_total [if gate, in L]
//   and accumulate the per-sample column sums  sum dh, sum dh * xhat, sum dxn_total * y  in shared
//   memory (each column has one owning thread). A CTA writes its fp32 partial sums to a workspace
//   (N, tiles, nq, D); mln_column_finalize_kernel adds the tiles in a fixed order. No atomics:
//   bitwise deterministic for a given shape and SM count (the tile count follows the SM count).
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
// (The scalar path keeps 16 elements: 24 made the fp16/fp32 fused instantiations spill 4-12 bytes.)
template <int VEC>
constexpr int kCachePacks = VEC == 1 ? 16 : (48 / VEC < 12 ? 48 / VEC : 12);

// ---- Packs-per-lane tiers: the specialised row kernels -------------------------------------------
// A row kernel specialised on PPL (16-byte packs per lane, compile time) holds the whole row in
// registers, issues every load of a row (row, branch, modulation) before the first use, and has
// no lane-dependent loop left; D stays a runtime value inside a tier: packs beyond D are
// predicated off, and only the packs past the next smaller tier can be partial. The tiers are the
// DiT widths: 16-bit residual stream (VEC 8): PPL 2 / 3 / 4 / 5, D <= 512 / 768 / 1024 / 1280
// (DiT-S 384, B 768, L 1024, XL 1152); fp32 (VEC 4): PPL 3 / 6 / 8 / 9, D <= 384 / 768 / 1024 /
// 1152. Other D, unaligned tensors and fp64 take the generic kernels (any D).
template <int VEC>
struct RowTiers {
  static constexpr int count = 0;
  static constexpr int ppl[4] = {0, 0, 0, 0};
};
template <>
struct RowTiers<8> {
  static constexpr int count = 4;
  static constexpr int ppl[4] = {2, 3, 4, 5};
};
template <>
struct RowTiers<4> {
  static constexpr int count = 4;
  static constexpr int ppl[4] = {3, 6, 8, 9};
};

// Packs per lane that are complete for every D of the tier PPL (those of the next smaller tier).
template <int VEC, int PPL>
constexpr int full_packs() {
  int prev = 0;
  for (int i = 0; i < RowTiers<VEC>::count; ++i)
    if (RowTiers<VEC>::ppl[i] < PPL) prev = RowTiers<VEC>::ppl[i];
  return prev;
}

// Calls f(std::integral_constant<int, PPL>{}) for the smallest tier that holds `nvec` packs;
// false when none does (the caller takes the generic kernel).
template <int VEC, typename F>
inline bool with_row_tier(int64_t nvec, F&& f) {
  if constexpr (RowTiers<VEC>::count == 4) {
    constexpr int p0 = RowTiers<VEC>::ppl[0], p1 = RowTiers<VEC>::ppl[1], p2 = RowTiers<VEC>::ppl[2],
                  p3 = RowTiers<VEC>::ppl[3];
    if (nvec <= p0 * kWarpSize) {
      f(std::integral_constant<int, p0>{});
    } else if (nvec <= p1 * kWarpSize) {
      f(std::integral_constant<int, p1>{});
    } else if (nvec <= p2 * kWarpSize) {
      f(std::integral_constant<int, p2>{});
    } else if (nvec <= p3 * kWarpSize) {
      f(std::integral_constant<int, p3>{});
    } else {
      return false;
    }
    return true;
  } else {
    (void)nvec;
    (void)f;
    return false;
  }
}

// Minimum resident CTAs of `threads` threads for a kernel that keeps `words` 32-bit values per
// thread live (plus ~56 for addresses, indices and scalars): the __launch_bounds__ that lets ptxas use the
// registers it needs without spilling, and as many CTAs per SM as those registers allow.
constexpr int min_blocks_for(int threads, int words) {
  const int regs = ((words + 56 + 7) / 8) * 8;
  const int blocks = 65536 / (threads * (regs > 255 ? 255 : regs));
  return blocks < 1 ? 1 : (blocks > 8 ? 8 : blocks);
}

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

// Registers (32-bit words) a tier forward keeps live per thread: the raw packs of one row's loads
// and the row as acc values.
template <typename T, typename M, typename L, int VEC, int PPL, bool RESIDUAL>
constexpr int kFwdTierWords =
    PPL * VEC * (static_cast<int>(sizeof(T)) + 2 * static_cast<int>(sizeof(M)) +
                 (RESIDUAL ? static_cast<int>(sizeof(L) + sizeof(M)) : 0)) / 4 +
    PPL * VEC * static_cast<int>(sizeof(acc_t<T>)) / 4;

// Forward specialised on PPL packs per lane (see RowTiers): one warp per row. CTA b takes the
// contiguous rows [b * rows / grid, (b + 1) * rows / grid) (one sample, or the end of one and the
// start of the next), its warps rows first + warp, + 4, ...; the sample's shift / scale (/ gate)
// packs are loaded when the sample changes and stay in registers for its rows. Per row: (1) every
// load (x, y packs) is issued, unconditionally: lanes past D re-read the row's last pack (same
// sector as their neighbour's, unused), so the last pack's loads travel with the others instead of
// waiting behind a guard; (2) v = x (+ gate * y, rounded to T and stored as x_new), two-pass
// statistics from registers, (3) out stored. One memory round trip per row; stores never sit
// between loads of the same row.
template <typename T, typename M, typename L, int VEC, int PPL, bool RESIDUAL>
__global__ void __launch_bounds__(kFwdWarps* kWarpSize,
                                  min_blocks_for(kFwdWarps* kWarpSize,
                                                 kFwdTierWords<T, M, L, VEC, PPL, RESIDUAL>))
    mln_forward_tier_kernel(FwdArgs<T, M, L> a) {
  using acc = acc_t<T>;
  using PT = Pack<T, VEC>;
  using PL = Pack<L, VEC>;
  using PM = Pack<M, VEC>;
  constexpr int kFull = full_packs<VEC, PPL>();
  const T* __restrict__ x = a.x;
  const L* __restrict__ y = a.y;
  T* __restrict__ x_new = a.x_new;
  L* __restrict__ out = a.out;
  const int lane = threadIdx.x % kWarpSize;
  const int nvec = a.dim / VEC;
  const acc inv_dim = acc(1) / static_cast<acc>(a.dim);
  const acc eps = static_cast<acc>(a.eps);
  // The column offset of pack i of this lane; lanes past D take the row's last pack.
  auto pack_col = [&](int i) -> int64_t {
    const int v = i * kWarpSize + lane;
    return static_cast<int64_t>(i < kFull || v < nvec ? v : nvec - 1) * VEC;
  };

  const int64_t row_end = (static_cast<int64_t>(blockIdx.x) + 1) * a.rows / gridDim.x;
  int64_t row = static_cast<int64_t>(blockIdx.x) * a.rows / gridDim.x + threadIdx.x / kWarpSize;
  int64_t n = -1, t = a.tokens;  // sample of the row and its token index (n = -1: none loaded yet)
  PM gp[PPL], sp[PPL], cp[PPL];  // the sample's modulation packs
  for (; row < row_end; row += kFwdWarps, t += kFwdWarps) {
    if (t >= a.tokens) {  // a new sample: once per sample a warp's rows touch
      n = row / a.tokens;
      t = row - n * a.tokens;
#pragma unroll
      for (int i = 0; i < PPL; ++i) {
        const int64_t c = pack_col(i);
        if constexpr (RESIDUAL) gp[i] = load_pack<M, VEC>(a.gate + n * a.gate_stride + c);
        sp[i] = load_pack<M, VEC>(a.shift + n * a.shift_stride + c);
        cp[i] = load_pack<M, VEC>(a.scale + n * a.scale_stride + c);
      }
    }
    const int64_t base = row * a.dim;

    // (1) all loads of the row
    PT xp[PPL];
    PL yp[PPL];
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int64_t c = pack_col(i);
      xp[i] = load_pack<T, VEC>(x + base + c);
      if constexpr (RESIDUAL) yp[i] = load_pack<L, VEC>(y + base + c);
    }

    // (2) the LN input and its statistics, from registers
    acc vr[PPL][VEC];
    acc sum = 0;
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int v = i * kWarpSize + lane;
      if (i < kFull || v < nvec) {
        PT stored;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          T u = xp[i][e];
          if constexpr (RESIDUAL)
            u = static_cast<T>(static_cast<acc>(u) + static_cast<acc>(gp[i][e]) * static_cast<acc>(yp[i][e]));
          stored[e] = u;
          vr[i][e] = static_cast<acc>(u);
          sum += vr[i][e];
        }
        if constexpr (RESIDUAL) store_pack<T, VEC>(x_new + base + static_cast<int64_t>(v) * VEC, stored);
      }
    }
    const acc mu = warp_reduce_sum(sum) * inv_dim;
    acc sq = 0;
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      if (i < kFull || i * kWarpSize + lane < nvec) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc c = vr[i][e] - mu;
          sq += c * c;
        }
      }
    }
    const acc rs = rsqrt_acc(warp_reduce_sum(sq) * inv_dim + eps);
    if (lane == 0) {
      a.mean[row] = static_cast<float>(mu);
      a.rstd[row] = static_cast<float>(rs);
    }

    // (3) normalise, modulate, store
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int v = i * kWarpSize + lane;
      if (i < kFull || v < nvec) {
        PL o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const acc xhat = (vr[i][e] - mu) * rs;
          o[e] = static_cast<L>(xhat * (acc(1) + static_cast<acc>(cp[i][e])) + static_cast<acc>(sp[i][e]));
        }
        store_pack<L, VEC>(out + base + static_cast<int64_t>(v) * VEC, o);
      }
    }
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
  auto stream = at::cuda::getCurrentCUDAStream();
  // Specialised tier: a grid of resident CTAs (the launch bounds' minimum per SM), grid-stride rows.
  if (vec && with_row_tier<V>(a.dim / V, [&](auto ppl) {
        constexpr int P = decltype(ppl)::value;
        auto kernel = mln_forward_tier_kernel<T, M, L, V, P, RESIDUAL>;
        const int64_t blocks = std::min<int64_t>(
            ceil_div(a.rows, kFwdWarps),
            static_cast<int64_t>(sm_count()) * resident_blocks(kernel, kFwdWarps * kWarpSize));
        kernel<<<static_cast<unsigned>(blocks), kFwdWarps * kWarpSize, 0, stream>>>(a);
      })) {
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t blocks = std::min<int64_t>(ceil_div(a.rows, kFwdWarps), static_cast<int64_t>(sm_count()) * 32);
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
  int64_t tokens = 0, tile_rows = 0, samples = 0;
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
  for (int i = threadIdx.x * VEC; i < a.nq * dim; i += blockDim.x * VEC)
    store_pack<acc, VEC>(ws + i, *reinterpret_cast<const Pack<acc, VEC>*>(col + i));
}

// ---- One-pass backward (the specialised tiers) ---------------------------------------------------
// Which gradients a tier backward computes (its inputs follow):
//   kBwdLn    modulated LN:   dh, xn -> dx; sums dh, dh * xhat
//   kBwdGr    gated residual: dxn (= dout), y -> dy; sum dxn * y
//   kBwdFused fused op:       dh, xn, dxn, y -> dx, dy; sums dh, dh * xhat, dx * y
// Other combinations (a fused backward missing dh or dxn) take the generic kernel.
constexpr int kBwdLn = 0, kBwdGr = 1, kBwdFused = 2;
constexpr int kBwdRowWarps = 8;   // tier backward CTA: 8 warps, one row each at a time
constexpr int kBwdItemRows = 64;  // rows of one sample per work item; fixed, so that the partition
                                  // (and the result bits) depend on the shape only, not on the GPU

// Registers (32-bit words) a tier backward keeps live per thread: the row's raw packs, PPL x VEC
// wide, plus ~40 for the row's statistics, the modulation and the partial sums of a pack (the launch
// bounds below can ask for more CTAs than this estimate gives: kBwdTierMinBlocks).
template <typename T, typename L, int VEC, int PPL, int KIND>
constexpr int kBwdTierWords =
    40 + PPL * VEC *
             ((KIND != kBwdGr ? static_cast<int>(sizeof(L) + sizeof(T)) : 0) +
              (KIND != kBwdLn ? static_cast<int>(sizeof(T) + sizeof(L)) : 0)) / 4;

// CTAs per SM a tier backward asks ptxas for (its register ceiling). The gated-residual backward's
// estimate lands just above the 128 registers that 2 CTAs of 256 threads need (it compiled to 138 at
// bf16, D = 1152: 8 warps per SM). Where the estimate is within 16 registers of 128, ask for 2: ptxas
// then fits bf16 (any modulation dtype) and fp16 with fp16 modulation into <= 128 without spilling
// (123-128 at PPL 5). fp16 data with fp32 modulation spills 32 bytes at 128, so it keeps 1 CTA; the
// kernel-facts gate (scripts/kernel_facts.py) fails the build on any spill, should a compiler differ.
template <typename T, typename M, typename L, int VEC, int PPL, int KIND>
constexpr int kBwdTierMinBlocks =
    (KIND == kBwdGr && kBwdTierWords<T, L, VEC, PPL, KIND> + 56 <= 144 &&
     !(std::is_same_v<T, c10::Half> && std::is_same_v<M, float>))
        ? 2
        : min_blocks_for(kBwdRowWarps * kWarpSize, kBwdTierWords<T, L, VEC, PPL, KIND>);

template <int KIND>
constexpr int kBwdSums = (KIND != kBwdGr ? 2 : 0) + (KIND != kBwdLn ? 1 : 0);

// Shared memory of a tier backward: the (1 + scale) and gate rows, and each warp's column sums.
template <typename T, int KIND>
constexpr int64_t bwd_tier_smem(int64_t dim) {
  return static_cast<int64_t>(sizeof(acc_t<T>)) * dim *
         ((KIND != kBwdGr) + (KIND != kBwdLn) + kBwdSums<KIND> * kBwdRowWarps);
}

// One-pass backward in the style of Apex / TransformerEngine ln_bwd, specialised on PPL packs per
// lane (RowTiers). A CTA works on items of kBwdItemRows rows of one sample (persistent grid: items
// blockIdx.x, + gridDim.x, ...). Per item: the sample's (1 + scale) and gate rows go to shared
// memory; each warp takes rows warp, warp + 8, ... of the item: all loads of the row in one trip,
// the row statistics by warp shuffles, dx / dy from registers, and the per-sample column sums
// accumulated in the warp's own slice of shared memory (each lane owns its columns there: no
// sharing, no atomics). At the end of the item the 8 warps' sums are added in warp order and
// written as one fp32 partial per item to the workspace (N, items per sample, nq, D);
// mln_column_finalize_kernel adds the items in order. Fixed order everywhere, no atomics: bit-wise
// deterministic, on any GPU.
template <typename T, typename M, typename L, int VEC, int PPL, int KIND>
__global__ void __launch_bounds__(kBwdRowWarps* kWarpSize, kBwdTierMinBlocks<T, M, L, VEC, PPL, KIND>)
    mln_backward_tier_kernel(BwdArgs<T, M, L> a) {
  using acc = acc_t<T>;
  using PT = Pack<T, VEC>;
  using PL = Pack<L, VEC>;
  using PM = Pack<M, VEC>;
  using PA = Pack<acc, VEC>;
  constexpr bool kDh = KIND != kBwdGr;   // LN branch: dh, xn, mean, rstd, scale
  constexpr bool kRes = KIND != kBwdLn;  // gated residual: dxn, y, gate
  constexpr int kNq = kBwdSums<KIND>;
  constexpr int kFull = full_packs<VEC, PPL>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int dim = a.dim;
  acc* s_scale1 = reinterpret_cast<acc*>(smem_raw);  // (D,) 1 + scale[n]         [kDh]
  acc* s_gate = s_scale1 + (kDh ? dim : 0);           // (D,) gate[n]              [kRes]
  acc* s_sums = s_gate + (kRes ? dim : 0);            // (nq, 8 warps, D) column sums
  const L* __restrict__ dh = a.dh;
  const T* __restrict__ xn = a.xn;
  const T* __restrict__ dxn = a.dxn;
  const L* __restrict__ y = a.y;
  T* __restrict__ dx = a.dx;
  L* __restrict__ dy = a.dy;
  acc* __restrict__ ws = reinterpret_cast<acc*>(a.ws);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int nvec = dim / VEC;
  const acc inv_dim = acc(1) / static_cast<acc>(dim);
  const int64_t chunks = a.tiles;
  const int64_t items = a.samples * chunks;
  // This warp's column sums of quantity q, pack v.
  auto sums = [&](int q, int v) -> PA& {
    return *reinterpret_cast<PA*>(s_sums + (static_cast<int64_t>(q) * kBwdRowWarps + warp) * dim + v * VEC);
  };

  // The sample's (1 + scale) and gate packs a thread stages into shared memory for an item: fetched
  // into registers for the next item before the current item's column-sum reduction, so their
  // latency overlaps that phase instead of opening the next one.
  constexpr int kStage = (PPL * kWarpSize + kBwdRowWarps * kWarpSize - 1) / (kBwdRowWarps * kWarpSize);
  PM sc_next[kStage], gt_next[kStage];
  auto fetch = [&](int64_t it) {
    const int64_t n = it / chunks;
#pragma unroll
    for (int k = 0; k < kStage; ++k) {
      const int v = threadIdx.x + k * kBwdRowWarps * kWarpSize;
      if (v < nvec) {
        const int64_t c = static_cast<int64_t>(v) * VEC;
        if constexpr (kDh) sc_next[k] = load_pack<M, VEC>(a.scale + n * a.scale_stride + c);
        if constexpr (kRes) gt_next[k] = load_pack<M, VEC>(a.gate + n * a.gate_stride + c);
      }
    }
  };
  if (blockIdx.x < items) fetch(blockIdx.x);

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t n = item / chunks;
    const int64_t t_begin = (item % chunks) * kBwdItemRows;
    const int64_t t_end = t_begin + kBwdItemRows < a.tokens ? t_begin + kBwdItemRows : a.tokens;
    __syncthreads();  // the previous item is done with shared memory
#pragma unroll
    for (int k = 0; k < kStage; ++k) {
      const int v = threadIdx.x + k * kBwdRowWarps * kWarpSize;
      if (v < nvec) {
        const int64_t c = static_cast<int64_t>(v) * VEC;
        if constexpr (kDh) {
          PA s;
#pragma unroll
          for (int e = 0; e < VEC; ++e) s[e] = acc(1) + static_cast<acc>(sc_next[k][e]);
          *reinterpret_cast<PA*>(s_scale1 + c) = s;
        }
        if constexpr (kRes) {
          PA s;
#pragma unroll
          for (int e = 0; e < VEC; ++e) s[e] = static_cast<acc>(gt_next[k][e]);
          *reinterpret_cast<PA*>(s_gate + c) = s;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < PPL; ++i) {
      const int v = i * kWarpSize + lane;
      if (i < kFull || v < nvec) {
#pragma unroll
        for (int q = 0; q < kNq; ++q) sums(q, v) = PA{};
      }
    }
    __syncthreads();

    for (int64_t t = t_begin + warp; t < t_end; t += kBwdRowWarps) {
      const int64_t row = n * a.tokens + t;
      const int64_t base = row * dim;
      // every load of the row
      PL dhp[PPL], yp[PPL];
      PT xp[PPL], dxp[PPL];
      acc mu = 0, rs = 0;
      if constexpr (kDh) {
        mu = a.mean[row];
        rs = a.rstd[row];
      }
#pragma unroll
      for (int i = 0; i < PPL; ++i) {
        // Lanes past D re-read the row's last pack (same sector as their neighbour's, and unused):
        // an unconditional load joins the others in the row's single trip, a guarded one would not.
        const int v = i * kWarpSize + lane;
        const int64_t c = base + static_cast<int64_t>(i < kFull || v < nvec ? v : nvec - 1) * VEC;
        if constexpr (kDh) {
          dhp[i] = load_pack<L, VEC>(dh + c);
          xp[i] = load_pack<T, VEC>(xn + c);
        }
        if constexpr (kRes) {
          dxp[i] = load_pack<T, VEC>(dxn + c);
          yp[i] = load_pack<L, VEC>(y + c);
        }
      }
      // LN statistics of the row: mean(g), mean(g * xhat), g = dh * (1 + scale) (no stores in this
      // pass: the row's loads stay ahead of everything else)
      acc mg = 0, mgx = 0;
      if constexpr (kDh) {
        acc sg = 0, sgx = 0;
#pragma unroll
        for (int i = 0; i < PPL; ++i) {
          if (i < kFull || i * kWarpSize + lane < nvec) {
            const PA s1 = *reinterpret_cast<const PA*>(s_scale1 + (i * kWarpSize + lane) * VEC);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const acc xhat = (static_cast<acc>(xp[i][e]) - mu) * rs;
              const acc g = static_cast<acc>(dhp[i][e]) * s1[e];
              sg += g;
              sgx += g * xhat;
            }
          }
        }
        mg = warp_reduce_sum(sg) * inv_dim;
        mgx = warp_reduce_sum(sgx) * inv_dim;
      }
      // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dxn;  dy = gate * dx;
      // column sums of dh, dh * xhat and dx * y
#pragma unroll
      for (int i = 0; i < PPL; ++i) {
        const int v = i * kWarpSize + lane;
        if (i < kFull || v < nvec) {
          const int64_t c = base + static_cast<int64_t>(v) * VEC;
          acc tot[VEC];
          if constexpr (kDh) {
            const PA s1 = *reinterpret_cast<const PA*>(s_scale1 + v * VEC);
            PA& c_sh = sums(0, v);
            PA& c_sc = sums(1, v);
            PA sh = c_sh, sc = c_sc;
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const acc d = static_cast<acc>(dhp[i][e]);
              const acc xhat = (static_cast<acc>(xp[i][e]) - mu) * rs;
              tot[e] = rs * (d * s1[e] - mg - xhat * mgx);
              sh[e] += d;
              sc[e] += d * xhat;
            }
            c_sh = sh;
            c_sc = sc;
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) tot[e] = acc(0);
          }
          if constexpr (kRes) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) tot[e] += static_cast<acc>(dxp[i][e]);
          }
          if constexpr (KIND != kBwdGr) {
            PT w;
#pragma unroll
            for (int e = 0; e < VEC; ++e) w[e] = static_cast<T>(tot[e]);
            store_pack<T, VEC>(dx + c, w);
          }
          if constexpr (kRes) {
            const PA gt = *reinterpret_cast<const PA*>(s_gate + v * VEC);
            PL w;
#pragma unroll
            for (int e = 0; e < VEC; ++e) w[e] = static_cast<L>(gt[e] * tot[e]);
            store_pack<L, VEC>(dy + c, w);
            if constexpr (KIND == kBwdFused) {
              PA& c_g = sums(kNq - 1, v);
              PA cg = c_g;
#pragma unroll
              for (int e = 0; e < VEC; ++e) cg[e] += tot[e] * static_cast<acc>(yp[i][e]);
              c_g = cg;
            }
          }
        }
      }
      if constexpr (KIND == kBwdGr) {
        // dx = dxn: the column sums of dxn * y, after the row's loads and stores (its shared-memory
        // updates in the loop above would hold back the last pack's loads)
#pragma unroll
        for (int i = 0; i < PPL; ++i) {
          const int v = i * kWarpSize + lane;
          if (i < kFull || v < nvec) {
            PA& c_g = sums(0, v);
            PA cg = c_g;
#pragma unroll
            for (int e = 0; e < VEC; ++e) cg[e] += static_cast<acc>(dxp[i][e]) * static_cast<acc>(yp[i][e]);
            c_g = cg;
          }
        }
      }
    }

    if (item + gridDim.x < items) fetch(item + gridDim.x);
    // The item's column sums: the 8 warps' slices added in warp order, one fp32 partial per item.
    __syncthreads();
    acc* out = ws + item * kNq * dim;
#pragma unroll
    for (int q = 0; q < kNq; ++q) {
      for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
        const acc* col = s_sums + static_cast<int64_t>(q) * kBwdRowWarps * dim + v * VEC;
        PA total = *reinterpret_cast<const PA*>(col);
#pragma unroll
        for (int w = 1; w < kBwdRowWarps; ++w) {
          const PA p = *reinterpret_cast<const PA*>(col + w * dim);
#pragma unroll
          for (int e = 0; e < VEC; ++e) total[e] += p[e];
        }
        store_pack<acc, VEC>(out + q * dim + static_cast<int64_t>(v) * VEC, total);
      }
    }
  }
}

// out_q[n, d] = sum over tiles (in order) of ws[n, tile, q, d], cast to M; CV columns per thread
// (16-byte loads of the fp32 partials when D % CV == 0, else CV = 1).
template <typename acc, typename M, int CV>
__global__ void mln_column_finalize_kernel(const acc* __restrict__ ws, M* __restrict__ out0, M* __restrict__ out1,
                                           M* __restrict__ out2, int64_t samples, int tiles, int nq, int dim) {
  const int dv = dim / CV;
  const int64_t total = samples * nq * dv;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = (i % dv) * CV;
    const int64_t rest = i / dv;
    const int q = static_cast<int>(rest % nq);
    const int64_t n = rest / nq;
    Pack<acc, CV> s;
#pragma unroll
    for (int e = 0; e < CV; ++e) s[e] = acc(0);
    for (int t = 0; t < tiles; ++t) {
      const Pack<acc, CV> p = load_pack<acc, CV>(ws + ((n * tiles + t) * nq + q) * dim + d);
#pragma unroll
      for (int e = 0; e < CV; ++e) s[e] += p[e];
    }
    Pack<M, CV> o;
#pragma unroll
    for (int e = 0; e < CV; ++e) o[e] = static_cast<M>(s[e]);
    store_pack<M, CV>((q == 0 ? out0 : (q == 1 ? out1 : out2)) + n * dim + d, o);
  }
}

// Adds the per-tile (per-item) partial column sums in order: outs[q][n, d] (M).
template <typename T, typename M>
void launch_column_finalize(const void* ws, std::array<M*, 3> outs, int64_t samples, int tiles, int nq, int dim) {
  using acc = acc_t<T>;
  constexpr int CV = 16 / static_cast<int>(sizeof(acc));  // the outputs are fresh, contiguous allocations
  auto stream = at::cuda::getCurrentCUDAStream();
  auto run = [&](auto cv) {
    constexpr int C = decltype(cv)::value;
    const int64_t total = samples * nq * (dim / C);
    const int64_t blocks = std::min<int64_t>(ceil_div(total, 256), static_cast<int64_t>(sm_count()) * 32);
    mln_column_finalize_kernel<acc, M, C><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        reinterpret_cast<const acc*>(ws), outs[0], outs[1], outs[2], samples, tiles, nq, dim);
  };
  if (dim % CV == 0) {
    run(std::integral_constant<int, CV>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The tier backward of kind KIND when the arguments are that kind, the tensors allow 16-byte packs
// and D is in a tier; false otherwise (the caller runs the generic kernel).
template <int KIND, typename T, typename M, typename L>
bool launch_mln_backward_tier(BwdArgs<T, M, L> a, int64_t samples, std::array<M*, 3> outs, const at::Tensor& like,
                              bool vec) {
  using acc = acc_t<T>;
  constexpr int V = kVec16<T>;
  const bool kind_ok = KIND == kBwdLn    ? (a.dh && !a.dxn && !a.gate && a.dx)
                       : KIND == kBwdGr  ? (!a.dh && a.dxn && a.gate && !a.dx)
                                         : (a.dh && a.dxn && a.gate && a.dx);
  if (!vec || !kind_ok || std::is_same_v<acc, double>) return false;
  const int64_t smem = bwd_tier_smem<T, KIND>(a.dim);
  const auto* props = at::cuda::getCurrentDeviceProperties();
  if (smem > static_cast<int64_t>(props->sharedMemPerBlockOptin)) return false;
  return with_row_tier<V>(a.dim / V, [&](auto ppl) {
    constexpr int P = decltype(ppl)::value;
    auto kernel = mln_backward_tier_kernel<T, M, L, V, P, KIND>;
    const int64_t chunks = ceil_div(a.tokens, static_cast<int64_t>(kBwdItemRows));
    a.tiles = static_cast<int>(chunks);
    a.samples = samples;
    TORCH_CHECK(samples * chunks <= INT_MAX, "dit_kernels: too many rows for the backward (N = ", samples, ")");
    auto ws = at::empty({samples * chunks * a.nq * a.dim},
                        like.options().dtype(std::is_same_v<acc, double> ? at::kDouble : at::kFloat));
    a.ws = ws.data_ptr();
    if (smem > kDefaultSmem) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    // Persistent grid: the CTAs that fit on the GPU at once, as the driver computes them for the
    // compiled kernel (its registers, this shared memory, the device's shared memory per SM).
    const int64_t grid = std::min<int64_t>(
        samples * chunks, static_cast<int64_t>(sm_count()) *
                              resident_blocks(kernel, kBwdRowWarps * kWarpSize, static_cast<size_t>(smem)));
    auto stream = at::cuda::getCurrentCUDAStream();
    kernel<<<static_cast<unsigned>(grid), kBwdRowWarps * kWarpSize, static_cast<size_t>(smem), stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_column_finalize<T, M>(a.ws, outs, samples, a.tiles, a.nq, a.dim);
  });
}

template <int KIND, typename T, typename M, typename L>
void launch_mln_backward(BwdArgs<T, M, L> a, int64_t samples, std::array<M*, 3> outs, const at::Tensor& like) {
  using acc = acc_t<T>;
  constexpr int V = kVec16<T>;
  TORCH_INTERNAL_ASSERT(a.nq == 2 * (a.dh != nullptr) + (a.gate != nullptr));
  TORCH_INTERNAL_ASSERT(a.nq >= 1 && samples >= 1 && a.tokens >= 1 && a.dim >= 1);
  const bool vec = a.dim % V == 0 && pack_ok<L, V>(a.dh, a.dim) && pack_ok<T, V>(a.dxn, a.dim) &&
                   pack_ok<T, V>(a.xn, a.dim) && pack_ok<L, V>(a.y, a.dim) && pack_ok<T, V>(a.dx, a.dim) &&
                   pack_ok<L, V>(a.dy, a.dim) && pack_ok<M, V>(a.scale, a.scale_stride) &&
                   pack_ok<M, V>(a.gate, a.gate_stride);
  if (launch_mln_backward_tier<KIND>(a, samples, outs, like, vec)) return;
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
  launch_column_finalize<T, M>(a.ws, outs, samples, a.tiles, a.nq, a.dim);
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
