#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.cuh"

namespace quamba {

// Rounding rules of the INT8 sites. They differ only at exact .5 ties.
enum class Rounding : int { HalfAway = 0, HalfEven = 1 };

__device__ __forceinline__ float round_with(float v, Rounding rule) {
  // roundf rounds half away from zero; rintf rounds half to even (current mode is nearest-even).
  return rule == Rounding::HalfAway ? roundf(v) : rintf(v);
}

__device__ __forceinline__ int8_t saturate_int8(float r) {
  return static_cast<int8_t>(fminf(fmaxf(r, -128.0f), 127.0f));
}

// Q8(v, s): IEEE division (no fast-math reciprocal) before the rounding decision.
__device__ __forceinline__ int8_t quantize_int8(float v, float scale, Rounding rule) {
  return saturate_int8(round_with(__fdiv_rn(v, scale), rule));
}

// The same Q8 codes as quantize_int8, cheaper: q = RN(v * inv_scale) with inv_scale = RN(1/scale)
// is within a relative 2^-23 (two ulps) of v / scale. Both rounding rules change their result only
// at k + 0.5, so q rounds like the exact quotient unless q lies within two ulps of such a boundary;
// there (and for |q| >= 2^22, inf, NaN) the IEEE division decides.
__device__ __forceinline__ int8_t quantize_int8_fast(float v, float scale, float inv_scale,
                                                     Rounding rule) {
  const float q = __fmul_rn(v, inv_scale);
  const float aq = fabsf(q);
  const float distance = fabsf(aq - floorf(aq) - 0.5f);  // exact below 2^23
  if (!(aq < 4194304.0f) || distance <= aq * 2.4e-7f) return quantize_int8(v, scale, rule);
  return saturate_int8(round_with(q, rule));
}

// The clamp-and-shift rounding of c, already clamped to [-128, 127]: sets `code` (its low byte is
// the nearest integer's int8 code; 1.5 * 2^23 has ulp 1, so c + 1.5 * 2^23 rounds c to the nearest
// integer, ties to even) and returns c's distance from the nearest rounding boundary k + 0.5.
__device__ __forceinline__ float q8_code_and_distance(float c, uint32_t& code) {
  const float shifted = __fadd_rn(c, 12582912.0f);
  const float nearest = __fadd_rn(shifted, -12582912.0f);  // exact
  code = __float_as_uint(shifted);
  // Exact when |c - nearest| >= 0.25 (Sterbenz); below that the distance is > 0.25 anyway.
  return __fadd_rn(0.5f, -fabsf(__fadd_rn(c, -nearest)));
}

// Q8 of an approximate quotient q whose error against the exact quotient v / s is known to be at
// most |q| * rel_margin: sets `code` (the int8 code in the low byte) and returns true when q lies
// farther than that from every code boundary k + 0.5, where neither rounding rule can differ from
// the exact quotient's; returns false (the caller takes the exact path) otherwise. Clamping first
// is safe: beyond +-127 the only boundaries are ones that saturation makes irrelevant. NaN clamps
// to -128 like saturate_int8(NaN); inf clamps to the saturated code like the exact path.
// Costs two adds for the rounding (q8_code_and_distance) and three for the decision.
__device__ __forceinline__ bool q8_if_clear(float q, float rel_margin, uint32_t& code) {
  const float c = fminf(fmaxf(q, -128.0f), 127.0f);
  const float distance = q8_code_and_distance(c, code);
  code &= 0xFFu;
  return distance > fabsf(c) * rel_margin;
}

// q8_if_clear's margin for q = RN(v * RN(1 / s)), the cheap stand-in for v / s: q is within
// 3 * 2^-24 |q| of the quotient, and the quotient's rounding within 2^-24 more (RN(1 / s) must be
// a normal float: reciprocal_ok).
constexpr float kQuotientMargin = 4e-7f;

// Whether inv = RN(1 / s) is far enough from the float limits for the margins above to hold.
__host__ __device__ __forceinline__ bool reciprocal_ok(float inv) {
  return inv <= 1e30f && inv >= 1e-30f;
}

// Q8(v, scale) with the codes of quantize_int8: the product RN(v * inv_scale) decides unless it
// lies within kQuotientMargin of a rounding boundary (or inv_scale_ok is false), where the IEEE
// division does. inv_scale = RN(1 / scale), inv_scale_ok = reciprocal_ok(inv_scale).
__device__ __forceinline__ int8_t quantize_int8_by_reciprocal(float v, float scale, float inv_scale,
                                                              bool inv_scale_ok, Rounding rule) {
  uint32_t code;
  if (inv_scale_ok && q8_if_clear(__fmul_rn(v, inv_scale), kQuotientMargin, code)) {
    return static_cast<int8_t>(code);
  }
  return quantize_int8(v, scale, rule);
}

// ---- element conversions (all exact or round-to-nearest-even) ----
__device__ __forceinline__ float to_float(int8_t v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Dequantization exactly as the reference writes it: q.float() * float32(scale), one rounding.
// Float inputs are used as they are (the caller passes no scale for them).
template <typename T>
__device__ __forceinline__ float dequant(T v, float scale) {
  return to_float(v);
}
template <>
__device__ __forceinline__ float dequant<int8_t>(int8_t v, float scale) {
  return __fmul_rn(static_cast<float>(v), scale);
}

// float(q) of byte k (0..3) of a word of packed int8 codes whose bytes were biased by 128
// (`word ^ 0x80808080`), on the ALU and FMA pipes: I2F runs on the XU pipe, which MUFU (exp, rcp)
// needs. Byte k placed under the exponent of 2^23 is the float 2^23 + q + 128, exactly; subtracting
// 2^23 + 128 leaves q exactly, so __fmul_rn(int8_lane_to_float(w, k), s) is dequant(q, s) bit for bit.
__device__ __forceinline__ float int8_lane_to_float(uint32_t biased_word, int k) {
  return __fsub_rn(__uint_as_float(__byte_perm(biased_word, 0x4B000000u, 0x7650 + k)), 8388736.0f);
}

// SiLU as the references evaluate it: v / (1 + exp(-v)), every operation rounded on its own,
// accurate expf (libdevice, the same function torch's CUDA exp calls).
__device__ __forceinline__ float silu_exact(float v) {
  return __fdiv_rn(v, __fadd_rn(1.0f, expf(-v)));
}

// softplus with the references' threshold: log1p(exp(v)) for v <= 20, v above.
__device__ __forceinline__ float softplus_exact(float v) { return v <= 20.0f ? log1pf(expf(v)) : v; }

// ---- 8-element vector access (16-byte loads for 2-byte types, 8 for int8, 2x16 for float) ----
template <typename T>
struct Vec8;
template <>
struct Vec8<int8_t> {
  using Storage = uint2;
};
template <>
struct Vec8<__half> {
  using Storage = uint4;
};
template <>
struct Vec8<__nv_bfloat16> {
  using Storage = uint4;
};
template <>
struct Vec8<float> {
  struct alignas(32) Storage {
    float4 a, b;
  };
};

// Loads 8 consecutive elements starting at p (which must be aligned to sizeof(T) * 8 when kAligned).
template <typename T, bool kAligned>
__device__ __forceinline__ void load8(const T* p, float (&out)[8]) {
  if constexpr (kAligned) {
    typename Vec8<T>::Storage raw = *reinterpret_cast<const typename Vec8<T>::Storage*>(p);
    const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = to_float(elems[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = to_float(p[i]);
  }
}

template <typename T, bool kAligned>
__device__ __forceinline__ void store8(T* p, const T (&v)[8]) {
  if constexpr (kAligned) {
    typename Vec8<T>::Storage raw;
    T* elems = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) elems[i] = v[i];
    *reinterpret_cast<typename Vec8<T>::Storage*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = v[i];
  }
}

inline bool is_aligned(const void* p, int bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

// Grid-size helper: at most 2^31 - 1 blocks in x.
inline unsigned int blocks_for(int64_t work, int per_block) {
  return static_cast<unsigned int>((work + per_block - 1) / per_block);
}

}  // namespace quamba
