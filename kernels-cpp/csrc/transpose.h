#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace quamba {

// out[b][c][r] = x[b][r][c] for contiguous int8 x (batch, rows, cols) and out (batch, cols, rows).
// Makes the token-major copy of a sequence-last activation (x_proj's input) without the byte-wise
// strided copy a generic elementwise kernel does.
cudaError_t launch_transpose_int8(const int8_t* x, int8_t* out, int64_t batch, int64_t rows,
                                  int64_t cols, cudaStream_t stream);

}  // namespace quamba
