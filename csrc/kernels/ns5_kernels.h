// Launch interface of the ns5 CUDA kernels. Torch-free on purpose: the .cu files that include it
// compile quickly, and csrc/ns5_cuda.cpp (which knows torch) fills these structs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernel_types.h"

namespace muonkern {

inline constexpr int kMaxBatchDims = 8;

// A batch of strided matrices: element (b, r, c) lives at data + offset(b) + r*row_stride + c*col_stride
// (in elements), where offset(b) decodes the flat batch index b over the leading dims.
struct StridedMatrices {
  const void* data;
  DType dtype;
  int batch_dims;
  int64_t batch_sizes[kMaxBatchDims];
  int64_t batch_strides[kMaxBatchDims];
  int64_t row_stride, col_stride;
};

// One ns5 call: `batch` matrices of m x n read from `in`, results written to the contiguous
// (batch, m, n) tensor `out` of the same dtype. The iteration runs on the wide orientation:
// R = min(m, n) rows, C = max(m, n) columns, transposing when m > n.
struct Ns5Problem {
  StridedMatrices in;
  void* out;
  int64_t batch, m, n;
  float eps;
  int steps;
  MUONKERN_HOST_DEVICE bool transpose() const { return m > n; }
  MUONKERN_HOST_DEVICE int64_t short_side() const { return m < n ? m : n; }
  MUONKERN_HOST_DEVICE int64_t long_side() const { return m < n ? n : m; }
};

// Norms for which a kernel may defer the scale 1/(||G|| + eps) to its Gram products: X X^T of the
// unscaled bf16(G) neither overflows fp32 (its entries are at most ||G||^2) nor loses its products
// to underflow. Outside (and for inf/NaN) the kernels scale X themselves.
inline constexpr float kDeferredMinNorm = 1e-10f;
inline constexpr float kDeferredMaxNorm = 1e10f;

// ---- the standard iteration on wgmma (sm_90a), one block per matrix of at most 128 x 128 ----
// (ns5_wgmma.cu). Fits: both sides at most 128, at most kFusedMaxSteps steps; abc holds 3 floats a step.
bool ns5_wgmma_fits(const Ns5Problem& p);
cudaError_t launch_ns5_wgmma(const Ns5Problem& p, const float* abc, cudaStream_t stream);

// ---- fused path: one launch; each matrix on a cluster of 1, 2, 4 or 8 blocks, all on chip ----
inline constexpr int kFusedMaxShortSide = 128;  // the B*X strip of 128 rows lives in registers
inline constexpr int kFusedMaxSteps = 32;       // coefficients travel in the kernel's parameters
inline constexpr int kFusedMaxCluster = 8;      // portable cluster size
// The Gram iteration instead of the standard one; `restarts` has bit s set to restart after step s
// (1-based; gram_restart_mask of ns5_schedule.h).
struct FusedGram {
  bool enabled;
  uint32_t restarts;
};
// A block's shared-memory extents: the short side padded to Rp (a multiple of 32) and the columns Cs
// of each of the cluster's slices of the long side (a multiple of 16).
struct FusedExtents {
  int64_t Rp, Cs;
};
inline FusedExtents fused_extents(int64_t short_side, int64_t long_side, int cluster) {
  const int64_t padded_long = (long_side + 16 * cluster - 1) / (16 * cluster) * (16 * cluster);
  return {(short_side + 31) / 32 * 32, padded_long / cluster};
}
// Shared memory per block for an m x n problem split over `cluster` blocks, for the Gram iteration
// (two more Rp x Rp buffers) or the standard one (0: short side too long).
size_t ns5_fused_smem_bytes(int64_t m, int64_t n, int cluster, bool gram);
// `abc` holds 3*steps host floats.
cudaError_t launch_ns5_fused(const Ns5Problem& p, const float* abc, const FusedGram& gram, int cluster,
                             cudaStream_t stream);

// ---- general path: the three products of each step run as cuBLASLt batched GEMMs ----
// X (batch, R, C) bf16 <- G / (||G||_F + eps) per matrix, transposed when m > n. One cooperative
// kernel; `scratch` holds ns5_normalize_scratch_floats(p) floats, 16-byte aligned.
// With `deferred` (3 device floats; only where ns5_normalize_can_defer) X may be left as bf16(G),
// unscaled: deferred then holds {1/s^2, 1/s, 0} for s = ||G||_F + eps, else {1, 1, 0} with X scaled.
int64_t ns5_normalize_scratch_floats(const Ns5Problem& p);
bool ns5_normalize_can_defer(const Ns5Problem& p);
cudaError_t launch_ns5_normalize(const Ns5Problem& p, __nv_bfloat16* X, float* scratch, float* deferred,
                                 cudaStream_t stream);
// Whether `func` is the normalize kernel (of any dtype); its arguments are (Ns5Problem, X, two float
// pointers into the scratch, the deferred-scale pointer). Graph replays redirect its input
// (csrc/ns5_graphs.cpp).
bool ns5_is_normalize_kernel(const void* func);
// The normalize kernel's pointer arguments after its Ns5Problem: X, warp sums, sums, deferred scale.
constexpr int kNormalizePointerArgs = 4;
// out (batch, m, n) <- X (batch, R, C), transposed back and cast to the output dtype.
cudaError_t launch_ns5_finish(const Ns5Problem& p, const __nv_bfloat16* X, cudaStream_t stream);

// ---- Gram path: the a*I of P = a I + b R + c R R, added in fp32 and rounded once ----
// M (batch, n, n) bf16, contiguous: M[b, i, i] += a.
cudaError_t launch_add_diagonal(__nv_bfloat16* M, int64_t batch, int64_t n, float a, cudaStream_t stream);
// Blocked symmetric products (csrc/ns5_cuda.cpp, BlockedProducts): D = alpha X X^T (+ beta C), X
// (batch, r, K) bf16 and C, D (batch, r, r) bf16, contiguous, cut into nb x nb blocks of h = r / nb,
// only the lower blocks computed (block row i >= block column j, in column-major terms). A job's
// `out` receives the device pointer arrays of one cuBLASLt pointer-array batch over those blocks,
// matrix by matrix: out[k] = X + b r K + i h K (A), out[P + k] = X + b r K + j h K (B),
// out[2P + k] = D + b r r + j h r + i h (D) and, where C is set, out[3P + k] = C + b r r + j h r + i h,
// P = batch nb (nb + 1) / 2. Every job of one launch shares batch, r and nb.
struct SymmetricBlockJob {
  const __nv_bfloat16* X;
  int64_t K;
  const __nv_bfloat16* C;  // null: no C array
  __nv_bfloat16* D;
  const void** out;
};
constexpr int kMaxSymmetricBlockJobs = 8;
struct SymmetricBlockJobs {
  SymmetricBlockJob job[kMaxSymmetricBlockJobs];
  int count = 0;
  int nb = 0;
  int64_t batch = 0, r = 0;
};
cudaError_t launch_symmetric_block_pointers(const SymmetricBlockJobs& jobs, cudaStream_t stream);
// M (batch, n, n) bf16, contiguous, symmetric but for its missing blocks: M[b, j, i] = M[b, i, j]
// wherever i / h < j / h (every block above the diagonal from its transpose; n a multiple of h,
// batch < 65536).
cudaError_t launch_mirror_blocks(__nv_bfloat16* M, int64_t batch, int64_t n, int64_t h, cudaStream_t stream);

}  // namespace muonkern
