// Selective-scan decode step and the prefill dispatcher.
//
// Step (reference_ops.selective_scan_step / fp_ops.selective_state_update_ref): G lanes per
// (batch, channel) -- N padded to NP, S = NP / G states per lane, state n = lane + G * s -- compute
//   h = exp(delta * A) * h_old + (delta * B) * u,   p = h * C
// with every operation rounded on its own, write the new state in place (INT8 codes requantized
// with Q8(h, s_h, rule), or the float value), and sum p in the pairwise-halving order: first inside
// the thread (states NP/2 .. G apart), then across the lanes (xor-butterfly, distance G/2 first).
// That is the same tree for every G, so G is a free choice: many lanes per channel for small
// batches (more threads, shorter per-thread chains), few for large ones (softplus and SiLU, per
// channel, are then computed by fewer redundant lanes). Latency: every global load is issued at
// the start, and silu(z) and u * D are formed while the state math runs.
#include "scan_kernel.cuh"

namespace quamba {
namespace {

using scan_detail::a_value;
using scan_detail::param_value;

template <int NP, int G>
struct StepLayout {
  static constexpr int kPerLane = NP / G;       // states per lane (G lanes per channel)
  static constexpr int kChannels = scan_detail::kThreads / G;  // channels per block
  static_assert(G >= 1 && G <= 32 && G <= NP && (G & (G - 1)) == 0, "G: power of two <= NP, 32");
};

template <int NP, int G, typename TState, typename TU, typename TX, typename TOut>
__global__ void __launch_bounds__(scan_detail::kThreads) selective_scan_step_kernel(ScanArgs a) {
  using Lay = StepLayout<NP, G>;
  constexpr int S = Lay::kPerLane;
  constexpr int CPB = Lay::kChannels;

  const int64_t E = a.dim, N = a.dstate;
  const int64_t b = blockIdx.y;
  {
    // While the previous kernel finishes: the block's state and parameters (HBM: a decode step
    // of a large model leaves nothing of them in L2) into L2 (see launch.cuh). The parameters
    // by the first sequence's blocks only (measured: each block prefetching them made batch 16
    // slower).
    const int64_t e_first = static_cast<int64_t>(blockIdx.x) * CPB;
    const int64_t channels = E - e_first < CPB ? E - e_first : CPB;
    const int64_t param_bytes = a.param_type == ElemType::Int8 ? 1 : 4;
    launch::prefetch_l2_range(static_cast<const TState*>(a.state) + (b * E + e_first) * N,
                              channels * N * static_cast<int64_t>(sizeof(TState)));
    if (b == 0) {
      launch::prefetch_l2_range(static_cast<const char*>(a.A) + e_first * N * param_bytes,
                                channels * N * param_bytes);
      if (a.dt_w != nullptr) {
        launch::prefetch_l2_range(a.dt_w + e_first * a.dt_rank, channels * a.dt_rank);
      }
      if (a.D != nullptr) {
        launch::prefetch_l2_range(static_cast<const char*>(a.D) + e_first * param_bytes,
                                  channels * param_bytes);
      }
      if (a.delta_bias != nullptr) {
        launch::prefetch_l2_range(static_cast<const char*>(a.delta_bias) + e_first * param_bytes,
                                  channels * param_bytes);
      }
    }
  }
  launch::start_after_prior_grids();  // after the L2 prefetch: see launch.cuh
  const int c = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * CPB + c;
  const bool channel_ok = e < E;
  const bool int8_params = a.param_type == ElemType::Int8;
  const int64_t be = b * E + e;
  TState* state = static_cast<TState*>(a.state);

  // Every global load first: they are independent, so they share one round trip.
  TU u_raw{};
  TX d_raw{}, z_raw{};
  float bias = 0.0f, D = 0.0f;
  TState h_raw[S];
  float A[S], Bn[S], Cn[S];
  if (channel_ok) {
    u_raw = static_cast<const TU*>(a.u)[be];
    if (a.dt_x == nullptr) d_raw = static_cast<const TX*>(a.delta)[be];
    if (a.delta_bias != nullptr) bias = param_value(a.delta_bias, e, int8_params, a.delta_bias_scale);
    if (a.z != nullptr) z_raw = static_cast<const TX*>(a.z)[b * (a.z_row > 0 ? a.z_row : E) + e];
    if (a.D != nullptr) D = param_value(a.D, e, int8_params, a.D_scale);
  }
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int64_t n = lane + G * s;
    const bool ok = channel_ok && n < N;
    h_raw[s] = TState{};
    A[s] = 0.0f;
    Bn[s] = 0.0f;
    Cn[s] = 0.0f;
    if (ok) {
      h_raw[s] = state[be * N + n];
      A[s] = a_value(a, e * N + n);
      Bn[s] = dequant(static_cast<const TX*>(a.B)[b * (a.B_row > 0 ? a.B_row : N) + n], a.B_scale);
      Cn[s] = dequant(static_cast<const TX*>(a.C)[b * (a.C_row > 0 ? a.C_row : N) + n], a.C_scale);
    }
  }

  if constexpr (sizeof(TX) == 1) {
    if (a.dt_x != nullptr) {
      // dt_proj fused: the channel's G lanes split the dot product over the rank (exact int32
      // sum in any order), then the GEMM epilogue's Q8, decided exactly as gemm_int8.cu does.
      const int8_t* xr = a.dt_x + b * a.dt_x_row;
      const int8_t* wr = a.dt_w + e * a.dt_rank;
      int acc = 0;
      if (channel_ok) {
        const bool vectors = a.dt_rank % 16 == 0 && a.dt_x_row % 16 == 0 &&
                             reinterpret_cast<uintptr_t>(a.dt_x) % 16 == 0 &&
                             reinterpret_cast<uintptr_t>(a.dt_w) % 16 == 0;
        const bool words = a.dt_rank % 4 == 0 && a.dt_x_row % 4 == 0 &&
                           reinterpret_cast<uintptr_t>(a.dt_x) % 4 == 0 &&
                           reinterpret_cast<uintptr_t>(a.dt_w) % 4 == 0;
        if (vectors) {
          // 16-byte pieces, up to four per lane loaded before any is used (rank 160 with 4
          // lanes per channel: one round trip instead of ten dependent 4-byte ones).
          const int64_t pieces = a.dt_rank / 16;
          for (int64_t p0 = lane; p0 < pieces; p0 += 4 * G) {
            int4 xv[4], wv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int64_t piece = p0 + i * G;
              xv[i] = wv[i] = make_int4(0, 0, 0, 0);
              if (piece < pieces) {
                xv[i] = __ldg(reinterpret_cast<const int4*>(xr + 16 * piece));
                wv[i] = __ldg(reinterpret_cast<const int4*>(wr + 16 * piece));
              }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              acc = __dp4a(xv[i].x, wv[i].x, acc);
              acc = __dp4a(xv[i].y, wv[i].y, acc);
              acc = __dp4a(xv[i].z, wv[i].z, acc);
              acc = __dp4a(xv[i].w, wv[i].w, acc);
            }
          }
        } else if (words) {
          for (int64_t k = 4 * lane; k < a.dt_rank; k += 4 * G) {
            acc = __dp4a(*reinterpret_cast<const int*>(xr + k),
                         *reinterpret_cast<const int*>(wr + k), acc);
          }
        } else {
          for (int64_t k = lane; k < a.dt_rank; k += G) acc += int(xr[k]) * int(wr[k]);
        }
      }
#pragma unroll
      for (int dist = G / 2; dist >= 1; dist /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, dist);
      const float v = __fmul_rn(__int2float_rn(acc), a.dt_gemm_scale);
      const float inv = __frcp_rn(a.delta_scale);
      d_raw = quantize_int8_by_reciprocal(v, a.delta_scale, inv, reciprocal_ok(inv),
                                          static_cast<Rounding>(a.dt_rounding));
      if (channel_ok && lane == 0) const_cast<TX*>(static_cast<const TX*>(a.delta))[be] = d_raw;
    }
  }

  float u = 0.0f, d = 0.0f, gate = 0.0f, skip = 0.0f;
  if (channel_ok) {
    u = dequant(u_raw, a.u_scale);
    d = dequant(d_raw, a.delta_scale);
    if (a.delta_bias != nullptr) d = __fadd_rn(d, bias);
    if (a.softplus) d = softplus_exact(d);
    if (a.z != nullptr) gate = silu_exact(dequant(z_raw, a.z_scale));
    if (a.D != nullptr) skip = __fmul_rn(u, D);
  }

  const Rounding state_rule = static_cast<Rounding>(a.state_rounding);
  const float inv_state_scale = __frcp_rn(a.state_scale);
  // quantize_int8_fast's error bound needs a normal reciprocal (any sensible scale).
  const bool fast_q = reciprocal_ok(inv_state_scale);
  float p[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int64_t n = lane + G * s;
    const bool ok = channel_ok && n < N;
    float h = dequant(h_raw[s], a.state_scale);
    const float dA = expf(__fmul_rn(d, A[s]));
    const float dBu = __fmul_rn(__fmul_rn(d, Bn[s]), u);
    h = __fadd_rn(__fmul_rn(dA, h), dBu);
    p[s] = __fmul_rn(h, Cn[s]);
    if (ok) {
      if constexpr (sizeof(TState) == 1) {
        // The codes of quantize_int8 (the IEEE division decides near a rounding boundary).
        state[be * N + n] = fast_q ? quantize_int8_fast(h, a.state_scale, inv_state_scale, state_rule)
                                   : quantize_int8(h, a.state_scale, state_rule);
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
    if (a.D != nullptr) y = __fadd_rn(y, skip);
    if (a.z != nullptr) y = __fmul_rn(y, gate);
    static_cast<TOut*>(a.out)[be] = from_float<TOut>(y);
  }
}

// Lanes per channel for NP padded states and this batch: all NP (up to 32) for one sequence, 8 for
// two or three, then 4 (the results do not depend on the choice). Measured at E = 5120, N = 16 on
// an H100: 16 lanes best at B = 1, 8 at B = 2, 4 from B = 4 (B = 16: 8.3 us against 15.2 with 16).
inline int step_lanes(int np, int64_t batch) {
  const int most = np < 32 ? np : 32;
  const int lanes = batch <= 1 ? most : batch <= 3 ? 8 : 4;
  return lanes < most ? lanes : most;
}

template <int NP, int G, typename TState, typename TU, typename TX, typename TOut>
cudaError_t launch_step_layout(const ScanArgs& a, cudaStream_t stream) {
  constexpr int kChannels = StepLayout<NP, G>::kChannels;
  const dim3 grid(static_cast<unsigned int>((a.dim + kChannels - 1) / kChannels),
                  static_cast<unsigned int>(a.batch));
  launch::launch_kernel(selective_scan_step_kernel<NP, G, TState, TU, TX, TOut>,
      grid, scan_detail::kThreads, 0, stream, a);
  return cudaGetLastError();
}

template <int NP, typename TState, typename TU, typename TX, typename TOut>
cudaError_t launch_step_np(const ScanArgs& a, cudaStream_t stream) {
  constexpr int kMost = NP < 32 ? NP : 32;
  switch (step_lanes(NP, a.batch)) {
    case 4: return launch_step_layout<NP, 4, TState, TU, TX, TOut>(a, stream);
    case 8: return launch_step_layout<NP, 8, TState, TU, TX, TOut>(a, stream);
    default: return launch_step_layout<NP, kMost, TState, TU, TX, TOut>(a, stream);
  }
}

template <typename TState, typename TU, typename TX, typename TOut>
cudaError_t launch_step(const ScanArgs& a, cudaStream_t stream) {
  if (a.batch == 0 || a.dim == 0) return cudaSuccess;
  if (a.batch > 65535 || a.dstate < 1 || a.dstate > kScanMaxState) return cudaErrorInvalidValue;
  switch (scan_detail::padded_state(a.dstate)) {
    case 8: return launch_step_np<8, TState, TU, TX, TOut>(a, stream);
    case 16: return launch_step_np<16, TState, TU, TX, TOut>(a, stream);
    case 32: return launch_step_np<32, TState, TU, TX, TOut>(a, stream);
    case 64: return launch_step_np<64, TState, TU, TX, TOut>(a, stream);
    default: return cudaErrorInvalidValue;
  }
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
  if (a.dt_x != nullptr && (a.state_type != ElemType::Int8 || a.dt_w == nullptr ||
                            a.dt_rank < 1 || a.dt_x_row < a.dt_rank)) {
    return cudaErrorInvalidValue;
  }
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
