// Emulation stand-in: launches run synchronously and report errors by throwing.
#pragma once
#include <c10/util/Exception.h>
#include "dit_emu_runtime.h"
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define C10_CUDA_CHECK(expr)                                                                 \
  do {                                                                                       \
    const cudaError_t dit_emu_err = (expr);                                                  \
    TORCH_CHECK(dit_emu_err == cudaSuccess, "emulated CUDA call failed: ", #expr);           \
  } while (0)
