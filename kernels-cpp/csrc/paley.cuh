#pragma once
// Pieces of the Hadamard transform shared by the Paley Hadamard kernel and the persistent decode
// kernel: the m x m matrices (m = 12, 20) of Paley's construction I, the same matrices as
// quamba_kernels.hadamard.base_matrix, as compile-time signs; the butterflies in registers.
#include <cstdint>

namespace quamba {

__host__ __device__ constexpr uint32_t quadratic_residue_mask(int q) {
  uint32_t mask = 0;
  for (int a = 1; a < q; ++a) mask |= 1u << ((a * a) % q);
  return mask;
}

// Entry (i, j) of Paley I of order m = q + 1: H = I + S, S = [[0, 1^T], [-1, Q]],
// Q[i, j] = chi(j - i) (quamba_kernels.hadamard.base_matrix).
template <int M>
__host__ __device__ constexpr int paley_entry(int i, int j) {
  constexpr int q = M - 1;
  constexpr uint32_t residues = quadratic_residue_mask(q);
  if (i == j) return 1;
  if (i == 0) return 1;
  if (j == 0) return -1;
  const int d = ((j - i) % q + q) % q;
  return ((residues >> d) & 1u) ? 1 : -1;
}

// The butterfly stages with strides 1 .. R / 2 on each group of R consecutive elements of v
// (N / R groups): element k pairs with k + h inside each block of 2h, giving the reference's
// rounded (a + b, a - b).
template <int R, int N>
__device__ __forceinline__ void butterflies_in_registers(float (&v)[N]) {
  static_assert(R >= 2 && N % R == 0, "R divides N");
#pragma unroll
  for (int h = 1; h < R; h *= 2) {
#pragma unroll
    for (int g = 0; g < N / R; ++g) {
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if ((k & h) == 0) {
          const float a = v[g * R + k], b = v[g * R + k + h];
          v[g * R + k] = __fadd_rn(a, b);
          v[g * R + k + h] = __fsub_rn(a, b);
        }
      }
    }
  }
}

}  // namespace quamba
