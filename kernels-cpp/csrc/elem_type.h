#pragma once
// Element types that cross the host/device boundary. Host-only header (no CUDA types), shared by the
// launchers and the nanobind module so that dtype dispatch happens in one place per op.
#include <cstdint>

namespace quamba {

enum class ElemType : int { Int8 = 0, Float16 = 1, BFloat16 = 2, Float32 = 3 };

inline const char* elem_type_name(ElemType t) {
  switch (t) {
    case ElemType::Int8: return "int8";
    case ElemType::Float16: return "float16";
    case ElemType::BFloat16: return "bfloat16";
    case ElemType::Float32: return "float32";
  }
  return "unknown";
}

inline int elem_size(ElemType t) {
  switch (t) {
    case ElemType::Int8: return 1;
    case ElemType::Float16: return 2;
    case ElemType::BFloat16: return 2;
    case ElemType::Float32: return 4;
  }
  return 0;
}

}  // namespace quamba
