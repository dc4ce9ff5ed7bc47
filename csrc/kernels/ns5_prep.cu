// Elementwise ends of the general ns5 path, around the cuBLASLt products:
//   normalize: X = bf16(G / (||G||_F + eps)), transposed to the wide orientation, in ONE cooperative
//              launch (sum of squares per tile row group | grid sync | sum per matrix, in a fixed order, so the
//              result is deterministic | grid sync | scale, cast, transpose);
//              With a `deferred` pointer (one wide, row-contiguous matrix) the sum pass writes
//              bf16(G) unscaled and the scale pass is skipped: the scale goes to deferred[] =
//              {1/s^2, 1/s, 0}, s = ||G|| + eps, for the Gram iteration's first GEMMs to apply as
//              device-side alpha (and beta = 0). 96 instead of 160 MB at 2048x8192 fp32. With one
//              matrix, each block sums its own units and every block adds the blocks' sums after
//              the one grid sync (no pass of one block over the per-warp sums, no second sync).
//   finish:    out = X transposed back and cast to G's dtype.
// Where no transpose is needed and each matrix is one row-major span, both stream it flat, 16
// elements per thread in flight, in 16-byte vectors where the addresses allow (the common wide,
// contiguous case); normalize's scaling pass walks the matrices backwards, so it starts on what
// the sum pass read last and L2 still holds. Otherwise they walk 32x32 tiles of the m x n
// matrices and transpose through shared memory, so global reads and writes stay coalesced in
// either orientation. `python bench/ns5_profile.py`, normalize at 2048x8192 fp32: 216 us with
// tiles, 105 us flat with scalar loads, 70 us in 16-byte runs (8x1024x4096: 317, 192, 128 us);
// the memory bound for its 160 MB is about 50 us.
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

// W consecutive elements, loaded or stored as one access (W * sizeof(T) <= 16 bytes).
template <typename T, int W> struct alignas(sizeof(T) * W) Pack { T v[W]; };

// Elements per access of the flat passes over T: a 16-byte vector of T, or of the bf16 side for
// fp64 (so both sides of a conversion stay whole vectors).
template <typename T> constexpr int kFlatWidth = 16 / sizeof(T) < 8 ? static_cast<int>(16 / sizeof(T)) : 8;

// A flat work unit of kChunk elements starting at `base` of an n-element span: thread t owns
// elements base + (j * kThreads + t) * W + e, j < kFlatPerThread / W, e < W (consecutive threads,
// consecutive runs of W). kVector reads each run as one access (n % W == 0 and aligned spans: a run
// is in range whole or not at all); otherwise element by element, in the same order, so the sums
// are the same bit for bit whatever the input's address.
template <int W> __device__ __forceinline__ int64_t flat_index(int64_t base, int j) {
  return base + (static_cast<int64_t>(j) * kThreads + threadIdx.x) * W;
}

// Run j of this thread: the W elements at i as floats (past n: 0, which adds nothing to a sum).
template <int W, bool kVector, typename T>
__device__ __forceinline__ void load_run(const T* src, int64_t i, int64_t n, float (&v)[W]) {
  if (kVector) {
    const Pack<T, W> p = i < n ? *reinterpret_cast<const Pack<T, W>*>(src + i) : Pack<T, W>{};
#pragma unroll
    for (int e = 0; e < W; ++e) v[e] = to_float(p.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e) v[e] = i + e < n ? to_float(src[i + e]) : 0.f;
  }
}

template <int W, bool kVector, typename T>
__device__ __forceinline__ void store_run(T* dst, int64_t i, int64_t n, const float (&v)[W]) {
  if (kVector) {
    if (i >= n) return;
    Pack<T, W> p;
#pragma unroll
    for (int e = 0; e < W; ++e) p.v[e] = from_float<T>(v[e]);
    *reinterpret_cast<Pack<T, W>*>(dst + i) = p;
  } else {
#pragma unroll
    for (int e = 0; e < W; ++e)
      if (i + e < n) dst[i + e] = from_float<T>(v[e]);
  }
}

// All kRuns runs of this thread's share of a flat work unit, every load issued before the caller
// stores anything: as far as the compiler knows a store may alias the next run's source, which
// would hold each load behind the previous store (one 16-byte load in flight per thread).
template <int W, int kRuns, bool kVector, typename T>
__device__ __forceinline__ void load_runs(const T* src, int64_t base, int64_t n, float (&v)[kRuns][W]) {
#pragma unroll
  for (int j = 0; j < kRuns; ++j) load_run<W, kVector>(src, flat_index<W>(base, j), n, v[j]);
}

// The sum of squares of a flat work unit; where `copy` is set, the unit is also written to it in bf16,
// unscaled.
template <typename T, bool kVector>
__device__ __forceinline__ float chunk_sumsq(const T* g, int64_t base, int64_t n, bf16* copy) {
  constexpr int W = kFlatWidth<T>, kRuns = kFlatPerThread / W;
  float v[kRuns][W];
  load_runs<W, kRuns, kVector>(g, base, n, v);
  float partial = 0.f;
#pragma unroll
  for (int j = 0; j < kRuns; ++j) {
#pragma unroll
    for (int e = 0; e < W; ++e) partial += v[j][e] * v[j][e];
    if (copy != nullptr) store_run<W, kVector>(copy, flat_index<W>(base, j), n, v[j]);
  }
  return partial;
}

// dst[i] = (src[i] * scale) in dst's type over a flat work unit (W = kFlatWidth of the wider type).
template <bool kVector, typename S, typename D>
__device__ __forceinline__ void chunk_convert(const S* src, D* dst, int64_t base, int64_t n, float scale) {
  constexpr int W = kFlatWidth<S> < kFlatWidth<D> ? kFlatWidth<S> : kFlatWidth<D>, kRuns = kFlatPerThread / W;
  float v[kRuns][W];
  load_runs<W, kRuns, kVector>(src, base, n, v);
#pragma unroll
  for (int j = 0; j < kRuns; ++j) {
#pragma unroll
    for (int e = 0; e < W; ++e) v[j][e] *= scale;
    store_run<W, kVector>(dst, flat_index<W>(base, j), n, v[j]);
  }
}

// Whether every matrix span of `s` (n elements each) starts 16-byte aligned and holds whole runs.
template <typename T> bool vectorizable(const StridedMatrices& s, int64_t n) {
  constexpr int64_t bytes = sizeof(T);
  bool ok = reinterpret_cast<uintptr_t>(s.data) % 16 == 0 && n % kFlatWidth<T> == 0;
  for (int d = 0; d < s.batch_dims; ++d) ok = ok && (s.batch_strides[d] * bytes) % 16 == 0;
  return ok;
}

struct TileGrid {
  int64_t tiles_m, tiles_n, per_matrix, total;
  __host__ __device__ explicit TileGrid(const Ns5Problem& p)
      : tiles_m((p.m + kTile - 1) / kTile), tiles_n((p.n + kTile - 1) / kTile),
        per_matrix(tiles_m * tiles_n), total(p.batch * per_matrix) {}
};

// kVector: the flat passes read whole runs as one access (where vectorizable()).
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) ns5_normalize_kernel(const __grid_constant__ Ns5Problem p, bf16* X,
                                                                 float* warp_sumsq, float* sumsq, float* deferred) {
  __shared__ float tile[kTile][kTile + 1];
  __shared__ float block_scratch[32];
  const cg::grid_group grid = cg::this_grid();
  const TileGrid tg(p);
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const T* G = static_cast<const T*>(p.in.data);
  const int64_t mn = p.m * p.n, chunks = (mn + kChunk - 1) / kChunk;

  if (deferred != nullptr) {  // one matrix, flat (ns5_normalize_can_defer): X gets bf16(G) unscaled
    // This block's sum over its units, then every block adds all blocks' sums in the same fixed
    // order, so all agree bit for bit. Deterministic for a given grid: the grid follows the SM
    // count, so another kind of GPU may round the norm differently (by an ulp or so).
    float partial = 0.f;
    for (int64_t t = blockIdx.x; t < chunks; t += gridDim.x) partial += chunk_sumsq<T, kVector>(G, t * kChunk, mn, X);
    partial = block_sum(partial, block_scratch);
    float* block_sumsq = warp_sumsq;  // gridDim.x <= TileGrid(p).total floats: it fits
    if (threadIdx.x == 0) block_sumsq[blockIdx.x] = partial;
    grid.sync();
    float total = 0.f;
    for (int i = threadIdx.x; i < static_cast<int>(gridDim.x); i += kThreads) total += block_sumsq[i];
    total = block_sum(total, block_scratch);
    const float norm = sqrtf(total), inv = 1.f / (norm + p.eps);
    if (norm >= kDeferredMinNorm && norm <= kDeferredMaxNorm) {
      if (blockIdx.x == 0 && threadIdx.x == 0) {
        deferred[0] = inv * inv;
        deferred[1] = inv;
        deferred[2] = 0.f;
      }
      return;
    }
    // Out of range: X scaled here, and the GEMMs' scales are 1. Backwards: L2 still holds the last reads.
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      deferred[0] = deferred[1] = 1.f;
      deferred[2] = 0.f;
    }
    for (int64_t t = blockIdx.x; t < chunks; t += gridDim.x)
      chunk_convert<kVector>(G, X, (chunks - 1 - t) * kChunk, mn, inv);
    return;
  }

  // Each warp sums its part of a work unit (a flat chunk or a tile): no block barrier per unit, and a
  // fixed summation order.
  const bool flat = rows_contiguous(p);
  const int64_t units = flat ? chunks : tg.per_matrix;  // per matrix
  for (int64_t t = blockIdx.x; flat && t < p.batch * chunks; t += gridDim.x) {
    const int64_t b = t / chunks, base = (t % chunks) * kChunk;
    float partial = chunk_sumsq<T, kVector>(G + batch_offset(p.in, b), base, mn, nullptr);
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
  // thread in 16-byte loads, then the block's. The whole grid waits on this (a large matrix has tens
  // of thousands of partial sums: one warp alone took ~100 us; one float per load, 8 in flight, left
  // 16 round trips to L2 per thread at 2048x8192).
  static_assert(kRowsPerPass % 4 == 0, "a unit's partial sums fill whole 16-byte packs");
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    float s = 0.f;
    // 16-byte aligned, as the 16-byte loads need: the launch checks the scratch, and each matrix's partials
    // start at a multiple of 8 floats
    const auto* partials = reinterpret_cast<const Pack<float, 4>*>(warp_sumsq + b * units * kRowsPerPass);
    const int64_t count = units * (kRowsPerPass / 4);
#pragma unroll 8
    for (int64_t t = threadIdx.x; t < count; t += kThreads) {
      const Pack<float, 4> v = partials[t];
      s += (v.v[0] + v.v[1]) + (v.v[2] + v.v[3]);
    }
    s = block_sum(s, block_scratch);
    if (threadIdx.x == 0) sumsq[b] = s;
  }
  grid.sync();

  const int64_t R = p.short_side(), C = p.long_side();
  const bool transpose = p.transpose();
  for (int64_t t = blockIdx.x; flat && !transpose && t < p.batch * chunks; t += gridDim.x) {
    const int64_t unit = p.batch * chunks - 1 - t;  // backwards: the sum pass's last reads are in L2
    const int64_t b = unit / chunks, base = (unit % chunks) * kChunk;
    chunk_convert<kVector>(G + batch_offset(p.in, b), X + b * mn, base, mn, 1.f / (sqrtf(sumsq[b]) + p.eps));
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

// kVector: the flat pass reads and writes whole runs as one access (where the sizes allow).
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) ns5_finish_kernel(const __grid_constant__ Ns5Problem p, const bf16* X) {
  __shared__ float tile[kTile][kTile + 1];
  const TileGrid tg(p);
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int64_t R = p.short_side(), C = p.long_side();
  const bool transpose = p.transpose();
  if (!transpose) {  // X and out are the same contiguous (batch, m, n) layout: one flat pass
    const int64_t total = p.batch * p.m * p.n;
    for (int64_t base = blockIdx.x * kChunk; base < total; base += gridDim.x * kChunk)
      chunk_convert<kVector>(X, static_cast<T*>(p.out), base, total, 1.f);
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

// M[b, j, i] = M[b, i, j] for i / h < j / h (n x n, contiguous), through a shared-memory tile so that
// reads run along j and writes along i. Grid: (32x32 tiles of one h x h block, block pairs above the
// diagonal, batch); h a multiple of 32.
__global__ void __launch_bounds__(kThreads) mirror_blocks_kernel(bf16* M, int64_t n, int64_t h) {
  __shared__ bf16 tile[kTile][kTile + 1];
  bf16* m = M + static_cast<int64_t>(blockIdx.z) * n * n;
  // pair blockIdx.y -> block row bi < block column bj, row by row of the upper triangle
  const int64_t nb = n / h, tiles_per_side = h / kTile;
  int64_t bi = 0, pair = blockIdx.y;
  while (pair >= nb - 1 - bi) pair -= nb - 1 - bi++;
  const int64_t bj = bi + 1 + pair;
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int64_t i0 = bi * h + (blockIdx.x / tiles_per_side) * kTile, j0 = bj * h + (blockIdx.x % tiles_per_side) * kTile;
  for (int r = ty; r < kTile; r += kRowsPerPass) tile[r][tx] = m[(i0 + r) * n + j0 + tx];
  __syncthreads();
  for (int r = ty; r < kTile; r += kRowsPerPass) m[(j0 + r) * n + i0 + tx] = tile[tx][r];
}

// One job per blockIdx.y (ns5_kernels.h states the arrays).
__global__ void symmetric_block_pointers_kernel(const SymmetricBlockJobs jobs) {
  const SymmetricBlockJob& job = jobs.job[blockIdx.y];
  const int64_t per_matrix = static_cast<int64_t>(jobs.nb) * (jobs.nb + 1) / 2, P = jobs.batch * per_matrix,
                r = jobs.r, h = r / jobs.nb;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < P;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = k / per_matrix;
    int64_t i = 0, rest = k % per_matrix;  // the k-th lower block: row i, column j <= i
    while (rest > i) rest -= ++i;
    const int64_t j = rest, block = b * r * r + j * h * r + i * h;
    const bf16* x = job.X + b * r * job.K;
    job.out[k] = x + i * h * job.K;
    job.out[P + k] = x + j * h * job.K;
    job.out[2 * P + k] = job.D + block;
    if (job.C != nullptr) job.out[3 * P + k] = job.C + block;
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

bool ns5_normalize_can_defer(const Ns5Problem& p) { return p.batch == 1 && !p.transpose() && rows_contiguous(p); }

cudaError_t launch_ns5_normalize(const Ns5Problem& p, bf16* X, float* scratch, float* deferred, cudaStream_t stream) {
  if (deferred != nullptr && !ns5_normalize_can_defer(p)) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(scratch) % 16 != 0) return cudaErrorMisalignedAddress;  // 16-byte reads
  return dispatch_dtype(p.in.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = vectorizable<T>(p.in, p.m * p.n) ? ns5_normalize_kernel<T, true> : ns5_normalize_kernel<T, false>;
    int per_sm = 0;
    cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
    if (err != cudaSuccess) return err;
    // Cooperative launches need every block resident at once.
    const int64_t resident = static_cast<int64_t>(per_sm) * sm_count();
    const int64_t tiles = TileGrid(p).total;
    const int64_t wanted = tiles > p.batch ? tiles : p.batch;
    dim3 grid(static_cast<unsigned>(wanted < resident ? wanted : resident)), block(kThreads);
    Ns5Problem problem = p;
    float* warp_sumsq = scratch;
    float* sumsq = scratch + tiles * kRowsPerPass;
    void* args[] = {&problem, &X, &warp_sumsq, &sumsq, &deferred};
    return cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), grid, block, args, 0, stream);
  });
}

bool ns5_is_normalize_kernel(const void* func) {
  bool found = false;
  for (DType dtype : {DType::Float32, DType::BFloat16, DType::Float16, DType::Float64}) {
    dispatch_dtype(dtype, [&](auto tag) {
      using T = decltype(tag);
      found = found || func == reinterpret_cast<const void*>(ns5_normalize_kernel<T, false>) ||
              func == reinterpret_cast<const void*>(ns5_normalize_kernel<T, true>);
      return cudaSuccess;
    });
  }
  return found;
}

cudaError_t launch_ns5_finish(const Ns5Problem& p, const bf16* X, cudaStream_t stream) {
  return dispatch_dtype(p.in.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t units = p.transpose() ? TileGrid(p).total : (p.batch * p.m * p.n + kChunk - 1) / kChunk;
    const int64_t cap = static_cast<int64_t>(sm_count()) * 16;
    // X and out are fresh allocations (aligned); whole vectors need the element count to divide
    auto* kernel = (p.batch * p.m * p.n) % kFlatWidth<T> == 0 ? ns5_finish_kernel<T, true> : ns5_finish_kernel<T, false>;
    kernel<<<static_cast<unsigned>(units < cap ? units : cap), kThreads, 0, stream>>>(p, X);
    return cudaGetLastError();
  });
}

cudaError_t launch_mirror_blocks(bf16* M, int64_t batch, int64_t n, int64_t h, cudaStream_t stream) {
  if (h <= 0 || n % h != 0 || h % kTile != 0) return cudaErrorInvalidValue;
  const int64_t nb = n / h, pairs = nb * (nb - 1) / 2, tiles = (h / kTile) * (h / kTile);
  if (batch * pairs == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(pairs), static_cast<unsigned>(batch));
  mirror_blocks_kernel<<<grid, kThreads, 0, stream>>>(M, n, h);
  return cudaGetLastError();
}

cudaError_t launch_symmetric_block_pointers(const SymmetricBlockJobs& jobs, cudaStream_t stream) {
  if (jobs.count < 0 || jobs.count > kMaxSymmetricBlockJobs || jobs.nb <= 0 || jobs.r % jobs.nb != 0)
    return cudaErrorInvalidValue;
  const int64_t P = jobs.batch * jobs.nb * (jobs.nb + 1) / 2;
  if (P == 0 || jobs.count == 0) return cudaSuccess;
  const int64_t blocks = (P + kThreads - 1) / kThreads, cap = static_cast<int64_t>(sm_count()) * 4;
  const dim3 grid(static_cast<unsigned>(blocks < cap ? blocks : cap), static_cast<unsigned>(jobs.count));
  symmetric_block_pointers_kernel<<<grid, kThreads, 0, stream>>>(jobs);
  return cudaGetLastError();
}

cudaError_t launch_add_diagonal(bf16* M, int64_t batch, int64_t n, float a, cudaStream_t stream) {
  if (batch * n == 0) return cudaSuccess;
  const int64_t blocks = (batch * n + kThreads - 1) / kThreads, cap = static_cast<int64_t>(sm_count()) * 4;
  add_diagonal_kernel<<<static_cast<unsigned>(blocks < cap ? blocks : cap), kThreads, 0, stream>>>(M, batch, n, a);
  return cudaGetLastError();
}

}  // namespace muonkern
