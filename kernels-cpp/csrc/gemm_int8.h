#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace quamba {

// What the INT8 GEMM epilogue writes.
enum class GemmOut : int { Int32 = 0, Int8 = 1, Float16 = 2, BFloat16 = 3, Float32 = 4 };

// The epilogue of acc = x_q @ w_q^T (exact int32), as reference_ops.w8a8_linear defines it:
//   v = float32(acc) * scale            (scale = float32(s_x * s_w))
//   Int8:  Q8(v, out_scale, rule)       (IEEE division decides near ties, saturating)
//   Float: v rounded once to the output dtype;  Int32: acc itself (tests, cuBLASLt checks).
// seq_len > 0 writes the sequence-last layout: row m = b * seq_len + l, column n go to
// out[(b * N + n) * seq_len + l] (what the conv and scan read); seq_len == 0 writes (M, N).
struct GemmEpilogue {
  GemmOut out_type = GemmOut::Int32;
  float scale = 1.0f;
  float out_scale = 1.0f;
  int rounding = 0;  // 0 half away from zero, 1 half to even
  int64_t seq_len = 0;
};

// Which kernel: Auto = Stream (dp4a GEMV) for M <= 4, Skinny (mma) for M <= 16, Tiled above. They
// need K % 16 == 0, 16-byte aligned x and w and sm_80+; otherwise a byte-wise kernel runs whatever
// is asked, with the same results. Stream takes M <= 4 only. Wgmma (Hopper) needs a build with
// sm_90 (wgmma_gemm_built()), a device of compute capability 9.0, K % 16 == 0 and aligned x and w;
// otherwise it returns cudaErrorNotSupported. ShortK (any sm_80+ GPU) takes K <= kShortKMax only
// (cudaErrorInvalidValue above). Auto never picks Wgmma or ShortK (the caller decides).
enum class GemmAlgo : int { Auto = 0, Skinny = 1, Tiled = 2, Stream = 3, Wgmma = 4, ShortK = 5 };

// The largest K of the short-K kernel (gemm_short_k.cu): w's slice stays in registers.
constexpr int kShortKMax = 256;

// Whether this build has the Hopper GEMM.
bool wgmma_gemm_built();

// x (M, K) and w (N, K) int8, row-major, contiguous; any M, N, K >= 1. constant_w: the caller
// promises that the kernel launched just before this one on the stream does not write w (model
// weights); the stream GEMV then starts reading w before that kernel has finished (launch.cuh).
cudaError_t launch_int8_gemm(const int8_t* x, const int8_t* w, void* out, int64_t M, int64_t N,
                             int64_t K, const GemmEpilogue& ep, GemmAlgo algo, bool constant_w,
                             cudaStream_t stream);

// The epilogue alone over int32 accumulators acc (M, N) row-major (e.g. cuBLASLt's output).
cudaError_t launch_int32_epilogue(const int32_t* acc, void* out, int64_t M, int64_t N,
                                  const GemmEpilogue& ep, cudaStream_t stream);

}  // namespace quamba
