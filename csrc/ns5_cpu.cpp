// CPU kernel of muonkern::ns5: the reference iteration as a composite of ATen ops, op for op the
// same arithmetic as the Python fallback (muonkern/ops/fallback.py), so the two agree bitwise; the
// Gram algorithm in ns5_gram.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ns5_common.h"
#include "ns5_gram.h"

namespace muonkern {

at::Tensor ns5_cpu(const at::Tensor& G, int64_t steps, std::optional<at::ArrayRef<double>> coefficients,
                   double eps, c10::string_view algorithm) {
  check_ns5_args(G, steps, coefficients, eps, algorithm);
  const std::vector<double> abc = ns5_step_coefficients(steps, coefficients);
  if (ns5_use_gram(algorithm, G.size(-2), G.size(-1), steps)) return ns5_gram(G, abc, eps);
  at::Tensor X = ns5_normalized(G, eps);
  const bool transposed = G.size(-2) > G.size(-1);
  if (transposed) X = X.mT();
  for (int64_t s = 0; s < steps; ++s) {
    const double a = abc[3 * s], b = abc[3 * s + 1], c = abc[3 * s + 2];
    at::Tensor A = ns5_matmul(X, X.mT());
    at::Tensor B = A * b + ns5_matmul(A, A) * c;
    X = X * a + ns5_matmul(B, X);
  }
  if (transposed) X = X.mT();
  return X.to(G.scalar_type()).contiguous();
}

TORCH_LIBRARY_IMPL(muonkern, CPU, m) { m.impl("ns5", &ns5_cpu); }

}  // namespace muonkern
