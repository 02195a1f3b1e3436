// CUDA kernels for the masked-token ops (MaskDiT / SD-DiT). Semantics as in
// csrc/cpu/tokens_kernel.cpp.
//
// Bytes floor (derived; H200 target >= 3000 GB/s; bf16, N=256, T=256, K=128, D=1152, row = 2304 B):
//   gather_tokens            read N*K rows + write N*K rows                      = 151.0 MB -> 50 us @ 3 TB/s
//   _gather_tokens_backward  read N*K rows + write N*T rows                      = 226.5 MB -> 76 us
//   scatter_tokens (D,)      read N*K kept rows + write N*T rows                  = 226.5 MB -> 76 us
//   scatter_tokens (N,T,D)   + read N*(T-K) fill rows                             = 302.0 MB -> 101 us
//   _scatter_tokens_backward (D,) read N*T grad rows + write N*K dkept rows       = 226.5 MB -> 76 us
//                           (N,T,D) + write N*T dfill rows                        = 377.5 MB -> 126 us
//   fwd+bwd: gather 377.5 MB (126 us), scatter (D,) 453.0 MB (151 us).
//   Index traffic (ids N*K int64 = 256 KB, inverse map N*T int32 = 256 KB written + read, fp32 d_fill
//   partials ceil(N*T/128)*D*4 = 2.4 MB written + read) is < 2% of the row traffic.
//
// Design:
// * Rows are copied whole by one warp per output row with 16-byte vectors (V = 16 / sizeof(scalar_t))
//   when D*elem % 16 == 0 and every base pointer/row stride is aligned, scalar otherwise (odd D),
//   4 vectors in flight per lane. No (N, K, D) int64 index tensor (the reference's torch.gather needs one).
// * Ops writing (N, T, D) first build an (N, T) int32 inverse map (kept slot or -1; one CTA per sample),
//   then write every output row exactly once: plain stores, no atomics, deterministic.
// * Broadcast d_fill = sum over removed rows: each CTA reduces a fixed tile of 128 rows x 32 vectors in
//   fp32 (fp64 for double) into a partials buffer, a second kernel sums the tiles in a fixed order.
//   The tile CTA builds its rows' slice of the inverse map in shared memory from ids (no separate
//   inverse-map launch): scatter fwd+bwd is 4 launches (inverse map + merge, partials + final sum).
//   The partition depends only on (N, T, D), so results are bitwise reproducible on any GPU.
//   The same pass copies the kept rows of grad to d_kept, so grad is read exactly once.
// * Bad ids never cause a host sync: an id outside [0, T) trips CUDA_KERNEL_ASSERT (as torch.gather
//   does); were device asserts compiled out, the bad id is skipped (gather writes a zero row, scatter
//   leaves that position to fill). Repeated ids are not detected here (which one wins is unspecified);
//   the Python wrapper checks them with DIT_KERNELS_DEBUG=1.
// * Launches go to the current stream under a device guard; no host-side tensor creation beyond
//   caching-allocator workspaces, so the ops are CUDA-graph capturable.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <type_traits>

#include "../common.h"

// Defined by every torch we support (2.11+); kept as a fallback so an older or stripped header set
// still compiles (the bare assert keeps the device-side range check).
#ifndef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif

// Input checks shared with the CPU host functions (defined in csrc/cpu/tokens_kernel.cpp).
namespace dit_kernels_tokens {
void check_gather(const at::Tensor& x, const at::Tensor& ids);
void check_gather_backward(const at::Tensor& grad, const at::Tensor& ids, int64_t length);
bool check_scatter(const at::Tensor& kept, const at::Tensor& ids, const at::Tensor& fill, int64_t length);
void check_scatter_backward(const at::Tensor& grad, const at::Tensor& ids, at::ScalarType fill_dtype);
at::Tensor inner_contiguous(const at::Tensor& t);
}  // namespace dit_kernels_tokens

namespace {

using namespace dit_kernels_tokens;

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // warps per CTA in the row kernels, one output row each
constexpr int kUnroll = 4;        // vectors in flight per lane (d_fill partials)
constexpr int kRowVecs = 8;       // vectors in flight per lane in copy_row (rows up to 256 vectors)
constexpr int kTileRows = 128;    // rows per d_fill partial (fixed: determinism across devices)
constexpr int kTileWarps = 8;

// ---- vector helpers ------------------------------------------------------------------------------

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename To, typename From, int V>
__device__ __forceinline__ Vec<To, V> convert(const Vec<From, V>& a) {
  if constexpr (std::is_same_v<To, From>) {
    return a;
  } else {
    using mid = std::conditional_t<std::is_same_v<To, double> || std::is_same_v<From, double>, double, float>;
    Vec<To, V> r;
#pragma unroll
    for (int e = 0; e < V; ++e) r.v[e] = static_cast<To>(static_cast<mid>(a.v[e]));
    return r;
  }
}

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> zero_vec() {
  Vec<T, V> r;
#pragma unroll
  for (int e = 0; e < V; ++e) r.v[e] = static_cast<T>(0);
  return r;
}

// One warp copies a row of Dv vectors (with dtype conversion when To != From): kRowVecs vectors per
// lane loaded before any is stored (a 1152-wide bf16 row, 144 vectors, is one batch: one memory
// trip). Lanes past the row re-read its last vector instead of skipping the load: unconditional
// loads are issued together, guarded ones one trip each.
template <int V, typename To, typename From>
__device__ __forceinline__ void copy_row(To* __restrict__ dst, const From* __restrict__ src, int64_t Dv, int lane) {
  for (int64_t c0 = lane; c0 < Dv; c0 += kWarp * kRowVecs) {
    Vec<From, V> v[kRowVecs];
#pragma unroll
    for (int u = 0; u < kRowVecs; ++u) {
      const int64_t c = c0 + u * kWarp;
      v[u] = load_vec<From, V>(src + (c < Dv ? c : Dv - 1) * V);
    }
#pragma unroll
    for (int u = 0; u < kRowVecs; ++u) {
      const int64_t c = c0 + u * kWarp;
      if (c < Dv) store_vec<To, V>(dst + c * V, convert<To, From, V>(v[u]));
    }
  }
}

template <int V, typename T>
__device__ __forceinline__ void zero_row(T* __restrict__ dst, int64_t Dv, int lane) {
  const Vec<T, V> z = zero_vec<T, V>();
  for (int64_t c = lane; c < Dv; c += kWarp) store_vec<T, V>(dst + c * V, z);
}

// ---- kernels -------------------------------------------------------------------------------------

// inv[n, t] = k if ids[n, k] == t else -1. One CTA per sample; the block barrier orders the -1 fill
// before the slot writes (both in global memory, visible within the block).
__global__ void inverse_map_kernel(const int64_t* __restrict__ ids, int32_t* __restrict__ inv, int64_t T,
                                   int64_t K) {
  const int64_t n = blockIdx.x;
  int32_t* row = inv + n * T;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) row[t] = -1;
  __syncthreads();
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t t = ids[n * K + k];
    const bool ok = t >= 0 && t < T;
    CUDA_KERNEL_ASSERT_MSG(ok, "dit_kernels tokens: ids_keep value out of range [0, T)");
    if (ok) row[t] = static_cast<int32_t>(k);
  }
}

// out[n, k] = x[n, ids[n, k]]; one warp per output row (n, k); out is contiguous (N, K, D).
template <typename T, int V>
__global__ void gather_rows_kernel(const T* __restrict__ x, int64_t xN, int64_t xT, const int64_t* __restrict__ ids,
                                   T* __restrict__ out, int64_t rows, int64_t K, int64_t Tlen, int64_t Dv) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= rows) return;
  const int64_t n = r / K;
  const int64_t t = ids[r];
  const bool ok = t >= 0 && t < Tlen;
  CUDA_KERNEL_ASSERT_MSG(ok, "dit_kernels gather_tokens: ids_keep value out of range [0, T)");
  T* dst = out + r * Dv * V;
  if (ok) {
    copy_row<V>(dst, x + n * xN + t * xT, Dv, lane);
  } else {
    zero_row<V>(dst, Dv, lane);
  }
}

// out[n, t] = src[n, inv[n, t]] if kept, else fill[n, t] (HAS_FILL; strides 0 for the broadcast
// token) or 0. One warp per output row; out is contiguous (N, T, D).
template <typename T, typename fill_t, int V, bool HAS_FILL>
__global__ void merge_rows_kernel(const T* __restrict__ src, int64_t sN, int64_t sK, const fill_t* __restrict__ fill,
                                  int64_t fN, int64_t fT, const int32_t* __restrict__ inv, T* __restrict__ out,
                                  int64_t rows, int64_t Tlen, int64_t Dv) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= rows) return;
  const int64_t n = r / Tlen, t = r - n * Tlen;
  const int32_t slot = inv[r];
  T* dst = out + r * Dv * V;
  if (slot >= 0) {
    copy_row<V>(dst, src + n * sN + slot * sK, Dv, lane);
  } else if constexpr (HAS_FILL) {
    copy_row<V>(dst, fill + n * fN + t * fT, Dv, lane);
  } else {
    zero_row<V>(dst, Dv, lane);
  }
}

// Per-token fill backward: kept rows of grad -> dkept[n, slot] (and 0 to dfill), removed rows -> dfill.
template <typename T, typename fill_t, int V>
__global__ void scatter_bwd_token_kernel(const T* __restrict__ grad, int64_t gN, int64_t gT,
                                         const int32_t* __restrict__ inv, T* __restrict__ dkept,
                                         fill_t* __restrict__ dfill, int64_t rows, int64_t Tlen, int64_t K,
                                         int64_t Dv) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= rows) return;
  const int64_t n = r / Tlen, t = r - n * Tlen;
  const int32_t slot = inv[r];
  const T* g = grad + n * gN + t * gT;
  fill_t* df = dfill + r * Dv * V;
  if (slot >= 0) {
    copy_row<V>(dkept + (n * K + slot) * Dv * V, g, Dv, lane);
    zero_row<V>(df, Dv, lane);
  } else {
    copy_row<V>(df, g, Dv, lane);
  }
}

// Broadcast fill backward, pass 1. CTA (blockIdx.x = row tile of kTileRows rows, blockIdx.y = column tile
// of 32 vectors); warp w visits rows w, w + 8, ... of the tile in order; lane = vector column.
// Kept rows are copied to dkept, removed rows accumulated; the 8 warp sums are added in warp order.
// The tile's slice of the inverse map is built in shared memory from ids (the K ids of the one or
// few samples the tile's rows belong to; L2 hits), so the backward needs no inverse-map launch.
template <typename T, int V>
__global__ void scatter_bwd_fill_partial_kernel(const T* __restrict__ grad, int64_t gN, int64_t gT,
                                                const int64_t* __restrict__ ids, T* __restrict__ dkept,
                                                acc_t<T>* __restrict__ partial, int64_t rows, int64_t Tlen,
                                                int64_t K, int64_t Dv) {
  using acc = acc_t<T>;
  __shared__ acc smem[kTileWarps][kWarp * V];
  __shared__ int32_t inv[kTileRows];  // slot of row r0 + i, -1: removed
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kWarp + lane;
  const bool col_ok = c < Dv;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t r_end = r0 + kTileRows < rows ? r0 + kTileRows : rows;
  for (int i = threadIdx.x; i < kTileRows; i += blockDim.x) inv[i] = -1;
  __syncthreads();
  for (int64_t n = r0 / Tlen; n * Tlen < r_end; ++n) {
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const int64_t t = ids[n * K + k];
      const bool ok = t >= 0 && t < Tlen;
      CUDA_KERNEL_ASSERT_MSG(ok, "dit_kernels tokens: ids_keep value out of range [0, T)");
      const int64_t r = n * Tlen + t;
      if (ok && r >= r0 && r < r_end) inv[r - r0] = static_cast<int32_t>(k);
    }
  }
  __syncthreads();
  acc sum[V];
#pragma unroll
  for (int e = 0; e < V; ++e) sum[e] = acc(0);
  constexpr int kSteps = kTileRows / kTileWarps;  // rows per warp
  for (int s0 = 0; s0 < kSteps; s0 += kUnroll) {
    Vec<T, V> v[kUnroll];
    int32_t slot[kUnroll];
    int64_t rr[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      // Rows past the tensor and columns past D load the last row / column instead (unused):
      // unconditional loads are issued together, one memory trip for the kUnroll rows.
      // 32-bit division (rows < 2^31, checked on the host): a 64-bit one is a call, and a call waits
      // for the loads already issued.
      rr[u] = r0 + warp + static_cast<int64_t>(s0 + u) * kTileWarps;
      const int32_t r = static_cast<int32_t>(rr[u] < rows ? rr[u] : rows - 1);
      const int32_t n = r / static_cast<int32_t>(Tlen), t = r - n * static_cast<int32_t>(Tlen);
      slot[u] = rr[u] < rows ? inv[rr[u] - r0] : -2;  // -2: row outside the tensor
      v[u] = load_vec<T, V>(grad + n * gN + t * gT + (col_ok ? c : Dv - 1) * V);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (slot[u] == -2 || !col_ok) continue;
      if (slot[u] >= 0) {
        const int64_t n = static_cast<int32_t>(rr[u]) / static_cast<int32_t>(Tlen);
        store_vec<T, V>(dkept + ((n * K + slot[u]) * Dv + c) * V, v[u]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) sum[e] += static_cast<acc>(v[u].v[e]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < V; ++e) smem[warp][lane * V + e] = sum[e];
  __syncthreads();
  if (warp == 0 && col_ok) {
    acc* out = partial + static_cast<int64_t>(blockIdx.x) * Dv * V + c * V;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      acc s = acc(0);
#pragma unroll
      for (int w = 0; w < kTileWarps; ++w) s += smem[w][lane * V + e];
      out[e] = s;
    }
  }
}

// Broadcast fill backward, pass 2: dfill[d] = sum over tiles of partial[tile, d], fixed order (warp w
// sums tiles w, w + 8, ...; the 8 warp sums are added in warp order).
template <typename acc, typename fill_t>
__global__ void scatter_bwd_fill_final_kernel(const acc* __restrict__ partial, fill_t* __restrict__ dfill,
                                              int64_t tiles, int64_t D) {
  __shared__ acc smem[kTileWarps][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kWarp + lane;
  acc s = acc(0);
  if (d < D) {
    for (int64_t tile = warp; tile < tiles; tile += kTileWarps) s += partial[tile * D + d];
  }
  smem[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && d < D) {
    acc total = acc(0);
#pragma unroll
    for (int w = 0; w < kTileWarps; ++w) total += smem[w][lane];
    dfill[d] = static_cast<fill_t>(total);
  }
}

// ---- host helpers --------------------------------------------------------------------------------

// Dispatch (activation scalar_t) x (fill_t in {scalar_t, float}).
#define DIT_TOKENS_DISPATCH(act_type, fill_type, NAME, ...)                        \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, act_type, NAME, [&] { \
    if ((fill_type) == (act_type)) {                                              \
      using fill_t = scalar_t;                                                    \
      __VA_ARGS__();                                                              \
    } else {                                                                      \
      using fill_t = float;                                                       \
      __VA_ARGS__();                                                              \
    }                                                                             \
  })

// True when rows of `t` (3-D, or 1-D) can be read as Vec<T, V>: aligned base, strides multiples of V.
bool vec_ok(const at::Tensor& t, int64_t V) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % (t.element_size() * V) != 0) return false;
  if (t.size(-1) % V != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    if (t.size(i) > 1 && t.stride(i) % V != 0) return false;
  }
  return true;
}

template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

dim3 row_grid(int64_t rows) {
  return dim3(static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock));
}

at::Tensor build_inverse_map(const at::Tensor& ids, int64_t N, int64_t T, cudaStream_t stream) {
  TORCH_CHECK(T <= INT32_MAX && ids.size(1) <= INT32_MAX, "tokens: T and K must fit in int32");
  auto inv = at::empty({N, T}, ids.options().dtype(at::kInt));
  const int threads = T >= 256 ? 256 : 128;
  inverse_map_kernel<<<static_cast<unsigned int>(N), threads, 0, stream>>>(ids.data_ptr<int64_t>(),
                                                                          inv.data_ptr<int32_t>(), T, ids.size(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return inv;
}

}  // namespace

at::Tensor gather_tokens_cuda(const at::Tensor& x_in, const at::Tensor& ids_in) {
  check_gather(x_in, ids_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = inner_contiguous(x_in);
  const auto ids = ids_in.contiguous();
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2), K = ids.size(1);
  auto out = at::empty({N, K, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t rows = N * K;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_tokens_cuda", [&] {
    constexpr int V = vec_width<scalar_t>();
    auto launch = [&](auto vw) {
      constexpr int W = decltype(vw)::value;
      gather_rows_kernel<scalar_t, W><<<row_grid(rows), kRowsPerBlock * kWarp, 0, stream>>>(
          x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), ids.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), rows,
          K, T, D / W);
    };
    if (vec_ok(x, V)) {
      launch(std::integral_constant<int, V>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gather_tokens_backward_cuda(const at::Tensor& grad_in, const at::Tensor& ids_in, int64_t length) {
  check_gather_backward(grad_in, ids_in, length);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto grad = inner_contiguous(grad_in);
  const auto ids = ids_in.contiguous();
  const int64_t N = grad.size(0), D = grad.size(2), T = length;
  auto dx = at::empty({N, T, D}, grad.options().memory_format(at::MemoryFormat::Contiguous));
  if (dx.numel() == 0) return dx;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto inv = build_inverse_map(ids, N, T, stream);
  const int64_t rows = N * T;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gather_tokens_backward_cuda", [&] {
    constexpr int V = vec_width<scalar_t>();
    auto launch = [&](auto vw) {
      constexpr int W = decltype(vw)::value;
      merge_rows_kernel<scalar_t, scalar_t, W, false><<<row_grid(rows), kRowsPerBlock * kWarp, 0, stream>>>(
          grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), nullptr, 0, 0, inv.data_ptr<int32_t>(),
          dx.data_ptr<scalar_t>(), rows, T, D / W);
    };
    if (vec_ok(grad, V)) {
      launch(std::integral_constant<int, V>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

at::Tensor scatter_tokens_cuda(const at::Tensor& kept_in, const at::Tensor& ids_in, const at::Tensor& fill_in,
                               int64_t length) {
  const bool per_token = check_scatter(kept_in, ids_in, fill_in, length);
  const c10::cuda::CUDAGuard guard(kept_in.device());
  const auto kept = inner_contiguous(kept_in);
  const auto ids = ids_in.contiguous();
  const auto fill = per_token ? inner_contiguous(fill_in) : fill_in.contiguous();
  const int64_t N = kept.size(0), D = kept.size(2), T = length;
  auto out = at::empty({N, T, D}, kept.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto inv = build_inverse_map(ids, N, T, stream);
  const int64_t rows = N * T;
  // The broadcast token is read with (N, T) strides 0: one kernel for both forms.
  const int64_t fN = per_token ? fill.stride(0) : 0, fT = per_token ? fill.stride(1) : 0;
  DIT_TOKENS_DISPATCH(kept.scalar_type(), fill.scalar_type(), "scatter_tokens_cuda", [&] {
    constexpr int V = vec_width<scalar_t>();
    auto launch = [&](auto vw) {
      constexpr int W = decltype(vw)::value;
      merge_rows_kernel<scalar_t, fill_t, W, true><<<row_grid(rows), kRowsPerBlock * kWarp, 0, stream>>>(
          kept.data_ptr<scalar_t>(), kept.stride(0), kept.stride(1), fill.data_ptr<fill_t>(), fN, fT,
          inv.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), rows, T, D / W);
    };
    if (vec_ok(kept, V) && vec_ok(fill, V)) {
      launch(std::integral_constant<int, V>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> scatter_tokens_backward_cuda(const at::Tensor& grad_in, const at::Tensor& ids_in,
                                                                bool fill_per_token, at::ScalarType fill_dtype) {
  check_scatter_backward(grad_in, ids_in, fill_dtype);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const auto grad = inner_contiguous(grad_in);
  const auto ids = ids_in.contiguous();
  const int64_t N = grad.size(0), T = grad.size(1), D = grad.size(2), K = ids.size(1);
  const auto opts = grad.options().memory_format(at::MemoryFormat::Contiguous);
  auto dkept = at::empty({N, K, D}, opts);
  if (N * T == 0 || D == 0) {
    auto dfill = fill_per_token ? at::empty({N, T, D}, opts.dtype(fill_dtype)) : at::zeros({D}, opts.dtype(fill_dtype));
    return {dkept, dfill};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = N * T;
  at::Tensor dfill;
  DIT_TOKENS_DISPATCH(grad.scalar_type(), fill_dtype, "scatter_tokens_backward_cuda", [&] {
    constexpr int V = vec_width<scalar_t>();
    const bool vec = vec_ok(grad, V);
    if (fill_per_token) {
      const auto inv = build_inverse_map(ids, N, T, stream);
      dfill = at::empty({N, T, D}, opts.dtype(fill_dtype));
      auto launch = [&](auto vw) {
        constexpr int W = decltype(vw)::value;
        scatter_bwd_token_kernel<scalar_t, fill_t, W><<<row_grid(rows), kRowsPerBlock * kWarp, 0, stream>>>(
            grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), inv.data_ptr<int32_t>(),
            dkept.data_ptr<scalar_t>(), dfill.data_ptr<fill_t>(), rows, T, K, D / W);
      };
      if (vec && vec_ok(dfill, V)) {
        launch(std::integral_constant<int, V>{});
      } else {
        launch(std::integral_constant<int, 1>{});
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    using acc = acc_t<scalar_t>;
    TORCH_CHECK(rows < INT32_MAX, "scatter_tokens backward: N * T = ", rows, " rows exceed the 32-bit row index");
    TORCH_CHECK(K <= INT32_MAX, "scatter_tokens backward: K = ", K, " must fit in int32");
    dfill = at::empty({D}, opts.dtype(fill_dtype));
    const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
    auto partial = at::empty({tiles, D}, opts.dtype(std::is_same_v<acc, double> ? at::kDouble : at::kFloat));
    auto launch = [&](auto vw) {
      constexpr int W = decltype(vw)::value;
      const int64_t Dv = D / W;
      const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>((Dv + kWarp - 1) / kWarp));
      scatter_bwd_fill_partial_kernel<scalar_t, W><<<grid, kTileWarps * kWarp, 0, stream>>>(
          grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), ids.data_ptr<int64_t>(),
          dkept.data_ptr<scalar_t>(), partial.data_ptr<acc>(), rows, T, K, Dv);
    };
    if (vec) {
      launch(std::integral_constant<int, V>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scatter_bwd_fill_final_kernel<acc, fill_t>
        <<<static_cast<unsigned int>((D + kWarp - 1) / kWarp), kTileWarps * kWarp, 0, stream>>>(
            partial.data_ptr<acc>(), dfill.data_ptr<fill_t>(), tiles, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dkept, dfill};
}

TORCH_LIBRARY_IMPL(dit_kernels, CUDA, m) {
  m.impl("gather_tokens", &gather_tokens_cuda);
  m.impl("_gather_tokens_backward", &gather_tokens_backward_cuda);
  m.impl("scatter_tokens", &scatter_tokens_cuda);
  m.impl("_scatter_tokens_backward", &scatter_tokens_backward_cuda);
}
