// Residual add + RMSNorm: dispatch on x's dtype; the kernels are in rmsnorm_kernel.cuh and are
// instantiated per x dtype in rmsnorm_{f16,bf16,f32}.cu (compiled in parallel).
#include "rmsnorm.h"

namespace quamba {

cudaError_t launch_rmsnorm_f16(const RmsNormArgs& a, cudaStream_t stream);
cudaError_t launch_rmsnorm_bf16(const RmsNormArgs& a, cudaStream_t stream);
cudaError_t launch_rmsnorm_f32(const RmsNormArgs& a, cudaStream_t stream);

cudaError_t launch_rmsnorm(const RmsNormArgs& a, cudaStream_t stream) {
  switch (a.x_type) {
    case ElemType::Float16: return launch_rmsnorm_f16(a, stream);
    case ElemType::BFloat16: return launch_rmsnorm_bf16(a, stream);
    case ElemType::Float32: return launch_rmsnorm_f32(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace quamba
