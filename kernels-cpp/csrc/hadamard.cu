// Fast Hadamard transform, n = m * P with P = 2^k, in hadamard_transform_ref's float32 order.
//
// A row is viewed as m sub-vectors of P contiguous elements. Each thread holds EPT = min(8, P)
// consecutive elements of one sub-vector; TPS = P / EPT threads cover a sub-vector (consecutive
// lanes), TPR = m * TPS threads a row, RPB rows share a block. Butterfly stage with stride h pairs
// element i with i + h inside each block of 2h and writes (a + b, a - b):
//   h < EPT:                 inside a thread's registers;
//   EPT <= h < 32 * EPT:     with the lane h / EPT apart (warp shuffle);
//   h >= 32 * EPT (P > 256): through shared memory, one barrier pair per stage.
// Then the m x m +-1 matrix reads the m sub-vectors from shared memory and sums over its columns
// in order (acc = H[i,0]*v0; acc = acc + H[i,j]*vj), the result is multiplied by scale and
// quantized or converted. Each butterfly output is the same correctly rounded a + b or a - b as in
// the reference, so the result is bit-identical.
// m in {12, 20} with 16 <= P <= 256 takes hadamard_paley_kernel instead (see there): the m x m
// step reads each element once instead of m times. m = 1 with 1024 <= P <= 8192 takes
// hadamard_pow2_kernel (radix-16 passes, one barrier per pass instead of two per stage).
// Shared memory rows are padded by 4 floats after every 32 (index pos + 4 * (pos / 32)): a thread's
// 8 consecutive elements stay contiguous (two 16-byte accesses) and the 8 threads of a 16-byte
// access phase hit 8 different bank quadruples.
#include "common.cuh"
#include "hadamard.h"
#include "paley.cuh"

namespace quamba {
namespace {

__device__ __forceinline__ int padded(int pos) { return pos + ((pos >> 5) << 2); }

inline int64_t padded_row(int64_t n) { return n + 4 * ((n + 31) / 32); }

template <int EPT>
__device__ __forceinline__ void row_store(float* row, int pos, const float (&v)[EPT]) {
  if constexpr (EPT == 8) {
    float4* dst = reinterpret_cast<float4*>(row + padded(pos));
    dst[0] = make_float4(v[0], v[1], v[2], v[3]);
    dst[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
#pragma unroll
    for (int i = 0; i < EPT; ++i) row[padded(pos + i)] = v[i];
  }
}

template <int EPT>
__device__ __forceinline__ void row_load(const float* row, int pos, float (&v)[EPT]) {
  if constexpr (EPT == 8) {
    const float4* src = reinterpret_cast<const float4*>(row + padded(pos));
    const float4 a = src[0], b = src[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < EPT; ++i) v[i] = row[padded(pos + i)];
  }
}

struct HadamardShape {
  int64_t rows, n, row_stride;
  int m, p, tps, tpr, rpb;
};

template <int EPT, typename TIn, typename TOut>
__global__ void hadamard_kernel(const TIn* __restrict__ x, TOut* __restrict__ out,
                                const float* __restrict__ h_m, HadamardShape shape, float scale,
                                float out_scale, Rounding rule) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  extern __shared__ __align__(16) float smem[];
  const int m = shape.m, p = shape.p, tps = shape.tps, tpr = shape.tpr, rpb = shape.rpb;
  const int64_t n = shape.n;
  const int hm_size = (m * m + 3) / 4 * 4;
  float* s_h = smem;
  float* s_rows = smem + hm_size;

  const int t = threadIdx.x;
  const int rib = t / tpr;  // row in block (rib >= rpb: padding threads of the last warp)
  const int rem = t - rib * tpr;
  const int j = rem / tps;  // sub-vector
  const int q = rem - j * tps;
  const int p0 = q * EPT;   // first position inside the sub-vector
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rpb + rib;
  const bool in_block = rib < rpb;
  const bool active = in_block && row < shape.rows;

  if (m > 1) {
    for (int i = t; i < m * m; i += blockDim.x) s_h[i] = h_m[i];
  }

  float v[EPT];
  const int64_t offset = row * n + static_cast<int64_t>(j) * p + p0;
  if (active) {
    if constexpr (EPT == 8) {
      load8<TIn, true>(x + offset, v);
    } else {
#pragma unroll
      for (int i = 0; i < EPT; ++i) v[i] = to_float(x[offset + i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < EPT; ++i) v[i] = 0.0f;
  }

  // Stages with stride < EPT: registers.
#pragma unroll
  for (int h = 1; h < EPT; h *= 2) {
#pragma unroll
    for (int i = 0; i < EPT; ++i) {
      if ((i & h) == 0) {
        const float a = v[i], b = v[i + h];
        v[i] = __fadd_rn(a, b);
        v[i + h] = __fsub_rn(a, b);
      }
    }
  }
  // Stages with stride EPT * dist, dist < 32: the partner lane is dist apart in the same warp.
  const int warp_span = tps < 32 ? tps : 32;
  for (int dist = 1; dist < warp_span; dist *= 2) {
    const bool upper = (q & dist) != 0;
#pragma unroll
    for (int i = 0; i < EPT; ++i) {
      const float partner = __shfl_xor_sync(0xffffffffu, v[i], dist);
      v[i] = upper ? __fsub_rn(partner, v[i]) : __fadd_rn(v[i], partner);
    }
  }
  // Stages with stride >= 32 * EPT: through shared memory.
  float* my_row = s_rows + static_cast<int64_t>(rib) * shape.row_stride;
  const int sub = j * p;
  for (int dist = 32; dist < tps; dist *= 2) {
    if (in_block) row_store<EPT>(my_row, sub + p0, v);
    __syncthreads();
    if (in_block) {
      const bool upper = (q & dist) != 0;
      float partner[EPT];
      row_load<EPT>(my_row, sub + (p0 ^ (dist * EPT)), partner);
#pragma unroll
      for (int i = 0; i < EPT; ++i) {
        v[i] = upper ? __fsub_rn(partner[i], v[i]) : __fadd_rn(v[i], partner[i]);
      }
    }
    __syncthreads();
  }
  // The m x m matrix along the sub-vector axis, sequential over its columns.
  if (m > 1) {
    if (in_block) row_store<EPT>(my_row, sub + p0, v);
    __syncthreads();
    if (in_block) {
      const float* h_row = s_h + j * m;
      float src[EPT];
      row_load<EPT>(my_row, p0, src);
#pragma unroll
      for (int i = 0; i < EPT; ++i) v[i] = __fmul_rn(h_row[0], src[i]);
      for (int col = 1; col < m; ++col) {
        const float hv = h_row[col];
        row_load<EPT>(my_row, col * p + p0, src);
#pragma unroll
        // hv * src is exact (hv = +-1), so the fused multiply-add rounds acc +- src once, exactly
        // like the reference's separate product and sum.
        for (int i = 0; i < EPT; ++i) v[i] = __fmaf_rn(hv, src[i], v[i]);
      }
    }
  }

  if (active) {
    TOut result[EPT];
    const float inv_out_scale = __frcp_rn(out_scale);
#pragma unroll
    for (int i = 0; i < EPT; ++i) {
      const float y = __fmul_rn(v[i], scale);
      if constexpr (sizeof(TOut) == 1) {
        result[i] = quantize_int8_fast(y, out_scale, inv_out_scale, rule);
      } else {
        result[i] = from_float<TOut>(y);
      }
    }
    if constexpr (EPT == 8) {
      store8<TOut, true>(out + offset, result);
    } else {
#pragma unroll
      for (int i = 0; i < EPT; ++i) out[offset + i] = result[i];
    }
  }
}

// ---- m in {12, 20}, 16 <= P <= 256: three passes through shared memory, no m-fold re-reads ----
//
// Pass 1: thread (j, q) loads the 16 contiguous elements j*P + 16q .. +15 and runs the strides
// 1, 2, 4, 8 in registers. Pass 2 (P > 16): thread (j, q) takes R = 16 / K2 columns c = qR + r
// (K2 = P / 16) of the K2 x 16 view of sub-vector j and runs the strides 16 .. P/2 in registers.
// Pass 3: thread p holds element p of all m sub-vectors and forms the m outputs
// out_i = ((H[i,0] v_0 + H[i,1] v_1) + ...) itself. Every butterfly and every column sum is the
// reference's rounded operation in the reference's order, so the result is bit-identical.
// The m x m matrix: when h_m holds the Paley matrix that quamba_kernels.hadamard.base_matrix
// builds (checked by every block), its +-1 entries are compile-time constants (each product is a
// sign, rows with a common prefix share its partial sums); any other matrix is read from shared
// memory (fused multiply-add by +-1: the same rounding as the reference's product and sum).
// INT8 codes: every output from the fast quotient without a branch, then, for the rare thread
// with an output near a rounding boundary, all its outputs again with the per-output decision.
// Shared-memory index of position pos: pos + pos / 16 (conflict-free for passes 1 and 2); each
// pass computes one index and reaches the others as compile-time offsets from it (ncu at 2.8B
// shapes: index arithmetic had been ~13 of the kernel's 67 instructions per element).

__device__ __forceinline__ int pidx(int pos) { return pos + (pos >> 4); }

template <int M, int P>
struct PaleyShape {
  static constexpr int kK2 = P / 16;           // threads per sub-vector in passes 1, 2
  static constexpr int kR = 16 / kK2;          // columns per thread in pass 2
  static constexpr int kButterflyThreads = M * kK2;
  static constexpr int kRowThreads = kButterflyThreads > P ? kButterflyThreads : P;
  static constexpr int kRowsPerBlock = kRowThreads >= 256 ? 1 : 256 / kRowThreads;
  static constexpr int kThreads = (kRowsPerBlock * kRowThreads + 31) / 32 * 32;
  static constexpr int kRowFloats = M * P + M * P / 16;
  static constexpr int kSmemFloats = (M * M + 3) / 4 * 4 + kRowsPerBlock * kRowFloats;
};

template <typename TOut>
__device__ __forceinline__ TOut hadamard_output(float acc, float scale, float out_scale,
                                                float inv_out_scale, bool fast_q, Rounding rule) {
  const float y = __fmul_rn(acc, scale);
  if constexpr (sizeof(TOut) == 1) {
    return quantize_int8_by_reciprocal(y, out_scale, inv_out_scale, fast_q, rule);
  } else {
    return from_float<TOut>(y);
  }
}

// The fast path of hadamard_output: the code from q = RN(y * inv_out_scale) whether or not q is
// clear of the rounding boundaries (q8_if_clear); `clear` is and-ed with that. Other output
// types are a plain conversion.
template <typename TOut>
__device__ __forceinline__ TOut hadamard_output_unchecked(float acc, float scale,
                                                          float inv_out_scale, bool& clear) {
  const float y = __fmul_rn(acc, scale);
  if constexpr (sizeof(TOut) == 1) {
    uint32_t code;
    clear = q8_if_clear(__fmul_rn(y, inv_out_scale), kQuotientMargin, code) && clear;
    return static_cast<TOut>(code);
  } else {
    return from_float<TOut>(y);
  }
}

// Output i of the Paley matrix at one position: acc = H[i,0] * v_0, then acc +- v_j, the
// reference's exact products and rounded sums (i is known at compile time: the signs are
// constants).
template <int M>
__device__ __forceinline__ float paley_row_sum(int i, const float (&col)[M]) {
  float acc = paley_entry<M>(i, 0) > 0 ? col[0] : -col[0];
#pragma unroll
  for (int jj = 1; jj < M; ++jj) {
    acc = paley_entry<M>(i, jj) > 0 ? __fadd_rn(acc, col[jj]) : __fsub_rn(acc, col[jj]);
  }
  return acc;
}

template <int M, int P, typename TIn, typename TOut>
__global__ void __launch_bounds__(PaleyShape<M, P>::kThreads)
    hadamard_paley_kernel(const TIn* __restrict__ x, TOut* __restrict__ out,
                          const float* __restrict__ h_m, int64_t rows, float scale,
                          float out_scale, Rounding rule) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  using S = PaleyShape<M, P>;
  constexpr int K2 = S::kK2, R = S::kR, N = M * P;
  extern __shared__ __align__(16) float smem[];
  float* s_h = smem;
  const int t = threadIdx.x;
  const int rib = t / S::kRowThreads;
  const int local = t - rib * S::kRowThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * S::kRowsPerBlock + rib;
  const bool active = rib < S::kRowsPerBlock && row < rows;
  float* s_row = smem + (M * M + 3) / 4 * 4 + (active ? rib : 0) * S::kRowFloats;

  // Pass 1 input first, so that its latency overlaps the matrix check.
  const bool butterfly = active && local < S::kButterflyThreads;
  const int j = local / K2, q = local - (local / K2) * K2;
  const int base = j * P + q * 16;
  float v[16];
  if (butterfly) {
    load8<TIn, true>(x + row * N + base, *reinterpret_cast<float(*)[8]>(v));
    load8<TIn, true>(x + row * N + base + 8, *reinterpret_cast<float(*)[8]>(v + 8));
  }
  bool other_matrix = false;
  for (int i = t; i < M * M; i += S::kThreads) {
    const float hv = h_m[i];
    s_h[i] = hv;
    other_matrix |= hv != static_cast<float>(paley_entry<M>(i / M, i % M));
  }
  other_matrix = __syncthreads_or(other_matrix);

  // Pass 1: strides 1..8.
  if (butterfly) {
    butterflies_in_registers<16>(v);
    // base is a multiple of 16: pidx(base + i) = pidx(base) + i (addresses as immediates).
    float* s_mine = s_row + pidx(base);
#pragma unroll
    for (int i = 0; i < 16; ++i) s_mine[i] = v[i];
  }
  // Pass 2: strides 16..P/2, element (k, r) at j*P + 16k + qR + r.
  if constexpr (K2 > 1) {
    __syncthreads();
    if (butterfly) {
      // q * R + r < 16, so pidx(j * P + 16 * k + q * R + r) = pidx(j * P + q * R) + 17 * k + r.
      float* s_mine = s_row + pidx(j * P + q * R);
      float v[R][K2];
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int k = 0; k < K2; ++k) v[r][k] = s_mine[17 * k + r];
      }
#pragma unroll
      for (int h = 1; h < K2; h *= 2) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int k = 0; k < K2; ++k) {
            if ((k & h) == 0) {
              const float a = v[r][k], b = v[r][k + h];
              v[r][k] = __fadd_rn(a, b);
              v[r][k + h] = __fsub_rn(a, b);
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int k = 0; k < K2; ++k) s_mine[17 * k + r] = v[r][k];
      }
    }
  }
  __syncthreads();
  // Pass 3: the m x m matrix at position p, then scale and output.
  if (!active || local >= P) return;
  const int p = local;
  // P is a multiple of 16: pidx(jj * P + p) = pidx(p) + jj * (P + P / 16).
  constexpr int kColStride = P + P / 16;
  float* s_col = s_row + pidx(p);  // this thread's column: only this thread reads or writes it
  float col[M];
#pragma unroll
  for (int jj = 0; jj < M; ++jj) col[jj] = s_col[jj * kColStride];
  const float inv_out_scale = __frcp_rn(out_scale);
  const bool fast_q = reciprocal_ok(inv_out_scale);
  TOut* out_row = out + row * N + p;
  if (!other_matrix) {
    // Every output from the fast quotient without a branch; in the rare case that one of them
    // lies near a rounding boundary (or the scales rule the fast path out), all are redone with
    // the per-output decision, which overwrites them with the same codes or the exact ones. The
    // sums wait for that in the thread's own column of shared memory (its inputs are in `col`
    // by then): a redo that recomputed them with run-time signs took ~17 us, which a decode
    // step's few blocks could not hide.
    bool clear = fast_q;
#pragma unroll
    for (int i = 0; i < M; ++i) {
      const float acc = paley_row_sum<M>(i, col);
      if constexpr (sizeof(TOut) == 1) s_col[i * kColStride] = acc;
      out_row[i * P] = hadamard_output_unchecked<TOut>(acc, scale, inv_out_scale, clear);
    }
    if (sizeof(TOut) == 1 && !clear) {
#pragma unroll 1
      for (int i = 0; i < M; ++i) {
        out_row[i * P] = hadamard_output<TOut>(s_col[i * kColStride], scale, out_scale,
                                               inv_out_scale, fast_q, rule);
      }
    }
  } else {
    for (int i = 0; i < M; ++i) {
      const float* h_row = s_h + i * M;
      float acc = __fmul_rn(h_row[0], col[0]);
#pragma unroll
      for (int jj = 1; jj < M; ++jj) acc = __fmaf_rn(h_row[jj], col[jj], acc);
      out_row[i * P] = hadamard_output<TOut>(acc, scale, out_scale, inv_out_scale, fast_q, rule);
    }
  }
}

// ---- m = 1, 1024 <= P <= 8192: radix-16 passes through shared memory ----
// The generic kernel runs the strides from 32 * EPT up through shared memory one stage at a time
// (a barrier pair per stage: eight barriers at P = 4096, one row per 512-thread block), which
// made it latency-bound (~3x its HBM time at 1.4B's n = 4096). Here T = P / 16 threads share a
// row and each pass runs four stages (strides S, 2S, 4S, 8S) on 16 elements in registers:
//   pass 0, S = 1: thread t loads elements 16t .. 16t + 15 from global memory;
//   pass with S >= 16: group (hi, lo) holds elements hi * 16 S + k S + lo, k < 16 (the last pass
//   has radix P / S < 16 when P is not a power of 16, and each thread then takes 16 / radix groups);
// each pass writes its elements back where it read them, so one barrier separates two passes, and
// the last pass writes the outputs from registers. Stages run in the reference's order (stride 1
// first) with its rounded a + b, a - b: bit-identical. Shared-memory index pidx(pos) =
// pos + pos / 16: pass 0's stores (16 consecutive floats per thread, stride 17) and the S = 16
// pass (two half-warps 272 floats apart) are conflict-free, the passes with S >= 256 (32
// consecutive positions per warp) take two wavefronts on one bank; every access of a thread is
// its base plus a compile-time offset.
template <int P>
struct Pow2Shape {
  static constexpr int kRowThreads = P / 16;
  static constexpr int kRowsPerBlock = kRowThreads >= 256 ? 1 : 256 / kRowThreads;
  static constexpr int kThreads = kRowsPerBlock * kRowThreads;
  static constexpr int kRowFloats = P + P / 16;
  static constexpr int kLastStride = P <= 4096 ? 256 : 4096;  // pow2_passes' last S
};

// One pass with stride S >= 16 (radix R = min(16, P / S)) over this thread's 16 / R groups: load
// from shared memory, R-point butterflies in registers; stored back unless it is the last pass.
template <int P, int S>
__device__ __forceinline__ void pow2_pass(float* s_row, int t, float (&v)[16]) {
  constexpr int R = 16 * S <= P ? 16 : P / S;
  constexpr int G = 16 / R;  // groups per thread
  constexpr int T = Pow2Shape<P>::kRowThreads;
  static_assert(S >= 16 && R >= 2 && (S % 16) == 0 && (T % 16) == 0, "pass shape");
  // Group gi = t + g T: lo = gi % S, hi = gi / S; element k at hi * R S + k S + lo. With S = 16
  // (R = 16, G = 1) lo < 16, so pidx(hi * 256 + 16 k + lo) = pidx(hi * 256 + lo) + 17 k; with
  // S >= 256, lo = t + g T and the group's start are multiples of 16 apart from t's position.
  const int lo0 = t % S, hi0 = t / S;
  float* base = s_row + pidx(hi0 * R * S + lo0);
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int k = 0; k < R; ++k) v[g * R + k] = base[pidx(g * T) + pidx(k * S)];
  }
  butterflies_in_registers<R>(v);
  if constexpr (S * R < P) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int k = 0; k < R; ++k) base[pidx(g * T) + pidx(k * S)] = v[g * R + k];
    }
  }
}

template <int P, int S>
__device__ __forceinline__ void pow2_passes(float* s_row, int t, float (&v)[16]) {
  static_assert(S * 16 < P || S == Pow2Shape<P>::kLastStride, "kLastStride");
  pow2_pass<P, S>(s_row, t, v);
  if constexpr (S * 16 < P) {
    __syncthreads();
    pow2_passes<P, S * 16>(s_row, t, v);
  }
}

template <int P, typename TIn, typename TOut>
__global__ void __launch_bounds__(Pow2Shape<P>::kThreads)
    hadamard_pow2_kernel(const TIn* __restrict__ x, TOut* __restrict__ out, int64_t rows,
                         float scale, float out_scale, Rounding rule) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  using S = Pow2Shape<P>;
  constexpr int T = S::kRowThreads;
  extern __shared__ __align__(16) float smem[];
  const int rib = threadIdx.x / T;
  const int t = threadIdx.x - rib * T;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * S::kRowsPerBlock + rib;
  // Rows past the end still reach the barriers; they load nothing and store nothing.
  const bool active = row < rows;
  float* s_row = smem + rib * S::kRowFloats;

  // Pass 0: strides 1 .. 8 on 16 consecutive elements.
  float v[16];
  if (active) {
    load8<TIn, true>(x + row * P + 16 * t, *reinterpret_cast<float(*)[8]>(v));
    load8<TIn, true>(x + row * P + 16 * t + 8, *reinterpret_cast<float(*)[8]>(v + 8));
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = 0.0f;
  }
  butterflies_in_registers<16>(v);
  float* s_mine = s_row + pidx(16 * t);  // 16 t is a multiple of 16: pidx(16 t + i) = that + i
#pragma unroll
  for (int i = 0; i < 16; ++i) s_mine[i] = v[i];
  __syncthreads();
  pow2_passes<P, 16>(s_row, t, v);
  if (!active) return;

  // Outputs: the last pass (stride S_last = P / R) left element g T + t + k S_last in
  // v[g R + k]; for every (g, k) a warp writes 32 consecutive outputs.
  constexpr int kLastS = Pow2Shape<P>::kLastStride;
  constexpr int R = P / kLastS, G = 16 / R;
  static_assert(kLastS * R == P && R >= 2 && R <= 16, "last pass shape");
  TOut* out_row = out + row * P + t;
  const float inv_out_scale = __frcp_rn(out_scale);
  const bool fast_q = reciprocal_ok(inv_out_scale);
  bool clear = fast_q;
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int k = 0; k < R; ++k) {
      out_row[g * T + k * kLastS] =
          hadamard_output_unchecked<TOut>(v[g * R + k], scale, inv_out_scale, clear);
    }
  }
  if (sizeof(TOut) == 1 && !clear) {  // rare: the per-output decision for every output again
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int k = 0; k < R; ++k) {
        out_row[g * T + k * kLastS] = hadamard_output<TOut>(v[g * R + k], scale, out_scale,
                                                             inv_out_scale, fast_q, rule);
      }
    }
  }
}

template <int P, typename TIn, typename TOut>
cudaError_t launch_pow2(const HadamardArgs& a, cudaStream_t stream) {
  using S = Pow2Shape<P>;
  const size_t smem = sizeof(float) * S::kRowsPerBlock * S::kRowFloats;
  launch::launch_kernel(hadamard_pow2_kernel<P, TIn, TOut>, blocks_for(a.rows, S::kRowsPerBlock),
                        S::kThreads, smem, stream, static_cast<const TIn*>(a.x),
                        static_cast<TOut*>(a.out), a.rows, a.scale, a.out_scale,
                        static_cast<Rounding>(a.rounding));
  return cudaGetLastError();
}

// The power-of-two kernel for n = P when it has one; cudaErrorNotSupported otherwise.
template <typename TIn, typename TOut>
cudaError_t try_pow2(const HadamardArgs& a, int p, cudaStream_t stream) {
  switch (p) {
    case 1024: return launch_pow2<1024, TIn, TOut>(a, stream);
    case 2048: return launch_pow2<2048, TIn, TOut>(a, stream);
    case 4096: return launch_pow2<4096, TIn, TOut>(a, stream);
    case 8192: return launch_pow2<8192, TIn, TOut>(a, stream);
    default: return cudaErrorNotSupported;
  }
}

template <int M, int P, typename TIn, typename TOut>
cudaError_t launch_paley(const HadamardArgs& a, cudaStream_t stream) {
  using S = PaleyShape<M, P>;
  const size_t smem = sizeof(float) * S::kSmemFloats;
  auto kernel = hadamard_paley_kernel<M, P, TIn, TOut>;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  launch::launch_kernel(kernel, blocks_for(a.rows, S::kRowsPerBlock), S::kThreads, smem, stream,
      static_cast<const TIn*>(a.x), static_cast<TOut*>(a.out), a.h_m, a.rows, a.scale,
      a.out_scale, static_cast<Rounding>(a.rounding));
  return cudaGetLastError();
}

// The Paley kernel for (m, P) when it has one; cudaErrorNotSupported otherwise.
template <typename TIn, typename TOut>
cudaError_t try_paley(const HadamardArgs& a, int p, cudaStream_t stream) {
  if (!(is_aligned(a.x, sizeof(TIn) * 8) && is_aligned(a.out, sizeof(TOut) * 8))) {
    return cudaErrorNotSupported;
  }
#define QUAMBA_PALEY_CASES(M)                                         \
  switch (p) {                                                        \
    case 16: return launch_paley<M, 16, TIn, TOut>(a, stream);        \
    case 32: return launch_paley<M, 32, TIn, TOut>(a, stream);        \
    case 64: return launch_paley<M, 64, TIn, TOut>(a, stream);        \
    case 128: return launch_paley<M, 128, TIn, TOut>(a, stream);      \
    case 256: return launch_paley<M, 256, TIn, TOut>(a, stream);      \
    default: return cudaErrorNotSupported;                            \
  }
  if (a.m == 12) QUAMBA_PALEY_CASES(12)
  if (a.m == 20) QUAMBA_PALEY_CASES(20)
#undef QUAMBA_PALEY_CASES
  return cudaErrorNotSupported;
}

template <typename TIn, typename TOut>
cudaError_t run(const HadamardArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  if (a.n < 1 || a.n > kHadamardMaxSize || a.n % a.m != 0) return cudaErrorInvalidValue;
  if (a.m > 1 && a.h_m == nullptr) return cudaErrorInvalidValue;
  const int p = static_cast<int>(a.n / a.m);
  if ((p & (p - 1)) != 0) return cudaErrorInvalidValue;
  // Vector access needs 8-element alignment of every row start (n % 8 == 0 when P >= 8).
  if (p >= 8 && !(is_aligned(a.x, sizeof(TIn) * 8) && is_aligned(a.out, sizeof(TOut) * 8))) {
    return cudaErrorMisalignedAddress;
  }
  if (a.m > 1) {
    const cudaError_t paley = try_paley<TIn, TOut>(a, p, stream);
    if (paley != cudaErrorNotSupported) return paley;
  }
  if (a.m == 1) {  // the alignment for 16-element loads is the one checked above (P >= 8)
    const cudaError_t pow2 = try_pow2<TIn, TOut>(a, p, stream);
    if (pow2 != cudaErrorNotSupported) return pow2;
  }
  const int ept = p < 8 ? p : 8;
  HadamardShape shape;
  shape.rows = a.rows;
  shape.n = a.n;
  shape.m = a.m;
  shape.p = p;
  shape.tps = p / ept;
  shape.tpr = a.m * shape.tps;
  shape.rpb = shape.tpr >= 256 ? 1 : 256 / shape.tpr;
  shape.row_stride = padded_row(a.n);
  const int threads = (shape.rpb * shape.tpr + 31) / 32 * 32;
  const size_t smem =
      sizeof(float) * ((a.m * a.m + 3) / 4 * 4 + static_cast<size_t>(shape.rpb) * shape.row_stride);
  const unsigned int blocks = blocks_for(a.rows, shape.rpb);
  const TIn* x = static_cast<const TIn*>(a.x);
  TOut* out = static_cast<TOut*>(a.out);
  const Rounding rule = static_cast<Rounding>(a.rounding);
#define QUAMBA_HADAMARD_LAUNCH(EPT)                                                            \
  launch::launch_kernel(hadamard_kernel<EPT, TIn, TOut>, blocks, threads, smem, stream, x, out, \
                        a.h_m, shape,                                                  \
                                                                     a.scale, a.out_scale, rule)
  switch (ept) {
    case 1: QUAMBA_HADAMARD_LAUNCH(1); break;
    case 2: QUAMBA_HADAMARD_LAUNCH(2); break;
    case 4: QUAMBA_HADAMARD_LAUNCH(4); break;
    default: QUAMBA_HADAMARD_LAUNCH(8); break;
  }
#undef QUAMBA_HADAMARD_LAUNCH
  return cudaGetLastError();
}

template <typename TIn>
cudaError_t dispatch_out(const HadamardArgs& a, cudaStream_t stream) {
  switch (a.out_type) {
    case ElemType::Int8: return run<TIn, int8_t>(a, stream);
    case ElemType::Float16: return run<TIn, __half>(a, stream);
    case ElemType::BFloat16: return run<TIn, __nv_bfloat16>(a, stream);
    case ElemType::Float32: return run<TIn, float>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_hadamard(const HadamardArgs& a, cudaStream_t stream) {
  switch (a.x_type) {
    case ElemType::Float16: return dispatch_out<__half>(a, stream);
    case ElemType::BFloat16: return dispatch_out<__nv_bfloat16>(a, stream);
    case ElemType::Float32: return dispatch_out<float>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace quamba
