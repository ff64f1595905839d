#pragma once
// The W8A8 GEMM epilogue shared by the GEMM kernels (gemm_int8.cu; the Hopper kernel in
// sm90a/gemm_int8_wgmma.cu): the conversion of an exact int32 accumulator into the output type
// (reference_ops.w8a8_linear's arithmetic, see gemm_int8.h) and the conversion and write-out of a
// tile of accumulators staged in shared memory; and the kernels' shared-memory opt-in.
#include <atomic>

#include "common.cuh"
#include "gemm_int8.h"

namespace quamba {
namespace gemm {

struct EpilogueConsts {
  GemmOut type;
  float scale;
  float out_scale;
  float inv_out_scale;
  bool fast_q;  // inv_out_scale is normal: q8_if_clear's bound holds
  // INT8 output, staged epilogue: RN(scale * inv_out_scale), and whether the scales allow
  // codes from q = RN(float(acc) * out_factor) (kFactorMargin; see q8_word_by_factor).
  float out_factor;
  bool fast_factor;
  Rounding rule;
  int64_t seq_len;
};

inline EpilogueConsts make_consts(const GemmEpilogue& ep) {
  EpilogueConsts c;
  c.type = ep.out_type;
  c.scale = ep.scale;
  c.out_scale = ep.out_scale;
  c.inv_out_scale = 1.0f / ep.out_scale;  // host: IEEE, round to nearest
  c.fast_q = reciprocal_ok(c.inv_out_scale);
  c.out_factor = c.scale * c.inv_out_scale;  // host float multiply: IEEE, round to nearest
  // The bound of q8_word_by_factor needs a normal factor, and the reference's v = RN(acc * scale)
  // normal and finite for every nonzero int32 acc (1 <= |acc| < 2^31).
  const float magnitude = c.scale < 0.0f ? -c.scale : c.scale;
  const float factor = c.out_factor < 0.0f ? -c.out_factor : c.out_factor;
  c.fast_factor = c.fast_q && magnitude >= 0x1p-100f && magnitude <= 0x1p+90f &&
                  factor >= 0x1p-100f && factor <= 0x1p+90f;
  c.rule = static_cast<Rounding>(ep.rounding);
  c.seq_len = ep.seq_len;
  return c;
}

__device__ __forceinline__ int64_t out_index(const EpilogueConsts& c, int64_t m, int64_t n,
                                             int64_t N) {
  if (c.seq_len <= 0) return m * N + n;
  const int64_t b = m / c.seq_len;
  return (b * N + n) * c.seq_len + (m - b * c.seq_len);
}

// Converts acc with the epilogue and writes it at dst, an element of output type T.
template <GemmOut T>
__device__ __forceinline__ void convert_as(const EpilogueConsts& c, void* dst, int32_t acc) {
  if constexpr (T == GemmOut::Int32) {
    *static_cast<int32_t*>(dst) = acc;
  } else {
    const float v = __fmul_rn(__int2float_rn(acc), c.scale);
    if constexpr (T == GemmOut::Int8) {
      *static_cast<int8_t*>(dst) =
          quantize_int8_by_reciprocal(v, c.out_scale, c.inv_out_scale, c.fast_q, c.rule);
    } else if constexpr (T == GemmOut::Float16) {
      *static_cast<__half*>(dst) = __float2half_rn(v);
    } else if constexpr (T == GemmOut::BFloat16) {
      *static_cast<__nv_bfloat16*>(dst) = __float2bfloat16_rn(v);
    } else {
      *static_cast<float*>(dst) = v;
    }
  }
}

// The exact INT8 code of one accumulator in the low byte (the rare path of the register
// epilogues: a code near a rounding boundary, or scales outside the factor's range), out of line
// to keep their unrolled conversions small.
inline __device__ __noinline__ uint32_t exact_int8_code(const EpilogueConsts& c, int32_t acc) {
  int8_t code;
  convert_as<GemmOut::Int8>(c, &code, acc);
  return static_cast<uint8_t>(code);
}

// The same with the output type chosen at run time.
__device__ __forceinline__ void convert_to(const EpilogueConsts& c, void* dst, int32_t acc) {
  switch (c.type) {
    case GemmOut::Int32: convert_as<GemmOut::Int32>(c, dst, acc); break;
    case GemmOut::Int8: convert_as<GemmOut::Int8>(c, dst, acc); break;
    case GemmOut::Float16: convert_as<GemmOut::Float16>(c, dst, acc); break;
    case GemmOut::BFloat16: convert_as<GemmOut::BFloat16>(c, dst, acc); break;
    default: convert_as<GemmOut::Float32>(c, dst, acc); break;
  }
}

// For q = RN(float(acc) * RN(scale * RN(1 / out_scale))), the stand-in for the reference's
// RN(RN(float(acc) * scale) / out_scale): three roundings on one side, two on the other, so the two
// differ by at most 5 * 2^-24 |q| when every intermediate is a normal float
// (EpilogueConsts::fast_factor). Only |q| <= 128 matters (beyond, both saturate alike), where that
// is at most 3.8e-5: q decides its code when it is farther than kFactorMargin from every rounding
// boundary k + 0.5 (about 1e-4 of uniformly spread outputs are not, and take the exact path).
constexpr float kFactorMargin = 6.4e-5f;

// The INT8 code of one accumulator from the combined factor (in the low byte of the result);
// `clear` is cleared when q lies within kFactorMargin of a rounding boundary, i.e. when the code
// may differ from the reference's. The clamp-and-shift rounding of q8_code_and_distance, with the
// boundary test on |c - nearest| itself: q is near k + 0.5 when |c - nearest| >= 0.5 -
// kFactorMargin (the bound below rounds to a float a few 1e-8 from that, still far above the
// 3.8e-5 the factor's error needs; c - nearest is exact where it matters, |c - nearest| >= 0.25).
constexpr float kFactorClearBound = 0.5f - kFactorMargin;
__device__ __forceinline__ uint32_t q8_code_by_factor(float factor, int acc, bool& clear) {
  const float q = __fmul_rn(__int2float_rn(acc), factor);
  const float c = fminf(fmaxf(q, -128.0f), 127.0f);
  const float shifted = __fadd_rn(c, 12582912.0f);  // 1.5 * 2^23: rounds c to an integer
  const float nearest = __fadd_rn(shifted, -12582912.0f);  // exact
  clear &= fabsf(__fadd_rn(c, -nearest)) < kFactorClearBound;  // no short circuit: no branch
  return __float_as_uint(shifted);
}

// The INT8 codes of four accumulators from the combined factor, byte j of the result for element
// j of acc; `clear` stays true if every one lies farther than kFactorMargin from a rounding
// boundary, i.e. the codes are the reference's.
__device__ __forceinline__ uint32_t q8_word_by_factor(float factor, int4 acc, bool& clear) {
  uint32_t code[4];
  const int a[4] = {acc.x, acc.y, acc.z, acc.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) code[j] = q8_code_by_factor(factor, a[j], clear);
  // Low bytes of the four codes: [c0, c1, x, x], [c2, c3, x, x], then [c0, c1, c2, c3].
  return __byte_perm(__byte_perm(code[0], code[1], 0x0040), __byte_perm(code[2], code[3], 0x0040),
                     0x5410);
}

__host__ __device__ constexpr int out_elem_size(GemmOut type) {
  return type == GemmOut::Int8 ? 1 : (type == GemmOut::Float16 || type == GemmOut::BFloat16 ? 2 : 4);
}

// Converts acc with the epilogue and writes it as element `index` of out.
__device__ __forceinline__ void store_epilogue(const EpilogueConsts& c, void* out, int64_t index,
                                               int32_t acc) {
  convert_to(c, static_cast<char*>(out) + index * out_elem_size(c.type), acc);
}

// a / b for non-negative a, b > 0; 32-bit division when both fit.
__device__ __forceinline__ int64_t divide_small(int64_t a, int64_t b) {
  if (((a | b) >> 31) == 0) {
    return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
  }
  return a / b;
}

__device__ __forceinline__ void store_piece(int8_t* dst, const int8_t* packed) {
  *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(packed);
}

// One output element of kSize bytes as a single store (dst is aligned to kSize).
template <int kSize>
__device__ __forceinline__ void store_element(int8_t* dst, const int8_t* src) {
  if constexpr (kSize == 1) {
    *dst = *src;
  } else if constexpr (kSize == 2) {
    *reinterpret_cast<uint16_t*>(dst) = *reinterpret_cast<const uint16_t*>(src);
  } else {
    *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(src);
  }
}

// A staged epilogue over raw accumulators: the int32 tile of kTileM rows (m) x kTileN columns (n),
// staged in shared memory along the output's contiguous axis (row-major output: [m][n];
// sequence-last: [n][m]) with kPitch int32 from one staged row to the next (a multiple of 4), is
// converted 16 output bytes at a time and written with 16-byte stores (element-wise at the edges
// and where a piece is not contiguous or aligned in the output). The conversion is a short loop,
// not unrolled per accumulator: unrolled over a thread's 64 accumulators in each of 10 output
// variants, the wgmma GEMM's epilogue spent 46% of its warp cycles waiting for instructions (ncu).
// kSeqLast must equal ep.seq_len > 0 (a template parameter so that the piece arithmetic is
// shifts: as a run-time value it cost a division per piece).
template <GemmOut T, bool kSeqLast, int kTileM, int kTileN, int kPitch>
__device__ __forceinline__ void write_accumulator_tile_as(const EpilogueConsts& ep,
                                                       const int32_t* staged, void* out,
                                                       int64_t m_block, int64_t n_block, int64_t M,
                                                       int64_t N, int tid, int threads) {
  static_assert(kPitch % 4 == 0, "staged rows must stay 16-byte aligned");
  constexpr int kSize = out_elem_size(T);
  constexpr int kPer = 16 / kSize;  // elements per 16-byte piece
  constexpr bool seq_last = kSeqLast;
  constexpr int row_length = seq_last ? kTileM : kTileN;
  constexpr int rows = seq_last ? kTileN : kTileM;
  constexpr int pieces_per_row = row_length / kPer;
  static_assert(row_length % kPer == 0, "rows of whole 16-byte pieces");
  int8_t* out_bytes = static_cast<int8_t*>(out);
  for (int p = tid; p < rows * pieces_per_row; p += threads) {
    const int row = p / pieces_per_row;
    const int col = (p % pieces_per_row) * kPer;
    const int4* src = reinterpret_cast<const int4*>(staged + row * kPitch + col);
    __align__(16) int8_t packed[16];
    bool clear = false;
    if constexpr (T == GemmOut::Int8) {
      // 16 codes from the combined factor; where one lies near a rounding boundary (or the
      // scales do not allow the factor), the whole piece is converted exactly below.
      clear = ep.fast_factor;
      if (clear) {
        uint32_t words[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) words[q] = q8_word_by_factor(ep.out_factor, src[q], clear);
        *reinterpret_cast<int4*>(packed) = make_int4(static_cast<int>(words[0]),
            static_cast<int>(words[1]), static_cast<int>(words[2]), static_cast<int>(words[3]));
      }
    }
    if (!clear) {
#pragma unroll
      for (int q = 0; q < kPer / 4; ++q) {
        const int4 acc = src[q];
        convert_as<T>(ep, packed + (4 * q + 0) * kSize, acc.x);
        convert_as<T>(ep, packed + (4 * q + 1) * kSize, acc.y);
        convert_as<T>(ep, packed + (4 * q + 2) * kSize, acc.z);
        convert_as<T>(ep, packed + (4 * q + 3) * kSize, acc.w);
      }
    }
    if constexpr (seq_last) {
      // The piece is kPer consecutive m (= positions l of sequences b) of column n.
      const int64_t n = n_block + row;
      int64_t m = m_block + col;
      if (n >= N || m >= M) continue;
      int64_t b = divide_small(m, ep.seq_len);
      int64_t l = m - b * ep.seq_len;
      const int64_t first = (b * N + n) * ep.seq_len + l;
      if (m + kPer <= M && l + kPer <= ep.seq_len && (first * kSize) % 16 == 0) {
        store_piece(out_bytes + first * kSize, packed);
        continue;
      }
      // Element by element (a sequence boundary inside the piece, the end of M, or a piece that
      // is not 16-byte aligned, e.g. an odd seq_len): whole-element stores, (b, l) stepped.
      for (int e = 0; e < kPer && m < M; ++e, ++m) {
        store_element<kSize>(out_bytes + ((b * N + n) * ep.seq_len + l) * kSize, packed + e * kSize);
        if (++l == ep.seq_len) {
          l = 0;
          ++b;
        }
      }
    } else {
      const int64_t m = m_block + row, n = n_block + col;
      if (m >= M || n >= N) continue;
      const int64_t first = m * N + n;
      if (n + kPer <= N && (first * kSize) % 16 == 0) {
        store_piece(out_bytes + first * kSize, packed);
        continue;
      }
      for (int e = 0; e < kPer && n + e < N; ++e) {
        store_element<kSize>(out_bytes + (first + e) * kSize, packed + e * kSize);
      }
    }
  }
}

// write_accumulator_tile_as with the output type and layout chosen at run time, once per tile.
template <bool kSeqLast, int kTileM, int kTileN, int kPitch>
__device__ __forceinline__ void write_accumulator_tile_in(const EpilogueConsts& ep,
                                                          const int32_t* staged, void* out,
                                                          int64_t m_block, int64_t n_block,
                                                          int64_t M, int64_t N, int tid,
                                                          int threads) {
#define QUAMBA_WRITE(T)                                                                    \
  write_accumulator_tile_as<GemmOut::T, kSeqLast, kTileM, kTileN, kPitch>(                 \
      ep, staged, out, m_block, n_block, M, N, tid, threads)
  switch (ep.type) {
    case GemmOut::Int32: QUAMBA_WRITE(Int32); break;
    case GemmOut::Int8: QUAMBA_WRITE(Int8); break;
    case GemmOut::Float16: QUAMBA_WRITE(Float16); break;
    case GemmOut::BFloat16: QUAMBA_WRITE(BFloat16); break;
    default: QUAMBA_WRITE(Float32); break;
  }
#undef QUAMBA_WRITE
}

template <int kTileM, int kTileN, int kPitch>
__device__ __forceinline__ void write_accumulator_tile(const EpilogueConsts& ep,
                                                       const int32_t* staged, void* out,
                                                       int64_t m_block, int64_t n_block, int64_t M,
                                                       int64_t N, int tid, int threads) {
  if (ep.seq_len > 0) {
    write_accumulator_tile_in<true, kTileM, kTileN, kPitch>(ep, staged, out, m_block, n_block, M,
                                                           N, tid, threads);
  } else {
    write_accumulator_tile_in<false, kTileM, kTileN, kPitch>(ep, staged, out, m_block, n_block, M,
                                                            N, tid, threads);
  }
}

// The Hopper GEMM (sm90a/gemm_int8_wgmma.cu), for devices of compute capability 9.0, K % 16 == 0
// and 16-byte aligned x and w. Compiled only when the architecture list includes sm_90 (then
// QUAMBA_HAVE_WGMMA_GEMM is defined for the other sources).
cudaError_t launch_int8_gemm_wgmma(const int8_t* x, const int8_t* w, void* out, int64_t M,
                                   int64_t N, int64_t K, const EpilogueConsts& ep, int device,
                                   cudaStream_t stream);

// The short-K GEMM (gemm_short_k.cu) for 1 <= K <= kShortKMax, K % 16 == 0, 16-byte aligned x
// and w, sm_80+. `sms`: the device's multiprocessor count (the grid is persistent).
cudaError_t launch_int8_gemm_short_k(const int8_t* x, const int8_t* w, void* out, int64_t M,
                                     int64_t N, int64_t K, const EpilogueConsts& ep, int device,
                                     int sms, cudaStream_t stream);

// Dynamic shared memory beyond the default 48 KB needs a per-kernel opt-in, once per device
// (`opted_in`: one bit per device ordinal below 64; others opt in on every launch).
template <typename Kernel>
cudaError_t opt_in_shared_memory(Kernel kernel, int bytes, int device,
                                 std::atomic<unsigned long long>& opted_in) {
  const unsigned long long bit = device < 64 ? 1ULL << device : 0;
  if (bit != 0 && (opted_in.load() & bit)) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) opted_in |= bit;
  return err;
}

}  // namespace gemm
}  // namespace quamba
