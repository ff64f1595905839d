// x_proj of a prefill from the conv's sequence-last codes (x_proj.h). Hopper only (sm_90: TMA,
// thread-block clusters); elsewhere the layers take the generic path.
//
// Why a kernel of its own: x_proj is a skinny GEMM (R + 2N = 80..192 outputs per token, K = E up
// to 5120) whose input u is sequence-last (B, E, L) while the tensor cores need K contiguous per
// token. The generic path transposes u, runs cuBLASLt's split-K GEMM into int32, converts, and
// copies dt_low, B and C out of the result: six kernels, ~26 us per 2.8B layer at one sequence
// of 1024 tokens against a few us of data.
//
// Work split: a block takes 64 tokens of one sequence and a slice of K (E / split_k), all R + 2N
// outputs. 512 threads = 4 warps over the outputs (MTW 16-row tiles each) x 4 warps over the
// tokens (16 each). Per 128-wide K stage, two TMA box loads bring w's rows (128 bytes each,
// 128-byte swizzle) and u's 128 rows of 64 tokens into a ring of kStages (mbarriers). The bytes of
// u are transposed (4 x 4 blocks by byte permutes, one per thread) into token-major rows, one
// stage ahead of the products (two buffers: one block barrier per stage); ldmatrix feeds
// mma.sync m16n8k32 s8. The int32 sums of the split_k blocks of a cluster are added through
// distributed shared memory, each block converting and writing 64 / split_k of the tokens.
// Integer sums: the codes do not depend on the split or on the order.
//
// Speed (H100, session 16): a stage takes ~1.5 us of one block whatever the ring depth (3..8),
// the load path (cp.async, row-wise bulk copies, TMA boxes) or the warps per block (8, 16);
// without the products it takes ~0.6 of that, without the transpose ~0.8. Short K loops beat
// the generic path (x_proj of one 1024-token sequence: 130m 17.0 -> 9.8 us, 2.8B 26.1 -> 22.9),
// long ones lose to cuBLASLt's (2.8B at 16 x 1024 tokens: 115 -> 125 us), so the layers take
// this kernel where a block has at most 12 stages (quamba_kernels.gemm.x_proj_preferred).
// Session 17: the transpose's stores had 8-way bank conflicts (swizzled_ut): 2.8B 24.0 -> 21.7 us;
// four warps of 2 x 2 larger tiles (half the fragment reads) measured 33 us: the 16 warps stay.
#include <atomic>

#include <cooperative_groups.h>

#include "gemm_epilogue.cuh"
#include "launch.cuh"
#include "tma.cuh"
#include "mma_s8.cuh"
#include "x_proj.h"

namespace quamba {
namespace {

namespace cg = cooperative_groups;
using gemm::EpilogueConsts;

constexpr int kWarpsN = 4;  // warps over the block's 64 tokens (16 each), 4 over the outputs
constexpr int kThreads = 128 * kWarpsN;
constexpr int kTokens = 64;    // tokens per block
constexpr int kStageK = 128;   // K per pipeline stage: bytes per staged row of w (one TMA row)
constexpr int kSumRow = kTokens + 1;  // int32 per row of the staged sums (conflict-free reads)

// Rows of w staged per block: 4 warps x MTW tiles of 16.
template <int MTW>
constexpr int padded_rows() {
  return 64 * MTW;
}

// A stage: w's rows (TMA's 128-byte swizzle, see swizzled), then u's 128 rows of 64 tokens; a
// multiple of 1024 bytes, so every tile keeps the swizzle's alignment.
template <int MTW>
constexpr int stage_bytes() {
  return padded_rows<MTW>() * kStageK + kStageK * kTokens;
}

template <int MTW, int kStages>
constexpr int shared_bytes() {
  const int pipeline = kStages * stage_bytes<MTW>() + 2 * kTokens * kStageK;  // + 2 ut buffers
  const int sums = padded_rows<MTW>() * kSumRow * 4;
  // + the stages' mbarriers, + 1024 to align the start
  return (pipeline > sums ? pipeline : sums) + kStages * 8 + 1024;
}

template <int MTW, int kStages>
constexpr int barrier_offset() {
  return shared_bytes<MTW, kStages>() - 1024 - kStages * 8;
}

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a tile of 128-byte rows, XOR-swizzled
// as TMA's 128-byte mode writes (address bits 4-6 ^= bits 7-9): ldmatrix's eight rows of one chunk
// fall into eight different bank groups.
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * kStageK + 16 * (chunk ^ (row & 7));
}

// The same for the transposed u rows (ut), which the threads write themselves: the chunk is
// XOR-ed with (token ^ token / 4) % 8 instead. Still a permutation of eight consecutive tokens
// (conflict-free ldmatrix), and it also spreads the transpose's stores: a warp writes tokens
// 4 apart, which token % 8 maps to two chunk positions (8-way bank conflicts: ncu counted 457 K
// conflicting store wavefronts in a 2.8B call) and this to eight.
__device__ __forceinline__ int swizzled_ut(int token, int chunk) {
  return token * kStageK + 16 * (chunk ^ ((token ^ (token >> 2)) & 7));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

struct XProjParams {
  const int8_t* u;
  const int8_t* w;
  int8_t* dt_low;
  int8_t* B;
  int8_t* C;
  int64_t dim, seqlen, dt_rank, dstate;
  int outputs;        // R + 2N
  int tiles_per_seq;  // ceil(L / 64)
  int split_k;
  EpilogueConsts ep;
};

template <int MTW, int kStages>
__global__ void __launch_bounds__(kThreads)
    x_proj_kernel(const __grid_constant__ CUtensorMap w_map,
                  const __grid_constant__ CUtensorMap u_map, XProjParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* const smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  constexpr int kRows = padded_rows<MTW>();
  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int warp_m = warp & 3, warp_n = warp >> 2;

  const int rank = static_cast<int>(blockIdx.x);  // in the cluster (grid.x = cluster.x = split_k)
  const int64_t tile = blockIdx.y;
  const int64_t b = tile / p.tiles_per_seq;
  const int64_t t0 = (tile - b * p.tiles_per_seq) * kTokens;
  const int64_t E = p.dim, L = p.seqlen;
  const int stages_total = static_cast<int>(E / kStageK);
  const int k_begin = rank * stages_total / p.split_k;
  const int k_end = (rank + 1) * stages_total / p.split_k;
  const int stages = k_end - k_begin;

  unsigned char* const ut = smem + kStages * stage_bytes<MTW>();  // 2 x token-major u, 64 x 128
  auto w_tile = [&](int s) { return smem + s * stage_bytes<MTW>(); };
  auto u_tile = [&](int s) { return smem + s * stage_bytes<MTW>() + kRows * kStageK; };
  uint64_t* const full = reinterpret_cast<uint64_t*>(smem + barrier_offset<MTW, kStages>());
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) async::barrier_init(&full[s], 1);
  }
  __syncthreads();

  launch::start_after_prior_grids();  // before reading u: see launch.cuh

  // Warp 0, lane 0: stage s <- K columns k_stage * 128 .. + 127 of w's rows and u's 128 rows there
  // (rows of w past R + 2N and tokens past L arrive as zeros), counted on full[s].
  const int u_row0 = static_cast<int>(b * E);
  auto load_stage = [&](int s, int k_stage) {
    if (lane != 0) return;
    const int k0 = k_stage * kStageK;
    async::barrier_expect_bytes(&full[s], stage_bytes<MTW>());
    async::tma_load_2d(w_tile(s), &w_map, k0, 0, &full[s]);
    async::tma_load_2d(u_tile(s), &u_map, static_cast<int>(t0), u_row0 + k0, &full[s]);
  };

  constexpr int kNT = kTokens / 8 / kWarpsN;  // 8-token mma tiles per warp
  int acc[MTW][kNT][4];
#pragma unroll
  for (int i = 0; i < MTW; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  // Stage `it`'s u, one 4 x 4 block of bytes per thread (rows k = 4 kb .. 4 kb + 3 of tokens
  // 4 tb .. 4 tb + 3), into ut buffer it % 2 as one word of four k bytes per token.
  static_assert(kStageK / 4 * kTokens / 4 == kThreads, "one 4 x 4 block per thread");
  auto transpose = [&](int it) {
    const int kb = tid >> 4, tb = tid & 15;
    const unsigned char* src = u_tile(it % kStages) + 4 * kb * kTokens + 4 * tb;
    const uint32_t w0 = *reinterpret_cast<const uint32_t*>(src);
    const uint32_t w1 = *reinterpret_cast<const uint32_t*>(src + kTokens);
    const uint32_t w2 = *reinterpret_cast<const uint32_t*>(src + 2 * kTokens);
    const uint32_t w3 = *reinterpret_cast<const uint32_t*>(src + 3 * kTokens);
    const uint32_t lo01 = __byte_perm(w0, w1, 0x5140), hi01 = __byte_perm(w0, w1, 0x7362);
    const uint32_t lo23 = __byte_perm(w2, w3, 0x5140), hi23 = __byte_perm(w2, w3, 0x7362);
    const uint32_t by_token[4] = {__byte_perm(lo01, lo23, 0x5410), __byte_perm(lo01, lo23, 0x7632),
                                  __byte_perm(hi01, hi23, 0x5410), __byte_perm(hi01, hi23, 0x7632)};
    unsigned char* dst = ut + (it & 1) * kTokens * kStageK;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int token = 4 * tb + j;
      *reinterpret_cast<uint32_t*>(dst + swizzled_ut(token, kb >> 2) + 4 * (kb & 3)) = by_token[j];
    }
  };
  auto wait_stage = [&](int it) { async::barrier_wait(&full[it % kStages], (it / kStages) & 1); };

  // The ring holds stages it .. it + kStages - 1; ut holds stage it's u and, while stage it's
  // products run, the next stage's is transposed into the other buffer: one barrier per stage.
  if (warp == 0) {
    for (int s = 0; s < kStages && s < stages; ++s) load_stage(s, k_begin + s);
  }
  if (stages > 0) {
    wait_stage(0);
    transpose(0);
  }
  __syncthreads();

  const int g = lane >> 2, q = lane >> 3, r8 = lane & 7;
  for (int it = 0; it < stages; ++it) {
    if (it + 1 < stages) {
      wait_stage(it + 1);
      transpose(it + 1);
    }
    const unsigned char* wt = w_tile(it % kStages);
    const unsigned char* uts = ut + (it & 1) * kTokens * kStageK;
#pragma unroll
    for (int ks = 0; ks < kStageK / 32; ++ks) {  // k32 steps
      uint32_t bf[kNT][2];
#pragma unroll
      for (int pair = 0; pair < kNT / 2; ++pair) {
        const int token = (kTokens / kWarpsN) * warp_n + 16 * pair + r8 + 8 * (q >> 1);
        uint32_t r[4];
        ldmatrix_x4(r, uts + swizzled_ut(token, 2 * ks + (q & 1)));
        bf[2 * pair][0] = r[0];
        bf[2 * pair][1] = r[1];
        bf[2 * pair + 1][0] = r[2];
        bf[2 * pair + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < MTW; ++i) {
        const int mt = warp_m * MTW + i;
        if (16 * mt >= p.outputs) continue;  // warp-uniform: rows past R + 2N are zeros
        const int row = 16 * mt + r8 + 8 * (q & 1);
        uint32_t af[4];
        ldmatrix_x4(af, wt + swizzled(row, 2 * ks + (q >> 1)));
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          mma_s8_16x8x32(acc[i][j], af[0], af[1], af[2], af[3], bf[j][0], bf[j][1]);
        }
      }
    }
    __syncthreads();  // stage it's buffer and ut buffer it % 2 are read
    if (warp == 0 && it + kStages < stages) {
      async::fence_proxy_async();  // the block's reads of the buffer (barrier above) come first
      load_stage(it % kStages, k_begin + it + kStages);
    }
  }
  // Every copy has landed and been read (the barrier ending the last stage): the sums go where
  // the ring was.

  // This block's sums, sums[row][token].
  int32_t* const sums = reinterpret_cast<int32_t*>(smem);
#pragma unroll
  for (int i = 0; i < MTW; ++i) {
    const int row = 16 * (warp_m * MTW + i) + g;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const int col = (kTokens / kWarpsN) * warp_n + 8 * j + 2 * (lane & 3);
      sums[row * kSumRow + col] = acc[i][j][0];
      sums[row * kSumRow + col + 1] = acc[i][j][1];
      sums[(row + 8) * kSumRow + col] = acc[i][j][2];
      sums[(row + 8) * kSumRow + col + 1] = acc[i][j][3];
    }
  }

  // Each block of the cluster adds up and writes 64 / split_k of the tokens.
  const int tokens_here = kTokens / p.split_k;
  const int col0 = rank * tokens_here;
  const int64_t R = p.dt_rank, N = p.dstate;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (p.split_k > 1) {
    // The cluster's sums of this block's tokens, in place (the other blocks read only their own
    // tokens' columns here): all remote loads of a thread issued before the first add.
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every block's sums are staged
    constexpr int kPerThread = (kRows * kTokens / 2 + kThreads - 1) / kThreads;  // split_k >= 2
    int32_t* remote[8];
#pragma unroll
    for (int o = 0; o < 8; ++o) remote[o] = o < p.split_k ? cluster.map_shared_rank(sums, o) : sums;
    int32_t total[kPerThread];
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int i = tid + e * kThreads;
      const int j = i / tokens_here, col = col0 + (i - j * tokens_here);
      total[e] = 0;
      if (j < p.outputs) {
#pragma unroll
        for (int o = 0; o < 8; ++o) {
          if (o < p.split_k) total[e] += remote[o][j * kSumRow + col];
        }
      }
    }
    cluster.sync();  // every block has read what it needs of the others' sums
#pragma unroll
    for (int e = 0; e < kPerThread; ++e) {
      const int i = tid + e * kThreads;
      const int j = i / tokens_here, col = col0 + (i - j * tokens_here);
      if (j < p.outputs) sums[j * kSumRow + col] = total[e];
    }
  }
#endif
  __syncthreads();  // this block's tokens' sums (the cluster's, split_k > 1) are complete
  auto code_of = [&](int j, int col) {
    int8_t code;
    gemm::convert_as<GemmOut::Int8>(p.ep, &code, sums[j * kSumRow + col]);
    return code;
  };
  // dt_low (B, L, R): consecutive threads write consecutive j of a token.
  for (int i = tid; i < tokens_here * R; i += kThreads) {
    const int token = i / static_cast<int>(R);
    const int j = i - token * static_cast<int>(R);
    const int64_t t = t0 + col0 + token;
    if (t < L) p.dt_low[(b * L + t) * R + j] = code_of(j, col0 + token);
  }
  // B and C (B, N, L): consecutive threads write consecutive tokens of a row.
  for (int i = tid; i < tokens_here * 2 * N; i += kThreads) {
    const int n2 = i / tokens_here;  // 0 .. 2N - 1: B's rows, then C's
    const int token = i - n2 * tokens_here;
    const int64_t t = t0 + col0 + token;
    if (t >= L) continue;
    const int8_t code = code_of(static_cast<int>(R) + n2, col0 + token);
    if (n2 < N) {
      p.B[(b * N + n2) * L + t] = code;
    } else {
      p.C[(b * N + (n2 - N)) * L + t] = code;
    }
  }
}

int device_major(int device) {
  int major = 0;
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess
             ? major
             : 0;
}

template <int MTW, int kStages>
cudaError_t launch_mtw(const XProjParams& p, int64_t batch, int64_t tiles, int device,
                       cudaStream_t stream) {
  // w (R + 2N, E) in boxes of all padded rows x 128 bytes; u as (B E, L) in boxes of 128 x 64.
  CUtensorMap w_map, u_map;
  cudaError_t made = async::make_byte_map_2d(
      &w_map, p.w, static_cast<uint64_t>(p.outputs), static_cast<uint64_t>(p.dim),
      static_cast<uint64_t>(p.dim), padded_rows<MTW>(), kStageK, CU_TENSOR_MAP_SWIZZLE_128B);
  if (made == cudaSuccess) {
    made = async::make_byte_map_2d(&u_map, p.u, static_cast<uint64_t>(batch * p.dim),
                                   static_cast<uint64_t>(p.seqlen),
                                   static_cast<uint64_t>(p.seqlen), kStageK, kTokens,
                                   CU_TENSOR_MAP_SWIZZLE_NONE);
  }
  if (made != cudaSuccess) return made;
  static std::atomic<unsigned long long> opted_in{0};
  constexpr int bytes = shared_bytes<MTW, kStages>();
  auto* kernel = x_proj_kernel<MTW, kStages>;
  cudaError_t err = gemm::opt_in_shared_memory(kernel, bytes, device, opted_in);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned int>(p.split_k), static_cast<unsigned int>(tiles));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = bytes;
  config.stream = stream;
  cudaLaunchAttribute attributes[2];
  int count = 0;
  if (p.split_k > 1) {
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count].val.clusterDim.x = static_cast<unsigned int>(p.split_k);
    attributes[count].val.clusterDim.y = 1;
    attributes[count].val.clusterDim.z = 1;
    ++count;
  }
  if (programmatic_launch_enabled() &&
      launch::programmatic_launch_supported(reinterpret_cast<const void*>(kernel))) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count].val.programmaticStreamSerializationAllowed = 1;
    ++count;
  }
  config.attrs = attributes;
  config.numAttrs = count;
  return cudaLaunchKernelEx(&config, kernel, w_map, u_map, p);
}

// Three stages in flight: 3 measured as fast as 4, 6 and 8 (faster at 130m x 16 x 1024), in less
// shared memory.
template <int kStages>
cudaError_t launch_stages(const XProjParams& p, int64_t batch, int64_t tiles, int device,
                          cudaStream_t stream) {
  switch ((p.outputs + 63) / 64) {
    case 1: return launch_mtw<1, kStages>(p, batch, tiles, device, stream);
    case 2: return launch_mtw<2, kStages>(p, batch, tiles, device, stream);
    case 3: return launch_mtw<3, kStages>(p, batch, tiles, device, stream);
    default: return launch_mtw<4, kStages>(p, batch, tiles, device, stream);
  }
}

}  // namespace

bool x_proj_applies(const XProjArgs& a) {
  const int64_t outputs = a.dt_rank + 2 * a.dstate;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device_major(device) < 9) return false;
  const int64_t tiles = a.batch * ((a.seqlen + kTokens - 1) / kTokens);
  return a.dim >= kStageK && a.dim % kStageK == 0 && a.dim < 131072 && a.seqlen % 16 == 0 &&
         tiles <= 65535 && a.batch * a.dim < (int64_t{1} << 31) &&  // grid.y, TMA row index
         a.dt_rank >= 0 && a.dstate >= 0 && outputs >= 1 && outputs <= kXProjMaxOut &&
         reinterpret_cast<uintptr_t>(a.u) % 16 == 0 && reinterpret_cast<uintptr_t>(a.w) % 16 == 0;
}

cudaError_t launch_x_proj(const XProjArgs& a, cudaStream_t stream) {
  if (a.batch == 0 || a.seqlen == 0) return cudaSuccess;
  if (!x_proj_applies(a)) return cudaErrorNotSupported;
  if (a.split_k != 1 && a.split_k != 2 && a.split_k != 4 && a.split_k != 8) {
    return cudaErrorInvalidValue;
  }
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;

  XProjParams p;
  p.u = a.u;
  p.w = a.w;
  p.dt_low = a.dt_low;
  p.B = a.B;
  p.C = a.C;
  p.dim = a.dim;
  p.seqlen = a.seqlen;
  p.dt_rank = a.dt_rank;
  p.dstate = a.dstate;
  p.outputs = static_cast<int>(a.dt_rank + 2 * a.dstate);
  p.tiles_per_seq = static_cast<int>((a.seqlen + kTokens - 1) / kTokens);
  p.ep = gemm::make_consts(a.ep);
  const int64_t tiles = a.batch * p.tiles_per_seq;
  const int stages_total = static_cast<int>(a.dim / kStageK);
  if (a.split_k > stages_total) return cudaErrorInvalidValue;
  p.split_k = a.split_k;
  return launch_stages<3>(p, a.batch, tiles, device, stream);
}

}  // namespace quamba
