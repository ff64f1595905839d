#pragma once
// Fast Hadamard transform of the last axis, n = m * 2^k with m in {1, 12, 20}, n <= 8192, in the
// exact float32 order of quamba_layers.hadamard.hadamard_transform_ref (bit-identical):
// the axis viewed as (m, 2^k) row-major; butterflies (a + b, a - b) over the 2^k axis with
// increasing stride; the m x m +-1 matrix with a sequential sum over its columns; times scale;
// then Q8(., out_scale, rounding) for int8 output, or a float output.
#include <cstdint>
#include <cuda_runtime.h>

#include "elem_type.h"

namespace quamba {

constexpr int64_t kHadamardMaxSize = 8192;

struct HadamardArgs {
  const void* x = nullptr;         // (rows, n): float16, bfloat16 or float32
  void* out = nullptr;             // (rows, n): int8, float16, bfloat16 or float32
  const float* h_m = nullptr;      // (m, m) +-1 matrix (float32), null when m == 1
  int64_t rows = 0;
  int64_t n = 0;
  int m = 1;                       // 1, 12 or 20; n / m must be a power of two
  ElemType x_type = ElemType::Float16;
  ElemType out_type = ElemType::Int8;
  float scale = 1.0f;              // float32(scale), usually 1/sqrt(n)
  float out_scale = 1.0f;          // int8 output only
  int rounding = 0;                // 0 half away from zero, 1 half to even
};

cudaError_t launch_hadamard(const HadamardArgs& args, cudaStream_t stream);

}  // namespace quamba
