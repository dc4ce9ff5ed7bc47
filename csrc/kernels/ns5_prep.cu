// Elementwise ends of the general ns5 path, around the cuBLASLt products:
//   normalize: X = bf16(G / (||G||_F + eps)), transposed to the wide orientation, in ONE cooperative
//              launch (sum of squares per tile row group | grid sync | sum per matrix, in a fixed order, so the
//              result is deterministic | grid sync | scale, cast, transpose);
//   finish:    out = X transposed back and cast to G's dtype.
// Where no transpose is needed and each matrix is one row-major span, both stream it flat, 16
// elements per thread in flight (the common wide, contiguous case; `python bench/ns5_profile.py`:
// normalize at 2048x8192 fp32 took 216 us with tiles, 105 us flat, still ~2x the memory bound).
// Otherwise they walk 32x32 tiles of the m x n matrices and transpose through
// shared memory, so global reads and writes stay coalesced in either orientation.
#include <cooperative_groups.h>

#include "ns5_device.cuh"
#include "ns5_kernels.h"

namespace muonkern {
namespace {

namespace cg = cooperative_groups;
using bf16 = __nv_bfloat16;

constexpr int kTile = 32;
constexpr int kRowsPerPass = 8;  // a 32 x 8 thread block covers a tile in 4 passes
constexpr int kThreads = kTile * kRowsPerPass;

constexpr int kFlatPerThread = 16;
constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kFlatPerThread;  // elements per flat work unit

// Whether each of p's input matrices is one row-major span (any batch strides).
__host__ __device__ inline bool rows_contiguous(const Ns5Problem& p) {
  return p.in.col_stride == 1 && p.in.row_stride == p.n;
}

struct TileGrid {
  int64_t tiles_m, tiles_n, per_matrix, total;
  __host__ __device__ explicit TileGrid(const Ns5Problem& p)
      : tiles_m((p.m + kTile - 1) / kTile), tiles_n((p.n + kTile - 1) / kTile),
        per_matrix(tiles_m * tiles_n), total(p.batch * per_matrix) {}
};

template <typename T>
__global__ void __launch_bounds__(kThreads) ns5_normalize_kernel(const __grid_constant__ Ns5Problem p, bf16* X,
                                                                 float* warp_sumsq, float* sumsq) {
  __shared__ float tile[kTile][kTile + 1];
  const cg::grid_group grid = cg::this_grid();
  const TileGrid tg(p);
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const T* G = static_cast<const T*>(p.in.data);

  // Each warp sums its part of a work unit (a flat chunk or a tile): no block barrier per unit, and a
  // fixed summation order.
  const bool flat = rows_contiguous(p);
  const int64_t mn = p.m * p.n, chunks = (mn + kChunk - 1) / kChunk;
  const int64_t units = flat ? chunks : tg.per_matrix;  // per matrix
  for (int64_t t = blockIdx.x; flat && t < p.batch * chunks; t += gridDim.x) {
    const int64_t b = t / chunks, base = (t % chunks) * kChunk;
    const T* g = G + batch_offset(p.in, b);
    float partial = 0.f;
#pragma unroll
    for (int k = 0; k < kFlatPerThread; ++k) {
      const int64_t i = base + k * kThreads + threadIdx.x;
      if (i < mn) {
        const float v = to_float(g[i]);
        partial += v * v;
      }
    }
    for (int o = 16; o > 0; o >>= 1) partial += __shfl_xor_sync(0xffffffffu, partial, o);
    if (tx == 0) warp_sumsq[t * kRowsPerPass + ty] = partial;
  }
  for (int64_t t = blockIdx.x; !flat && t < tg.total; t += gridDim.x) {
    const int64_t b = t / tg.per_matrix, rt = (t % tg.per_matrix) / tg.tiles_n, ct = t % tg.tiles_n;
    const T* g = G + batch_offset(p.in, b);
    const int64_t c = ct * kTile + tx;
    float partial = 0.f;
    for (int i = ty; i < kTile; i += kRowsPerPass) {
      const int64_t r = rt * kTile + i;
      if (r < p.m && c < p.n) {
        const float v = to_float(g[r * p.in.row_stride + c * p.in.col_stride]);
        partial += v * v;
      }
    }
    for (int o = 16; o > 0; o >>= 1) partial += __shfl_xor_sync(0xffffffffu, partial, o);
    if (tx == 0) warp_sumsq[t * kRowsPerPass + ty] = partial;
  }
  grid.sync();

  // One block per matrix adds its units' sums, always in the same order: a strided, unrolled sum per
  // thread (a large matrix has tens of thousands of partial sums: one warp alone took ~100 us), then
  // the block's.
  __shared__ float block_scratch[32];
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    float s = 0.f;
    const float* partials = warp_sumsq + b * units * kRowsPerPass;
    const int64_t count = units * kRowsPerPass;
#pragma unroll 8
    for (int64_t t = threadIdx.x; t < count; t += kThreads) s += partials[t];
    s = block_sum(s, block_scratch);
    if (threadIdx.x == 0) sumsq[b] = s;
  }
  grid.sync();

  const int64_t R = p.short_side(), C = p.long_side();
  const bool transpose = p.transpose();
  for (int64_t t = blockIdx.x; flat && !transpose && t < p.batch * chunks; t += gridDim.x) {
    const int64_t b = t / chunks, base = (t % chunks) * kChunk;
    const T* g = G + batch_offset(p.in, b);
    bf16* x = X + b * mn;
    const float scale = 1.f / (sqrtf(sumsq[b]) + p.eps);
#pragma unroll
    for (int k = 0; k < kFlatPerThread; ++k) {
      const int64_t i = base + k * kThreads + threadIdx.x;
      if (i < mn) x[i] = __float2bfloat16_rn(to_float(g[i]) * scale);
    }
  }
  for (int64_t t = blockIdx.x; !(flat && !transpose) && t < tg.total; t += gridDim.x) {
    const int64_t b = t / tg.per_matrix, rt = (t % tg.per_matrix) / tg.tiles_n, ct = t % tg.tiles_n;
    const T* g = G + batch_offset(p.in, b);
    bf16* x = X + b * R * C;
    const float scale = 1.f / (sqrtf(sumsq[b]) + p.eps);
    for (int i = ty; i < kTile; i += kRowsPerPass) {
      const int64_t r = rt * kTile + i, c = ct * kTile + tx;
      const float v = (r < p.m && c < p.n) ? to_float(g[r * p.in.row_stride + c * p.in.col_stride]) * scale : 0.f;
      if (!transpose) {
        if (r < p.m && c < p.n) x[r * C + c] = __float2bfloat16_rn(v);
      } else {
        tile[i][tx] = v;
      }
    }
    if (transpose) {  // X row = G column
      __syncthreads();
      for (int i = ty; i < kTile; i += kRowsPerPass) {
        const int64_t xr = ct * kTile + i, xc = rt * kTile + tx;
        if (xr < R && xc < C) x[xr * C + xc] = __float2bfloat16_rn(tile[tx][i]);
      }
      __syncthreads();
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ns5_finish_kernel(const __grid_constant__ Ns5Problem p, const bf16* X) {
  __shared__ float tile[kTile][kTile + 1];
  const TileGrid tg(p);
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int64_t R = p.short_side(), C = p.long_side();
  const bool transpose = p.transpose();
  if (!transpose) {  // X and out are the same contiguous (batch, m, n) layout: one flat pass
    const int64_t total = p.batch * p.m * p.n;
    T* out = static_cast<T*>(p.out);
    for (int64_t base = blockIdx.x * kChunk; base < total; base += gridDim.x * kChunk) {
#pragma unroll
      for (int k = 0; k < kFlatPerThread; ++k) {
        const int64_t i = base + k * kThreads + threadIdx.x;
        if (i < total) out[i] = from_float<T>(__bfloat162float(X[i]));
      }
    }
    return;
  }
  for (int64_t t = blockIdx.x; t < tg.total; t += gridDim.x) {
    const int64_t b = t / tg.per_matrix, rt = (t % tg.per_matrix) / tg.tiles_n, ct = t % tg.tiles_n;
    const bf16* x = X + b * R * C;
    T* out = static_cast<T*>(p.out) + b * p.m * p.n;
    if (transpose) {  // read the tile along X's rows (= out's columns), write along out's rows
      for (int i = ty; i < kTile; i += kRowsPerPass) {
        const int64_t xr = ct * kTile + i, xc = rt * kTile + tx;
        tile[i][tx] = (xr < R && xc < C) ? __bfloat162float(x[xr * C + xc]) : 0.f;
      }
      __syncthreads();
    }
    for (int i = ty; i < kTile; i += kRowsPerPass) {
      const int64_t r = rt * kTile + i, c = ct * kTile + tx;
      if (r < p.m && c < p.n) out[r * p.n + c] = from_float<T>(transpose ? tile[tx][i] : __bfloat162float(x[r * C + c]));
    }
    if (transpose) __syncthreads();
  }
}

__global__ void add_diagonal_kernel(bf16* M, int64_t batch, int64_t n, float a) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < batch * n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    bf16& d = M[(t / n) * n * n + (t % n) * (n + 1)];
    d = __float2bfloat16(__bfloat162float(d) + a);
  }
}

int sm_count() {
  int device = 0, count = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  return count;
}

}  // namespace

int64_t ns5_normalize_scratch_floats(const Ns5Problem& p) { return TileGrid(p).total * kRowsPerPass + p.batch; }

cudaError_t launch_ns5_normalize(const Ns5Problem& p, bf16* X, float* scratch, cudaStream_t stream) {
  return dispatch_dtype(p.in.dtype, [&](auto tag) {
    using T = decltype(tag);
    int per_sm = 0;
    cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ns5_normalize_kernel<T>, kThreads, 0);
    if (err != cudaSuccess) return err;
    // Cooperative launches need every block resident at once.
    const int64_t resident = static_cast<int64_t>(per_sm) * sm_count();
    const int64_t tiles = TileGrid(p).total;
    const int64_t wanted = tiles > p.batch ? tiles : p.batch;
    dim3 grid(static_cast<unsigned>(wanted < resident ? wanted : resident)), block(kThreads);
    Ns5Problem problem = p;
    float* warp_sumsq = scratch;
    float* sumsq = scratch + tiles * kRowsPerPass;
    void* args[] = {&problem, &X, &warp_sumsq, &sumsq};
    return cudaLaunchCooperativeKernel(reinterpret_cast<void*>(ns5_normalize_kernel<T>), grid, block, args, 0, stream);
  });
}

cudaError_t launch_ns5_finish(const Ns5Problem& p, const bf16* X, cudaStream_t stream) {
  return dispatch_dtype(p.in.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t units = p.transpose() ? TileGrid(p).total : (p.batch * p.m * p.n + kChunk - 1) / kChunk;
    const int64_t cap = static_cast<int64_t>(sm_count()) * 16;
    ns5_finish_kernel<T><<<static_cast<unsigned>(units < cap ? units : cap), kThreads, 0, stream>>>(p, X);
    return cudaGetLastError();
  });
}

cudaError_t launch_add_diagonal(bf16* M, int64_t batch, int64_t n, float a, cudaStream_t stream) {
  if (batch * n == 0) return cudaSuccess;
  const int64_t blocks = (batch * n + kThreads - 1) / kThreads, cap = static_cast<int64_t>(sm_count()) * 4;
  add_diagonal_kernel<<<static_cast<unsigned>(blocks < cap ? blocks : cap), kThreads, 0, stream>>>(M, batch, n, a);
  return cudaGetLastError();
}

}  // namespace muonkern
