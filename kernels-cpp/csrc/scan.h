#pragma once
// Selective scan (Mamba-1), prefill and single-token decode step.
//
// Reference semantics: quamba_layers.reference_ops.selective_scan / selective_scan_int8 /
// selective_scan_step and quamba_layers.fp_ops.selective_scan_ref / selective_state_update_ref.
// In exact mode every float32 operation is rounded on its own in the reference's order (sequential
// recurrence in t, pairwise-halving sum over the state, accurate expf/log1pf, IEEE division), so
// the float32 results are bit-identical to the references run by PyTorch on the GPU. Fast mode
// (prefill only) contracts the recurrence into fused multiply-adds and computes exp(delta * A)
// with the hardware exp2; everything else is the same.
#include <cstdint>
#include <cuda_runtime.h>

#include "elem_type.h"

namespace quamba {

// Largest d_state the scan kernels accept (N is padded with zeros to a power of two >= 8).
constexpr int kScanMaxState = 64;

struct ScanArgs {
  int64_t batch = 0;
  int64_t dim = 0;      // E
  int64_t seqlen = 0;   // L (prefill); 1 for a step
  int64_t dstate = 0;   // N

  // Activations. Prefill: u, delta, z (B, E, L); B, C (B, N, L). Step: u, delta, z (B, E);
  // B, C (B, N). INT8 tensors are dequantized as q * float32(scale).
  const void* u = nullptr;
  ElemType u_type = ElemType::Int8;
  const void* delta = nullptr;
  const void* z = nullptr;  // may be null
  const void* B = nullptr;
  const void* C = nullptr;
  ElemType x_type = ElemType::Int8;  // dtype of delta, z, B, C
  float u_scale = 1.0f;
  float delta_scale = 1.0f;
  float z_scale = 1.0f;
  float B_scale = 1.0f;
  float C_scale = 1.0f;
  // Step only: elements between the rows (batch entries) of z, B and C, so that they can be
  // column ranges of a wider matrix (z of in_proj's output, B and C of x_proj's). 0: contiguous.
  int64_t z_row = 0, B_row = 0, C_row = 0;

  // Parameters: float32 A (E, N) (already negative), D (E), delta_bias (E); or INT8 codes with
  // A = -exp(A_log_q * s_A), D = D_q * s_D, delta_bias = dtb_q * s_dtb (param_type Int8).
  ElemType param_type = ElemType::Float32;
  const void* A = nullptr;
  const void* D = nullptr;           // may be null
  const void* delta_bias = nullptr;  // may be null
  float A_scale = 1.0f;
  float D_scale = 1.0f;
  float delta_bias_scale = 1.0f;
  bool softplus = true;

  // Prefill: optional float32 initial state (B, E, N). Step: the state (B, E, N), read and
  // overwritten in place: int8 codes on the grid state_scale (requantized with state_rounding),
  // or float16 / bfloat16 / float32 values.
  const float* initial_state = nullptr;
  void* state = nullptr;
  ElemType state_type = ElemType::Int8;

  // Outputs. Prefill: y (B, L, E); step: y (B, E).
  void* out = nullptr;
  ElemType out_type = ElemType::Float16;
  float* last_state = nullptr;  // prefill: float32 (B, E, N) state after the last step, or null
  int8_t* state_q = nullptr;    // prefill: Q8(h_last, state_scale, state_rounding), or null
  float state_scale = 1.0f;
  int state_rounding = 0;  // 0 half away from zero, 1 half to even

  bool exact = true;
  // Prefill: lanes per channel for 9 <= N <= 16: 16 (one state per lane) or 8 (two); 0: chosen
  // by the kernel from the grid size and the input type (scan_kernel.cuh, auto_lanes_per_channel).
  int lanes_per_channel = 0;
  // Prefill, INT8 delta/B/C/z with 8 lanes per channel: threads per block, 64 or 128; 0: chosen
  // by the kernel from the grid size (scan_kernel.cuh, int8_narrow_block_threads).
  int block_threads = 0;

  // Step with an INT8 state only: dt_proj fused in. When dt_x is set, the kernel computes
  // delta = Q8(float32(dt_x[b, :R] . dt_w[e, :R]) * dt_gemm_scale, delta_scale, dt_rounding) --
  // the W8A8 epilogue of the dt_proj GEMM, exactly -- writes the codes to `delta` (then an int8
  // (B, E) output) and uses them. dt_x rows are dt_x_row elements apart (x_proj's output as is).
  const int8_t* dt_x = nullptr;  // (B, dt_x_row), the first dt_rank columns are dt_proj's input
  const int8_t* dt_w = nullptr;  // (E, dt_rank)
  int64_t dt_rank = 0;
  int64_t dt_x_row = 0;
  float dt_gemm_scale = 1.0f;  // float32(s_x * s_w)
  int dt_rounding = 0;
};

// Supported combinations (cudaErrorInvalidValue otherwise):
//   prefill: (u, x, out) = (f32, f32, f32) [sim], (i8, i8, f16), (f32, i8, f16),
//            (f16, f16, f16), (bf16, bf16, bf16); fast mode for all but the f32 sim.
//   step:    state i8 with (u, x, out) = (i8, i8, f16) or (f32, i8, f16);
//            state f16/bf16/f32 with (u, x, out) all f16, all bf16 or all f32 (state f32 or x's).
cudaError_t launch_selective_scan(const ScanArgs& args, cudaStream_t stream);
cudaError_t launch_selective_scan_step(const ScanArgs& args, cudaStream_t stream);

// Per-combination entry points (one translation unit each, compiled in parallel).
cudaError_t launch_scan_f32(const ScanArgs& args, cudaStream_t stream);
cudaError_t launch_scan_int8(const ScanArgs& args, cudaStream_t stream);
cudaError_t launch_scan_f32u_int8(const ScanArgs& args, cudaStream_t stream);
cudaError_t launch_scan_f16(const ScanArgs& args, cudaStream_t stream);
cudaError_t launch_scan_bf16(const ScanArgs& args, cudaStream_t stream);

}  // namespace quamba
