// nanobind module quamba_kernels._C. Validation only: every array is .noconvert() (never silently
// copied), outputs are passed in, every launch takes the caller's stream, runs on the array's device
// with the GIL released, and checks the launch error. The checks here repeat the Python wrappers'
// on purpose: a direct call with wrong shapes raises instead of reading out of bounds.
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "conv1d.h"
#include "decode_w8a8.h"
#include "elem_type.h"
#include "gemm_int8.h"
#include "hadamard.h"
#include "launch.h"
#include "quantize.h"
#include "rmsnorm.h"
#include "scan.h"
#include "transpose.h"
#include "x_proj.h"

namespace nb = nanobind;
using quamba::ElemType;

namespace {

template <typename T>
using CudaArray = nb::ndarray<T, nb::device::cuda, nb::c_contig>;
using AnyArray = nb::ndarray<nb::device::cuda, nb::c_contig>;
using OptArray = std::optional<AnyArray>;

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
}

// Makes the array's device current for the call and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device_id) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_id) check_cuda(cudaSetDevice(device_id), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls report their own
    return 0;
  }
  return n;
}

std::string device_error() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaSuccess) return n > 0 ? "" : "no CUDA device found";
  cudaGetLastError();
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// ---- argument checks ----

ElemType elem_type_of(const AnyArray& a, const std::string& name) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt.lanes == 1) {
    if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Int) && dt.bits == 8) {
      return ElemType::Int8;
    }
    if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && dt.bits == 16) {
      return ElemType::Float16;
    }
    if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16) {
      return ElemType::BFloat16;
    }
    if (dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float) && dt.bits == 32) {
      return ElemType::Float32;
    }
  }
  throw nb::type_error((name + " must be int8, float16, bfloat16 or float32").c_str());
}

void expect_type(const AnyArray& a, const std::string& name, ElemType want) {
  const ElemType got = elem_type_of(a, name);
  if (got != want) {
    throw nb::type_error((name + " must be " + quamba::elem_type_name(want) + ", got " +
                          quamba::elem_type_name(got))
                             .c_str());
  }
}

std::string shape_str(const AnyArray& a) {
  std::string s = "(";
  for (size_t i = 0; i < a.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

void expect_shape(const AnyArray& a, const std::string& name, const std::vector<int64_t>& shape) {
  bool ok = a.ndim() == shape.size();
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = static_cast<int64_t>(a.shape(i)) == shape[i];
  if (!ok) {
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i) {
      if (i) want += ", ";
      want += std::to_string(shape[i]);
    }
    want += shape.size() == 1 ? ",)" : ")";
    throw std::invalid_argument(name + " must have shape " + want + ", got " + shape_str(a));
  }
}

void expect_ndim(const AnyArray& a, const std::string& name, size_t ndim) {
  if (a.ndim() != ndim) {
    throw std::invalid_argument(name + " must have " + std::to_string(ndim) +
                                " dimensions, got shape " + shape_str(a));
  }
}

// A (rows, width) matrix for a decode step: `row` == 0, a contiguous (rows, width) array; `row`
// > 0, rows `row` elements apart (a column range of a wider matrix), passed as the 1-D span from
// its first element to its last, (rows - 1) * row + width elements.
void expect_rows(const AnyArray& a, const std::string& name, int64_t rows, int64_t width,
                 int64_t row) {
  if (row == 0) {
    expect_shape(a, name, {rows, width});
    return;
  }
  if (row < width) {
    throw std::invalid_argument(name + " row stride must be at least its width " +
                                std::to_string(width) + ", got " + std::to_string(row));
  }
  expect_ndim(a, name + " (a row-strided span)", 1);
  const int64_t span = (rows - 1) * row + width;
  if (static_cast<int64_t>(a.shape(0)) != span) {
    throw std::invalid_argument(name + " span must have (rows - 1) * row + width = " +
                                std::to_string(span) + " elements, got " + shape_str(a));
  }
}

void expect_same_shape(const AnyArray& a, const std::string& name, const AnyArray& ref,
                       const std::string& ref_name) {
  bool ok = a.ndim() == ref.ndim();
  for (size_t i = 0; ok && i < a.ndim(); ++i) ok = a.shape(i) == ref.shape(i);
  if (!ok) {
    throw std::invalid_argument(name + " must have the shape of " + ref_name + " " +
                                shape_str(ref) + ", got " + shape_str(a));
  }
}

// All arrays on one device; returns it.
int common_device(std::initializer_list<const AnyArray*> arrays) {
  int device = -1;
  for (const AnyArray* a : arrays) {
    if (a == nullptr) continue;
    if (device < 0) device = a->device_id();
    else if (a->device_id() != device) {
      throw std::invalid_argument("all tensors must be on the same CUDA device");
    }
  }
  return device;
}

const AnyArray* opt_ptr(const OptArray& a) { return a ? &*a : nullptr; }
const void* opt_data(const OptArray& a) { return a ? a->data() : nullptr; }
void* opt_mut_data(OptArray& a) { return a ? a->data() : nullptr; }

void expect_scale(float value, const char* name) {
  if (!(value > 0.0f) || std::isinf(value)) {
    throw std::invalid_argument(std::string(name) + " must be a finite float > 0");
  }
}

void expect_rounding(int rounding) {
  if (rounding != 0 && rounding != 1) {
    throw std::invalid_argument("rounding must be 0 (half_away) or 1 (half_even)");
  }
}

// ---- quantize ----

void quantize_int8(CudaArray<const float> x, CudaArray<int8_t> out, float scale, int rounding,
                   std::uintptr_t stream) {
  if (x.size() != out.size()) throw std::invalid_argument("x and out must have the same number of elements");
  if (x.device_id() != out.device_id()) throw std::invalid_argument("x and out must be on the same device");
  expect_scale(scale, "scale");
  expect_rounding(rounding);
  DeviceGuard guard(x.device_id());
  check_cuda(quamba::launch_quantize_int8(x.data(), out.data(), static_cast<int64_t>(x.size()), scale,
                                          rounding, as_stream(stream)),
             "quantize_int8 launch");
}

void quantize_int8_per_sequence(CudaArray<const float> x, CudaArray<int8_t> out,
                                CudaArray<float> scales, CudaArray<int32_t> peak_bits,
                                std::optional<CudaArray<const int64_t>> seq_lens, int rounding,
                                std::uintptr_t stream) {
  if (x.ndim() != 3) throw std::invalid_argument("x must be (B, E, L)");
  const int64_t batch = static_cast<int64_t>(x.shape(0));
  if (out.ndim() != 3 || out.shape(0) != x.shape(0) || out.shape(1) != x.shape(1) ||
      out.shape(2) != x.shape(2)) {
    throw std::invalid_argument("out must have x's shape (B, E, L)");
  }
  if (scales.ndim() != 1 || static_cast<int64_t>(scales.shape(0)) != batch ||
      peak_bits.ndim() != 1 || static_cast<int64_t>(peak_bits.shape(0)) != batch) {
    throw std::invalid_argument("scales and peak_bits must have shape (B,)");
  }
  if (seq_lens && (seq_lens->ndim() != 1 || static_cast<int64_t>(seq_lens->shape(0)) != batch)) {
    throw std::invalid_argument("seq_lens must have shape (B,)");
  }
  if (batch > 65535) throw std::invalid_argument("B must be at most 65535");
  expect_rounding(rounding);
  const int device = x.device_id();
  if (out.device_id() != device || scales.device_id() != device ||
      peak_bits.device_id() != device || (seq_lens && seq_lens->device_id() != device)) {
    throw std::invalid_argument("all tensors must be on the same CUDA device");
  }
  DeviceGuard guard(device);
  check_cuda(quamba::launch_quantize_int8_per_sequence(
                 x.data(), out.data(), scales.data(), reinterpret_cast<unsigned*>(peak_bits.data()),
                 seq_lens ? seq_lens->data() : nullptr, batch, static_cast<int64_t>(x.shape(1)),
                 static_cast<int64_t>(x.shape(2)), rounding, as_stream(stream)),
             "quantize_int8_per_sequence launch");
}

// ---- transpose ----

void transpose_int8(CudaArray<const int8_t> x, CudaArray<int8_t> out, std::uintptr_t stream) {
  if (x.ndim() != 3 || out.ndim() != 3) {
    throw std::invalid_argument("x and out must be 3-d (B, R, C) and (B, C, R)");
  }
  if (out.shape(0) != x.shape(0) || out.shape(1) != x.shape(2) || out.shape(2) != x.shape(1)) {
    throw std::invalid_argument("out must have shape (B, C, R) for x of shape (B, R, C)");
  }
  if (x.device_id() != out.device_id()) throw std::invalid_argument("x and out must be on the same device");
  DeviceGuard guard(x.device_id());
  check_cuda(quamba::launch_transpose_int8(x.data(), out.data(), static_cast<int64_t>(x.shape(0)),
                                           static_cast<int64_t>(x.shape(1)),
                                           static_cast<int64_t>(x.shape(2)), as_stream(stream)),
             "transpose_int8 launch");
}

// ---- conv1d ----

// Shared checks of prefill (x (B, E, L)) and update (x (B, E), state (B, E, K-1)).
quamba::Conv1dArgs conv_args(const AnyArray& x, int64_t batch, int64_t dim,
                             const AnyArray& weight, const OptArray& bias, const AnyArray& out,
                             double s_x, const OptArray& s_x_per_seq, double s_w, double s_b,
                             float out_scale, int rounding, bool silu) {
  quamba::Conv1dArgs a;
  a.x_type = elem_type_of(x, "x");
  a.batch = batch;
  a.dim = dim;
  expect_ndim(weight, "weight", 2);
  if (static_cast<int64_t>(weight.shape(0)) != a.dim) {
    throw std::invalid_argument("weight must have shape (E, K) with E = x.shape[1], got " +
                                shape_str(weight));
  }
  a.width = static_cast<int>(weight.shape(1));
  if (a.width < 2 || a.width > 4) {
    throw std::invalid_argument("conv width K = weight.shape[1] must be 2, 3 or 4, got " +
                                std::to_string(a.width));
  }
  a.weight_type = elem_type_of(weight, "weight");
  a.out_type = elem_type_of(out, "out");
  if (a.x_type == ElemType::Int8) {
    expect_type(weight, "weight", ElemType::Int8);
    if (bias) {
      expect_type(*bias, "bias", ElemType::Int8);
      expect_shape(*bias, "bias", {a.dim});
    }
    if (a.out_type != ElemType::Int8 && a.out_type != ElemType::Float32) {
      throw nb::type_error("out must be int8 or float32 for int8 x");
    }
    if (s_x_per_seq) {
      expect_type(*s_x_per_seq, "s_x", ElemType::Float32);
      expect_shape(*s_x_per_seq, "s_x", {a.batch});
    } else if (!(s_x > 0.0) || std::isinf(s_x)) {
      throw std::invalid_argument("s_x must be a finite float > 0");
    }
    if (!(s_w > 0.0) || std::isinf(s_w)) throw std::invalid_argument("s_w must be a finite float > 0");
    if (bias && (!(s_b > 0.0) || std::isinf(s_b))) {
      throw std::invalid_argument("s_b must be a finite float > 0");
    }
    if (a.out_type == ElemType::Int8) expect_scale(out_scale, "out_scale");
  } else {
    if (a.weight_type != a.x_type && a.weight_type != ElemType::Float32) {
      throw nb::type_error("weight must have x's dtype or float32");
    }
    if (bias) {
      expect_type(*bias, "bias", a.weight_type);
      expect_shape(*bias, "bias", {a.dim});
    }
    if (a.out_type != a.x_type) throw nb::type_error("out must have x's dtype");
  }
  expect_rounding(rounding);
  a.x = x.data();
  a.weight = weight.data();
  a.bias = opt_data(bias);
  a.s_x = s_x;
  a.s_x_per_seq = s_x_per_seq ? static_cast<const float*>(s_x_per_seq->data()) : nullptr;
  a.s_w = s_w;
  a.s_b = s_b;
  a.out = out.data();
  a.out_scale = out_scale;
  a.rounding = rounding;
  a.silu = silu;
  return a;
}

void conv1d_fwd(AnyArray x, AnyArray weight, OptArray bias, AnyArray out, double s_x,
                OptArray s_x_per_seq, double s_w, double s_b, float out_scale, int rounding,
                bool silu, std::uintptr_t stream, OptArray state_out) {
  expect_ndim(x, "x", 3);
  quamba::Conv1dArgs a =
      conv_args(x, static_cast<int64_t>(x.shape(0)), static_cast<int64_t>(x.shape(1)), weight, bias,
                out, s_x, s_x_per_seq, s_w, s_b, out_scale, rounding, silu);
  a.seqlen = static_cast<int64_t>(x.shape(2));
  expect_same_shape(out, "out", x, "x");
  if (state_out) {
    if (a.x_type != ElemType::Int8) throw nb::type_error("state_out needs int8 x (the INT8 path)");
    expect_type(*state_out, "state_out", ElemType::Int8);
    expect_shape(*state_out, "state_out", {a.batch, a.dim, a.width - 1});
    a.state = state_out->data();
  }
  const int device = common_device(
      {&x, &weight, opt_ptr(bias), &out, opt_ptr(s_x_per_seq), opt_ptr(state_out)});
  DeviceGuard guard(device);
  check_cuda(quamba::launch_conv1d_fwd(a, as_stream(stream)), "conv1d_fwd launch");
}

void conv1d_update(AnyArray x, AnyArray state, AnyArray weight, OptArray bias, AnyArray out,
                   double s_x, OptArray s_x_per_seq, double s_w, double s_b, float out_scale,
                   int rounding, bool silu, std::uintptr_t stream, int64_t x_row) {
  // (B, E) from x, or from the state when x is a row-strided span.
  expect_ndim(state, "conv_state", 3);
  if (x_row == 0) expect_ndim(x, "x", 2);
  const int64_t batch = static_cast<int64_t>(x_row == 0 ? x.shape(0) : state.shape(0));
  const int64_t dim = static_cast<int64_t>(x_row == 0 ? x.shape(1) : state.shape(1));
  expect_rows(x, "x", batch, dim, x_row);
  quamba::Conv1dArgs a = conv_args(x, batch, dim, weight, bias, out, s_x, s_x_per_seq, s_w, s_b,
                                   out_scale, rounding, silu);
  expect_type(state, "conv_state", a.x_type);
  expect_shape(state, "conv_state", {a.batch, a.dim, a.width - 1});
  expect_shape(out, "out", {a.batch, a.dim});
  a.x_row = x_row;
  a.state = state.data();
  const int device =
      common_device({&x, &state, &weight, opt_ptr(bias), &out, opt_ptr(s_x_per_seq)});
  DeviceGuard guard(device);
  check_cuda(quamba::launch_conv1d_update(a, as_stream(stream)), "conv1d_update launch");
}

// ---- rmsnorm ----

void rmsnorm(AnyArray x, OptArray residual, OptArray weight, AnyArray out, OptArray residual_out,
             float eps, float out_scale, int rounding, std::uintptr_t stream) {
  if (x.ndim() < 1 || x.shape(x.ndim() - 1) == 0) {
    throw std::invalid_argument("x must have a non-empty last axis (D)");
  }
  quamba::RmsNormArgs a;
  a.x_type = elem_type_of(x, "x");
  if (a.x_type == ElemType::Int8) throw nb::type_error("x must be float16, bfloat16 or float32");
  a.dim = static_cast<int64_t>(x.shape(x.ndim() - 1));
  a.rows = static_cast<int64_t>(x.size()) / a.dim;
  if (a.dim > quamba::kRmsNormMaxDim) {
    throw std::invalid_argument("D = x.shape[-1] must be at most " +
                                std::to_string(quamba::kRmsNormMaxDim));
  }
  if (residual) {
    expect_type(*residual, "residual", ElemType::Float32);
    expect_same_shape(*residual, "residual", x, "x");
  }
  if (residual_out) {
    expect_type(*residual_out, "residual_out", ElemType::Float32);
    expect_same_shape(*residual_out, "residual_out", x, "x");
  }
  if (weight) {
    a.weight_type = elem_type_of(*weight, "weight");
    if (a.weight_type != a.x_type && a.weight_type != ElemType::Float32) {
      throw nb::type_error("weight must have x's dtype or float32");
    }
    expect_shape(*weight, "weight", {a.dim});
  }
  a.out_type = elem_type_of(out, "out");
  expect_same_shape(out, "out", x, "x");
  if (a.out_type == ElemType::Int8) expect_scale(out_scale, "out_scale");
  if (!(eps >= 0.0f) || std::isinf(eps)) throw std::invalid_argument("eps must be a finite float >= 0");
  expect_rounding(rounding);
  a.x = x.data();
  a.residual = residual ? static_cast<const float*>(residual->data()) : nullptr;
  a.weight = opt_data(weight);
  a.out = out.data();
  a.residual_out = residual_out ? static_cast<float*>(residual_out->data()) : nullptr;
  a.eps = eps;
  a.out_scale = out_scale;
  a.rounding = rounding;
  const int device =
      common_device({&x, opt_ptr(residual), opt_ptr(weight), &out, opt_ptr(residual_out)});
  DeviceGuard guard(device);
  check_cuda(quamba::launch_rmsnorm(a, as_stream(stream)), "rmsnorm launch");
}

// ---- hadamard ----

void hadamard(AnyArray x, AnyArray out, OptArray h_m, int m, float scale, float out_scale,
              int rounding, std::uintptr_t stream) {
  if (x.ndim() < 1 || x.shape(x.ndim() - 1) == 0) {
    throw std::invalid_argument("x must have a non-empty last axis (n)");
  }
  quamba::HadamardArgs a;
  a.x_type = elem_type_of(x, "x");
  if (a.x_type == ElemType::Int8) throw nb::type_error("x must be float16, bfloat16 or float32");
  a.out_type = elem_type_of(out, "out");
  expect_same_shape(out, "out", x, "x");
  a.n = static_cast<int64_t>(x.shape(x.ndim() - 1));
  a.rows = static_cast<int64_t>(x.size()) / a.n;
  if (m != 1 && m != 12 && m != 20) throw std::invalid_argument("m must be 1, 12 or 20");
  const int64_t p = a.n / m;
  if (a.n % m != 0 || (p & (p - 1)) != 0 || a.n > quamba::kHadamardMaxSize) {
    throw std::invalid_argument("n = x.shape[-1] must be m * 2^k <= 8192 for m in {1, 12, 20}, got " +
                                std::to_string(a.n) + " with m = " + std::to_string(m));
  }
  if (m > 1) {
    if (!h_m) throw std::invalid_argument("h_m (the m x m matrix) is required for m > 1");
    expect_type(*h_m, "h_m", ElemType::Float32);
    expect_shape(*h_m, "h_m", {m, m});
  }
  if (p >= 8) {
    const auto aligned = [](const void* ptr, int bytes) {
      return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0;
    };
    if (!aligned(x.data(), 8 * quamba::elem_size(a.x_type)) ||
        !aligned(out.data(), 8 * quamba::elem_size(a.out_type))) {
      throw std::invalid_argument("x and out must start at an address aligned to 8 elements");
    }
  }
  expect_scale(scale, "scale");
  if (a.out_type == ElemType::Int8) expect_scale(out_scale, "out_scale");
  expect_rounding(rounding);
  a.x = x.data();
  a.out = out.data();
  a.h_m = h_m ? static_cast<const float*>(h_m->data()) : nullptr;
  a.m = m;
  a.scale = scale;
  a.out_scale = out_scale;
  a.rounding = rounding;
  const int device = common_device({&x, &out, opt_ptr(h_m)});
  DeviceGuard guard(device);
  check_cuda(quamba::launch_hadamard(a, as_stream(stream)), "hadamard launch");
}

// ---- selective scan ----

// Parameters A (E, N), D (E,), delta_bias (E,): all float32, or all int8 codes.
void scan_params(quamba::ScanArgs& a, const AnyArray& A, const OptArray& D,
                 const OptArray& delta_bias) {
  expect_ndim(A, "A", 2);
  if (static_cast<int64_t>(A.shape(0)) != a.dim) {
    throw std::invalid_argument("A must have shape (E, N) with E = " + std::to_string(a.dim) +
                                ", got " + shape_str(A));
  }
  a.dstate = static_cast<int64_t>(A.shape(1));
  if (a.dstate < 1 || a.dstate > quamba::kScanMaxState) {
    throw std::invalid_argument("d_state N = A.shape[1] must be in 1.." +
                                std::to_string(quamba::kScanMaxState) + ", got " +
                                std::to_string(a.dstate));
  }
  a.param_type = elem_type_of(A, "A");
  if (a.param_type != ElemType::Int8 && a.param_type != ElemType::Float32) {
    throw nb::type_error("A must be float32 (A) or int8 (A_log codes)");
  }
  if (D) {
    expect_type(*D, "D", a.param_type);
    expect_shape(*D, "D", {a.dim});
  }
  if (delta_bias) {
    expect_type(*delta_bias, "delta_bias", a.param_type);
    expect_shape(*delta_bias, "delta_bias", {a.dim});
  }
  a.A = A.data();
  a.D = opt_data(D);
  a.delta_bias = opt_data(delta_bias);
}

void selective_scan(AnyArray u, AnyArray delta, AnyArray A, AnyArray B, AnyArray C, OptArray D,
                    OptArray z, OptArray delta_bias, OptArray initial_state, AnyArray out,
                    OptArray last_state, OptArray state_q, float u_scale, float delta_scale,
                    float A_scale, float B_scale, float C_scale, float D_scale, float z_scale,
                    float delta_bias_scale, float state_scale, int state_rounding, bool softplus,
                    bool exact, int lanes_per_channel, int block_threads,
                    std::uintptr_t stream) {
  quamba::ScanArgs a;
  expect_ndim(u, "u", 3);
  a.batch = static_cast<int64_t>(u.shape(0));
  a.dim = static_cast<int64_t>(u.shape(1));
  a.seqlen = static_cast<int64_t>(u.shape(2));
  if (a.batch > 65535) throw std::invalid_argument("batch must be at most 65535");
  a.u_type = elem_type_of(u, "u");
  a.x_type = elem_type_of(delta, "delta");
  expect_same_shape(delta, "delta", u, "u");
  scan_params(a, A, D, delta_bias);
  expect_type(B, "B", a.x_type);
  expect_type(C, "C", a.x_type);
  expect_shape(B, "B", {a.batch, a.dstate, a.seqlen});
  expect_shape(C, "C", {a.batch, a.dstate, a.seqlen});
  if (z) {
    expect_type(*z, "z", a.x_type);
    expect_same_shape(*z, "z", u, "u");
  }
  if (initial_state) {
    expect_type(*initial_state, "initial_state", ElemType::Float32);
    expect_shape(*initial_state, "initial_state", {a.batch, a.dim, a.dstate});
  }
  a.out_type = elem_type_of(out, "out");
  expect_shape(out, "out", {a.batch, a.seqlen, a.dim});
  if (last_state) {
    expect_type(*last_state, "last_state", ElemType::Float32);
    expect_shape(*last_state, "last_state", {a.batch, a.dim, a.dstate});
  }
  if (state_q) {
    expect_type(*state_q, "state_q", ElemType::Int8);
    expect_shape(*state_q, "state_q", {a.batch, a.dim, a.dstate});
    expect_scale(state_scale, "state_scale");
  }
  const bool int8_inputs = a.x_type == ElemType::Int8;
  if (int8_inputs) {
    if (a.u_type != ElemType::Int8 && a.u_type != ElemType::Float32) {
      throw nb::type_error("u must be int8 or float32 with int8 delta/B/C/z");
    }
    if (a.out_type != ElemType::Float16) throw nb::type_error("out must be float16 for int8 inputs");
    if (a.u_type == ElemType::Int8) expect_scale(u_scale, "u_scale");
    expect_scale(delta_scale, "delta_scale");
    expect_scale(B_scale, "B_scale");
    expect_scale(C_scale, "C_scale");
    if (z) expect_scale(z_scale, "z_scale");
  } else {
    if (a.u_type != a.x_type || a.out_type != a.x_type) {
      throw nb::type_error("u, delta, B, C, z and out must share one float dtype");
    }
    if (a.x_type == ElemType::Float32 && !exact) {
      throw std::invalid_argument("the float32 scan is exact only (exact=True)");
    }
  }
  if (a.param_type == ElemType::Int8) {
    expect_scale(A_scale, "A_scale");
    if (D) expect_scale(D_scale, "D_scale");
    if (delta_bias) expect_scale(delta_bias_scale, "delta_bias_scale");
  }
  expect_rounding(state_rounding);
  if (lanes_per_channel != 0) {
    if (lanes_per_channel != 8 && lanes_per_channel != 16) {
      throw std::invalid_argument("lanes_per_channel must be 8 or 16 (or 0: chosen by the kernel)");
    }
    if (a.dstate < 9 || a.dstate > 16) {
      throw std::invalid_argument("lanes_per_channel applies to d_state 9..16 only, got N = " +
                                  std::to_string(a.dstate));
    }
  }
  a.lanes_per_channel = lanes_per_channel;
  if (block_threads != 0) {
    if (block_threads != 64 && block_threads != 128) {
      throw std::invalid_argument("block_threads must be 64 or 128 (or 0: chosen by the kernel)");
    }
    if (!int8_inputs || lanes_per_channel != 8) {
      throw std::invalid_argument(
          "block_threads applies to the 8-lane layout of the INT8 scan only (int8 delta/B/C/z "
          "and lanes_per_channel = 8)");
    }
  }
  a.block_threads = block_threads;
  a.u = u.data();
  a.delta = delta.data();
  a.z = opt_data(z);
  a.B = B.data();
  a.C = C.data();
  a.u_scale = u_scale;
  a.delta_scale = delta_scale;
  a.z_scale = z_scale;
  a.B_scale = B_scale;
  a.C_scale = C_scale;
  a.A_scale = A_scale;
  a.D_scale = D_scale;
  a.delta_bias_scale = delta_bias_scale;
  a.softplus = softplus;
  a.initial_state = initial_state ? static_cast<const float*>(initial_state->data()) : nullptr;
  a.out = out.data();
  a.last_state = last_state ? static_cast<float*>(last_state->data()) : nullptr;
  a.state_q = state_q ? static_cast<int8_t*>(state_q->data()) : nullptr;
  a.state_scale = state_scale;
  a.state_rounding = state_rounding;
  a.exact = exact;
  const int device = common_device({&u, &delta, &A, &B, &C, opt_ptr(D), opt_ptr(z),
                                    opt_ptr(delta_bias), opt_ptr(initial_state), &out,
                                    opt_ptr(last_state), opt_ptr(state_q)});
  DeviceGuard guard(device);
  check_cuda(quamba::launch_selective_scan(a, as_stream(stream)), "selective_scan launch");
}

void selective_scan_step(AnyArray state, AnyArray u, AnyArray delta, AnyArray A, AnyArray B,
                         AnyArray C, OptArray D, OptArray z, OptArray delta_bias, AnyArray out,
                         float u_scale, float delta_scale, float A_scale, float B_scale,
                         float C_scale, float D_scale, float z_scale, float delta_bias_scale,
                         float state_scale, int state_rounding, bool softplus,
                         std::uintptr_t stream, OptArray dt_x, OptArray dt_w,
                         float dt_gemm_scale, int dt_rounding, int64_t z_row, int64_t B_row,
                         int64_t C_row) {
  quamba::ScanArgs a;
  expect_ndim(u, "u", 2);
  a.batch = static_cast<int64_t>(u.shape(0));
  a.dim = static_cast<int64_t>(u.shape(1));
  a.seqlen = 1;
  if (a.batch > 65535) throw std::invalid_argument("batch must be at most 65535");
  a.u_type = elem_type_of(u, "u");
  a.x_type = elem_type_of(delta, "delta");
  expect_same_shape(delta, "delta", u, "u");
  scan_params(a, A, D, delta_bias);
  expect_type(B, "B", a.x_type);
  expect_type(C, "C", a.x_type);
  expect_rows(B, "B", a.batch, a.dstate, B_row);
  expect_rows(C, "C", a.batch, a.dstate, C_row);
  if (z) {
    expect_type(*z, "z", a.x_type);
    expect_rows(*z, "z", a.batch, a.dim, z_row);
  } else if (z_row != 0) {
    throw std::invalid_argument("z_row needs z");
  }
  a.z_row = z_row;
  a.B_row = B_row;
  a.C_row = C_row;
  a.state_type = elem_type_of(state, "state");
  expect_shape(state, "state", {a.batch, a.dim, a.dstate});
  a.out_type = elem_type_of(out, "out");
  expect_same_shape(out, "out", u, "u");
  if (a.state_type == ElemType::Int8) {
    if (a.x_type != ElemType::Int8) throw nb::type_error("an int8 state needs int8 delta/B/C/z");
    if (a.u_type != ElemType::Int8 && a.u_type != ElemType::Float32) {
      throw nb::type_error("u must be int8 or float32 with an int8 state");
    }
    if (a.out_type != ElemType::Float16) throw nb::type_error("out must be float16 for int8 inputs");
    expect_scale(state_scale, "state_scale");
    if (a.u_type == ElemType::Int8) expect_scale(u_scale, "u_scale");
    expect_scale(delta_scale, "delta_scale");
    expect_scale(B_scale, "B_scale");
    expect_scale(C_scale, "C_scale");
    if (z) expect_scale(z_scale, "z_scale");
  } else {
    if (a.x_type == ElemType::Int8 || a.u_type != a.x_type || a.out_type != a.x_type) {
      throw nb::type_error("a float state needs u, delta, B, C, z and out of one float dtype");
    }
    if (a.state_type != a.x_type && a.state_type != ElemType::Float32) {
      throw nb::type_error("state must have u's dtype or float32");
    }
  }
  if (a.param_type == ElemType::Int8) {
    expect_scale(A_scale, "A_scale");
    if (D) expect_scale(D_scale, "D_scale");
    if (delta_bias) expect_scale(delta_bias_scale, "delta_bias_scale");
  }
  expect_rounding(state_rounding);
  if (dt_x.has_value() != dt_w.has_value()) {
    throw std::invalid_argument("dt_x and dt_w come together (the fused dt_proj) or not at all");
  }
  if (dt_x) {
    if (a.state_type != ElemType::Int8) throw nb::type_error("the fused dt_proj needs an int8 state");
    expect_type(*dt_x, "dt_x", ElemType::Int8);
    expect_type(*dt_w, "dt_w", ElemType::Int8);
    expect_ndim(*dt_x, "dt_x", 2);
    expect_ndim(*dt_w, "dt_w", 2);
    a.dt_rank = static_cast<int64_t>(dt_w->shape(1));
    a.dt_x_row = static_cast<int64_t>(dt_x->shape(1));
    expect_shape(*dt_w, "dt_w", {a.dim, a.dt_rank});
    if (static_cast<int64_t>(dt_x->shape(0)) != a.batch || a.dt_x_row < a.dt_rank ||
        a.dt_rank < 1) {
      throw std::invalid_argument("dt_x must have shape (B, >= R) for dt_w of shape (E, R), got " +
                                  shape_str(*dt_x));
    }
    expect_scale(dt_gemm_scale, "dt_gemm_scale");
    expect_rounding(dt_rounding);
    a.dt_x = static_cast<const int8_t*>(dt_x->data());
    a.dt_w = static_cast<const int8_t*>(dt_w->data());
    a.dt_gemm_scale = dt_gemm_scale;
    a.dt_rounding = dt_rounding;
  }
  a.state = state.data();
  a.u = u.data();
  a.delta = delta.data();
  a.z = opt_data(z);
  a.B = B.data();
  a.C = C.data();
  a.u_scale = u_scale;
  a.delta_scale = delta_scale;
  a.z_scale = z_scale;
  a.B_scale = B_scale;
  a.C_scale = C_scale;
  a.A_scale = A_scale;
  a.D_scale = D_scale;
  a.delta_bias_scale = delta_bias_scale;
  a.softplus = softplus;
  a.out = out.data();
  a.state_scale = state_scale;
  a.state_rounding = state_rounding;
  a.exact = true;
  const int device = common_device({&state, &u, &delta, &A, &B, &C, opt_ptr(D), opt_ptr(z),
                                    opt_ptr(delta_bias), &out, opt_ptr(dt_x), opt_ptr(dt_w)});
  DeviceGuard guard(device);
  check_cuda(quamba::launch_selective_scan_step(a, as_stream(stream)), "selective_scan_step launch");
}

// ---- INT8 GEMM (GEMV / skinny) and the epilogue over int32 accumulators ----

bool is_int32(const AnyArray& a) {
  const nb::dlpack::dtype dt = a.dtype();
  return dt.lanes == 1 && dt.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Int) &&
         dt.bits == 32;
}

// The epilogue of an (M, N) result written to `out`: its dtype names the output; its shape is
// (M, N), or (M / seq_len, N, seq_len) for the sequence-last layout.
quamba::GemmEpilogue gemm_epilogue(const AnyArray& out, int64_t M, int64_t N, float scale,
                                   float out_scale, int rounding, int64_t seq_len) {
  quamba::GemmEpilogue ep;
  if (is_int32(out)) {
    ep.out_type = quamba::GemmOut::Int32;
  } else {
    switch (elem_type_of(out, "out")) {
      case ElemType::Int8:
        ep.out_type = quamba::GemmOut::Int8;
        expect_scale(out_scale, "out_scale");
        break;
      case ElemType::Float16: ep.out_type = quamba::GemmOut::Float16; break;
      case ElemType::BFloat16: ep.out_type = quamba::GemmOut::BFloat16; break;
      default: ep.out_type = quamba::GemmOut::Float32; break;
    }
  }
  expect_scale(scale, "scale");
  expect_rounding(rounding);
  if (seq_len < 0) throw std::invalid_argument("seq_len must be >= 0 (0: row-major output)");
  if (seq_len == 0) {
    expect_shape(out, "out", {M, N});
  } else {
    if (M % seq_len != 0) {
      throw std::invalid_argument("the number of rows M = " + std::to_string(M) +
                                  " must be a multiple of seq_len = " + std::to_string(seq_len));
    }
    expect_shape(out, "out", {M / seq_len, N, seq_len});
  }
  ep.scale = scale;
  ep.out_scale = out_scale;
  ep.rounding = rounding;
  ep.seq_len = seq_len;
  return ep;
}

void int8_gemm(AnyArray x, AnyArray w, AnyArray out, float scale, float out_scale, int rounding,
               int64_t seq_len, int algo, std::uintptr_t stream, bool constant_weight) {
  if (algo < 0 || algo > 5) {
    throw std::invalid_argument(
        "algo must be 0 (auto), 1 (skinny), 2 (tiled), 3 (stream), 4 (wgmma) or 5 (short_k)");
  }
  expect_type(x, "x", ElemType::Int8);
  expect_type(w, "w", ElemType::Int8);
  expect_ndim(x, "x", 2);
  expect_ndim(w, "w", 2);
  const int64_t M = x.shape(0), K = x.shape(1), N = w.shape(0);
  if (w.shape(1) != static_cast<size_t>(K)) {
    throw std::invalid_argument("w must have shape (N, K) with K = x.shape[1] = " +
                                std::to_string(K) + ", got " + shape_str(w));
  }
  if (K < 1 || K >= 131072) {
    throw std::invalid_argument("K must be in [1, 131072) so that int32 accumulation is exact, got " +
                                std::to_string(K));
  }
  if (algo == 3 && M > 4) throw std::invalid_argument("the stream GEMV takes M <= 4 rows");
  if (algo == 5 && K > quamba::kShortKMax) {
    throw std::invalid_argument("the short-K GEMM takes K <= " +
                                std::to_string(quamba::kShortKMax) + ", got K = " +
                                std::to_string(K));
  }
  if (algo == 4 &&
      (K % 16 != 0 || reinterpret_cast<std::uintptr_t>(x.data()) % 16 != 0 ||
       reinterpret_cast<std::uintptr_t>(w.data()) % 16 != 0)) {
    throw std::invalid_argument(
        "the wgmma GEMM needs K % 16 == 0 and 16-byte aligned x and w, got K = " +
        std::to_string(K));
  }
  const quamba::GemmEpilogue ep = gemm_epilogue(out, M, N, scale, out_scale, rounding, seq_len);
  DeviceGuard guard(common_device({&x, &w, &out}));
  check_cuda(quamba::launch_int8_gemm(static_cast<const int8_t*>(x.data()),
                                      static_cast<const int8_t*>(w.data()), out.data(), M, N, K, ep,
                                      static_cast<quamba::GemmAlgo>(algo), constant_weight,
                                      as_stream(stream)),
             "int8_gemm launch");
}

void int32_epilogue(AnyArray acc, AnyArray out, float scale, float out_scale, int rounding,
                    int64_t seq_len, std::uintptr_t stream) {
  if (!is_int32(acc)) throw nb::type_error("acc must be int32");
  expect_ndim(acc, "acc", 2);
  const int64_t M = acc.shape(0), N = acc.shape(1);
  const quamba::GemmEpilogue ep = gemm_epilogue(out, M, N, scale, out_scale, rounding, seq_len);
  DeviceGuard guard(common_device({&acc, &out}));
  check_cuda(quamba::launch_int32_epilogue(static_cast<const int32_t*>(acc.data()), out.data(), M,
                                           N, ep, as_stream(stream)),
             "int32_epilogue launch");
}

void x_proj_seq_last(AnyArray u, AnyArray w, AnyArray dt_low, AnyArray B, AnyArray C, float scale,
                     float out_scale, int rounding, int split_k, std::uintptr_t stream) {
  expect_type(u, "u", ElemType::Int8);
  expect_type(w, "w", ElemType::Int8);
  expect_type(dt_low, "dt_low", ElemType::Int8);
  expect_type(B, "B", ElemType::Int8);
  expect_type(C, "C", ElemType::Int8);
  expect_ndim(u, "u", 3);
  expect_ndim(w, "w", 2);
  expect_ndim(dt_low, "dt_low", 3);
  expect_ndim(B, "B", 3);
  const int64_t batch = u.shape(0), E = u.shape(1), L = u.shape(2);
  const int64_t N = B.shape(1), R = dt_low.shape(2);
  expect_shape(w, "w", {R + 2 * N, E});
  expect_shape(dt_low, "dt_low", {batch, L, R});
  expect_shape(B, "B", {batch, N, L});
  expect_shape(C, "C", {batch, N, L});
  expect_scale(scale, "scale");
  expect_scale(out_scale, "out_scale");
  expect_rounding(rounding);
  if ((split_k != 1 && split_k != 2 && split_k != 4 && split_k != 8) || split_k > E / 128) {
    throw std::invalid_argument("split_k must be 1, 2, 4 or 8 and at most E / 128, got " +
                                std::to_string(split_k) + " for E = " + std::to_string(E));
  }
  quamba::XProjArgs a;
  a.u = static_cast<const int8_t*>(u.data());
  a.w = static_cast<const int8_t*>(w.data());
  a.dt_low = static_cast<int8_t*>(dt_low.data());
  a.B = static_cast<int8_t*>(B.data());
  a.C = static_cast<int8_t*>(C.data());
  a.batch = batch;
  a.dim = E;
  a.seqlen = L;
  a.dt_rank = R;
  a.dstate = N;
  a.ep.out_type = quamba::GemmOut::Int8;
  a.ep.scale = scale;
  a.ep.out_scale = out_scale;
  a.ep.rounding = rounding;
  a.ep.seq_len = 0;
  a.split_k = split_k;
  DeviceGuard guard(common_device({&u, &w, &dt_low, &B, &C}));
  if (!quamba::x_proj_applies(a)) {
    throw std::invalid_argument(
        "x_proj_seq_last takes E % 128 == 0 (E < 131072), L % 16 == 0, B * ceil(L / 64) <= "
        "65535, B * E < 2^31, 1 <= R + 2N <= " +
        std::to_string(quamba::kXProjMaxOut) +
        ", 16-byte aligned u and w and a device of compute capability 9.0 or newer; got E = " +
        std::to_string(E) + ", L = " + std::to_string(L) + ", R + 2N = " +
        std::to_string(R + 2 * N));
  }
  check_cuda(quamba::launch_x_proj(a, as_stream(stream)), "x_proj_seq_last launch");
}

// ---- persistent W8A8 decode step ----

constexpr size_t kDecodePointers = 12, kDecodeScalars = 18, kDecodeRoundings = 5;

// The layers' DecodeLayer records (bytes to copy to the device) from flat per-layer lists:
// pointers (norm_w, w_in, conv_w, conv_b, w_x's slabs (decode_x_slab_columns), w_dt, A_log, D,
// dt_bias, w_out, conv_state, ssm_state; 0 for an absent conv_b, D or dt_bias), scalars
// (conv_s_b, eps, s_in, in_scale, s_xz, conv_scale, s_u, x_scale, s_xo, dt_scale, s_dt, s_A, s_D,
// s_dtb, s_h, had_scale, s_had, out_scale) and rounding codes (norm, gemm, conv, state,
// hadamard). The Python wrapper checks the tensors the pointers come from.
nb::bytes decode_w8a8_pack(const std::vector<uint64_t>& pointers,
                           const std::vector<double>& scalars, const std::vector<int>& roundings) {
  const size_t n = roundings.size() / kDecodeRoundings;
  if (n == 0 || roundings.size() != n * kDecodeRoundings || pointers.size() != n * kDecodePointers ||
      scalars.size() != n * kDecodeScalars) {
    throw std::invalid_argument("decode_w8a8_pack: per layer 12 pointers, 18 scalars and 5 "
                                "rounding codes, for at least one layer");
  }
  std::vector<quamba::DecodeLayer> layers(n);
  for (size_t i = 0; i < n; ++i) {
    const uint64_t* p = pointers.data() + i * kDecodePointers;
    const double* v = scalars.data() + i * kDecodeScalars;
    const int* r = roundings.data() + i * kDecodeRoundings;
    for (size_t k = 0; k < kDecodePointers; ++k) {
      const bool optional = k == 3 || k == 7 || k == 8;
      if (p[k] == 0 && !optional) {
        throw std::invalid_argument("decode_w8a8_pack: layer " + std::to_string(i) +
                                    ": pointer " + std::to_string(k) + " is null");
      }
    }
    for (size_t k = 0; k < kDecodeScalars; ++k) {
      if (!(v[k] > 0.0) || std::isinf(v[k])) {
        throw std::invalid_argument("decode_w8a8_pack: layer " + std::to_string(i) + ": scalar " +
                                    std::to_string(k) + " must be finite and > 0");
      }
    }
    for (size_t k = 0; k < kDecodeRoundings; ++k) expect_rounding(r[k]);
    quamba::DecodeLayer& L = layers[i];
    L.norm_w = reinterpret_cast<const float*>(p[0]);
    L.w_in = reinterpret_cast<const int8_t*>(p[1]);
    L.conv_w = reinterpret_cast<const int8_t*>(p[2]);
    L.conv_b = reinterpret_cast<const int8_t*>(p[3]);
    L.w_x = reinterpret_cast<const int8_t*>(p[4]);
    L.w_dt = reinterpret_cast<const int8_t*>(p[5]);
    L.A_log = reinterpret_cast<const int8_t*>(p[6]);
    L.D = reinterpret_cast<const int8_t*>(p[7]);
    L.dt_bias = reinterpret_cast<const int8_t*>(p[8]);
    L.w_out = reinterpret_cast<const int8_t*>(p[9]);
    L.conv_state = reinterpret_cast<int8_t*>(p[10]);
    L.ssm_state = reinterpret_cast<int8_t*>(p[11]);
    L.conv_s_b = v[0];
    float* f[] = {&L.eps, &L.s_in, &L.in_scale, &L.s_xz, &L.conv_scale, &L.s_u, &L.x_scale,
                  &L.s_xo, &L.dt_scale, &L.s_dt, &L.s_A, &L.s_D, &L.s_dtb, &L.s_h,
                  &L.had_scale, &L.s_had, &L.out_scale};
    for (size_t k = 1; k < kDecodeScalars; ++k) *f[k - 1] = static_cast<float>(v[k]);
    L.round_norm = r[0];
    L.round_gemm = r[1];
    L.round_conv = r[2];
    L.round_state = r[3];
    L.round_had = r[4];
  }
  return nb::bytes(reinterpret_cast<const char*>(layers.data()), n * sizeof(quamba::DecodeLayer));
}

bool decode_w8a8_supported(int device) { return quamba::decode_w8a8_device_ok(device); }

void decode_w8a8(AnyArray layers, int n_layers, int64_t d_model, int64_t d_inner, int64_t dt_rank,
                 int64_t d_state, int had_m, AnyArray hidden_in,
                 AnyArray hidden_out, AnyArray residual_out, AnyArray exchange, AnyArray counters,
                 int x_slab_blocks, int inflight, std::uintptr_t stream, OptArray timing) {
  const char* why = nullptr;
  if (!quamba::decode_w8a8_shapes_ok(d_model, d_inner, dt_rank, d_state, had_m, &why)) {
    throw std::invalid_argument(std::string("decode_w8a8: ") + why);
  }
  if (n_layers < 1) throw std::invalid_argument("decode_w8a8: n_layers must be >= 1");
  expect_type(layers, "layers", ElemType::Int8);
  expect_shape(layers, "layers",
               {static_cast<int64_t>(n_layers * sizeof(quamba::DecodeLayer))});
  expect_type(hidden_in, "hidden_in", ElemType::Float16);
  expect_shape(hidden_in, "hidden_in", {d_model});
  expect_type(hidden_out, "hidden_out", ElemType::Float16);
  expect_shape(hidden_out, "hidden_out", {d_model});
  expect_type(residual_out, "residual_out", ElemType::Float32);
  expect_shape(residual_out, "residual_out", {d_model});
  const int64_t words =
      quamba::decode_exchange_words(d_model, d_inner, dt_rank, d_state, n_layers);
  expect_type(exchange, "exchange", ElemType::Int8);
  expect_shape(exchange, "exchange", {8 * words});
  expect_type(counters, "counters", ElemType::Int8);
  expect_shape(counters, "counters", {8});
  const auto aligned = [](const void* ptr, int bytes) {
    return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0;
  };
  if (!aligned(layers.data(), 16) || !aligned(exchange.data(), 8) || !aligned(counters.data(), 8)) {
    throw std::invalid_argument("layers, exchange and counters must be 16, 8 and 8-byte aligned");
  }
  if (inflight < 1 || inflight > 16) throw std::invalid_argument("inflight must be 1..16");
  const int device = common_device({&layers, &hidden_in, &hidden_out,
                                    &residual_out, &exchange, &counters, opt_ptr(timing)});
  DeviceGuard guard(device);
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute");
  if (x_slab_blocks != sms) {
    throw std::invalid_argument("decode_w8a8: x_proj's slabs were laid out for " +
                                std::to_string(x_slab_blocks) + " blocks; this device runs " +
                                std::to_string(sms) + " (one per SM)");
  }
  if (timing) {
    expect_type(*timing, "timing", ElemType::Int8);
    expect_shape(*timing, "timing",
                 {static_cast<int64_t>(8) * sms * quamba::decode_phase_count()});
    if (!aligned(timing->data(), 8)) throw std::invalid_argument("timing must be 8-byte aligned");
  }
  if (!quamba::decode_w8a8_device_ok(device)) {
    throw std::invalid_argument(
        "decode_w8a8 needs a device of compute capability 9.0 or newer and a build for sm_90");
  }
  quamba::DecodeArgs a;
  a.layers = static_cast<const quamba::DecodeLayer*>(layers.data());
  a.n_layers = n_layers;
  a.d_model = d_model;
  a.d_inner = d_inner;
  a.dt_rank = dt_rank;
  a.d_state = d_state;
  a.had_m = had_m;
  a.hidden_in = hidden_in.data();
  a.hidden_out = hidden_out.data();
  a.residual_out = static_cast<float*>(residual_out.data());
  a.exchange = static_cast<uint64_t*>(exchange.data());
  a.counters = static_cast<unsigned*>(counters.data());
  a.x_slab_blocks = x_slab_blocks;
  a.inflight = inflight;
  a.timing = timing ? static_cast<long long*>(timing->data()) : nullptr;
  check_cuda(quamba::launch_decode_w8a8(a, as_stream(stream)), "decode_w8a8 launch");
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "CUDA kernels of quamba-kernels (bound with nanobind, tensors via DLPack).";
  m.attr("__version__") = QUAMBA_KERNELS_VERSION;
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.attr("scan_max_state") = quamba::kScanMaxState;
  m.attr("hadamard_max_size") = quamba::kHadamardMaxSize;
  m.attr("rmsnorm_max_dim") = quamba::kRmsNormMaxDim;
  m.def("device_count", &device_count, "Number of CUDA devices the runtime sees (0 when none).");
  m.def("device_error", &device_error, "Why no CUDA device can be used, or '' when one can.");
  m.def("set_programmatic_launch", &quamba::set_programmatic_launch, nb::arg("enabled"),
        "Turn programmatic dependent launch (sm_90+) on or off for later launches; results are "
        "the same either way.");
  m.def("wgmma_gemm_built", &quamba::wgmma_gemm_built,
        "Whether this build has the Hopper (sm_90a wgmma) INT8 GEMM.");
  m.def("programmatic_launch_enabled", &quamba::programmatic_launch_enabled,
        "Whether launches use programmatic dependent launch where the device supports it.");
  m.def("quantize_int8", &quantize_int8, nb::arg("x").noconvert(), nb::arg("out").noconvert(),
        nb::arg("scale"), nb::arg("rounding"), nb::arg("stream"),
        nb::call_guard<nb::gil_scoped_release>(),
        "out = clamp(round(x / scale), -128, 127) for float32 x and int8 out.");
  m.def("quantize_int8_per_sequence", &quantize_int8_per_sequence, nb::arg("x").noconvert(),
        nb::arg("out").noconvert(), nb::arg("scales").noconvert(),
        nb::arg("peak_bits").noconvert(), nb::arg("seq_lens").noconvert().none(),
        nb::arg("rounding"), nb::arg("stream"), nb::call_guard<nb::gil_scoped_release>(),
        "Per-sequence dynamic INT8 of x (B, E, L): scales[b] = max |x| over the real positions "
        "/ 127 (1 where 0), out = Q8(x / scales[b]).");
  m.def("transpose_int8", &transpose_int8, nb::arg("x").noconvert(), nb::arg("out").noconvert(),
        nb::arg("stream"), nb::call_guard<nb::gil_scoped_release>(),
        "out (B, C, R) = x (B, R, C) transposed, int8.");
  m.def("conv1d_fwd", &conv1d_fwd, nb::arg("x").noconvert(), nb::arg("weight").noconvert(),
        nb::arg("bias").noconvert().none(), nb::arg("out").noconvert(), nb::arg("s_x"),
        nb::arg("s_x_per_seq").noconvert().none(), nb::arg("s_w"), nb::arg("s_b"),
        nb::arg("out_scale"), nb::arg("rounding"), nb::arg("silu"), nb::arg("stream"),
        nb::arg("state_out").noconvert().none() = nb::none(),
        nb::call_guard<nb::gil_scoped_release>(),
        "Causal depthwise conv1d + bias + SiLU, x (B, E, L) -> out (B, E, L). state_out (B, E, "
        "K-1) int8 (INT8 path): also the rows' last K-1 inputs, zeros before the row.");
  m.def("conv1d_update", &conv1d_update, nb::arg("x").noconvert(), nb::arg("state").noconvert(),
        nb::arg("weight").noconvert(), nb::arg("bias").noconvert().none(),
        nb::arg("out").noconvert(), nb::arg("s_x"), nb::arg("s_x_per_seq").noconvert().none(),
        nb::arg("s_w"), nb::arg("s_b"), nb::arg("out_scale"), nb::arg("rounding"),
        nb::arg("silu"), nb::arg("stream"), nb::arg("x_row") = 0,
        nb::call_guard<nb::gil_scoped_release>(),
        "One decode step of conv1d_fwd; state (B, E, K-1) is shifted in place. x_row > 0: x is the "
        "1-D span of (B, E) rows x_row elements apart.");
  m.def("rmsnorm", &rmsnorm, nb::arg("x").noconvert(), nb::arg("residual").noconvert().none(),
        nb::arg("weight").noconvert().none(), nb::arg("out").noconvert(),
        nb::arg("residual_out").noconvert().none(), nb::arg("eps"), nb::arg("out_scale"),
        nb::arg("rounding"), nb::arg("stream"), nb::call_guard<nb::gil_scoped_release>(),
        "Residual add + RMSNorm over the last axis.");
  m.def("hadamard", &hadamard, nb::arg("x").noconvert(), nb::arg("out").noconvert(),
        nb::arg("h_m").noconvert().none(), nb::arg("m"), nb::arg("scale"), nb::arg("out_scale"),
        nb::arg("rounding"), nb::arg("stream"), nb::call_guard<nb::gil_scoped_release>(),
        "Fast Hadamard transform of the last axis (n = m * 2^k).");
  m.def("selective_scan", &selective_scan, nb::arg("u").noconvert(), nb::arg("delta").noconvert(),
        nb::arg("A").noconvert(), nb::arg("B").noconvert(), nb::arg("C").noconvert(),
        nb::arg("D").noconvert().none(), nb::arg("z").noconvert().none(),
        nb::arg("delta_bias").noconvert().none(), nb::arg("initial_state").noconvert().none(),
        nb::arg("out").noconvert(), nb::arg("last_state").noconvert().none(),
        nb::arg("state_q").noconvert().none(), nb::arg("u_scale"), nb::arg("delta_scale"),
        nb::arg("A_scale"), nb::arg("B_scale"), nb::arg("C_scale"), nb::arg("D_scale"),
        nb::arg("z_scale"), nb::arg("delta_bias_scale"), nb::arg("state_scale"),
        nb::arg("state_rounding"), nb::arg("softplus"), nb::arg("exact"),
        nb::arg("lanes_per_channel"), nb::arg("block_threads"), nb::arg("stream"),
        nb::call_guard<nb::gil_scoped_release>(), "Selective scan (prefill).");
  m.def("selective_scan_step", &selective_scan_step, nb::arg("state").noconvert(),
        nb::arg("u").noconvert(), nb::arg("delta").noconvert(), nb::arg("A").noconvert(),
        nb::arg("B").noconvert(), nb::arg("C").noconvert(), nb::arg("D").noconvert().none(),
        nb::arg("z").noconvert().none(), nb::arg("delta_bias").noconvert().none(),
        nb::arg("out").noconvert(), nb::arg("u_scale"), nb::arg("delta_scale"),
        nb::arg("A_scale"), nb::arg("B_scale"), nb::arg("C_scale"), nb::arg("D_scale"),
        nb::arg("z_scale"), nb::arg("delta_bias_scale"), nb::arg("state_scale"),
        nb::arg("state_rounding"), nb::arg("softplus"), nb::arg("stream"),
        nb::arg("dt_x").noconvert().none() = nb::none(),
        nb::arg("dt_w").noconvert().none() = nb::none(), nb::arg("dt_gemm_scale") = 1.0f,
        nb::arg("dt_rounding") = 0, nb::arg("z_row") = 0, nb::arg("B_row") = 0,
        nb::arg("C_row") = 0, nb::call_guard<nb::gil_scoped_release>(),
        "One selective-scan decode step; the state (B, E, N) is updated in place. With dt_x and "
        "dt_w, delta is an int8 output: dt_proj's W8A8 GEMM computed inside the step. z_row, "
        "B_row, C_row > 0: that input is the 1-D span of rows that many elements apart.");
  m.def("int8_gemm", &int8_gemm, nb::arg("x").noconvert(), nb::arg("w").noconvert(),
        nb::arg("out").noconvert(), nb::arg("scale"), nb::arg("out_scale"), nb::arg("rounding"),
        nb::arg("seq_len"), nb::arg("algo"), nb::arg("stream"), nb::arg("constant_weight") = false,
        nb::call_guard<nb::gil_scoped_release>(),
        "x (M, K) int8 @ w (N, K)^T int8 -> exact int32 -> epilogue into out (its dtype decides). "
        "constant_weight: the kernel launched just before on the stream does not write w.");
  m.def("x_proj_seq_last", &x_proj_seq_last, nb::arg("u").noconvert(), nb::arg("w").noconvert(),
        nb::arg("dt_low").noconvert(), nb::arg("B").noconvert(), nb::arg("C").noconvert(),
        nb::arg("scale"), nb::arg("out_scale"), nb::arg("rounding"), nb::arg("split_k"),
        nb::arg("stream"), nb::call_guard<nb::gil_scoped_release>(),
        "x_proj from sequence-last codes u (B, E, L) and w (R + 2N, E): INT8 codes of dt_low "
        "(B, L, R), B and C (B, N, L), with the W8A8 epilogue.");
  m.attr("decode_w8a8_layer_bytes") = sizeof(quamba::DecodeLayer);
  m.attr("decode_w8a8_phases") = quamba::decode_phase_count();
  m.def("decode_w8a8_exchange_words", &quamba::decode_exchange_words, nb::arg("d_model"),
        nb::arg("d_inner"), nb::arg("dt_rank"), nb::arg("d_state"), nb::arg("n_layers"),
        "Words of decode_w8a8's exchange workspace (zeroed before the first call).");
  m.def("decode_w8a8_x_slab_columns", &quamba::decode_x_slab_columns, nb::arg("d_inner"),
        nb::arg("blocks"),
        "Columns of each block's slab of w_x (see decode_w8a8.h) on a grid of `blocks`.");
  m.def("decode_w8a8_supported", &decode_w8a8_supported, nb::arg("device"),
        "Whether decode_w8a8 can run on this device (compute capability 9.0+, sm_90 code built).");
  m.def("decode_w8a8_pack", &decode_w8a8_pack, nb::arg("pointers"), nb::arg("scalars"),
        nb::arg("roundings"), "Per-layer records of decode_w8a8 (bytes).");
  m.def("decode_w8a8", &decode_w8a8, nb::arg("layers").noconvert(), nb::arg("n_layers"),
        nb::arg("d_model"), nb::arg("d_inner"), nb::arg("dt_rank"), nb::arg("d_state"),
        nb::arg("had_m"),
        nb::arg("hidden_in").noconvert(), nb::arg("hidden_out").noconvert(),
        nb::arg("residual_out").noconvert(), nb::arg("exchange").noconvert(),
        nb::arg("counters").noconvert(), nb::arg("x_slab_blocks"), nb::arg("inflight"),
        nb::arg("stream"), nb::arg("timing").noconvert().none() = nb::none(),
        nb::call_guard<nb::gil_scoped_release>(),
        "A whole W8A8 decode step (batch 1) of every layer in one persistent kernel.");
  m.def("int32_epilogue", &int32_epilogue, nb::arg("acc").noconvert(), nb::arg("out").noconvert(),
        nb::arg("scale"), nb::arg("out_scale"), nb::arg("rounding"), nb::arg("seq_len"),
        nb::arg("stream"), nb::call_guard<nb::gil_scoped_release>(),
        "The W8A8 epilogue over int32 accumulators acc (M, N) into out (its dtype decides).");
}
