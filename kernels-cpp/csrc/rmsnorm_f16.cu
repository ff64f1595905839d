// RMSNorm kernels for __half input.
#include "rmsnorm_kernel.cuh"

namespace quamba {

cudaError_t launch_rmsnorm_f16(const RmsNormArgs& a, cudaStream_t stream) {
  return rmsnorm_detail::dispatch_weight<__half>(a, stream);
}

}  // namespace quamba
