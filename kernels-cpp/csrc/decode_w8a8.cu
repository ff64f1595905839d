// A whole W8A8 decode step (Mode 0's datapath, batch 1) as one persistent kernel.
//
// Why: a decode step of the per-op kernels is a chain of ~7 small dependent kernels per layer; the
// two large GEMVs stream their weights near the HBM rate, but between them the norm, conv update,
// x_proj, scan step and Hadamard leave HBM idle (docs/design.md "Decode"). Here one block per SM
// runs every layer: a producer warp streams the block's share of each layer's weights (in_proj,
// x_proj, dt_proj, out_proj rows) through a ring of shared-memory slots with 1-D bulk copies,
// without stopping at the phase boundaries, while eight consumer warps run the phases and the
// blocks meet between them by tagged words (the rules measured by
// tools/bench/persistent_decode_probe.cu: a 64-bit word whose upper half is the exchange's tag, so
// that polling the word is the barrier; a few bulk copies in flight at most).
//
// Ownership (block b of G): channels in groups of 4 (in_proj's x and z rows, the conv, x_proj's
// columns, dt_proj's rows and the scan step of those channels), out_proj's rows in pairs. Per
// layer:
//   A  norm: the residual add and RMSNorm of the whole row, in every block (the same operations in
//      the same order as rmsnorm_vec8_kernel: the same bits), the residual kept in shared memory;
//   B  in_proj rows of the block's channels -> x and z codes;
//   C  conv update of those channels -> u codes;
//   D  x_proj's partial sums over those channels (the block's slab of w_x's columns), added into
//      the layer's sums in global memory: one 64-bit integer reduction per row and block;
//   E  every block reads the R + 2N sums once all G blocks have added theirs and forms dt_low, B
//      and C itself (integer sums: the same codes as the x_proj GEMV, in any order);
//   F  dt_proj rows of its channels -> dt codes;
//   G  scan step of its channels (16 lanes per channel, INT8 state requantized) -> y, published
//      (exchange 1);
//   H  every block reads y; I  Hadamard of the whole row (butterflies, then the m x m matrix) ->
//      codes, in every block;
//   J  out_proj rows -> float16, published (exchange 2), which the next layer's norm reads.
// x_proj by reductions instead of rows owned by 48 blocks: that took two exchanges (every u code to
// every block, then the codes of the owned rows) with the owners' rows between them (2.8B: 3.2 +
// 1.7 + 2.9 us per layer; now 0.5 + 2.3).
// Every element is computed with the arithmetic of the per-op kernel it replaces (rmsnorm, the
// GEMV epilogues, conv1d_update_kernel's exact formula, selective_scan_step_kernel,
// hadamard_transform_ref's order); INT8 codes with quantize_int8 or its reciprocal fast path
// (the same codes). quamba-modes' GPU tests compare the two decode paths bit for bit.
// Each layer's small per-channel data (conv weights and state, A_log, the SSM state, D, dt_bias)
// and the next norm weight are copied into shared memory with cp.async ahead of their phase.
// Code size matters: every layer runs the whole kernel body once, so its code must fit the SM's
// instruction cache (see warp_dot_rows; a kernel per Hadamard base m for the same reason).
// Status (session 23, H100): faster than the per-op kernels at every size measured (2.8B batch
// 1: 1.45 against 1.87 ms per token; 1.4b 0.96 / 1.15; 130m 0.34 / 0.37), 1.5x its floor at
// 2.8B (target 1.3x). DecodeArgs::timing measures each phase (tools/bench/persistent_decode.py).
#include <cuda_fp16.h>

#include <type_traits>

#include "common.cuh"
#include "decode_w8a8.h"
#include "mma_s8.cuh"
#include "paley.cuh"
#include "tma.cuh"

namespace quamba {
namespace {

constexpr int kConsumerWarps = 8;
constexpr int kConsumers = kConsumerWarps * 32;
constexpr int kThreads = kConsumers + 32;  // + the producer warp
constexpr int kSlot = 10240;               // bytes per ring slot: whole weight rows
constexpr int kRing = 16;                  // slots (160 KB)

__host__ __device__ inline int64_t align16(int64_t v) { return (v + 15) / 16 * 16; }

// A row's sum word every 16 words (128 bytes): the G reductions into each word and the polls of
// it are spread over as many L2 lines as rows (unpadded, 192 rows share 12 lines).
constexpr int kSumStride = 16;

// Dynamic shared memory: byte offsets after the ring.
struct SmemPlan {
  int64_t resid, hidden, xn, act, hbuf, xp, xcode, zcode, ucode, dtcode, y16, out16, conv_w,
      conv_state, conv_b, A_log, ssm_state, D, dt_bias, gate, skip, delta, total;
};

// Channels of a block at most (decode_x_slab_columns: rounded up to 16).
__host__ __device__ inline int64_t max_block_channels(int64_t E, int G) {
  return 4 * ((E / 4 + G - 1) / G);
}

__host__ __device__ inline SmemPlan smem_plan(int64_t D, int64_t E, int64_t XR, int m, int G) {
  const int64_t maxc = align16(max_block_channels(E, G));  // ucode: x_proj's slab width
  const int64_t maxo = 2 * ((D / 2 + G - 1) / G);
  SmemPlan p;
  int64_t off = static_cast<int64_t>(kRing) * kSlot;
  p.resid = off;  off = align16(off + 4 * D);   // float32 residual row
  p.hidden = off; off = align16(off + 2 * D);   // float16 norm input
  p.xn = off;     off = align16(off + D);       // norm codes (in_proj input)
  p.act = off;    off = align16(off + E);       // Hadamard codes (out_proj input)
  p.hbuf = off;   off = align16(off + 4 * E);   // Hadamard work row
  p.xp = off;     off = align16(off + XR);      // x_proj codes: dt_low, B, C
  p.xcode = off;  off = align16(off + maxc);
  p.zcode = off;  off = align16(off + maxc);
  p.ucode = off;  off = align16(off + maxc);
  p.dtcode = off; off = align16(off + maxc);
  p.y16 = off;    off = align16(off + 2 * maxc);
  p.out16 = off;  off = align16(off + 2 * maxo);
  // The block's channels' small data of the current layer (copied in at the layer's start).
  p.conv_w = off;     off = align16(off + 4 * maxc);
  p.conv_state = off; off = align16(off + 3 * maxc);
  p.conv_b = off;     off = align16(off + maxc);
  p.A_log = off;      off = align16(off + 16 * maxc);
  p.ssm_state = off;  off = align16(off + 16 * maxc);
  p.D = off;          off = align16(off + maxc);
  p.dt_bias = off;    off = align16(off + maxc);
  // The scan step's per-channel gate and skip term (float32), formed in the conv phase.
  p.gate = off;       off = align16(off + 4 * maxc);
  p.skip = off;       off = align16(off + 4 * maxc);
  p.delta = off;      off = align16(off + 4 * maxc);
  p.total = off;
  return p;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

constexpr int kSegments = 5;   // in_proj x rows, z rows, x_proj's slab, dt_proj, out_proj
constexpr int kExchanges = 2;  // per layer: y (tag + 0), out_proj's outputs (tag + 1)
constexpr int kRoundRows = 4;  // weight rows a warp dots at once (consume_rows)
// x_proj's sums: per row a 64-bit word, bits 40.. count the blocks that added their part, bits
// 0..39 the sum of the parts, each biased by 2^28 (|part| <= 10240 * 128 * 128 < 2^28, so every
// biased part is in [0, 2^29), and G of them stay below 2^40 for G < 2^11).
constexpr int kSumCountShift = 40;
constexpr int64_t kSumBias = int64_t{1} << 28;
static_assert(kRing % kConsumerWarps == 0 && (kConsumerWarps & (kConsumerWarps - 1)) == 0,
              "owned stages (consume_rows): stage i % 8 and i - 16 have the same warp");
constexpr int kPhases = decode_phase_count();  // timed phases (DecodeArgs::timing)
constexpr int kLayerWords = static_cast<int>(sizeof(DecodeLayer) / 4);
static_assert(sizeof(DecodeLayer) % 4 == 0 && kLayerWords <= kConsumers, "DecodeLayer copy");

struct Segment {
  int first_stage, stages, rows_per_stage, row_bytes;
  int64_t row0, rows;  // rows [row0, row0 + rows) of the segment's matrix
};

// [begin, end) of `groups` groups of `size` items split evenly over G blocks, for block b.
__device__ __forceinline__ void share_of(int64_t groups, int64_t size, int G, int b,
                                         int64_t& begin, int64_t& end) {
  begin = size * (groups * b / G);
  end = size * (groups * (b + 1) / G);
}

__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");
}

// Out-of-line arithmetic: every phase of every layer runs once per layer, so the kernel's code is
// fetched again each layer; inlined at every call site these made a 180 KB kernel, more than the
// SM's instruction cache holds. The operations are the per-op kernels' (same results).
__device__ __noinline__ int8_t q8(float v, float scale, int rule) {
  return quantize_int8(v, scale, static_cast<Rounding>(rule));
}
// Words [0, n) of an exchange for this consumer thread (ct, ct + 256, ...), each written with one
// 64-bit store (tag and data arrive together). The loads of up to 8 words are issued before any is
// checked, so a thread waits for one round trip per 8 words instead of one per word; a word not
// yet tagged is polled again. kHalves: the data is two float16 values, stored as two floats;
// else the 32 bits are stored as they are. Out of line, like q8 above (code size).
template <bool kHalves>
__device__ __noinline__ void await_words(const uint64_t* words, int64_t n, uint32_t tag, int ct,
                                        void* dst) {
  constexpr int kBatch = 8;
  for (int64_t first = ct; first < n; first += kBatch * static_cast<int64_t>(kConsumers)) {
    uint64_t v[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int64_t w = first + k * static_cast<int64_t>(kConsumers);
      v[k] = w < n ? async::load_relaxed_gpu(words + w) : 0;
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int64_t w = first + k * static_cast<int64_t>(kConsumers);
      if (w < n) {
        while (static_cast<uint32_t>(v[k] >> 32) != tag) {
          v[k] = async::load_relaxed_gpu(words + w);
        }
        const uint32_t data = static_cast<uint32_t>(v[k]);
        if constexpr (kHalves) {
          float* out = static_cast<float*>(dst);
          out[2 * w] = __half2float(__ushort_as_half(static_cast<unsigned short>(data & 0xFFFFu)));
          out[2 * w + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(data >> 16)));
        } else {
          static_cast<uint32_t*>(dst)[w] = data;
        }
      }
    }
  }
}

__device__ __forceinline__ void publish(uint64_t* p, uint32_t tag, uint32_t data) {
  async::store_relaxed_gpu(p, (static_cast<uint64_t>(tag) << 32) | data);
}

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(async::smem_address(smem)),
               "l"(gmem));
}

// bytes (a multiple of 4; 16 where both addresses are 16-byte aligned and bytes % 16 == 0) from
// global src to shared dst with cp.async, spread over the consumer threads (out of line: see q8).
__device__ __noinline__ void copy_async(void* dst, const void* src, int64_t bytes, int ct) {
  if (src == nullptr || bytes <= 0) return;
  char* d = static_cast<char*>(dst);
  const char* g = static_cast<const char*>(src);
  if (bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    for (int64_t i = 16 * static_cast<int64_t>(ct); i < bytes; i += 16 * kConsumers) {
      cp_async16(d + i, g + i, true);
    }
  } else {
    for (int64_t i = 4 * static_cast<int64_t>(ct); i < bytes; i += 4 * kConsumers) {
      cp_async4(d + i, g + i);
    }
  }
}

// p ? a : b, as a selp the compiler keeps (written as `?:` over an unrolled array, the choice by
// lane became an indexed load from local memory).
__device__ __forceinline__ int select_int(bool p, int a, int b) {
  int r;
  asm("{\n.reg .pred q;\nsetp.ne.s32 q, %3, 0;\nselp.b32 %0, %1, %2, q;\n}"
      : "=r"(r)
      : "r"(a), "r"(b), "r"(static_cast<int>(p)));
  return r;
}

// `count` <= kRoundRows rows of a stage (each `row_bytes` long, `row_step` rows apart) dotted
// with x by one warp, their loads and reductions interleaved; lane j < count gets row j's exact
// sum. One instance for every count (the rows past `count` repeat row 0, their sums unused) and
// the loop over the row not unrolled: the kernel runs all of its code once per layer, and the
// 16 instances of consume_rows' four call sites times four counts, unrolled, made it 238 KB,
// more than the SM's instruction cache holds (every phase then waited for its code to come from
// L2: at 134 KB the 2.8B step took 1.70 instead of 1.95 ms).
__device__ __forceinline__ int warp_dot_rows(const int8_t* rows, int row_bytes, int row_step,
                                             const int4* xv, int lane, int count) {
  const int4* w[kRoundRows];
  int acc[kRoundRows];
#pragma unroll
  for (int j = 0; j < kRoundRows; ++j) {
    w[j] = reinterpret_cast<const int4*>(rows + (j < count ? j : 0) * row_step * row_bytes);
    acc[j] = 0;
  }
#pragma unroll 1
  for (int c = lane; c < row_bytes / 16; c += 32) {
    const int4 xc = xv[c];
#pragma unroll
    for (int j = 0; j < kRoundRows; ++j) {
      const int4 wc = w[j][c];
      acc[j] = dot16(wc, xc, acc[j]);
    }
  }
#pragma unroll
  for (int d = 16; d > 0; d /= 2) {
#pragma unroll
    for (int j = 0; j < kRoundRows; ++j) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], d);
  }
  int mine = acc[0];
#pragma unroll
  for (int j = 1; j < kRoundRows; ++j) mine = select_int(lane == j, acc[j], mine);
  return mine;
}

__device__ __forceinline__ int8_t q8_r(float v, float scale, Rounding rule) {
  return q8(v, scale, static_cast<int>(rule));
}

// Q8 with the reciprocal fast path (common.cuh: the codes of quantize_int8; the IEEE division
// decides near a rounding boundary), inv = RN(1 / scale), inv_ok = reciprocal_ok(inv).
__device__ __forceinline__ int8_t q8_fast(float v, float scale, float inv, bool inv_ok,
                                          Rounding rule) {
  uint32_t code;
  if (inv_ok && q8_if_clear(__fmul_rn(v, inv), kQuotientMargin, code)) {
    return static_cast<int8_t>(code);
  }
  return q8_r(v, scale, rule);
}

// The GEMV epilogue of one row: INT8 codes Q8(float(acc) * scale, out_scale, rule) (q8_fast:
// inv = RN(1 / out_scale), inv_ok = reciprocal_ok(inv)), or (out_scale == 0) float16
// float(acc) * scale.
__device__ __forceinline__ void row_epilogue(int acc, int64_t row, void* out, float scale,
                                             float out_scale, float inv, bool inv_ok, int rule) {
  const float v = __fmul_rn(__int2float_rn(acc), scale);
  if (out_scale > 0.0f) {
    static_cast<int8_t*>(out)[row] =
        q8_fast(v, out_scale, inv, inv_ok, static_cast<Rounding>(rule));
  } else {
    static_cast<__half*>(out)[row] = __float2half_rn(v);
  }
}

// Stage i of the block's stream, stage k of segment sg: waits until it has landed in its ring
// slot and returns its rows; r0 is the segment row of its first, nrows how many it holds.
__device__ __forceinline__ const int8_t* await_stage(const Segment& sg, int64_t i, int k,
                                                     unsigned char* ring, uint64_t* full,
                                                     int64_t& r0, int& nrows) {
  const int slot = static_cast<int>(i % kRing);
  async::barrier_wait(&full[slot], static_cast<int>((i / kRing) & 1));
  r0 = static_cast<int64_t>(k) * sg.rows_per_stage;
  const int64_t left = sg.rows - r0;
  nrows = static_cast<int>(left < sg.rows_per_stage ? left : sg.rows_per_stage);
  return reinterpret_cast<const int8_t*>(ring + static_cast<int64_t>(slot) * kSlot);
}

// The stages of segment `sg` (the first of them is stage `first` of the block's stream), consumed
// in one of two ways, each ending with eight arrivals on the stage's empty barrier:
// - shared (at least 8 rows per stage, or too few stages to share out: dt_proj, 130m's in_proj):
//   every warp waits for each stage and takes its rows of it (row j of the segment to warp j % 8),
//   up to four at a time;
// - owned (fewer rows per stage and enough stages: 2.8B's in_proj and out_proj): stage i is warp
//   i % 8's alone, which takes all its rows together (warp_dot_rows) while the other warps take
//   their own stages (every warp walking every stage made each stage a round trip of dependent
//   loads, shuffles and an epilogue with most warps idle: 2.8B's in_proj took 10.8 us a layer).
// No warp's wait can see a slot two phases ahead: a shared stage is waited for by every
// warp in order; an owned stage i's slot last held stage i - 16, which the same warp consumed
// (16 is a multiple of 8) or which a segment before the caller's consumers_sync() consumed.
// Inline (out of line, with the call's register saves, a 2.8B step took 2.23 against 2.17 ms).
__device__ __forceinline__ void consume_rows(Segment sg, int64_t first, const int8_t* x,
                                             unsigned char* ring, uint64_t* full,
                                             uint64_t* empty, int cw, int lane, void* out,
                                             float scale, float out_scale, int rule) {
  const int4* xv = reinterpret_cast<const int4*>(x);
  // Owned when it shortens the busiest warp's work: ceil(stages / 8) stages of up to four-row
  // rounds each, against one round per stage (at most 8 rows) when shared.
  const float inv = out_scale > 0.0f ? __frcp_rn(out_scale) : 0.0f;
  const bool inv_ok = reciprocal_ok(inv);
  const bool owned = sg.rows_per_stage < kConsumerWarps &&
                     (sg.stages + kConsumerWarps - 1) / kConsumerWarps *
                             ((sg.rows_per_stage + kRoundRows - 1) / kRoundRows) <
                         sg.stages;
  for (int k = 0; k < sg.stages; ++k) {
    const int64_t i = first + k;
    if (owned && static_cast<int>(i & (kConsumerWarps - 1)) != cw) continue;
    int64_t r0;
    int nrows;
    const int8_t* stage = await_stage(sg, i, k, ring, full, r0, nrows);
    // Owned: every row of the stage; shared: rows j >= r0 with j % 8 == cw. Four at a time.
    const int step = owned ? 1 : kConsumerWarps;
    const int r_first =
        owned ? 0
              : static_cast<int>((cw - r0 % kConsumerWarps + kConsumerWarps) % kConsumerWarps);
    for (int r = r_first; r < nrows; r += kRoundRows * step) {
      const int remaining = owned ? nrows - r : (nrows - r + kConsumerWarps - 1) / kConsumerWarps;
      const int count = remaining < kRoundRows ? remaining : kRoundRows;
      const int acc =
          warp_dot_rows(stage + r * sg.row_bytes, sg.row_bytes, step, xv, lane, count);
      if (lane < count) {
        row_epilogue(acc, r0 + r + lane * step, out, scale, out_scale, inv, inv_ok, rule);
      }
    }
    __syncwarp();
    if (owned ? lane < kConsumerWarps : lane == 0) async::barrier_arrive(&empty[i % kRing]);
  }
}

// Butterfly stages h = 1, 2, ..., 16 * EPT (reference order) of every chunk of 32 * EPT
// elements of v: a warp per chunk, lane l holding elements [EPT l, EPT l + EPT). Strides below
// EPT pair registers of one lane; stride EPT * s pairs lane l with lane l ^ s, the lower lane
// keeping a + b and the upper a - b (a the lower element): the reference's operations.
template <int EPT>
__device__ __forceinline__ void butterflies_in_warps(float* v, int E, int cw, int lane) {
  constexpr int kChunk = 32 * EPT;
  for (int base = cw * kChunk; base < E; base += kConsumerWarps * kChunk) {
    float x[EPT];
    float4* p = reinterpret_cast<float4*>(v + base + lane * EPT);  // 16-byte pieces
#pragma unroll
    for (int i = 0; i < EPT / 4; ++i) {
      const float4 q = p[i];
      x[4 * i] = q.x, x[4 * i + 1] = q.y, x[4 * i + 2] = q.z, x[4 * i + 3] = q.w;
    }
    butterflies_in_registers<EPT>(x);
#pragma unroll
    for (int s = 1; s < 32; s *= 2) {
      const bool upper = (lane & s) != 0;
#pragma unroll
      for (int i = 0; i < EPT; ++i) {
        const float other = __shfl_xor_sync(0xffffffffu, x[i], s);
        x[i] = upper ? __fsub_rn(other, x[i]) : __fadd_rn(x[i], other);
      }
    }
#pragma unroll
    for (int i = 0; i < EPT / 4; ++i) {
      p[i] = make_float4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);
    }
  }
}

__device__ __forceinline__ double add_square(double sum, float r) {
  const double v = static_cast<double>(r);
  return __dadd_rn(sum, __dmul_rn(v, v));
}

__device__ __forceinline__ uint32_t half_bits(__half h) {
  return static_cast<uint32_t>(__half_as_ushort(h));
}

// q8_fast of K values: the K fast codes first, with no call between them (a call in a loop keeps
// the compiler from overlapping one value's latencies with the next's), then the exact division
// for the rare values near a rounding boundary. The same codes as K calls of q8_fast.
template <int K>
__device__ __forceinline__ void q8_fast_group(const float (&v)[K], int8_t (&out)[K], float scale,
                                              float inv, bool inv_ok, Rounding rule) {
  static_assert(K <= 32, "a bit per value");
  uint32_t clear = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    uint32_t code;
    clear |= static_cast<uint32_t>(q8_if_clear(__fmul_rn(v[k], inv), kQuotientMargin, code)) << k;
    out[k] = static_cast<int8_t>(code);
  }
  if (!inv_ok) clear = 0;
  if (clear != (K == 32 ? ~0u : (1u << K) - 1u)) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (((clear >> k) & 1u) == 0u) out[k] = q8_r(v[k], scale, rule);
    }
  }
}

// 8 int8 codes as one 8-byte word (little-endian: code k in byte k).
__device__ __forceinline__ uint2 pack8(const int8_t (&c)[8]) {
  uint32_t lo = 0, hi = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    lo |= static_cast<uint32_t>(static_cast<uint8_t>(c[k])) << (8 * k);
    hi |= static_cast<uint32_t>(static_cast<uint8_t>(c[k + 4])) << (8 * k);
  }
  return make_uint2(lo, hi);
}
// The m x m matrix over the butterflies' output v (m sub-vectors of P): out[i P + p] =
// ((H[i,0] v[p] + H[i,1] v[P + p]) + ...) in column order, times scale, Q8; H is Paley I
// (quamba_kernels.hadamard.base_matrix) as compile-time signs, so each product by +-1 is the exact
// +-v and each step one add or subtract (the reference's operations, no loads of H). A thread
// takes one position p of all m sub-vectors: m loads, the m sums side by side, then their codes.
template <int M>
__device__ __forceinline__ void hadamard_mix(const float* v, int8_t* out, int P,
                                             float scale, float out_scale, Rounding rule, int ct) {
  const float inv = __frcp_rn(out_scale);
  const bool inv_ok = reciprocal_ok(inv);
  for (int p = ct; p < P; p += kConsumers) {
    float col[M], acc[M];
#pragma unroll
    for (int j = 0; j < M; ++j) col[j] = v[j * P + p];
#pragma unroll
    for (int i = 0; i < M; ++i) acc[i] = paley_entry<M>(i, 0) > 0 ? col[0] : -col[0];
#pragma unroll
    for (int j = 1; j < M; ++j) {
#pragma unroll
      for (int i = 0; i < M; ++i) {
        acc[i] = paley_entry<M>(i, j) > 0 ? __fadd_rn(acc[i], col[j]) : __fsub_rn(acc[i], col[j]);
      }
    }
#pragma unroll
    for (int i = 0; i < M; ++i) acc[i] = __fmul_rn(acc[i], scale);
    int8_t codes[M];
    q8_fast_group<M>(acc, codes, out_scale, inv, inv_ok, rule);
#pragma unroll
    for (int i = 0; i < M; ++i) out[i * P + p] = codes[i];
  }
}

__device__ __noinline__ float silu_call(float v) { return silu_exact(v); }
__device__ __noinline__ float softplus_call(float v) { return softplus_exact(v); }


#endif  // __CUDA_ARCH__ >= 900

// One kernel per Hadamard base m (1, 12 or 20; DecodeArgs::had_m): the kernel runs all of its
// code once per layer, and code it does not use still costs instruction-cache room.
template <int M>
__global__ void __launch_bounds__(kThreads, 1) decode_w8a8_kernel(DecodeArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ uint64_t full[kRing], empty[kRing];
  __shared__ Segment seg[kSegments];
  __shared__ double warp_sums[kConsumerWarps];
  __shared__ uint32_t epoch_shared;
  // The current and the next layer's DecodeLayer (raw words: it has default initializers). A
  // per-thread copy lived in local memory, which the ~24 KB of L1 left beside 210 KB of shared
  // memory does not hold for 288 threads: every field read went to L2.
  __shared__ __align__(8) uint32_t layer_words[2][kLayerWords];
  __shared__ long long phase_cycles[kPhases];  // DecodeArgs::timing (thread 0's, see mark)

  const int G = static_cast<int>(gridDim.x), b = static_cast<int>(blockIdx.x);
  const int64_t D = a.d_model, E = a.d_inner, R = a.dt_rank, N = a.d_state, XR = R + 2 * N;
  constexpr int m = M;
  const int64_t P = E / m;
  const int log2_p = 31 - __clz(static_cast<int>(P));
  int64_t c0, c1, o0, o1;
  share_of(E / 4, 4, G, b, c0, c1);
  share_of(D / 2, 2, G, b, o0, o1);
  const int64_t nc = c1 - c0, no = o1 - o0;
  const int64_t slab_columns = align16(max_block_channels(E, G));  // decode_x_slab_columns

  launch::start_after_prior_grids();  // first: see launch.cuh
  if (threadIdx.x == 0) {
    const int64_t rows[kSegments] = {nc, nc, XR, nc, no};
    const int64_t row0[kSegments] = {c0, E + c0, b * XR, c0, o0};  // x_proj: the block's slab
    const int64_t bytes[kSegments] = {D, D, slab_columns, R, E};
    int first = 0;
    for (int s = 0; s < kSegments; ++s) {
      const int rps = static_cast<int>(kSlot / bytes[s]);
      const int stages = static_cast<int>((rows[s] + rps - 1) / rps);
      seg[s] = Segment{first, stages, rps, static_cast<int>(bytes[s]), row0[s], rows[s]};
      first += stages;
    }
    for (int s = 0; s < kRing; ++s) {
      async::barrier_init(&full[s], 1);
      async::barrier_init(&empty[s], kConsumerWarps);  // 8 arrivals a stage (consume_rows)
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    epoch_shared = *reinterpret_cast<volatile unsigned*>(&a.counters[0]);
  }
  __syncthreads();
  const int stages_per_layer = seg[kSegments - 1].first_stage + seg[kSegments - 1].stages;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  if (warp == 0) {
    // Producer: the block's stages of every layer, in the order the consumers take them. At most
    // a.inflight copies issued and not landed (a deeper queue delays the exchanges' polls).
    if (lane == 0) {
      const int64_t total = static_cast<int64_t>(a.n_layers) * stages_per_layer;
      int layer = 0, j = 0;  // stage i is stage j of `layer` (counted, not divided: int64 division
                             // costs ~70 instructions)
      for (int64_t i = 0; i < total; ++i, j = j + 1 == stages_per_layer ? (++layer, 0) : j + 1) {
        const int slot = static_cast<int>(i % kRing);
        if (i >= kRing) async::barrier_wait(&empty[slot], static_cast<int>((i / kRing - 1) & 1));
        if (i >= a.inflight) {
          const int64_t landed = i - a.inflight;
          async::barrier_wait(&full[landed % kRing], static_cast<int>((landed / kRing) & 1));
        }
        int s = 0;
        while (j >= seg[s].first_stage + seg[s].stages) ++s;
        const Segment sg = seg[s];
        const int k = j - sg.first_stage;
        const int64_t row = sg.row0 + static_cast<int64_t>(k) * sg.rows_per_stage;
        const int64_t left = sg.rows - static_cast<int64_t>(k) * sg.rows_per_stage;
        const int nrows = static_cast<int>(left < sg.rows_per_stage ? left : sg.rows_per_stage);
        const DecodeLayer& L = a.layers[layer];
        const int8_t* base = s <= 1 ? L.w_in : s == 2 ? L.w_x : s == 3 ? L.w_dt : L.w_out;
        const uint32_t bytes = static_cast<uint32_t>(nrows * sg.row_bytes);
        async::barrier_expect_bytes(&full[slot], bytes);
        async::bulk_load_1d(smem + static_cast<int64_t>(slot) * kSlot,
                            base + row * sg.row_bytes, bytes, &full[slot]);
      }
    }
    return;
  }

  // ---- consumers ----
  const int ct = threadIdx.x - 32, cw = warp - 1;
  const SmemPlan sp = smem_plan(D, E, XR, m, G);
  float* resid = reinterpret_cast<float*>(smem + sp.resid);
  __half* hidden = reinterpret_cast<__half*>(smem + sp.hidden);
  int8_t* xn = reinterpret_cast<int8_t*>(smem + sp.xn);
  int8_t* act = reinterpret_cast<int8_t*>(smem + sp.act);
  float* hbuf = reinterpret_cast<float*>(smem + sp.hbuf);
  int8_t* xp = reinterpret_cast<int8_t*>(smem + sp.xp);
  int8_t* xcode = reinterpret_cast<int8_t*>(smem + sp.xcode);
  int8_t* zcode = reinterpret_cast<int8_t*>(smem + sp.zcode);
  int8_t* ucode = reinterpret_cast<int8_t*>(smem + sp.ucode);
  int8_t* dtcode = reinterpret_cast<int8_t*>(smem + sp.dtcode);
  __half* y16 = reinterpret_cast<__half*>(smem + sp.y16);
  __half* out16 = reinterpret_cast<__half*>(smem + sp.out16);
  int8_t* s_conv_w = reinterpret_cast<int8_t*>(smem + sp.conv_w);
  int8_t* s_conv_state = reinterpret_cast<int8_t*>(smem + sp.conv_state);
  int8_t* s_conv_b = reinterpret_cast<int8_t*>(smem + sp.conv_b);
  int8_t* s_A_log = reinterpret_cast<int8_t*>(smem + sp.A_log);
  int8_t* s_ssm_state = reinterpret_cast<int8_t*>(smem + sp.ssm_state);
  int8_t* s_D = reinterpret_cast<int8_t*>(smem + sp.D);
  int8_t* s_dt_bias = reinterpret_cast<int8_t*>(smem + sp.dt_bias);
  float* gate = reinterpret_cast<float*>(smem + sp.gate);
  float* skip = reinterpret_cast<float*>(smem + sp.skip);
  float* delta = reinterpret_cast<float*>(smem + sp.delta);
  // The norm weight of the next layer lands in hbuf (free between the Hadamard and the next
  // norm; D <= E): copied in at the start and after each layer's Hadamard.
  const float* norm_w = hbuf;

  uint64_t* x_y = a.exchange;           // exchange 1: y, 2 float16 per word
  uint64_t* x_out = x_y + E / 2;        // exchange 2: out_proj outputs, 2 float16 per word
  // x_proj's sums of every layer, two sets: this launch's (by the epoch's parity) and the next
  // one's, which this launch zeroes (no block of this launch touches it; the next launch starts
  // after this one has completed).
  uint64_t* x_sums_all = x_out + D / 2;
  const int64_t sums_per_set = static_cast<int64_t>(a.n_layers) * XR;  // words kSumStride apart
  uint64_t* x_sums = x_sums_all + (epoch_shared & 1u) * sums_per_set * kSumStride;
  {
    uint64_t* next = x_sums_all + ((epoch_shared + 1u) & 1u) * sums_per_set * kSumStride;
    for (int64_t i = b * static_cast<int64_t>(kConsumers) + ct; i < sums_per_set;
         i += static_cast<int64_t>(G) * kConsumers) {
      next[i * kSumStride] = 0;
    }
  }
  const uint32_t tag_base = epoch_shared * static_cast<uint32_t>(kExchanges * a.n_layers) + 1u;

  // Layer l's small per-channel data (read in phases C and G) into shared memory: one cp.async
  // group, issued at the layer's start (it lands during the norm and in_proj).
  auto stage_channels = [&](const DecodeLayer& L) {
    copy_async(s_conv_w, L.conv_w + c0 * 4, nc * 4, ct);
    copy_async(s_conv_state, L.conv_state + c0 * 3, nc * 3, ct);
    copy_async(s_conv_b, L.conv_b != nullptr ? L.conv_b + c0 : nullptr, nc, ct);
    copy_async(s_A_log, L.A_log + c0 * N, nc * N, ct);
    copy_async(s_ssm_state, L.ssm_state + c0 * N, nc * N, ct);
    copy_async(s_D, L.D != nullptr ? L.D + c0 : nullptr, nc, ct);
    copy_async(s_dt_bias, L.dt_bias != nullptr ? L.dt_bias + c0 : nullptr, nc, ct);
    cp_async_commit();
  };
  copy_async(hbuf, a.layers[0].norm_w, 4 * D, ct);  // the first norm weight
  cp_async_commit();
  const auto layer_source = [&](int l) { return reinterpret_cast<const uint32_t*>(a.layers + l); };
  if (ct < kLayerWords) layer_words[0][ct] = layer_source(0)[ct];
  if (ct < kPhases) phase_cycles[ct] = 0;
  consumers_sync();

  // Optional phase timing (DecodeArgs::timing): cycles of consumer thread 0 in each phase, kept in
  // shared memory (in local memory, each mark was a round trip to L2).
  long long last_mark = clock64();
  const auto mark = [&](int phase) {
    if (a.timing != nullptr && ct == 0) {
      const long long now = clock64();
      phase_cycles[phase] += now - last_mark;
      last_mark = now;
    }
  };

  for (int layer = 0; layer < a.n_layers; ++layer) {
    const DecodeLayer& L = *reinterpret_cast<const DecodeLayer*>(layer_words[layer & 1]);
    const uint32_t tag = tag_base + static_cast<uint32_t>(kExchanges * layer);
    stage_channels(L);

    // A: the norm's input row, then rmsnorm_vec8_kernel's arithmetic and order.
    if (layer == 0) {
      const __half* h = static_cast<const __half*>(a.hidden_in);
      for (int64_t d = ct; d < D; d += kConsumers) hidden[d] = h[d];
    } else {
      await_words<false>(x_out, D / 2, tag - kExchanges + 1, ct, hidden);
    }
    cp_async_wait<1>();  // this layer's norm weight (the channel data may still be on its way)
    consumers_sync();
    mark(0);
    double sum = 0.0;
    for (int g = ct; g < D / 8; g += kConsumers) {
      // Eight elements' loads at once (16-byte shared loads), then their sums in order.
      const uint4 h8 = reinterpret_cast<const uint4*>(hidden)[g];
      float4* r4 = reinterpret_cast<float4*>(resid) + 2 * g;
      float4 lo = make_float4(0.0f, 0.0f, 0.0f, 0.0f), hi = lo;
      if (layer != 0) lo = r4[0], hi = r4[1];
      const __half2* h2 = reinterpret_cast<const __half2*>(&h8);
      float x[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h2[i]);
        x[2 * i] = f.x, x[2 * i + 1] = f.y;
      }
      float r[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        r[i] = layer == 0 ? x[i] : __fadd_rn(x[i], r[i]);
        sum = add_square(sum, r[i]);
      }
      r4[0] = make_float4(r[0], r[1], r[2], r[3]);
      r4[1] = make_float4(r[4], r[5], r[6], r[7]);
    }
#pragma unroll
    for (int offset = 16; offset >= 1; offset /= 2) {
      sum = __dadd_rn(sum, __shfl_xor_sync(0xffffffffu, sum, offset));
    }
    if (lane == 0) warp_sums[cw] = sum;
    consumers_sync();
    double total = warp_sums[0];
#pragma unroll
    for (int w = 1; w < kConsumerWarps; ++w) total = __dadd_rn(total, warp_sums[w]);
    const float mean_square = __double2float_rn(__ddiv_rn(total, static_cast<double>(D)));
    const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean_square, L.eps)));
    const float inv_in = __frcp_rn(L.s_in);
    const bool inv_in_ok = reciprocal_ok(inv_in);
    for (int g = ct; g < D / 8; g += kConsumers) {
      const float4* r4 = reinterpret_cast<const float4*>(resid) + 2 * g;
      const float4* w4 = reinterpret_cast<const float4*>(norm_w) + 2 * g;
      const float4 r0 = r4[0], r1 = r4[1], w0 = w4[0], w1 = w4[1];
      const float r[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w};
      const float w[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
      float y[8];
      int8_t codes[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) y[i] = __fmul_rn(__fmul_rn(r[i], inv), w[i]);
      q8_fast_group<8>(y, codes, L.s_in, inv_in, inv_in_ok, static_cast<Rounding>(L.round_norm));
      reinterpret_cast<uint2*>(xn)[g] = pack8(codes);
    }
    if (layer == a.n_layers - 1 && b == 0) {
      for (int64_t d = ct; d < D; d += kConsumers) a.residual_out[d] = resid[d];
    }
    consumers_sync();
    mark(1);

    // B: in_proj rows of the block's channels (x, then z).
    const int64_t stage0 = static_cast<int64_t>(layer) * stages_per_layer;
    consume_rows(seg[0], stage0 + seg[0].first_stage, xn, smem, full, empty, cw, lane, xcode,
                 L.in_scale, L.s_xz, L.round_gemm);
    consume_rows(seg[1], stage0 + seg[1].first_stage, xn, smem, full, empty, cw, lane, zcode,
                 L.in_scale, L.s_xz, L.round_gemm);
    cp_async_wait<0>();  // the channel data
    consumers_sync();
    mark(2);

    // C: conv update (conv1d_update_kernel's exact formula), a channel per thread; the same thread
    // also forms the channel's gate and skip term for the scan step (selective_scan_step_kernel's
    // operations), so that they are off the scan step's chain of dependent calls.
    {
      const float inv_u = __frcp_rn(L.s_u);
      const bool inv_u_ok = reciprocal_ok(inv_u);
      for (int64_t lc = ct; lc < nc; lc += kConsumers) {
        const int64_t c = c0 + lc;
        const int8_t* st = s_conv_state + lc * 3;
        const int8_t* w = s_conv_w + lc * 4;
        const int8_t s0 = st[0], s1 = st[1], s2 = st[2], x = xcode[lc];
        const int acc = int(w[0]) * s0 + int(w[1]) * s1 + int(w[2]) * s2 + int(w[3]) * x;
        const float bias = L.conv_b != nullptr
                               ? __double2float_rn(__dmul_rn(static_cast<double>(s_conv_b[lc]),
                                                             L.conv_s_b))
                               : -0.0f;
        const float v = __fadd_rn(__fmul_rn(L.conv_scale, static_cast<float>(acc)), bias);
        const int8_t code =
            q8_fast(silu_call(v), L.s_u, inv_u, inv_u_ok, static_cast<Rounding>(L.round_conv));
        int8_t* state = L.conv_state + c * 3;
        state[0] = s1;
        state[1] = s2;
        state[2] = x;
        ucode[lc] = code;
        gate[lc] = silu_call(__fmul_rn(static_cast<float>(zcode[lc]), L.s_xz));
        if (L.D != nullptr) {
          const float u = __fmul_rn(static_cast<float>(code), L.s_u);
          skip[lc] = __fmul_rn(u, __fmul_rn(static_cast<float>(s_D[lc]), L.s_D));
        }
      }
    }
    consumers_sync();
    mark(3);

    // D: x_proj's parts over the block's channels, a row per thread: the block's slab holds w_x's
    // columns of its channels and zeros beyond them (so ucode's bytes past nc add nothing). Each
    // part goes into the row's sum with one reduction that also counts it (kSumCountShift).
    {
      uint64_t* sums = x_sums + static_cast<int64_t>(layer) * XR * kSumStride;
      const Segment sg = seg[2];
      const int4* uv = reinterpret_cast<const int4*>(ucode);
      const int chunks = sg.row_bytes / 16;
      for (int k = 0; k < sg.stages; ++k) {
        const int64_t i = stage0 + sg.first_stage + k;
        int64_t r0;
        int nrows;
        const int8_t* stage = await_stage(sg, i, k, smem, full, r0, nrows);
        for (int r = ct; r < nrows; r += kConsumers) {
          const int4* w =
              reinterpret_cast<const int4*>(stage + static_cast<int64_t>(r) * sg.row_bytes);
          int acc = 0;
          for (int c = 0; c < chunks; ++c) acc = dot16(w[c], uv[c], acc);
          async::add_relaxed_gpu(sums + (r0 + r) * kSumStride,
                                 (uint64_t{1} << kSumCountShift) +
                                     static_cast<uint64_t>(acc + kSumBias));
        }
        __syncwarp();
        if (lane == 0) async::barrier_arrive(&empty[i % kRing]);
      }
    }
    mark(4);

    // E: every row's sum, once all G blocks have added their parts (the count), and from it the
    // x_proj GEMV's code (dt_low, B, C), in every block. One thread polls the last row until it
    // is complete, then each thread reads its rows (polling again in the rare case that one is
    // not complete yet): 192 threads of every block polling at once kept the L2 lines of the
    // sums busy.
    {
      const uint64_t* sums = x_sums + static_cast<int64_t>(layer) * XR * kSumStride;
      if (ct == 0) {
        while ((async::load_relaxed_gpu(sums + (XR - 1) * kSumStride) >> kSumCountShift) !=
               static_cast<uint64_t>(G)) {
        }
      }
      consumers_sync();
      const float inv_xo = __frcp_rn(L.s_xo);
      const bool inv_xo_ok = reciprocal_ok(inv_xo);
      for (int64_t r = ct; r < XR; r += kConsumers) {
        uint64_t v = async::load_relaxed_gpu(sums + r * kSumStride);
        while ((v >> kSumCountShift) != static_cast<uint64_t>(G)) {
          v = async::load_relaxed_gpu(sums + r * kSumStride);
        }
        const int64_t total =
            static_cast<int64_t>(v & ((uint64_t{1} << kSumCountShift) - 1)) - G * kSumBias;
        xp[r] = q8_fast(__fmul_rn(__int2float_rn(static_cast<int>(total)), L.x_scale), L.s_xo,
                        inv_xo, inv_xo_ok, static_cast<Rounding>(L.round_gemm));
      }
    }
    consumers_sync();
    mark(5);

    // F: dt_proj rows of the block's channels -> dt codes.
    consume_rows(seg[3], stage0 + seg[3].first_stage, xp, smem, full, empty, cw, lane, dtcode,
                 L.dt_scale, L.s_dt, L.round_gemm);
    consumers_sync();
    mark(6);

    // G: scan step (selective_scan_step_kernel's arithmetic; 16 lanes per channel, one state
    // each: the same pairwise tree), the INT8 state requantized in place. Each channel's delta
    // (softplus) first, once per channel; then a thread's channels (16 apart) kScanItems at a
    // time, their chains of dependent operations side by side (exp inline: a call between them
    // would keep them apart).
    for (int64_t lc = ct; lc < nc; lc += kConsumers) {
      float d = __fmul_rn(static_cast<float>(dtcode[lc]), L.s_dt);
      if (L.dt_bias != nullptr) {
        d = __fadd_rn(d, __fmul_rn(static_cast<float>(s_dt_bias[lc]), L.s_dtb));
      }
      delta[lc] = softplus_call(d);
    }
    consumers_sync();
    {
      constexpr int kPerRound = kConsumers / 16;  // channels of one item index
      const int n = ct % 16;
      const float inv_h = __frcp_rn(L.s_h);
      const bool inv_h_ok = reciprocal_ok(inv_h);
      const float Bn = __fmul_rn(static_cast<float>(xp[R + n]), L.s_xo);
      const float Cn = __fmul_rn(static_cast<float>(xp[R + N + n]), L.s_xo);
      const auto scan_items = [&](auto items) {
        constexpr int kScanItems = decltype(items)::value;
        // The loop is the same for every thread (the shuffles need whole warps).
        for (int64_t base = 0; base < nc; base += kScanItems * kPerRound) {
          float h[kScanItems], y[kScanItems];
#pragma unroll
          for (int k = 0; k < kScanItems; ++k) {
            const int64_t lc = base + k * kPerRound + ct / 16;
            h[k] = 0.0f, y[k] = 0.0f;
            if (lc < nc) {
              const float u = __fmul_rn(static_cast<float>(ucode[lc]), L.s_u);
              const float d = delta[lc];
              const float A = -expf(__fmul_rn(static_cast<float>(s_A_log[lc * N + n]), L.s_A));
              const float h_old = __fmul_rn(static_cast<float>(s_ssm_state[lc * N + n]), L.s_h);
              const float dA = expf(__fmul_rn(d, A));
              const float dBu = __fmul_rn(__fmul_rn(d, Bn), u);
              h[k] = __fadd_rn(__fmul_rn(dA, h_old), dBu);
              y[k] = __fmul_rn(h[k], Cn);
            }
          }
          int8_t codes[kScanItems];
          q8_fast_group<kScanItems>(h, codes, L.s_h, inv_h, inv_h_ok,
                                    static_cast<Rounding>(L.round_state));
#pragma unroll
          for (int dist = 8; dist >= 1; dist /= 2) {
#pragma unroll
            for (int k = 0; k < kScanItems; ++k) {
              y[k] = __fadd_rn(y[k], __shfl_xor_sync(0xffffffffu, y[k], dist));
            }
          }
#pragma unroll
          for (int k = 0; k < kScanItems; ++k) {
            const int64_t lc = base + k * kPerRound + ct / 16;
            if (lc < nc) {
              L.ssm_state[(c0 + lc) * N + n] = codes[k];
              if (n == 0) {
                float yc = y[k];
                if (L.D != nullptr) yc = __fadd_rn(yc, skip[lc]);
                y16[lc] = __float2half_rn(__fmul_rn(yc, gate[lc]));
              }
            }
          }
        }
      };
      // One item per thread where one round covers the block's channels (130m): there the four
      // items' empty slots only cost their shuffles.
      if (nc <= kPerRound) {
        scan_items(std::integral_constant<int, 1>{});
      } else {
        scan_items(std::integral_constant<int, 4>{});
      }
    }
    consumers_sync();
    for (int64_t q = ct; q < nc / 2; q += kConsumers) {
      publish(x_y + c0 / 2 + q, tag + 0, half_bits(y16[2 * q]) | (half_bits(y16[2 * q + 1]) << 16));
    }
    mark(7);

    // H: every y, as float32.
    await_words<true>(x_y, E / 2, tag + 0, ct, hbuf);
    consumers_sync();
    mark(8);

    // I: Hadamard (hadamard_transform_ref's order): butterflies over each sub-vector of P with
    // increasing stride, then the m x m matrix summed over its columns in order, times the scale,
    // Q8 -> the out_proj input codes.
    // The strides below 32 * EPT (EPT = min(P, 256) / 32 elements per lane, P >= 128) in registers
    // and warp shuffles, a warp per chunk of 32 * EPT; the others through shared memory.
    // 32-bit indices and shifts (P is a power of two): 64-bit divisions cost ~70 instructions.
    int log_h = 0;
    if (P >= 256) {
      butterflies_in_warps<8>(hbuf, static_cast<int>(E), cw, lane);
      log_h = 8;
    } else if (P == 128) {
      butterflies_in_warps<4>(hbuf, static_cast<int>(E), cw, lane);
      log_h = 7;
    }
    consumers_sync();
    const int half_log = log2_p - 1, pairs = static_cast<int>(E / 2);
    for (; log_h < log2_p; ++log_h) {
      const int h = 1 << log_h;
      for (int k = ct; k < pairs; k += kConsumers) {
        const int sub = k >> half_log, within = k & ((1 << half_log) - 1);
        const int i0 = (sub << log2_p) + ((within >> log_h) << (log_h + 1)) + (within & (h - 1));
        const int i1 = i0 + h;
        const float x0v = hbuf[i0], x1v = hbuf[i1];
        hbuf[i0] = __fadd_rn(x0v, x1v);
        hbuf[i1] = __fsub_rn(x0v, x1v);
      }
      consumers_sync();
    }
    mark(9);
    const Rounding had_rule = static_cast<Rounding>(L.round_had);
    if constexpr (m > 1) {
      hadamard_mix<m>(hbuf, act, static_cast<int>(P), L.had_scale, L.s_had, had_rule, ct);
    } else {
      const float inv = __frcp_rn(L.s_had);
      const bool inv_ok = reciprocal_ok(inv);
      for (int g = ct; g < E / 8; g += kConsumers) {
        const float4* v4 = reinterpret_cast<const float4*>(hbuf) + 2 * g;
        const float4 v0 = v4[0], v1 = v4[1];
        const float v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
        float scaled[8];
        int8_t codes[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) scaled[i] = __fmul_rn(v[i], L.had_scale);
        q8_fast_group<8>(scaled, codes, L.s_had, inv, inv_ok, had_rule);
        reinterpret_cast<uint2*>(act)[g] = pack8(codes);
      }
    }
    consumers_sync();
    if (layer + 1 < a.n_layers) {  // the next norm weight into hbuf, now free
      copy_async(hbuf, a.layers[layer + 1].norm_w, 4 * D, ct);
      cp_async_commit();
    }
    mark(10);

    // J: out_proj rows -> float16, published for the next layer's norm (the last layer writes
    // them out instead). The next layer's DecodeLayer is read meanwhile (its load under the rows).
    const bool copies_layer = layer + 1 < a.n_layers && ct < kLayerWords;
    const uint32_t next_layer_word = copies_layer ? layer_source(layer + 1)[ct] : 0u;
    consume_rows(seg[4], stage0 + seg[4].first_stage, act, smem, full, empty, cw, lane, out16,
                 L.out_scale, 0.0f, 0);
    if (copies_layer) layer_words[(layer + 1) & 1][ct] = next_layer_word;
    consumers_sync();
    if (layer == a.n_layers - 1) {
      __half* h = static_cast<__half*>(a.hidden_out);
      for (int64_t r = ct; r < no; r += kConsumers) h[o0 + r] = out16[r];
    } else {
      for (int64_t q = ct; q < no / 2; q += kConsumers) {
        publish(x_out + o0 / 2 + q, tag + 1,
                half_bits(out16[2 * q]) | (half_bits(out16[2 * q + 1]) << 16));
      }
    }
    mark(11);
  }
  if (a.timing != nullptr && ct == 0) {
    for (int p = 0; p < kPhases; ++p) a.timing[b * kPhases + p] = phase_cycles[p];
  }

  // The next launch's tags: the last block to finish advances the epoch (every block read it at
  // its start, before any block could arrive here).
  consumers_sync();
  if (ct == 0) {
    __threadfence();
    const unsigned arrived = atomicAdd(&a.counters[1], 1u);
    if (arrived == static_cast<unsigned>(G - 1)) {
      a.counters[1] = 0u;
      atomicAdd(&a.counters[0], 1u);
    }
  }
#else
  __trap();  // never launched there (decode_w8a8_device_ok); loud if it were
#endif  // __CUDA_ARCH__ >= 900
}

}  // namespace

bool decode_w8a8_shapes_ok(int64_t d_model, int64_t d_inner, int64_t dt_rank, int64_t d_state,
                           int had_m, const char** why) {
  const auto fail = [&](const char* reason) {
    if (why != nullptr) *why = reason;
    return false;
  };
  if (d_model <= 0 || d_model % 16 != 0) return fail("d_model must be a positive multiple of 16");
  if (d_inner <= 0 || d_inner % 16 != 0) return fail("d_inner must be a positive multiple of 16");
  if (dt_rank <= 0 || dt_rank % 16 != 0) return fail("dt_rank must be a positive multiple of 16");
  if (d_state != 16) return fail("d_state must be 16");
  if (d_model > kSlot || d_inner > kSlot) return fail("a weight row must fit one 10 KB ring slot");
  if (had_m != 1 && had_m != 12 && had_m != 20) {
    return fail("the Hadamard base must be 1, 12 or 20");
  }
  const int64_t p = d_inner / had_m;
  if (d_inner % had_m != 0 || p < 2 || (p & (p - 1)) != 0) {
    return fail("d_inner must be had_m * 2^k");
  }
  return true;
}

int64_t decode_exchange_words(int64_t d_model, int64_t d_inner, int64_t dt_rank, int64_t d_state,
                              int n_layers) {
  // y, out_proj's outputs, then two sets of x_proj's sums (one per layer and row, kSumStride
  // words apart).
  return d_inner / 2 + d_model / 2 +
         2 * static_cast<int64_t>(n_layers) * (dt_rank + 2 * d_state) * kSumStride;
}

int64_t decode_x_slab_columns(int64_t d_inner, int blocks) {
  return align16(max_block_channels(d_inner, blocks));
}

bool decode_w8a8_device_ok(int device) {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    return false;
  }
  // Both versions, as launch.cuh checks them: a kernel JIT-compiled from older PTX (a
  // compute_80 build on a Hopper GPU) was compiled without its sm_90 body.
  cudaFuncAttributes attributes{};
  return major >= 9 && cudaFuncGetAttributes(&attributes, decode_w8a8_kernel<1>) == cudaSuccess &&
         attributes.ptxVersion >= 90 && attributes.binaryVersion >= 90;
}

cudaError_t launch_decode_w8a8(const DecodeArgs& a, cudaStream_t stream) {
  if (!decode_w8a8_shapes_ok(a.d_model, a.d_inner, a.dt_rank, a.d_state, a.had_m, nullptr) ||
      a.n_layers < 1 || a.inflight < 1 || a.inflight > kRing) {
    return cudaErrorInvalidValue;
  }
  int device = 0, sms = 0, optin = 0, cooperative = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (!decode_w8a8_device_ok(device)) return cudaErrorNotSupported;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) !=
          cudaSuccess ||
      (err = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device)) !=
          cudaSuccess) {
    return err;
  }
  if (!cooperative) return cudaErrorNotSupported;
  // x_proj's slabs are laid out for the grid; the sums' block count field holds fewer than 2^11.
  if (a.x_slab_blocks != sms || sms >= 2048) return cudaErrorInvalidValue;
  const SmemPlan plan = smem_plan(a.d_model, a.d_inner, a.dt_rank + 2 * a.d_state, a.had_m, sms);
  void (*kernel)(DecodeArgs) = a.had_m == 20   ? decode_w8a8_kernel<20>
                               : a.had_m == 12 ? decode_w8a8_kernel<12>
                                               : decode_w8a8_kernel<1>;
  cudaFuncAttributes attributes{};
  if ((err = cudaFuncGetAttributes(&attributes, kernel)) != cudaSuccess) return err;
  if (plan.total + static_cast<int64_t>(attributes.sharedSizeBytes) > optin) {
    return cudaErrorInvalidValue;
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(plan.total));
  if (err != cudaSuccess) return err;
  // Every block polls words the others write: all of them must be resident at once (one per SM,
  // cooperative launch).
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(sms));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = static_cast<size_t>(plan.total);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeCooperative;
  attribute[0].val.cooperative = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  err = cudaLaunchKernelEx(&config, kernel, a);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace quamba
