#pragma once
// The prefill selective-scan kernel, shared by the per-dtype translation units (scan_*.cu).
//
// Parallelism: one thread per (batch, channel, state) -- N is padded to NP (a power of two >= 8)
// and G = min(NP, 32) consecutive lanes own one channel, S = NP / G states each. The recurrence
// over t is sequential by definition; time is processed in chunks of kChunk steps staged through
// shared memory:
//   1. load:   u, delta (+bias, softplus), z for the block's channels and B, C for all states,
//              dequantized to float32 exactly as the reference does;
//   2. scan:   every thread advances its states through the chunk; the products h * C of G
//              consecutive steps are summed over the state with a reduce-scatter across the G
//              lanes whose tree is exactly the reference's pairwise halving (lane distance G/2
//              first), so afterwards lane j holds y for step j of the group;
//   3. output: y + u * D, gate y * silu(z), one coalesced (B, L, E) store per chunk.
// Padded steps (t >= L) and padded states (n >= N) carry zeros: exp(0) = 1 and + 0 leave h as is.
#include "common.cuh"
#include "scan.h"

namespace quamba {
namespace scan_detail {

constexpr int kChunk = 64;          // time steps staged per chunk
constexpr int kRow = kChunk + 4;    // padded shared-memory row (16-byte aligned, fewer conflicts)
constexpr int kThreads = 256;  // block size (128-thread blocks measured slower at batch 1)

template <int NP, int kBlock = kThreads>
struct Layout {
  static constexpr int kLanes = NP < 32 ? NP : 32;         // lanes per channel
  static constexpr int kPerLane = NP / kLanes;             // states per lane
  static constexpr int kChannels = kBlock / kLanes;        // channels per block
  static_assert(NP >= 8 && NP <= kScanMaxState && (NP & (NP - 1)) == 0, "NP: power of two 8..64");
};

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Parameter value of channel/state `index`: float32 as stored, or dequantized INT8.
__device__ __forceinline__ float param_value(const void* p, int64_t index, bool int8, float scale) {
  if (int8) return dequant(static_cast<const int8_t*>(p)[index], scale);
  return static_cast<const float*>(p)[index];
}

// A = -exp(A_log_q * s_A) for INT8 parameters (the reference: -torch.exp(dequantize(...))).
__device__ __forceinline__ float a_value(const ScanArgs& a, int64_t index) {
  if (a.param_type == ElemType::Int8) {
    return -expf(dequant(static_cast<const int8_t*>(a.A)[index], a.A_scale));
  }
  return static_cast<const float*>(a.A)[index];
}

// One reduce-scatter stage at lane distance D: lanes keep the lower or upper half of their 2D
// values and add the partner's matching half.
template <int D, int G, bool kExact>
__device__ __forceinline__ void reduce_scatter_stage(float (&v)[G], int lane) {
  const bool upper = (lane & D) != 0;
#pragma unroll
  for (int i = 0; i < D; ++i) {
    const float send = upper ? v[i] : v[i + D];
    const float keep = upper ? v[i + D] : v[i];
    const float recv = __shfl_xor_sync(0xffffffffu, send, D);
    v[i] = kExact ? __fadd_rn(keep, recv) : keep + recv;
  }
  if constexpr (D > 1) reduce_scatter_stage<D / 2, G, kExact>(v, lane);
}

// Reduce-scatter of G lanes' G values each: afterwards v[0] of lane j is the sum over the G lanes
// of their value j, added in the pairwise-halving order (lanes G/2 apart first).
template <int G, bool kExact>
__device__ __forceinline__ void reduce_scatter(float (&v)[G], int lane) {
  reduce_scatter_stage<G / 2, G, kExact>(v, lane);
}

template <int NP, int kBlock, typename TU, typename TX, typename TOut, bool kExact>
__global__ void __launch_bounds__(kBlock) selective_scan_kernel(ScanArgs a) {
  using L = Layout<NP, kBlock>;
  constexpr int G = L::kLanes;
  constexpr int S = L::kPerLane;
  constexpr int CPB = L::kChannels;

  __shared__ __align__(16) float s_delta[CPB][kRow];
  __shared__ __align__(16) float s_u[CPB][kRow];
  __shared__ float s_z[CPB][kChunk + 1];  // odd rows: conflict-free column reads in step 3
  __shared__ float s_y[CPB][kChunk + 1];
  __shared__ __align__(16) float s_B[NP][kRow];
  __shared__ __align__(16) float s_C[NP][kRow];
  __shared__ float s_bias[CPB];
  __shared__ float s_D[CPB];

  const int64_t E = a.dim, Lq = a.seqlen, N = a.dstate;
  const int64_t b = blockIdx.y;
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) * CPB;
  const int tid = threadIdx.x;
  const int c = tid / G;
  const int lane = tid % G;
  const int64_t e = e0 + c;
  const bool channel_ok = e < E;
  const bool int8_params = a.param_type == ElemType::Int8;

  const TU* u_in = static_cast<const TU*>(a.u);
  const TX* delta_in = static_cast<const TX*>(a.delta);
  const TX* z_in = static_cast<const TX*>(a.z);
  const TX* B_in = static_cast<const TX*>(a.B);
  const TX* C_in = static_cast<const TX*>(a.C);
  const bool has_z = z_in != nullptr;

  if (tid < CPB) {
    const int64_t ee = e0 + tid;
    const bool ok = ee < E;
    s_bias[tid] = ok && a.delta_bias != nullptr
                      ? param_value(a.delta_bias, ee, int8_params, a.delta_bias_scale)
                      : 0.0f;
    s_D[tid] = ok && a.D != nullptr ? param_value(a.D, ee, int8_params, a.D_scale) : 0.0f;
  }

  // Per-thread states: n = lane + G * s.
  float h[S], A_reg[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int64_t n = lane + G * s;
    const bool ok = channel_ok && n < N;
    float A_n = ok ? a_value(a, e * N + n) : 0.0f;
    // Fast mode: exp(d * A) = exp2(d * (A * log2(e))).
    A_reg[s] = kExact ? A_n : A_n * 1.4426950408889634f;
    h[s] = ok && a.initial_state != nullptr ? a.initial_state[(b * E + e) * N + n] : 0.0f;
  }
  __syncthreads();

  for (int64_t t0 = 0; t0 < Lq; t0 += kChunk) {
    const int64_t steps = Lq - t0 < kChunk ? Lq - t0 : kChunk;

    // ---- 1. load the chunk ----
    for (int i = tid; i < CPB * kChunk; i += kBlock) {
      const int cc = i / kChunk;
      const int tt = i % kChunk;
      const int64_t ee = e0 + cc;
      float uv = 0.0f, dv = 0.0f, zv = 0.0f;
      if (ee < E && tt < steps) {
        const int64_t off = (b * E + ee) * Lq + t0 + tt;
        uv = dequant(u_in[off], a.u_scale);
        dv = dequant(delta_in[off], a.delta_scale);
        if (a.delta_bias != nullptr) dv = __fadd_rn(dv, s_bias[cc]);
        if (a.softplus) dv = softplus_exact(dv);
        if (has_z) zv = dequant(z_in[off], a.z_scale);
      }
      s_u[cc][tt] = uv;
      s_delta[cc][tt] = dv;
      s_z[cc][tt] = zv;
    }
    for (int i = tid; i < NP * kChunk; i += kBlock) {
      const int nn = i / kChunk;
      const int tt = i % kChunk;
      float bv = 0.0f, cv = 0.0f;
      if (nn < N && tt < steps) {
        const int64_t off = (b * N + nn) * Lq + t0 + tt;
        bv = dequant(B_in[off], a.B_scale);
        cv = dequant(C_in[off], a.C_scale);
      }
      s_B[nn][tt] = bv;
      s_C[nn][tt] = cv;
    }
    __syncthreads();

    // ---- 2. the recurrence, G steps at a time ----
#pragma unroll 1
    for (int g0 = 0; g0 < kChunk; g0 += G) {
      float acc[G];
#pragma unroll
      for (int j = 0; j < G; j += 4) {
        float d4[4], u4[4], B4[S][4], C4[S][4];
        *reinterpret_cast<float4*>(d4) = *reinterpret_cast<const float4*>(&s_delta[c][g0 + j]);
        *reinterpret_cast<float4*>(u4) = *reinterpret_cast<const float4*>(&s_u[c][g0 + j]);
#pragma unroll
        for (int s = 0; s < S; ++s) {
          const int n = lane + G * s;
          *reinterpret_cast<float4*>(B4[s]) = *reinterpret_cast<const float4*>(&s_B[n][g0 + j]);
          *reinterpret_cast<float4*>(C4[s]) = *reinterpret_cast<const float4*>(&s_C[n][g0 + j]);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float d = d4[k];
          float p[S];
          if constexpr (kExact) {
#pragma unroll
            for (int s = 0; s < S; ++s) {
              const float dA = expf(__fmul_rn(d, A_reg[s]));
              const float dBu = __fmul_rn(__fmul_rn(d, B4[s][k]), u4[k]);
              h[s] = __fadd_rn(__fmul_rn(dA, h[s]), dBu);
              p[s] = __fmul_rn(h[s], C4[s][k]);
            }
#pragma unroll
            for (int w = S / 2; w >= 1; w /= 2) {
#pragma unroll
              for (int s = 0; s < w; ++s) p[s] = __fadd_rn(p[s], p[s + w]);
            }
          } else {
            const float du = d * u4[k];
#pragma unroll
            for (int s = 0; s < S; ++s) {
              const float dA = ex2_approx(d * A_reg[s]);
              h[s] = fmaf(dA, h[s], du * B4[s][k]);
              p[s] = h[s] * C4[s][k];
            }
#pragma unroll
            for (int w = S / 2; w >= 1; w /= 2) {
#pragma unroll
              for (int s = 0; s < w; ++s) p[s] = p[s] + p[s + w];
            }
          }
          acc[j + k] = p[0];
        }
      }
      reduce_scatter<G, kExact>(acc, lane);
      s_y[c][g0 + lane] = acc[0];
    }
    __syncthreads();

    // ---- 3. D skip, gate, store (B, L, E) ----
    for (int i = tid; i < CPB * kChunk; i += kBlock) {
      const int tt = i / CPB;
      const int cc = i % CPB;
      const int64_t ee = e0 + cc;
      if (ee < E && tt < steps) {
        float y = s_y[cc][tt];
        if (a.D != nullptr) y = __fadd_rn(y, __fmul_rn(s_u[cc][tt], s_D[cc]));
        if (has_z) y = __fmul_rn(y, silu_exact(s_z[cc][tt]));
        static_cast<TOut*>(a.out)[(b * Lq + t0 + tt) * E + ee] = from_float<TOut>(y);
      }
    }
    __syncthreads();
  }

  // ---- final state ----
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int64_t n = lane + G * s;
    if (channel_ok && n < N) {
      const int64_t off = (b * E + e) * N + n;
      if (a.last_state != nullptr) a.last_state[off] = h[s];
      if (a.state_q != nullptr) {
        a.state_q[off] = quantize_int8(h[s], a.state_scale, static_cast<Rounding>(a.state_rounding));
      }
    }
  }
}

inline int padded_state(int64_t n) {
  int np = 8;
  while (np < n) np *= 2;
  return np;
}

template <int NP, typename TU, typename TX, typename TOut, bool kExact>
cudaError_t launch_np(const ScanArgs& a, cudaStream_t stream) {
  using Lay = Layout<NP>;
  const dim3 grid(static_cast<unsigned int>((a.dim + Lay::kChannels - 1) / Lay::kChannels),
                  static_cast<unsigned int>(a.batch));
  selective_scan_kernel<NP, kThreads, TU, TX, TOut, kExact><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename TU, typename TX, typename TOut, bool kExact>
cudaError_t launch_typed(const ScanArgs& a, cudaStream_t stream) {
  if (a.batch == 0 || a.dim == 0) return cudaSuccess;
  if (a.batch > 65535 || a.dstate < 1 || a.dstate > kScanMaxState) return cudaErrorInvalidValue;
  switch (padded_state(a.dstate)) {
    case 8: return launch_np<8, TU, TX, TOut, kExact>(a, stream);
    case 16: return launch_np<16, TU, TX, TOut, kExact>(a, stream);
    case 32: return launch_np<32, TU, TX, TOut, kExact>(a, stream);
    case 64: return launch_np<64, TU, TX, TOut, kExact>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename TU, typename TX, typename TOut>
cudaError_t launch_exact_or_fast(const ScanArgs& a, cudaStream_t stream) {
  return a.exact ? launch_typed<TU, TX, TOut, true>(a, stream)
                 : launch_typed<TU, TX, TOut, false>(a, stream);
}

}  // namespace scan_detail
}  // namespace quamba
