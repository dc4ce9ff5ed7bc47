// Fused small-matrix NS5: ONE launch for the whole batch, one thread block per matrix, every
// iteration in shared memory on the tensor cores (mma.sync m16n8k16, bf16 operands, fp32 accumulation).
//
// Shared memory per block (bf16, rows padded by 8 elements so ldmatrix rows fall in distinct banks):
//   X: Rp x (Cp + 8)   the iterate, Rp = short side rounded up to 32, Cp = long side rounded up to 16
//   A: Rp x (Rp + 8)   A = X X^T
//   B: Rp x (Rp + 8)   B = b A + c A A
// Padding rows/columns are zero and stay zero through the iteration, so they never change the result.
// On an H100 (227 KB opt-in per block) this holds e.g. 128 x 624, 64 x 1616, 32 x 3392.
#include "ns5_device.cuh"
#include "ns5_kernels.h"

namespace muonkern {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowPad = 8;
constexpr int kMaxRowTiles = kFusedMaxShortSide / 16;

using bf16 = __nv_bfloat16;

struct FusedParams {
  Ns5Problem problem;
  int Rp, Cp;
  float abc[3 * kFusedMaxSteps];
};

__host__ __device__ constexpr int round_up(int64_t x, int to) { return static_cast<int>((x + to - 1) / to * to); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 bf16 matrices; lane l gives the address of row l%8 of matrix l/8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// d += a (16x16, row-major) * b (16x8, column-major), fp32 accumulators.
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A-operand fragment of the 16x16 tile at (row, k) of a row-major matrix.
__device__ __forceinline__ void load_a(uint32_t (&r)[4], const bf16* M, int ld, int row, int k) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(r, M + (row + lane % 16) * ld + k + (lane / 16) * 8);
}
// B-operand fragments of two n8 tiles (n, n+8) for B(k, n) = M[n][k] (M row-major, "N x K").
__device__ __forceinline__ void load_b_nk(uint32_t (&r)[4], const bf16* M, int ld, int n, int k) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(r, M + (n + lane % 8 + (lane / 16) * 8) * ld + k + ((lane / 8) % 2) * 8);
}
// B-operand fragments of two n8 tiles (n, n+8) for B(k, n) = M[k][n] (M row-major, "K x N").
__device__ __forceinline__ void load_b_kn(uint32_t (&r)[4], const bf16* M, int ld, int k, int n) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4_trans(r, M + (k + lane % 8 + ((lane / 8) % 2) * 8) * ld + n + (lane / 16) * 8);
}

// out = alpha * P P^T + beta * in, all Rp x Rp symmetric. P is Rp x K. Only the lower triangle of
// 32x32 tiles is computed; off-diagonal tiles are mirrored on store.
__device__ void symmetric_product(const bf16* P, int ldp, int K, int Rp, bf16* out, const bf16* in, int ld,
                                  float alpha, float beta) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tiles = Rp / 32;
  for (int t = warp; t < tiles * (tiles + 1) / 2; t += kWarps) {
    int ti = 0;
    while ((ti + 1) * (ti + 2) / 2 <= t) ++ti;
    const int tj = t - ti * (ti + 1) / 2;
    const int r0 = ti * 32, c0 = tj * 32;
    float acc[2][4][4] = {};
    for (int k = 0; k < K; k += 16) {
      uint32_t a[2][4], b[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) load_a(a[i], P, ldp, r0 + 16 * i, k);
#pragma unroll
      for (int j = 0; j < 2; ++j) load_b_nk(b[j], P, ldp, c0 + 16 * j, k);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_16x8x16(acc[i][j], a[i], b[j / 2][(j % 2) * 2], b[j / 2][(j % 2) * 2 + 1]);
    }
    const int g = lane / 4, q = lane % 4;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = r0 + 16 * i + g + 8 * h, c = c0 + 8 * j + 2 * q;
          float v0 = alpha * acc[i][j][2 * h], v1 = alpha * acc[i][j][2 * h + 1];
          if (beta != 0.f) {
            const float2 old = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(in + r * ld + c));
            v0 += beta * old.x;
            v1 += beta * old.y;
          }
          const bf16 w0 = __float2bfloat16_rn(v0), w1 = __float2bfloat16_rn(v1);
          *reinterpret_cast<__nv_bfloat162*>(out + r * ld + c) = __halves2bfloat162(w0, w1);
          if (ti != tj) {  // diagonal tiles are computed whole: mirroring them would race
            out[c * ld + r] = w0;
            out[(c + 1) * ld + r] = w1;
          }
        }
  }
}

// X = B X + a X in place. Each warp owns strips of 16 columns over all Rp rows: it reads only its
// strip of X, so it may overwrite the strip once its products are in registers.
__device__ void apply_polynomial(bf16* X, int ldx, int Cp, int Rp, const bf16* B, int ldb, float a) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_tiles = Rp / 16;
  for (int c0 = 16 * warp; c0 < Cp; c0 += 16 * kWarps) {
    float acc[kMaxRowTiles][2][4] = {};
    for (int k = 0; k < Rp; k += 16) {
      uint32_t b[4];
      load_b_kn(b, X, ldx, k, c0);
#pragma unroll
      for (int i = 0; i < kMaxRowTiles; ++i) {
        if (i < row_tiles) {
          uint32_t fa[4];
          load_a(fa, B, ldb, 16 * i, k);
          mma_16x8x16(acc[i][0], fa, b[0], b[1]);
          mma_16x8x16(acc[i][1], fa, b[2], b[3]);
        }
      }
    }
    const int g = lane / 4, q = lane % 4;
#pragma unroll
    for (int i = 0; i < kMaxRowTiles; ++i) {
      if (i < row_tiles) {
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            __nv_bfloat162* x = reinterpret_cast<__nv_bfloat162*>(X + (16 * i + g + 8 * h) * ldx + c0 + 8 * j + 2 * q);
            const float2 old = __bfloat1622float2(*x);
            *x = __floats2bfloat162_rn(acc[i][j][2 * h] + a * old.x, acc[i][j][2 * h + 1] + a * old.y);
          }
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ns5_fused_kernel(const __grid_constant__ FusedParams params) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Ns5Problem& p = params.problem;
  const int Rp = params.Rp, Cp = params.Cp, ldx = Cp + kRowPad, lda = Rp + kRowPad;
  bf16* X = reinterpret_cast<bf16*>(smem);
  bf16* A = X + Rp * ldx;
  bf16* B = A + Rp * lda;
  float* scratch = reinterpret_cast<float*>(B + Rp * lda);
  const int m = static_cast<int>(p.m), n = static_cast<int>(p.n), mn = m * n;
  const bool transpose = p.transpose();
  const T* G = static_cast<const T*>(p.in.data);

  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const T* g = G + batch_offset(p.in, b);
    float sumsq = 0.f;
    for (int e = threadIdx.x; e < mn; e += kThreads) {
      const float v = to_float(g[(e / n) * p.in.row_stride + (e % n) * p.in.col_stride]);
      sumsq += v * v;
    }
    const float scale = 1.f / (sqrtf(block_sum(sumsq, scratch)) + p.eps);

    for (int e = threadIdx.x; e < Rp * ldx / 8; e += kThreads) reinterpret_cast<uint4*>(X)[e] = make_uint4(0, 0, 0, 0);
    __syncthreads();
    for (int e = threadIdx.x; e < mn; e += kThreads) {
      const int r = e / n, c = e % n;
      const float v = to_float(g[r * p.in.row_stride + c * p.in.col_stride]) * scale;
      X[transpose ? c * ldx + r : r * ldx + c] = __float2bfloat16_rn(v);
    }
    __syncthreads();

    for (int s = 0; s < p.steps; ++s) {
      const float ca = params.abc[3 * s], cb = params.abc[3 * s + 1], cc = params.abc[3 * s + 2];
      symmetric_product(X, ldx, Cp, Rp, A, nullptr, lda, 1.f, 0.f);
      __syncthreads();
      symmetric_product(A, lda, Rp, Rp, B, A, lda, cc, cb);
      __syncthreads();
      apply_polynomial(X, ldx, Cp, Rp, B, lda, ca);
      __syncthreads();
    }

    T* out = static_cast<T*>(p.out) + b * mn;
    for (int e = threadIdx.x; e < mn; e += kThreads) {
      const int r = e / n, c = e % n;
      out[e] = from_float<T>(__bfloat162float(X[transpose ? c * ldx + r : r * ldx + c]));
    }
    __syncthreads();  // the next matrix reuses shared memory
  }
}

}  // namespace

size_t ns5_fused_smem_bytes(int64_t m, int64_t n) {
  const int64_t R = m < n ? m : n, C = m < n ? n : m;
  if (R > kFusedMaxShortSide || R < 1) return 0;
  const int64_t Rp = round_up(R, 32), Cp = round_up(C, 16);
  return static_cast<size_t>(2 * Rp * (Cp + kRowPad) + 4 * Rp * (Rp + kRowPad) + 32 * sizeof(float));
}

cudaError_t launch_ns5_fused(const Ns5Problem& p, const float* abc, cudaStream_t stream) {
  if (p.steps > kFusedMaxSteps) return cudaErrorInvalidValue;
  const size_t smem = ns5_fused_smem_bytes(p.m, p.n);
  if (smem == 0) return cudaErrorInvalidValue;
  FusedParams params{};
  params.problem = p;
  params.Rp = round_up(p.short_side(), 32);
  params.Cp = round_up(p.long_side(), 16);
  for (int i = 0; i < 3 * p.steps; ++i) params.abc[i] = abc[i];
  const unsigned grid = static_cast<unsigned>(p.batch < (1 << 20) ? p.batch : (1 << 20));
  return dispatch_dtype(p.in.dtype, [&](auto tag) {
    using T = decltype(tag);
    cudaError_t err = cudaFuncSetAttribute(ns5_fused_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    ns5_fused_kernel<T><<<grid, kThreads, smem, stream>>>(params);
    return cudaGetLastError();
  });
}

}  // namespace muonkern
