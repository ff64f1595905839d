// INT8 x INT8 -> INT32 GEMMs for Hopper (sm_90a): TMA loads, wgmma, the exact W8A8 epilogue fused.
//
// On the H100, cuBLASLt's INT8 GEMM runs an sm80 (mma.sync) kernel that is no faster than cuBLAS
// FP16 (benchmarks/README.md); Hopper's INT8 throughput (twice FP16's) needs the asynchronous
// warpgroup MMA, which only sm_90a code can issue. This file is compiled for sm_90a alone
// (kernels-cpp/CMakeLists.txt) and used only on devices of compute capability 9.0. Two kernels;
// launch_int8_gemm_wgmma picks one by shape (use_wide_codes_by_tma, use_wide_kernel):
//
// The 128 x 128 kernel. One block = one output tile of 128 rows (m) x 128 columns (n), 2
// warpgroups and a warp:
//   * warpgroups 0 and 1: the consumers, 64 rows each. Per K tile, four wgmma m64 x n128 x k32
//     (s8 x s8 -> s32) read both operands from shared memory; a stage is handed back to the
//     producer once the wgmma that read it have completed;
//   * warp 8, one thread: the producer. It streams K in tiles of 128 bytes through a
//     kStages-deep ring of shared-memory stages with TMA (x rows and w rows, 128-byte swizzle;
//     rows and k beyond the tensors are filled with zeros by TMA, so any M, N and K % 16 == 0
//     work).
// Two blocks run per SM (3 stages each), so that one block's epilogue overlaps the other's wgmma.
// Blocks take their tiles in bands of kBandTiles row tiles, column by column within a band: the
// band's x rows stay in L2 while w streams past once per band. The epilogue stages the raw
// accumulators in the pipeline's shared memory along the output's contiguous axis, then converts
// them (convert_as, the same arithmetic as every other GEMM path) and writes 16-byte pieces
// (write_accumulator_tile).
//
// The persistent wide kernel (128 x 256 tiles, one block per SM; described above its code): less
// shared-memory and L2 traffic per operation, but an epilogue that no MMA overlaps, so for
// row-major INT8 / FP16 outputs it is taken for long K loops only. Sequence-last INT8 outputs
// whose sequences are whole 128-row tiles (in_proj, dt_proj) take it at any K: its variant
// converts their codes in registers and stores them with TMA while the next tile's main loop runs.
//
// Accumulation is exact int32, so the order of the sum does not matter: both kernels' results
// equal reference_ops.w8a8_linear bit for bit.
#include "../gemm_epilogue.cuh"
#include "../tma.cuh"

namespace quamba {
namespace gemm {
namespace {

constexpr int kBlockM = 128;
constexpr int kTileK = 128;  // bytes = int8 elements: one 128-byte swizzle row
constexpr int kConsumerThreads = 256;  // warpgroups 0 and 1 (wgmma needs aligned warpgroups)
constexpr int kThreads = kConsumerThreads + 32;  // + the producer warp
constexpr int kStagedPitch = 128 + 4;  // int32 per staged accumulator row: conflict-free stores

constexpr int kBlockN = 128;
constexpr int kBandTiles = 16;  // row tiles per band (2048 rows of x)
constexpr int kBlocksPerSm = 2;
constexpr int kStages = 3;
constexpr int kBytesA = kBlockM * kTileK;
constexpr int kBytesB = kBlockN * kTileK;
constexpr int kStageBytes = kBytesA + kBytesB;
constexpr int kRingBytes = kStages * kStageBytes;  // 96 KB
constexpr int kSmemBytes = kRingBytes + 1024 /* alignment */ + 2 * kStages * 8;
// The staged accumulator tile (either layout) reuses the ring.
static_assert(kBlockM == kBlockN && kBlockM * kStagedPitch * 4 <= kRingBytes, "tile must fit");

using async::barrier_arrive;
using async::barrier_expect_bytes;
using async::barrier_init;
using async::barrier_wait;
using async::smem_address;

using async::tma_load_2d;

// ---- wgmma ----
// Shared-memory matrix descriptor of a K-major operand in 128-byte swizzle: rows of 128 bytes,
// groups of 8 rows 1024 bytes apart (the stride byte offset); the leading byte offset is unused
// in this mode. Advancing the start address by 32 bytes selects the next k32 slice.
__device__ __forceinline__ uint64_t operand_descriptor(const void* p) {
  const uint64_t address = smem_address(p);
  return ((address & 0x3FFFF) >> 4) | (uint64_t{16 >> 4} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accesses of the accumulators across the asynchronous wgmma.
template <int R>
__device__ __forceinline__ void fence_registers(int (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// clang-format off
__device__ __forceinline__ void wgmma_m64n128k32_s8(int (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                     int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_m64n256k32_s8(int (&d)[128], uint64_t desc_a, uint64_t desc_b,
                                                     int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
        "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
        "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
        "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
        "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
        "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
        "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
        "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]),
        "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]),
        "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]),
        "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]),
        "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]),
        "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]),
        "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]),
        "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]),
        "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
// clang-format on

// The consumer warpgroup's raw accumulators into the shared tile, rows of kStagedPitch int32 along
// the output's contiguous axis. Accumulator 4 j + r of lane (g = lane / 4, t = lane % 4) of warp
// w is tile row row0 + 8 (r >= 2) and column 8 j + 2 t + (r & 1), with row0 = 64 (consumer) +
// 16 w + g (the wgmma D fragment layout). The 4-int32 row padding keeps the stores conflict-free.
template <bool kSeqLast>
__device__ __forceinline__ void stage_accumulators(int32_t* staged, const int (&d)[kBlockN / 2],
                                                   int row0, int col0) {
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = row0 + (r >= 2 ? 8 : 0);
      const int col = col0 + 8 * j + (r & 1);
      staged[kSeqLast ? col * kStagedPitch + row : row * kStagedPitch + col] = d[4 * j + r];
    }
  }
}

__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    int8_gemm_wgmma_kernel(const __grid_constant__ CUtensorMap x_map,
                           const __grid_constant__ CUtensorMap w_map, void* __restrict__ out,
                           int64_t M, int64_t N, int64_t K, EpilogueConsts ep) {
  extern __shared__ uint8_t smem_raw[];
  // 128-byte swizzled TMA boxes and wgmma operands need 1024-byte aligned stages.
  // (An offset from smem_raw, so that the compiler still knows the ring is shared memory and
  // stages and reads the accumulators with STS / LDS rather than generic stores and loads.)
  int8_t* ring =
      reinterpret_cast<int8_t*>(smem_raw + ((1024 - smem_address(smem_raw) % 1024) % 1024));
  uint64_t* full = reinterpret_cast<uint64_t*>(ring + kRingBytes);
  uint64_t* empty = full + kStages;
  // This block's tile: bands of kBandTiles row tiles, row tiles varying fastest within a band.
  const int row_tiles = static_cast<int>((M + kBlockM - 1) / kBlockM);
  const int col_tiles = static_cast<int>((N + kBlockN - 1) / kBlockN);
  const int band_size = kBandTiles * col_tiles;
  const int band = static_cast<int>(blockIdx.x) / band_size;
  const int in_band = static_cast<int>(blockIdx.x) % band_size;
  const int band_rows = min(kBandTiles, row_tiles - band * kBandTiles);
  const int64_t m_block = static_cast<int64_t>(band * kBandTiles + in_band % band_rows) * kBlockM;
  const int64_t n_block = static_cast<int64_t>(in_band / band_rows) * kBlockN;
  const int k_tiles = static_cast<int>((K + kTileK - 1) / kTileK);

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      barrier_init(&full[s], 1);   // the producer's expect_tx; TMA completes the bytes
      barrier_init(&empty[s], 2);  // one arrival per consumer warpgroup
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  launch::start_after_prior_grids();  // before the first global access: see launch.cuh

  if (threadIdx.x >= kConsumerThreads) {
    if (threadIdx.x == kConsumerThreads) {
      for (int kt = 0; kt < k_tiles; ++kt) {
        const int s = kt % kStages;
        if (kt >= kStages) barrier_wait(&empty[s], ((kt / kStages) & 1) ^ 1);
        int8_t* stage = ring + s * kStageBytes;
        barrier_expect_bytes(&full[s], kStageBytes);
        tma_load_2d(stage, &x_map, kt * kTileK, static_cast<int>(m_block), &full[s]);
        tma_load_2d(stage + kBytesA, &w_map, kt * kTileK, static_cast<int>(n_block), &full[s]);
      }
    }
    return;  // the epilogue below synchronises the consumers only (named barrier 1)
  }

  const int consumer = threadIdx.x / 128;
  int d[kBlockN / 2];
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) d[i] = 0;
  for (int kt = 0; kt < k_tiles; ++kt) {
    const int s = kt % kStages;
    barrier_wait(&full[s], (kt / kStages) & 1);
    const int8_t* a = ring + s * kStageBytes + consumer * 64 * kTileK;
    const int8_t* b = ring + s * kStageBytes + kBytesA;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kTileK / 32; ++kk) {
      wgmma_m64n128k32_s8(d, operand_descriptor(a + 32 * kk), operand_descriptor(b + 32 * kk), 1);
    }
    wgmma_commit();
    // Keep this tile's wgmma in flight and hand back the stage the previous tile's have read.
    wgmma_wait<1>();
    fence_registers(d);
    if (kt > 0 && threadIdx.x % 128 == 0) barrier_arrive(&empty[(kt - 1) % kStages]);
  }
  wgmma_wait<0>();
  fence_registers(d);

  // Every stage has been consumed by both warpgroups: the ring becomes the output tile.
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory");
  const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int row0 = consumer * 64 + warp * 16 + lane / 4, col0 = 2 * (lane % 4);
  int32_t* staged = reinterpret_cast<int32_t*>(ring);
  if (ep.seq_len > 0) {
    stage_accumulators<true>(staged, d, row0, col0);
  } else {
    stage_accumulators<false>(staged, d, row0, col0);
  }
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory");
  write_accumulator_tile<kBlockM, kBlockN, kStagedPitch>(ep, staged, out, m_block, n_block, M, N,
                                                         threadIdx.x, kConsumerThreads);
}

// ---- The persistent wide-tile kernel ----
// One block per SM, each taking output tiles of 128 x 256 in turn (grid = SMs). Two consumer
// warpgroups issue wgmma m64 x n256 x k32, 64 rows each: per operation they read 20% less shared
// memory than two n128 products, which with the TMA writes into the ring is what bounded the
// 128 x 128 kernel (~160 B of shared-memory traffic per cycle at the INT8 rate; the pipe gives
// 128). The producer runs ahead across tiles through a 4-stage ring, so the next tile's K tiles
// arrive while the consumers convert the last one's accumulators. The epilogue cannot reuse the
// ring (it is being refilled): each consumer warp converts its 16 x 256 accumulators in 8 rounds of
// 16 x 32 through its own small staging area (write_accumulator_tile_as), with no block barrier: a
// round writes 32 contiguous outputs per row (whole 32-byte sectors). Row-major outputs (see
// use_wide_kernel), and the kCodesByTma variant below for sequence-last INT8. Tried and not kept:
// the sequence-last layout with the operands swapped (rows w's, columns x's, so that a warp's
// rows are the output's strided axis): no faster than the 128 x 128 kernel on Mamba's in_proj
// (session 8, benchmarks/README.md).
constexpr int kWideRows = 128;  // the wgmma M extent of a tile (two warpgroups of 64)
constexpr int kWideCols = 256;  // the wgmma N extent
constexpr int kWideStages = 4;
constexpr int64_t kWideMinK = 2048;  // the wide kernel takes K > kWideMinK (use_wide_kernel)
constexpr int kWideBytesA = kWideRows * kTileK;
constexpr int kWideStageBytes = kWideBytesA + kWideCols * kTileK;  // 48 KB
constexpr int kWideRingBytes = kWideStages * kWideStageBytes;      // 192 KB
constexpr int kWideConsumerWarps = kConsumerThreads / 32;
constexpr int kRoundCols = 32;                    // columns per epilogue round
constexpr int kRoundPitch = kRoundCols + 8;       // 8-byte staging stores: no bank conflicts
constexpr int kWarpStagedInts = 16 * kRoundPitch;
constexpr int kWideStagingBytes = kWideConsumerWarps * kWarpStagedInts * 4;  // 20 KB
constexpr int kWideSmemBytes =
    kWideRingBytes + kWideStagingBytes + 1024 /* alignment */ + 2 * kWideStages * 8;
// The sequence-last INT8 variant (kCodesByTma) stages the tile's codes, [column][row] in 128-byte
// swizzled rows, for one TMA store per tile.
constexpr int kWideCodeBytes = kWideCols * kWideRows;  // 32 KB
constexpr int kWideTmaSmemBytes =
    kWideRingBytes + kWideCodeBytes + 1024 /* alignment */ + 2 * kWideStages * 8;

// ---- TMA stores (the sequence-last INT8 variant of the wide kernel) ----
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, const void* src, int c0,
                                             int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(smem_address(src)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}
// Until the committed stores have read their shared memory.
__device__ __forceinline__ void tma_store_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}
__device__ __forceinline__ void tma_store_wait_all() {
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
// This thread's shared-memory writes, visible to the TMA (async proxy).
__device__ __forceinline__ void fence_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Tile `tile` in the band order of the 128 x 128 kernel: bands of kBandTiles row tiles, row tiles
// varying fastest within a band, so that a band's A rows stay in L2 while B streams past.
__device__ __forceinline__ void band_tile(int tile, int row_tiles, int col_tiles, int64_t& row0,
                                          int64_t& col0) {
  const int band_size = kBandTiles * col_tiles;
  const int band = tile / band_size;
  const int in_band = tile % band_size;
  const int band_rows = min(kBandTiles, row_tiles - band * kBandTiles);
  row0 = static_cast<int64_t>(band * kBandTiles + in_band % band_rows) * kWideRows;
  col0 = static_cast<int64_t>(in_band / band_rows) * kWideCols;
}

// Round kRound of a consumer warp's epilogue: its 16 rows x columns 32 kRound .. 32 kRound + 31
// into its staging area, [row][column]. Accumulator 4 j + r of a lane is row g + 8 (r >= 2),
// column 8 j + 2 t + (r & 1) of the warp's 16 x 256 (the wgmma D fragment layout).
template <int kRound>
__device__ __forceinline__ void stage_round(int32_t* staged, const int (&d)[kWideCols / 2], int g,
                                            int t) {
#pragma unroll
  for (int jj = 0; jj < kRoundCols / 8; ++jj) {
    const int j = kRound * (kRoundCols / 8) + jj;
    const int col = 8 * jj + 2 * t;
    *reinterpret_cast<int2*>(staged + g * kRoundPitch + col) = make_int2(d[4 * j], d[4 * j + 1]);
    *reinterpret_cast<int2*>(staged + (g + 8) * kRoundPitch + col) =
        make_int2(d[4 * j + 2], d[4 * j + 3]);
  }
}

// kCodesByTma (INT8, sequence-last, seq_len % 128 == 0): the consumers convert their accumulators
// to codes in registers (four codes from the combined factor, and those four again, exactly, in
// the rare case one is near a rounding boundary: redoing all of a thread's 128 instead made the
// kernel 1.4x slower), write them into the 32 KB code tile, and one thread stores
// the tile with TMA (out_map: (L, N, B), boxes of 128 positions x 256 channels), which proceeds
// while the next tile's main loop runs. Mamba-2.8B's in_proj at 16 x 1024 tokens: 850 -> 714 us
// against the 128 x 128 kernel (H100, benchmarks/README.md, session 14).
template <GemmOut T, bool kCodesByTma = false>
__global__ void __launch_bounds__(kThreads, 1)
    int8_gemm_wgmma_wide_kernel(const __grid_constant__ CUtensorMap x_map,
                                const __grid_constant__ CUtensorMap w_map, void* __restrict__ out,
                                int64_t M, int64_t N, int64_t K, EpilogueConsts ep,
                                const __grid_constant__ CUtensorMap out_map) {
  extern __shared__ uint8_t smem_raw[];
  int8_t* ring =
      reinterpret_cast<int8_t*>(smem_raw + ((1024 - smem_address(smem_raw) % 1024) % 1024));
  int32_t* staging = reinterpret_cast<int32_t*>(ring + kWideRingBytes);
  int8_t* codes = ring + kWideRingBytes;  // kCodesByTma: the code tile (1024-byte aligned)
  uint64_t* full = reinterpret_cast<uint64_t*>(
      ring + kWideRingBytes + (kCodesByTma ? kWideCodeBytes : kWideStagingBytes));
  uint64_t* empty = full + kWideStages;
  const int row_tiles = static_cast<int>((M + kWideRows - 1) / kWideRows);
  const int col_tiles = static_cast<int>((N + kWideCols - 1) / kWideCols);
  const int tiles = row_tiles * col_tiles;
  const int k_tiles = static_cast<int>((K + kTileK - 1) / kTileK);

  if (threadIdx.x == 0) {
    for (int s = 0; s < kWideStages; ++s) {
      barrier_init(&full[s], 1);   // the producer's expect_tx; TMA completes the bytes
      barrier_init(&empty[s], 2);  // one arrival per consumer warpgroup
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  launch::start_after_prior_grids();  // before the first global access: see launch.cuh

  if (threadIdx.x >= kConsumerThreads) {
    if (threadIdx.x == kConsumerThreads) {
      int it = 0;  // K tiles issued by this block over all its output tiles
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        int64_t row0, col0;
        band_tile(tile, row_tiles, col_tiles, row0, col0);
        for (int kt = 0; kt < k_tiles; ++kt, ++it) {
          const int s = it % kWideStages;
          if (it >= kWideStages) barrier_wait(&empty[s], ((it / kWideStages) & 1) ^ 1);
          int8_t* stage = ring + s * kWideStageBytes;
          barrier_expect_bytes(&full[s], kWideStageBytes);
          tma_load_2d(stage, &x_map, kt * kTileK, static_cast<int>(row0), &full[s]);
          tma_load_2d(stage + kWideBytesA, &w_map, kt * kTileK, static_cast<int>(col0), &full[s]);
        }
      }
    }
    return;
  }

  const int consumer = threadIdx.x / 128;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  int32_t* staged = staging + warp * kWarpStagedInts;
  int it = 0;
  int d[kWideCols / 2];
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    int64_t row0, col0;
    band_tile(tile, row_tiles, col_tiles, row0, col0);
#pragma unroll
    for (int i = 0; i < kWideCols / 2; ++i) d[i] = 0;
    // The same main loop as the 128 x 128 kernel's, kept as a twin: one shared helper for both
    // (and one for the producer) measured 2-4% slower on out_proj, side by side (session 8).
    for (int kt = 0; kt < k_tiles; ++kt, ++it) {
      const int s = it % kWideStages;
      barrier_wait(&full[s], (it / kWideStages) & 1);
      const int8_t* a = ring + s * kWideStageBytes + consumer * 64 * kTileK;
      const int8_t* b = ring + s * kWideStageBytes + kWideBytesA;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kTileK / 32; ++kk) {
        wgmma_m64n256k32_s8(d, operand_descriptor(a + 32 * kk), operand_descriptor(b + 32 * kk), 1);
      }
      wgmma_commit();
      // Keep this K tile's wgmma in flight and hand back the stage the previous one's have read.
      wgmma_wait<1>();
      fence_registers(d);
      if (kt > 0 && threadIdx.x % 128 == 0) barrier_arrive(&empty[(it - 1) % kWideStages]);
    }
    wgmma_wait<0>();
    fence_registers(d);
    if (threadIdx.x % 128 == 0) barrier_arrive(&empty[(it - 1) % kWideStages]);

    if constexpr (kCodesByTma) {
      // The previous tile's store has read the code tile before it is overwritten.
      if (threadIdx.x == 0) tma_store_wait_read();
      asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory");
      // Accumulator 4 j + r: tile row 16 warp + g + 8 (r >= 2), column 8 j + 2 t + (r & 1).
      // Code tile [column][row], 128-byte rows whose 16-byte chunks are XOR-swizzled by
      // column % 8 (the TMA's 128-byte swizzle): byte 128 n + (((m / 16) ^ (n % 8)) * 16 + m % 16).
      // Per thread the four (r) offsets within columns 8 j .. 8 j + 7 do not depend on j.
      const int m_lo = 16 * warp + g;
      int offset[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int n = 2 * t + (r & 1), m = m_lo + (r >= 2 ? 8 : 0);
        offset[r] = 128 * n + ((((m >> 4) ^ n) << 4) | (m & 15));
      }
#pragma unroll
      for (int j = 0; j < kWideCols / 8; ++j) {
        bool clear = ep.fast_factor;
        uint32_t code[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) code[r] = q8_code_by_factor(ep.out_factor, d[4 * j + r], clear);
        if (!clear) {  // rare: a code near a rounding boundary (or scales outside the factor's range)
#pragma unroll
          for (int r = 0; r < 4; ++r) code[r] = exact_int8_code(ep, d[4 * j + r]);
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) codes[1024 * j + offset[r]] = static_cast<int8_t>(code[r] & 0xFFu);
      }
      fence_async_shared();
      asm volatile("bar.sync 1, %0;" ::"n"(kConsumerThreads) : "memory");
      if (threadIdx.x == 0) {
        const int b = static_cast<int>(row0 / ep.seq_len);
        const int l0 = static_cast<int>(row0 - static_cast<int64_t>(b) * ep.seq_len);
        tma_store_3d(&out_map, codes, l0, static_cast<int>(col0), b);
      }
      continue;
    }

    // The rounds run as a loop, the accumulator registers picked by a switch: unrolled, the 8
    // copies of the conversion made the INT8 kernels 200 KB of code and their epilogue waited on
    // instruction fetch.
    const int64_t warp_row0 = row0 + warp * 16;  // warps 0-3: tile rows 0-63, warps 4-7: 64-127
#pragma unroll 1
    for (int round = 0; round < kWideCols / kRoundCols; ++round) {
      switch (round) {
        case 0: stage_round<0>(staged, d, g, t); break;
        case 1: stage_round<1>(staged, d, g, t); break;
        case 2: stage_round<2>(staged, d, g, t); break;
        case 3: stage_round<3>(staged, d, g, t); break;
        case 4: stage_round<4>(staged, d, g, t); break;
        case 5: stage_round<5>(staged, d, g, t); break;
        case 6: stage_round<6>(staged, d, g, t); break;
        default: stage_round<7>(staged, d, g, t); break;
      }
      __syncwarp();
      // staged [m][n]: 16 rows x 32 contiguous columns
      write_accumulator_tile_as<T, false, 16, kRoundCols, kRoundPitch>(
          ep, staged, out, warp_row0, col0 + round * kRoundCols, M, N, lane, 32);
      __syncwarp();
    }
  }
  if constexpr (kCodesByTma) {
    if (threadIdx.x == 0) tma_store_wait_all();
  }
}

using async::encode_tiled;
using async::EncodeTiled;

// The TMA map of a row-major int8 matrix (rows, K), read in boxes of box_rows x 128 bytes.
cudaError_t make_map(CUtensorMap* map, const int8_t* data, int64_t rows, int64_t K,
                     int box_rows) {
  return async::make_byte_map_2d(map, data, static_cast<uint64_t>(rows), static_cast<uint64_t>(K),
                                 static_cast<uint64_t>(K), static_cast<uint32_t>(box_rows), kTileK,
                                 CU_TENSOR_MAP_SWIZZLE_128B);
}

template <GemmOut T, bool kCodesByTma = false>
cudaError_t launch_wide_as(const EpilogueConsts& ep, unsigned grid, const CUtensorMap& x_map,
                           const CUtensorMap& w_map, void* out, int64_t M, int64_t N, int64_t K,
                           int device, cudaStream_t stream, const CUtensorMap& out_map) {
  constexpr int kBytes = kCodesByTma ? kWideTmaSmemBytes : kWideSmemBytes;
  static std::atomic<unsigned long long> opted_in{0};
  cudaError_t err = opt_in_shared_memory(int8_gemm_wgmma_wide_kernel<T, kCodesByTma>, kBytes,
                                         device, opted_in);
  if (err != cudaSuccess) return err;
  launch::launch_kernel(int8_gemm_wgmma_wide_kernel<T, kCodesByTma>, grid, kThreads, kBytes,
                        stream, x_map, w_map, out, M, N, K, ep, out_map);
  return cudaGetLastError();
}

// The TMA map of the sequence-last int8 output (B, N, L) as (L, N, B), stored in boxes of 128
// positions x 256 channels with the 128-byte swizzle of the code tile.
cudaError_t make_seq_last_out_map(CUtensorMap* map, void* out, int64_t B, int64_t N, int64_t L) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(L), static_cast<cuuint64_t>(N),
                              static_cast<cuuint64_t>(B)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(L), static_cast<cuuint64_t>(N * L)};
  const cuuint32_t box[3] = {kWideRows, kWideCols, 1};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult result =
      encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, out, dims, strides, box, element_strides,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Output tiles of the wide kernel.
int64_t wide_tiles(int64_t M, int64_t N) {
  return ((M + kWideRows - 1) / kWideRows) * ((N + kWideCols - 1) / kWideCols);
}

// Which kernel takes a product (measured on the H100, benchmarks/README.md, session 8): the wide
// kernel's epilogue is not overlapped with any MMA, so it needs a long K loop per tile to pay for
// it (K > 2048: out_proj of 2.8B and 1.4B, x_proj at long prompts; dt_proj, K = 160, ran 1.2-1.4x
// slower on it than on the 128 x 128 kernel, whose two blocks per SM overlap one's epilogue with
// the other's wgmma), and at least half a tile per SM. Row-major INT8 and FP16 outputs (the layers'); other
// types and the sequence-last layout take the 128 x 128 kernel.
bool use_wide_kernel(int64_t M, int64_t N, int64_t K, const EpilogueConsts& ep, int sms) {
  if (ep.type != GemmOut::Int8 && ep.type != GemmOut::Float16) return false;
  if (ep.seq_len > 0 || K <= kWideMinK) return false;
  return 2 * wide_tiles(M, N) >= sms;
}

// Sequence-last INT8 outputs whose sequences are whole 128-row tiles (in_proj) take the wide
// kernel with its codes stored by TMA, whose epilogue the next tile's main loop overlaps. Measured
// on the H100 (benchmarks/README.md, session 15): it needs no long K loop (in_proj of 1.4B,
// K = 2048, 562 -> 482 us and of 130m, K = 768, 122 -> 105 us at 16384 tokens), but at K <= 2048
// a full wave of tiles (130m's in_proj at 1024 tokens, 96 tiles on 132 SMs, was slower in the
// model than the 128 x 128 kernel's 192 tiles); K > 2048 keeps session 14's half a tile per SM.
bool use_wide_codes_by_tma(int64_t M, int64_t N, int64_t K, const EpilogueConsts& ep, int sms,
                           const void* out) {
  const int64_t tiles = wide_tiles(M, N);
  const bool enough_tiles = K > kWideMinK ? 2 * tiles >= sms : tiles >= sms;
  // The TMA map: a 16-byte aligned base, strides (L, N L bytes) multiples of 16 below 2^40.
  return ep.type == GemmOut::Int8 && ep.seq_len > 0 && ep.seq_len % kWideRows == 0 &&
         enough_tiles && reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
         N < (int64_t{1} << 40) / ep.seq_len;
}

}  // namespace

cudaError_t launch_int8_gemm_wgmma(const int8_t* x, const int8_t* w, void* out, int64_t M,
                                   int64_t N, int64_t K, const EpilogueConsts& ep, int device,
                                   cudaStream_t stream) {
  const int64_t tiles = ((M + kBlockM - 1) / kBlockM) * ((N + kBlockN - 1) / kBlockN);
  // TMA coordinates and the tile numbering are int32.
  if (M > 2147483647LL || N > 2147483647LL || K > 2147483647LL || tiles > 2147483647LL) {
    return cudaErrorInvalidValue;
  }
  int sms = 0;
  cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const bool codes_by_tma = use_wide_codes_by_tma(M, N, K, ep, sms, out);
  const bool wide = codes_by_tma || use_wide_kernel(M, N, K, ep, sms);
  CUtensorMap x_map, w_map;
  err = make_map(&x_map, x, M, K, kBlockM);
  if (err == cudaSuccess) err = make_map(&w_map, w, N, K, wide ? kWideCols : kBlockN);
  if (err != cudaSuccess) return err;
  if (wide) {
    const int64_t wide_count = wide_tiles(M, N);
    const unsigned grid = static_cast<unsigned>(wide_count < sms ? wide_count : sms);
    CUtensorMap out_map{};  // used by the kCodesByTma variant only
    if (codes_by_tma) {
      err = make_seq_last_out_map(&out_map, out, M / ep.seq_len, N, ep.seq_len);
      if (err != cudaSuccess) return err;
      return launch_wide_as<GemmOut::Int8, true>(ep, grid, x_map, w_map, out, M, N, K, device,
                                                 stream, out_map);
    }
    return ep.type == GemmOut::Int8
               ? launch_wide_as<GemmOut::Int8>(ep, grid, x_map, w_map, out, M, N, K, device,
                                               stream, out_map)
               : launch_wide_as<GemmOut::Float16>(ep, grid, x_map, w_map, out, M, N, K, device,
                                                  stream, out_map);
  }
  static std::atomic<unsigned long long> opted_in{0};
  err = opt_in_shared_memory(int8_gemm_wgmma_kernel, kSmemBytes, device, opted_in);
  if (err != cudaSuccess) return err;
  launch::launch_kernel(int8_gemm_wgmma_kernel, static_cast<unsigned>(tiles), kThreads,
                        kSmemBytes, stream, x_map, w_map, out, M, N, K, ep);
  return cudaGetLastError();
}

}  // namespace gemm
}  // namespace quamba
