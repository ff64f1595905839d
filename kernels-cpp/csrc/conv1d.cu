// Causal depthwise conv1d + bias + SiLU.
//
// INT8 path (bit-exact with reference_ops.conv1d_int8): acc = sum_k w_q[k] * x_q[t-K+1+k] is an
// integer below 2^17 (one dp4a: exact); scale = float32(s_w * s_x) and bias = float32(s_b * b_q)
// are float64 products rounded once; v = scale * acc + bias (two roundings); SiLU v / (1 + exp(-v))
// with accurate expf and IEEE division; Q8(v, s_out) or the float32 value.
// INT8 codes take a fast path first (fast_quotient): hardware exp2 and reciprocal, accepted only
// when the approximate quotient lies clear of every rounding boundary by more than its error
// bound; otherwise (a few outputs in ten thousand) the exact formula decides. The codes are the
// exact path's either way.
// Float path (bit-exact with fp_ops.causal_conv1d_ref): acc = w0*x0, acc = acc + wk*xk for
// k = 1..K-1, then + bias, every operation rounded on its own; SiLU; one rounding to x's dtype.
//
// Work split: a thread computes 16 consecutive outputs of one (batch, channel) row (8 for float32
// output; two such chunks for INT8 output on large inputs), one 16-byte load and store per chunk
// for int8; consecutive threads take consecutive chunks of a row, so loads and stores are
// coalesced for any length. Per-launch constants (scales, margins, the magic numbers of the index
// divisions) are made on the host.
#include "common.cuh"
#include "conv1d.h"

namespace quamba {
namespace {

constexpr int kItems = 16;
constexpr int kThreads = 128;

// n / d for 0 <= n < 2^31 by a multiply-high and a shift (Granlund & Montgomery; the divisor
// is a launch constant, so the magic numbers are made once on the host): a run-time 32-bit
// division costs ~20 instructions per thread.
struct FastDiv32 {
  uint32_t divisor, multiplier, shift;
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return divisor == 1 ? n : __umulhi(n, multiplier) >> shift;
  }
};

inline FastDiv32 make_fast_div(uint32_t d) {  // 1 <= d < 2^31
  FastDiv32 f{d, 0u, 0u};
  if (d > 1) {
    int log2_ceil = 0;
    while ((uint64_t{1} << log2_ceil) < d) ++log2_ceil;
    const int p = 31 + log2_ceil;  // multiplier = ceil(2^p / d) < 2^32
    f.multiplier = static_cast<uint32_t>(((uint64_t{1} << p) + d - 1) / d);
    f.shift = static_cast<uint32_t>(p - 32);
  }
  return f;
}

struct ConvScalars {
  double s_x;
  const float* s_x_per_seq;
  double s_w;
  double s_b;
  float out_scale;
  Rounding rule;
  bool silu;
  // Work split of a prefill launch (run_fwd): `items` outputs per thread, chunks_per_row threads
  // per (batch, channel) row; index32: rows * chunks_per_row < 2^31, with the fast divisions.
  bool index32;
  int items;
  int64_t chunks_per_row;
  FastDiv32 by_chunks_per_row, by_dim;
  // Derived on the host (scalars_of), so that threads do not recompute them:
  float input_scale;             // float32(s_w * s_x); per sequence when s_x_per_seq is set
  float inv_out_scale;           // RN(1 / out_scale)
  float rel_margin;              // the fast INT8-code path's error bound (see below)
  bool fast_ok;                  // the bound holds for these scales
  float fast_limit;              // 0.5 - abs_margin - 2^-24: q8_bits_if_clear_fast's bound
  bool clamp_low;                // q <= -128.5 possible: clamp before rounding
  int chunks_per_thread;         // INT8-output prefill: chunks of kItems outputs per thread
  int8_t* state_out;             // INT8 prefill: the rows' last K - 1 inputs (Conv1dArgs::state)
};

// INT8 prefill with a state output: the thread holding a row's last outputs also writes the row's
// last K - 1 input codes (zeros before the row), the conv state a decode continues from, so that
// the layers need no copy kernel for it. xr: the row of x.
template <int K>
__device__ __forceinline__ void write_final_state(const ConvScalars& c, const int8_t* xr,
                                                  int64_t row, int64_t seqlen, int64_t t0) {
  if (c.state_out == nullptr || t0 + c.items < seqlen) return;
  int8_t* state = c.state_out + row * (K - 1);
#pragma unroll
  for (int k = 0; k < K - 1; ++k) {
    const int64_t t = seqlen - (K - 1) + k;
    state[k] = t >= 0 ? xr[t] : int8_t{0};
  }
}

// float32(s_w * s_x) for sequence `batch`, formed in float64 like the reference.
__device__ __forceinline__ float int8_input_scale(const ConvScalars& c, int64_t batch) {
  if (c.s_x_per_seq == nullptr) return c.input_scale;
  return __double2float_rn(__dmul_rn(static_cast<double>(c.s_x_per_seq[batch]), c.s_w));
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

// ---- INT8 codes: a fast quotient, and the exact path near a rounding boundary ----
//
// The fast path computes q ~ X = silu(v) / s_out (v as the reference forms it; the prefill's
// one-FMA v is covered by conv_limit) as
//   q = RN(v * rcp.approx(RN(s_out * e + s_out))),  e = ex2.approx(RN(v * -log2(e)))
// (two MUFU operations, no IEEE division), and accepts Q8(q) when q lies clear of every rounding
// boundary by more than |q| * kSiluRelMargin + abs_margin (q8_bits_if_clear_fast); otherwise the
// exact formula decides (exact_int8_code). The codes are the exact path's either way. Error of q
// and of the reference's Q = RN(RN(v / RN(1 + expf(-v))) / s_out) against X, in units of 2^-23 |X|:
//   Q: expf 2 ulp, three roundings: 3.5.
//   v >= 0: e's error (the __expf sequence, CUDA guide 2 + 1.173 |v| ulp) enters 1 + e weighted
//     by e / (1 + e), which keeps it below 1 unit; the FMA 0.5, rcp.approx 1 (PTX ISA), the
//     product 0.5: together with Q 6.5 units (7.7e-7); kSiluRelMargin = 2e-6 (2.6x).
//   v < 0: e's error is up to 2 + 1.173 |v| units, so |q - Q| <= |X| (9.5 + 1.173 |v|) units,
//     and |X| = |silu(v)| / s_out is small where |v| is large: max over v < 0 of
//     |silu(v)| (9.5 + 1.173 |v|) is 3.1 (at v = -1.43), so |q - Q| <= 3.1 units / s_out, and
//     abs_margin = kSiluNegAbsMargin / s_out covers it (8e-7 = 6.7 units: 2.1x). Below v = -88.7
//     e is inf and q = -0: |X| < 88.7 e^-88.7 / s_out < 3e-7 for any s_out accepted, code 0
//     either way; where the flushed reciprocal or s_out * e overflows, |X| is as small.
// The ex2/rcp results are normal or flushed as analysed because s_out is restricted to
// [1e-30, 1e30] (reciprocal_ok; the exact path serves other scales).
// Without SiLU: q = RN(v * RN(1 / s_out)) is within 3 * 2^-24 |q| (1.8e-7) of v / s_out and Q
// within 2^-24 of it; with the prefill's FMA-formed v (conv_limit) 2^-23 more: kDivMargin = 8e-7
// (1.9x).
constexpr float kSiluRelMargin = 2e-6f;
constexpr float kSiluNegAbsMargin = 8e-7f;
constexpr float kDivMargin = 8e-7f;

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

// Everything an INT8-code epilogue needs, per (batch, channel) row.
struct Int8Epilogue {
  float scale, bias, out_scale, inv_out_scale;
  float rel_margin, limit;  // the fast path's error bound (see above, q8_bits_if_clear_fast)
  bool silu, fast_ok;
  Rounding rule;
};

__device__ __forceinline__ Int8Epilogue int8_epilogue(const ConvScalars& c, float scale,
                                                      float bias) {
  Int8Epilogue ep;
  ep.scale = scale;
  ep.bias = bias;
  ep.silu = c.silu;
  ep.out_scale = c.out_scale;
  ep.inv_out_scale = c.inv_out_scale;
  ep.fast_ok = c.fast_ok;
  ep.rule = c.rule;
  ep.rel_margin = c.rel_margin;
  ep.limit = c.fast_limit;
  return ep;
}

// v = scale * acc + bias with the reference's two roundings (bias -0.0f when there is none:
// x + -0 is x for every x, -0 included).
__device__ __forceinline__ float int8_pre_silu(int acc, const Int8Epilogue& ep) {
  return __fadd_rn(__fmul_rn(ep.scale, small_int_to_float(acc)), ep.bias);
}

// The fast path's quotient q ~ silu(v) / s_out (or v / s_out) of pre-activation v.
template <bool kSilu>
__device__ __forceinline__ float fast_quotient(float v, const Int8Epilogue& ep) {
  if constexpr (kSilu) {
    const float e = ex2_approx_ftz(__fmul_rn(v, -1.44269504f));
    return __fmul_rn(v, rcp_approx_ftz(fmaf(ep.out_scale, e, ep.out_scale)));
  } else {
    return __fmul_rn(v, ep.inv_out_scale);
  }
}

// The Q8 code of the fast quotient q in the low byte of `bits` (1.5 * 2^23 has ulp 1: c +
// 1.5 * 2^23 rounds c to the nearest integer, and its low byte is that integer's code), and
// whether q is clear of every rounding boundary: |q - round(q)| + |q| rel_margin < limit =
// 0.5 - abs_margin - 2^-24 (the 2^-24 covers this sum's one rounding), where neither rounding rule
// can differ from the exact quotient's. Clamping first is safe: beyond +-127 the only boundaries
// are ones that saturation makes irrelevant. kClampLow = false when q > -128.5 is certain (SiLU
// with s_out >= 0.2785 / 128.5: codes down to -128 need no clamp).
template <bool kClampLow>
__device__ __forceinline__ bool q8_bits_if_clear_fast(float q, float rel_margin, float limit,
                                                      uint32_t& bits) {
  float c = fminf(q, 127.0f);
  if constexpr (kClampLow) c = fmaxf(c, -128.0f);
  const float shifted = __fadd_rn(c, 12582912.0f);
  const float nearest = __fadd_rn(shifted, -12582912.0f);  // exact
  bits = __float_as_uint(shifted);
  return fmaf(fabsf(c), rel_margin, fabsf(__fadd_rn(c, -nearest))) < limit;
}

// The prefill's fast path forms v with one FMA, RN(scale * acc + bias), instead of the reference's
// RN(RN(scale * acc) + bias). The two differ by at most 2^-24 |scale * acc| + 2^-23 |v|: the
// relative part is in the margins above (2 |v silu'(v) / silu(v)| <= 2.6 units where v >= 0, and
// within the 6.7 units of kSiluNegAbsMargin where v < 0: the maximum becomes 3.25), the absolute
// part moves q by at most 1.1 (the largest slope of SiLU) * 2^-24 |scale| max|acc| / s_out,
// with max|acc| = 128 * sum_k |w_k| for the channel; it is taken off the limit.
__device__ __forceinline__ float conv_limit(const Int8Epilogue& ep, uint32_t wword) {
  // Per-byte |w| (|-128| is the byte 0x80, read unsigned), summed by an unsigned dp4a.
  const unsigned weight_sum = __dp4a(__vabs4(wword), 0x01010101u, 0u);
  const float max_product = fabsf(ep.scale) * static_cast<float>(128u * weight_sum);
  return ep.limit - 1.1f * 0x1p-24f * 1.001f * max_product * ep.inv_out_scale;
}

// The exact path's code (the reference formula, IEEE division); kept out of line: it runs for a
// few outputs in ten thousand. Scalars rather than the struct, so they travel in registers.
__device__ __noinline__ uint32_t exact_int8_code(int acc, float scale, float bias,
                                                 float out_scale, bool silu, Rounding rule) {
  const float v = __fadd_rn(__fmul_rn(scale, small_int_to_float(acc)), bias);
  return static_cast<uint8_t>(quantize_int8(silu ? silu_exact(v) : v, out_scale, rule));
}

__device__ __forceinline__ uint32_t exact_int8_code(int acc, const Int8Epilogue& ep) {
  return exact_int8_code(acc, ep.scale, ep.bias, ep.out_scale, ep.silu, ep.rule);
}

// The code of one output (the update kernel): fast when clear of the boundaries, else exact.
__device__ __forceinline__ uint32_t int8_code(int acc, const Int8Epilogue& ep) {
  uint32_t bits;
  if (ep.fast_ok) {
    const float v = int8_pre_silu(acc, ep);
    const float q = ep.silu ? fast_quotient<true>(v, ep) : fast_quotient<false>(v, ep);
    if (q8_bits_if_clear_fast<true>(q, ep.rel_margin, ep.limit, bits)) return bits & 0xFFu;
  }
  return exact_int8_code(acc, ep);
}

// This thread's chunk of c.items outputs of a prefill launch: its row (batch * dim + channel),
// first step, channel and batch; false for threads past the last chunk.
struct ChunkPosition {
  int64_t row, t0, channel, batch;
};

__device__ __forceinline__ bool chunk_position(const ConvScalars& c, int64_t rows, int64_t dim,
                                               ChunkPosition& p) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= rows * c.chunks_per_row) return false;
  if (c.index32) {
    const uint32_t i = static_cast<uint32_t>(item);
    const uint32_t row = c.by_chunks_per_row.div(i);
    const uint32_t batch = c.by_dim.div(row);
    p.row = row;
    p.t0 = static_cast<int64_t>(i - row * static_cast<uint32_t>(c.chunks_per_row)) * c.items;
    p.batch = batch;
    p.channel = row - batch * static_cast<uint32_t>(dim);
  } else {
    p.row = item / c.chunks_per_row;
    p.t0 = (item - p.row * c.chunks_per_row) * c.items;
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

// Weights of one channel as a little-endian word padded in front with zeros to 4 bytes: byte k of
// a window word is x[t - 3 + k], so dp4a(window word, weight word) is the conv's integer sum.
template <int K>
__device__ __forceinline__ uint32_t int8_weight_word(const int8_t* weight, int64_t channel) {
  if (K == 4 && (reinterpret_cast<uintptr_t>(weight) & 3u) == 0u) {
    return *reinterpret_cast<const uint32_t*>(weight + channel * 4);  // byte k = w_k
  }
  uint32_t wword = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    wword |= static_cast<uint32_t>(static_cast<uint8_t>(weight[channel * K + k]))
             << (8 * (4 - K + k));
  }
  return wword;
}

// INT8 in -> float32 out: 8 outputs per thread (one 8-byte load, two 16-byte stores).
template <int K, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    conv1d_int8_f32_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ weight,
                           const int8_t* __restrict__ bias, float* __restrict__ out, int64_t rows,
                           int64_t dim, int64_t seqlen, ConvScalars c) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  constexpr int kN = 8;
  constexpr int kW = kN / 4 + 1;
  ChunkPosition pos;
  if (!chunk_position(c, rows, dim, pos)) return;
  const int64_t row = pos.row, t0 = pos.t0;
  write_final_state<K>(c, x + row * seqlen, row, seqlen, t0);
  const bool full = t0 + kN <= seqlen;
  uint32_t words[kW];
  if (kAligned && full) {
    load_int8_window<kN, true>(x + row * seqlen, t0, seqlen, words);
  } else {
    load_int8_window<kN, false>(x + row * seqlen, t0, seqlen, words);
  }
  const uint32_t wword = int8_weight_word<K>(weight, pos.channel);
  const Int8Epilogue ep = int8_epilogue(
      c, int8_input_scale(c, pos.batch),
      bias != nullptr ? int8_bias(bias, pos.channel, c.s_b) : -0.0f);
  float result[kN];
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    const float v = int8_pre_silu(__dp4a(window_word(words, i), static_cast<int>(wword), 0), ep);
    result[i] = ep.silu ? silu_exact(v) : v;
  }
  float* out_row = out + row * seqlen;
  if (kAligned && full) {
    store8<float, true>(out_row + t0, result);
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      if (t0 + i < seqlen) out_row[t0 + i] = result[i];
    }
  }
}

// INT8 in -> INT8 out: each thread takes c.chunks_per_thread (1 or 2, see run_fwd) consecutive
// chunks of 16 outputs of one row, loading the next chunk's 16 bytes before converting the
// current one.

// xp[0 .. 15] as four little-endian words, zero from xp[left] on.
template <bool kVector>
__device__ __forceinline__ uint4 load_int8_chunk(const int8_t* xp, int left) {
  if (kVector && left >= kItems) return *reinterpret_cast<const uint4*>(xp);
  uint32_t words[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (i < left) {
      words[i / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(xp[i])) << (8 * (i % 4));
    }
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// The 16 codes of one chunk (window word 0 = x[t - 4 .. t - 1]) through the fast path, packed
// four to a word; the returned mask marks the outputs the fast path could not decide.
template <bool kSilu, bool kClampLow>
__device__ __forceinline__ uint32_t int8_codes_fast(const uint32_t (&words)[5], uint32_t wword,
                                                    const Int8Epilogue& ep, float limit,
                                                    uint32_t (&packed)[4]) {
  uint32_t undecided = 0u;
  uint32_t bits[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    // dp4a accumulates onto 1.5 * 2^23's bit pattern: the float of that word is 1.5 * 2^23 + acc.
    const int biased = __dp4a(window_word(words, i), static_cast<int>(wword), 0x4B400000);
    const float acc = __fadd_rn(__int_as_float(biased), -12582912.0f);  // exact
    const float v = fmaf(ep.scale, acc, ep.bias);  // near the reference's v: see conv_limit
    if (!q8_bits_if_clear_fast<kClampLow>(fast_quotient<kSilu>(v, ep), ep.rel_margin, limit,
                                          bits[i])) {
      undecided |= 1u << i;
    }
  }
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    packed[w] = __byte_perm(__byte_perm(bits[4 * w], bits[4 * w + 1], 0x0040),
                            __byte_perm(bits[4 * w + 2], bits[4 * w + 3], 0x0040), 0x5410);
  }
  return undecided;
}

template <int K, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    conv1d_int8_q8_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ weight,
                          const int8_t* __restrict__ bias, int8_t* __restrict__ out,
                          int64_t rows, int64_t dim, int64_t seqlen, ConvScalars c) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  ChunkPosition pos;
  if (!chunk_position(c, rows, dim, pos)) return;
  const int64_t t0 = pos.t0;
  write_final_state<K>(c, x + pos.row * seqlen, pos.row, seqlen, t0);
  const int8_t* xp = x + pos.row * seqlen + t0;  // this chunk's input and output
  int8_t* op = out + pos.row * seqlen + t0;
  // Outputs left in the row from this chunk on (this thread's share is at most 16 * chunks).
  int left = static_cast<int>(min(seqlen - t0, static_cast<int64_t>(kItems * c.chunks_per_thread)));
  const uint32_t wword = int8_weight_word<K>(weight, pos.channel);
  const Int8Epilogue ep = int8_epilogue(
      c, int8_input_scale(c, pos.batch),
      bias != nullptr ? int8_bias(bias, pos.channel, c.s_b) : -0.0f);
  const float limit = conv_limit(ep, wword);

  // x[t0 - 4 .. t0 - 1] for the first chunk (zero before the row).
  uint32_t before = 0u;
  if (kAligned && t0 > 0) {
    before = *reinterpret_cast<const uint32_t*>(xp - 4);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (t0 - 4 + k >= 0) {
        before |= static_cast<uint32_t>(static_cast<uint8_t>(xp[k - 4])) << (8 * k);
      }
    }
  }
  uint4 chunk = load_int8_chunk<kAligned>(xp, left);
#pragma unroll 1
  while (true) {
    const uint4 next = left > kItems ? load_int8_chunk<kAligned>(xp + kItems, left - kItems)
                                     : make_uint4(0u, 0u, 0u, 0u);
    const uint32_t words[5] = {before, chunk.x, chunk.y, chunk.z, chunk.w};
    uint32_t packed[4] = {0u, 0u, 0u, 0u};
    uint32_t undecided = 0xFFFFu;  // every output, when the scales rule out the fast path
    if (ep.fast_ok) {
      if (!ep.silu) {
        undecided = int8_codes_fast<false, true>(words, wword, ep, limit, packed);
      } else if (c.clamp_low) {
        undecided = int8_codes_fast<true, true>(words, wword, ep, limit, packed);
      } else {
        undecided = int8_codes_fast<true, false>(words, wword, ep, limit, packed);
      }
    }
    if (undecided != 0u) {  // rare: the exact formula for the outputs near a boundary
#pragma unroll
      for (int i = 0; i < kItems; ++i) {  // compile-time i keeps `words` and `packed` in registers
        if (undecided & (1u << i)) {
          const uint32_t code =
              exact_int8_code(__dp4a(window_word(words, i), static_cast<int>(wword), 0), ep);
          const int shift = 8 * (i % 4);
          packed[i / 4] = (packed[i / 4] & ~(0xFFu << shift)) | (code << shift);
        }
      }
    }
    if (kAligned && left >= kItems) {
      *reinterpret_cast<uint4*>(op) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    } else {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (i < left) op[i] = static_cast<int8_t>(packed[i / 4] >> (8 * (i % 4)));
      }
    }
    left -= kItems;
    if (left <= 0) break;
    xp += kItems;
    op += kItems;
    before = chunk.w;
    chunk = next;
  }
}

template <int K, typename TIn, typename TW, typename TOut, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    conv1d_float_fwd_kernel(const TIn* __restrict__ x, const TW* __restrict__ weight,
                            const TW* __restrict__ bias, TOut* __restrict__ out, int64_t rows,
                            int64_t dim, int64_t seqlen, ConvScalars c) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  ChunkPosition pos;
  if (!chunk_position(c, rows, dim, pos)) return;
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
                                     int64_t x_row, ConvScalars c) {
  {
    // While the previous kernel finishes: the block's state rows and (first sequence's blocks)
    // the weights into L2 (see launch.cuh).
    const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x;
    const int64_t count = rows - first < blockDim.x ? rows - first : blockDim.x;
    launch::prefetch_l2_range(state + first * (K - 1),
                              count * (K - 1) * static_cast<int64_t>(sizeof(TIn)));
    if (first < dim) {
      const int64_t channels = dim - first < count ? dim - first : count;
      launch::prefetch_l2_range(weight + first * K,
                                channels * K * static_cast<int64_t>(sizeof(TW)));
      if (bias != nullptr) {
        launch::prefetch_l2_range(bias + first, channels * static_cast<int64_t>(sizeof(TW)));
      }
    }
  }
  launch::start_after_prior_grids();  // after the L2 prefetch: see launch.cuh
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const int64_t channel = row % dim;
  const int64_t batch = row / dim;
  TIn* st = state + row * (K - 1);
  const bool has_bias = bias != nullptr;
  TIn raw[K];
#pragma unroll
  for (int k = 0; k < K - 1; ++k) raw[k] = st[k];
  raw[K - 1] = x[batch * x_row + channel];
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
    const Int8Epilogue ep = int8_epilogue(
        c, int8_input_scale(c, batch),
        has_bias ? __double2float_rn(__dmul_rn(static_cast<double>(b_raw), c.s_b)) : -0.0f);
    if constexpr (sizeof(TOut) == 1) {
      out[row] = static_cast<TOut>(static_cast<int8_t>(int8_code(acc, ep)));
    } else {
      const float v = int8_pre_silu(acc, ep);
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
  ConvScalars c{};
  c.s_x = a.s_x;
  c.s_x_per_seq = a.s_x_per_seq;
  c.s_w = a.s_w;
  c.s_b = a.s_b;
  c.out_scale = a.out_scale;
  c.rule = static_cast<Rounding>(a.rounding);
  c.silu = a.silu;
  c.index32 = false;
  c.input_scale = static_cast<float>(a.s_x * a.s_w);  // one rounding of the float64 product
  c.inv_out_scale = 1.0f / a.out_scale;               // IEEE: RN(1 / s), as __frcp_rn
  c.fast_ok = reciprocal_ok(c.inv_out_scale);
  c.rel_margin = a.silu ? kSiluRelMargin : kDivMargin;
  const float abs_margin = a.silu ? kSiluNegAbsMargin * c.inv_out_scale : 0.0f;
  c.fast_limit = static_cast<float>(0.5 - static_cast<double>(abs_margin) - 0x1p-24);
  // SiLU >= -0.27847 and q's error is far below 1e-4 relative: q > -128.5 when 1 / s_out is at
  // most 128.5 / 0.27847 / (1 + 1e-4) > 461.
  c.clamp_low = !a.silu || !(c.inv_out_scale <= 460.0f);
  c.chunks_per_thread = 1;
  c.state_out = nullptr;
  return c;
}

template <int K, typename TIn, typename TW, typename TOut, bool kInt8>
cudaError_t run_fwd(const Conv1dArgs& a, cudaStream_t stream) {
  const int64_t rows = a.batch * a.dim;
  // Outputs per thread: 8 for the INT8 path's float32 output, one or two chunks of kItems for
  // its INT8 output, else kItems (see the kernels).
  const int vector = kInt8 && sizeof(TOut) != 1 ? 8 : kItems;  // outputs per vector access
  // INT8 output: two chunks per thread (the per-row setup then costs half as much per output)
  // once there are threads enough to fill the GPU a few times over without (2^19 chunks: about
  // three waves of one chunk per thread on an H100). Measured (H100, 2.8B shapes): batch 8
  // 80 / 70 / 103 us with 1 / 2 / 4 chunks per thread; batch 1 12.2 / 11.6 / 17.9 us.
  const int64_t vector_chunks = rows * ((a.seqlen + vector - 1) / vector);
  int chunks_per_thread = 1;
  if (kInt8 && sizeof(TOut) == 1 && vector_chunks >= (int64_t{1} << 19)) chunks_per_thread = 2;
  const int items = vector * chunks_per_thread;
  const int64_t chunks = rows * ((a.seqlen + items - 1) / items);
  if (chunks == 0) return cudaSuccess;
  const bool aligned = a.seqlen % vector == 0 && is_aligned(a.x, sizeof(TIn) * vector) &&
                       is_aligned(a.out, sizeof(TOut) * vector);
  const unsigned int blocks = blocks_for(chunks, kThreads);
  const TIn* x = static_cast<const TIn*>(a.x);
  const TW* w = static_cast<const TW*>(a.weight);
  const TW* bias = static_cast<const TW*>(a.bias);
  TOut* out = static_cast<TOut*>(a.out);
  ConvScalars c = scalars_of(a);
  c.items = items;
  c.chunks_per_row = (a.seqlen + items - 1) / items;
  c.index32 = chunks < (int64_t{1} << 31);
  if (c.index32) {
    c.by_chunks_per_row = make_fast_div(static_cast<uint32_t>(c.chunks_per_row));
    c.by_dim = make_fast_div(static_cast<uint32_t>(a.dim));
  }
  c.chunks_per_thread = chunks_per_thread;
  if (kInt8) c.state_out = static_cast<int8_t*>(a.state);  // the float path takes none (binding)
  const auto start = [&](auto kernel) {
    launch::launch_kernel(kernel, blocks, kThreads, 0, stream, x, w, bias, out, rows, a.dim,
                          a.seqlen, c);
  };
  if constexpr (kInt8 && sizeof(TOut) == 1) {
    start(aligned ? conv1d_int8_q8_kernel<K, true> : conv1d_int8_q8_kernel<K, false>);
  } else if constexpr (kInt8) {
    start(aligned ? conv1d_int8_f32_kernel<K, true> : conv1d_int8_f32_kernel<K, false>);
  } else {
    start(aligned ? conv1d_float_fwd_kernel<K, TIn, TW, TOut, true>
                  : conv1d_float_fwd_kernel<K, TIn, TW, TOut, false>);
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
      static_cast<const TW*>(a.bias), static_cast<TOut*>(a.out), rows, a.dim,
      a.x_row > 0 ? a.x_row : a.dim, scalars_of(a));
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
