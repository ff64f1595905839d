#pragma once
// Residual add + RMSNorm over the last axis, INT8 or float output. Bit-exact with
// quamba_layers.reference_ops.rmsnorm up to the float64 sum of squares: the kernel sums in a fixed
// order (deterministic, no autotuning); the reference's float64 sum may round differently in the
// last float64 bit, which changes the float32 mean square only when it lies within ~1e-13
// (relative) of a float32 rounding boundary.
#include <cstdint>
#include <cuda_runtime.h>

#include "elem_type.h"

namespace quamba {

struct RmsNormArgs {
  const void* x = nullptr;           // (rows, D): float16, bfloat16 or float32
  const float* residual = nullptr;   // (rows, D) float32, or null
  const void* weight = nullptr;      // (D,) of weight_type, or null (ones)
  void* out = nullptr;               // (rows, D) of out_type
  float* residual_out = nullptr;     // (rows, D) float32 r = x + residual, or null (not written)
  int64_t rows = 0;
  int64_t dim = 0;
  ElemType x_type = ElemType::Float16;
  ElemType weight_type = ElemType::Float32;  // x_type or float32
  ElemType out_type = ElemType::Int8;        // int8 (Q8 with out_scale), float16, bfloat16, float32
  float eps = 1e-5f;                         // float32(eps)
  float out_scale = 1.0f;
  int rounding = 1;  // 0 half away from zero, 1 half to even (the reference's default here)
};

// Largest D the kernel handles (rows are held in registers).
constexpr int64_t kRmsNormMaxDim = 16384;

cudaError_t launch_rmsnorm(const RmsNormArgs& args, cudaStream_t stream);

}  // namespace quamba
