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

// ---- per-sequence dynamic INT8 (mode 3's conv input) ----

constexpr int kPeakThreads = 256;
constexpr int kPeakRows = 16;  // channels per block of the peak pass

// The peak |x| of each sequence's real positions: a block reduces kPeakRows channels, then one
// atomicMax on the float's bits (non-negative floats order like their bit patterns; the maximum
// does not depend on the order, so the result is deterministic).
__global__ void sequence_peak_kernel(const float* __restrict__ x, unsigned* __restrict__ peak_bits,
                                     const int64_t* __restrict__ seq_lens, int64_t dim,
                                     int64_t len) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  __shared__ float warp_peak[kPeakThreads / 32];
  const int64_t b = blockIdx.y;
  const int64_t real = seq_lens == nullptr ? len : (seq_lens[b] < len ? seq_lens[b] : len);
  float peak = 0.0f;
  const int64_t e_end = (blockIdx.x + 1) * static_cast<int64_t>(kPeakRows);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kPeakRows); e < e_end && e < dim; ++e) {
    const float* row = x + (b * dim + e) * len;
    for (int64_t t = threadIdx.x; t < real; t += kPeakThreads) peak = fmaxf(peak, fabsf(row[t]));
  }
#pragma unroll
  for (int d = 16; d > 0; d /= 2) peak = fmaxf(peak, __shfl_xor_sync(0xffffffffu, peak, d));
  if (threadIdx.x % 32 == 0) warp_peak[threadIdx.x / 32] = peak;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kPeakThreads / 32; ++w) peak = fmaxf(peak, warp_peak[w]);
    atomicMax(peak_bits + b, __float_as_uint(peak));
  }
}

__device__ __forceinline__ float sequence_scale(unsigned bits) {
  const float peak = __uint_as_float(bits);
  return peak > 0.0f ? __fdiv_rn(peak, 127.0f) : 1.0f;
}

__global__ void quantize_per_sequence_kernel(const float* __restrict__ x, int8_t* __restrict__ out,
                                             float* __restrict__ scales,
                                             const unsigned* __restrict__ peak_bits, int64_t n,
                                             Rounding rule) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  const int64_t b = blockIdx.y;
  const float scale = sequence_scale(peak_bits[b]);
  const float inv_scale = __frcp_rn(scale);
  if (blockIdx.x == 0 && threadIdx.x == 0) scales[b] = scale;
  const float* xb = x + b * n;
  int8_t* ob = out + b * n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    ob[i] = quantize_int8_fast(xb[i], scale, inv_scale, rule);  // quantize_int8's codes
  }
}

cudaError_t launch_quantize_int8_per_sequence(const float* x, int8_t* out, float* scales,
                                              unsigned* peak_bits, const int64_t* seq_lens,
                                              int64_t batch, int64_t dim, int64_t len,
                                              int rounding, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  if (batch > 65535) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(peak_bits, 0, static_cast<size_t>(batch) * sizeof(unsigned),
                                    stream);
  if (err != cudaSuccess) return err;
  const int64_t n = dim * len;
  if (n > 0) {
    const dim3 peak_grid(static_cast<unsigned>((dim + kPeakRows - 1) / kPeakRows),
                         static_cast<unsigned>(batch));
    launch::launch_kernel(sequence_peak_kernel, peak_grid, kPeakThreads, 0, stream, x, peak_bits,
                          seq_lens, dim, len);
  }
  const int threads = 256;
  const int64_t wanted = (n + threads - 1) / threads;
  const dim3 grid(static_cast<unsigned>(wanted < 1 ? 1 : (wanted < 4096 ? wanted : 4096)),
                  static_cast<unsigned>(batch));
  launch::launch_kernel(quantize_per_sequence_kernel, grid, threads, 0, stream, x, out, scales,
                        peak_bits, n, static_cast<Rounding>(rounding));
  return cudaGetLastError();
}

}  // namespace quamba
