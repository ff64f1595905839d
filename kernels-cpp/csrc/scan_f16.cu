// Plain Mamba scan in float16 (fp_ops.selective_scan_ref semantics, float32 arithmetic).
#include "scan_kernel.cuh"

namespace quamba {

cudaError_t launch_scan_f16(const ScanArgs& a, cudaStream_t stream) {
  return scan_detail::launch_exact_or_fast<__half, __half, __half>(a, stream);
}

}  // namespace quamba
