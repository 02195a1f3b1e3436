// Schemas of every dit_kernels op. Implementations register per dispatch key in
// csrc/cpu/<op>_kernel.cpp (CPU) and csrc/cuda/<op>_kernel.cu (CUDA); fake (meta)
// and autograd formulas are registered in Python (dit_kernels/ops/<op>.py).
//
// Shape legend: N batch, T tokens, D hidden, C channels, p patch, K kept tokens.
// Modulation tensors (shift, scale, gate) arrive as (N, D) with any row stride
// (0 for a shared (D,) vector expanded by the Python wrapper) and unit inner stride.
#include <torch/library.h>

TORCH_LIBRARY(dit_kernels, m) {
  // ---- modulated LayerNorm: y = LN(x) * (1 + scale) + shift ----------------------
  m.def(
      "modulated_layer_norm(Tensor x,"          // (N, T, D), last dim contiguous
      " Tensor shift, Tensor scale,"             // (N, D), unit inner stride
      " float eps, ScalarType? out_dtype=None)"  // y dtype: x.dtype, or fp16/bf16 with fp32 x
      " -> (Tensor, Tensor, Tensor)"             // y (N, T, D); mean, rstd (N, T) fp32
  );
  m.def(
      "_modulated_layer_norm_backward(Tensor grad_y,"  // (N, T, D) in y's dtype
      " Tensor x, Tensor scale,"                       // as forward
      " Tensor mean, Tensor rstd)"                     // (N, T) fp32
      " -> (Tensor, Tensor, Tensor)"                   // dx (N,T,D); dshift, dscale (N, D) in scale.dtype
  );

  // ---- gated residual: out = x + gate * y -----------------------------------------
  // Branch dtype: y (and h, and their grads) share x.dtype, or are fp16/bf16 while x is fp32 (the
  // fp32 residual stream of bf16 autocast training); see DIT_DISPATCH_BRANCH_TYPES in common.h.
  m.def("gated_residual(Tensor x, Tensor y, Tensor gate) -> Tensor");  // x, y (N,T,D); gate (N,D) -> x.dtype
  m.def(
      "_gated_residual_backward(Tensor grad_out, Tensor y, Tensor gate)"  // grad_out in x.dtype
      " -> (Tensor, Tensor)"  // dy (N,T,D) y.dtype; dgate (N, D) gate.dtype
  );

  // ---- gated residual + modulated LayerNorm in one pass ----------------------------
  m.def(
      "gated_residual_modulated_layer_norm(Tensor x, Tensor y, Tensor gate,"
      " Tensor shift, Tensor scale, float eps)"
      " -> (Tensor, Tensor, Tensor, Tensor)"  // x_new (N,T,D) x.dtype, h (N,T,D) y.dtype; mean, rstd (N,T) fp32
  );
  m.def(
      "_gated_residual_modulated_layer_norm_backward(Tensor? grad_x_new, Tensor? grad_h,"
      " Tensor x_new, Tensor y, Tensor gate, Tensor scale, Tensor mean, Tensor rstd)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)"  // dx (x_new.dtype), dy (y.dtype) (N,T,D); dgate, dshift, dscale (N,D)
  );

  // ---- patchify / unpatchify (exact permutations) ----------------------------------
  // patchify: (N, C, H, W) -> (N, T, C*p*p), features (c, a, b) = Conv2d weight layout.
  m.def("patchify(Tensor x, int patch_size) -> Tensor");
  // backward of patchify: (N, T, C*p*p) -> (N, C, H, W)
  m.def("_patchify_backward(Tensor grad, int patch_size, int height, int width) -> Tensor");
  // unpatchify: (N, T, p*p*C_all) features (a, b, c) -> (N, C, H, W), C = channels <= C_all.
  m.def("unpatchify(Tensor y, int patch_size, int height, int width, int channels) -> Tensor");
  // backward of unpatchify: (N, C, H, W) -> (N, T, p*p*C_all), zeros for channels >= C.
  m.def("_unpatchify_backward(Tensor grad, int patch_size, int all_channels) -> Tensor");

  // ---- masked-token gather / scatter (unique ids per row: no atomics) ---------------
  m.def("gather_tokens(Tensor x, Tensor ids_keep) -> Tensor");  // (N,T,D), (N,K) int64 -> (N,K,D)
  m.def("_gather_tokens_backward(Tensor grad, Tensor ids_keep, int length) -> Tensor");  // -> (N,T,D)
  // scatter_tokens: kept (N,K,D) at ids_keep, every other row from fill: (D,) broadcast or (N,T,D)
  // fill (D,) or (N,T,D) (unit inner stride), dtype of kept or float32; length = T -> (N,T,D) kept.dtype
  m.def("scatter_tokens(Tensor kept, Tensor ids_keep, Tensor fill, int length) -> Tensor");
  // -> dkept (N,K,D); dfill in fill_dtype: (D,) fp32-accumulated sum over filled rows, or (N,T,D) grad*mask
  m.def("_scatter_tokens_backward(Tensor grad, Tensor ids_keep, bool fill_per_token, ScalarType fill_dtype) -> (Tensor, Tensor)");

  // ---- SDE Euler-Maruyama step with fused CFG and in-kernel noise -------------------
  // x (B,C,H,W); out (B or 2B, C_out, H, W) [cond; uncond]; returns (x_next, x_mean).
  m.def(
      "sde_euler_maruyama_step(Tensor x, Tensor out, float coef_x, float coef_out,"
      " float noise_std, float cfg_scale, int guided_channels, Tensor? noise,"
      " Generator? generator) -> (Tensor, Tensor)",
      // draws noise: the compiler must not merge or reorder two identical calls
      {at::Tag::nondeterministic_seeded});
}
