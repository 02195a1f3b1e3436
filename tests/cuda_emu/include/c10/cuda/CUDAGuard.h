// Emulation stand-in: the "device" is the host, so guards do nothing.
#pragma once
#include <c10/core/Device.h>
#include "dit_emu_runtime.h"
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};
}  // namespace cuda
}  // namespace c10
