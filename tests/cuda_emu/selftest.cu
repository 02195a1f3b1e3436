// Deliberately right and wrong kernels that show the emulation catches what it claims to
// (tests/test_cuda_emulation.py). Written as CUDA and rewritten by build.py like the real sources.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

namespace {

constexpr int kThreads = 256;

// Sum of threadIdx.x over the block through shared memory. Case 1 omits the barrier between the
// writes and the reads, so thread 0 sums whatever the other threads have (not) written yet.
__global__ void block_sum_kernel(int64_t* out, bool with_barrier) {
  __shared__ int64_t slots[kThreads];
  slots[threadIdx.x] = threadIdx.x;
  if (with_barrier) __syncthreads();
  if (threadIdx.x == 0) {
    int64_t s = 0;
    for (int i = 0; i < kThreads; ++i) s += slots[i];
    *out = s;
  }
}

// Case 2: half a warp leaves before a full-mask shuffle.
__global__ void shuffle_after_exit_kernel(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

// Case 3: half a warp waits at __syncthreads while the other half waits in a shuffle.
__global__ void diverged_barrier_kernel(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// Case 4: 64 KB of dynamic shared memory without cudaFuncSetAttribute.
__global__ void big_smem_kernel(float* out) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = dyn[threadIdx.x];
}

// Case 5: 40 KB static + 16 KB dynamic shared memory: over 48 KB together, without opt-in.
__global__ void static_plus_dynamic_smem_kernel(float* out) {
  __shared__ float fixed[10240];
  extern __shared__ float dyn[];
  fixed[threadIdx.x] = 1.f;
  dyn[threadIdx.x] = 2.f;
  __syncthreads();
  out[threadIdx.x] = fixed[threadIdx.x] + dyn[threadIdx.x];
}

// Case 6: a 16-byte vector load from an address that is only 4-byte aligned.
__global__ void misaligned_vector_load_kernel(const float* in, float* out) {
  const float4 v = *reinterpret_cast<const float4*>(in + 1);
  out[threadIdx.x] = v.x;
}

int64_t emu_selftest(int64_t which) {
  auto stream = at::cuda::getCurrentCUDAStream();
  auto result = at::zeros({1}, at::kLong);
  auto buf = at::zeros({kThreads}, at::kFloat);
  switch (which) {
    case 0:
    case 1:
      block_sum_kernel<<<1, kThreads, 0, stream>>>(result.data_ptr<int64_t>(), which == 0);
      return result.item<int64_t>();
    case 2:
      shuffle_after_exit_kernel<<<1, 32, 0, stream>>>(buf.data_ptr<float>());
      return 0;
    case 3:
      diverged_barrier_kernel<<<1, 64, 0, stream>>>(buf.data_ptr<float>());
      return 0;
    case 4:
      big_smem_kernel<<<1, kThreads, 64 * 1024, stream>>>(buf.data_ptr<float>());
      return 0;
    case 5:
      static_plus_dynamic_smem_kernel<<<1, kThreads, 16 * 1024, stream>>>(buf.data_ptr<float>());
      return 0;
    case 6:
      misaligned_vector_load_kernel<<<1, 32, 0, stream>>>(buf.data_ptr<float>(), buf.data_ptr<float>());
      return 0;
    default:
      TORCH_CHECK(false, "unknown self-test ", which);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dit_emu, m) { m.def("_emu_selftest(int which) -> int", &emu_selftest); }
