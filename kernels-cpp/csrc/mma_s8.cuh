#pragma once
// sm_80+ building blocks of the INT8 GEMMs (gemm_int8.cu, gemm_short_k.cu) and the persistent
// decode kernel's GEMVs (decode_w8a8.cu): cp.async copies into shared memory, the dp4a dot product
// of 16 bytes, and the m16n8k32 s8 tensor-core product.
#include <cuda_runtime.h>

namespace quamba {

// ---- cp.async (sm_80+): 16 bytes global -> shared, zero-filled when !valid ----
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// acc + the exact int32 dot product of 16 int8 pairs (four dp4a).
__device__ __forceinline__ int dot16(const int4& a, const int4& b, int acc) {
  acc = __dp4a(a.x, b.x, acc);
  acc = __dp4a(a.y, b.y, acc);
  acc = __dp4a(a.z, b.z, acc);
  return __dp4a(a.w, b.w, acc);
}

// c += A (16 x 32, rows g and g + 8 of lane (g, t)) x B (32 x 8) in s8, exact int32.
__device__ __forceinline__ void mma_s8_16x8x32(int (&c)[4], int a0, int a1, int a2, int a3, int b0,
                                               int b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // Not volatile: the compiler may then move loads of later chunks ahead of this mma.
  asm(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // built for sm_80+ only (see CMakeLists.txt)
#endif
}

// The two mma of a 64-byte k chunk, with A words (rows g, g + 8 of A) and B words (row g of B,
// i.e. column g of the product) in a permuted k order: lane (g, t) feeds 16 contiguous bytes at
// k = chunk + 16 t, words 0-1 to the first mma and 2-3 to the second; A and B see the same
// permutation of k, which an exact integer sum does not notice.
__device__ __forceinline__ void mma_chunk64(int (&c)[4], const int4& xa, const int4& xb,
                                            const int4& wv) {
  mma_s8_16x8x32(c, xa.x, xb.x, xa.y, xb.y, wv.x, wv.y);
  mma_s8_16x8x32(c, xa.z, xb.z, xa.w, xb.w, wv.z, wv.w);
}

}  // namespace quamba
