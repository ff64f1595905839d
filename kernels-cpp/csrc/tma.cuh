#pragma once
// sm_90 tensor-memory-accelerator (TMA) copies into shared memory, completed on mbarriers (the
// Hopper GEMM in sm90a/gemm_int8_wgmma.cu, x_proj.cu), and the host side of their tensor maps.
// Device code for compute capability 9.0 and newer only: elsewhere it traps.
#include <cstdint>

#include <cuda.h>  // CUtensorMap (types only: the encoder comes from the runtime's entry point query)
#include <cuda_runtime.h>

namespace quamba {
namespace async {

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void barrier_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(bar)), "r"(count));
}
__device__ __forceinline__ void barrier_expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void barrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_address(bar)) : "memory");
}
__device__ __forceinline__ void barrier_wait(uint64_t* bar, int parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_address(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
// A 2-D TMA load of the box at (column c0, row r0) into shared memory; completion is counted on
// `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int r0,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_address(bar)), "r"(c0), "r"(r0)
      : "memory");
}
// A 1-D bulk copy of `bytes` (a multiple of 16, both addresses 16-byte aligned) from global
// memory into shared memory; completion is counted on `bar` (the persistent decode kernel's
// weight stream, and its probe).
__device__ __forceinline__ void bulk_load_1d(void* dst, const void* src, uint32_t bytes,
                                             uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(smem_address(bar))
      : "memory");
}
// Orders this thread's earlier generic-proxy accesses of shared memory before its later
// async-proxy ones (a copy into a buffer that was just read).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
#else
__device__ __forceinline__ void barrier_init(uint64_t*, int) { __trap(); }
__device__ __forceinline__ void barrier_expect_bytes(uint64_t*, uint32_t) { __trap(); }
__device__ __forceinline__ void barrier_arrive(uint64_t*) { __trap(); }
__device__ __forceinline__ void barrier_wait(uint64_t*, int) { __trap(); }
__device__ __forceinline__ void tma_load_2d(void*, const CUtensorMap*, int, int, uint64_t*) {
  __trap();
}
__device__ __forceinline__ void fence_proxy_async() { __trap(); }
__device__ __forceinline__ void bulk_load_1d(void*, const void*, uint32_t, uint64_t*) { __trap(); }
#endif

// Single-copy-atomic 64-bit loads and stores at GPU scope, for words that blocks of one grid
// exchange (a tag and its data in one word: the persistent decode kernel and its probe).
__device__ __forceinline__ uint64_t load_relaxed_gpu(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void store_relaxed_gpu(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
// *p += v at GPU scope (a reduction: no value returned), for words that count and sum what the
// blocks of one grid add (the persistent decode kernel's x_proj sums).
__device__ __forceinline__ void add_relaxed_gpu(uint64_t* p, uint64_t v) {
  asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver, found once through the runtime (nothing links libcuda);
// nullptr where the driver has none.
inline EncodeTiled encode_tiled() {
  static const EncodeTiled encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(fn);
  }();
  return encode;
}

// The map of a row-major byte matrix (rows, cols) whose rows are `row_bytes` apart, read in boxes
// of box_rows x box_cols; out-of-bounds parts of a box arrive as zeros.
inline cudaError_t make_byte_map_2d(CUtensorMap* map, const void* data, uint64_t rows,
                                    uint64_t cols, uint64_t row_bytes, uint32_t box_rows,
                                    uint32_t box_cols, CUtensorMapSwizzle swizzle) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult result =
      encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(data), dims, strides, box,
             element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace async
}  // namespace quamba
