// muonkern::dirquad on the GPU: all the dot products of a directional-curvature probe, for every
// parameter tensor and direction, in one pass-per-4-columns over memory.
//
// Grid of the chunk kernel: (chunk, direction, column group). A block reads its chunk of u_kp once
// per group of kDirquadColumnsPerPass dot products (column 0: the gradient, 1: u itself, 2 + r:
// product r) and writes float64 partial sums. The finish kernel adds the partial sums of each
// (direction, column, parameter) in chunk order with one warp per output: fixed order, so results
// are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "dirquad_kernels.h"

namespace muonkern {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCols = kDirquadColumnsPerPass;

__device__ __forceinline__ double to_double(float x) { return x; }
__device__ __forceinline__ double to_double(double x) { return x; }
__device__ __forceinline__ double to_double(__half x) { return __half2float(x); }
__device__ __forceinline__ double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ void accumulate(const int64_t* ptrs, int ncols, int64_t begin, int64_t end, const T* u,
                           double (&acc)[kCols]) {
  const T* others[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) others[c] = c < ncols ? reinterpret_cast<const T*>(ptrs[c]) : nullptr;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const double ui = to_double(u[i]);
#pragma unroll
    for (int c = 0; c < kCols; ++c)
      if (c < ncols) acc[c] += ui * to_double(others[c][i]);
  }
}

__global__ void __launch_bounds__(kThreads) dirquad_chunks_kernel(DirquadProblem pb) {
  const int64_t chunk = blockIdx.x, k = blockIdx.y;
  const int64_t col0 = static_cast<int64_t>(blockIdx.z) * kCols;
  const int64_t cols = 2 + pb.R;
  const int ncols = static_cast<int>(cols - col0 < kCols ? cols - col0 : kCols);
  const int64_t p = pb.chunk_param[chunk];
  const int64_t begin = (chunk - pb.chunk_offset[p]) * kDirquadChunk;
  const int64_t end = begin + kDirquadChunk < pb.numel[p] ? begin + kDirquadChunk : pb.numel[p];

  const int64_t u_ptr = pb.direction_ptrs[k * pb.P + p];
  int64_t ptrs[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int64_t col = col0 + c;
    ptrs[c] = c >= ncols ? 0
              : col == 0 ? pb.grad_ptrs[p]
              : col == 1 ? u_ptr
                         : pb.product_ptrs[(k * pb.R + col - 2) * pb.P + p];
  }

  double acc[kCols] = {};
  switch (static_cast<DType>(pb.dtype[p])) {
    case DType::Float32: accumulate(ptrs, ncols, begin, end, reinterpret_cast<const float*>(u_ptr), acc); break;
    case DType::Float64: accumulate(ptrs, ncols, begin, end, reinterpret_cast<const double*>(u_ptr), acc); break;
    case DType::Float16: accumulate(ptrs, ncols, begin, end, reinterpret_cast<const __half*>(u_ptr), acc); break;
    case DType::BFloat16:
      accumulate(ptrs, ncols, begin, end, reinterpret_cast<const __nv_bfloat16*>(u_ptr), acc);
      break;
  }

  // Block reduction in a fixed order: butterfly within warps, then warp sums in warp order.
  __shared__ double warp_sums[kWarps][kCols];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    double v = acc[c];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp][c] = v;
  }
  __syncthreads();
  if (threadIdx.x < ncols) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w][threadIdx.x];
    pb.partial[(k * pb.chunks + chunk) * cols + col0 + threadIdx.x] = total;
  }
}

// One warp per output (k, col, p), outputs in the (K, 2 + R, P) layout of `out`.
__global__ void __launch_bounds__(kThreads) dirquad_finish_kernel(DirquadProblem pb) {
  const int64_t cols = 2 + pb.R;
  const int64_t outputs = pb.K * cols * pb.P;
  const int64_t index = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (index >= outputs) return;
  const int64_t p = index % pb.P, col = (index / pb.P) % cols, k = index / (pb.P * cols);
  double v = 0.0;
  for (int64_t c = pb.chunk_offset[p] + lane; c < pb.chunk_offset[p + 1]; c += 32)
    v += pb.partial[(k * pb.chunks + c) * cols + col];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (lane == 0) pb.out[index] = v;
}

}  // namespace

cudaError_t launch_dirquad(const DirquadProblem& pb, cudaStream_t stream) {
  const int64_t cols = 2 + pb.R;
  if (pb.chunks > 0) {
    const dim3 grid(static_cast<unsigned>(pb.chunks), static_cast<unsigned>(pb.K),
                    static_cast<unsigned>((cols + kCols - 1) / kCols));
    dirquad_chunks_kernel<<<grid, kThreads, 0, stream>>>(pb);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  const int64_t outputs = pb.K * cols * pb.P;
  const int64_t blocks = (outputs * 32 + kThreads - 1) / kThreads;
  dirquad_finish_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(pb);
  return cudaGetLastError();
}

}  // namespace muonkern
