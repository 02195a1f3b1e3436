// CUDA-on-CPU emulation of the dit_kernels CUDA sources (tests only; see tests/cuda_emu/build.py).
//
// The .cu files are compiled as host C++ against this header and the fake CUDA/ATen-CUDA headers
// beside it. Every CUDA thread of a block is a cooperative fiber; __syncthreads and warp shuffles
// are barriers at which the scheduler switches fibers, so code that depends on an ordering the
// hardware does not guarantee (a missing barrier, a shuffle with exited lanes, a diverged
// __syncthreads) gives order-dependent results or a reported error instead of passing silently.
// Not emulated: timing, caches, memory-model subtleties beyond barriers, fast-math precision.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#ifndef DIT_CUDA_EMULATION
#define DIT_CUDA_EMULATION 1
#endif

// ---- vector types -----------------------------------------------------------------------------
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

// The executing fiber's indices (set by the scheduler before it resumes a fiber).
extern dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

// ---- runtime API types ------------------------------------------------------------------------
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaDeviceProp {
  int multiProcessorCount;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
  size_t reservedSharedMemPerBlock;
  int maxThreadsPerBlock;
  int maxThreadsPerMultiProcessor;
  int warpSize;
  int major, minor;
  char name[256];
};
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

namespace dit_emu {
// Scheduler entry points (emu_runtime.cpp).
void run_grid(void* kernel_id, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);
void syncthreads();
void shfl_xor(unsigned int mask, const void* in, void* out, size_t bytes, int lane_mask, int width);
void* dynamic_smem();
void poison_shared(void* p, size_t bytes);  // fill a __shared__ array with 0xFF once per block
void set_max_dynamic_smem(void* kernel_id, int bytes);
[[noreturn]] void device_assert(const char* cond, const char* msg, const char* file, int line);
cudaDeviceProp* device_properties();

bool in_kernel();
void misaligned_access(const void* p, size_t alignment, const char* type);

// reinterpret_cast<To>(p) is rewritten to checked_cast<To>(p): inside a kernel, a pointer cast to a
// type whose alignment the address does not meet is the hardware's "misaligned address" fault
// (a vector load or store through it); the host CPU would tolerate it silently.
template <typename To, typename From>
inline To checked_cast(From p) {
  if constexpr (std::is_pointer_v<To> && std::is_pointer_v<From>) {
    using Pointee = std::remove_cv_t<std::remove_pointer_t<To>>;
    if constexpr (!std::is_void_v<Pointee> && !std::is_function_v<Pointee>) {
      if (in_kernel() && reinterpret_cast<uintptr_t>(p) % alignof(Pointee) != 0)
        misaligned_access(reinterpret_cast<const void*>(p), alignof(Pointee), __PRETTY_FUNCTION__);
    }
  }
  return reinterpret_cast<To>(p);
}

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten to launch(kernel, grid, block, smem, stream)(args...).
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // Arguments are converted once to the parameter types, like a CUDA launch, and copied to each thread.
    const std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
    auto k = kernel;
    run_grid(reinterpret_cast<void*>(k), grid, block, smem, [&]() { std::apply(k, args); });
  }
};
template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launch<P...>{kernel, grid, block, smem};
}
}  // namespace dit_emu

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize)
    dit_emu::set_max_dynamic_smem(reinterpret_cast<void*>(kernel), value);
  return cudaSuccess;
}

// Resident CTAs per SM: the emulator knows no registers, so shared memory alone limits it (at most 2,
// so that persistent grids stay small and their loops iterate).
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F* kernel, int threads,
                                                                 size_t dynamic_smem) {
  (void)kernel;
  const cudaDeviceProp* p = dit_emu::device_properties();
  if (threads < 1 || threads > p->maxThreadsPerBlock) {
    *blocks = 0;
    return cudaErrorInvalidValue;
  }
  const size_t per_cta = dynamic_smem + p->reservedSharedMemPerBlock;
  const size_t by_smem = p->sharedMemPerMultiprocessor / per_cta;
  *blocks = static_cast<int>(by_smem < 2 ? by_smem : 2);
  return cudaSuccess;
}

// CUDA_KERNEL_ASSERT[_MSG] (renamed by build.py): the failing thread stops, the launch raises
// "device-side assert triggered" (the real one kills the CUDA context at the next synchronisation).
#define DIT_EMU_KERNEL_ASSERT(cond) \
  do {                               \
    if (!(cond)) ::dit_emu::device_assert(#cond, "", __FILE__, __LINE__); \
  } while (0)
#define DIT_EMU_KERNEL_ASSERT_MSG(cond, msg) \
  do {                                        \
    if (!(cond)) ::dit_emu::device_assert(#cond, msg, __FILE__, __LINE__); \
  } while (0)

// ---- device intrinsics ------------------------------------------------------------------------
inline void __syncthreads() { dit_emu::syncthreads(); }
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
  T r;
  dit_emu::shfl_xor(mask, &v, &r, sizeof(T), lane_mask, width);
  return r;
}
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<uint64_t>(a) * b) >> 32);
}
inline float __uint2float_rn(unsigned int a) { return static_cast<float>(a); }
inline float __int2float_rn(int a) { return static_cast<float>(a); }
// Built with -ffp-contract=off, so these are the single rounded IEEE operations they name.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
inline void sincospif(float x, float* s, float* c) {
  const double a = 3.14159265358979323846 * static_cast<double>(x);
  *s = static_cast<float>(std::sin(a));
  *c = static_cast<float>(std::cos(a));
}
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
