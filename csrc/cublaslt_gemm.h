// cuBLASLt GEMMs of the ns5 CUDA paths: D = alpha * op(A) op(B) + beta * C, column-major, bf16
// operands, fp32 accumulation, strided batches (a batch stride of 0 repeats one matrix) or batches of
// matrices at any addresses (pointer_array); C and D bf16 or fp32 (`out_type`, the same for both).
// C and D are separate buffers, which is what lets the Newton-Schulz polynomials ride in alpha and
// beta; alpha and beta are host floats or, per shape, device pointers. Plans are built once per shape and cached.
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
  int64_t out_type = CUDA_R_16BF;  // cudaDataType of C and D: CUDA_R_16BF or CUDA_R_32F
  int64_t device_scalars = 0;      // 1: alpha and beta are device pointers (the overload below)
  int64_t stride_d = -1;           // D's batch stride where it is not C's (-1: C's)
  // 1: a pointer-array batch. The A, B, C and D arguments are then device arrays of `batch` matrix
  // addresses each (cast to the argument types), and the strides are unused.
  int64_t pointer_array = 0;
  bool operator==(const GemmShape& o) const { return std::memcmp(this, &o, sizeof(GemmShape)) == 0; }
};

// Runs on `stream` with torch's cuBLASLt handle and workspace for the current stream.
void gemm(const GemmShape& s, float alpha, const __nv_bfloat16* A, const __nv_bfloat16* B, float beta,
          const void* C, void* D, cudaStream_t stream);
// D = alpha op(A) op(B) with alpha read from device memory when the GEMM runs (s.device_scalars
// must be 1): a scale that a kernel earlier on the stream computed, with no host synchronization.
// `zero` points to a device 0.f (cuBLASLt then reads beta from the device too).
void gemm(const GemmShape& s, const float* alpha, const __nv_bfloat16* A, const __nv_bfloat16* B, const float* zero,
          void* D, cudaStream_t stream);

}  // namespace muonkern
