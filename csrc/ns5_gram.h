// Pieces of the CPU kernel of muonkern::ns5 in ATen ops: the normalization X0 = G / (||G||_F + eps)
// in bf16, and the Gram Newton-Schulz iteration.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace muonkern {

// Whether the CPU has AVX512-BF16 (and the OS saves AVX-512 state): there ATen's CPU bf16 GEMM runs
// on bf16 instructions (AMX too where present) and beats fp32 GEMMs; without them it is many times
// slower than fp32 (README, "CPU"). The same test as torch.cpu._is_avx512_bf16_supported(), which
// the fallback asks (muonkern/ops/fallback.py, products_for).
bool cpu_has_avx512_bf16();

// a b and beta c + alpha a b (batched), accumulated in fp32 and rounded once to the operands' dtype.
// bf16 on a CPU without AVX512-BF16 runs as fp32 GEMMs of the bf16 values (exact products, so the
// same arithmetic). The fallback's products (products_for) are the same ATen ops, so the two agree
// bitwise.
at::Tensor ns5_matmul(const at::Tensor& a, const at::Tensor& b);
at::Tensor ns5_baddbmm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double beta, double alpha);

// bf16 G / (||G||_F + eps) per matrix (the norm of the bf16-rounded G), shape of G.
at::Tensor ns5_normalized(const at::Tensor& G, double eps);

// The op's result under algorithm="gram": G's dtype and shape, contiguous. `abc` holds (a, b, c) per
// step; restarts after the steps of gram_restart_steps (ns5_schedule.h).
at::Tensor ns5_gram(const at::Tensor& G, const std::vector<double>& abc, double eps);

}  // namespace muonkern
