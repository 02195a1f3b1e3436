// Scheduler of the CUDA emulation (see include/dit_emu_runtime.h).
//
// A launch runs its blocks one at a time; a block's threads are ucontext fibers on the calling
// thread. The scheduler sweeps the runnable fibers in the configured order (ascending, descending
// or seeded random), each running until it reaches a barrier or returns; then it releases every
// complete barrier (a block barrier when all live threads wait at __syncthreads, a warp barrier
// when all lanes of a warp wait in a shuffle). Anything else is reported as an error: a shuffle
// whose warp has exited lanes, a __syncthreads some live threads never reach, too much dynamic
// shared memory for the launch, a block or grid the hardware would reject.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <torch/library.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "dit_emu_runtime.h"

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace dit_emu {
namespace {

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;

struct Fiber {
  ucontext_t ctx;
  State state = State::kRunnable;
  std::vector<char> stack;
};

struct Runtime {
  std::mutex mutex;  // one launch at a time (the fibers share the globals above)
  // configuration
  int order = 0;  // 0 ascending, 1 descending, 2 random
  uint64_t seed = 0;
  cudaDeviceProp props{};
  std::map<void*, int> max_dynamic_smem;
  // current launch / block
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;  // [0, nthreads) belong to the running block; the rest are spares
  ucontext_t scheduler;
  int current = -1;
  int nthreads = 0;
  std::vector<std::array<unsigned char, 16>> shuffle_slots;
  std::vector<unsigned char> smem_storage;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  uint64_t block_epoch = 0;
  std::map<void*, uint64_t> shared_epoch;
  void* kernel_id = nullptr;
  int64_t static_smem = 0;  // bytes of __shared__ arrays seen in this launch
  std::string error;
  std::mt19937_64 rng;
  // statistics: launches, blocks, barrier releases, shuffles
  int64_t launches = 0, blocks = 0, barriers = 0, shuffles = 0;

  Runtime() {
    props.multiProcessorCount = 2;  // small, so grid-stride loops iterate
    props.sharedMemPerBlock = kDefaultDynamicSmem;
    props.sharedMemPerBlockOptin = 227 * 1024;  // H100 / H200
    props.sharedMemPerMultiprocessor = 228 * 1024;
    props.reservedSharedMemPerBlock = 1024;
    props.maxThreadsPerBlock = 1024;
    props.maxThreadsPerMultiProcessor = 2048;
    props.warpSize = 32;
    props.major = 9;
    props.minor = 0;
    std::snprintf(props.name, sizeof(props.name), "dit_emu (CUDA emulated on the CPU)");
  }
};

Runtime& rt() {
  static Runtime r;
  return r;
}

void fail(const std::string& msg) {
  Runtime& r = rt();
  if (r.error.empty()) r.error = msg;
}

void set_thread_index(int t) {
  threadIdx = dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y));
}

void fiber_main() {
  Runtime& r = rt();
  (*r.body)();
  r.fibers[r.current].state = State::kDone;
  // returning resumes uc_link (the scheduler)
}

void yield_to_scheduler(State s) {
  Runtime& r = rt();
  TORCH_CHECK(r.current >= 0, "dit_emu: barrier outside of an emulated kernel");
  Fiber& f = r.fibers[r.current];
  f.state = s;
  swapcontext(&f.ctx, &r.scheduler);
}

// The executing thread faults: the launch reports `msg`, the thread is never resumed (as on the hardware).
[[noreturn]] void trap(const std::string& msg) {
  TORCH_CHECK(rt().current >= 0, "dit_emu: ", msg, " (outside of an emulated kernel)");
  fail(msg);
  yield_to_scheduler(State::kDone);
  std::abort();
}

std::vector<int> sweep_order(int n) {
  Runtime& r = rt();
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (r.order == 1) std::reverse(order.begin(), order.end());
  if (r.order == 2) std::shuffle(order.begin(), order.end(), r.rng);
  return order;
}

std::string describe_states() {
  Runtime& r = rt();
  std::ostringstream os;
  int counts[4] = {0, 0, 0, 0};
  for (int t = 0; t < r.nthreads; ++t) counts[static_cast<int>(r.fibers[t].state)]++;
  os << "block (" << blockIdx.x << "," << blockIdx.y << "," << blockIdx.z << "): " << counts[1]
     << " threads at __syncthreads, " << counts[2] << " in a warp shuffle, " << counts[3] << " exited";
  return os.str();
}

// Releases complete barriers; false when nothing could be released.
bool release_barriers() {
  Runtime& r = rt();
  bool released = false;
  for (int w = 0; w * 32 < r.nthreads; ++w) {
    const int lo = w * 32, hi = std::min(r.nthreads, lo + 32);
    int waiting = 0, done = 0;
    for (int t = lo; t < hi; ++t) {
      waiting += r.fibers[t].state == State::kAtWarpBarrier;
      done += r.fibers[t].state == State::kDone;
    }
    if (waiting > 0 && done > 0) {
      fail("warp shuffle with exited lanes (full-mask __shfl_xor_sync in warp " + std::to_string(w) + "): " +
           describe_states());
      return false;
    }
    if (waiting == hi - lo) {
      for (int t = lo; t < hi; ++t) r.fibers[t].state = State::kRunnable;
      released = true;
    }
  }
  if (released) return true;
  int live = 0, at_barrier = 0;
  for (int t = 0; t < r.nthreads; ++t) {
    live += r.fibers[t].state != State::kDone;
    at_barrier += r.fibers[t].state == State::kAtBlockBarrier;
  }
  if (live > 0 && at_barrier == live) {
    for (int t = 0; t < r.nthreads; ++t)
      if (r.fibers[t].state == State::kAtBlockBarrier) r.fibers[t].state = State::kRunnable;
    r.barriers++;
    return true;
  }
  return false;
}

void run_block(int nthreads) {
  Runtime& r = rt();
  r.block_epoch++;
  r.blocks++;
  if (r.smem) std::memset(r.smem, 0xFF, r.smem_bytes);  // uninitialised shared memory reads as NaN / -1
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = r.fibers[t];
    f.state = State::kRunnable;
    if (f.stack.size() != kStackBytes) f.stack.resize(kStackBytes);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &r.scheduler;
    makecontext(&f.ctx, &fiber_main, 0);
  }
  while (true) {
    for (int t : sweep_order(nthreads)) {
      if (r.fibers[t].state != State::kRunnable) continue;
      r.current = t;
      set_thread_index(t);
      swapcontext(&r.scheduler, &r.fibers[t].ctx);
      if (!r.error.empty()) return;
    }
    r.current = -1;
    bool all_done = true;
    for (int t = 0; t < nthreads; ++t) all_done = all_done && r.fibers[t].state == State::kDone;
    if (all_done) return;
    if (!release_barriers()) {
      fail("deadlock: threads wait at barriers that the others never reach; " + describe_states());
      return;
    }
  }
}

}  // namespace

void run_grid(void* kernel_id, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mutex);
  const int64_t nthreads = int64_t(block.x) * block.y * block.z;
  TORCH_CHECK(nthreads >= 1 && nthreads <= r.props.maxThreadsPerBlock && block.z <= 64,
              "dit_emu: invalid block (", block.x, ", ", block.y, ", ", block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 &&
                  grid.z <= 65535,
              "dit_emu: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  if (dynamic_smem > kDefaultDynamicSmem) {
    auto it = r.max_dynamic_smem.find(kernel_id);
    const int64_t allowed = it == r.max_dynamic_smem.end() ? int64_t(kDefaultDynamicSmem) : it->second;
    TORCH_CHECK(int64_t(dynamic_smem) <= allowed, "dit_emu: launch with ", dynamic_smem,
                " bytes of dynamic shared memory but the kernel allows ", allowed,
                " (cudaFuncSetAttribute(MaxDynamicSharedMemorySize) missing or too small)");
  }
  TORCH_CHECK(dynamic_smem <= r.props.sharedMemPerBlockOptin, "dit_emu: ", dynamic_smem,
              " bytes of dynamic shared memory exceed the device's opt-in limit");
  r.launches++;
  r.error.clear();
  r.body = &body;
  r.nthreads = static_cast<int>(nthreads);
  if (r.fibers.size() < size_t(nthreads)) r.fibers.resize(nthreads);
  r.shuffle_slots.assign(nthreads, {});
  r.smem_storage.assign(dynamic_smem + 16, 0);
  r.smem_bytes = dynamic_smem;
  r.smem = dynamic_smem ? reinterpret_cast<unsigned char*>(
                              (reinterpret_cast<uintptr_t>(r.smem_storage.data()) + 15) & ~uintptr_t(15))
                        : nullptr;
  r.shared_epoch.clear();
  r.kernel_id = kernel_id;
  r.static_smem = 0;
  r.rng.seed(r.seed);
  gridDim = grid;
  blockDim = block;
  // Blocks in the configured order too: no block may depend on another's progress.
  const int64_t nblocks = int64_t(grid.x) * grid.y * grid.z;
  std::vector<int64_t> blocks(nblocks);
  std::iota(blocks.begin(), blocks.end(), 0);
  if (r.order == 1) std::reverse(blocks.begin(), blocks.end());
  if (r.order == 2) std::shuffle(blocks.begin(), blocks.end(), r.rng);
  for (int64_t b : blocks) {
    blockIdx = dim3(unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / (int64_t(grid.x) * grid.y)));
    run_block(static_cast<int>(nthreads));
    if (!r.error.empty()) break;
  }
  r.body = nullptr;
  r.current = -1;
  TORCH_CHECK(r.error.empty(), "dit_emu: ", r.error);
}

void syncthreads() { yield_to_scheduler(State::kAtBlockBarrier); }

void shfl_xor(unsigned int mask, const void* in, void* out, size_t bytes, int lane_mask, int width) {
  Runtime& r = rt();
  TORCH_CHECK(bytes <= 16, "dit_emu: shuffle of more than 16 bytes");
  if (mask != 0xffffffffu || width != 32) trap("only full-warp shuffles (mask 0xffffffff, width 32) are emulated");
  const int t = r.current;
  std::memcpy(r.shuffle_slots[t].data(), in, bytes);
  r.shuffles++;
  yield_to_scheduler(State::kAtWarpBarrier);  // every lane has published its value
  const int src = (t - t % 32) + ((t % 32) ^ lane_mask);
  if (src >= r.nthreads) trap("shuffle reads lane " + std::to_string(src % 32) + " of a partial warp");
  std::memcpy(out, r.shuffle_slots[src].data(), bytes);
  yield_to_scheduler(State::kAtWarpBarrier);  // every lane has read before the slots are reused
}

void* dynamic_smem() {
  Runtime& r = rt();
  TORCH_CHECK(r.smem != nullptr, "dit_emu: extern __shared__ used by a launch without dynamic shared memory");
  return r.smem;
}

void poison_shared(void* p, size_t bytes) {
  Runtime& r = rt();
  auto found = r.shared_epoch.find(p);
  if (found == r.shared_epoch.end()) {
    // First sight of this array in the launch: static + dynamic shared memory must fit the limit,
    // 48 KB without opt-in, else the opt-in maximum (the hardware rejects the launch otherwise).
    r.static_smem += static_cast<int64_t>(bytes);
    const int64_t total = r.static_smem + static_cast<int64_t>(r.smem_bytes);
    const bool opted_in = r.max_dynamic_smem.count(r.kernel_id) > 0;
    const int64_t limit = opted_in ? int64_t(r.props.sharedMemPerBlockOptin) : int64_t(kDefaultDynamicSmem);
    if (total > limit)
      fail("launch needs " + std::to_string(total) + " bytes of static + dynamic shared memory, more than " +
           std::to_string(limit) + (opted_in ? "" : " (no cudaFuncSetAttribute opt-in)"));
  }
  auto& epoch = r.shared_epoch[p];
  if (epoch != r.block_epoch) {
    std::memset(p, 0xFF, bytes);
    epoch = r.block_epoch;
  }
}

void device_assert(const char* cond, const char* msg, const char* file, int line) {
  trap(std::string("device-side assert triggered: ") + msg + " (" + cond + " at " + file + ":" +
       std::to_string(line) + ")");
}

bool in_kernel() { return rt().current >= 0; }

void misaligned_access(const void* p, size_t alignment, const char* type) {
  std::ostringstream os;
  os << "misaligned address: " << p << " is not " << alignment << "-byte aligned for the access in " << type;
  trap(os.str());
}

void set_max_dynamic_smem(void* kernel_id, int bytes) { rt().max_dynamic_smem[kernel_id] = bytes; }

cudaDeviceProp* device_properties() { return &rt().props; }

}  // namespace dit_emu

namespace at {
namespace cuda {
namespace detail {
const at::Generator& getDefaultCUDAGenerator(c10::DeviceIndex) {
  static const at::Generator gen = at::make_generator<at::CUDAGeneratorImpl>();
  return gen;
}
}  // namespace detail
}  // namespace cuda
}  // namespace at

namespace {

// order: 0 ascending, 1 descending, 2 random (seeded); sm_count: what sm_count() reports.
void emu_configure(int64_t order, int64_t seed, int64_t sm_count) {
  TORCH_CHECK(order >= 0 && order <= 2, "order must be 0, 1 or 2");
  TORCH_CHECK(sm_count >= 1, "sm_count must be >= 1");
  auto& r = dit_emu::rt();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.order = static_cast<int>(order);
  r.seed = static_cast<uint64_t>(seed);
  r.props.multiProcessorCount = static_cast<int>(sm_count);
}

// (launches, blocks, block barriers, shuffles) since load.
std::vector<int64_t> emu_stats() {
  auto& r = dit_emu::rt();
  return {r.launches, r.blocks, r.barriers, r.shuffles};
}

// Seed and offset of the emulated default CUDA generator.
void emu_manual_seed(int64_t seed, int64_t offset) {
  auto gen = at::cuda::detail::getDefaultCUDAGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_current_seed(static_cast<uint64_t>(seed));
  gen.set_offset(static_cast<uint64_t>(offset));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dit_emu, m) {
  m.def("_emu_configure(int order, int seed, int sm_count) -> ()", &emu_configure);
  m.def("_emu_stats() -> int[]", &emu_stats);
  m.def("_emu_manual_seed(int seed, int offset) -> ()", &emu_manual_seed);
}
