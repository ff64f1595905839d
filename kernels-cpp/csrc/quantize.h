#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace quamba {

// out[i] = clamp(round(x[i] / scale), -128, 127); rounding: 0 half away from zero, 1 half to even.
cudaError_t launch_quantize_int8(const float* x, int8_t* out, int64_t n, float scale, int rounding,
                                 cudaStream_t stream);

}  // namespace quamba

namespace quamba {

// Mode 3's per-sequence dynamic INT8 of x (B, E, L) float32 (quamba_layers.quant.modules.
// dynamic_scale_per_sequence and quantize_per_sequence): peak[b] = max |x[b, :, t]| over the real
// positions t < seq_lens[b] (all L without seq_lens); scales[b] = peak[b] / 127 (IEEE division),
// 1 where the peak is 0; out = Q8(x / scales[b]) at every position. peak_bits: (B,) scratch.
cudaError_t launch_quantize_int8_per_sequence(const float* x, int8_t* out, float* scales,
                                              unsigned* peak_bits, const int64_t* seq_lens,
                                              int64_t batch, int64_t dim, int64_t len,
                                              int rounding, cudaStream_t stream);

}  // namespace quamba
