// CPU kernels for the fused Euler-Maruyama step with classifier-free guidance:
//   o      = out[b, c]                                   (no CFG, or c >= guided)
//          = out[B+b, c] + w * (out[b, c] - out[B+b, c]) (CFG, c < guided)
//   x_mean = coef_x * x + coef_out * o;   x_next = x_mean + noise_std * z
// Math in fp32 (fp64 for fp64 x), in the same operation order as the reference, one
// parallel task per (b, c) plane. Without explicit noise, z is drawn with the CPU generator
// exactly like the reference (torch.randn(x.shape, dtype=acc, generator=...)), so the same
// generator state gives the same result.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "../sde_step.h"

namespace {

using dit_sde::StepGeometry;

template <typename acc>
struct StepScalars {
  acc coef_x, coef_out, noise_std, cfg;
};

template <typename x_t, typename out_t>
void sde_step_cpu_impl(const at::Tensor& x, const at::Tensor& out, const at::Tensor& z, const StepGeometry& g,
                       const StepScalars<acc_t<x_t>>& k, at::Tensor& x_next, at::Tensor& x_mean) {
  using acc = acc_t<x_t>;
  const x_t* xp = x.data_ptr<x_t>();
  const out_t* op = out.data_ptr<out_t>();
  const acc* zp = z.data_ptr<acc>();
  x_t* np = x_next.data_ptr<x_t>();
  x_t* mp = x_mean.data_ptr<x_t>();
  const int64_t S = g.S, C = g.C, B = g.B;
  at::parallel_for(0, B * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / C, c = plane % C;
      const out_t* cond = op + b * g.out_sb + c * g.out_sc;
      const int64_t base = plane * S;
      if (g.cfg && c < g.guided) {
        const out_t* uncond = op + (B + b) * g.out_sb + c * g.out_sc;
        for (int64_t s = 0; s < S; ++s) {
          const acc u = static_cast<acc>(uncond[s]);
          const acc o = u + k.cfg * (static_cast<acc>(cond[s]) - u);
          const acc m = k.coef_x * static_cast<acc>(xp[base + s]) + k.coef_out * o;
          mp[base + s] = static_cast<x_t>(m);
          np[base + s] = static_cast<x_t>(m + k.noise_std * zp[base + s]);
        }
      } else {
        for (int64_t s = 0; s < S; ++s) {
          const acc m = k.coef_x * static_cast<acc>(xp[base + s]) + k.coef_out * static_cast<acc>(cond[s]);
          mp[base + s] = static_cast<x_t>(m);
          np[base + s] = static_cast<x_t>(m + k.noise_std * zp[base + s]);
        }
      }
    }
  });
}

// Shared body of both ops once the scalars are known (coefficients as doubles, cast to acc
// here like the reference casts Python floats to the tensor's compute type).
std::tuple<at::Tensor, at::Tensor> sde_step_cpu_run(const at::Tensor& x_in, const at::Tensor& out_in,
                                                    double coef_x, double coef_out, double noise_std,
                                                    double cfg_scale, int64_t guided_channels,
                                                    const std::optional<at::Tensor>& noise,
                                                    const std::optional<at::Generator>& generator) {
  const at::Tensor out = dit_sde::spatial_view(out_in);
  const StepGeometry g = dit_sde::check_step_inputs(x_in, out, guided_channels, noise);
  TORCH_CHECK(x_in.device().is_cpu(), "sde_euler_maruyama_step (CPU kernel): x must be on the CPU");
  const at::Tensor x = x_in.contiguous();
  auto x_next = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto x_mean = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return {x_next, x_mean};
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // The reference draws torch.randn(x.shape, dtype=acc, generator=generator): same call here.
  const at::Tensor z = noise.has_value() ? dit_sde::noise_in_acc(*noise, x)
                                         : at::randn(x.sizes(), generator, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sde_euler_maruyama_step_cpu", [&] {
    using x_t = scalar_t;
    using acc = acc_t<x_t>;
    const StepScalars<acc> k{static_cast<acc>(coef_x), static_cast<acc>(coef_out), static_cast<acc>(noise_std),
                             static_cast<acc>(cfg_scale)};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "sde_euler_maruyama_step_cpu_out",
                                    [&] { sde_step_cpu_impl<x_t, scalar_t>(x, out, z, g, k, x_next, x_mean); });
  });
  return {x_next, x_mean};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sde_euler_maruyama_step_cpu(const at::Tensor& x, const at::Tensor& out,
                                                               double coef_x, double coef_out, double noise_std,
                                                               double cfg_scale, int64_t guided_channels,
                                                               const std::optional<at::Tensor>& noise,
                                                               std::optional<at::Generator> generator) {
  return sde_step_cpu_run(x, out, coef_x, coef_out, noise_std, cfg_scale, guided_channels, noise, generator);
}

std::tuple<at::Tensor, at::Tensor> sde_euler_maruyama_step_table_cpu(const at::Tensor& x, const at::Tensor& out,
                                                                     const at::Tensor& coeffs, const at::Tensor& step,
                                                                     double cfg_scale, int64_t guided_channels,
                                                                     const std::optional<at::Tensor>& noise,
                                                                     std::optional<at::Generator> generator) {
  dit_sde::check_table_inputs(x, coeffs, step);
  // Reading a CPU tensor is not a device sync, so the CPU op can validate the step eagerly.
  const int64_t s = step.reshape({-1})[0].item<int64_t>();
  TORCH_CHECK(s >= 0 && s < coeffs.size(0), "sde_euler_maruyama_step_table: step ", s, " is outside [0, ",
              coeffs.size(0), ")");
  const at::Tensor row = coeffs[s].to(at::kDouble).contiguous();  // exact for fp32 and fp64 tables
  const double* r = row.data_ptr<double>();
  return sde_step_cpu_run(x, out, r[0], r[1], r[2], cfg_scale, guided_channels, noise, generator);
}

TORCH_LIBRARY_IMPL(dit_kernels, CPU, m) {
  m.impl("sde_euler_maruyama_step", &sde_euler_maruyama_step_cpu);
  m.impl("sde_euler_maruyama_step_table", &sde_euler_maruyama_step_table_cpu);
}
