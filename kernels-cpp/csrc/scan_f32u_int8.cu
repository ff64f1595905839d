// INT8 scan with a float32 u (the FP32-input variant of reference_ops.selective_scan_int8).
#include "scan_kernel.cuh"

namespace quamba {

cudaError_t launch_scan_f32u_int8(const ScanArgs& a, cudaStream_t stream) {
  return scan_detail::launch_exact_or_fast<float, int8_t, __half>(a, stream);
}

}  // namespace quamba
