// Gram Newton-Schulz: the ns5 polynomial of X0 computed on its m x m Gram matrix, for the CPU kernel.
// Op for op the arithmetic of muonkern/ops/fallback.py (gram_iteration), so the CPU kernel and the
// fallback agree bitwise. The CUDA kernel runs the same products on cuBLASLt (ns5_cuda.cpp,
// ns5_gram_iteration).
//
//   R = X0 X0^T, Q = I; per step P = a I + b R + c R R, R = P R P, Q = P Q; the result is Q X0.
//
// P and R are polynomials in one matrix, so they commute and Q X0 is the standard iteration's X up
// to rounding (P R P keeps R symmetric better than P P R). The last step of a stretch skips the R
// update; after each restart step X0 = Q X0, R = X0 X0^T, Q = I. A tall X0 (m > n) uses the n x n
// Gram matrix X0^T X0 and right products (Q = Q P, result X0 Q): no transposed copy.
#include "ns5_gram.h"

#include <ATen/ATen.h>

#include <algorithm>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "ns5_common.h"

namespace muonkern {

bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7 || !__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return false;
    unsigned xcr0 = 0, xcr0_high = 0;
    __asm__("xgetbv" : "=a"(xcr0), "=d"(xcr0_high) : "c"(0));
    if ((xcr0 & 0xE6) != 0xE6) return false;  // the OS saves SSE, AVX and AVX-512 (opmask, ZMM) state
    __cpuid_count(7, 1, a, b, c, d);
    return (a & (1u << 5)) != 0;  // CPUID.(EAX=7, ECX=1):EAX[5] = AVX512_BF16
  }();
  return has;
#else
  return false;
#endif
}

namespace {
bool emulated_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 && t.device().is_cpu() && !cpu_has_avx512_bf16();
}
}  // namespace

at::Tensor ns5_matmul(const at::Tensor& a, const at::Tensor& b) {
  if (!emulated_bf16(a)) return at::matmul(a, b);
  return at::matmul(a.to(at::kFloat), b.to(at::kFloat)).to(at::kBFloat16);
}

at::Tensor ns5_baddbmm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double beta, double alpha) {
  if (!emulated_bf16(c)) return at::baddbmm(c, a, b, beta, alpha);
  return at::baddbmm(c.to(at::kFloat), a.to(at::kFloat), b.to(at::kFloat), beta, alpha).to(at::kBFloat16);
}

at::Tensor ns5_normalized(const at::Tensor& G, double eps) {
  const at::Tensor X = G.to(at::kBFloat16);
  return X / (at::linalg_vector_norm(X, 2, at::IntArrayRef{-2, -1}, /*keepdim=*/true) + eps);
}

at::Tensor ns5_gram(const at::Tensor& G, const std::vector<double>& abc, double eps) {
  const int64_t m = G.size(-2), n = G.size(-1), steps = static_cast<int64_t>(abc.size() / 3);
  const bool wide = m <= n;
  const std::vector<int64_t> restarts = gram_restart_steps(steps);
  const at::Tensor X0 = ns5_normalized(G, eps);
  const int64_t batch = c10::multiply_integers(G.sizes().begin(), G.sizes().end() - 2);
  at::Tensor X = X0.reshape({batch, m, n});
  const auto gram = [wide](const at::Tensor& Y) { return wide ? ns5_matmul(Y, Y.mT()) : ns5_matmul(Y.mT(), Y); };
  // Q Y for a wide Y, Y Q for a tall one.
  const auto apply = [wide](const at::Tensor& Q, const at::Tensor& Y) { return wide ? ns5_matmul(Q, Y) : ns5_matmul(Y, Q); };
  at::Tensor R = gram(X), Q;  // Q undefined: the identity
  for (int64_t s = 1; s <= steps; ++s) {
    const double a = abc[3 * (s - 1)], b = abc[3 * (s - 1) + 1], c = abc[3 * (s - 1) + 2];
    // baddbmm with alpha = 0 ignores beta for bf16 on CPU (torch 2.14): c = 0 takes b R alone.
    at::Tensor P = c != 0 ? ns5_baddbmm(R, R, R, b, c) : R * b;
    P.diagonal(0, -2, -1).add_(a);
    Q = Q.defined() ? apply(P, Q) : P;
    if (s == steps) break;
    if (std::find(restarts.begin(), restarts.end(), s) != restarts.end()) {
      X = apply(Q, X);
      Q = at::Tensor();
      R = gram(X);
    } else {
      R = ns5_matmul(ns5_matmul(P, R), P);
    }
  }
  const at::Tensor out = Q.defined() ? apply(Q, X) : X;
  return out.reshape(G.sizes()).to(G.scalar_type()).contiguous();
}

}  // namespace muonkern
