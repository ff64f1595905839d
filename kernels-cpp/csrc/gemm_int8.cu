// INT8 x INT8 -> INT32 GEMV / skinny GEMM with the W8A8 epilogues, and the epilogue alone.
//
// Accumulation is exact (|acc| <= K * 128 * 128 < 2^31 for K < 131072, checked by the caller), so
// the summation order is free: the results are bit-identical to reference_ops.w8a8_linear.
//
// Three kernels: for K % 16 == 0 (sm_80+, mma.sync m16n8k32 s8) a skinny kernel for few rows
// (decode: M = batch; weights read once per 16 rows) and a tiled kernel for many (prefill); a
// byte-wise kernel for any other K. The epilogue is fused into all three.
#include "gemm_epilogue.cuh"
#include "gemm_int8.h"
#include "mma_s8.cuh"

namespace quamba {
namespace {

using namespace gemm;  // EpilogueConsts, convert_as, store_epilogue, ... (gemm_epilogue.cuh)

constexpr int kGemvThreads = 128;
constexpr int kCols = 4;

// Reduce-scatter across the lanes at xor-distances D, D/2, ..., 1. While a lane carries more than
// one value it keeps half (the upper half when its bit D is set) and adds the partner's matching
// half; with one value left the stage is a plain xor all-reduce. `base` gathers the original index
// of v[0]; `writer` is cleared on lanes that only hold a copy of another lane's sum.
template <int C, int D, int V>
__device__ __forceinline__ void reduce_scatter(int (&v)[V], int lane, int& base, bool& writer) {
  if constexpr (D > 0) {
    if constexpr (C > 1) {
      const bool upper = (lane & D) != 0;
#pragma unroll
      for (int i = 0; i < C / 2; ++i) {
        const int send = upper ? v[i] : v[i + C / 2];
        const int keep = upper ? v[i + C / 2] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, D);
      }
      if (upper) base += C / 2;
      reduce_scatter<C / 2, D / 2, V>(v, lane, base, writer);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], D);
      if (lane & D) writer = false;
      reduce_scatter<1, D / 2, V>(v, lane, base, writer);
    }
  }
}

// ---- tensor-core skinny GEMM (rows in tiles of 16: decode, and small weight matrices) ----
//
// One block = kSkinnyWarps warps = an output tile of 16 rows x 8 kTiles columns; the warps split K
// in chunks of 64 and each chunk is two mma.m16n8k32 (s8 x s8 -> s32) per column tile. Lane
// (g = lane / 4, t = lane % 4) takes 16 contiguous bytes of weight row n0 + 8 j + g (j < kTiles)
// and of x rows m0 + g, m0 + g + 8 at k = chunk + 16 t, and uses words 0-1 for the first mma and
// words 2-3 for the second: A and B see the same permutation of k, which an exact integer sum does
// not notice. Every weight byte is read once per 16 rows.
// Loads: each lane copies exactly the pieces it feeds to its own mma into its own slots of a
// warp-private ring of kSkinnyStages chunks (cp.async), so that many chunks per warp are in flight
// without registers held for them (loaded into registers, about one chunk per warp was: ncu at
// M = 16, 67% of the stalls waiting on memory, DRAM at 44%). A lane reads only its own slots, so
// cp.async.wait_group is all the synchronisation the ring needs.
constexpr int kMmaChunk = 64;
constexpr int kSkinnyWarps = 8;
// Measured (H100, M = 16, in_proj + x_proj + out_proj of Mamba-2.8B): 8 warps x 4 stages 32.8 us,
// 2 stages 33.1, 8 stages 36.1; 4 warps 36.8-39.9.
constexpr int kSkinnyStages = 4;

// Dynamic shared memory of the skinny kernel: the ring (kTiles + 2 pieces of 16 bytes per lane and
// chunk), then the per-warp accumulators summed in the epilogue.
template <int kTiles>
constexpr int skinny_ring_int4s() {
  return kSkinnyWarps * kSkinnyStages * (kTiles + 2) * 32;
}
template <int kTiles>
constexpr int skinny_smem_bytes() {
  return skinny_ring_int4s<kTiles>() * 16 + kSkinnyWarps * 16 * 8 * kTiles * 4;
}
// Two tiles fit the 99 KB a block may opt in to on every GPU this package builds for (sm_86 and
// sm_89 have the least); four need more, and launch_int8_gemm falls back where they do not fit.
static_assert(skinny_smem_bytes<2>() <= 99 * 1024, "the skinny GEMM must run on sm_86 / sm_89");

// kTiles column tiles of 8 per block (1, 2 or 4): a block reads x once for 8 * kTiles weight
// rows, so wide layers (in_proj at batch 16) pull less x through L1/L2 per weight byte.
template <int kTiles>
__global__ void __launch_bounds__(kSkinnyWarps * 32)
    int8_mma_skinny_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ w,
                           void* __restrict__ out, int64_t M, int64_t N, int64_t K,
                           EpilogueConsts ep) {
  constexpr int kCols = 8 * kTiles;
  constexpr int kPieces = kTiles + 2;  // per lane and chunk: the column tiles' rows, x rows g, g+8
  extern __shared__ int4 skinny_smem[];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  // This lane's slots: piece p of stage s at ring[(s * kPieces + p) * 32].
  int4* ring = skinny_smem + warp * kSkinnyStages * kPieces * 32 + lane;
  int* s_acc = reinterpret_cast<int*>(skinny_smem + skinny_ring_int4s<kTiles>());
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kCols;
  // While the previous kernel finishes: this block's weight rows into L2 (see launch.cuh).
  if (blockIdx.y == 0) {
    const int64_t row_bytes = (N - n0 < kCols ? N - n0 : kCols) * K;
    for (int64_t off = 128 * static_cast<int64_t>(threadIdx.x); off < row_bytes;
         off += 128 * kSkinnyWarps * 32) {
      launch::prefetch_l2(w + n0 * K + off);
    }
  }
  launch::start_after_prior_grids();  // after the L2 prefetch: see launch.cuh
  bool w_row_ok[kTiles];
  const int8_t* w_row[kTiles];
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
    w_row_ok[j] = n0 + 8 * j + g < N;
    w_row[j] = w + (n0 + 8 * j + g) * K;
  }
  // This warp's chunks: warp, warp + kSkinnyWarps, ... (K < 2^17: int is enough).
  const int chunks = static_cast<int>((K + kMmaChunk - 1) / kMmaChunk);
  const int my_chunks = warp < chunks ? (chunks - warp + kSkinnyWarps - 1) / kSkinnyWarps : 0;

  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * 16; m0 < M;
       m0 += static_cast<int64_t>(gridDim.y) * 16) {
    const bool row_a_ok = m0 + g < M, row_b_ok = m0 + g + 8 < M;
    const int8_t* x_a = x + (m0 + g) * K;
    const int8_t* x_b = x + (m0 + g + 8) * K;
    // This warp's chunk i into ring stage i % kSkinnyStages (segments past K or past the last
    // row are zero-filled: K % 16 == 0, so a 16-byte segment is all in or all out).
    auto issue = [&](int i) {
      const int64_t k = static_cast<int64_t>(warp + i * kSkinnyWarps) * kMmaChunk + 16 * t;
      const bool k_ok = k < K;
      int4* slot = ring + (i % kSkinnyStages) * kPieces * 32;
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        const bool ok = w_row_ok[j] && k_ok;
        cp_async16(slot + j * 32, ok ? w_row[j] + k : w, ok);
      }
      cp_async16(slot + kTiles * 32, row_a_ok && k_ok ? x_a + k : x, row_a_ok && k_ok);
      cp_async16(slot + (kTiles + 1) * 32, row_b_ok && k_ok ? x_b + k : x, row_b_ok && k_ok);
    };
    // One commit per chunk, empty past the last: wait_group<kSkinnyStages - 1> then means "chunk
    // i has landed" at iteration i.
#pragma unroll
    for (int s = 0; s < kSkinnyStages; ++s) {
      if (s < my_chunks) issue(s);
      cp_async_commit();
    }
    int c[kTiles][4];
#pragma unroll
    for (int j = 0; j < kTiles; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0;
    for (int i = 0; i < my_chunks; ++i) {
      cp_async_wait<kSkinnyStages - 1>();
      const int4* slot = ring + (i % kSkinnyStages) * kPieces * 32;
      const int4 xa = slot[kTiles * 32], xb = slot[(kTiles + 1) * 32];
#pragma unroll
      for (int j = 0; j < kTiles; ++j) mma_chunk64(c[j], xa, xb, slot[j * 32]);
      // The stage just read is refilled only after its mma issued (they consumed the loads).
      if (i + kSkinnyStages < my_chunks) issue(i + kSkinnyStages);
      cp_async_commit();
    }
    cp_async_wait<0>();  // the ring is reused by the next row tile
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      int* acc = s_acc + warp * 16 * kCols + 8 * j + 2 * t;
      acc[g * kCols] = c[j][0];
      acc[g * kCols + 1] = c[j][1];
      acc[(g + 8) * kCols] = c[j][2];
      acc[(g + 8) * kCols + 1] = c[j][3];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < 16 * kCols; i += kSkinnyWarps * 32) {
      const int r = i / kCols, col = i % kCols;
      int total = 0;
#pragma unroll
      for (int j = 0; j < kSkinnyWarps; ++j) total += s_acc[(j * 16 + r) * kCols + col];
      const int64_t m = m0 + r, n = n0 + col;
      if (m < M && n < N) store_epilogue(ep, out, out_index(ep, m, n, N), total);
    }
    __syncthreads();  // s_acc is reused by the next row tile
  }
}

// ---- streaming GEMV (M <= 4: decode at small batch) ----
//
// kSplit warps of a block read one weight row, each a contiguous share of it as one stream (lane l
// takes bytes 16 l, 16 l + 512, ...): long sequential bursts, the loads of a round written before
// the dp4a that consume them (the compiler interleaves them: the warps per SM, not one warp's
// loads, keep the bytes in flight). x (M <= 4 rows) comes from L1. Warp all-reduce; with kSplit > 1
// the row's partial sums meet in shared memory (integer sums: the split does not change the
// result). The split keeps each warp to one round of loads and gives narrow layers (x_proj: 192
// rows) enough warps. With a constant weight (the caller's promise that the kernel just before
// this one does not write w: model weights), each warp copies its share of the row into shared
// memory with cp.async before the PDL wait, so the weight stream runs while the previous kernel
// finishes (2.8B batch-1 decode on an H100: 1967 -> 1913 us per token against the L2 prefetch
// every other call gets), and then reads it from there in the loop the other calls use (one
// loop instead of a second one that held all of x in registers: 32-48 registers per thread
// instead of 52-160, 1915 -> 1878 us per token).
constexpr int kStreamThreads = 256;
constexpr int kStreamUnroll = 8;  // 512-byte chunks of a row per round of loads

template <int MT, int kSplit, bool kPreload>
__global__ void __launch_bounds__(kStreamThreads)
    int8_gemv_stream_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ w,
                            void* __restrict__ out, int64_t M, int64_t N, int64_t K,
                            EpilogueConsts ep) {
  constexpr int kWarps = kStreamThreads / 32;
  static_assert(kWarps % kSplit == 0, "a block holds whole rows");
  __shared__ int s_part[kSplit > 1 ? kWarps : 1][MT];
  extern __shared__ int4 s_w[];  // kPreload: [warp][chunk][lane], the warp's share of its row
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int part = warp % kSplit;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (kWarps / kSplit) + warp / kSplit;
  const bool row_ok = n < N;
  // This warp's share of the row: whole 512-byte chunks [k_begin, k_end).
  const int64_t chunks = (K + 511) / 512;
  const int64_t per_part = (chunks + kSplit - 1) / kSplit;
  const int64_t k_begin = min(part * per_part, chunks) * 512;
  const int64_t k_end = min((part + 1) * per_part * 512, K);
  const int8_t* w_row = w + n * K;
  if constexpr (kPreload) {
    // While the previous kernel finishes: this warp's share of the row (at most one round of
    // kStreamUnroll chunks) into shared memory.
    if (row_ok) {
#pragma unroll
      for (int u = 0; u < kStreamUnroll; ++u) {
        const int64_t k = k_begin + static_cast<int64_t>(lane) * 16 + u * 512;
        if (k < k_end) cp_async16(&s_w[(warp * per_part + u) * 32 + lane], w_row + k, true);
      }
    }
    cp_async_commit();
  } else if (row_ok) {
    // While the previous kernel finishes: this warp's share of the row into L2 (see launch.cuh).
    for (int64_t off = k_begin + 128 * static_cast<int64_t>(lane); off < k_end; off += 128 * 32) {
      launch::prefetch_l2(w_row + off);
    }
  }
  launch::start_after_prior_grids();  // after the weight loads: see launch.cuh
  const int4 zero = make_int4(0, 0, 0, 0);
  int acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0;
  if (row_ok) {
    if constexpr (kPreload) cp_async_wait<0>();  // each lane reads only the pieces it copied
    for (int64_t k0 = k_begin + static_cast<int64_t>(lane) * 16, chunk0 = 0; k0 < k_end;
         k0 += kStreamUnroll * 512, chunk0 += kStreamUnroll) {
      int4 wv[kStreamUnroll];
      int4 xv[kStreamUnroll][MT];
#pragma unroll
      for (int u = 0; u < kStreamUnroll; ++u) {
        const int64_t k = k0 + u * 512;
        const bool k_ok = k < k_end;
        if constexpr (kPreload) {
          wv[u] = k_ok ? s_w[(warp * per_part + chunk0 + u) * 32 + lane] : zero;
        } else {
          wv[u] = k_ok ? __ldg(reinterpret_cast<const int4*>(w_row + k)) : zero;
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          xv[u][m] = k_ok && m < M ? __ldg(reinterpret_cast<const int4*>(x + m * K + k)) : zero;
        }
      }
#pragma unroll
      for (int u = 0; u < kStreamUnroll; ++u)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m] = dot16(xv[u][m], wv[u], acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int d = 16; d > 0; d /= 2) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], d);
  }
  if constexpr (kSplit == 1) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (lane == m && m < M && row_ok) store_epilogue(ep, out, out_index(ep, m, n, N), acc[m]);
    }
  } else {
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < MT; ++m) s_part[warp][m] = acc[m];
    }
    __syncthreads();
    if (part == 0 && row_ok && lane < MT && lane < M) {
      int total = 0;
#pragma unroll
      for (int p = 0; p < kSplit; ++p) total += s_part[warp + p][lane];
      store_epilogue(ep, out, out_index(ep, lane, n, N), total);
    }
  }
}

template <int MT, int kSplit>
cudaError_t launch_gemv_stream_split(const int8_t* x, const int8_t* w, void* out, int64_t M,
                                     int64_t N, int64_t K, const EpilogueConsts& ep,
                                     bool constant_w, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kStreamThreads / 32 / kSplit;
  const int64_t blocks = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > 2147483647LL) return cudaErrorInvalidValue;
  const int64_t chunks = (K + 511) / 512;
  const int64_t per_part = (chunks + kSplit - 1) / kSplit;
  if (constant_w && per_part <= kStreamUnroll) {
    const size_t smem = static_cast<size_t>(kStreamThreads / 32) * per_part * 512;
    launch::launch_kernel(int8_gemv_stream_kernel<MT, kSplit, true>,
                          static_cast<unsigned>(blocks), kStreamThreads, smem, stream, x, w, out,
                          M, N, K, ep);
  } else {
    launch::launch_kernel(int8_gemv_stream_kernel<MT, kSplit, false>,
                          static_cast<unsigned>(blocks), kStreamThreads, 0, stream, x, w, out, M,
                          N, K, ep);
  }
  return cudaGetLastError();
}

// Warps per row: enough for one round of loads per warp (at most kStreamUnroll chunks of 512
// bytes each); for layers of fewer rows than one block of warps per SM (x_proj), more -- as long
// as each warp keeps a whole chunk -- up to 64 warps of rows per SM. Measured (H100, M = 1 / 4,
// µs): x_proj (192 x 5120) 2.4 / 6.4 with 1 warp per row, 2.1 / 4.0 with 8; out_proj
// (2560 x 5120) 7.4 / 14.7 with 1, 7.4 / 11.9 with 2 (the rounds rule); in_proj (10240 x 2560)
// 12.0 / 17.4 with 1, 13.6 / 23.9 with 4. Splitting the rows of the small models' wide layers
// down to under a chunk per warp made their batch-1 decode slower (130m 0.418 -> 0.462 ms per
// token end to end).
template <int MT>
cudaError_t launch_gemv_stream(const int8_t* x, const int8_t* w, void* out, int64_t M, int64_t N,
                               int64_t K, const EpilogueConsts& ep, int sms, bool constant_w,
                               cudaStream_t stream) {
  const int64_t chunks = (K + 511) / 512;
  int split = 1;
  while (split < 8 && (chunks + split - 1) / split > kStreamUnroll) split *= 2;
  if (N < (kStreamThreads / 32) * static_cast<int64_t>(sms)) {
    while (split < 8 && 2 * split <= chunks && N * split < 64LL * sms) split *= 2;
  }
  switch (split) {
    case 1: return launch_gemv_stream_split<MT, 1>(x, w, out, M, N, K, ep, constant_w, stream);
    case 2: return launch_gemv_stream_split<MT, 2>(x, w, out, M, N, K, ep, constant_w, stream);
    case 4: return launch_gemv_stream_split<MT, 4>(x, w, out, M, N, K, ep, constant_w, stream);
    default: return launch_gemv_stream_split<MT, 8>(x, w, out, M, N, K, ep, constant_w, stream);
  }
}

// ---- tensor-core tiled GEMM (prefill) ----
//
// Block tile 128 x 128, 8 warps (4 along M x 2 along N, 32 x 64 each), K in tiles of 128 bytes
// staged through a 3-deep cp.async pipeline (96 KB). A K tile is kept as two 64-byte-wide halves:
// the 16-byte fragment loads of a quarter-warp then cover one contiguous 128-byte span (no bank
// conflicts). The fragments use the skinny kernel's permuted k order. Out-of-range rows and k
// segments are zero-filled by cp.async, so any M, N and K % 16 == 0 work. The epilogue stages the
// raw accumulators in shared memory along the output's contiguous axis (n for row-major, l for
// sequence-last), then converts and writes them in 16-byte pieces (write_accumulator_tile).
constexpr int kTileM = 128, kTileN = 128, kTileK = 128, kStages = 3;
constexpr int kHalfK = 64;
constexpr int kTileThreads = 256;
constexpr int kHalfBytes = kTileM * kHalfK;           // 8 KB: one half of A or of B
constexpr int kStageBytes = 4 * kHalfBytes;           // A halves, then B halves
constexpr int kTileSmemBytes = kStages * kStageBytes; // 96 KB (>= the 64 KB fp32 output tile)
static_assert(kTileSmemBytes <= 99 * 1024, "within the opt-in limit of sm_86 / sm_89");

// Step 1 of the tiled kernel's epilogue: this thread's 64 raw accumulators (mma fragment (i, j, r)
// at tile row ml0 + 16 i + 8 (r >= 2), column nl0 + 8 j + (r & 1)) into the shared tile, rows of
// kStagedPitch int32 along the output's contiguous axis (n for row-major, m for sequence-last).
constexpr int kStagedPitch = kTileN + 4;
static_assert(kTileM == kTileN && kTileM * kStagedPitch * 4 <= kTileSmemBytes, "tile must fit");

template <bool kSeqLast>
__device__ __forceinline__ void stage_tile(int32_t* staged, const int (&c)[2][8][4], int ml0,
                                           int nl0) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int ml = ml0 + i * 16 + (r >= 2 ? 8 : 0);
        const int nl = nl0 + j * 8 + (r & 1);
        staged[kSeqLast ? nl * kStagedPitch + ml : ml * kStagedPitch + nl] = c[i][j][r];
      }
    }
  }
}

__global__ void __launch_bounds__(kTileThreads)
    int8_gemm_tiled_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ w,
                           void* __restrict__ out, int64_t M, int64_t N, int64_t K,
                           EpilogueConsts ep) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  extern __shared__ int4 smem_tiles[];
  int8_t* smem = reinterpret_cast<int8_t*>(smem_tiles);
  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int wm = warp / 2, wn = warp % 2;
  const int64_t m_block = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n_block = static_cast<int64_t>(blockIdx.x) * kTileN;
  const int k_tiles = static_cast<int>((K + kTileK - 1) / kTileK);

  auto load_stage = [&](int stage, int kt) {
    int8_t* base = smem + stage * kStageBytes;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int idx = tid + i * kTileThreads;  // 0..2047: 1024 segments of A, then 1024 of B
      const bool is_a = idx < 1024;
      const int local = idx & 1023;
      const int row = local / 8, seg = local % 8;  // 8 x 16 bytes along k per row
      const int64_t k = static_cast<int64_t>(kt) * kTileK + seg * 16;
      const int64_t grow = (is_a ? m_block : n_block) + row;
      const bool valid = grow < (is_a ? M : N) && k < K;
      const int8_t* src = is_a ? x : w;
      int8_t* dst = base + (is_a ? 0 : 2 * kHalfBytes) + (seg / 4) * kHalfBytes + row * kHalfK +
                    (seg % 4) * 16;
      cp_async16(dst, valid ? src + grow * K + k : src, valid);
    }
  };

  int c[2][8][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) c[i][j][r] = 0;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt is visible; everyone is done with the stage refilled below
    if (kt + kStages - 1 < k_tiles) load_stage((kt + kStages - 1) % kStages, kt + kStages - 1);
    cp_async_commit();

    const int8_t* stage = smem + (kt % kStages) * kStageBytes;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int8_t* sa = stage + half * kHalfBytes;
      const int8_t* sb = stage + (2 + half) * kHalfBytes;
      int4 a_lo[2], a_hi[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = wm * 32 + i * 16 + g;
        a_lo[i] = *reinterpret_cast<const int4*>(sa + row * kHalfK + t * 16);
        a_hi[i] = *reinterpret_cast<const int4*>(sa + (row + 8) * kHalfK + t * 16);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int4 b =
            *reinterpret_cast<const int4*>(sb + (wn * 64 + j * 8 + g) * kHalfK + t * 16);
#pragma unroll
        for (int i = 0; i < 2; ++i) mma_chunk64(c[i][j], a_lo[i], a_hi[i], b);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the output tile

  // 1. the raw accumulators into shared memory, along the output's contiguous axis
  int32_t* staged = reinterpret_cast<int32_t*>(smem);
  const int ml0 = wm * 32 + g, nl0 = wn * 64 + 2 * t;
  if (ep.seq_len > 0) {
    stage_tile<true>(staged, c, ml0, nl0);
  } else {
    stage_tile<false>(staged, c, ml0, nl0);
  }
  __syncthreads();

  // 2. converted and written in 16-byte pieces (the output type decided once, not per element)
  write_accumulator_tile<kTileM, kTileN, kStagedPitch>(ep, staged, out, m_block, n_block, M, N,
                                                       tid, kTileThreads);
}

// ---- byte-wise fallback (K not a multiple of 16, or unaligned pointers): dp4a-free and simple ----
//
// A warp owns kCols = 4 consecutive columns and MT rows; lanes stride K by 32 and the MT * kCols
// partial sums are combined with a reduce-scatter over shuffles.
template <int MT>
__global__ void __launch_bounds__(kGemvThreads)
    int8_gemv_bytes_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ w,
                           void* __restrict__ out, int64_t M, int64_t N, int64_t K,
                           EpilogueConsts ep) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  constexpr int V = MT * kCols;
  constexpr int kLeft = V >= 32 ? V / 32 : 1;
  const int lane = threadIdx.x % 32;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * (kGemvThreads / 32) + threadIdx.x / 32) * kCols;

  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT; m0 < M;
       m0 += static_cast<int64_t>(gridDim.y) * MT) {
    int acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0;
    if (n0 < N) {
      for (int64_t k = lane; k < K; k += 32) {
        int wv[kCols];
#pragma unroll
        for (int c = 0; c < kCols; ++c) wv[c] = n0 + c < N ? w[(n0 + c) * K + k] : 0;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m0 + m < M) {
            const int xv = x[(m0 + m) * K + k];
#pragma unroll
            for (int c = 0; c < kCols; ++c) acc[m * kCols + c] += xv * wv[c];
          }
        }
      }
    }
    int base = 0;
    bool writer = true;
    reduce_scatter<V, 16, V>(acc, lane, base, writer);
    if (writer) {
#pragma unroll
      for (int i = 0; i < kLeft; ++i) {
        const int idx = base + i;
        const int64_t m = m0 + idx / kCols;
        const int64_t n = n0 + idx % kCols;
        if (m < M && n < N) store_epilogue(ep, out, out_index(ep, m, n, N), acc[i]);
      }
    }
  }
}

template <int MT>
cudaError_t launch_gemv_bytes(const int8_t* x, const int8_t* w, void* out, int64_t M, int64_t N,
                              int64_t K, const EpilogueConsts& ep, cudaStream_t stream) {
  constexpr int kColsPerBlock = (kGemvThreads / 32) * kCols;
  const int64_t col_blocks = (N + kColsPerBlock - 1) / kColsPerBlock;
  const int64_t row_blocks = (M + MT - 1) / MT;
  if (col_blocks > 2147483647LL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(col_blocks),
                  static_cast<unsigned>(row_blocks < 65535 ? row_blocks : 65535));
  launch::launch_kernel(int8_gemv_bytes_kernel<MT>, grid, kGemvThreads, 0, stream, x, w, out, M, N,
                        K, ep);
  return cudaGetLastError();
}

// ---- epilogue over int32 accumulators ----

constexpr int kTile = 32;

// One 32 x 32 tile per block (32 x 8 threads): read rows of acc along n (coalesced), write either
// along n (row-major) or, through shared memory, along m (sequence-last: consecutive l).
__global__ void __launch_bounds__(256)
    int32_epilogue_kernel(const int32_t* __restrict__ acc, void* __restrict__ out, int64_t M,
                          int64_t N, EpilogueConsts ep) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  __shared__ int32_t tile[kTile][kTile + 1];
  const int64_t n_base = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x % kTile;
  const int ty = threadIdx.x / kTile;
  for (int64_t m_base = static_cast<int64_t>(blockIdx.y) * kTile; m_base < M;
       m_base += static_cast<int64_t>(gridDim.y) * kTile) {
    if (ep.seq_len <= 0) {
      for (int r = ty; r < kTile; r += 8) {
        const int64_t m = m_base + r, n = n_base + tx;
        if (m < M && n < N) store_epilogue(ep, out, m * N + n, acc[m * N + n]);
      }
      continue;
    }
    for (int r = ty; r < kTile; r += 8) {
      const int64_t m = m_base + r, n = n_base + tx;
      if (m < M && n < N) tile[r][tx] = acc[m * N + n];
    }
    __syncthreads();
    for (int r = ty; r < kTile; r += 8) {
      const int64_t n = n_base + r, m = m_base + tx;
      if (m < M && n < N) store_epilogue(ep, out, out_index(ep, m, n, N), tile[tx][r]);
    }
    __syncthreads();  // the tile is reused by the next row block
  }
}

// The same epilogue in 64 x 64 tiles with 16-byte accesses, for N % 4 == 0 and (sequence-last)
// seq_len % 16 == 0 with 16-byte aligned buffers: a thread converts 4 consecutive n of one m per
// pass (one 16-byte load of acc); row-major outputs go straight out (4 elements, one store),
// sequence-last ones are staged in shared memory as converted elements and leave as 16-byte runs
// of consecutive l (within one sequence: seq_len % 16 == 0). The index arithmetic runs once per
// 4 or 16 elements instead of per element, which is what bounded the kernel above.
constexpr int kVecTile = 64;

template <GemmOut T>
__global__ void __launch_bounds__(256)
    int32_epilogue_vec_kernel(const int32_t* __restrict__ acc, void* __restrict__ out, int64_t M,
                              int64_t N, EpilogueConsts ep) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  // [n][m] converted elements (up to 4 bytes each), rows padded by 16 bytes.
  __shared__ __align__(16) char tile[kVecTile][kVecTile * 4 + 16];
  constexpr int esize = out_elem_size(T);
  const bool seq_last = ep.seq_len > 0;
  const int64_t n_base = static_cast<int64_t>(blockIdx.x) * kVecTile;
  const int quad = threadIdx.x % 16;  // columns n_base + 4 quad .. + 3
  const int row0 = threadIdx.x / 16;  // rows row0, row0 + 16, ...
  char* out_bytes = static_cast<char*>(out);
  for (int64_t m_base = static_cast<int64_t>(blockIdx.y) * kVecTile; m_base < M;
       m_base += static_cast<int64_t>(gridDim.y) * kVecTile) {
    for (int r = row0; r < kVecTile; r += 16) {
      const int64_t m = m_base + r, n = n_base + 4 * quad;
      if (m >= M || n >= N) continue;  // N % 4 == 0: the 4 columns are all in or all out
      const int4 a = *reinterpret_cast<const int4*>(acc + m * N + n);
      const int32_t v[4] = {a.x, a.y, a.z, a.w};
      if (seq_last) {
#pragma unroll
        for (int j = 0; j < 4; ++j) convert_as<T>(ep, &tile[4 * quad + j][r * esize], v[j]);
      } else {
        __align__(16) char packed[16];
#pragma unroll
        for (int j = 0; j < 4; ++j) convert_as<T>(ep, packed + j * esize, v[j]);
        char* dst = out_bytes + (m * N + n) * esize;
        if constexpr (esize == 1) {
          *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(packed);
        } else if constexpr (esize == 2) {
          *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(packed);
        } else {
          *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(packed);
        }
      }
    }
    if (!seq_last) continue;
    __syncthreads();
    // Row nn of the tile holds 64 consecutive m (= l) of column n: 64 * esize bytes.
    constexpr int runs_per_row = kVecTile * esize / 16;
    constexpr int per_run = 16 / esize;
    for (int i = threadIdx.x; i < kVecTile * runs_per_row; i += blockDim.x) {
      const int nn = i / runs_per_row, run = i % runs_per_row;
      const int64_t n = n_base + nn, m = m_base + run * per_run;
      if (n < N && m < M) {  // M % 16 == 0: the run is all in
        const int64_t b = divide_small(m, ep.seq_len);
        const int64_t index = (b * N + n) * ep.seq_len + (m - b * ep.seq_len);
        *reinterpret_cast<uint4*>(out_bytes + index * esize) =
            *reinterpret_cast<const uint4*>(&tile[nn][run * 16]);
      }
    }
    __syncthreads();  // the tile is reused by the next row block
  }
}

template <int kTiles>
cudaError_t launch_skinny(dim3 grid, const int8_t* x, const int8_t* w, void* out, int64_t M,
                          int64_t N, int64_t K, const EpilogueConsts& c, int device,
                          cudaStream_t stream) {
  constexpr int kBytes = skinny_smem_bytes<kTiles>();
  static std::atomic<unsigned long long> opted_in{0};
  const cudaError_t err =
      opt_in_shared_memory(int8_mma_skinny_kernel<kTiles>, kBytes, device, opted_in);
  if (err != cudaSuccess) return err;
  launch::launch_kernel(int8_mma_skinny_kernel<kTiles>, grid, kSkinnyWarps * 32, kBytes, stream, x,
                        w, out, M, N, K, c);
  return cudaGetLastError();
}

}  // namespace

bool wgmma_gemm_built() {
#ifdef QUAMBA_HAVE_WGMMA_GEMM
  return true;
#else
  return false;
#endif
}

cudaError_t launch_int8_gemm(const int8_t* x, const int8_t* w, void* out, int64_t M, int64_t N,
                             int64_t K, const GemmEpilogue& ep, GemmAlgo algo, bool constant_w,
                             cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const EpilogueConsts c = make_consts(ep);
  const bool vec = K % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(w) % 16 == 0;
  int device = 0, major = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (algo == GemmAlgo::Wgmma) {
    int minor = 0;
    err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (err != cudaSuccess) return err;
    if (!wgmma_gemm_built() || !vec || major != 9 || minor != 0) return cudaErrorNotSupported;
#ifdef QUAMBA_HAVE_WGMMA_GEMM
    return gemm::launch_int8_gemm_wgmma(x, w, out, M, N, K, c, device, stream);
#endif
  }
  if (algo == GemmAlgo::ShortK && K > kShortKMax) return cudaErrorInvalidValue;
  if (vec && major >= 8) {  // mma.sync with s8 operands: Ampere and newer
    if (algo == GemmAlgo::Auto) {
      algo = M <= 4 ? GemmAlgo::Stream : (M <= 16 ? GemmAlgo::Skinny : GemmAlgo::Tiled);
    }
    if (algo == GemmAlgo::Stream) {
      if (M > 4) return cudaErrorInvalidValue;  // checked by the caller
      if (M == 1) return launch_gemv_stream<1>(x, w, out, M, N, K, c, sms, constant_w, stream);
      if (M == 2) return launch_gemv_stream<2>(x, w, out, M, N, K, c, sms, constant_w, stream);
      return launch_gemv_stream<4>(x, w, out, M, N, K, c, sms, constant_w, stream);
    }
    if (algo == GemmAlgo::ShortK) {
      return gemm::launch_int8_gemm_short_k(x, w, out, M, N, K, c, device, sms, stream);
    }
    if (algo == GemmAlgo::Tiled) {
      const int64_t col_tiles = (N + kTileN - 1) / kTileN;
      const int64_t row_tiles = (M + kTileM - 1) / kTileM;
      if (row_tiles > 65535 || col_tiles > 2147483647LL) return cudaErrorInvalidValue;
      const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
      static std::atomic<unsigned long long> opted_in{0};
      err = opt_in_shared_memory(int8_gemm_tiled_kernel, kTileSmemBytes, device, opted_in);
      if (err != cudaSuccess) return err;
      launch::launch_kernel(int8_gemm_tiled_kernel, grid, kTileThreads, kTileSmemBytes, stream, x,
                            w, out, M, N, K, c);
      return cudaGetLastError();
    }
    // Column tiles per block: as many (4, 2, 1) as leave at least one block per two SMs. Measured
    // (H100, M = 16): out_proj (N = 2560) 9.0 us with 4 tiles (80 blocks) against 12.3 with 1;
    // x_proj (N = 192) 3.4 us with 1 tile (24 blocks) against 6.0 with 4.
    // Capped by the shared memory a block may opt in to: four tiles need 112 KB, past the 99 KB
    // of sm_86 / sm_89 (A100 and H100 allow 163 / 227 KB).
    const int64_t min_blocks = (sms + 1) / 2;
    int tiles = N >= min_blocks * 32 ? 4 : (N >= min_blocks * 16 ? 2 : 1);
    int smem_optin = 0;
    err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    if (tiles == 4 && skinny_smem_bytes<4>() > smem_optin) tiles = 2;  // 2 always fit (above)
    const int64_t col_blocks = (N + 8 * tiles - 1) / (8 * tiles);
    const int64_t row_blocks = (M + 15) / 16;
    if (col_blocks > 2147483647LL) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(col_blocks),
                    static_cast<unsigned>(row_blocks < 65535 ? row_blocks : 65535));
    if (tiles == 4) return launch_skinny<4>(grid, x, w, out, M, N, K, c, device, stream);
    if (tiles == 2) return launch_skinny<2>(grid, x, w, out, M, N, K, c, device, stream);
    return launch_skinny<1>(grid, x, w, out, M, N, K, c, device, stream);
  }
  if (M <= 1) return launch_gemv_bytes<1>(x, w, out, M, N, K, c, stream);
  if (M <= 4) return launch_gemv_bytes<4>(x, w, out, M, N, K, c, stream);
  return launch_gemv_bytes<16>(x, w, out, M, N, K, c, stream);
}

cudaError_t launch_int32_epilogue(const int32_t* acc, void* out, int64_t M, int64_t N,
                                  const GemmEpilogue& ep, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const int64_t col_tiles = (N + kTile - 1) / kTile;
  const int64_t row_tiles = (M + kTile - 1) / kTile;
  if (col_tiles > 2147483647LL) return cudaErrorInvalidValue;
  const bool aligned = reinterpret_cast<uintptr_t>(acc) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (aligned && N % 4 == 0 && (ep.seq_len <= 0 || ep.seq_len % 16 == 0)) {
    const int64_t vec_col_tiles = (N + kVecTile - 1) / kVecTile;
    const int64_t vec_row_tiles = (M + kVecTile - 1) / kVecTile;
    const dim3 grid(static_cast<unsigned>(vec_col_tiles),
                    static_cast<unsigned>(vec_row_tiles < 65535 ? vec_row_tiles : 65535));
    const EpilogueConsts c = make_consts(ep);
    switch (c.type) {
      case GemmOut::Int32:
        launch::launch_kernel(int32_epilogue_vec_kernel<GemmOut::Int32>, grid, 256, 0, stream,
                              acc, out, M, N, c);
        break;
      case GemmOut::Int8:
        launch::launch_kernel(int32_epilogue_vec_kernel<GemmOut::Int8>, grid, 256, 0, stream,
                              acc, out, M, N, c);
        break;
      case GemmOut::Float16:
        launch::launch_kernel(int32_epilogue_vec_kernel<GemmOut::Float16>, grid, 256, 0, stream,
                              acc, out, M, N, c);
        break;
      case GemmOut::BFloat16:
        launch::launch_kernel(int32_epilogue_vec_kernel<GemmOut::BFloat16>, grid, 256, 0,
                              stream, acc, out, M, N, c);
        break;
      default:
        launch::launch_kernel(int32_epilogue_vec_kernel<GemmOut::Float32>, grid, 256, 0, stream,
                              acc, out, M, N, c);
        break;
    }
    return cudaGetLastError();
  }
  const dim3 grid(static_cast<unsigned>(col_tiles),
                  static_cast<unsigned>(row_tiles < 65535 ? row_tiles : 65535));
  launch::launch_kernel(int32_epilogue_kernel, grid, 256, 0, stream, acc, out, M, N,
                        make_consts(ep));
  return cudaGetLastError();
}

}  // namespace quamba
