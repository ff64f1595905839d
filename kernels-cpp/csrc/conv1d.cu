// Causal depthwise conv1d + bias + SiLU.
//
// INT8 path (bit-exact with reference_ops.conv1d_int8): acc = sum_k w_q[k] * x_q[t-K+1+k] is an
// integer below 2^17, so float accumulation is exact; scale = float32(s_w * s_x) and
// bias = float32(s_b * b_q) are float64 products rounded once; v = scale * acc + bias (two
// roundings); SiLU v / (1 + exp(-v)) with accurate expf and IEEE division; Q8(v, s_out) or the
// float32 value.
// Float path (bit-exact with fp_ops.causal_conv1d_ref): acc = w0*x0, acc = acc + wk*xk for
// k = 1..K-1, then + bias, every operation rounded on its own; SiLU; one rounding to x's dtype.
//
// Work split: one thread computes 8 consecutive outputs of one (batch, channel) row; consecutive
// threads take consecutive chunks of a row, so loads and stores are coalesced for any length.
#include "common.cuh"
#include "conv1d.h"

namespace quamba {
namespace {

constexpr int kItems = 8;
constexpr int kThreads = 128;

struct ConvScalars {
  double s_x;
  const float* s_x_per_seq;
  double s_w;
  double s_b;
  float out_scale;
  Rounding rule;
  bool silu;
};

// float32(s_w * s_x) for sequence `batch`, formed in float64 like the reference.
__device__ __forceinline__ float int8_input_scale(const ConvScalars& c, int64_t batch) {
  const double s_x = c.s_x_per_seq != nullptr ? static_cast<double>(c.s_x_per_seq[batch]) : c.s_x;
  return __double2float_rn(__dmul_rn(s_x, c.s_w));
}

__device__ __forceinline__ float int8_bias(const int8_t* bias, int64_t channel, double s_b) {
  return __double2float_rn(__dmul_rn(static_cast<double>(bias[channel]), s_b));
}

// INT8 epilogue: v = scale * acc (+ bias), SiLU.
__device__ __forceinline__ float int8_value(float acc, float scale, bool has_bias, float bias,
                                            bool silu) {
  float v = __fmul_rn(scale, acc);
  if (has_bias) v = __fadd_rn(v, bias);
  return silu ? silu_exact(v) : v;
}

// Float path: ((w0*x0 + w1*x1) + ...) + bias, then SiLU.
template <int K>
__device__ __forceinline__ float float_value(const float (&w)[K], const float* window,
                                             bool has_bias, float bias, bool silu) {
  float acc = __fmul_rn(w[0], window[0]);
#pragma unroll
  for (int k = 1; k < K; ++k) acc = __fadd_rn(acc, __fmul_rn(w[k], window[k]));
  if (has_bias) acc = __fadd_rn(acc, bias);
  return silu ? silu_exact(acc) : acc;
}

template <int K, typename TIn, typename TW, typename TOut, bool kInt8, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    conv1d_fwd_kernel(const TIn* __restrict__ x, const TW* __restrict__ weight,
                      const TW* __restrict__ bias, TOut* __restrict__ out, int64_t rows,
                      int64_t dim, int64_t seqlen, ConvScalars c) {
  const int64_t chunks_per_row = (seqlen + kItems - 1) / kItems;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (item >= rows * chunks_per_row) return;
  const int64_t row = item / chunks_per_row;
  const int64_t t0 = (item - row * chunks_per_row) * kItems;
  const int64_t channel = row % dim;
  const int64_t batch = row / dim;
  const TIn* xr = x + row * seqlen;

  // window[j] holds x[t0 - (K - 1) + j]; zero left padding (causal).
  float window[kItems + K - 1];
#pragma unroll
  for (int j = 0; j < K - 1; ++j) {
    const int64_t t = t0 - (K - 1) + j;
    window[j] = t >= 0 ? to_float(xr[t]) : 0.0f;
  }
  const bool full = t0 + kItems <= seqlen;
  if (full) {
    float body[kItems];
    load8<TIn, kAligned>(xr + t0, body);
#pragma unroll
    for (int i = 0; i < kItems; ++i) window[K - 1 + i] = body[i];
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      window[K - 1 + i] = t0 + i < seqlen ? to_float(xr[t0 + i]) : 0.0f;
    }
  }

  float w[K];
#pragma unroll
  for (int k = 0; k < K; ++k) w[k] = to_float(weight[channel * K + k]);
  const bool has_bias = bias != nullptr;

  TOut result[kItems];
  if constexpr (kInt8) {
    const float scale = int8_input_scale(c, batch);
    const float b = has_bias ? int8_bias(bias, channel, c.s_b) : 0.0f;
    const float inv_out_scale = __frcp_rn(c.out_scale);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      float acc = 0.0f;  // exact: integers below 2^17
#pragma unroll
      for (int k = 0; k < K; ++k) acc += w[k] * window[i + k];
      const float v = int8_value(acc, scale, has_bias, b, c.silu);
      if constexpr (sizeof(TOut) == 1) {
        result[i] = quantize_int8_fast(v, c.out_scale, inv_out_scale, c.rule);
      } else {
        result[i] = v;
      }
    }
  } else {
    const float b = has_bias ? to_float(bias[channel]) : 0.0f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      result[i] = from_float<TOut>(float_value<K>(w, window + i, has_bias, b, c.silu));
    }
  }

  TOut* out_row = out + row * seqlen;
  if (full) {
    store8<TOut, kAligned>(out_row + t0, result);
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (t0 + i < seqlen) out_row[t0 + i] = result[i];
    }
  }
}

// One thread per (batch, channel): out = conv of the window [state, x]; the state shifts left.
template <int K, typename TIn, typename TW, typename TOut, bool kInt8>
__global__ void conv1d_update_kernel(const TIn* __restrict__ x, TIn* __restrict__ state,
                                     const TW* __restrict__ weight, const TW* __restrict__ bias,
                                     TOut* __restrict__ out, int64_t rows, int64_t dim,
                                     ConvScalars c) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const int64_t channel = row % dim;
  const int64_t batch = row / dim;
  TIn* st = state + row * (K - 1);
  TIn raw[K];
#pragma unroll
  for (int k = 0; k < K - 1; ++k) raw[k] = st[k];
  raw[K - 1] = x[row];
  float window[K];
  float w[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    window[k] = to_float(raw[k]);
    w[k] = to_float(weight[channel * K + k]);
  }
  const bool has_bias = bias != nullptr;

  if constexpr (kInt8) {
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) acc += w[k] * window[k];
    const float b = has_bias ? int8_bias(bias, channel, c.s_b) : 0.0f;
    const float v = int8_value(acc, int8_input_scale(c, batch), has_bias, b, c.silu);
    if constexpr (sizeof(TOut) == 1) {
      out[row] = quantize_int8(v, c.out_scale, c.rule);
    } else {
      out[row] = v;
    }
  } else {
    const float b = has_bias ? to_float(bias[channel]) : 0.0f;
    out[row] = from_float<TOut>(float_value<K>(w, window, has_bias, b, c.silu));
  }
#pragma unroll
  for (int k = 0; k < K - 1; ++k) st[k] = raw[k + 1];
}

ConvScalars scalars_of(const Conv1dArgs& a) {
  return ConvScalars{a.s_x, a.s_x_per_seq, a.s_w, a.s_b, a.out_scale,
                     static_cast<Rounding>(a.rounding), a.silu};
}

template <int K, typename TIn, typename TW, typename TOut, bool kInt8>
cudaError_t run_fwd(const Conv1dArgs& a, cudaStream_t stream) {
  const int64_t rows = a.batch * a.dim;
  const int64_t chunks = rows * ((a.seqlen + kItems - 1) / kItems);
  if (chunks == 0) return cudaSuccess;
  const bool aligned = a.seqlen % kItems == 0 && is_aligned(a.x, sizeof(TIn) * kItems) &&
                       is_aligned(a.out, sizeof(TOut) * kItems);
  const unsigned int blocks = blocks_for(chunks, kThreads);
  const TIn* x = static_cast<const TIn*>(a.x);
  const TW* w = static_cast<const TW*>(a.weight);
  const TW* bias = static_cast<const TW*>(a.bias);
  TOut* out = static_cast<TOut*>(a.out);
  if (aligned) {
    conv1d_fwd_kernel<K, TIn, TW, TOut, kInt8, true>
        <<<blocks, kThreads, 0, stream>>>(x, w, bias, out, rows, a.dim, a.seqlen, scalars_of(a));
  } else {
    conv1d_fwd_kernel<K, TIn, TW, TOut, kInt8, false>
        <<<blocks, kThreads, 0, stream>>>(x, w, bias, out, rows, a.dim, a.seqlen, scalars_of(a));
  }
  return cudaGetLastError();
}

template <int K, typename TIn, typename TW, typename TOut, bool kInt8>
cudaError_t run_update(const Conv1dArgs& a, cudaStream_t stream) {
  const int64_t rows = a.batch * a.dim;
  if (rows == 0) return cudaSuccess;
  const int threads = 128;
  conv1d_update_kernel<K, TIn, TW, TOut, kInt8><<<blocks_for(rows, threads), threads, 0, stream>>>(
      static_cast<const TIn*>(a.x), static_cast<TIn*>(a.state), static_cast<const TW*>(a.weight),
      static_cast<const TW*>(a.bias), static_cast<TOut*>(a.out), rows, a.dim, scalars_of(a));
  return cudaGetLastError();
}

template <bool kUpdate, int K, typename TIn, typename TW, typename TOut, bool kInt8>
cudaError_t run(const Conv1dArgs& a, cudaStream_t stream) {
  return kUpdate ? run_update<K, TIn, TW, TOut, kInt8>(a, stream)
                 : run_fwd<K, TIn, TW, TOut, kInt8>(a, stream);
}

template <bool kUpdate, int K, typename T>
cudaError_t dispatch_float(const Conv1dArgs& a, cudaStream_t stream) {
  if (a.weight_type == a.x_type) return run<kUpdate, K, T, T, T, false>(a, stream);
  if (a.weight_type == ElemType::Float32) return run<kUpdate, K, T, float, T, false>(a, stream);
  return cudaErrorInvalidValue;
}

template <bool kUpdate, int K>
cudaError_t dispatch_types(const Conv1dArgs& a, cudaStream_t stream) {
  if (a.x_type == ElemType::Int8) {
    if (a.weight_type != ElemType::Int8) return cudaErrorInvalidValue;
    if (a.out_type == ElemType::Int8) return run<kUpdate, K, int8_t, int8_t, int8_t, true>(a, stream);
    if (a.out_type == ElemType::Float32) return run<kUpdate, K, int8_t, int8_t, float, true>(a, stream);
    return cudaErrorInvalidValue;
  }
  if (a.out_type != a.x_type) return cudaErrorInvalidValue;
  switch (a.x_type) {
    case ElemType::Float16: return dispatch_float<kUpdate, K, __half>(a, stream);
    case ElemType::BFloat16: return dispatch_float<kUpdate, K, __nv_bfloat16>(a, stream);
    case ElemType::Float32: return dispatch_float<kUpdate, K, float>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <bool kUpdate>
cudaError_t dispatch_width(const Conv1dArgs& a, cudaStream_t stream) {
  switch (a.width) {
    case 2: return dispatch_types<kUpdate, 2>(a, stream);
    case 3: return dispatch_types<kUpdate, 3>(a, stream);
    case 4: return dispatch_types<kUpdate, 4>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_conv1d_fwd(const Conv1dArgs& args, cudaStream_t stream) {
  return dispatch_width<false>(args, stream);
}

cudaError_t launch_conv1d_update(const Conv1dArgs& args, cudaStream_t stream) {
  return dispatch_width<true>(args, stream);
}

}  // namespace quamba
