// Simulation scan: float32 in and out, exact mode only (bit-identical to
// reference_ops.selective_scan run by PyTorch on the GPU).
#include "scan_kernel.cuh"

namespace quamba {

cudaError_t launch_scan_f32(const ScanArgs& a, cudaStream_t stream) {
  if (!a.exact) return cudaErrorInvalidValue;
  return scan_detail::launch_typed<float, float, float, true>(a, stream);
}

}  // namespace quamba
