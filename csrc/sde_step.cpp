// Schema of the table-driven Euler-Maruyama step (the scalars as device
// tensors): the per-step scalars come from a device table indexed by a device step counter,
// so a whole sampling loop can be captured once in a CUDA graph. The scalar-argument op
// sde_euler_maruyama_step is declared in csrc/ops.cpp; both are implemented in
// csrc/cpu/sde_step_kernel.cpp and csrc/cuda/sde_step_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dit_kernels, m) {
  // x (B,C,...); out (B or 2B, C_out >= C, ...) [cond; uncond]; coeffs (steps, 3) fp32/fp64 rows
  // [coef_x, coef_out, noise_std]; step: one int64 element on x's device, read by the kernel
  // (the caller advances it). Returns (x_next, x_mean) like x. Draws noise when `noise` is None.
  m.def(
      "sde_euler_maruyama_step_table(Tensor x, Tensor out, Tensor coeffs, Tensor step,"
      " float cfg_scale, int guided_channels, Tensor? noise, Generator? generator)"
      " -> (Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
}
