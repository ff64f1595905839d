#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace quamba {

// out[i] = clamp(round(x[i] / scale), -128, 127); rounding: 0 half away from zero, 1 half to even.
cudaError_t launch_quantize_int8(const float* x, int8_t* out, int64_t n, float scale, int rounding,
                                 cudaStream_t stream);

}  // namespace quamba
