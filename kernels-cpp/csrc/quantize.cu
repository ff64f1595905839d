#include "common.cuh"
#include "quantize.h"

namespace quamba {

__global__ void quantize_int8_kernel(const float* __restrict__ x, int8_t* __restrict__ out, int64_t n,
                                     float scale, Rounding rule) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  const float inv_scale = __frcp_rn(scale);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = quantize_int8_fast(x[i], scale, inv_scale, rule);
  }
}

cudaError_t launch_quantize_int8(const float* x, int8_t* out, int64_t n, float scale, int rounding,
                                 cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t wanted = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < 65535 ? wanted : 65535);
  launch::launch_kernel(quantize_int8_kernel, blocks, threads, 0, stream, x, out, n, scale,
                                                       static_cast<Rounding>(rounding));
  return cudaGetLastError();
}

}  // namespace quamba
