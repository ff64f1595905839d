// Batched int8 transpose through 64 x 64 shared-memory tiles with 16-byte global accesses.
#include "common.cuh"
#include "transpose.h"

namespace quamba {
namespace {

constexpr int kTile = 64;
constexpr int kPitch = kTile + 4;  // bytes per tile row: word-aligned, 2-way conflicts at most

// One 64 x 64 tile per block, 256 threads: thread t loads 16 bytes of input row t / 4 and stores
// 16 bytes of output row t / 4 (gathered from a column of the tile). 16-byte accesses when the
// whole segment is in range and vec_in / vec_out say the rows are 16-byte aligned (buffer aligned,
// row length a multiple of 16); byte accesses otherwise.
__global__ void __launch_bounds__(256)
    transpose_int8_kernel(const int8_t* __restrict__ x, int8_t* __restrict__ out, int64_t rows,
                          int64_t cols, bool vec_in, bool vec_out) {
  launch::start_after_prior_grids();  // first: see launch.cuh
  __shared__ __align__(16) int8_t tile[kTile][kPitch];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t plane = rows * cols;
  const int8_t* xb = x + static_cast<int64_t>(blockIdx.z) * plane;
  int8_t* ob = out + static_cast<int64_t>(blockIdx.z) * plane;
  const int line = threadIdx.x / 4;     // tile row (load) / tile column (store)
  const int seg = threadIdx.x % 4 * 16;  // first byte of the thread's 16

  {
    const int64_t r = r0 + line, c = c0 + seg;
    int8_t* dst = &tile[line][seg];
    if (vec_in && r < rows && c + 16 <= cols) {
      const uint4 v = *reinterpret_cast<const uint4*>(xb + r * cols + c);
      uint32_t* words = reinterpret_cast<uint32_t*>(dst);
      words[0] = v.x, words[1] = v.y, words[2] = v.z, words[3] = v.w;
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) dst[i] = r < rows && c + i < cols ? xb[r * cols + c + i] : 0;
    }
  }
  __syncthreads();
  {
    const int64_t c = c0 + line, r = r0 + seg;  // output row c, elements r .. r + 15
    if (c >= cols) return;
    uint32_t words[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      words[i / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(tile[seg + i][line]))
                      << (8 * (i % 4));
    }
    int8_t* dst = ob + c * rows + r;
    if (vec_out && r + 16 <= rows) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        if (r + i < rows) dst[i] = static_cast<int8_t>(words[i / 4] >> (8 * (i % 4)));
      }
    }
  }
}

}  // namespace

cudaError_t launch_transpose_int8(const int8_t* x, int8_t* out, int64_t batch, int64_t rows,
                                  int64_t cols, cudaStream_t stream) {
  if (batch == 0 || rows == 0 || cols == 0) return cudaSuccess;
  const int64_t col_tiles = (cols + kTile - 1) / kTile, row_tiles = (rows + kTile - 1) / kTile;
  if (col_tiles > 2147483647LL || row_tiles > 65535 || batch > 65535) return cudaErrorInvalidValue;
  const bool vec_in = cols % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const bool vec_out = rows % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles),
                  static_cast<unsigned>(batch));
  launch::launch_kernel(transpose_int8_kernel, grid, 256, 0, stream, x, out, rows, cols, vec_in,
                        vec_out);
  return cudaGetLastError();
}

}  // namespace quamba
