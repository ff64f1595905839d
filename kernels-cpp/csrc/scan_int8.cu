// INT8 scan: int8 u, delta, B, C, z -> float16 y (reference_ops.selective_scan_int8).
#include "scan_kernel.cuh"

namespace quamba {

cudaError_t launch_scan_int8(const ScanArgs& a, cudaStream_t stream) {
  return scan_detail::launch_exact_or_fast<int8_t, int8_t, __half>(a, stream);
}

}  // namespace quamba
