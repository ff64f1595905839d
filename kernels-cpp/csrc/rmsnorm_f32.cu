// RMSNorm kernels for float input.
#include "rmsnorm_kernel.cuh"

namespace quamba {

cudaError_t launch_rmsnorm_f32(const RmsNormArgs& a, cudaStream_t stream) {
  return rmsnorm_detail::dispatch_weight<float>(a, stream);
}

}  // namespace quamba
