#pragma once
// A whole W8A8 decode step (Mode 0's datapath, batch 1) in one persistent kernel: every layer's
// norm, in_proj, conv update, x_proj, scan step with dt_proj, Hadamard and out_proj, with the same
// arithmetic as the per-op kernels (the same bits). See decode_w8a8.cu.
#include <cstdint>
#include <cuda_runtime.h>

namespace quamba {

// One layer: its weights and states (device pointers) and the constants the per-op kernels get.
struct DecodeLayer {
  const float* norm_w = nullptr;      // (D,) float32
  const int8_t* w_in = nullptr;       // (2E, D)
  const int8_t* conv_w = nullptr;     // (E, 4)
  const int8_t* conv_b = nullptr;     // (E,) or null
  const int8_t* w_x = nullptr;        // w_x (R + 2N, E) as column slabs: decode_x_slab_columns
  const int8_t* w_dt = nullptr;       // (E, R)
  const int8_t* A_log = nullptr;      // (E, N)
  const int8_t* D = nullptr;          // (E,) or null
  const int8_t* dt_bias = nullptr;    // (E,) or null
  const int8_t* w_out = nullptr;      // (D, E)
  int8_t* conv_state = nullptr;       // (E, 3), updated in place
  int8_t* ssm_state = nullptr;        // (E, N), updated in place
  double conv_s_b = 1.0;              // the conv bias scale (bias = float32(b_q * s_b))
  float eps = 1e-5f, s_in = 1.0f;     // norm: eps, output scale
  float in_scale = 1.0f, s_xz = 1.0f;      // in_proj: float32(s_in * s_w_in), output scale
  float conv_scale = 1.0f, s_u = 1.0f;     // conv: float32(s_xz * s_w_conv), output scale
  float x_scale = 1.0f, s_xo = 1.0f;       // x_proj: float32(s_u * s_w_x), output scale
  float dt_scale = 1.0f, s_dt = 1.0f;      // dt_proj: float32(s_xo * s_w_dt), output scale
  float s_A = 1.0f, s_D = 1.0f, s_dtb = 1.0f, s_h = 1.0f;
  float had_scale = 1.0f, s_had = 1.0f;    // Hadamard: float32(1 / sqrt(E)), output scale
  float out_scale = 1.0f;                  // out_proj: float32(s_had * s_w_out), float16 out
  int round_norm = 1, round_gemm = 1, round_conv = 0, round_state = 0, round_had = 0;
};

struct DecodeArgs {
  const DecodeLayer* layers = nullptr;  // device array of n_layers
  int n_layers = 0;
  int64_t d_model = 0, d_inner = 0, dt_rank = 0, d_state = 0;
  int had_m = 1;                        // d_inner = had_m * 2^k, had_m in {1, 12, 20}; the
                                        // m x m matrix is Paley I (paley.cuh)
  const void* hidden_in = nullptr;      // (D,) float16: the token's embedding
  void* hidden_out = nullptr;           // (D,) float16: the last layer's out_proj output
  float* residual_out = nullptr;        // (D,) float32: the last layer's residual
  uint64_t* exchange = nullptr;         // decode_exchange_words(...) words, zeroed before the
                                        // first use
  int x_slab_blocks = 0;                // the grid the w_x slabs were laid out for (the SMs)
  unsigned* counters = nullptr;         // 2 words (epoch, arrivals), zeroed before the first use
  int inflight = 3;                     // bulk weight copies in flight per block, at most
  // Optional (null: off): per block, the cycles its first consumer thread spent in each of the
  // decode_phase_count() phases (poll of the norm's input, norm, in_proj, conv, x_proj's partial
  // sums, poll of x_proj's sums, dt_proj, scan, poll of y, Hadamard butterflies, the Hadamard's
  // m x m matrix and codes, out_proj).
  long long* timing = nullptr;
};

constexpr int decode_phase_count() { return 12; }

// Shapes the kernel takes (the reason in `why` otherwise).
bool decode_w8a8_shapes_ok(int64_t d_model, int64_t d_inner, int64_t dt_rank, int64_t d_state,
                           int had_m, const char** why);
// Words of the exchange workspace for these shapes.
int64_t decode_exchange_words(int64_t d_model, int64_t d_inner, int64_t dt_rank, int64_t d_state,
                              int n_layers);
// x_proj's weight (R + 2N, E) as the kernel reads it on a grid of G = `blocks` (one per SM): the
// columns of block b's channels [c0, c1), c0 = 4 floor(b (E / 4) / G), c1 = 4 floor((b + 1) (E / 4)
// / G), as a (R + 2N, columns) row-major slab, zero beyond c1 - c0, the G slabs one after another
// (G x (R + 2N) x columns bytes). This is the column count (a multiple of 16).
int64_t decode_x_slab_columns(int64_t d_inner, int blocks);
// Whether the device can run it (compute capability 9.0+, this build has the sm_90 code).
bool decode_w8a8_device_ok(int device);
cudaError_t launch_decode_w8a8(const DecodeArgs& args, cudaStream_t stream);

}  // namespace quamba
