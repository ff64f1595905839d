#pragma once
// The prefill selective-scan kernel, shared by the per-dtype translation units (scan_*.cu).
//
// Parallelism: N is padded to NP (a power of two >= 8), G consecutive lanes own one channel and
// each lane S = NP / G states: G = min(NP, 32) (one thread per (batch, channel, state)), or, for
// NP = 16, G = 8 with two states per lane (launch_np chooses; see auto_lanes_per_channel). The
// recurrence over t is sequential by definition; time is processed in chunks of kChunk steps
// staged through shared memory:
//   1. load:   u, delta (+bias, softplus), silu(z) for the block's channels and B, C for all
//              states, dequantized to float32 exactly as the reference does. The raw inputs of
//              the next chunk are loaded into registers (4 steps per thread, vector loads) while
//              the current chunk is scanned. For INT8 delta and z, softplus(q * s + bias) (per
//              channel) and silu(q * s_z) come from 256-entry tables built once per block with
//              the same float32 operations, so they are bit-identical to evaluating them
//              (z's codes are staged as they are and looked up in step 3). Full chunks (all
//              steps and channels present, aligned rows) load whole words and decode without
//              per-element predicates, and INT8 codes become floats without I2F
//              (int8_lane_to_float: I2F shares the XU pipe with the recurrence's MUFU.EX2);
//   2. scan:   every thread advances its states through the chunk; the products h * C of G
//              consecutive steps are summed over the state, within the lane first (states n and
//              n + G) and then with a reduce-scatter across the G lanes, a tree that is exactly
//              the reference's pairwise halving (state distance NP/2 first), so afterwards lane j
//              holds y for step j of the group;
//   3. output: y + u * D, gate y * silu(z), one (B, L, E) store per chunk.
// Shared memory bounds the blocks per SM of the 8-lane INT8 layout, registers those of the
// others: see the comment at s_delta.
// Padded steps (t >= L) and padded states (n >= N) carry zeros: exp(0) = 1 and + 0 leave h as is.
#include <type_traits>

#include "common.cuh"
#include "scan.h"

namespace quamba {
namespace scan_detail {

constexpr int kChunk = 64;          // time steps staged per chunk
constexpr int kRow = kChunk + 4;    // padded shared-memory row (16-byte aligned, fewer conflicts)
constexpr int kThreads = 256;  // block size (128-thread blocks measured slower at batch 1)
// Resident blocks per SM the register allocation must allow: 768 threads (at most 85 registers
// per thread) for NP = 16 (Mamba's N) in blocks of 128 or 256 threads; the 64-thread INT8 block
// (a batch-1 grid, see int8_narrow_block_threads) stages B and C for twice the states per
// thread and gets 128 registers (eight blocks per SM: the most a batch-1 grid uses); other NP keep
// more per thread and get no bound.
template <int NP, int kBlock = kThreads>
constexpr int min_blocks() {
  return NP == 16 ? (kBlock >= 128 ? 3 * kThreads / kBlock : 8) : 1;
}

template <int NP, int kBlock = kThreads, int kG = (NP < 32 ? NP : 32)>
struct Layout {
  static constexpr int kLanes = kG;                        // lanes per channel
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

// Four consecutive raw elements of one row (time steps t .. t+3), kept packed as loaded and
// unpacked only where they are decoded: unpacking them right after the load (an array of four
// elements) made the warp wait for the load there, so the next chunk's loads were not in flight
// during the recurrence (ncu: most of the INT8 scan's long-scoreboard stalls, B = 8).
template <typename T>
struct Raw4 {
  using Word = std::conditional_t<sizeof(T) == 1, uint32_t,
                                  std::conditional_t<sizeof(T) == 2, uint2, uint4>>;
  Word w;
  __device__ __forceinline__ T get(int k) const {
    T v;
    memcpy(&v, reinterpret_cast<const char*>(&w) + k * sizeof(T), sizeof(T));
    return v;
  }
  // dequant(get(k), scale); INT8 codes without I2F (int8_lane_to_float), the same bits.
  __device__ __forceinline__ float dequant_at(int k, float scale) const {
    if constexpr (std::is_same_v<T, int8_t>) {
      return __fmul_rn(int8_lane_to_float(w ^ 0x80808080u, k), scale);
    } else {
      return dequant(get(k), scale);
    }
  }
};

template <typename T>
__device__ __forceinline__ Raw4<T> load_raw4(const T* p, int64_t remaining, bool vec) {
  Raw4<T> r;
  if (vec && remaining >= 4) {
    r.w = *reinterpret_cast<const typename Raw4<T>::Word*>(p);
  } else {
    memset(&r, 0, sizeof(r));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k < remaining) memcpy(reinterpret_cast<char*>(&r.w) + k * sizeof(T), p + k, sizeof(T));
    }
  }
  return r;
}

__device__ __forceinline__ bool aligned_to(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

__device__ __forceinline__ int table_index(int8_t q) { return static_cast<int>(q) + 128; }

template <int NP, int kBlock, typename TU, typename TX, typename TOut, bool kExact, int kG>
__global__ void __launch_bounds__(kBlock, min_blocks<NP, kBlock>())
    selective_scan_kernel(ScanArgs a) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  using L = Layout<NP, kBlock, kG>;
  constexpr int G = L::kLanes;
  constexpr int S = L::kPerLane;
  constexpr int CPB = L::kChannels;

  // INT8 delta / z tables when they fit in the 48 KB of static shared memory. With them, s_z
  // keeps z's codes (silu looked up in step 3) instead of silu(z) in float32, and y goes to the
  // rows of s_delta: the 8-lane INT8 block (16 channels) takes 36 KB instead of 43 KB, six blocks
  // per SM instead of five (the 16-lane and float blocks are limited by registers; y keeps its
  // own odd-width rows there, whose column reads in step 3 are free of bank conflicts).
  constexpr bool kInt8X = sizeof(TX) == 1;
  constexpr int kSharedNoZY = 4 * (2 * CPB * kRow + 2 * NP * kRow + 2 * CPB);
  constexpr bool kTables =
      kInt8X && kSharedNoZY + CPB * kRow + 4 * (CPB + 1) * 256 <= 48 * 1024;
  constexpr int kTableChannels = kTables ? CPB : 1;
  using ZSlot = std::conditional_t<kTables, int8_t, float>;
  constexpr int kYRow = kTables ? kRow : kChunk + 1;

  __shared__ __align__(16) float s_delta[CPB][kRow];
  __shared__ float s_y_own[kTables ? 1 : CPB][kYRow];
  // y of channel c, step t: s_y[c * kYRow + t]. In s_delta's rows, a channel's lanes write y for
  // steps g0..g0+G-1 after the reduce-scatter and a warp barrier, i.e. after all of them have
  // read delta there.
  float* const s_y = kTables ? &s_delta[0][0] : &s_y_own[0][0];
  __shared__ __align__(16) float s_u[CPB][kRow];
  __shared__ __align__(16) ZSlot s_z[CPB][kTables ? kRow : kChunk + 1];  // codes or silu(z)
  __shared__ __align__(16) float s_B[NP][kRow];
  __shared__ __align__(16) float s_C[NP][kRow];
  __shared__ float s_bias[CPB];
  __shared__ float s_D[CPB];
  __shared__ float s_delta_table[kTableChannels][kTables ? 256 : 1];
  __shared__ float s_silu_z_table[kTables ? 256 : 1];

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

  // Output items: kOutVec channels (16 bytes, or all of the block's channels when fewer).
  constexpr int kOutVec = 16 / static_cast<int>(sizeof(TOut)) < CPB ? 16 / static_cast<int>(sizeof(TOut)) : CPB;
  static_assert(CPB % kOutVec == 0, "items must tile the block's channels");
  // 16-byte stores: every row of E outputs starts 16-byte aligned and e0 + c0 is a multiple of
  // kOutVec (CPB is); with fewer than 16 bytes per item the element loop runs instead.
  const bool out_vec = kOutVec * sizeof(TOut) == 16 && E % kOutVec == 0 && aligned_to(a.out, 16);
  const bool vec = Lq % 4 == 0 && aligned_to(a.u, 4 * sizeof(TU)) &&
                   aligned_to(a.delta, 4 * sizeof(TX)) && aligned_to(a.B, 4 * sizeof(TX)) &&
                   aligned_to(a.C, 4 * sizeof(TX)) && (!has_z || aligned_to(a.z, 4 * sizeof(TX)));
  if constexpr (kTables) {
    __syncthreads();  // s_bias
    for (int i = tid; i < CPB * 256; i += kBlock) {
      const int cc = i / 256;
      float dv = dequant(static_cast<int8_t>(i % 256 - 128), a.delta_scale);
      if (a.delta_bias != nullptr) dv = __fadd_rn(dv, s_bias[cc]);
      if (a.softplus) dv = softplus_exact(dv);
      s_delta_table[cc][i % 256] = dv;
    }
    for (int i = tid; i < 256; i += kBlock) {
      s_silu_z_table[i] = silu_exact(dequant(static_cast<int8_t>(i - 128), a.z_scale));
    }
  }

  // Raw inputs of one chunk: activation slots (channel, 4 steps), B/C slots (state, 4 steps).
  constexpr int kActSlots = CPB * kChunk / 4;
  constexpr int kBCSlots = NP * kChunk / 4;
  constexpr int kActIters = (kActSlots + kBlock - 1) / kBlock;
  constexpr int kBCIters = (kBCSlots + kBlock - 1) / kBlock;
  Raw4<TU> raw_u[kActIters];
  Raw4<TX> raw_d[kActIters], raw_z[kActIters], raw_B[kBCIters], raw_C[kBCIters];
  // Each slot's element offset at step 0 (a chunk adds its t0) and whether its row exists (a
  // channel < E, a state < N): the same for every chunk, so computed once.
  int64_t act_off[kActIters], bc_off[kBCIters];
  bool act_row[kActIters], bc_row[kBCIters];
#pragma unroll
  for (int it = 0; it < kActIters; ++it) {
    const int slot = tid + it * kBlock;
    const int64_t ee = e0 + slot / (kChunk / 4);
    act_row[it] = slot < kActSlots && ee < E;
    act_off[it] = act_row[it] ? (b * E + ee) * Lq + slot % (kChunk / 4) * 4 : 0;
  }
#pragma unroll
  for (int it = 0; it < kBCIters; ++it) {
    const int slot = tid + it * kBlock;
    const int nn = slot / (kChunk / 4);
    bc_row[it] = slot < kBCSlots && nn < N;
    bc_off[it] = bc_row[it] ? (b * N + nn) * Lq + slot % (kChunk / 4) * 4 : 0;
  }
  // A full chunk (all its steps, all the block's channels, aligned rows: every chunk but an
  // unaligned or last partial one) loads whole words without the edge's bounds arithmetic.
  const bool channels_full = e0 + CPB <= E;
  auto load_chunk = [&](int64_t t0) {
    using UWord = typename Raw4<TU>::Word;
    using XWord = typename Raw4<TX>::Word;
    const bool full = vec && channels_full && t0 + kChunk <= Lq;
#pragma unroll
    for (int it = 0; it < kActIters; ++it) {
      const int tt = (tid + it * kBlock) % (kChunk / 4) * 4;
      if (full && act_row[it]) {
        const int64_t off = act_off[it] + t0;
        raw_u[it].w = *reinterpret_cast<const UWord*>(u_in + off);
        raw_d[it].w = *reinterpret_cast<const XWord*>(delta_in + off);
        if (has_z) {
          raw_z[it].w = *reinterpret_cast<const XWord*>(z_in + off);
        } else {
          memset(&raw_z[it], 0, sizeof(raw_z[it]));
        }
      } else {
        const int64_t remaining = act_row[it] ? Lq - t0 - tt : 0;
        const int64_t off = remaining > 0 ? act_off[it] + t0 : 0;
        raw_u[it] = load_raw4(u_in + off, remaining, vec);
        raw_d[it] = load_raw4(delta_in + off, remaining, vec);
        raw_z[it] = load_raw4(z_in + off, has_z ? remaining : 0, vec);
      }
    }
#pragma unroll
    for (int it = 0; it < kBCIters; ++it) {
      const int tt = (tid + it * kBlock) % (kChunk / 4) * 4;
      if (full && bc_row[it]) {
        raw_B[it].w = *reinterpret_cast<const XWord*>(B_in + bc_off[it] + t0);
        raw_C[it].w = *reinterpret_cast<const XWord*>(C_in + bc_off[it] + t0);
      } else {
        const int64_t remaining = bc_row[it] ? Lq - t0 - tt : 0;
        const int64_t off = remaining > 0 ? bc_off[it] + t0 : 0;
        raw_B[it] = load_raw4(B_in + off, remaining, vec);
        raw_C[it] = load_raw4(C_in + off, remaining, vec);
      }
    }
  };
  load_chunk(0);

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

    // ---- 1. decode the chunk's raw inputs (padded steps and channels: zeros). A full chunk
    // (kFull) has no padded steps or channels, and padded states' raw words are zeros. ----
    auto decode = [&](auto full_tag) {
      constexpr bool kFull = decltype(full_tag)::value;
#pragma unroll
      for (int it = 0; it < kActIters; ++it) {
        const int slot = tid + it * kBlock;
        if (slot < kActSlots) {
          const int cc = slot / (kChunk / 4);
          const int tt = slot % (kChunk / 4) * 4;
          const bool channel_in = e0 + cc < E;
          float uv[4], dv[4], zv[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            uv[k] = dv[k] = zv[k] = 0.0f;
            if (kFull || (channel_in && tt + k < steps)) {
              uv[k] = raw_u[it].dequant_at(k, a.u_scale);
              if constexpr (kTables) {
                const int8_t dq = static_cast<int8_t>(raw_d[it].get(k));
                dv[k] = s_delta_table[cc][table_index(dq)];
              } else {
                dv[k] = raw_d[it].dequant_at(k, a.delta_scale);
                if (a.delta_bias != nullptr) dv[k] = __fadd_rn(dv[k], s_bias[cc]);
                if (a.softplus) dv[k] = softplus_exact(dv[k]);
                if (has_z) zv[k] = silu_exact(raw_z[it].dequant_at(k, a.z_scale));
              }
            }
          }
          *reinterpret_cast<float4*>(&s_u[cc][tt]) = make_float4(uv[0], uv[1], uv[2], uv[3]);
          *reinterpret_cast<float4*>(&s_delta[cc][tt]) = make_float4(dv[0], dv[1], dv[2], dv[3]);
          if constexpr (kTables) {
            // z's four codes as loaded (zeros for padded steps and channels).
            *reinterpret_cast<uint32_t*>(&s_z[cc][tt]) = has_z ? raw_z[it].w : 0u;
          } else {
#pragma unroll
            for (int k = 0; k < 4; ++k) s_z[cc][tt + k] = zv[k];
          }
        }
      }
#pragma unroll
      for (int it = 0; it < kBCIters; ++it) {
        const int slot = tid + it * kBlock;
        if (slot < kBCSlots) {
          const int nn = slot / (kChunk / 4);
          const int tt = slot % (kChunk / 4) * 4;
          float bv[4], cv[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const bool ok = kFull || (nn < N && tt + k < steps);
            bv[k] = ok ? raw_B[it].dequant_at(k, a.B_scale) : 0.0f;
            cv[k] = ok ? raw_C[it].dequant_at(k, a.C_scale) : 0.0f;
          }
          *reinterpret_cast<float4*>(&s_B[nn][tt]) = make_float4(bv[0], bv[1], bv[2], bv[3]);
          *reinterpret_cast<float4*>(&s_C[nn][tt]) = make_float4(cv[0], cv[1], cv[2], cv[3]);
        }
      }
    };
    if (steps == kChunk && channels_full) {
      decode(std::true_type{});
    } else {
      decode(std::false_type{});
    }
    __syncthreads();
    // The next chunk's loads are in flight during the recurrence.
    if (t0 + kChunk < Lq) load_chunk(t0 + kChunk);

    // ---- 2. the recurrence, G steps at a time. Unrolled by 4 so that a group's reduce-scatter
    // (shuffle latency) overlaps the next groups' recurrence: at batch 1 the SMs hold ~2.4 warps
    // per scheduler, too few to hide it otherwise (H100, INT8 fast, 2.8B, L 2048: 147 -> 134 us;
    // unrolled 2: the same at batch 1, 8: slower at batch 1 and in exact mode). ----
#pragma unroll 4
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
              // Rounded on their own, not contracted into an FMA with the sum below: the sum
              // over the states is then the same with one or two states per lane, so fast
              // results do not depend on the layout (which follows the batch size).
              p[s] = __fmul_rn(h[s], C4[s][k]);
            }
#pragma unroll
            for (int w = S / 2; w >= 1; w /= 2) {
#pragma unroll
              for (int s = 0; s < w; ++s) p[s] = __fadd_rn(p[s], p[s + w]);
            }
          }
          acc[j + k] = p[0];
        }
      }
      reduce_scatter<G, kExact>(acc, lane);
      // With y in s_delta's rows: the channel's lanes have read delta for these steps (the
      // shuffles above consumed it); the warp barrier orders those reads before the stores.
      if constexpr (kTables) __syncwarp();
      s_y[c * kYRow + g0 + lane] = acc[0];
    }
    __syncthreads();

    // ---- 3. D skip, gate, store (B, L, E): kOutVec consecutive channels of one step per item,
    // one 16-byte store where the row allows it (the index arithmetic once per item) ----
    for (int i = tid; i < (CPB / kOutVec) * kChunk; i += kBlock) {
      const int tt = i / (CPB / kOutVec);
      const int c0 = i % (CPB / kOutVec) * kOutVec;
      if (tt >= steps || e0 + c0 >= E) continue;
      __align__(16) TOut vals[kOutVec];
#pragma unroll
      for (int j = 0; j < kOutVec; ++j) {
        const int cc = c0 + j;
        float y = s_y[cc * kYRow + tt];
        if (a.D != nullptr) y = __fadd_rn(y, __fmul_rn(s_u[cc][tt], s_D[cc]));
        if (has_z) {
          if constexpr (kTables) {
            y = __fmul_rn(y, s_silu_z_table[table_index(s_z[cc][tt])]);
          } else {
            y = __fmul_rn(y, s_z[cc][tt]);  // s_z holds silu(z)
          }
        }
        vals[j] = from_float<TOut>(y);
      }
      TOut* dst = static_cast<TOut*>(a.out) + (b * Lq + t0 + tt) * E + e0 + c0;
      if (out_vec && e0 + c0 + kOutVec <= E) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(vals);
      } else {
        for (int j = 0; j < kOutVec && e0 + c0 + j < E; ++j) dst[j] = vals[j];
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

template <int NP, int kBlock, int kG, typename TU, typename TX, typename TOut, bool kExact>
cudaError_t launch_layout(const ScanArgs& a, cudaStream_t stream) {
  using Lay = Layout<NP, kBlock, kG>;
  const dim3 grid(static_cast<unsigned int>((a.dim + Lay::kChannels - 1) / Lay::kChannels),
                  static_cast<unsigned int>(a.batch));
  // Ordinary launch: see launch_kernel_spread.
  launch::launch_kernel_spread(selective_scan_kernel<NP, kBlock, TU, TX, TOut, kExact, kG>, grid,
                               kBlock, 0, stream, a);
  return cudaGetLastError();
}

// Lanes per channel for NP = 16 when the caller leaves it open (a.lanes_per_channel == 0).
// The recurrence is bound by shared-memory wavefronts and shuffles (ncu, INT8 fast scan at B = 8:
// 75% of the shared-memory wavefront peak, short-scoreboard the main stall), and 8 lanes with two
// states each need fewer per state-step (B and C rows per lane, the y reduce-scatter over 8
// lanes) but give half the threads. Measured on the H100 (Mamba-2.8B, L = 2048,
// benchmarks/README.md): INT8 inputs with 8 lanes in 128-thread blocks, fast 7-17% faster at
// every batch (B = 1: 320 blocks), exact 5-8% faster from B = 2 (640 blocks) and 1.5% slower at
// B = 1; float16 with 8 lanes in 256-thread blocks 11% faster from B = 4 (640 blocks), slower
// below; the float32 simulation scan slower with 8 lanes at every batch.
// Block size of the 8-lane layout: 128 threads for 1-byte inputs (16 channels, room for the INT8
// tables), 256 otherwise.
template <typename TX>
constexpr int narrow_block() {
  return sizeof(TX) == 1 ? 128 : 256;
}

// SMs of the current device; 0 where the runtime cannot say (the layout rules then keep their
// defaults).
inline int current_device_sms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 0;
  }
  return sms;
}

template <typename TX, bool kExact>
int auto_lanes_per_channel(const ScanArgs& a, int sms) {
  if (sizeof(TX) == 4 || sms <= 0) return 16;
  const int64_t channels_per_block = Layout<16, narrow_block<TX>(), 8>::kChannels;
  const int64_t blocks = (a.dim + channels_per_block - 1) / channels_per_block * a.batch;
  const int64_t min_blocks_per_sm = sizeof(TX) == 1 && !kExact ? 2 : 4;
  return blocks >= min_blocks_per_sm * sms ? 8 : 16;
}

// Block size of the 8-lane INT8 layout: 128 threads (16 channels), or 64 (8 channels) when the
// whole grid is resident at once and 64-thread blocks leave fewer channels on the busiest SM.
// That is a batch-1 question: Mamba-2.8B's 5120 channels make 320 blocks of 16 on 132 SMs, i.e.
// 56 SMs scanning 48 channels while 76 scan 32; in blocks of 8 no SM scans more than 40 (H100,
// L = 2048: 165 -> 155 us). With more than a wave of blocks the 128-thread block is the faster
// one (B = 8: 925 -> 940 us), since each block stages B and C for all states whatever its
// channel count. Both sizes give the same bits (every channel's operations are its own).
// Session 18 (the staging and the unrolled recurrence above): in fast mode the 64-thread block
// became the faster one with many waves of blocks too (H100, 2.8B, L 2048: B = 8 903 -> 883 us,
// B = 4 462 -> 458; B = 2, 640 blocks of 128, 248 -> 267: slower), so fast grids of at least 8
// blocks of 128 per SM take it; exact mode keeps 128 (B = 8 1138 -> 1207 us with 64).
inline int int8_narrow_block_threads(const ScanArgs& a, int sms) {
  if (a.block_threads != 0) return a.block_threads;
  if (sms <= 0) return 128;
  const int64_t blocks128 = (a.dim + 15) / 16 * a.batch;
  if (!a.exact && blocks128 >= int64_t{8} * sms) return 64;
  // Blocks per SM the launch bounds provide registers for (6 x 36 KB and 8 x 23 KB of shared
  // memory fit beside them): beyond that the grid takes more than one wave.
  const int64_t blocks64 = (a.dim + 7) / 8 * a.batch;
  if (blocks128 > int64_t{min_blocks<16, 128>()} * sms ||
      blocks64 > int64_t{min_blocks<16, 64>()} * sms) {
    return 128;
  }
  const int64_t busiest128 = (blocks128 + sms - 1) / sms * 16;
  const int64_t busiest64 = (blocks64 + sms - 1) / sms * 8;
  return busiest64 < busiest128 ? 64 : 128;
}

template <int NP, typename TU, typename TX, typename TOut, bool kExact>
cudaError_t launch_np(const ScanArgs& a, cudaStream_t stream) {
  if constexpr (NP == 16) {
    const int sms = current_device_sms();
    const int lanes = a.lanes_per_channel != 0 ? a.lanes_per_channel
                                               : auto_lanes_per_channel<TX, kExact>(a, sms);
    if (lanes == 8) {
      if constexpr (sizeof(TX) == 1) {
        if (int8_narrow_block_threads(a, sms) == 64) {
          return launch_layout<16, 64, 8, TU, TX, TOut, kExact>(a, stream);
        }
      }
      return launch_layout<16, narrow_block<TX>(), 8, TU, TX, TOut, kExact>(a, stream);
    }
  }
  if (a.lanes_per_channel != 0 && a.lanes_per_channel != (NP < 32 ? NP : 32)) {
    return cudaErrorInvalidValue;  // the binding accepts 8 or 16 for 9 <= N <= 16 only
  }
  return launch_layout<NP, kThreads, (NP < 32 ? NP : 32), TU, TX, TOut, kExact>(a, stream);
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
