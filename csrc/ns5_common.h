// Argument rules of muonkern::ns5 shared by the CPU and CUDA kernels (the Python fallback applies the
// same rules with the same messages: muonkern/ops/ns5_args.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kernel_dtype.h"
#include "ns5_schedule.h"

namespace muonkern {

// Schema of the op; muonkern/ops/schemas.py holds the same string for the fallback.
inline constexpr const char* kNs5Schema =
    "ns5(Tensor G, int steps=5, float[]? coefficients=None, float eps=1e-07, str algorithm=\"auto\") -> Tensor";

inline void check_ns5_algorithm(std::string_view algorithm) {
  TORCH_CHECK_VALUE(algorithm == "auto" || algorithm == "standard" || algorithm == "gram",
                    "ns5: algorithm must be 'auto', 'standard' or 'gram', got '" + std::string(algorithm) + "'");
}

// An environment variable as an integer; `fallback` where it is unset or empty (read at every call).
inline int64_t env_int(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::atoll(value) : fallback;
}

inline void check_ns5_args(const at::Tensor& G, int64_t steps,
                           const std::optional<at::ArrayRef<double>>& coefficients, double eps,
                           std::string_view algorithm) {
  TORCH_CHECK_VALUE(G.dim() >= 2, std::string("ns5: expected a tensor of rank >= 2 with shape (..., m, n), got shape ") +
                                      shape_string(G.sizes()));
  const at::ScalarType dtype = G.scalar_type();
  TORCH_CHECK_TYPE(is_kernel_dtype(dtype),
                   std::string("ns5: expected a real floating-point tensor (float16, bfloat16, float32 or float64), "
                               "got dtype ") + python_dtype_name(dtype));
  TORCH_CHECK_VALUE(steps >= 0, "ns5: steps must be >= 0, got " + std::to_string(steps));
  TORCH_CHECK_VALUE(!coefficients.has_value() || static_cast<int64_t>(coefficients->size()) == 3 * steps,
                    "ns5: coefficients must hold 3*steps = " + std::to_string(3 * steps) +
                        " values (one (a, b, c) triple per step), got " +
                        std::to_string(coefficients ? coefficients->size() : 0));
  if (coefficients.has_value())
    for (const double c : *coefficients)
      TORCH_CHECK_VALUE(std::isfinite(c), "ns5: coefficients must be finite (one is NaN or infinite)");
  TORCH_CHECK_VALUE(eps > 0 && std::isfinite(eps),
                    "ns5: eps must be positive and finite (it keeps a zero matrix from dividing by zero), got " +
                        python_float(eps));
  check_ns5_algorithm(algorithm);
}

// ---- algorithm="gram" and the choice of algorithm="auto" ----------------------------------------
// The same rules and constants as muonkern/ops/ns5_args.py (where they are explained); a test checks
// that both choose alike on a grid of shapes. Recalibrate both after GPU timing. The restart schedule
// is in ns5_schedule.h.
inline constexpr double kGramMinSaving = 0.25;       // "auto" takes gram where it saves >= 25% of FLOPs
inline constexpr int64_t kGramMinShortSide = 512;    // ... and the short side is at least this

// FLOPs of one matrix with r rows in the products' inner r x r matrices and c columns (r may exceed
// c: the fused kernel's count per block, c being a block's slice).
inline double ns5_flops_sides(double r, double c, int64_t steps, bool gram) {
  if (!gram) return steps * (4.0 * r * r * c + 2.0 * r * r * r);
  if (steps == 0) return 0.0;
  const int64_t restarts = static_cast<int64_t>(gram_restart_steps(steps).size());
  return 2.0 * r * r * c * (2 + 2 * restarts) + 2.0 * r * r * r * (4 * steps - 3 * (restarts + 1));
}

// FLOPs of one m x n matrix (ns5_flops of ns5_args.py: r = short side, c = long side).
inline double ns5_flops(int64_t m, int64_t n, int64_t steps, bool gram) {
  return ns5_flops_sides(static_cast<double>(std::min(m, n)), static_cast<double>(std::max(m, n)), steps, gram);
}

// Whether algorithm "gram", or "auto" by the FLOP rule, runs the Gram iteration on m x n matrices
// (the CPU kernel's choice; the CUDA kernel's fused path may also take it, ns5_cuda.cpp).
inline bool ns5_use_gram(std::string_view algorithm, int64_t m, int64_t n, int64_t steps) {
  if (algorithm != "auto") return algorithm == "gram";
  if (m == n || std::min(m, n) < kGramMinShortSide || steps == 0) return false;
  return ns5_flops(m, n, steps, true) <= (1.0 - kGramMinSaving) * ns5_flops(m, n, steps, false);
}

// The number of matrices in G (..., m, n).
inline int64_t ns5_batch(const at::Tensor& G) {
  const int64_t per = G.size(-2) * G.size(-1);
  return per == 0 ? 0 : G.numel() / per;
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
