// Fused small-matrix NS5: ONE launch for the whole batch, every iteration on chip, on the tensor
// cores (mma.sync m16n8k16, bf16 operands, fp32 accumulation).
//
// Each matrix belongs to a thread-block cluster of S = 1, 2, 4 or 8 blocks. Block `rank` holds the
// column slice [rank*Cs, (rank+1)*Cs) of the wide iterate X (R x C, R <= C) and, per step:
//   1. P_rank = X_slice X_slice^T                  (its share of the Gram matrix)
//   2. A = sum over the cluster of P_rank          (through distributed shared memory, S > 1:
//                                                     cluster_reduce_gram)
//   3. B = b A + c A A                             (every block, redundantly: R^3 is small)
//   4. X_slice = B X_slice + a X_slice             (in place)
// With few matrices a cluster spreads one matrix over several SMs; S = 1 is the plain one-block case.
//
// The normalization is deferred: X starts as bf16(G) unscaled, read from global memory in one pass
// that also sums its squares, and the scale s = 1/(||G|| + eps) goes to the products instead: s^2 on
// every Gram matrix (in the cluster reduction's fp32 sum, or the product's alpha), s on the last
// product's epilogue. Everything between is linear in X, so the unscaled iterate stays s^-1 times the
// scaled one. With S > 1 the blocks' sums of squares travel with the first Gram reduction, so no
// cluster barrier is spent on the norm. Norms outside [kDeferredMinNorm, kDeferredMaxNorm] (and
// non-finite ones) scale X in shared memory instead (bf16(bf16(G) s), one more rounding), and a
// cluster then recomputes that first Gram matrix. With steps = 0 (no product to take s) X is scaled
// in shared memory too, a cluster summing the norm over a barrier pair of its own.
//
// The Gram iteration (algorithm="gram", csrc/ns5_gram.cpp states it) runs on the same pieces: A = X X^T
// as above (at the start and after each restart only), then per step on Rp x Rp matrices only,
// P = a I + b R + c R R and R = (P R) P on one triangle of tiles (products of polynomials in R are
// symmetric), Q = P Q whole by the B X step; the result is Q X, by the B X step with a = 0.
//
// Shared memory per block (bf16 rows padded by 8 elements so ldmatrix rows fall in distinct banks):
//   X: Rp x (Cs + 8)   Rp = R rounded up to 32, Cs = (C rounded up to 16*S) / S
//   A, B: Rp x (Rp + 8) each (Gram: A holds R; B, C, D hold P, Q and a spare, in turns)
//   partials: Rp x Rp fp32    (S > 1 only: this block's partial Gram matrix, or its inbox when pushed)
// Padding rows/columns are zero and stay zero through the iteration, so they never change the result
// (the Gram iteration's a I puts a on the padded diagonal of P and Q: they stay block-diagonal, and
// X's padded rows are zero).
//
// This header holds the kernel and its launch; ns5_fused_standard.cu and ns5_fused_gram.cu instantiate
// one algorithm each (they compile in parallel), ns5_fused.cu sizes and dispatches.
#pragma once

#include <cooperative_groups.h>

#include <type_traits>

#include "ns5_device.cuh"
#include "ns5_kernels.h"

namespace muonkern {
namespace {

constexpr int kRowPad = 8;

using bf16 = __nv_bfloat16;

namespace cg = cooperative_groups;

constexpr int kWarps = 16;

struct FusedParams {
  Ns5Problem problem;
  int Rp, Cs;  // padded short side; columns per block of a cluster
  uint32_t restarts;  // Gram: bit s set to restart after step s (1-based)
  bool quads;         // G and the output move four elements per access (quads_fit)
  float abc[3 * kFusedMaxSteps];
};

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

// The inverse of ldmatrix_x4: lane l holds row l/4, columns 2(l%4) and 2(l%4)+1 of each matrix (an
// mma accumulator fragment's layout, packed to bf16) and gives the address of row l%8 of matrix l/8.
// The .trans form stores each matrix transposed (the address is then of a row of the transpose).
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1,%2,%3,%4};\n"
               :: "r"(addr), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1,%2,%3,%4};\n"
               :: "r"(addr), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ float2 unpack_bf16x2(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
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

// out = alpha * Pa Pb^T (+ beta * in if kAddInput) + shift * I, Rp x Rp, out in bf16 (or fp32:
// alpha Pa Pb^T only); Pa and Pb are Rp x K. For products known to be symmetric: P P^T, or Pa Pb with
// Pa, Pb symmetric and commuting. Only the lower triangle of kTile x kTile tiles is computed;
// off-diagonal tiles are mirrored on store.
template <int kTile, bool kAddInput, typename OutT>
__device__ void symmetric_product(const bf16* Pa, const bf16* Pb, int ldp, int K, int Rp, OutT* out, const bf16* in,
                                  int ld, float alpha, float beta, float shift) {
  constexpr int kM = kTile / 16, kN = kTile / 8;  // mma tiles per warp tile
  // Small tiles issue few mma per k-step: rotate over several accumulator sets so consecutive
  // mma do not wait on each other's results.
  constexpr int kSets = kTile == 16 ? 4 : 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tiles = Rp / kTile;
  const uint32_t pa_addr = smem_addr(Pa), pb_addr = smem_addr(Pb), a_lane = a_lane_offset(ldp),
                 b_lane = b_nk_lane_offset(ldp);
  for (int t = warp; t < tiles * (tiles + 1) / 2; t += kWarps) {
    int ti = 0;
    while ((ti + 1) * (ti + 2) / 2 <= t) ++ti;
    const int tj = t - ti * (ti + 1) / 2;
    const int r0 = ti * kTile, c0 = tj * kTile;
    const uint32_t a_addr = pa_addr + 2u * r0 * ldp + a_lane, b_addr = pb_addr + 2u * c0 * ldp + b_lane;
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
    if constexpr (std::is_same_v<OutT, bf16>) {
      // 16x16 sub-tiles through stmatrix, the mirror through stmatrix.trans, the input through
      // ldmatrix (all in the accumulator's layout): one instruction where scalar stores took 8 to 24
      // (these epilogues were a fifth of 48x128x128's instructions, ncu).
      const uint32_t out_addr = smem_addr(out), in_addr = kAddInput ? smem_addr(in) : 0u;
#pragma unroll
      for (int i = 0; i < kM; ++i)
#pragma unroll
        for (int jj = 0; jj < kN / 2; ++jj) {
          const int R = r0 + 16 * i, C = c0 + 16 * jj;
          const uint32_t at = 2u * (R * ld + C) + a_lane_offset(ld);
          uint32_t old[4], packed[4];
          if (kAddInput) ldmatrix_x4(old, in_addr + at);
#pragma unroll
          for (int e = 0; e < 4; ++e) {  // 8x8 matrix e: rows R + 8 (e % 2), columns C + 8 (e / 2)
            const float* a = &acc[i][2 * jj + e / 2][2 * (e % 2)];
            float v0 = alpha * a[0], v1 = alpha * a[1];
            if (kAddInput) {
              const float2 o = unpack_bf16x2(old[e]);
              v0 += beta * o.x;
              v1 += beta * o.y;
            }
            if (ti == tj) {  // only diagonal tiles hold diagonal elements
              const int r = R + g + 8 * (e % 2), c = C + 8 * (e / 2) + 2 * q;
              if (r == c) v0 += shift;
              if (r == c + 1) v1 += shift;
            }
            packed[e] = pack_bf16x2(v0, v1);
          }
          stmatrix_x4(out_addr + at, packed);
          // diagonal tiles are computed whole: mirroring them would race
          if (ti != tj) stmatrix_x4_trans(out_addr + 2u * (C * ld + R) + b_nk_lane_offset(ld), packed);
        }
    } else {  // fp32: a cluster's partial Gram matrices, alpha X X^T only
      static_assert(!kAddInput, "fp32 outputs take no input");
#pragma unroll
      for (int i = 0; i < kM; ++i)
#pragma unroll
        for (int j = 0; j < kN; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = r0 + 16 * i + g + 8 * h, c = c0 + 8 * j + 2 * q;
            const float v0 = alpha * acc[i][j][2 * h], v1 = alpha * acc[i][j][2 * h + 1];
            *reinterpret_cast<float2*>(out + r * ld + c) = make_float2(v0, v1);
            if (ti != tj) {  // diagonal tiles are computed whole: mirroring them would race
              out[c * ld + r] = v0;
              out[(c + 1) * ld + r] = v1;
            }
          }
    }
  }
}

template <bool kAddInput, typename OutT>
__device__ __forceinline__ void symmetric_product(const bf16* Pa, const bf16* Pb, int ldp, int K, int Rp, OutT* out,
                                                  const bf16* in, int ld, float alpha, float beta, float shift = 0.f) {
  // 32-row tiles issue 8 mma per 4 ldmatrix, 16-row tiles 2 per 2: prefer them once they keep
  // at least half the warps busy.
  const int big_tiles = Rp / 32;
  if (2 * big_tiles * (big_tiles + 1) / 2 >= kWarps) {
    symmetric_product<32, kAddInput>(Pa, Pb, ldp, K, Rp, out, in, ld, alpha, beta, shift);
  } else {
    symmetric_product<16, kAddInput>(Pa, Pb, ldp, K, Rp, out, in, ld, alpha, beta, shift);
  }
}

// acc = rows [row0, row0 + 16 kTiles) of B times the 16-column strip of X at column c0, over k < Rp.
// x_addr and b_addr are X's and B's shared addresses with this lane's ldmatrix offsets added.
template <int kTiles, int Rp>
__device__ __forceinline__ void strip_product(float (&acc)[kTiles][2][4], uint32_t x_addr, int ldx, uint32_t b_addr,
                                              int ldb, int row0, int c0) {
#pragma unroll 2
  for (int k = 0; k < Rp; k += 16) {
    uint32_t b[4];
    ldmatrix_x4_trans(b, x_addr + 2u * (k * ldx + c0));
#pragma unroll
    for (int i = 0; i < kTiles; ++i) {
      uint32_t fa[4];
      ldmatrix_x4(fa, b_addr + 2u * ((row0 + 16 * i) * ldb + k));
      mma_16x8x16(acc[i][0], fa, b[0], b[1]);
      mma_16x8x16(acc[i][1], fa, b[2], b[3]);
    }
  }
}

// Those rows of the strip <- alpha * acc + beta * (their old value), a 16x16 tile per ldmatrix and
// stmatrix pair.
template <int kTiles>
__device__ __forceinline__ void store_strip(bf16* X, int ldx, int row0, int c0, const float (&acc)[kTiles][2][4],
                                            float alpha, float beta) {
  const uint32_t addr = smem_addr(X) + 2u * (row0 * ldx + c0) + a_lane_offset(ldx);
#pragma unroll
  for (int i = 0; i < kTiles; ++i) {
    const uint32_t at = addr + 2u * 16 * i * ldx;
    uint32_t v[4];
    ldmatrix_x4(v, at);
#pragma unroll
    for (int e = 0; e < 4; ++e) {  // 8x8 matrix e: rows 8 (e % 2), columns 8 (e / 2) of the tile
      const float* a = &acc[i][e / 2][2 * (e % 2)];
      const float2 old = unpack_bf16x2(v[e]);
      v[e] = pack_bf16x2(alpha * a[0] + beta * old.x, alpha * a[1] + beta * old.y);
    }
    stmatrix_x4(at, v);
  }
}

// X = alpha B X + beta X in place, X being Rp x Cs. Each warp owns strips of 16 columns over all
// rows: it reads only its strip of X, so it may overwrite the strip once its products are in registers.
template <int kRowTiles>
__device__ void apply_polynomial_strips(bf16* X, int ldx, int Cs, const bf16* B, int ldb, float alpha, float beta) {
  const int warp = threadIdx.x / 32;
  const uint32_t x_addr = smem_addr(X) + b_kn_lane_offset(ldx), b_addr = smem_addr(B) + a_lane_offset(ldb);
  for (int c0 = 16 * warp; c0 < Cs; c0 += 16 * kWarps) {
    float acc[kRowTiles][2][4] = {};
    strip_product<kRowTiles, 16 * kRowTiles>(acc, x_addr, ldx, b_addr, ldb, 0, c0);
    store_strip<kRowTiles>(X, ldx, 0, c0, acc, alpha, beta);
  }
}

// The same where X has at most kWarps / 2 strips (Cs <= 128): two warps per strip, each on half of
// the rows, so that no warp idles. A warp's half of the strip is the other warp's k operand, so the
// stores wait for a block barrier (every thread of the block must call this).
template <int kRowTiles>
__device__ void apply_polynomial_halves(bf16* X, int ldx, int Cs, const bf16* B, int ldb, float alpha, float beta) {
  constexpr int kHalf = kRowTiles / 2;
  const int warp = threadIdx.x / 32;
  const int c0 = 16 * (warp / 2), row0 = 16 * kHalf * (warp % 2);
  const bool active = c0 < Cs;
  const uint32_t x_addr = smem_addr(X) + b_kn_lane_offset(ldx), b_addr = smem_addr(B) + a_lane_offset(ldb);
  float acc[kHalf][2][4] = {};
  if (active) strip_product<kHalf, 16 * kRowTiles>(acc, x_addr, ldx, b_addr, ldb, row0, c0);
  __syncthreads();
  if (active) store_strip<kHalf>(X, ldx, row0, c0, acc, alpha, beta);
}

// kHalvesOnly: the two-warps-per-strip variant whatever Cs. Q = P Q (Rp x Rp: at most 8 strips) takes
// it, so the Gram kernel inlines one copy fewer of the one-warp variant (its code size costs
// instruction fetches).
template <int kRowTiles, bool kHalvesOnly>
__device__ __forceinline__ void apply_polynomial_any(bf16* X, int ldx, int Cs, const bf16* B, int ldb, float alpha,
                                                     float beta) {
  if (kHalvesOnly || Cs <= 16 * (kWarps / 2)) {
    apply_polynomial_halves<kRowTiles>(X, ldx, Cs, B, ldb, alpha, beta);
  } else {
    apply_polynomial_strips<kRowTiles>(X, ldx, Cs, B, ldb, alpha, beta);
  }
}

// X = alpha B X + beta X for any Rp: the strip variant that fits Cs (or the halves, kHalvesOnly).
template <bool kHalvesOnly = false>
__device__ __forceinline__ void apply_polynomial(bf16* X, int ldx, int Cs, int Rp, const bf16* B, int ldb, float alpha,
                                                 float beta) {
  switch (Rp / 32) {  // Rp is a multiple of 32, at most 128
    case 1: apply_polynomial_any<2, kHalvesOnly>(X, ldx, Cs, B, ldb, alpha, beta); break;
    case 2: apply_polynomial_any<4, kHalvesOnly>(X, ldx, Cs, B, ldb, alpha, beta); break;
    case 3: apply_polynomial_any<6, kHalvesOnly>(X, ldx, Cs, B, ldb, alpha, beta); break;
    default: apply_polynomial_any<8, kHalvesOnly>(X, ldx, Cs, B, ldb, alpha, beta); break;
  }
}

// Calls f(v, r, c) for every element G[r][c], r < m, c < n, warps striding over rows and lanes over
// columns. Loads go out kBatch at a time before any is used: one block reads a whole matrix, and
// only many requests in flight cover the memory latency.
template <typename T, typename F>
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

__device__ __forceinline__ float2 float2_of(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ __forceinline__ float2 float2_of(__half2 v) { return __half22float2(v); }

// Four consecutive elements as floats, read as one access (p aligned to four elements).
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const double* p) {
  const double2 a = reinterpret_cast<const double2*>(p)[0], b = reinterpret_cast<const double2*>(p)[1];
  return make_float4(static_cast<float>(a.x), static_cast<float>(a.y), static_cast<float>(b.x),
                     static_cast<float>(b.y));
}
template <typename Half2>  // __nv_bfloat162 or __half2
__device__ __forceinline__ float4 load4_halves(const void* p) {
  const uint2 v = *reinterpret_cast<const uint2*>(p);
  const float2 lo = float2_of(*reinterpret_cast<const Half2*>(&v.x)),
               hi = float2_of(*reinterpret_cast<const Half2*>(&v.y));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) { return load4_halves<__nv_bfloat162>(p); }
__device__ __forceinline__ float4 load4(const __half* p) { return load4_halves<__half2>(p); }

// bf16(G) into X (row-major, leading dimension ldx) four elements per access, for rows of n (a
// multiple of 4) contiguous elements whose starts are aligned to four (FusedParams::quads); returns
// this thread's sum of squares. Lanes stride over a row's quads, warps over rows, kRows rows' loads
// in flight before any is used. The per-element loop's index arithmetic was a quarter of
// 48x128x128's instructions (ncu).
template <typename T>
__device__ __forceinline__ float load_quads(const T* g, int m, int n, int64_t row_stride, bf16* X, int ldx) {
  constexpr int kRows = 4;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float sumsq = 0.f;
  for (int r0 = warp; r0 < m; r0 += kRows * kWarps)
    for (int c = 4 * lane; c < n; c += 4 * 32) {
      float4 v[kRows];
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int r = r0 + u * kWarps;
        v[u] = r < m ? load4(g + r * row_stride + c) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int r = r0 + u * kWarps;
        sumsq += v[u].x * v[u].x + v[u].y * v[u].y + v[u].z * v[u].z + v[u].w * v[u].w;
        if (r < m)
          *reinterpret_cast<uint2*>(X + r * ldx + c) =
              make_uint2(pack_bf16x2(v[u].x, v[u].y), pack_bf16x2(v[u].z, v[u].w));
      }
    }
  return sumsq;
}

// Four floats to four consecutive elements, written as one access (p aligned to four elements).
__device__ __forceinline__ void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void store4(double* p, float4 v) {
  reinterpret_cast<double2*>(p)[0] = make_double2(v.x, v.y);
  reinterpret_cast<double2*>(p)[1] = make_double2(v.z, v.w);
}
__device__ __forceinline__ void store4(__nv_bfloat16* p, float4 v) {
  *reinterpret_cast<uint2*>(p) = make_uint2(pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w));
}
__device__ __forceinline__ void store4(__half* p, float4 v) {
  const __half2 lo = __floats2half2_rn(v.x, v.y), hi = __floats2half2_rn(v.z, v.w);
  *reinterpret_cast<uint2*>(p) =
      make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
}

// out (rows of n elements, contiguous) <- X's m x cols corner, four elements per access (as load_quads).
template <typename T>
__device__ __forceinline__ void store_quads(T* out, int n, const bf16* X, int ldx, int m, int cols) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < m; r += kWarps)
    for (int c = 4 * lane; c < cols; c += 4 * 32) store4(out + r * n + c, load4(X + r * ldx + c));
}

// The cluster reduction's data path. Clusters of 4 and 8 push: each block sends row range q of its fp32
// partial Gram matrix to block q with st.async, so no cluster barrier waits for the partials. Clusters
// of 2 pull over distributed shared memory after a cluster barrier: there (Rp up to 128 on two blocks)
// each block would push half its 64 KB partial to itself, measured ~1.9 us slower per reduction on an
// H100 (bench/NOTES.md).
template <int kCluster>
constexpr bool kPushPartials = kCluster >= 4;

// Sum over the cluster's blocks of the float in each block's `slot` (every thread gets it, the
// same in every block: the same additions in the same order). The slots must be published by a
// cluster barrier before, and not rewritten before every block has read them (a cluster barrier, or
// a pulling cluster_reduce_gram that read them: it returns once every block has sent its rows, which
// each does after reading).
template <int kCluster>
__device__ __forceinline__ float cluster_sum_published(float* slot) {
  cg::cluster_group cluster = cg::this_cluster();
  float total = 0.f;
  for (int r = 0; r < kCluster; ++r) total += *cluster.map_shared_rank(slot, r);
  return total;
}

// The cluster reduction's data move with st.async: the destination block's mbarrier counts the bytes
// as they land, so no cluster barrier (a GPU-wide fence and an L1 invalidation in the SASS) waits for
// them. Addresses are shared::cta ones unless named remote.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Returns once the phase of the given parity has completed; what other blocks wrote before it is visible.
__device__ __forceinline__ void mbarrier_wait_cluster(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}
// The two halves of a cluster barrier, for the one that publishes the mbarriers' initialization.
__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait_acquire() {
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// `addr` in the shared memory of the cluster's block `rank`.
__device__ __forceinline__ uint32_t remote_addr(uint32_t addr, int rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(addr), "r"(rank));
  return out;
}
// 4, 8 or 16 bytes to another block's shared memory; its mbarrier `remote_bar` counts them on arrival.
__device__ __forceinline__ void store_async(uint32_t remote, float v, uint32_t remote_bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];\n"
               ::"r"(remote), "r"(__float_as_uint(v)), "r"(remote_bar) : "memory");
}
__device__ __forceinline__ void store_async(uint32_t remote, uint32_t lo, uint32_t hi, uint32_t remote_bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [%0], {%1, %2}, [%3];\n"
               ::"r"(remote), "r"(lo), "r"(hi), "r"(remote_bar) : "memory");
}
__device__ __forceinline__ void store_async(uint32_t remote, float4 v, uint32_t remote_bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];\n"
               ::"r"(remote), "r"(__float_as_uint(v.x)), "r"(__float_as_uint(v.y)), "r"(__float_as_uint(v.z)),
               "r"(__float_as_uint(v.w)), "r"(remote_bar) : "memory");
}

// Pushing clusters: this block's partial Gram matrix (fp32, Rp x Rp in `stage`) to the blocks that
// sum its rows. Block q sums rows [q rows, (q+1) rows), rows = Rp / S, and holds in slot s of its
// inbox the rows x Rp values of block s; its mbarrier `received` counts them.
template <int kCluster>
__device__ __forceinline__ void send_partials(const float* stage, int Rp, uint32_t inbox, uint32_t received, int rank) {
  const int rows = Rp / kCluster, quads = Rp / 4;
  for (int e = threadIdx.x; e < Rp * quads; e += kWarps * 32) {
    const int r = e / quads, owner = r / rows;
    const uint32_t at = inbox + 4u * ((r + (rank - owner) * rows) * Rp) + 16u * (e % quads);
    store_async(remote_addr(at, owner), reinterpret_cast<const float4*>(stage)[e], remote_addr(received, owner));
  }
}

// A (bf16, every block) = factor() times the sum over the cluster of the fp32 partial Gram matrices.
// Block `rank` sums rows [rank*Rp/S, (rank+1)*Rp/S) and sends them into every block's A with
// store_async; `arrived` (this block's mbarrier, one arrival per phase) counts what comes back.
// Where the partials come from:
//   pulling (kPushPartials false): `partials` is this block's Rp x Rp partial. A cluster barrier
//     publishes them (and whatever the blocks wrote to shared memory before the call), then each block
//     reads its rows of every block's partial. `received` is unused.
//   pushing: `partials` is this block's inbox, which send_partials fills; `received` (one arrival per
//     phase) completes at `expected` bytes: every block's slot and whatever else the caller sent.
// factor() runs in every thread once the partials are in. On return A is complete, and every block
// has read what it needed of the others' partials or of its inbox: a block sends its rows only after
// summing them. So no block rewrites a partial, or sends the next reduction's, before it is read.
struct ReductionBarriers {
  uint32_t received, arrived;                    // mbarriers (shared::cta addresses)
  uint32_t received_parity = 0, arrived_parity = 0;  // their current phases
};
template <int kCluster, typename Factor>
__device__ void cluster_reduce_gram(const float* partials, int Rp, bf16* A, int lda, ReductionBarriers& bars,
                                    uint32_t expected, Factor&& factor) {
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int rows = Rp / kCluster, quads = Rp / 4;
  if constexpr (!kPushPartials<kCluster>) cluster.sync();  // every partial is written
  // (bytes may land before these: an mbarrier's byte count may run negative within a phase)
  if (threadIdx.x == 0) {
    if constexpr (kPushPartials<kCluster>) mbarrier_arrive_expect_tx(bars.received, expected);
    mbarrier_arrive_expect_tx(bars.arrived, 2u * Rp * Rp);  // every block's rows of A
  }
  if constexpr (kPushPartials<kCluster>) {
    mbarrier_wait_cluster(bars.received, bars.received_parity);
    bars.received_parity ^= 1u;
  }
  const float f = factor();
  const uint32_t a_addr = smem_addr(A);
  for (int e = threadIdx.x; e < rows * quads; e += kWarps * 32) {
    const int i = e / quads, j = 4 * (e % quads);
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    // Partial unrolling when pulling: with every rank's loads and remote addresses in flight, the
    // cluster-of-8 instantiations spilled registers.
#pragma unroll(kPushPartials<kCluster> ? kCluster : 4)
    for (int r = 0; r < kCluster; ++r) {
      const float* row = kPushPartials<kCluster> ? partials + (r * rows + i) * Rp
                                                  : cluster.map_shared_rank(partials, r) + (rank * rows + i) * Rp;
      const float4 v = *reinterpret_cast<const float4*>(row + j);
      sum.x += v.x;
      sum.y += v.y;
      sum.z += v.z;
      sum.w += v.w;
    }
    const uint32_t lo = pack_bf16x2(sum.x * f, sum.y * f), hi = pack_bf16x2(sum.z * f, sum.w * f);
    const uint32_t at = a_addr + 2u * ((rank * rows + i) * lda + j);
#pragma unroll 1
    for (int r = 0; r < kCluster; ++r) store_async(remote_addr(at, r), lo, hi, remote_addr(bars.arrived, r));
  }
  mbarrier_wait_cluster(bars.arrived, bars.arrived_parity);
  bars.arrived_parity ^= 1u;
}

// kGram: the Gram iteration. A template argument, so the standard iteration's kernel is compiled
// without the Gram branch's code and registers.
template <typename T, int kCluster, bool kGram>
__global__ void __launch_bounds__(kWarps * 32) ns5_fused_kernel(const __grid_constant__ FusedParams params) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Ns5Problem& p = params.problem;
  const int Rp = params.Rp, Cs = params.Cs, ldx = Cs + kRowPad, lda = Rp + kRowPad;
  bf16* X = reinterpret_cast<bf16*>(smem);
  bf16* A = X + Rp * ldx;
  bf16* B = A + Rp * lda;
  bf16* C = B + Rp * lda;  // C, D: Gram only
  bf16* D = C + Rp * lda;
  // 32 floats for block_sum, the sum slot, a spare float, two 8-byte mbarriers, and the cluster's
  // sums of squares when pushed (8 floats)
  float* scratch = reinterpret_cast<float*>(kGram ? D + Rp * lda : C);
  // Rp x Rp fp32 (kCluster > 1): this block's partial Gram matrix when pulling, its rows of every
  // block's partial when pushing (kPushPartials)
  float* partials = scratch + 64;
  float* sumsq_inbox = scratch + 40;
  ReductionBarriers bars{smem_addr(scratch + 34), smem_addr(scratch + 36)};
  constexpr bool kPush = kPushPartials<kCluster>;
  if constexpr (kCluster > 1) {
    if (threadIdx.x == 0) {
      mbarrier_init(bars.arrived, 1);
      if constexpr (kPush) mbarrier_init(bars.received, 1);
    }
    // Pulling, the reduction's first cluster barrier publishes them; pushing, this one, whose wait
    // comes after G's first read, which hides it.
    if constexpr (kPush) cluster_arrive_release();
  }
  // Programmatic dependent launch (launch_with): the next kernel in the stream may start its blocks
  // while this one runs; each waits here, before reading G, for the previous kernel's writes.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  const int m = static_cast<int>(p.m), n = static_cast<int>(p.n);
  const bool transpose = p.transpose();
  const T* G = static_cast<const T*>(p.in.data);
  const int rank = static_cast<int>(blockIdx.x % kCluster);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // This block's slice of X's columns is a range of G's columns (or rows when transposed).
  const int lo = rank * Cs, hi = min(lo + Cs, static_cast<int>(p.long_side()));
  const int sub_m = transpose ? max(hi - lo, 0) : m, sub_n = transpose ? n : max(hi - lo, 0);
  const int64_t sub_offset = static_cast<int64_t>(lo) * (transpose ? p.in.row_stride : p.in.col_stride);

  for (int64_t b = blockIdx.x / kCluster; b < p.batch; b += gridDim.x / kCluster) {
    const T* g = G + batch_offset(p.in, b) + sub_offset;
    for (int e = threadIdx.x; e < Rp * ldx / 8; e += kWarps * 32) reinterpret_cast<uint4*>(X)[e] = make_uint4(0, 0, 0, 0);
    __syncthreads();
    float sumsq = 0.f;
    if (params.quads) {
      sumsq = load_quads(g, sub_m, sub_n, p.in.row_stride, X, ldx);
    } else {
      for_each_element(g, sub_m, sub_n, p.in.row_stride, p.in.col_stride, [&](float v, int r, int c) {
        X[transpose ? c * ldx + r : r * ldx + c] = __float2bfloat16_rn(v);
        sumsq += v * v;
      });
    }
    const float block_sumsq = block_sum(sumsq, scratch);  // its barriers also complete X
    // Pulling, the first cluster reduction publishes the slot; pushing, the sums travel beside the
    // partials, and the slot serves the cluster barrier below only.
    float* sumsq_slot = scratch + 32;
    if (threadIdx.x == 0) *sumsq_slot = block_sumsq;
    // the barrier's wait half, on this block's first matrix only (the same one in every block of the cluster)
    if constexpr (kPush) {
      if (b == blockIdx.x / kCluster) cluster_wait_acquire();
    }

    // The deferred scale (header comment): s^2 for the Gram matrices and s for the last product, or
    // 1 and 1 with X scaled in place by scale_x (out of range, or no step to take the scale).
    // settle_scale returns whether X needs that.
    float gram_scale = 1.f, out_scale = 1.f, x_scale = 1.f;
    bool scale_known = false;
    const auto settle_scale = [&](float total) {
      const float norm = sqrtf(total), inv = 1.f / (norm + p.eps);
      scale_known = true;
      if (p.steps > 0 && norm >= kDeferredMinNorm && norm <= kDeferredMaxNorm) {
        gram_scale = inv * inv;
        out_scale = inv;
        return false;
      }
      x_scale = inv;
      return true;
    };
    const auto scale_x = [&] {  // then a block barrier before X is read
      for (int e = threadIdx.x; e < Rp * ldx / 2; e += kWarps * 32) {
        __nv_bfloat162* x = reinterpret_cast<__nv_bfloat162*>(X) + e;
        const float2 v = __bfloat1622float2(*x);
        *x = __floats2bfloat162_rn(v.x * x_scale, v.y * x_scale);
      }
    };
    if (kCluster == 1 || p.steps == 0) {  // no Gram reduction to carry the sums
      float total = block_sumsq;
      if constexpr (kCluster > 1) {
        cg::this_cluster().sync();  // the slots are published
        total = cluster_sum_published<kCluster>(sumsq_slot);
        cg::this_cluster().sync();  // nobody rewrites a slot before every block has read it
      }
      if (settle_scale(total)) scale_x();
      __syncthreads();
    }

    // out = s^2 X X^T (bf16), summed over the cluster; complete in every block on return
    const auto gram_matrix = [&](bf16* out) {
      if constexpr (kCluster == 1) {
        symmetric_product<false>(X, X, ldx, Cs, Rp, out, nullptr, lda, gram_scale, 0.f);
        __syncthreads();
      } else {
        // A second pass only where the first one's reduction settled the scale on scaling X: the
        // same in every block of the cluster, as they summed the same slots.
        for (bool again = true; again;) {
          const bool send_sumsq = kPush && !scale_known;  // to every block, beside the partials
          if constexpr (kPush) {
            if (send_sumsq && threadIdx.x < kCluster)
              store_async(remote_addr(smem_addr(sumsq_inbox + rank), threadIdx.x), block_sumsq,
                          remote_addr(bars.received, threadIdx.x));
            // The partials wait in `out` and the buffer after it (A and B, both free here), where no
            // block writes before it has received them.
            float* stage = reinterpret_cast<float*>(out);
            symmetric_product<false>(X, X, ldx, Cs, Rp, stage, nullptr, Rp, 1.f, 0.f);
            __syncthreads();
            send_partials<kCluster>(stage, Rp, smem_addr(partials), bars.received, rank);
          } else {
            symmetric_product<false>(X, X, ldx, Cs, Rp, partials, nullptr, Rp, 1.f, 0.f);
          }
          again = false;
          const uint32_t expected = 4u * Rp * Rp + (send_sumsq ? 4u * kCluster : 0u);
          cluster_reduce_gram<kCluster>(partials, Rp, out, lda, bars, expected, [&] {
            if (!scale_known) {
              float total = 0.f;
              if constexpr (kPush) {
                for (int r = 0; r < kCluster; ++r) total += sumsq_inbox[r];
              } else {
                total = cluster_sum_published<kCluster>(sumsq_slot);
              }
              again = settle_scale(total);
            }
            return gram_scale;
          });
          if (again) {
            scale_x();
            __syncthreads();
          }
        }
      }
    };
    if constexpr (!kGram) {
      for (int s = 0; s < p.steps; ++s) {
        const float ca = params.abc[3 * s], cb = params.abc[3 * s + 1], cc = params.abc[3 * s + 2];
        gram_matrix(A);
        symmetric_product<true>(A, A, lda, Rp, Rp, B, A, lda, cc, cb);
        __syncthreads();
        const float alpha = s + 1 == p.steps ? out_scale : 1.f;
        apply_polynomial(X, ldx, Cs, Rp, B, lda, alpha, alpha * ca);
        __syncthreads();
      }
    } else if (p.steps > 0) {
      // Every block of a cluster runs the Rp x Rp steps on the same R, so all keep the same Q.
      bf16 *R = A, *poly = B, *Q = C, *spare = D;
      gram_matrix(R);
      for (int s = 1; s <= p.steps; ++s) {
        const float ca = params.abc[3 * s - 3], cb = params.abc[3 * s - 2], cc = params.abc[3 * s - 1];
        const bool stretch_start = s == 1 || ((params.restarts >> (s - 1)) & 1u);
        // (no restart bit is read at the last step: s may be 32 there, past the mask's width)
        const bool last = s == p.steps, restart = !last && ((params.restarts >> s) & 1u);
        // P = c R R + b R + a I
        symmetric_product<true>(R, R, lda, Rp, Rp, poly, R, lda, cc, cb, ca);
        __syncthreads();
        const bf16* P = poly;  // this step's P, wherever the swap below leaves it
        if (stretch_start) {  // Q = P: P's buffer becomes Q's
          bf16* t = Q; Q = poly; poly = t;
        } else {
          // Q = P Q in place, every element: P and Q commute only up to rounding, and mirroring one
          // triangle of P Q added ~0.01 to the distance from the polar factor of ill-conditioned
          // inputs (bench/gram_rounding_emulation.py). Only Q X, at a restart or the end, reads Q
          // before the next barrier: P R below reads P and R, and writes the spare.
          apply_polynomial</*kHalvesOnly=*/true>(Q, lda, Rp, Rp, P, lda, 1.f, 0.f);
          if (restart || last) __syncthreads();
        }
        if (restart || last) {  // X = Q X (the result s Q X at the end); at a restart R = X X^T, Q = I
          apply_polynomial(X, ldx, Cs, Rp, Q, lda, last ? out_scale : 1.f, 0.f);
          __syncthreads();
          if (last) break;
          gram_matrix(R);
          continue;
        }
        for (int k = 0; k < 2; ++k) {  // spare = P R, then R = spare P (one call site: code size)
          symmetric_product<false>(k == 0 ? P : spare, k == 0 ? R : P, lda, Rp, Rp, k == 0 ? spare : R, nullptr, lda,
                                   1.f, 0.f);
          __syncthreads();
        }
      }
    }

    T* out = static_cast<T*>(p.out) + b * m * n + (transpose ? static_cast<int64_t>(lo) * n : lo);
    if (params.quads) {
      store_quads(out, n, X, ldx, sub_m, sub_n);
    } else {
      for (int r = warp; r < sub_m; r += kWarps)
        for (int c = lane; c < sub_n; c += 32)
          out[r * n + c] = from_float<T>(__bfloat162float(X[transpose ? c * ldx + r : r * ldx + c]));
    }
    __syncthreads();  // the next matrix reuses shared memory
  }
  // Pulling, no block leaves while another may still read its partials. The last reduction's reads
  // precede the rows each block sends back, which this block waited for; the barrier says so to
  // racecheck, which does not follow that dependence. Pushing, every block reads its own shared
  // memory only, and has waited for every byte sent to it.
  if constexpr (kCluster > 1 && !kPush) cg::this_cluster().sync();
}

template <typename T, int kCluster, bool kGram>
cudaError_t launch_with(const FusedParams& params, unsigned grid, size_t smem, cudaStream_t stream) {
  auto* kernel = ns5_fused_kernel<T, kCluster, kGram>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid * kCluster);
  config.blockDim = dim3(kWarps * 32);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = kCluster;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  // Programmatic dependent launch: this kernel's blocks may start while the previous kernel in the
  // stream finishes (they wait for its writes at griddepcontrol.wait), which hides most of the launch
  // gap between back-to-back calls on small matrices.
  cudaLaunchAttribute dependent{};
  dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchAttribute attrs[2] = {cluster, dependent};
  config.attrs = attrs;
  config.numAttrs = 2;
  return cudaLaunchKernelEx(&config, kernel, params);
}

// One algorithm's launch for every dtype and cluster size.
template <bool kGram>
cudaError_t launch_fused_algorithm(const Ns5Problem& p, const float* abc, uint32_t restarts, int cluster, size_t smem,
                                   cudaStream_t stream) {
  FusedParams params{};
  params.problem = p;
  params.restarts = restarts;
  const FusedExtents extents = fused_extents(p.short_side(), p.long_side(), cluster);
  params.Rp = static_cast<int>(extents.Rp);
  params.Cs = static_cast<int>(extents.Cs);
  for (int i = 0; i < 3 * p.steps; ++i) params.abc[i] = abc[i];
  const unsigned grid = static_cast<unsigned>(p.batch < (1 << 16) ? p.batch : (1 << 16));  // clusters
  return dispatch_dtype(p.in.dtype, [&](auto tag) {
    using T = decltype(tag);
    params.quads = quads_fit(p, sizeof(T));
    switch (cluster) {
      case 1: return launch_with<T, 1, kGram>(params, grid, smem, stream);
      case 2: return launch_with<T, 2, kGram>(params, grid, smem, stream);
      case 4: return launch_with<T, 4, kGram>(params, grid, smem, stream);
      case 8: return launch_with<T, 8, kGram>(params, grid, smem, stream);
      default: return cudaErrorInvalidValue;
    }
  });
}

}  // namespace

// Defined by ns5_fused_standard.cu and ns5_fused_gram.cu.
cudaError_t launch_ns5_fused_standard(const Ns5Problem& p, const float* abc, int cluster, size_t smem,
                                      cudaStream_t stream);
cudaError_t launch_ns5_fused_gram(const Ns5Problem& p, const float* abc, uint32_t restarts, int cluster, size_t smem,
                                  cudaStream_t stream);

}  // namespace muonkern
