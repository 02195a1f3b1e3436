// Shared input checks and dtype dispatch for dit_kernels host functions.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#define DIT_CHECK_FLOAT(t)                                                                  \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||          \
                  (t).scalar_type() == at::kBFloat16 || (t).scalar_type() == at::kDouble,   \
              #t " must be float32, float16, bfloat16 or float64, got ", (t).scalar_type())

#define DIT_CHECK_DIM(t, n, layout) \
  TORCH_CHECK((t).dim() == (n), #t " must have shape " layout ", got ", (t).sizes())

#define DIT_CHECK_SAME_DEVICE(a, b) \
  TORCH_CHECK((a).device() == (b).device(), #a " is on ", (a).device(), " but " #b " is on ", (b).device())

#define DIT_CHECK_LAST_CONTIGUOUS(t) \
  TORCH_CHECK((t).size(-1) <= 1 || (t).stride(-1) == 1, #t " must have unit stride in its last dimension")

// (N, D) modulation tensor: any row stride (0 for shared), unit inner stride.
#define DIT_CHECK_MOD(t, n, d)                                                                       \
  do {                                                                                               \
    DIT_CHECK_FLOAT(t);                                                                              \
    TORCH_CHECK((t).dim() == 2 && (t).size(0) == (n) && (t).size(1) == (d), #t " must have shape (N, D) = (", \
                (n), ", ", (d), "), got ", (t).sizes());                                             \
    DIT_CHECK_LAST_CONTIGUOUS(t);                                                                    \
  } while (0)

// Modulation tensors may be fp32 while activations are half (autocast); otherwise they
// share the activation dtype. Dispatch over (activation scalar_t, modulation mod_t).
#define DIT_DISPATCH_MOD_TYPE(x_type, mod_type, NAME, ...)                                     \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_type, NAME, [&] {               \
    if ((mod_type) == (x_type)) {                                                             \
      using mod_t = scalar_t;                                                                 \
      __VA_ARGS__();                                                                          \
    } else {                                                                                  \
      TORCH_CHECK((mod_type) == at::kFloat, NAME ": modulation dtype must equal x.dtype or be float32, got ", \
                  (mod_type), " with x ", (x_type));                                          \
      using mod_t = float;                                                                    \
      __VA_ARGS__();                                                                          \
    }                                                                                         \
  })

// Branch dtype (branch_t): the dtype of the gated branch y, of the LayerNorm output h and of their
// gradients. It equals x.dtype, or it is float16/bfloat16 while the residual stream x (x_new, dx)
// is float32 and the modulation float32: the layout of bf16 autocast training, where the residual
// stream stays fp32 and every Linear reads and writes bf16. Reading y and writing h in bf16
// directly saves the two conversion passes (and the fp32 copies) the model would otherwise need.
// Dispatch over (scalar_t = x dtype, mod_t, branch_t).
#define DIT_DISPATCH_BRANCH_TYPES(x_type, branch_type, mod_type, NAME, ...)                         \
  do {                                                                                              \
    if ((branch_type) == (x_type)) {                                                                \
      DIT_DISPATCH_MOD_TYPE(x_type, mod_type, NAME, [&] {                                           \
        using branch_t = scalar_t;                                                                  \
        __VA_ARGS__();                                                                              \
      });                                                                                           \
    } else {                                                                                        \
      TORCH_CHECK((x_type) == at::kFloat && ((branch_type) == at::kHalf || (branch_type) == at::kBFloat16), \
                  NAME ": the branch (y / h / their grads) must have the dtype of the residual stream x, " \
                  "or be float16/bfloat16 with a float32 x; got ", (branch_type), " with x ", (x_type)); \
      TORCH_CHECK((mod_type) == at::kFloat, NAME ": modulation must be float32 with a float32 x, got ", \
                  (mod_type));                                                                      \
      using scalar_t = float;                                                                       \
      using mod_t = float;                                                                          \
      if ((branch_type) == at::kHalf) {                                                             \
        using branch_t = at::Half;                                                                  \
        __VA_ARGS__();                                                                              \
      } else {                                                                                      \
        using branch_t = at::BFloat16;                                                              \
        __VA_ARGS__();                                                                              \
      }                                                                                             \
    }                                                                                               \
  } while (0)

namespace dit {

// The branch-dtype rule of DIT_DISPATCH_BRANCH_TYPES, checked by the CPU and CUDA host functions
// before they allocate or dispatch, so the error names the argument and empty tensors are held to
// the same rule. `branch` must equal `residual`, or be float16/bfloat16 with a float32 residual.
inline void check_branch_dtype(at::ScalarType branch, at::ScalarType residual, const char* name,
                               const char* residual_name) {
  TORCH_CHECK(branch == residual ||
                  (residual == at::kFloat && (branch == at::kHalf || branch == at::kBFloat16)),
              "branch dtype: ", name, " must have the dtype of ", residual_name, " (", residual,
              "), or be float16/bfloat16 when ", residual_name, " is float32; got ", branch);
}

// With a mixed branch (branch dtype != residual dtype) the modulation tensor `mod` must be float32.
inline void check_mixed_mod(const at::Tensor& mod, at::ScalarType branch, at::ScalarType residual,
                            const char* name) {
  TORCH_CHECK(branch == residual || mod.scalar_type() == at::kFloat, name,
              ": modulation must be float32 when the branch dtype (", branch, ") differs from the residual dtype (",
              residual, "), got ", mod.scalar_type());
}

}  // namespace dit

// fp32 accumulator for half types, the type itself for float/double.
template <typename T>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };
template <typename T>
using acc_t = typename AccType<T>::type;
