// Plain Mamba scan in bfloat16 (fp_ops.selective_scan_ref semantics, float32 arithmetic).
#include "scan_kernel.cuh"

namespace quamba {

cudaError_t launch_scan_bf16(const ScanArgs& a, cudaStream_t stream) {
  return scan_detail::launch_exact_or_fast<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(a, stream);
}

}  // namespace quamba
