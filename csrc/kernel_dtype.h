// Torch dtypes as the kernels' DType, and as the names Python prints (so C++ error messages read
// like the Python fallback's).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cctype>
#include <cstdio>
#include <string>

#include "kernels/kernel_types.h"

namespace muonkern {

inline std::string python_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "torch.float64";
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {  // torch.float8_e5m2 and the like: c10 spells them Float8_e5m2
      std::string name = c10::toString(t);
      for (char& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      return "torch." + name;
    }
  }
}

// Messages are assembled without iostreams: an extension built with a newer g++ than torch's (seen:
// g++ 13 against torch 2.11) crashed formatting numbers through an ostream.

// A shape as Python prints a tuple: (3, 4), (5,), ().
inline std::string shape_string(c10::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

// A double as Python's str() prints it in the usual cases (1e-07, 0.5, -2.0, 0.0, nan); six
// significant digits.
inline std::string python_float(double v) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%g", v);
  std::string s = buf;
  if (s.find_first_of(".ein") == std::string::npos) s += ".0";
  return s;
}

// The dtypes the kernels take (to_kernel_dtype's cases): what ns5 and dirquad accept.
inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline DType to_kernel_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    case at::kDouble: return DType::Float64;
    default: TORCH_CHECK_TYPE(false, std::string(op) + ": unsupported dtype " + python_dtype_name(t));
  }
}

}  // namespace muonkern
