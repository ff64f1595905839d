// Causal depthwise conv1d + bias + SiLU.
//
// INT8 path (bit-exact with reference_ops.conv1d_int8): acc = sum_k w_q[k] * x_q[t-K+1+k] is an
// integer below 2^17 (one dp4a: exact); scale = float32(s_w * s_x) and bias = float32(s_b * b_q)
// are float64 products rounded once; v = scale * acc + bias (two roundings); SiLU v / (1 + exp(-v))
// with accurate expf and IEEE division; Q8(v, s_out) or the float32 value.
// INT8 codes take a fast path first (silu_quotient_fast): hardware exp2 and reciprocal, accepted
// only when the approximate quotient lies clear of every rounding boundary by more than its error
// bound; otherwise (rarely) the exact formula decides. The codes are the exact path's either way.
// Float path (bit-exact with fp_ops.causal_conv1d_ref): acc = w0*x0, acc = acc + wk*xk for
// k = 1..K-1, then + bias, every operation rounded on its own; SiLU; one rounding to x's dtype.
//
// Work split: one thread computes 16 consecutive outputs of one (batch, channel) row (one 16-byte
// load and store for int8); consecutive threads take consecutive chunks of a row, so loads and
// stores are coalesced for any length.
#include "common.cuh"
#include "conv1d.h"

namespace quamba {
namespace {

constexpr int kItems = 16;
constexpr int kThreads = 128;

struct ConvScalars {
  double s_x;
  const float* s_x_per_seq;
  double s_w;
  double s_b;
  float out_scale;
  Rounding rule;
  bool silu;
  bool index32;  // rows * chunks and rows fit 32-bit index arithmetic
};

// float32(s_w * s_x) for sequence `batch`, formed in float64 like the reference.
__device__ __forceinline__ float int8_input_scale(const ConvScalars& c, int64_t batch) {
  const double s_x = c.s_x_per_seq != nullptr ? static_cast<double>(c.s_x_per_seq[batch]) : c.s_x;
  return __double2float_rn(__dmul_rn(s_x, c.s_w));
}

__device__ __forceinline__ float int8_bias(const int8_t* bias, int64_t channel, double s_b) {
  return __double2float_rn(__dmul_rn(static_cast<double>(bias[channel]), s_b));
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

// Exact integer -> float for |i| < 2^22 with two full-rate adds (no conversion unit).
__device__ __forceinline__ float small_int_to_float(int i) {
  return __fadd_rn(__int_as_float(i + 0x4B400000), -12582912.0f);
}

// q ~ silu(v) / s_out from the hardware exp2 and reciprocal, used for |v| <= 64 (every
// intermediate then is a normal float or, for tiny v, an exactly rounded product). Error bound
// against the exact path's quotient Q = RN(RN(v / RN(1 + expf(-v))) / s_out), in units of
// 2^-23 |q| (first order; the second-order terms are below 2^-40):
//   e = ex2.approx(RN(-v * log2(e))): the __expf sequence, CUDA guide 2 + floor(1.173 |v|) ulp;
//   RN(1 + e): 0.5; rcp.approx (1 ulp, PTX ISA) and RN(v * r): 1.5; RN(1 / s_out) and the
//   final product: 1. Together 5 + 1.173 |v| against the true v / (1 + e^-v) / s_out, plus 3.5
//   for Q (expf 2 ulp, three roundings): 8.5 + 1.173 |v| units. The margin below is
//   2e-6 (16.8 units) + 2e-7 (1.68 units) per |v|.
constexpr float kSiluMarginBase = 2e-6f;
constexpr float kSiluMarginPerV = 2e-7f;
// Without SiLU, q = RN(v * RN(1 / s_out)) is within 3 * 2^-24 |q| (1.8e-7) of v / s_out and Q is
// within 2^-24 of it.
constexpr float kDivMargin = 4e-7f;

__device__ __forceinline__ float ex2_approx_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float rcp_approx_ftz(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

struct Int8Epilogue {
  float scale, bias, out_scale, inv_out_scale;
  bool silu, fast_ok;
  Rounding rule;
};

// v = scale * acc + bias (bias -0.0f when there is none: x + -0 is x for every x, -0 included).
__device__ __forceinline__ float int8_pre_silu(int acc, const Int8Epilogue& ep) {
  return __fadd_rn(__fmul_rn(ep.scale, small_int_to_float(acc)), ep.bias);
}

// The Q8 code of silu(v) / s_out when the fast path can decide it (ep.fast_ok, silu on).
__device__ __forceinline__ bool silu_code_fast(float v, const Int8Epilogue& ep, uint32_t& code) {
  const float av = fabsf(v);
  const float e = ex2_approx_ftz(__fmul_rn(v, -1.44269504f));
  const float y = __fmul_rn(v, rcp_approx_ftz(__fadd_rn(1.0f, e)));
  const float q = __fmul_rn(y, ep.inv_out_scale);
  return q8_if_clear(q, fmaf(kSiluMarginPerV, av, kSiluMarginBase), code) && av <= 64.0f;
}

// The Q8 code of output value v (before SiLU): fast when clear of the boundaries, else exact.
__device__ __forceinline__ uint32_t int8_code(float v, const Int8Epilogue& ep) {
  uint32_t code;
  if (ep.silu) {
    if (ep.fast_ok && silu_code_fast(v, ep, code)) return code;
    return static_cast<uint8_t>(quantize_int8(silu_exact(v), ep.out_scale, ep.rule));
  }
  if (ep.fast_ok && q8_if_clear(__fmul_rn(v, ep.inv_out_scale), kDivMargin, code)) return code;
  return static_cast<uint8_t>(quantize_int8(v, ep.out_scale, ep.rule));
}

// Row and position of this thread's chunk of `items` outputs; 32-bit division when the sizes
// allow it.
__device__ __forceinline__ void chunk_of(int64_t item, int64_t chunks_per_row, int items,
                                         bool index32, int64_t& row, int64_t& t0) {
  if (index32) {
    const uint32_t i = static_cast<uint32_t>(item), cpr = static_cast<uint32_t>(chunks_per_row);
    const uint32_t r = i / cpr;
    row = r;
    t0 = static_cast<int64_t>(i - r * cpr) * items;
  } else {
    row = item / chunks_per_row;
    t0 = (item - row * chunks_per_row) * items;
  }
}

// This thread's chunk of `items` outputs of a prefill launch: its row (batch * dim + channel),
// first step, channel and batch; false for threads past the last chunk. 32-bit division when the
// sizes allow it.
struct ChunkPosition {
  int64_t row, t0, channel, batch;
};

__device__ __forceinline__ bool chunk_position(int items, int64_t rows, int64_t dim,
                                               int64_t seqlen, bool index32, ChunkPosition& p) {
  const int64_t chunks_per_row = (seqlen + items - 1) / items;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= rows * chunks_per_row) return false;
  chunk_of(item, chunks_per_row, items, index32, p.row, p.t0);
  if (index32) {
    p.channel = static_cast<uint32_t>(p.row) % static_cast<uint32_t>(dim);
    p.batch = static_cast<uint32_t>(p.row) / static_cast<uint32_t>(dim);
  } else {
    p.channel = p.row % dim;
    p.batch = p.row / dim;
  }
  return true;
}

// INT8 input: the window bytes x[t0 - 4 .. t0 + kN - 1] as kN / 4 + 1 little-endian words (word 0
// holds x[t0-4..t0-1]); zero outside [0, seqlen).
template <int kN, bool kVector>
__device__ __forceinline__ void load_int8_window(const int8_t* xr, int64_t t0, int64_t seqlen,
                                                 uint32_t (&words)[kN / 4 + 1]) {
  if constexpr (kVector) {  // t0 % kN == 0 and t0 + kN <= seqlen, aligned row
    words[0] = t0 > 0 ? *reinterpret_cast<const uint32_t*>(xr + t0 - 4) : 0u;
    if constexpr (kN == 16) {
      const uint4 body = *reinterpret_cast<const uint4*>(xr + t0);
      words[1] = body.x;
      words[2] = body.y;
      words[3] = body.z;
      words[4] = body.w;
    } else {
      const uint2 body = *reinterpret_cast<const uint2*>(xr + t0);
      words[1] = body.x;
      words[2] = body.y;
    }
  } else {
#pragma unroll
    for (int w = 0; w < kN / 4 + 1; ++w) {
      uint32_t word = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t t = t0 - 4 + w * 4 + k;
        const uint32_t byte = t >= 0 && t < seqlen ? static_cast<uint8_t>(xr[t]) : 0u;
        word |= byte << (8 * k);
      }
      words[w] = word;
    }
  }
}

// Bytes x[t-3 .. t] for output t = t0 + i: the word at byte offset i + 1 of the window.
template <int kW>
__device__ __forceinline__ int window_word(const uint32_t (&words)[kW], int i) {
  const int byte = i + 1;
  const uint32_t lo = words[byte / 4], hi = words[byte / 4 + 1 < kW ? byte / 4 + 1 : kW - 1];
  const int shift = byte % 4;
  return static_cast<int>(shift == 0 ? lo : __byte_perm(lo, hi, 0x3210 + 0x1111 * shift));
}

// INT8 path, kN outputs per thread (16 for int8 output: one 16-byte load and store; 8 for
// float32 output).
template <int K, typename TOut, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    conv1d_int8_fwd_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ weight,
                           const int8_t* __restrict__ bias, TOut* __restrict__ out, int64_t rows,
                           int64_t dim, int64_t seqlen, ConvScalars c) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  constexpr int kN = sizeof(TOut) == 1 ? 16 : 8;
  constexpr int kW = kN / 4 + 1;
  ChunkPosition pos;
  if (!chunk_position(kN, rows, dim, seqlen, c.index32, pos)) return;
  const int64_t row = pos.row, t0 = pos.t0, channel = pos.channel, batch = pos.batch;
  const bool full = t0 + kN <= seqlen;
  uint32_t words[kW];
  if (kAligned && full) {
    load_int8_window<kN, true>(x + row * seqlen, t0, seqlen, words);
  } else {
    load_int8_window<kN, false>(x + row * seqlen, t0, seqlen, words);
  }
  // Weights padded in front with zeros to 4 bytes: byte k of the window word is x[t - 3 + k].
  uint32_t wword = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    wword |= static_cast<uint32_t>(static_cast<uint8_t>(weight[channel * K + k]))
             << (8 * (4 - K + k));
  }
  Int8Epilogue ep;
  ep.scale = int8_input_scale(c, batch);
  ep.bias = bias != nullptr ? int8_bias(bias, channel, c.s_b) : -0.0f;
  ep.silu = c.silu;
  ep.out_scale = c.out_scale;
  ep.inv_out_scale = __frcp_rn(c.out_scale);
  // The fast paths' error bounds need a normal reciprocal (scales far from the float limits).
  ep.fast_ok = reciprocal_ok(ep.inv_out_scale);
  ep.rule = c.rule;

  TOut* out_row = out + row * seqlen;
  if constexpr (sizeof(TOut) == 1) {
    uint32_t packed[4] = {0u, 0u, 0u, 0u};
    if (ep.silu && ep.fast_ok) {  // the common case, without per-element mode checks
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        const float v = int8_pre_silu(__dp4a(window_word(words, i), static_cast<int>(wword), 0), ep);
        uint32_t code;
        if (!silu_code_fast(v, ep, code)) {
          code = static_cast<uint8_t>(quantize_int8(silu_exact(v), ep.out_scale, ep.rule));
        }
        packed[i / 4] |= code << (8 * (i % 4));
      }
    } else {
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        const float v = int8_pre_silu(__dp4a(window_word(words, i), static_cast<int>(wword), 0), ep);
        packed[i / 4] |= int8_code(v, ep) << (8 * (i % 4));
      }
    }
    if (kAligned && full) {
      *reinterpret_cast<uint4*>(out_row + t0) =
          make_uint4(packed[0], packed[1], packed[2], packed[3]);
    } else {
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        if (t0 + i < seqlen) {
          out_row[t0 + i] = static_cast<TOut>(static_cast<int8_t>(packed[i / 4] >> (8 * (i % 4))));
        }
      }
    }
  } else {
    TOut result[kN];
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      const float v = int8_pre_silu(__dp4a(window_word(words, i), static_cast<int>(wword), 0), ep);
      result[i] = ep.silu ? silu_exact(v) : v;
    }
    if (kAligned && full) {
      store8<TOut, true>(out_row + t0, result);
    } else {
#pragma unroll
      for (int i = 0; i < kN; ++i) {
        if (t0 + i < seqlen) out_row[t0 + i] = result[i];
      }
    }
  }
}

template <int K, typename TIn, typename TW, typename TOut, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    conv1d_float_fwd_kernel(const TIn* __restrict__ x, const TW* __restrict__ weight,
                            const TW* __restrict__ bias, TOut* __restrict__ out, int64_t rows,
                            int64_t dim, int64_t seqlen, ConvScalars c) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  ChunkPosition pos;
  if (!chunk_position(kItems, rows, dim, seqlen, c.index32, pos)) return;
  const int64_t row = pos.row, t0 = pos.t0, channel = pos.channel;
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
    float body[8];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      load8<TIn, kAligned>(xr + t0 + 8 * half, body);
#pragma unroll
      for (int i = 0; i < 8; ++i) window[K - 1 + 8 * half + i] = body[i];
    }
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
  const float b = has_bias ? to_float(bias[channel]) : 0.0f;
  TOut result[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    result[i] = from_float<TOut>(float_value<K>(w, window + i, has_bias, b, c.silu));
  }

  TOut* out_row = out + row * seqlen;
  if (full) {
    store8<TOut, kAligned>(out_row + t0, *reinterpret_cast<const TOut(*)[8]>(result));
    store8<TOut, kAligned>(out_row + t0 + 8, *reinterpret_cast<const TOut(*)[8]>(result + 8));
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (t0 + i < seqlen) out_row[t0 + i] = result[i];
    }
  }
}

// One thread per (batch, channel): out = conv of the window [state, x]; the state shifts left.
// All loads are issued before any arithmetic (one global round trip). INT8 path: the integer sum
// is one dp4a (exact), and INT8 codes take the prefill's fast SiLU + Q8 path (silu_code_fast /
// int8_code: the exact path's codes, the exact formula deciding near a rounding boundary).
template <int K, typename TIn, typename TW, typename TOut, bool kInt8>
__global__ void conv1d_update_kernel(const TIn* __restrict__ x, TIn* __restrict__ state,
                                     const TW* __restrict__ weight, const TW* __restrict__ bias,
                                     TOut* __restrict__ out, int64_t rows, int64_t dim,
                                     ConvScalars c) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const int64_t channel = row % dim;
  const int64_t batch = row / dim;
  TIn* st = state + row * (K - 1);
  const bool has_bias = bias != nullptr;
  TIn raw[K];
#pragma unroll
  for (int k = 0; k < K - 1; ++k) raw[k] = st[k];
  raw[K - 1] = x[row];
  TW w_raw[K];
#pragma unroll
  for (int k = 0; k < K; ++k) w_raw[k] = weight[channel * K + k];
  const TW b_raw = has_bias ? bias[channel] : TW{};

  if constexpr (kInt8) {
    // Window and weights as little-endian words, zero-padded in front to 4 bytes.
    uint32_t xword = 0, wword = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      xword |= static_cast<uint32_t>(static_cast<uint8_t>(raw[k])) << (8 * (4 - K + k));
      wword |= static_cast<uint32_t>(static_cast<uint8_t>(w_raw[k])) << (8 * (4 - K + k));
    }
    const int acc = __dp4a(static_cast<int>(xword), static_cast<int>(wword), 0);
    Int8Epilogue ep;
    ep.scale = int8_input_scale(c, batch);
    ep.bias = has_bias ? __double2float_rn(__dmul_rn(static_cast<double>(b_raw), c.s_b)) : -0.0f;
    ep.silu = c.silu;
    ep.out_scale = c.out_scale;
    ep.inv_out_scale = __frcp_rn(c.out_scale);
    ep.fast_ok = reciprocal_ok(ep.inv_out_scale);
    ep.rule = c.rule;
    const float v = int8_pre_silu(acc, ep);
    if constexpr (sizeof(TOut) == 1) {
      out[row] = static_cast<TOut>(static_cast<int8_t>(int8_code(v, ep)));
    } else {
      out[row] = ep.silu ? silu_exact(v) : v;
    }
  } else {
    float window[K];
    float w[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      window[k] = to_float(raw[k]);
      w[k] = to_float(w_raw[k]);
    }
    const float b = has_bias ? to_float(b_raw) : 0.0f;
    out[row] = from_float<TOut>(float_value<K>(w, window, has_bias, b, c.silu));
  }
#pragma unroll
  for (int k = 0; k < K - 1; ++k) st[k] = raw[k + 1];
}

ConvScalars scalars_of(const Conv1dArgs& a) {
  return ConvScalars{a.s_x,     a.s_x_per_seq,
                     a.s_w,     a.s_b,
                     a.out_scale, static_cast<Rounding>(a.rounding),
                     a.silu,    false};
}

template <int K, typename TIn, typename TW, typename TOut, bool kInt8>
cudaError_t run_fwd(const Conv1dArgs& a, cudaStream_t stream) {
  const int64_t rows = a.batch * a.dim;
  // Outputs per thread: 8 for the INT8 path's float32 output, else kItems (see the kernels).
  const int items = kInt8 && sizeof(TOut) != 1 ? 8 : kItems;
  const int64_t chunks = rows * ((a.seqlen + items - 1) / items);
  if (chunks == 0) return cudaSuccess;
  const bool aligned = a.seqlen % items == 0 && is_aligned(a.x, sizeof(TIn) * items) &&
                       is_aligned(a.out, sizeof(TOut) * items);
  const unsigned int blocks = blocks_for(chunks, kThreads);
  const TIn* x = static_cast<const TIn*>(a.x);
  const TW* w = static_cast<const TW*>(a.weight);
  const TW* bias = static_cast<const TW*>(a.bias);
  TOut* out = static_cast<TOut*>(a.out);
  ConvScalars c = scalars_of(a);
  c.index32 = chunks < (int64_t{1} << 32) && rows < (int64_t{1} << 32);
  if constexpr (kInt8) {
    if (aligned) {
      launch::launch_kernel(conv1d_int8_fwd_kernel<K, TOut, true>,
          blocks, kThreads, 0, stream, x, w, bias, out, rows, a.dim, a.seqlen, c);
    } else {
      launch::launch_kernel(conv1d_int8_fwd_kernel<K, TOut, false>,
          blocks, kThreads, 0, stream, x, w, bias, out, rows, a.dim, a.seqlen, c);
    }
  } else {
    if (aligned) {
      launch::launch_kernel(conv1d_float_fwd_kernel<K, TIn, TW, TOut, true>,
          blocks, kThreads, 0, stream, x, w, bias, out, rows, a.dim, a.seqlen, c);
    } else {
      launch::launch_kernel(conv1d_float_fwd_kernel<K, TIn, TW, TOut, false>,
          blocks, kThreads, 0, stream, x, w, bias, out, rows, a.dim, a.seqlen, c);
    }
  }
  return cudaGetLastError();
}

template <int K, typename TIn, typename TW, typename TOut, bool kInt8>
cudaError_t run_update(const Conv1dArgs& a, cudaStream_t stream) {
  const int64_t rows = a.batch * a.dim;
  if (rows == 0) return cudaSuccess;
  const int threads = 128;
  launch::launch_kernel(conv1d_update_kernel<K, TIn, TW, TOut, kInt8>, blocks_for(rows, threads),
                        threads, 0, stream,
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
