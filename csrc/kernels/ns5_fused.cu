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

constexpr int kRowPad = 8;

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

// Four 8x8 bf16 matrices from shared memory; lane l gives the address of row l%8 of matrix l/8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// d += a (16x16, row-major) * b (16x8, column-major), fp32 accumulators.
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte offsets of this lane's ldmatrix row inside a 16x16 tile of a row-major bf16 matrix with
// leading dimension `ld`. Loops add them to a tile's shared-memory address once, then step k.
// A operand (rows = M, cols = K):
__device__ __forceinline__ uint32_t a_lane_offset(int ld) {
  const int lane = threadIdx.x % 32;
  return 2u * ((lane % 16) * ld + (lane / 16) * 8);
}
// B operand of two n8 tiles with B(k, n) = M[n][k] (M stored "N x K"):
__device__ __forceinline__ uint32_t b_nk_lane_offset(int ld) {
  const int lane = threadIdx.x % 32;
  return 2u * ((lane % 8 + (lane / 16) * 8) * ld + ((lane / 8) % 2) * 8);
}
// B operand of two n8 tiles with B(k, n) = M[k][n] (M stored "K x N", loaded transposed):
__device__ __forceinline__ uint32_t b_kn_lane_offset(int ld) {
  const int lane = threadIdx.x % 32;
  return 2u * ((lane % 8 + ((lane / 8) % 2) * 8) * ld + (lane / 16) * 8);
}

// out = alpha * P P^T (+ beta * in if kAddInput), all Rp x Rp symmetric. P is Rp x K. Only the lower triangle of
// kTile x kTile tiles is computed; off-diagonal tiles are mirrored on store. Small Rp uses 16-row
// tiles so that more warps find work.
template <int kWarps, int kTile, bool kAddInput>
__device__ void symmetric_product(const bf16* P, int ldp, int K, int Rp, bf16* out, const bf16* in, int ld,
                                  float alpha, float beta) {
  constexpr int kM = kTile / 16, kN = kTile / 8;  // mma tiles per warp tile
  // Small tiles issue few mma per k-step: rotate over several accumulator sets so consecutive
  // mma do not wait on each other's results.
  constexpr int kSets = kTile == 16 ? 4 : 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tiles = Rp / kTile;
  const uint32_t p_addr = smem_addr(P), a_lane = a_lane_offset(ldp), b_lane = b_nk_lane_offset(ldp);
  for (int t = warp; t < tiles * (tiles + 1) / 2; t += kWarps) {
    int ti = 0;
    while ((ti + 1) * (ti + 2) / 2 <= t) ++ti;
    const int tj = t - ti * (ti + 1) / 2;
    const int r0 = ti * kTile, c0 = tj * kTile;
    const uint32_t a_addr = p_addr + 2u * r0 * ldp + a_lane, b_addr = p_addr + 2u * c0 * ldp + b_lane;
    float sets[kSets][kM][kN][4] = {};
    for (int k0 = 0; k0 < K; k0 += 16 * kSets) {
#pragma unroll
      for (int set = 0; set < kSets; ++set) {
        const int k = k0 + 16 * set;
        if (k < K) {
          uint32_t a[kM][4], b[kN / 2][4];
#pragma unroll
          for (int i = 0; i < kM; ++i) ldmatrix_x4(a[i], a_addr + 2u * (16 * i * ldp + k));
#pragma unroll
          for (int j = 0; j < kN / 2; ++j) ldmatrix_x4(b[j], b_addr + 2u * (16 * j * ldp + k));
#pragma unroll
          for (int i = 0; i < kM; ++i)
#pragma unroll
            for (int j = 0; j < kN; ++j)
              mma_16x8x16(sets[set][i][j], a[i], b[j / 2][(j % 2) * 2], b[j / 2][(j % 2) * 2 + 1]);
        }
      }
    }
    float (&acc)[kM][kN][4] = sets[0];
#pragma unroll
    for (int set = 1; set < kSets; ++set)
#pragma unroll
      for (int i = 0; i < kM; ++i)
#pragma unroll
        for (int j = 0; j < kN; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][j][e] += sets[set][i][j][e];
    const int g = lane / 4, q = lane % 4;
#pragma unroll
    for (int i = 0; i < kM; ++i)
#pragma unroll
      for (int j = 0; j < kN; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = r0 + 16 * i + g + 8 * h, c = c0 + 8 * j + 2 * q;
          float v0 = alpha * acc[i][j][2 * h], v1 = alpha * acc[i][j][2 * h + 1];
          if (kAddInput) {
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

template <int kWarps, bool kAddInput>
__device__ __forceinline__ void symmetric_product(const bf16* P, int ldp, int K, int Rp, bf16* out, const bf16* in,
                                                  int ld, float alpha, float beta) {
  // 32-row tiles issue 8 mma per 4 ldmatrix, 16-row tiles 2 per 2: prefer them once they keep
  // at least half the warps busy.
  const int big_tiles = Rp / 32;
  if (2 * big_tiles * (big_tiles + 1) / 2 >= kWarps) {
    symmetric_product<kWarps, 32, kAddInput>(P, ldp, K, Rp, out, in, ld, alpha, beta);
  } else {
    symmetric_product<kWarps, 16, kAddInput>(P, ldp, K, Rp, out, in, ld, alpha, beta);
  }
}

// X = B X + a X in place. Each warp owns strips of 16 columns over all Rp rows: it reads only its
// strip of X, so it may overwrite the strip once its products are in registers.
template <int kWarps, int kRowTiles>
__device__ void apply_polynomial(bf16* X, int ldx, int Cp, const bf16* B, int ldb, float a) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int Rp = 16 * kRowTiles;
  const uint32_t x_addr = smem_addr(X) + b_kn_lane_offset(ldx), b_addr = smem_addr(B) + a_lane_offset(ldb);
  for (int c0 = 16 * warp; c0 < Cp; c0 += 16 * kWarps) {
    float acc[kRowTiles][2][4] = {};
#pragma unroll 2
    for (int k = 0; k < Rp; k += 16) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, x_addr + 2u * (k * ldx + c0));
#pragma unroll
      for (int i = 0; i < kRowTiles; ++i) {
        {
          uint32_t fa[4];
          ldmatrix_x4(fa, b_addr + 2u * (16 * i * ldb + k));
          mma_16x8x16(acc[i][0], fa, b[0], b[1]);
          mma_16x8x16(acc[i][1], fa, b[2], b[3]);
        }
      }
    }
    const int g = lane / 4, q = lane % 4;
#pragma unroll
    for (int i = 0; i < kRowTiles; ++i) {
      {
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

// Calls f(v, r, c) for every element G[r][c] of one m x n matrix, warps striding over rows and lanes
// over columns. Loads go out kBatch at a time before any is used: one block reads a whole matrix,
// and only many requests in flight cover the memory latency.
template <int kWarps, typename T, typename F>
__device__ __forceinline__ void for_each_element(const T* g, int m, int n, int64_t row_stride, int64_t col_stride,
                                                 F&& f) {
  constexpr int kBatch = 16;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane >= n) return;
  int r = warp, c = lane;
  while (r < m) {
    float v[kBatch];
    int rows[kBatch], cols[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      rows[u] = r;
      cols[u] = c;
      v[u] = r < m ? to_float(g[r * row_stride + c * col_stride]) : 0.f;
      c += 32;
      if (c >= n) {
        c = lane;
        r += kWarps;
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (rows[u] < m) f(v[u], rows[u], cols[u]);
  }
}

template <typename T, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) ns5_fused_kernel(const __grid_constant__ FusedParams params) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Ns5Problem& p = params.problem;
  const int Rp = params.Rp, Cp = params.Cp, ldx = Cp + kRowPad, lda = Rp + kRowPad;
  bf16* X = reinterpret_cast<bf16*>(smem);
  bf16* A = X + Rp * ldx;
  bf16* B = A + Rp * lda;
  float* scratch = reinterpret_cast<float*>(B + Rp * lda);
  const int m = static_cast<int>(p.m), n = static_cast<int>(p.n);
  const bool transpose = p.transpose();
  const T* G = static_cast<const T*>(p.in.data);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const T* g = G + batch_offset(p.in, b);
    float sumsq = 0.f;
    for_each_element<kWarps>(g, m, n, p.in.row_stride, p.in.col_stride,
                             [&](float v, int, int) { sumsq += v * v; });
    const float scale = 1.f / (sqrtf(block_sum(sumsq, scratch)) + p.eps);

    for (int e = threadIdx.x; e < Rp * ldx / 8; e += kWarps * 32) reinterpret_cast<uint4*>(X)[e] = make_uint4(0, 0, 0, 0);
    __syncthreads();
    for_each_element<kWarps>(g, m, n, p.in.row_stride, p.in.col_stride, [&](float v, int r, int c) {
      X[transpose ? c * ldx + r : r * ldx + c] = __float2bfloat16_rn(v * scale);
    });
    __syncthreads();

    for (int s = 0; s < p.steps; ++s) {
      const float ca = params.abc[3 * s], cb = params.abc[3 * s + 1], cc = params.abc[3 * s + 2];
      symmetric_product<kWarps, false>(X, ldx, Cp, Rp, A, nullptr, lda, 1.f, 0.f);
      __syncthreads();
      symmetric_product<kWarps, true>(A, lda, Rp, Rp, B, A, lda, cc, cb);
      __syncthreads();
      switch (Rp / 32) {  // Rp is a multiple of 32, at most 128
        case 1: apply_polynomial<kWarps, 2>(X, ldx, Cp, B, lda, ca); break;
        case 2: apply_polynomial<kWarps, 4>(X, ldx, Cp, B, lda, ca); break;
        case 3: apply_polynomial<kWarps, 6>(X, ldx, Cp, B, lda, ca); break;
        default: apply_polynomial<kWarps, 8>(X, ldx, Cp, B, lda, ca); break;
      }
      __syncthreads();
    }

    T* out = static_cast<T*>(p.out) + b * m * n;
    for (int r = warp; r < m; r += kWarps)
      for (int c = lane; c < n; c += 32)
        out[r * n + c] = from_float<T>(__bfloat162float(X[transpose ? c * ldx + r : r * ldx + c]));
    __syncthreads();  // the next matrix reuses shared memory
  }
}

template <typename T, int kWarps>
cudaError_t launch_with(const FusedParams& params, unsigned grid, size_t smem, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(ns5_fused_kernel<T, kWarps>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  ns5_fused_kernel<T, kWarps><<<grid, kWarps * 32, smem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace

size_t ns5_fused_smem_bytes(int64_t m, int64_t n) {
  const int64_t R = m < n ? m : n, C = m < n ? n : m;
  if (R > kFusedMaxShortSide || R < 1) return 0;
  const int64_t Rp = round_up(R, 32), Cp = round_up(C, 16);
  return static_cast<size_t>(2 * Rp * (Cp + kRowPad) + 4 * Rp * (Rp + kRowPad) + 32 * sizeof(float));  // + block_sum scratch
}

cudaError_t launch_ns5_fused(const Ns5Problem& p, const float* abc, int warps, cudaStream_t stream) {
  if (p.steps > kFusedMaxSteps || (warps != 8 && warps != 16)) return cudaErrorInvalidValue;
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
    return warps == 8 ? launch_with<T, 8>(params, grid, smem, stream) : launch_with<T, 16>(params, grid, smem, stream);
  });
}

}  // namespace muonkern
