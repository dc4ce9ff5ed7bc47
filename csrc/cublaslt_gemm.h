// cuBLASLt GEMMs of the ns5 CUDA paths: D = alpha * op(A) op(B) + beta * C, column-major, bf16
// operands, fp32 accumulation, strided batches. C and D are separate buffers, which is what lets the
// Newton-Schulz polynomials ride in alpha and beta. Plans are built once per shape and cached.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace muonkern {

// All fields int64 so the struct has no padding and compares/hashes bytewise.
struct GemmShape {
  int64_t ta, tb;  // cublasOperation_t: CUBLAS_OP_N or CUBLAS_OP_T
  int64_t m, n, k, lda, ldb, ldc, stride_a, stride_b, stride_c;
  int64_t batch, device;
  bool operator==(const GemmShape& o) const { return std::memcmp(this, &o, sizeof(GemmShape)) == 0; }
};

// Runs on `stream` with torch's cuBLASLt handle and workspace for the current stream.
void gemm(const GemmShape& s, float alpha, const __nv_bfloat16* A, const __nv_bfloat16* B, float beta,
          const __nv_bfloat16* C, __nv_bfloat16* D, cudaStream_t stream);

}  // namespace muonkern
