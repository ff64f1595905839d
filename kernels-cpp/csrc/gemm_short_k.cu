// INT8 x INT8 -> INT32 GEMM for short K (K <= 256, K % 16 == 0; sm_80+): Mamba's dt_proj, whose
// K is dt_rank (48 / 128 / 160 for 130m / 1.4b / 2.8B) and whose output (an INT8 code per token and
// channel, 84 MB at 2.8B batch 16 x 1024) is the work, not the arithmetic.
//
// The 128 x 128 kernels (tiled, wgmma) spend such a product in their epilogue: every tile stages
// 64 KB of raw int32 accumulators through shared memory behind a block barrier, then converts them
// with a 64-bit index computation per 16-byte piece; ncu (H100, dt_proj at M = 16384) measured
// 13.1 K warp instructions per tile at 1.9 instructions per cycle. Here the operands are swapped
// so that a warp's accumulator rows are output channels and its columns consecutive tokens (the
// sequence-last output's contiguous axis):
//   * a block owns 128 channels (16 per warp; the warp keeps that slice of w, all of K, in
//     registers) and walks a contiguous range of 128-token tiles (persistent, one range per block);
//     the next tile's x (128 tokens x K, zero-filled to whole 64-byte k chunks) is copied into
//     shared memory with cp.async while the current one is multiplied and written;
//   * per 64-byte k chunk and 8 tokens, two mma.sync m16n8k32 (mma_chunk64);
//   * each warp converts its own accumulators in registers (INT8: every code from one product
//     with the combined factor, then the exact conversion of the rare pairs near a rounding
//     boundary, the rule of write_accumulator_tile_as), stages the converted values in its own
//     shared-memory rows (no block barrier) and writes them as 16-byte pieces: a channel's tokens
//     are contiguous bytes of the sequence-last output. The row-major layout stages per token.
// Measured (H100, tools/bench/bench_gemm.py --dt-proj; 2.8B dt_proj, N = 5120, K = 160,
// sequence-last INT8): 121 us against the wgmma kernel's 128-130 at M = 16 x 1024, 20.3 against
// 22 at M = 2048 (bench_gemm's default scales, whose exact ties send whole 16-byte pieces of the
// wgmma epilogue to the exact conversion: 129 against 145); slower with odd L (80-81 against
// 71-72 at 64 x 90, 130m's K = 48: element-wise stores either way), where "auto" keeps the
// 128 x 128 kernels.
// What bounds it (ncu): about 10 instructions per INT8 code and 16 warps per SM (128 registers:
// w's slice and 32 accumulators per lane), 2.4 instructions per cycle. Sub-tiles of 32 tokens at
// three blocks per SM (80 registers) measured slower (137 against 121 us).
// Accumulation is exact int32, so the results equal reference_ops.w8a8_linear bit for bit.
#include "gemm_epilogue.cuh"
#include "gemm_int8.h"
#include "mma_s8.cuh"

namespace quamba {
namespace {

using namespace gemm;

constexpr int kShortWarps = 8;
constexpr int kShortThreads = kShortWarps * 32;
constexpr int kChannelsPerBlock = 16 * kShortWarps;  // output channels (w rows) per block
constexpr int kTokensPerTile = 128;                  // x rows per tile
constexpr int kChunk = 64;                           // k bytes per mma_chunk64
constexpr int kMaxChunks = kShortKMax / kChunk;
constexpr int kChunkBytes = kTokensPerTile * kChunk;  // one k chunk of an x tile in shared memory

// A warp multiplies and writes its 16 x 128 tile in halves of 64 tokens (64 accumulators per lane
// held at once would spill next to w's slice), and converts each half in rounds of
// kRoundTokens<T> tokens through its own staging rows: sequence-last, 16 channel rows of
// kRoundTokens tokens; row-major, kRoundTokens token rows of 16 channels. A round is at most 2 KB
// of output, so the staging fits the 99 KB of shared memory per block of sm_86 / sm_89 next to the
// x tiles. Rows are padded by 16 bytes (conflict-free pair stores in the sequence-last layout;
// 16-byte aligned rows in both).
constexpr int kHalfTokens = kTokensPerTile / 2;
template <GemmOut T>
constexpr int kRoundTokens = out_elem_size(T) == 4 ? kHalfTokens / 2 : kHalfTokens;
template <GemmOut T, bool kSeqLast>
constexpr int staging_pitch() {
  return (kSeqLast ? kRoundTokens<T> : 16) * out_elem_size(T) + 16;
}
template <GemmOut T, bool kSeqLast>
constexpr int staging_bytes() {
  return (kSeqLast ? 16 : kRoundTokens<T>) * staging_pitch<T, kSeqLast>();
}
template <GemmOut T, bool kSeqLast>
constexpr int short_k_smem_bytes(int chunks) {
  return 2 * chunks * kChunkBytes + kShortWarps * staging_bytes<T, kSeqLast>();
}
static_assert(2 * kMaxChunks * kChunkBytes + kShortWarps * 4096 <= 99 * 1024,
              "the largest configuration must fit sm_86's shared memory per block");

// The two codes of consecutive tokens (low byte first) into the staging rows of this lane's
// channel row `row`: adjacent bytes (sequence-last) or one byte in each of two token rows.
template <bool kSeqLast, int kPitch>
__device__ __forceinline__ void stage_int8_pair(int8_t* staging, int row, int col, uint32_t pair) {
  if constexpr (kSeqLast) {
    *reinterpret_cast<uint16_t*>(staging + row * kPitch + col) = static_cast<uint16_t>(pair);
  } else {
    staging[col * kPitch + row] = static_cast<int8_t>(pair & 0xFFu);
    staging[(col + 1) * kPitch + row] = static_cast<int8_t>((pair >> 8) & 0xFFu);
  }
}

template <GemmOut T, bool kSeqLast>
__global__ void __launch_bounds__(kShortThreads, 2)
    int8_gemm_short_k_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ w,
                             void* __restrict__ out, int64_t M, int64_t N, int K, int chunks,
                             EpilogueConsts ep) {
  constexpr int kSize = out_elem_size(T);
  constexpr int kPer = 16 / kSize;  // elements per 16-byte piece
  constexpr int kPitch = staging_pitch<T, kSeqLast>();
  launch::start_after_prior_grids();  // first: see launch.cuh
  extern __shared__ int4 smem_words[];
  int8_t* smem = reinterpret_cast<int8_t*>(smem_words);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int x_tile_bytes = chunks * kChunkBytes;
  int8_t* staging = smem + 2 * x_tile_bytes + warp * staging_bytes<T, kSeqLast>();
  const bool fast = ep.fast_factor;  // INT8: codes from the combined factor allowed

  // This block's tiles: a contiguous share of (channel tile, token tile) pairs, token tiles
  // varying fastest, so that a block mostly keeps its slice of w.
  const int64_t token_tiles = (M + kTokensPerTile - 1) / kTokensPerTile;
  const int64_t channel_tiles = (N + kChannelsPerBlock - 1) / kChannelsPerBlock;
  const int64_t tiles = token_tiles * channel_tiles;
  const int64_t first = tiles * blockIdx.x / gridDim.x;
  const int64_t last = tiles * (blockIdx.x + 1) / gridDim.x;

  // x rows m0 .. m0 + 127 into buffer `buffer`: 16-byte pieces, chunk-major ([chunk][token][64]),
  // zero-filled beyond M and K.
  // Piece p = 256 i + tid is segment p % 4 of row p / 4 % 128 of chunk p / 512 (at
  // buffer + 16 p): segment tid % 4, row tid / 4 + 64 (i % 2), chunk i / 2.
  static_assert(kTokensPerTile == 128 && kChunk == 64 && kShortThreads == 256, "piece numbering");
  auto load_x_tile = [&](int64_t tile, int buffer) {
    const int64_t m0 = (tile % token_tiles) * kTokensPerTile;
    const int8_t* x_rows = x + m0 * K;
    const int64_t rows_left = M - m0;
    int8_t* base = smem + buffer * x_tile_bytes;
#pragma unroll
    for (int i = 0; i < 2 * kMaxChunks; ++i) {
      if (i < 2 * chunks) {
        const int row = tid / 4 + 64 * (i % 2), k = (i / 2) * kChunk + (tid % 4) * 16;
        const bool valid = row < rows_left && k < K;
        cp_async16(base + (i * kShortThreads + tid) * 16, valid ? x_rows + row * K + k : x, valid);
      }
    }
  };

  if (first < last) load_x_tile(first, 0);
  cp_async_commit();

  int4 w_lo[kMaxChunks], w_hi[kMaxChunks];  // w rows g and g + 8 of this warp's 16
  int64_t held_channel_tile = -1;
  int buffer = 0;
  for (int64_t tile = first; tile < last; ++tile, buffer ^= 1) {
    const int64_t channel_tile = tile / token_tiles;
    const int64_t n0 = channel_tile * kChannelsPerBlock + warp * 16;
    const int64_t m0 = (tile % token_tiles) * kTokensPerTile;
    if (channel_tile != held_channel_tile) {
      held_channel_tile = channel_tile;
#pragma unroll
      for (int c = 0; c < kMaxChunks; ++c) {
        const int k = c * kChunk + t * 16;
        const bool k_in = c < chunks && k < K;
        w_lo[c] = k_in && n0 + g < N ? *reinterpret_cast<const int4*>(w + (n0 + g) * K + k)
                                     : make_int4(0, 0, 0, 0);
        w_hi[c] = k_in && n0 + g + 8 < N
                      ? *reinterpret_cast<const int4*>(w + (n0 + g + 8) * K + k)
                      : make_int4(0, 0, 0, 0);
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // this tile's x is visible; every warp is done with the other buffer
    if (tile + 1 < last) load_x_tile(tile + 1, buffer ^ 1);
    cp_async_commit();

    const int8_t* x_tile = smem + buffer * x_tile_bytes;
    int8_t* out_bytes = static_cast<int8_t*>(out);
#pragma unroll 1
    for (int half = 0; half < 2; ++half) {
      // acc[j]: channels g, g + 8 (rows) x tokens 64 half + 8 j + 2 t, + 1 (columns).
      int acc[kHalfTokens / 8][4];
#pragma unroll
      for (int j = 0; j < kHalfTokens / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0;
#pragma unroll
      for (int c = 0; c < kMaxChunks; ++c) {
        if (c < chunks) {
#pragma unroll
          for (int j = 0; j < kHalfTokens / 8; ++j) {
            const int token = half * kHalfTokens + 8 * j + g;
            const int4 xv = *reinterpret_cast<const int4*>(x_tile + c * kChunkBytes +
                                                           token * kChunk + t * 16);
            mma_chunk64(acc[j], w_lo[c], w_hi[c], xv);
          }
        }
      }
      // Convert into this warp's staging rows, then write 16-byte pieces; round by round.
      constexpr int kRound = kRoundTokens<T>;
      constexpr int kPieces = kRound * kSize;  // 16-byte pieces per round
#pragma unroll
      for (int round = 0; round < kHalfTokens / kRound; ++round) {
        if constexpr (T == GemmOut::Int8) {
          // Every code from the combined factor first, without a branch (a branch per pair cut
          // the epilogue into blocks too short to overlap their latencies); then, rarely, the
          // exact conversion of the pairs with a code near a rounding boundary.
          uint32_t redo = 0;  // bit 2 jj + h: pair h (channel g + 8 h) of column group jj
#pragma unroll
          for (int jj = 0; jj < kRound / 8; ++jj) {
            const int j = round * (kRound / 8) + jj;
            const int col = 8 * jj + 2 * t;  // within the round
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              bool clear = true;
              const uint32_t c0 = q8_code_by_factor(ep.out_factor, acc[j][2 * h], clear);
              const uint32_t c1 = q8_code_by_factor(ep.out_factor, acc[j][2 * h + 1], clear);
              redo |= (clear ? 0u : 1u) << (2 * jj + h);
              const uint32_t pair = __byte_perm(c0, c1, 0x0040);
              stage_int8_pair<kSeqLast, kPitch>(staging, g + 8 * h, col, pair);
            }
          }
          if (!fast) redo = ~0u;
          if (redo != 0) {
#pragma unroll
            for (int jj = 0; jj < kRound / 8; ++jj) {
              const int j = round * (kRound / 8) + jj;
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                if (redo & (1u << (2 * jj + h))) {
                  stage_int8_pair<kSeqLast, kPitch>(
                      staging, g + 8 * h, 8 * jj + 2 * t,
                      exact_int8_code(ep, acc[j][2 * h]) |
                          (exact_int8_code(ep, acc[j][2 * h + 1]) << 8));
                }
              }
            }
          }
        } else {
#pragma unroll
          for (int jj = 0; jj < kRound / 8; ++jj) {
            const int j = round * (kRound / 8) + jj;
            const int col = 8 * jj + 2 * t;  // within the round
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int row = g + 8 * h;
              if constexpr (kSeqLast) {
                convert_as<T>(ep, staging + row * kPitch + col * kSize, acc[j][2 * h]);
                convert_as<T>(ep, staging + row * kPitch + (col + 1) * kSize, acc[j][2 * h + 1]);
              } else {
                convert_as<T>(ep, staging + col * kPitch + row * kSize, acc[j][2 * h]);
                convert_as<T>(ep, staging + (col + 1) * kPitch + row * kSize, acc[j][2 * h + 1]);
              }
            }
          }
        }
        __syncwarp();
        const int64_t m_round = m0 + half * kHalfTokens + round * kRound;
        if constexpr (kSeqLast) {
          // Row r (channel n0 + r) holds tokens m_round .. + kRound - 1, in pieces of kPer.
          constexpr int kPiecesPerRow = kRound / kPer;
          const int64_t L = ep.seq_len;
          const int64_t b0 = divide_small(m_round, L), l0 = m_round - b0 * L;
          const int64_t first = (b0 * N + n0) * L + l0;
          if (l0 + kRound <= L && m_round + kRound <= M && (first * kSize) % 16 == 0 &&
              (L * kSize) % 16 == 0) {
            // The round lies in one sequence: row r starts L elements after row r - 1.
            int8_t* base = out_bytes + first * kSize;
#pragma unroll
            for (int p = lane; p < kPieces; p += 32) {
              const int r = p / kPiecesPerRow, col = (p % kPiecesPerRow) * kPer;
              if (n0 + r < N) {
                store_piece(base + (r * L + col) * kSize, staging + r * kPitch + col * kSize);
              }
            }
          } else {
            // A sequence boundary, the end of M or unaligned rows (odd L): element-wise stores,
            // (b, l) stepped from one division per piece.
            for (int p = lane; p < kPieces; p += 32) {
              const int r = p / kPiecesPerRow, col = (p % kPiecesPerRow) * kPer;
              const int64_t n = n0 + r;
              int64_t m = m_round + col;
              if (n >= N || m >= M) continue;
              int64_t b = divide_small(m, L), l = m - b * L;
              for (int e = 0; e < kPer && m < M; ++e, ++m) {
                store_element<kSize>(out_bytes + ((b * N + n) * L + l) * kSize,
                                    staging + r * kPitch + (col + e) * kSize);
                if (++l == L) {
                  l = 0;
                  ++b;
                }
              }
            }
          }
        } else {
          // Row r (token m_round + r) holds channels n0 .. n0 + 15: kSize pieces of kPer.
          const int64_t first = m_round * N + n0;
          if (m_round + kRound <= M && n0 + 16 <= N && (first * kSize) % 16 == 0 &&
              (N * kSize) % 16 == 0) {
            int8_t* base = out_bytes + first * kSize;
#pragma unroll
            for (int p = lane; p < kPieces; p += 32) {
              const int r = p / kSize, col = (p % kSize) * kPer;
              store_piece(base + (r * N + col) * kSize, staging + r * kPitch + col * kSize);
            }
          } else {
            for (int p = lane; p < kPieces; p += 32) {
              const int r = p / kSize, col = (p % kSize) * kPer;
              const int64_t m = m_round + r, n = n0 + col;
              if (m >= M || n >= N) continue;
              for (int e = 0; e < kPer && n + e < N; ++e) {
                store_element<kSize>(out_bytes + (m * N + n + e) * kSize,
                                    staging + r * kPitch + (col + e) * kSize);
              }
            }
          }
        }
        __syncwarp();  // the staging rows are rewritten by the next round
      }
    }
  }
  cp_async_wait<0>();
}

template <GemmOut T, bool kSeqLast>
cudaError_t launch_short_k_as(const int8_t* x, const int8_t* w, void* out, int64_t M, int64_t N,
                              int K, const EpilogueConsts& ep, int device, int sms,
                              cudaStream_t stream) {
  const int chunks = (K + kChunk - 1) / kChunk;
  const int bytes = short_k_smem_bytes<T, kSeqLast>(chunks);
  static std::atomic<unsigned long long> opted_in{0};
  // Opt in to the largest size once (every chunk count then fits).
  cudaError_t err = opt_in_shared_memory(int8_gemm_short_k_kernel<T, kSeqLast>,
                                         short_k_smem_bytes<T, kSeqLast>(kMaxChunks), device,
                                         opted_in);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, int8_gemm_short_k_kernel<T, kSeqLast>, kShortThreads, bytes);
  if (err != cudaSuccess) return err;
  const int64_t tiles = ((M + kTokensPerTile - 1) / kTokensPerTile) *
                        ((N + kChannelsPerBlock - 1) / kChannelsPerBlock);
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  const unsigned grid = static_cast<unsigned>(tiles < resident ? tiles : resident);
  launch::launch_kernel(int8_gemm_short_k_kernel<T, kSeqLast>, grid, kShortThreads, bytes, stream,
                        x, w, out, M, N, K, chunks, ep);
  return cudaGetLastError();
}

template <bool kSeqLast>
cudaError_t launch_short_k_in(const int8_t* x, const int8_t* w, void* out, int64_t M, int64_t N,
                              int K, const EpilogueConsts& ep, int device, int sms,
                              cudaStream_t stream) {
#define QUAMBA_SHORT_K(T) \
  launch_short_k_as<GemmOut::T, kSeqLast>(x, w, out, M, N, K, ep, device, sms, stream)
  switch (ep.type) {
    case GemmOut::Int32: return QUAMBA_SHORT_K(Int32);
    case GemmOut::Int8: return QUAMBA_SHORT_K(Int8);
    case GemmOut::Float16: return QUAMBA_SHORT_K(Float16);
    case GemmOut::BFloat16: return QUAMBA_SHORT_K(BFloat16);
    default: return QUAMBA_SHORT_K(Float32);
  }
#undef QUAMBA_SHORT_K
}

}  // namespace

cudaError_t gemm::launch_int8_gemm_short_k(const int8_t* x, const int8_t* w, void* out, int64_t M,
                                           int64_t N, int64_t K, const EpilogueConsts& ep,
                                           int device, int sms, cudaStream_t stream) {
  if (K < 1 || K > kShortKMax || K % 16 != 0) return cudaErrorInvalidValue;
  const int k = static_cast<int>(K);
  return ep.seq_len > 0 ? launch_short_k_in<true>(x, w, out, M, N, k, ep, device, sms, stream)
                        : launch_short_k_in<false>(x, w, out, M, N, k, ep, device, sms, stream);
}

}  // namespace quamba
