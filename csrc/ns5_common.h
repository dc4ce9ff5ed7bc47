// Argument rules of muonkern::ns5 shared by the CPU and CUDA kernels (the Python fallback applies the
// same rules with the same messages: muonkern/ops/ns5_args.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

#include "kernel_dtype.h"

namespace muonkern {

// Schema of the op; muonkern/ops/schemas.py holds the same string for the fallback.
inline constexpr const char* kNs5Schema =
    "ns5(Tensor G, int steps=5, float[]? coefficients=None, float eps=1e-07) -> Tensor";

// (a, b, c) of KellerJordan/Muon's quintic iteration.
inline constexpr double kJordanCoefficients[3] = {3.4445, -4.7750, 2.0315};

inline void check_ns5_args(const at::Tensor& G, int64_t steps,
                           const std::optional<at::ArrayRef<double>>& coefficients, double eps) {
  TORCH_CHECK_VALUE(G.dim() >= 2, std::string("ns5: expected a tensor of rank >= 2 with shape (..., m, n), got shape ") +
                                      shape_string(G.sizes()));
  TORCH_CHECK_TYPE(at::isFloatingType(G.scalar_type()),
                   std::string("ns5: expected a real floating-point tensor, got dtype ") + python_dtype_name(G.scalar_type()));
  TORCH_CHECK_VALUE(steps >= 0, "ns5: steps must be >= 0, got " + std::to_string(steps));
  TORCH_CHECK_VALUE(!coefficients.has_value() || static_cast<int64_t>(coefficients->size()) == 3 * steps,
                    "ns5: coefficients must hold 3*steps = " + std::to_string(3 * steps) +
                        " values (one (a, b, c) triple per step), got " +
                        std::to_string(coefficients ? coefficients->size() : 0));
  TORCH_CHECK_VALUE(eps > 0, "ns5: eps must be positive (it keeps a zero matrix from dividing by zero), got " +
                                 python_float(eps));
}

// Flattened (a, b, c) per step: the user's list, or Jordan's triple repeated.
inline std::vector<double> ns5_step_coefficients(int64_t steps,
                                                 const std::optional<at::ArrayRef<double>>& coefficients) {
  if (coefficients.has_value()) return coefficients->vec();
  std::vector<double> abc;
  abc.reserve(3 * steps);
  for (int64_t s = 0; s < steps; ++s) abc.insert(abc.end(), kJordanCoefficients, kJordanCoefficients + 3);
  return abc;
}

}  // namespace muonkern
