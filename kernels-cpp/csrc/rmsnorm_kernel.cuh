// Residual add + RMSNorm (reference_ops.rmsnorm):
//   r = x.float() + residual;  ms = float32(sum_f64(r^2) / D);  inv = 1 / sqrt(ms + eps);
//   y = (r * inv) * weight;     out = Q8(y, out_scale, rounding) or y in a float dtype.
// One block of 256 threads per row. The float64 sum has a fixed order that depends only on D:
// each thread adds its elements in increasing index order, then a xor-butterfly over the warp and
// the 8 warp sums in warp order. No autotuning: the same D always takes the same path.
// Few rows (decode: one block per row, latency-bound): x, residual and weight are all loaded
// before the reduction (one global round trip) and the reduction has a single barrier.
#pragma once
#include "common.cuh"
#include "rmsnorm.h"

namespace quamba {
namespace rmsnorm_detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename TOut>
__device__ __forceinline__ TOut finish(float y, float out_scale, float inv_out_scale,
                                       Rounding rule) {
  if constexpr (sizeof(TOut) == 1) {
    return quantize_int8_fast(y, out_scale, inv_out_scale, rule);
  } else {
    return from_float<TOut>(y);
  }
}

__device__ __forceinline__ double add_square(double sum, float r) {
  const double v = static_cast<double>(r);
  return __dadd_rn(sum, __dmul_rn(v, v));  // the square of a float32 is exact in float64
}

// 1 / sqrt(float32(total / D) + eps) where total is the block-wide sum of the threads' partial
// sums, reduced in a fixed order. Every thread of the block must call it. kOneBarrier (few rows):
// every thread reads the 8 warp sums and finishes the computation itself (same operations, same
// value), saving a barrier; otherwise thread 0 finishes and a second barrier shares the result
// (less issue work when many rows compete for the SMs).
template <bool kOneBarrier>
__device__ __forceinline__ float block_inv_rms(double sum, int64_t dim, float eps) {
  __shared__ double warp_sums[kWarps];
  __shared__ float inv_shared;
#pragma unroll
  for (int offset = 16; offset >= 1; offset /= 2) {
    sum = __dadd_rn(sum, __shfl_xor_sync(0xffffffffu, sum, offset));
  }
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  if (kOneBarrier || threadIdx.x == 0) {
    double total = warp_sums[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) total = __dadd_rn(total, warp_sums[w]);
    const float mean_square = __double2float_rn(__ddiv_rn(total, static_cast<double>(dim)));
    const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean_square, eps)));
    if constexpr (kOneBarrier) return inv;
    inv_shared = inv;
  }
  __syncthreads();
  return inv_shared;
}

// D % 8 == 0: thread i owns the groups of 8 elements i, i + 256, ... (at most kIters), kept in
// registers between the two passes. kDecode (few rows, D <= 4096): the weights are loaded with x
// (the second pass needs no global load) and the reduction has one barrier.
template <typename TX, typename TW, typename TOut, int kIters, bool kAligned, bool kDecode>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_vec8_kernel(const TX* __restrict__ x, const float* __restrict__ residual,
                        const TW* __restrict__ weight, TOut* __restrict__ out,
                        float* __restrict__ residual_out, int64_t dim, float eps, float out_scale,
                        Rounding rule) {
  if constexpr (kDecode) {
    // While the previous kernel finishes: the weight and the residual row (HBM in a decode
    // step of a large model) into L2 (see launch.cuh).
    launch::prefetch_l2_range(weight, dim * static_cast<int64_t>(sizeof(TW)));
    if (residual != nullptr) {
      launch::prefetch_l2_range(residual + blockIdx.x * dim,
                                dim * static_cast<int64_t>(sizeof(float)));
    }
  }
  launch::start_after_prior_grids();  // after the L2 prefetch (decode): see launch.cuh
  const int64_t row = blockIdx.x;
  const int64_t groups = dim / 8;
  const TX* xr = x + row * dim;
  const float* rr = residual != nullptr ? residual + row * dim : nullptr;
  float* ro = residual_out != nullptr ? residual_out + row * dim : nullptr;
  const bool has_weight = weight != nullptr;

  float r[kIters][8];
  float res[kIters][8];
  float w[kDecode ? kIters : 1][8];
  double sum = 0.0;
  // All loads first (independent of each other), then the arithmetic.
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t g = threadIdx.x + static_cast<int64_t>(it) * kThreads;
    if (g < groups) {
      load8<TX, kAligned>(xr + g * 8, r[it]);
      if (rr != nullptr) load8<float, kAligned>(rr + g * 8, res[it]);
      if constexpr (kDecode) {
        if (has_weight) load8<TW, kAligned>(weight + g * 8, w[it]);
      }
    }
  }
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t g = threadIdx.x + static_cast<int64_t>(it) * kThreads;
    if (g < groups) {
      if (rr != nullptr) {
#pragma unroll
        for (int i = 0; i < 8; ++i) r[it][i] = __fadd_rn(r[it][i], res[it][i]);
      }
      if (ro != nullptr) store8<float, kAligned>(ro + g * 8, r[it]);
#pragma unroll
      for (int i = 0; i < 8; ++i) sum = add_square(sum, r[it][i]);
    }
  }
  const float inv_out_scale = __frcp_rn(out_scale);
  const float inv = block_inv_rms<kDecode>(sum, dim, eps);

  TOut* orow = out + row * dim;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t g = threadIdx.x + static_cast<int64_t>(it) * kThreads;
    if (g < groups) {
      float wv[8];
      if (has_weight) {
        if constexpr (kDecode) {
#pragma unroll
          for (int i = 0; i < 8; ++i) wv[i] = w[it][i];
        } else {
          load8<TW, kAligned>(weight + g * 8, wv);
        }
      }
      TOut result[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        float y = __fmul_rn(r[it][i], inv);
        if (has_weight) y = __fmul_rn(y, wv[i]);
        result[i] = finish<TOut>(y, out_scale, inv_out_scale, rule);
      }
      store8<TOut, kAligned>(orow + g * 8, result);
    }
  }
}

// Any D: thread i owns elements i, i + 256, ... in that order; r is recomputed in the second pass
// (same operations, same values).
template <typename TX, typename TW, typename TOut>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_any_dim_kernel(const TX* __restrict__ x, const float* __restrict__ residual,
                           const TW* __restrict__ weight, TOut* __restrict__ out,
                           float* __restrict__ residual_out, int64_t dim, float eps,
                           float out_scale, Rounding rule) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  const int64_t row = blockIdx.x;
  const TX* xr = x + row * dim;
  const float* rr = residual != nullptr ? residual + row * dim : nullptr;
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    float r = to_float(xr[i]);
    if (rr != nullptr) r = __fadd_rn(r, rr[i]);
    if (residual_out != nullptr) residual_out[row * dim + i] = r;
    sum = add_square(sum, r);
  }
  const float inv = block_inv_rms<false>(sum, dim, eps);
  const float inv_out_scale = __frcp_rn(out_scale);
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    float r = to_float(xr[i]);
    if (rr != nullptr) r = __fadd_rn(r, rr[i]);
    float y = __fmul_rn(r, inv);
    if (weight != nullptr) y = __fmul_rn(y, to_float(weight[i]));
    out[row * dim + i] = finish<TOut>(y, out_scale, inv_out_scale, rule);
  }
}

template <typename TX, typename TW, typename TOut>
cudaError_t run(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  if (a.dim < 1 || a.dim > kRmsNormMaxDim || a.rows > 0x7fffffff) return cudaErrorInvalidValue;
  const TX* x = static_cast<const TX*>(a.x);
  const TW* w = static_cast<const TW*>(a.weight);
  TOut* out = static_cast<TOut*>(a.out);
  const Rounding rule = static_cast<Rounding>(a.rounding);
  const unsigned int blocks = static_cast<unsigned int>(a.rows);
  if (a.dim % 8 != 0) {
    launch::launch_kernel(rmsnorm_any_dim_kernel<TX, TW, TOut>, blocks, kThreads, 0, stream,
        x, a.residual, w, out, a.residual_out, a.dim, a.eps, a.out_scale, rule);
    return cudaGetLastError();
  }
  // The aligned and unaligned variants and both register budgets add elements in the same order.
  const bool aligned = is_aligned(a.x, sizeof(TX) * 8) && is_aligned(a.out, sizeof(TOut) * 8) &&
                       (a.residual == nullptr || is_aligned(a.residual, 32)) &&
                       (a.residual_out == nullptr || is_aligned(a.residual_out, 32)) &&
                       (a.weight == nullptr || is_aligned(a.weight, sizeof(TW) * 8));
  const bool small = a.dim <= 8 * 2 * kThreads;
  // Few rows (decode; the grid does not fill the GPU): the latency-oriented variant. Both add
  // the squares in the same order, so the results are the same.
  const bool decode = small && a.rows <= 64;
#define QUAMBA_RMSNORM_LAUNCH(ITERS, ALIGNED, DECODE)                                     \
  launch::launch_kernel(rmsnorm_vec8_kernel<TX, TW, TOut, ITERS, ALIGNED, DECODE>, blocks,       \
                        kThreads, 0, stream,                                               \
      x, a.residual, w, out, a.residual_out, a.dim, a.eps, a.out_scale, rule)
  if (decode && aligned) {
    QUAMBA_RMSNORM_LAUNCH(2, true, true);
  } else if (decode) {
    QUAMBA_RMSNORM_LAUNCH(2, false, true);
  } else if (aligned && small) {
    QUAMBA_RMSNORM_LAUNCH(2, true, false);
  } else if (aligned) {
    QUAMBA_RMSNORM_LAUNCH(8, true, false);
  } else if (small) {
    QUAMBA_RMSNORM_LAUNCH(2, false, false);
  } else {
    QUAMBA_RMSNORM_LAUNCH(8, false, false);
  }
#undef QUAMBA_RMSNORM_LAUNCH
  return cudaGetLastError();
}

template <typename TX, typename TW>
cudaError_t dispatch_out(const RmsNormArgs& a, cudaStream_t stream) {
  switch (a.out_type) {
    case ElemType::Int8: return run<TX, TW, int8_t>(a, stream);
    case ElemType::Float16: return run<TX, TW, __half>(a, stream);
    case ElemType::BFloat16: return run<TX, TW, __nv_bfloat16>(a, stream);
    case ElemType::Float32: return run<TX, TW, float>(a, stream);
  }
  return cudaErrorInvalidValue;
}

// Weight of x's dtype or float32.
template <typename TX>
cudaError_t dispatch_weight(const RmsNormArgs& a, cudaStream_t stream) {
  if (a.weight_type == ElemType::Float32) return dispatch_out<TX, float>(a, stream);
  if (a.weight_type == a.x_type) return dispatch_out<TX, TX>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace rmsnorm_detail
}  // namespace quamba
