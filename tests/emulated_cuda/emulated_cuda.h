// A host emulation of the CUDA features csrc/cuda/*.cu use, so that CI machines without a
// GPU run those kernels (tests/test_emulated_cuda.py rewrites each launch `k<<<g, b, 0,
// stream>>>(args)` into a call of one of the launchers below).
//
// launch_threads runs each block's CUDA threads as fibers (ucontext) on one OS thread, the
// blocks one after another: __shared__ becomes `static` (one block at a time uses it), a
// thread runs until it waits at __syncthreads or at a shuffle, which needs all 32 lanes of
// its warp; when no thread can go on, a barrier or shuffle was skipped by some and the run
// stops with "deadlock". This checks indexing, reductions, barriers and warp-synchronous
// code; it does not model memory ordering without barriers, timing, or the device's
// arithmetic (host libm, not CUDA's). launch_sequential runs the threads one by one, for
// kernels without barriers or shuffles (calling either there stops with a message).
#pragma once

#include <ATen/ATen.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

// One emulated block: its threads as fibers, the barrier of the block and of each warp.
struct Barrier {
  unsigned expected = 0, arrived = 0;
  long generation = 0;
};
struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  dim3 thread;
  bool finished = false;
};
struct Block {
  std::vector<Fiber> fibers;
  std::vector<Barrier> warp_barriers;
  Barrier block_barrier;
  std::vector<unsigned char> warp_slots;  // 8 bytes per lane
  std::function<void()> body;
  ucontext_t scheduler;
  unsigned current = 0;
  long progress = 0;  // arrivals and finished threads: none in a whole round is a deadlock
};
inline Block* running_block = nullptr;  // the block being run by launch_threads, if any

inline void wait_at(Barrier& barrier) {
  Block& block = *running_block;
  const long generation = barrier.generation;
  ++block.progress;
  if (++barrier.arrived == barrier.expected) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  while (barrier.generation == generation) swapcontext(&block.fibers[block.current].context, &block.scheduler);
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#undef CUDA_KERNEL_ASSERT  // ATen defines it for the host
#define CUDA_KERNEL_ASSERT(condition)                               \
  do {                                                              \
    if (!(condition)) {                                             \
      std::fprintf(stderr, "device-side assert: %s\n", #condition); \
      std::abort();                                                 \
    }                                                               \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define C10_CUDA_CHECK(call) (call)

using cudaStream_t = int;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxThreadsPerMultiProcessor,
  cudaDevAttrMaxThreadsPerBlock
};
// An H100's attributes by default; the checks vary the SM count to vary launch shapes.
inline int emulated_sm_count = 132;
inline int cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  *value = attribute == cudaDevAttrMultiProcessorCount           ? emulated_sm_count
           : attribute == cudaDevAttrMaxThreadsPerMultiProcessor ? 2048
                                                                 : 1024;
  return 0;
}

// Threads alone limit the blocks per SM here (a GPU also counts registers and shared memory).
template <typename Kernel>
inline int cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int threads, size_t) {
  *blocks = std::min(32, 2048 / threads);
  return 0;
}

namespace c10 {
namespace cuda {
inline int current_device() { return 0; }
inline cudaStream_t getCurrentCUDAStream() { return 0; }
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10

// The CPU has no at::mm or at::bmm with an out_dtype (CUDA's half inputs, float32 result): upcast.
inline at::Tensor emulated_mm(const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b); }
inline at::Tensor emulated_mm(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype) {
  return at::mm(a.to(out_dtype), b.to(out_dtype));
}
inline at::Tensor& emulated_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  return at::mm_out(out, a, b);
}
inline at::Tensor& emulated_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                                   at::ScalarType out_dtype) {
  return at::mm_out(out, a.to(out_dtype), b.to(out_dtype));
}
inline at::Tensor& emulated_bmm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  return at::bmm_out(out, a, b);
}
inline at::Tensor& emulated_bmm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                                    at::ScalarType out_dtype) {
  return at::bmm_out(out, a.to(out_dtype), b.to(out_dtype));
}

inline void __syncthreads() {
  if (running_block == nullptr) {
    std::fprintf(stderr, "__syncthreads in a kernel launched sequentially\n");
    std::abort();
  }
  wait_at(running_block->block_barrier);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "one slot per lane holds 8 bytes");
  if (mask != 0xffffffffu || running_block == nullptr) {
    std::fprintf(stderr, "__shfl_xor_sync: only full-warp shuffles in threaded launches are emulated\n");
    std::abort();
  }
  Block& block = *running_block;
  const unsigned thread = block.current, lane = thread % 32;
  unsigned char* slots = block.warp_slots.data() + (thread / 32) * 32 * 8;
  std::memcpy(slots + lane * 8, &value, sizeof(T));
  wait_at(block.warp_barriers[thread / 32]);  // every lane has written
  T result;
  std::memcpy(&result, slots + (lane ^ lane_mask) * 8, sizeof(T));
  wait_at(block.warp_barriers[thread / 32]);  // every lane has read before the slots are reused
  return result;
}

inline int atomicAdd(int* address, int value) {  // one OS thread: a plain add is atomic
  const int old = *address;
  *address += value;
  return old;
}
using std::max;
using std::min;

inline dim3 as_dim3(dim3 d) { return d; }
inline dim3 as_dim3(int64_t n) { return dim3(static_cast<unsigned>(n)); }

inline void check_launch(dim3 grid, dim3 block) {
  if (block.x * block.y * block.z > 1024 || block.z > 64 || grid.y > 65535 || grid.z > 65535) {
    std::fprintf(stderr, "launch beyond CUDA's limits: grid (%u, %u, %u), block (%u, %u, %u)\n", grid.x, grid.y, grid.z,
                 block.x, block.y, block.z);
    std::abort();
  }
}

inline void run_fiber() {
  Block& block = *running_block;
  block.body();
  block.fibers[block.current].finished = true;
  ++block.progress;
}  // returns to block.scheduler (uc_link)

// Runs every block: its threads as fibers, resumed in turn until all have finished.
template <typename Kernel, typename Grid, typename Size, typename... Args>
void launch_threads(Kernel kernel, Grid grid_size, Size block_size, Args... args) {
  const dim3 grid = as_dim3(grid_size), shape = as_dim3(block_size);
  check_launch(grid, shape);
  const unsigned n = shape.x * shape.y * shape.z, warps = (n + 31) / 32;
  constexpr size_t kStack = 64 * 1024;
  Block block;
  block.fibers.resize(n);
  block.warp_slots.resize(warps * 32 * 8);
  block.body = [&] { kernel(args...); };
  blockDim = shape;
  gridDim = grid;
  running_block = &block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        block.block_barrier = Barrier{n};
        block.warp_barriers.assign(warps, Barrier{});
        for (unsigned w = 0; w < warps; ++w) block.warp_barriers[w].expected = std::min(32u, n - 32 * w);
        for (unsigned t = 0; t < n; ++t) {
          Fiber& fiber = block.fibers[t];
          fiber.thread = dim3(t % shape.x, (t / shape.x) % shape.y, t / (shape.x * shape.y));
          fiber.finished = false;
          fiber.stack.resize(kStack);
          getcontext(&fiber.context);
          fiber.context.uc_stack.ss_sp = fiber.stack.data();
          fiber.context.uc_stack.ss_size = kStack;
          fiber.context.uc_link = &block.scheduler;
          makecontext(&fiber.context, run_fiber, 0);
        }
        for (unsigned finished = 0; finished < n;) {
          const long before = block.progress;
          finished = 0;
          for (unsigned t = 0; t < n; ++t) {
            if (block.fibers[t].finished) {
              ++finished;
              continue;
            }
            block.current = t;
            threadIdx = block.fibers[t].thread;
            swapcontext(&block.scheduler, &block.fibers[t].context);
          }
          if (finished < n && block.progress == before) {
            std::fprintf(stderr,
                         "deadlock in block (%u, %u, %u): %u of %u threads finished, the others wait at a "
                         "barrier or shuffle that some threads skipped\n",
                         bx, by, bz, finished, n);
            std::exit(3);
          }
        }
      }
  running_block = nullptr;
}

template <typename Kernel, typename Grid, typename Size, typename... Args>
void launch_sequential(Kernel kernel, Grid grid_size, Size block_size, Args... args) {
  const dim3 grid = as_dim3(grid_size), block = as_dim3(block_size);
  check_launch(grid, block);
  gridDim = grid;
  blockDim = block;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx)
      for (unsigned ty = 0; ty < block.y; ++ty)
        for (unsigned tx = 0; tx < block.x; ++tx) {
          blockIdx = dim3(bx, by);
          threadIdx = dim3(tx, ty);
          kernel(args...);
        }
}
