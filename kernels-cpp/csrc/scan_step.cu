// Selective-scan decode step and the prefill dispatcher.
//
// Step (reference_ops.selective_scan_step / fp_ops.selective_state_update_ref): one thread per
// (batch, channel, state) -- N padded to NP, G = min(NP, 32) lanes per channel -- computes
//   h = exp(delta * A) * h_old + (delta * B) * u,   p = h * C
// with every operation rounded on its own, writes the new state in place (INT8 codes requantized
// with Q8(h, s_h, rule), or the float value), and the lanes sum p in the pairwise-halving order
// (xor-butterfly, distance G/2 first) before lane 0 adds u * D and applies the gate.
#include "scan_kernel.cuh"

namespace quamba {
namespace {

using scan_detail::a_value;
using scan_detail::Layout;
using scan_detail::param_value;

template <int NP, typename TState, typename TU, typename TX, typename TOut>
__global__ void __launch_bounds__(scan_detail::kThreads) selective_scan_step_kernel(ScanArgs a) {
  using Lay = Layout<NP, scan_detail::kThreads>;
  constexpr int G = Lay::kLanes;
  constexpr int S = Lay::kPerLane;
  constexpr int CPB = Lay::kChannels;

  const int64_t E = a.dim, N = a.dstate;
  const int64_t b = blockIdx.y;
  const int c = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * CPB + c;
  const bool channel_ok = e < E;
  const bool int8_params = a.param_type == ElemType::Int8;
  const int64_t be = b * E + e;

  float u = 0.0f, d = 0.0f, z = 0.0f;
  if (channel_ok) {
    u = dequant(static_cast<const TU*>(a.u)[be], a.u_scale);
    d = dequant(static_cast<const TX*>(a.delta)[be], a.delta_scale);
    if (a.delta_bias != nullptr) {
      d = __fadd_rn(d, param_value(a.delta_bias, e, int8_params, a.delta_bias_scale));
    }
    if (a.softplus) d = softplus_exact(d);
    if (a.z != nullptr) z = dequant(static_cast<const TX*>(a.z)[be], a.z_scale);
  }

  TState* state = static_cast<TState*>(a.state);
  float p[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int64_t n = lane + G * s;
    const bool ok = channel_ok && n < N;
    float h = 0.0f, A = 0.0f, Bn = 0.0f, Cn = 0.0f;
    if (ok) {
      h = dequant(state[be * N + n], a.state_scale);
      A = a_value(a, e * N + n);
      Bn = dequant(static_cast<const TX*>(a.B)[b * N + n], a.B_scale);
      Cn = dequant(static_cast<const TX*>(a.C)[b * N + n], a.C_scale);
    }
    const float dA = expf(__fmul_rn(d, A));
    const float dBu = __fmul_rn(__fmul_rn(d, Bn), u);
    h = __fadd_rn(__fmul_rn(dA, h), dBu);
    p[s] = __fmul_rn(h, Cn);
    if (ok) {
      if constexpr (sizeof(TState) == 1) {
        state[be * N + n] =
            quantize_int8(h, a.state_scale, static_cast<Rounding>(a.state_rounding));
      } else {
        state[be * N + n] = from_float<TState>(h);
      }
    }
  }
#pragma unroll
  for (int w = S / 2; w >= 1; w /= 2) {
#pragma unroll
    for (int s = 0; s < w; ++s) p[s] = __fadd_rn(p[s], p[s + w]);
  }
  float y = p[0];
#pragma unroll
  for (int dist = G / 2; dist >= 1; dist /= 2) {
    y = __fadd_rn(y, __shfl_xor_sync(0xffffffffu, y, dist));
  }
  if (channel_ok && lane == 0) {
    if (a.D != nullptr) y = __fadd_rn(y, __fmul_rn(u, param_value(a.D, e, int8_params, a.D_scale)));
    if (a.z != nullptr) y = __fmul_rn(y, silu_exact(z));
    static_cast<TOut*>(a.out)[be] = from_float<TOut>(y);
  }
}

template <typename TState, typename TU, typename TX, typename TOut>
cudaError_t launch_step(const ScanArgs& a, cudaStream_t stream) {
  if (a.batch == 0 || a.dim == 0) return cudaSuccess;
  if (a.batch > 65535 || a.dstate < 1 || a.dstate > kScanMaxState) return cudaErrorInvalidValue;
#define QUAMBA_STEP_LAUNCH(NP)                                                                  \
  {                                                                                             \
    const dim3 grid(                                                                            \
        static_cast<unsigned int>((a.dim + Layout<NP, scan_detail::kThreads>::kChannels - 1) / \
                                  Layout<NP, scan_detail::kThreads>::kChannels),             \
        static_cast<unsigned int>(a.batch));                                                    \
    selective_scan_step_kernel<NP, TState, TU, TX, TOut>                                        \
        <<<grid, scan_detail::kThreads, 0, stream>>>(a);                                        \
    return cudaGetLastError();                                                                  \
  }
  switch (scan_detail::padded_state(a.dstate)) {
    case 8: QUAMBA_STEP_LAUNCH(8)
    case 16: QUAMBA_STEP_LAUNCH(16)
    case 32: QUAMBA_STEP_LAUNCH(32)
    case 64: QUAMBA_STEP_LAUNCH(64)
    default: return cudaErrorInvalidValue;
  }
#undef QUAMBA_STEP_LAUNCH
}

// Float step: u, x and y share one dtype T; the state is T or float32.
template <typename T>
cudaError_t launch_float_step(const ScanArgs& a, cudaStream_t stream) {
  if (a.u_type != a.x_type || a.out_type != a.x_type) return cudaErrorInvalidValue;
  if (a.state_type == a.x_type) return launch_step<T, T, T, T>(a, stream);
  if (a.state_type == ElemType::Float32) return launch_step<float, T, T, T>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_selective_scan_step(const ScanArgs& a, cudaStream_t stream) {
  if (a.state_type == ElemType::Int8) {
    if (a.x_type != ElemType::Int8 || a.out_type != ElemType::Float16) return cudaErrorInvalidValue;
    if (a.u_type == ElemType::Int8) return launch_step<int8_t, int8_t, int8_t, __half>(a, stream);
    if (a.u_type == ElemType::Float32) return launch_step<int8_t, float, int8_t, __half>(a, stream);
    return cudaErrorInvalidValue;
  }
  switch (a.x_type) {
    case ElemType::Float16: return launch_float_step<__half>(a, stream);
    case ElemType::BFloat16: return launch_float_step<__nv_bfloat16>(a, stream);
    case ElemType::Float32:
      if (a.state_type != ElemType::Float32) return cudaErrorInvalidValue;
      return launch_float_step<float>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_selective_scan(const ScanArgs& a, cudaStream_t stream) {
  if (a.x_type == ElemType::Int8) {
    if (a.out_type != ElemType::Float16) return cudaErrorInvalidValue;
    if (a.u_type == ElemType::Int8) return launch_scan_int8(a, stream);
    if (a.u_type == ElemType::Float32) return launch_scan_f32u_int8(a, stream);
    return cudaErrorInvalidValue;
  }
  if (a.u_type != a.x_type || a.out_type != a.x_type) return cudaErrorInvalidValue;
  switch (a.x_type) {
    case ElemType::Float32: return launch_scan_f32(a, stream);
    case ElemType::Float16: return launch_scan_f16(a, stream);
    case ElemType::BFloat16: return launch_scan_bf16(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace quamba
