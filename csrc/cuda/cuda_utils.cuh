// Small device helpers shared by the dit_kernels CUDA kernels (stable API):
//   dit::Pack<T, N>            N elements of T, aligned for one (or a few) wide memory ops
//   dit::kVec16<T>             elements of T in 16 bytes (8 for bf16/fp16, 4 fp32, 2 fp64)
//   dit::load_pack<T, N>(p)    read-only (__ldg) vector load of N elements; p aligned to min(16, N*sizeof(T))
//   dit::store_pack<T, N>(p,v) vector store, same alignment rule
//   dit::is_aligned(p, bytes)  host/device pointer alignment test
//   dit::warp_reduce_sum(v)    butterfly sum over the 32 lanes; every lane gets the result (fixed order)
//   dit::block_reduce_sum(v, smem)  sum over a 1-D block (blockDim.x % 32 == 0, smem >= 32 elements);
//                              every thread gets the result; deterministic; contains __syncthreads
//   dit::ceil_div(a, b), dit::sm_count()
//   dit::resident_blocks(kernel, threads, smem)  CTAs of a compiled kernel one SM holds (driver's count)
//   DIT_CHECK_CUDA(t)          TORCH_CHECK that a tensor is on a CUDA device
// Everything here is header-only (templates / inline), so several .cu files can include it.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

// Host-side input check: `t` must live on a CUDA device.
#ifndef DIT_CHECK_CUDA
#define DIT_CHECK_CUDA(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor, got device ", (t).device())
#endif

namespace dit {

constexpr int kWarpSize = 32;

// Elements of T in one 16-byte (128-bit) vector.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

namespace detail {
// Alignment of a pack: its size up to 16 bytes (wider packs are moved as several 16-byte chunks).
template <typename T, int N>
constexpr int pack_align() {
  return static_cast<int>(sizeof(T)) * N >= 16 ? 16 : static_cast<int>(sizeof(T)) * N;
}
template <int BYTES>
struct RawWord;
template <>
struct RawWord<16> { using type = uint4; };
template <>
struct RawWord<8> { using type = uint2; };
template <>
struct RawWord<4> { using type = unsigned int; };
template <>
struct RawWord<2> { using type = unsigned short; };
}  // namespace detail

// N elements of T; aligned so that it is moved with min(16, N*sizeof(T))-byte instructions.
template <typename T, int N>
struct alignas(detail::pack_align<T, N>()) Pack {
  static_assert(N >= 1, "Pack needs at least one element");
  static_assert((sizeof(T) * N) % detail::pack_align<T, N>() == 0 &&
                    (detail::pack_align<T, N>() & (detail::pack_align<T, N>() - 1)) == 0,
                "Pack size must be a power of two bytes or a multiple of 16 bytes");
  T v[N];
  __host__ __device__ __forceinline__ T& operator[](int i) { return v[i]; }
  __host__ __device__ __forceinline__ const T& operator[](int i) const { return v[i]; }
};

// Read-only vector load through the non-coherent cache (__ldg). p must be aligned to
// min(16, N*sizeof(T)) bytes and the data must not be written during the kernel.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  constexpr int kAlign = detail::pack_align<T, N>();
  constexpr int kWords = static_cast<int>(sizeof(T)) * N / kAlign;
  using W = typename detail::RawWord<kAlign>::type;
  Pack<T, N> out;
  const W* src = reinterpret_cast<const W*>(p);
  W* dst = reinterpret_cast<W*>(&out);
#pragma unroll
  for (int k = 0; k < kWords; ++k) dst[k] = __ldg(src + k);
  return out;
}

// Vector store; same alignment rule as load_pack.
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  constexpr int kAlign = detail::pack_align<T, N>();
  constexpr int kWords = static_cast<int>(sizeof(T)) * N / kAlign;
  using W = typename detail::RawWord<kAlign>::type;
  W* dst = reinterpret_cast<W*>(p);
  const W* src = reinterpret_cast<const W*>(&v);
#pragma unroll
  for (int k = 0; k < kWords; ++k) dst[k] = src[k];
}

__host__ __device__ __forceinline__ bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Sum over the 32 lanes of a fully active warp; all lanes receive the same value.
template <typename T>
__device__ __forceinline__ T warp_reduce_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a 1-D block whose size is a multiple of 32. `shared` holds >= 32 elements of T.
// All threads must call it; all receive the result. Safe to call repeatedly with one buffer.
template <typename T>
__device__ __forceinline__ T block_reduce_sum(T v, T* shared) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  v = warp_reduce_sum(v);
  __syncthreads();  // the previous call's readers are done with `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T r = lane < num_warps ? shared[lane] : T(0);
  return warp_reduce_sum(r);
}

template <typename A, typename B>
__host__ __device__ __forceinline__ constexpr A ceil_div(A a, B b) {
  return (a + static_cast<A>(b) - 1) / static_cast<A>(b);
}

// Multiprocessors of the current device (host only).
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// CTAs of `kernel` one SM of the current device holds at `threads` threads and `smem` bytes of
// dynamic shared memory, as the driver computes it for the compiled kernel (its registers, its
// static shared memory, this device's shared memory per SM); at least 1. The persistent grids are
// sm_count() times this, so they follow the kernel ptxas produced and the card it runs on.
template <typename K>
inline int resident_blocks(K* kernel, int threads, size_t smem = 0) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  return blocks < 1 ? 1 : blocks;
}

}  // namespace dit
