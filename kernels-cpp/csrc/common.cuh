#pragma once
#include <cstdint>
#include <cuda_runtime.h>

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

}  // namespace quamba
