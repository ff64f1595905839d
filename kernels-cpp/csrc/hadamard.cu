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
// Shared memory rows are padded by 4 floats after every 32 (index pos + 4 * (pos / 32)): a thread's
// 8 consecutive elements stay contiguous (two 16-byte accesses) and the 8 threads of a 16-byte
// access phase hit 8 different bank quadruples.
#include "common.cuh"
#include "hadamard.h"

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
  hadamard_kernel<EPT, TIn, TOut><<<blocks, threads, smem, stream>>>(x, out, a.h_m, shape,     \
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
