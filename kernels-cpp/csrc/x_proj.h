#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "gemm_int8.h"

namespace quamba {

// x_proj of a prefill, reading the conv's sequence-last codes in place and writing what its
// consumers read (x_proj.cu):
//   acc[b, l, j] = sum_e u[b, e, l] * w[j, e]          (exact int32; u (B, E, L), w (R + 2N, E))
//   dt_low[b, l, j]     = Q8(acc[b, l, j])       j <  R        (B, L, R): dt_proj's input
//   B[b, n, l]          = Q8(acc[b, l, R + n])                 (B, N, L): the scan's B
//   C[b, n, l]          = Q8(acc[b, l, R + N + n])             (B, N, L): the scan's C
// with the INT8 epilogue of gemm_int8.h (ep.out_type Int8, ep.seq_len 0). Replaces the transpose
// of u, the GEMM into (B, L, R + 2N) and the three copies out of it.
struct XProjArgs {
  const int8_t* u;
  const int8_t* w;
  int8_t* dt_low;
  int8_t* B;
  int8_t* C;
  int64_t batch, dim, seqlen;  // B, E, L
  int64_t dt_rank, dstate;     // R, N
  GemmEpilogue ep;
  int split_k;  // blocks (a thread-block cluster) per 64 tokens, each a slice of E: 1, 2, 4 or 8
};

// Largest R + 2N the kernel takes (its per-warp accumulator tiles).
constexpr int kXProjMaxOut = 256;

// Whether the kernel takes these shapes on the current device: E % 128 == 0, L % 16 == 0,
// B * ceil(L / 64) <= 65535, B * E < 2^31, 1 <= R + 2N <= kXProjMaxOut, u and w 16-byte aligned,
// compute capability 9.0 or newer (TMA, thread-block clusters).
bool x_proj_applies(const XProjArgs& a);

// cudaErrorNotSupported where x_proj_applies is false, cudaErrorInvalidValue for a split_k other
// than 1, 2, 4, 8 or above E / 128.
cudaError_t launch_x_proj(const XProjArgs& a, cudaStream_t stream);

}  // namespace quamba
