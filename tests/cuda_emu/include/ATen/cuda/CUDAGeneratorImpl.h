// Emulation stand-in: one default "CUDA" generator, a (seed, offset) counter pair that hands out
// Philox states like the real one. Only the default generator exists (pass generator=None); it
// says it is a CUDA generator, so an explicit CPU generator is refused as by the real CUDA op.
#pragma once
#include <ATen/core/Generator.h>
#include <c10/core/GeneratorImpl.h>
#include "PhiloxUtils.cuh"
namespace at {
struct CUDAGeneratorImpl : public c10::GeneratorImpl {
  CUDAGeneratorImpl()
      : c10::GeneratorImpl(c10::Device(c10::DeviceType::CUDA), c10::DispatchKeySet(c10::DispatchKey::CUDA)) {}
  static c10::DeviceType device_type() { return c10::DeviceType::CUDA; }
  void set_current_seed(uint64_t seed) override { seed_ = seed; offset_ = 0; }
  void set_offset(uint64_t offset) override { offset_ = offset; }
  uint64_t get_offset() const override { return offset_; }
  uint64_t current_seed() const override { return seed_; }
  uint64_t seed() override { return seed_; }
  void set_state(const c10::TensorImpl&) override {}
  c10::intrusive_ptr<c10::TensorImpl> get_state() const override { return {}; }
  PhiloxCudaState philox_cuda_state(uint64_t increment) {
    increment = ((increment + 3) / 4) * 4;  // like the real generator: offsets stay multiples of 4
    PhiloxCudaState s(seed_, offset_);
    offset_ += increment;
    return s;
  }
 private:
  CUDAGeneratorImpl* clone_impl() const override {
    auto* g = new CUDAGeneratorImpl();
    g->seed_ = seed_;
    g->offset_ = offset_;
    return g;
  }
  uint64_t seed_ = 67280421310721ull, offset_ = 0;
};
namespace cuda {
namespace detail {
const at::Generator& getDefaultCUDAGenerator(c10::DeviceIndex device_index = -1);
}  // namespace detail
}  // namespace cuda
}  // namespace at
