#pragma once
// Kernel launches with programmatic dependent launch (PDL, sm_90+).
//
// A decode step is a chain of small kernels, each a few microseconds long, so the gap between one
// kernel's end and the next one's start is a large share of a token's time. With PDL the next
// kernel in the stream is scheduled while the current one is still running: its blocks become
// resident and wait in `start_after_prior_grids()` until the previous grid has completed and its
// memory is visible, which hides the launch and block-scheduling latency.
//
// The contract every kernel of this package keeps:
//   * its first statement is start_after_prior_grids(), which waits before the kernel reads or
//     writes any global memory, so it never sees a predecessor's unfinished output and never
//     overwrites anything a predecessor still reads;
//     The one exception is an L2 prefetch (prefetch_l2 below): it moves no data into the
//     kernel and cannot go stale, because L2 is where every write lands (the point of
//     coherence), so the GEMVs use the wait to pull their weights into L2 and the decode
//     step's norm and scan their weights and state. A second exception: a GEMV whose caller
//     promises a constant weight (constant_w: not written by the kernel just before it) copies
//     its weights into shared memory before the wait; whatever wrote them earlier has completed
//     (the next point: at most one kernel runs ahead), and cp.async.cg reads through L2;
//   * the same call then lets the kernel after it be scheduled in turn (at most one kernel runs
//     ahead: a successor can only start once every block of this kernel has passed its wait, i.e.
//     once this kernel's predecessor has finished). Letting the successor be scheduled before
//     the wait instead (several kernels resident at once, the GEMVs' weight copies starting
//     earlier) measured slower on an H100: 2.8B batch-1 decode 1.85 -> 1.88-1.98 ms per step
//     (benchmarks/README.md, session 20).
// Because of the first point, a kernel that waited has a predecessor that completed, so ordering is
// transitive along the stream exactly as without PDL, and results are bit-identical either way.
//
// PDL is used only when it is enabled (set_programmatic_launch), the device is sm_90 or newer, and
// the kernel's binary was compiled for sm_90 or newer (a kernel JIT-compiled from older PTX has no
// wait instruction, so it gets an ordinary launch).
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <utility>

#include <cuda_runtime.h>

#include "launch.h"

namespace quamba {
namespace launch {

// The first statement of every kernel (after read-only L2 prefetches: the contract above): wait
// until the previous grid in the stream has completed and its memory is visible, then let the next
// grid be scheduled. A no-op without PDL (an ordinary launch, or a build for an older GPU).
__device__ __forceinline__ void start_after_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Ask for the 128-byte line holding `p` to be brought into L2 (a hint: no data is returned).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// prefetch_l2 of every 128-byte line of [p, p + bytes), spread over the block's threads.
__device__ __forceinline__ void prefetch_l2_range(const void* p, int64_t bytes) {
  if (p == nullptr || bytes <= 0) return;
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes);
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{127};
  for (uintptr_t line = first + 128 * uintptr_t{threadIdx.x}; line < end;
       line += 128 * uintptr_t{blockDim.x}) {
    prefetch_l2(reinterpret_cast<const void*>(line));
  }
}


// Whether `kernel` may be launched with PDL on the current device (cached per device and kernel).
inline bool programmatic_launch_supported(const void* kernel) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  static std::mutex mutex;
  static std::unordered_map<const void*, unsigned> cache[64];  // per device: kernel -> usable
  if (device < 0 || device >= 64) return false;
  std::lock_guard<std::mutex> lock(mutex);
  auto& per_kernel = cache[device];
  auto found = per_kernel.find(kernel);
  if (found != per_kernel.end()) return found->second != 0;
  int major = 0;
  cudaFuncAttributes attributes{};
  const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
                      cudaSuccess &&
                  major >= 9 && cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess &&
                  attributes.ptxVersion >= 90 && attributes.binaryVersion >= 90;
  per_kernel.emplace(kernel, ok ? 1u : 0u);
  return ok;
}

// kernel<<<grid, block, smem, stream>>>(args...), with PDL when `programmatic` is set and PDL is
// enabled and supported. Returns the launch's error, which also stays recorded for the caller's
// cudaGetLastError().
template <typename... Params, typename... Args>
cudaError_t launch_kernel_as(bool programmatic, void (*kernel)(Params...), dim3 grid, dim3 block,
                             size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  if (programmatic && programmatic_launch_enabled() &&
      programmatic_launch_supported(reinterpret_cast<const void*>(kernel))) {
    attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute[0].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// The launch every kernel of the package uses: PDL where it is enabled and supported.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args&&... args) {
  return launch_kernel_as(true, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

// An ordinary launch (never PDL), for grids of long-running blocks that do not fill the GPU (the
// prefill scan at small E): launched early, such a grid is placed on whichever SMs the previous
// kernel frees first, which packs several blocks onto some SMs while others stay idle (measured:
// 130m prefill replayed from a graph 29% slower). Launched after its predecessor, its blocks
// spread over all SMs. The kernel's start_after_prior_grids() then returns at once.
template <typename... Params, typename... Args>
cudaError_t launch_kernel_spread(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                 cudaStream_t stream, Args&&... args) {
  return launch_kernel_as(false, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}

}  // namespace launch
}  // namespace quamba
