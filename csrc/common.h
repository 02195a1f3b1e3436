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

// fp32 accumulator for half types, the type itself for float/double.
template <typename T>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };
template <typename T>
using acc_t = typename AccType<T>::type;
