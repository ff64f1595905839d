#pragma once
// Causal depthwise conv1d (width 2..4) + bias + optional SiLU, prefill and single-token update.
// References: quamba_layers.reference_ops.conv1d_int8 / conv1d_int8_update (INT8 path) and
// quamba_layers.fp_ops.causal_conv1d_ref / causal_conv1d_update_ref (float path). Both are matched
// bit for bit (same float32 operations in the same order, accurate expf, IEEE division).
#include <cstdint>
#include <cuda_runtime.h>

#include "elem_type.h"

namespace quamba {

struct Conv1dArgs {
  // Prefill: x (B, E, L); INT8 path: state (B, E, width - 1) int8 or null, written with each
  // row's last width - 1 inputs (zeros before the row: the decode state after the prompt).
  // Update: x (B, E) and state (B, E, width - 1), updated in place.
  const void* x = nullptr;
  void* state = nullptr;
  // INT8 path: int8 codes (E, width). Float path: weight_type (x's dtype or float32).
  const void* weight = nullptr;
  // INT8 path: int8 codes b_q (E,), or null. Float path: (E,) of weight_type, or null.
  const void* bias = nullptr;
  // INT8 path scales: v = float32(s_w * s_x) * acc + float32(s_b * b_q), products in float64.
  // s_x_per_seq (B,) float32 replaces s_x when not null (dynamic per-sequence input scale).
  double s_x = 1.0;
  const float* s_x_per_seq = nullptr;
  double s_w = 1.0;
  double s_b = 1.0;
  void* out = nullptr;  // (B, E, L) / (B, E)
  int64_t batch = 0;
  int64_t dim = 0;
  int64_t seqlen = 0;  // prefill only
  int64_t x_row = 0;   // update only: elements between x's rows (0: contiguous, E)
  int width = 4;
  ElemType x_type = ElemType::Int8;       // int8 selects the INT8 path
  ElemType weight_type = ElemType::Int8;  // float path: x_type or float32
  ElemType out_type = ElemType::Int8;     // INT8 path: int8 (Q8 with out_scale) or float32;
                                          // float path: x_type
  float out_scale = 1.0f;
  int rounding = 0;  // 0 half away from zero, 1 half to even
  bool silu = true;
};

// Both return the launch error (cudaSuccess when nothing went wrong); arguments are validated by
// the caller (the nanobind module), these only dispatch. cudaErrorInvalidValue for a combination
// of types or a width that is not compiled.
cudaError_t launch_conv1d_fwd(const Conv1dArgs& args, cudaStream_t stream);
cudaError_t launch_conv1d_update(const Conv1dArgs& args, cudaStream_t stream);

}  // namespace quamba
