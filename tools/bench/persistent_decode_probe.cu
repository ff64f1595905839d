// Can a persistent decode kernel get a W8A8 decode step near its weight-streaming floor?
//
// The question docs/design.md ("Decode") leaves open for the persistent decode kernel: one grid of
// one block per SM that streams every layer's weights through a shared-memory ring (a producer
// warp issuing 1-D bulk copies, consumer warps reading the stages in order) while the consumers
// meet between the phases of a layer. If the producer keeps HBM busy while the consumers wait, a
// layer costs max(weight bytes / bandwidth, the consumers' chain) instead of their sum. This probe
// times that structure with a layer's real byte counts and stand-in work:
//   - each block's share of a layer's weights in 8 KB stages, phase by phase (in_proj, x_proj,
//     dt_proj, out_proj), consumed with dp4a as a GEMV would (stage i by consumer warp i % 8);
//   - after each phase a boundary: a chain of `chain` dependent FMAs (a small phase's latency:
//     conv, scan step, Hadamard, norm), then every block publishes 8 words and reads every
//     block's words (what the next phase needs from all of them: the conv's codes for x_proj,
//     x_proj's outputs for the scan, y for the Hadamard, out_proj's output for the next norm),
//     either behind a grid barrier (counter) or with the words tagged by the boundary's number
//     (tagged: polling the words is the barrier);
//   - the producer keeps at most `in flight` copies issued and not landed (the ring holds 24).
// Modes: stream (no boundaries), boundaries (one stage per phase), full (both). Nothing here is
// model arithmetic: it times the structure, not the model.
//
// tools/bench/persistent_decode_probe.py builds and runs it and records the result with its
// provenance (tools/gpu_check.sh runs that with PROBE=1). By hand, on an sm_90 GPU:
//   nvcc -std=c++17 -O3 -arch=sm_90a -Ikernels-cpp/csrc tools/bench/persistent_decode_probe.cu \
//     -o /tmp/persistent_decode_probe && /tmp/persistent_decode_probe [--json FILE]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tma.cuh"

#define CHECK(call)                                                                       \
  do {                                                                                    \
    cudaError_t err_ = (call);                                                            \
    if (err_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                  \
                   cudaGetErrorString(err_));                                             \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

namespace {

constexpr int kStage = 8192;           // bytes per ring stage
constexpr int kRing = 24;              // stages in the ring (192 KB)
constexpr int kConsumerWarps = 8;
constexpr int kConsumers = kConsumerWarps * 32;
constexpr int kThreads = kConsumers + 32;  // + one producer warp
constexpr int kExchangeWords = 8;  // 64-bit words each block publishes per boundary

// How the blocks meet at a boundary:
//   kCounter: a grid barrier (monotonic counter, zeroed before the launch: barrier k completes at
//     (k + 1) * blocks arrivals), then every block reads the words all blocks wrote before it;
//   kTagged: no barrier: each word carries its boundary's number in its upper half (one 64-bit
//     store, single-copy atomic), and the readers poll every block's words until they carry the
//     current number: the exchange is the barrier, one round trip instead of three.
enum class Sync : int { kCounter = 0, kTagged = 1 };

struct Plan {
  int layers;
  int stages[4];                          // per block per layer: in_proj, x_proj, dt_proj, out_proj
  int chain;                              // dependent FMAs per boundary
  int inflight;                           // bulk copies issued and not yet landed, at most
  bool boundaries;
  Sync sync;
};

__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kConsumers) : "memory");
}

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Grid barrier among the consumer warps of every block (the producer keeps streaming).
__device__ __forceinline__ void grid_barrier(unsigned* counter, unsigned target) {
  consumers_sync();
  if (threadIdx.x == 32) {
    __threadfence();
    atomicAdd(counter, 1u);
    while (load_acquire(counter) < target) {
    }
    __threadfence();
  }
  consumers_sync();
}

// Per block: cycles of the first consumer thread in the loop, waiting for stages, in boundaries.
struct Stats {
  long long total, wait_stages, boundaries;
};

__global__ void __launch_bounds__(kThreads, 1)
    probe_kernel(const int4* __restrict__ weights, uint64_t* exchange, unsigned* counter,
                 int* sink, Stats* stats, Plan plan) {
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ uint64_t full[kRing], empty[kRing];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int stages_per_layer = plan.stages[0] + plan.stages[1] + plan.stages[2] + plan.stages[3];
  const int64_t total = static_cast<int64_t>(plan.layers) * stages_per_layer;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kRing; ++s) {
      quamba::async::barrier_init(&full[s], 1);
      quamba::async::barrier_init(&empty[s], 1);  // one consumer warp per stage
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == 0) {  // producer: this block's stages of every layer, in consumption order
    if (lane == 0) {
      const unsigned char* base = reinterpret_cast<const unsigned char*>(weights);
      for (int64_t i = 0; i < total; ++i) {
        const int slot = static_cast<int>(i % kRing);
        if (i >= kRing) quamba::async::barrier_wait(&empty[slot], static_cast<int>((i / kRing - 1) & 1));
        // At most plan.inflight copies on their way: a deeper queue of bulk copies delays every
        // other load of this SM (the boundaries' polls) behind it.
        if (i >= plan.inflight) {
          const int64_t landed = i - plan.inflight;
          quamba::async::barrier_wait(&full[landed % kRing], static_cast<int>((landed / kRing) & 1));
        }
        const int64_t layer = i / stages_per_layer, j = i % stages_per_layer;
        const int64_t offset =
            ((layer * gridDim.x + blockIdx.x) * stages_per_layer + j) * static_cast<int64_t>(kStage);
        quamba::async::barrier_expect_bytes(&full[slot], kStage);
        quamba::async::bulk_load_1d(ring + slot * kStage, base + offset, kStage, &full[slot]);
      }
    }
    return;
  }

  const int ct = threadIdx.x - 32;  // consumer thread
  const int4 x = make_int4(0x01020304, 0x05060708, 0x090a0b0c, 0x0d0e0f10);
  int acc = 0;
  float chain_value = static_cast<float>(blockIdx.x);
  unsigned boundaries = 0;
  long long t_wait = 0, t_boundary = 0;
  const long long t_start = clock64();
  auto boundary = [&](int layer) {
    const long long t0 = clock64();
    float v = chain_value + static_cast<float>(acc & 7);
    for (int k = 0; k < plan.chain; ++k) v = fmaf(v, 0.999f, 1e-3f);
    chain_value = v;
    const int64_t half = boundaries % 2;  // alternate halves: the next boundary's writes
    ++boundaries;
    uint64_t* words = exchange + half * gridDim.x * kExchangeWords;
    const int items = gridDim.x * kExchangeWords;
    consumers_sync();  // the block's phase is done before it publishes
    if (ct < kExchangeWords) {
      const uint32_t data = static_cast<uint32_t>(acc) ^ __float_as_uint(v) ^ layer;
      quamba::async::store_relaxed_gpu(&words[blockIdx.x * kExchangeWords + ct],
                    (static_cast<uint64_t>(boundaries) << 32) | data);
    }
    if (plan.sync == Sync::kCounter) {
      grid_barrier(counter, boundaries * gridDim.x);
      for (int i = ct; i < items; i += kConsumers) {
        acc += static_cast<int>(quamba::async::load_relaxed_gpu(&words[i]));
      }
    } else {
      for (int i = ct; i < items; i += kConsumers) {
        uint64_t w;
        do {
          w = quamba::async::load_relaxed_gpu(&words[i]);
        } while (static_cast<uint32_t>(w >> 32) != boundaries);
        acc += static_cast<int>(w);
      }
      consumers_sync();  // every block's words seen by some thread of this block
    }
    t_boundary += clock64() - t0;
  };

  // Stage i goes to consumer warp i % kConsumerWarps (as a GEMV's warps own rows); kRing is a
  // multiple of the warps, so a slot's successive stages have one owner, who waits for them in
  // order (a parity wait cannot tell a phase from the one two ahead). A boundary starts when
  // every warp has consumed its stages of the phase.
  static_assert(kRing % kConsumerWarps == 0, "a slot's stages must have one owner");
  const int cw = warp - 1;
  for (int layer = 0; layer < plan.layers; ++layer) {
    int phase_begin = 0;
    for (int phase = 0; phase < 4; ++phase) {
      const int phase_end = phase_begin + plan.stages[phase];
      const int64_t layer_first = static_cast<int64_t>(layer) * stages_per_layer;
      const int skip = static_cast<int>(((cw - (layer_first + phase_begin)) % kConsumerWarps +
                                         kConsumerWarps) % kConsumerWarps);
      for (int j = phase_begin + skip; j < phase_end; j += kConsumerWarps) {
        const int64_t i = layer_first + j;
        const int slot = static_cast<int>(i % kRing);
        const long long t0 = clock64();
        quamba::async::barrier_wait(&full[slot], static_cast<int>((i / kRing) & 1));
        t_wait += clock64() - t0;
        const int4* stage = reinterpret_cast<const int4*>(ring + slot * kStage);
        int part[4] = {0, 0, 0, 0};
#pragma unroll
        for (int p = 0; p < kStage / 16 / 32; ++p) {
          const int4 w = stage[p * 32 + lane];
          int& a = part[p % 4];
          a = __dp4a(w.x, x.x, a);
          a = __dp4a(w.y, x.y, a);
          a = __dp4a(w.z, x.z, a);
          a = __dp4a(w.w, x.w, a);
        }
        acc += part[0] + part[1] + part[2] + part[3];
        __syncwarp();
        if (lane == 0) quamba::async::barrier_arrive(&empty[slot]);
      }
      phase_begin = phase_end;
      if (plan.boundaries) boundary(layer);
    }
  }
  sink[blockIdx.x * kConsumers + ct] = acc + static_cast<int>(chain_value);
  if (ct == 0) stats[blockIdx.x] = Stats{clock64() - t_start, t_wait, t_boundary};
}

// Plain read of `bytes` (the bandwidth a streaming kernel can reach, for the floor).
__global__ void read_kernel(const int4* __restrict__ p, int64_t n, int* sink) {
  int acc = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int4 v = __ldcs(p + i);
    acc ^= v.x + v.y + v.z + v.w;
  }
  if (acc == 0x7fffffff) sink[0] = acc;
}

struct Model {
  const char* name;
  int64_t d_model, d_inner, dt_rank, d_state, layers;
};

int stages_for(int64_t bytes, int blocks) {
  return static_cast<int>((bytes + static_cast<int64_t>(blocks) * kStage - 1) /
                          (static_cast<int64_t>(blocks) * kStage));
}

// A block's stages of one layer's weights, phase by phase: in_proj (2E x D), x_proj
// ((R + 2N) x E), dt_proj (E x R), out_proj (D x E), each split evenly over the blocks.
void layer_stages(const Model& m, int blocks, int (&stages)[4]) {
  stages[0] = stages_for(2 * m.d_inner * m.d_model, blocks);
  stages[1] = stages_for((m.dt_rank + 2 * m.d_state) * m.d_inner, blocks);
  stages[2] = stages_for(m.d_inner * m.dt_rank, blocks);
  stages[3] = stages_for(m.d_model * m.d_inner, blocks);
}

int64_t plan_bytes(const int (&stages)[4], int blocks) {
  return static_cast<int64_t>(blocks) * (stages[0] + stages[1] + stages[2] + stages[3]) * kStage;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // rows appear as they are measured
  const char* json_path = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc) json_path = argv[++i];
  }
  int device = 0, sms = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, device));
  const size_t smem = static_cast<size_t>(kRing) * kStage;
  CHECK(cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)));
  int per_sm = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, probe_kernel, kThreads, smem));
  if (per_sm != 1) {
    std::fprintf(stderr, "expected one block per SM, got %d\n", per_sm);
    return 1;
  }
  const int blocks = sms;  // co-resident: the grid barrier needs every block on an SM

  const Model models[] = {{"2.8b", 2560, 5120, 160, 16, 64}, {"1.4b", 2048, 4096, 128, 16, 48},
                          {"130m", 768, 1536, 48, 16, 24}};
  int64_t max_bytes = 0;
  for (const Model& m : models) {
    int stages[4];
    layer_stages(m, blocks, stages);
    const int64_t bytes = m.layers * plan_bytes(stages, blocks);
    if (bytes > max_bytes) max_bytes = bytes;
  }
  int4* weights = nullptr;
  uint64_t* exchange = nullptr;
  unsigned* counter = nullptr;
  Stats* stats = nullptr;
  int* sink = nullptr;
  CHECK(cudaMalloc(&weights, max_bytes));
  CHECK(cudaMemset(weights, 0x5a, max_bytes));
  const size_t exchange_bytes = 2 * static_cast<size_t>(blocks) * kExchangeWords * sizeof(uint64_t);
  CHECK(cudaMalloc(&exchange, exchange_bytes));
  CHECK(cudaMalloc(&stats, static_cast<size_t>(blocks) * sizeof(Stats)));
  CHECK(cudaMalloc(&counter, sizeof(unsigned)));
  CHECK(cudaMalloc(&sink, static_cast<size_t>(blocks) * kConsumers * sizeof(int)));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  auto median_ms = [&](auto&& launch) {
    std::vector<float> times;
    for (int rep = 0; rep < 7; ++rep) {
      CHECK(cudaMemset(counter, 0, sizeof(unsigned)));
      CHECK(cudaMemset(exchange, 0, exchange_bytes));
      CHECK(cudaEventRecord(start));
      launch();
      CHECK(cudaEventRecord(stop));
      CHECK(cudaEventSynchronize(stop));
      CHECK(cudaGetLastError());
      float ms = 0;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      times.push_back(ms);
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
  };

  // Read bandwidth of the whole buffer (L2-cold: it is ~50x the L2).
  const float read_ms = median_ms([&] {
    read_kernel<<<4 * sms, 512>>>(weights, max_bytes / 16, sink);
  });
  const double read_gbs = max_bytes / (read_ms * 1e-3) / 1e9;
  void* copy_dst = nullptr;
  const size_t copy_bytes = 1ull << 30;
  CHECK(cudaMalloc(&copy_dst, copy_bytes));
  const float copy_ms = median_ms([&] {
    CHECK(cudaMemcpyAsync(copy_dst, weights, copy_bytes, cudaMemcpyDeviceToDevice));
  });
  CHECK(cudaFree(copy_dst));
  const double copy_gbs = 2.0 * copy_bytes / (copy_ms * 1e-3) / 1e9;
  std::printf("%s, %d SMs; read %.0f GB/s, copy %.0f GB/s (read + write)\n", prop.name, sms,
              read_gbs, copy_gbs);
  std::printf(
      "| model | mode | sync | chain | in flight | us per layer | weight GB/s | floor us | / floor | waiting "
      "for stages | in boundaries | us per boundary |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");

  std::string json = "{\"device\": \"" + std::string(prop.name) + "\", \"sms\": " +
                     std::to_string(sms) + ", \"read_gbs\": " + std::to_string(read_gbs) +
                     ", \"copy_gbs\": " + std::to_string(copy_gbs) + ", \"rows\": [";
  bool first = true;
  std::vector<Stats> host_stats(blocks);
  for (const Model& m : models) {
    Plan base{};
    base.layers = static_cast<int>(m.layers);
    layer_stages(m, blocks, base.stages);
    const int64_t layer_bytes = plan_bytes(base.stages, blocks);
    const double floor_us = layer_bytes / read_gbs / 1e3;
    struct Case {
      const char* mode;
      bool weights, boundaries;
      Sync sync;
      int chain, inflight;
    };
    const Case cases[] = {{"stream", true, false, Sync::kCounter, 0, kRing},
                          {"stream", true, false, Sync::kCounter, 0, 4},
                          {"boundaries", false, true, Sync::kCounter, 0, kRing},
                          {"boundaries", false, true, Sync::kTagged, 0, kRing},
                          {"full", true, true, Sync::kCounter, 0, kRing},
                          {"full", true, true, Sync::kCounter, 0, 4},
                          {"full", true, true, Sync::kTagged, 0, kRing},
                          {"full", true, true, Sync::kTagged, 0, 8},
                          {"full", true, true, Sync::kTagged, 0, 4},
                          {"full", true, true, Sync::kTagged, 0, 2},
                          {"full", true, true, Sync::kTagged, 250, 4},
                          {"full", true, true, Sync::kTagged, 500, 4},
                          {"full", true, true, Sync::kTagged, 1000, 4}};
    for (const Case& c : cases) {
      Plan plan = base;
      plan.boundaries = c.boundaries;
      plan.sync = c.sync;
      plan.chain = c.chain;
      plan.inflight = c.inflight;
      // Boundaries only: one stage per phase (the inner boundaries are placed by stage index).
      if (!c.weights) plan.stages[0] = plan.stages[1] = plan.stages[2] = plan.stages[3] = 1;
      const int64_t bytes = plan_bytes(plan.stages, blocks);
      const float ms = median_ms([&] {
        probe_kernel<<<blocks, kThreads, smem>>>(weights, exchange, counter, sink, stats, plan);
      });
      CHECK(cudaMemcpy(host_stats.data(), stats, blocks * sizeof(Stats), cudaMemcpyDeviceToHost));
      double total = 0, wait = 0, bound = 0;
      for (const Stats& st : host_stats) {
        total += st.total;
        wait += st.wait_stages;
        bound += st.boundaries;
      }
      const double us_layer = ms * 1e3 / m.layers;
      const double gbs = bytes / (us_layer * 1e-6) / 1e9;
      const int per_layer = c.boundaries ? 4 : 0;
      const double us_boundary = per_layer ? bound / total * us_layer / per_layer : 0.0;
      const char* sync = !c.boundaries ? "-" : c.sync == Sync::kCounter ? "counter" : "tagged";
      std::printf("| %s | %s | %s | %d | %d | %.2f | %.0f | %.2f | %.2f | %.0f%% | %.0f%% | %.2f |\n",
                  m.name, c.mode, sync, c.chain, c.inflight, us_layer, gbs, floor_us, us_layer / floor_us,
                  100 * wait / total, 100 * bound / total, us_boundary);
      json += std::string(first ? "" : ", ") + "{\"model\": \"" + m.name + "\", \"mode\": \"" +
              c.mode + "\", \"sync\": \"" + sync + "\", \"chain\": " + std::to_string(c.chain) +
              ", \"inflight\": " + std::to_string(c.inflight) +
              ", \"us_per_layer\": " + std::to_string(us_layer) +
              ", \"floor_us\": " + std::to_string(floor_us) +
              ", \"layer_bytes\": " + std::to_string(bytes) +
              ", \"wait_fraction\": " + std::to_string(wait / total) +
              ", \"boundary_fraction\": " + std::to_string(bound / total) + "}";
      first = false;
    }
  }
  json += "]}\n";
  if (json_path != nullptr) {
    FILE* f = std::fopen(json_path, "w");
    if (f == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", json_path);
      return 1;
    }
    std::fputs(json.c_str(), f);
    std::fclose(f);
  }
  return 0;
}
