// Emulation stand-in for <ATen/cuda/CUDAContext.h>: a null stream and configurable properties.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include "dit_emu_runtime.h"
namespace at {
namespace cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline cudaDeviceProp* getCurrentDeviceProperties() { return dit_emu::device_properties(); }
}  // namespace cuda
}  // namespace at
