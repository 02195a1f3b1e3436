// CUDA kernels for the fused Euler-Maruyama step with classifier-free guidance and in-kernel
// Philox noise:
//   o      = out[b, c]                                   (no CFG, or c >= guided)
//          = out[B+b, c] + w * (out[b, c] - out[B+b, c]) (CFG, c < guided)
//   x_mean = coef_x * x + coef_out * o;   x_next = x_mean + noise_std * z
//
// Noise: Philox4x32-10 keyed by the generator seed. One call reserves an offset increment of 4
// (one 128-bit block per counter) under the generator's mutex with philox_cuda_state(4), which
// is also valid under CUDA-graph capture (the device unpacks seed/offset at run time, so each
// replay draws new noise). Element e (flat index of x) uses counter (offset / 4, e / 4) --
// the layout of curand's Philox state with subsequence e / 4 -- and lane e % 4; lanes (0, 1)
// and (2, 3) are Box-Muller pairs. The noise therefore does not depend on the launch
// configuration. Each thread handles one group of 4 elements (one Philox call).
//
// Arithmetic uses explicit round-to-nearest mul/add (no FMA contraction) in the reference's
// operation order, so with explicit noise the result equals the eager PyTorch reference
// bit for bit. The table variant reads [coef_x, coef_out, noise_std] = coeffs[*step] on the
// device; a step outside the table yields NaN outputs (no host sync, no device assert).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <mutex>

#include "../sde_step.h"
#include "cuda_utils.cuh"

namespace {

using dit_sde::StepGeometry;

constexpr int kThreads = 256;
constexpr uint64_t kPhiloxIncrement = 4;  // offset units (32-bit draws) reserved per call

// ---- Philox4x32-10 (Salmon et al., SC'11) ---------------------------------------------------
__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key.x += kW0;
      key.y += kW1;
    }
    const uint32_t hi0 = __umulhi(kM0, ctr.x), lo0 = kM0 * ctr.x;
    const uint32_t hi1 = __umulhi(kM1, ctr.z), lo1 = kM1 * ctr.z;
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
  }
  return ctr;
}

// Two standard normals from two 32-bit draws. u1 in (0, 1] (never 0: no log(0)); the clamp
// guards the fast-math log returning a tiny positive value for u1 just below 1.
__device__ __forceinline__ float2 box_muller(uint32_t a, uint32_t b) {
  constexpr float kInv2Pow32 = 2.3283064365386963e-10f;  // 2^-32
  const float u1 = fmaf(__uint2float_rn(a), kInv2Pow32, 0.5f * kInv2Pow32);
  const float u2 = fmaf(__uint2float_rn(b), kInv2Pow32, 0.5f * kInv2Pow32);
  const float r = sqrtf(fmaxf(-2.0f * logf(u1), 0.0f));
  float s, c;
  sincospif(2.0f * u2, &s, &c);
  return make_float2(r * c, r * s);
}

// Four normals for the group of elements [4k, 4k + 4).
__device__ __forceinline__ float4 philox_normal4(uint64_t seed, uint64_t offset, uint64_t k) {
  const uint64_t block = offset / 4;
  const uint4 ctr = make_uint4(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                               static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32));
  const uint2 key = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint4 r = philox4x32_10(ctr, key);
  const float2 z01 = box_muller(r.x, r.y), z23 = box_muller(r.z, r.w);
  return make_float4(z01.x, z01.y, z23.x, z23.y);
}

// ---- exact (uncontracted) arithmetic --------------------------------------------------------
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// Per-step scalars: immediate, or one row of a device table selected by a device counter.
struct ScalarArgs {
  double coef_x = 0, coef_out = 0, noise_std = 0;
  const void* table = nullptr;  // (steps, 3) fp32/fp64, or nullptr for immediate scalars
  bool table_double = false;
  int64_t table_rows = 0, table_s0 = 0, table_s1 = 0;
  const int64_t* step = nullptr;
};

struct NoiseArgs {
  const void* noise = nullptr;  // explicit z in the accumulation dtype, contiguous like x; else Philox
  at::PhiloxCudaState philox;
};

template <typename acc>
__device__ __forceinline__ bool load_scalars(const ScalarArgs& a, acc& cx, acc& co, acc& ns) {
  if (a.table == nullptr) {
    cx = static_cast<acc>(a.coef_x);
    co = static_cast<acc>(a.coef_out);
    ns = static_cast<acc>(a.noise_std);
    return true;
  }
  const int64_t s = *a.step;  // one broadcast load per thread, cached
  if (s < 0 || s >= a.table_rows) return false;
  const int64_t i = s * a.table_s0;
  if (a.table_double) {
    const double* t = static_cast<const double*>(a.table);
    cx = static_cast<acc>(t[i]);
    co = static_cast<acc>(t[i + a.table_s1]);
    ns = static_cast<acc>(t[i + 2 * a.table_s1]);
  } else {
    const float* t = static_cast<const float*>(a.table);
    cx = static_cast<acc>(t[i]);
    co = static_cast<acc>(t[i + a.table_s1]);
    ns = static_cast<acc>(t[i + 2 * a.table_s1]);
  }
  return true;
}

// kVec: S % 4 == 0, out strides % 4 == 0 and all pointers aligned, so each group of 4
// elements shares (b, c) and moves with one vector op per tensor.
template <typename x_t, typename out_t, bool kVec>
__global__ void __launch_bounds__(kThreads)
    sde_step_kernel(const x_t* __restrict__ x, const out_t* __restrict__ out, x_t* __restrict__ x_next,
                    x_t* __restrict__ x_mean, const StepGeometry g, const int64_t numel, const ScalarArgs sargs,
                    const double cfg_scale, const NoiseArgs nargs) {
  using acc = acc_t<x_t>;
  acc cx, co, ns;
  const bool ok = load_scalars<acc>(sargs, cx, co, ns);
  const acc nan = std::numeric_limits<acc>::quiet_NaN();
  if (!ok) cx = co = ns = nan;
  const acc w = static_cast<acc>(cfg_scale);
  const acc* __restrict__ noise = static_cast<const acc*>(nargs.noise);
  uint64_t seed = 0, offset = 0;
  if (noise == nullptr) {
    const auto so = at::cuda::philox::unpack(nargs.philox);
    seed = std::get<0>(so);
    offset = std::get<1>(so);
  }
  const int64_t groups = dit::ceil_div(numel, int64_t(4));
  const int64_t plane_stride = g.S;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < groups;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = 4 * k;
    acc z[4];
    if (noise != nullptr) {
      if constexpr (kVec) {
        const auto zp = dit::load_pack<acc, 4>(noise + e0);
#pragma unroll
        for (int j = 0; j < 4; ++j) z[j] = zp[j];
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) z[j] = e0 + j < numel ? noise[e0 + j] : acc(0);
      }
    } else {
      // Skip the transcendental work when the step is deterministic (e.g. the "Mean" last step);
      // the counter space is reserved either way, so the stream does not shift.
      float4 n4 = make_float4(0.f, 0.f, 0.f, 0.f);
      if (ns != acc(0)) n4 = philox_normal4(seed, offset, static_cast<uint64_t>(k));
      z[0] = n4.x;
      z[1] = n4.y;
      z[2] = n4.z;
      z[3] = n4.w;
    }
    if constexpr (kVec) {
      const int64_t plane = e0 / plane_stride, s = e0 - plane * plane_stride;
      const int64_t b = plane / g.C, c = plane - b * g.C;
      const auto xv = dit::load_pack<x_t, 4>(x + e0);
      const auto ov = dit::load_pack<out_t, 4>(out + b * g.out_sb + c * g.out_sc + s);
      acc o[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) o[j] = static_cast<acc>(ov[j]);
      if (g.cfg && c < g.guided) {
        const auto uv = dit::load_pack<out_t, 4>(out + (g.B + b) * g.out_sb + c * g.out_sc + s);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const acc u = static_cast<acc>(uv[j]);
          o[j] = add_rn(u, mul_rn(w, sub_rn(o[j], u)));
        }
      }
      dit::Pack<x_t, 4> mv, nv;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const acc m = add_rn(mul_rn(cx, static_cast<acc>(xv[j])), mul_rn(co, o[j]));
        mv[j] = static_cast<x_t>(m);
        nv[j] = static_cast<x_t>(add_rn(m, mul_rn(ns, z[j])));
      }
      dit::store_pack<x_t, 4>(x_mean + e0, mv);
      dit::store_pack<x_t, 4>(x_next + e0, nv);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t e = e0 + j;
        if (e >= numel) break;
        const int64_t plane = e / plane_stride, s = e - plane * plane_stride;
        const int64_t b = plane / g.C, c = plane - b * g.C;
        acc o = static_cast<acc>(out[b * g.out_sb + c * g.out_sc + s]);
        if (g.cfg && c < g.guided) {
          const acc u = static_cast<acc>(out[(g.B + b) * g.out_sb + c * g.out_sc + s]);
          o = add_rn(u, mul_rn(w, sub_rn(o, u)));
        }
        const acc m = add_rn(mul_rn(cx, static_cast<acc>(x[e])), mul_rn(co, o));
        x_mean[e] = static_cast<x_t>(m);
        x_next[e] = static_cast<x_t>(add_rn(m, mul_rn(ns, z[j])));
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> sde_step_cuda_run(const at::Tensor& x_in, const at::Tensor& out_in,
                                                     const ScalarArgs& sargs, double cfg_scale,
                                                     int64_t guided_channels,
                                                     const std::optional<at::Tensor>& noise,
                                                     const std::optional<at::Generator>& generator) {
  TORCH_CHECK(x_in.is_cuda(), "sde_euler_maruyama_step (CUDA kernel): x must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor out = dit_sde::spatial_view(out_in);
  const StepGeometry g = dit_sde::check_step_inputs(x_in, out, guided_channels, noise);
  const at::Tensor x = x_in.contiguous();
  auto x_next = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto x_mean = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel();
  if (numel == 0) return {x_next, x_mean};

  NoiseArgs nargs;
  at::Tensor z;
  if (noise.has_value()) {
    z = dit_sde::noise_in_acc(*noise, x);
    nargs.noise = z.data_ptr();
  } else {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator(x.device().index()));
    // torch.Generator("cuda") carries no device index; only an explicit, different index is an error.
    TORCH_CHECK(!gen->device().has_index() || gen->device().index() == x.device().index(),
                "sde_euler_maruyama_step: generator is on ", gen->device(), " but x is on ", x.device());
    // See Note [Acquire lock when using random generators].
    std::lock_guard<std::mutex> lock(gen->mutex_);
    nargs.philox = gen->philox_cuda_state(kPhiloxIncrement);
  }

  const int64_t groups = dit::ceil_div(numel, int64_t(4));
  const int64_t max_blocks = int64_t(dit::sm_count()) * 16;  // grid-stride beyond this
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min(dit::ceil_div(groups, int64_t(kThreads)), max_blocks)));
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sde_euler_maruyama_step_cuda", [&] {
    using x_t = scalar_t;
    using acc = acc_t<x_t>;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sde_euler_maruyama_step_cuda_out",
                                    [&] {
      using out_t = scalar_t;
      const x_t* xp = x.data_ptr<x_t>();
      const out_t* op = out.data_ptr<out_t>();
      x_t* np = x_next.data_ptr<x_t>();
      x_t* mp = x_mean.data_ptr<x_t>();
      const bool vec = g.S % 4 == 0 && g.out_sb % 4 == 0 && g.out_sc % 4 == 0 &&
                       dit::is_aligned(xp, 4 * sizeof(x_t)) && dit::is_aligned(op, 4 * sizeof(out_t)) &&
                       dit::is_aligned(np, 4 * sizeof(x_t)) && dit::is_aligned(mp, 4 * sizeof(x_t)) &&
                       (nargs.noise == nullptr || dit::is_aligned(nargs.noise, 4 * sizeof(acc)));
      if (vec) {
        sde_step_kernel<x_t, out_t, true>
            <<<blocks, kThreads, 0, stream>>>(xp, op, np, mp, g, numel, sargs, cfg_scale, nargs);
      } else {
        sde_step_kernel<x_t, out_t, false>
            <<<blocks, kThreads, 0, stream>>>(xp, op, np, mp, g, numel, sargs, cfg_scale, nargs);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {x_next, x_mean};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sde_euler_maruyama_step_cuda(const at::Tensor& x, const at::Tensor& out,
                                                                double coef_x, double coef_out, double noise_std,
                                                                double cfg_scale, int64_t guided_channels,
                                                                const std::optional<at::Tensor>& noise,
                                                                std::optional<at::Generator> generator) {
  ScalarArgs sargs;
  sargs.coef_x = coef_x;
  sargs.coef_out = coef_out;
  sargs.noise_std = noise_std;
  return sde_step_cuda_run(x, out, sargs, cfg_scale, guided_channels, noise, generator);
}

std::tuple<at::Tensor, at::Tensor> sde_euler_maruyama_step_table_cuda(const at::Tensor& x, const at::Tensor& out,
                                                                      const at::Tensor& coeffs,
                                                                      const at::Tensor& step, double cfg_scale,
                                                                      int64_t guided_channels,
                                                                      const std::optional<at::Tensor>& noise,
                                                                      std::optional<at::Generator> generator) {
  dit_sde::check_table_inputs(x, coeffs, step);
  ScalarArgs sargs;
  sargs.table = coeffs.data_ptr();
  sargs.table_double = coeffs.scalar_type() == at::kDouble;
  sargs.table_rows = coeffs.size(0);
  sargs.table_s0 = coeffs.stride(0);
  sargs.table_s1 = coeffs.stride(1);
  sargs.step = step.data_ptr<int64_t>();
  return sde_step_cuda_run(x, out, sargs, cfg_scale, guided_channels, noise, generator);
}

TORCH_LIBRARY_IMPL(dit_kernels, CUDA, m) {
  m.impl("sde_euler_maruyama_step", &sde_euler_maruyama_step_cuda);
  m.impl("sde_euler_maruyama_step_table", &sde_euler_maruyama_step_table_cuda);
}
