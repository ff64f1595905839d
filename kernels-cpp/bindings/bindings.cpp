// nanobind module quamba_kernels._C. Validation only: every array is .noconvert() (never silently
// copied), outputs are passed in, every launch takes the caller's stream, runs on the array's device
// with the GIL released, and checks the launch error.
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include "quantize.h"

namespace nb = nanobind;

namespace {

template <typename T>
using CudaArray = nb::ndarray<T, nb::device::cuda, nb::c_contig>;

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
}

void use_device_of(int device_id) { check_cuda(cudaSetDevice(device_id), "cudaSetDevice"); }

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

void quantize_int8(CudaArray<const float> x, CudaArray<int8_t> out, float scale, int rounding,
                   std::uintptr_t stream) {
  if (x.size() != out.size()) throw std::invalid_argument("x and out must have the same number of elements");
  if (x.device_id() != out.device_id()) throw std::invalid_argument("x and out must be on the same device");
  if (!(scale > 0.0f) || scale == INFINITY) throw std::invalid_argument("scale must be finite and > 0");
  if (rounding != 0 && rounding != 1) throw std::invalid_argument("rounding must be 0 (half_away) or 1 (half_even)");
  use_device_of(x.device_id());
  check_cuda(quamba::launch_quantize_int8(x.data(), out.data(), static_cast<int64_t>(x.size()), scale,
                                          rounding, reinterpret_cast<cudaStream_t>(stream)),
             "quantize_int8 launch");
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "CUDA kernels of quamba-kernels (bound with nanobind, tensors via DLPack).";
  m.attr("__version__") = QUAMBA_KERNELS_VERSION;
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.def("device_count", &device_count, "Number of CUDA devices the runtime sees (0 when none).");
  m.def("device_error", &device_error, "Why no CUDA device can be used, or '' when one can.");
  m.def("quantize_int8", &quantize_int8, nb::arg("x").noconvert(), nb::arg("out").noconvert(),
        nb::arg("scale"), nb::arg("rounding"), nb::arg("stream"),
        nb::call_guard<nb::gil_scoped_release>(),
        "out = clamp(round(x / scale), -128, 127) for float32 x and int8 out.");
}
