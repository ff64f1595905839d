// RMSNorm kernels for __nv_bfloat16 input.
#include "rmsnorm_kernel.cuh"

namespace quamba {

cudaError_t launch_rmsnorm_bf16(const RmsNormArgs& a, cudaStream_t stream) {
  return rmsnorm_detail::dispatch_weight<__nv_bfloat16>(a, stream);
}

}  // namespace quamba
