#pragma once
// The m x m matrices of the Hadamard transform (m = 12, 20): Paley's construction I, the same
// matrices as quamba_kernels.hadamard.base_matrix, as compile-time signs (the Paley Hadamard
// kernel and the persistent decode kernel).
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

}  // namespace quamba
