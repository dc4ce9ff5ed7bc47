// Standard NS5 for matrices of at most 128 x 128 on Hopper's warpgroup MMA (wgmma): one block of two
// warpgroups per matrix, every step on chip. The iterate is padded with zeros to 128 x 128 (zero rows
// and columns stay zero); warpgroup w owns rows [64 w, 64 w + 64) of every product:
//   A = X X^T      A operand: its rows of X, from registers; B operand: all of X, from shared memory
//   B = b A + c A A                      (A A: its rows of A from registers, all of A from shared memory)
//   X = a X + B X                        (B from registers, X read as MN-major from shared memory)
// An accumulator's 64 x 128 slab in bf16 pairs is the register A operand of the next product's 8
// k-steps as it stands (the m16n8 fragment layouts coincide), so only the right-hand operands go
// through shared memory: X (two buffers, one per step parity) and A, 128B-swizzled as wgmma reads them.
// Two block barriers per step. The mma.sync fused kernel (ns5_fused_kernel.cuh) serves everything else.
//
// Machine code only for sm_90a (wgmma); other targets compile a body that traps, and the host side
// (csrc/ns5_cuda.cpp, wgmma_serves; off with MUONKERN_NS5_WGMMA=0) routes here only on a compute
// capability 9.0 device with sm_90a code built.
#include <cuda_bf16.h>

#include <type_traits>

#include "ns5_device.cuh"
#include "ns5_kernels.h"

namespace muonkern {
namespace {

constexpr int kSide = 128;                          // padded short and long side
constexpr int kPanelBytes = kSide * 128;            // 64 bf16 columns of all 128 rows, 128 B a row
constexpr int kMatrixBytes = 2 * kPanelBytes;       // 32 KB
constexpr int kThreads = 256;                       // two warpgroups
constexpr int kSmemBytes = 3 * kMatrixBytes + 1024; // X (two buffers), A; slack to align to 1024 B

struct WgmmaParams {
  Ns5Problem problem;
  float abc[3 * kFusedMaxSteps];
};

// Byte offset of element (r, c) of a 128 x 128 bf16 matrix: two panels of 64 columns, rows of 128 B,
// 16-byte chunks XOR-swizzled by r % 8 (wgmma's 128B swizzle; panels are 1024-byte aligned).
__device__ __forceinline__ uint32_t swizzled(int r, int c) {
  return (c >> 6) * kPanelBytes + r * 128 + ((((c & 63) >> 3) ^ (r & 7)) << 4) + ((c & 7) << 1);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// wgmma shared-memory matrix descriptor, 128B swizzle (leading/stride byte offsets as PTX defines them)
__device__ __forceinline__ uint64_t descriptor(uint32_t addr, uint32_t leading, uint32_t stride) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((leading >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((stride >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// d (+)= A B for a 64 x 128 x 16 step: A from registers (mma fragment layout), B from shared memory
// (kTransB 0: K-major, 1: MN-major).
template <int kTransB>
__device__ __forceinline__ void wgmma_step(float (&d)[64], const uint32_t* a, uint64_t b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(kTransB));
}
#endif

// Keeps the compiler from moving register reads and writes across the asynchronous MMA.
template <typename T, int N> __device__ __forceinline__ void fence_registers(T (&v)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if constexpr (std::is_same_v<T, float>) asm volatile("" : "+f"(v[i])::"memory");
    else asm volatile("" : "+r"(v[i])::"memory");
  }
}

// acc = L M on this warpgroup's 64 rows: L its rows in bf16 pairs (accumulator layout), M^T read as
// K-major from `right` (kTransB 0, M symmetric or M = right^T) or M read as MN-major (kTransB 1).
template <int kTransB>
__device__ __forceinline__ void product(float (&acc)[64], uint32_t (&left)[32], uint32_t right) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  fence_registers(acc);
  fence_registers(left);
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    // K-major: 16 columns of every row, 32 B into a panel's 128-byte rows, 8-row groups 1024 B apart.
    // MN-major: rows 16 kk.. of both panels (panels kPanelBytes apart, 8-row groups 1024 B apart).
    const uint64_t b = kTransB == 0 ? descriptor(right + (kk >> 2) * kPanelBytes + (kk & 3) * 32, 16, 1024)
                                    : descriptor(right + kk * 16 * 128, kPanelBytes, 1024);
    wgmma_step<kTransB>(acc, left + 4 * kk, b, kk > 0);
  }
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  fence_registers(acc);
  fence_registers(left);
#else
  __trap();
#endif
}

// Pair q (elements 2q, 2q + 1) of thread t's accumulator: row in the 64-row slab, first column.
__device__ __forceinline__ int pair_row(int t, int q) { return (t >> 5) * 16 + ((t & 31) >> 2) + (q & 1) * 8; }
__device__ __forceinline__ int pair_col(int t, int q) { return (q >> 1) * 8 + (t & 3) * 2; }

__device__ __forceinline__ uint32_t pack(float x, float y) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ float2 unpack(uint32_t v) { return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v)); }

__device__ __forceinline__ void store_slab(uint8_t* M, const uint32_t (&f)[32], int row0, int t) {
#pragma unroll
  for (int q = 0; q < 32; ++q) *reinterpret_cast<uint32_t*>(M + swizzled(row0 + pair_row(t, q), pair_col(t, q))) = f[q];
}

// out (contiguous, the input's dtype) <- this warpgroup's rows of X, transposed back for tall inputs.
template <typename T>
__device__ __forceinline__ void write_out(const Ns5Problem& p, const uint32_t (&X)[32], int row0, int t) {
  const int R = static_cast<int>(p.short_side()), C = static_cast<int>(p.long_side());
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(blockIdx.x) * R * C;
  const bool tall = p.transpose();
#pragma unroll
  for (int q = 0; q < 32; ++q) {
    const int r = row0 + pair_row(t, q), c = pair_col(t, q);
    if (r >= R) continue;
    const float2 v = unpack(X[q]);
    if (c < C) out[tall ? c * R + r : r * C + c] = from_float<T>(v.x);
    if (c + 1 < C) out[tall ? (c + 1) * R + r : r * C + c + 1] = from_float<T>(v.y);
  }
}

// kVec: wide float inputs whose rows are contiguous, 16-byte aligned and whole 8-column chunks, read
// 8 columns at a time
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, 1) ns5_wgmma_kernel(const __grid_constant__ WgmmaParams params) {
  const Ns5Problem& p = params.problem;
  extern __shared__ uint8_t raw[];
  const uint32_t raw_addr = static_cast<uint32_t>(__cvta_generic_to_shared(raw));
  uint8_t* smem = raw + ((1024 - (raw_addr & 1023)) & 1023);  // X buffers at 0 and kMatrixBytes, A after
  uint8_t* As = smem + 2 * kMatrixBytes;
  const uint32_t xs = static_cast<uint32_t>(__cvta_generic_to_shared(smem)), as = xs + 2 * kMatrixBytes;
  __shared__ double scratch[32];
  const int tid = threadIdx.x, row0 = (tid / 128) * 64, t = tid % 128;
  const int R = static_cast<int>(p.short_side()), C = static_cast<int>(p.long_side());
  // Programmatic dependent launch (launch_ns5_wgmma): the next kernel in the stream may start its
  // blocks now; this one waits here, before reading G, for the previous kernel's writes.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  const T* G = static_cast<const T*>(p.in.data) + batch_offset(p.in, blockIdx.x);
  // element (r, c) of the wide iterate is G's (c, r) for tall inputs
  const int64_t rs = p.transpose() ? p.in.col_stride : p.in.row_stride, cs = p.transpose() ? p.in.row_stride : p.in.col_stride;

  // X = bf16(G) / (||bf16(G)|| + eps), zero-padded. Thread: 8 chunks of 8 columns (rows tid / 16 + 16 i).
  // Squares summed in double: no finite G over- or underflows them.
  float v[8][8];
  double sumsq = 0.0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int r = tid / 16 + 16 * i, c = (tid % 16) * 8;
    if constexpr (kVec) {
      if (r < R && c < C) {
        const float4 lo = *reinterpret_cast<const float4*>(G + r * rs + c);
        const float4 hi = *reinterpret_cast<const float4*>(G + r * rs + c + 4);
        v[i][0] = lo.x, v[i][1] = lo.y, v[i][2] = lo.z, v[i][3] = lo.w;
        v[i][4] = hi.x, v[i][5] = hi.y, v[i][6] = hi.z, v[i][7] = hi.w;
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[i][j] = 0.f;
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[i][j] = (r < R && c + j < C) ? to_float(G[r * rs + (c + j) * cs]) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      v[i][j] = __bfloat162float(__float2bfloat16(v[i][j]));
      sumsq += static_cast<double>(v[i][j]) * v[i][j];
    }
  }
  const float scale = static_cast<float>(1.0 / (sqrt(block_sum(sumsq, scratch)) + p.eps));
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint4 chunk{pack(v[i][0] * scale, v[i][1] * scale), pack(v[i][2] * scale, v[i][3] * scale),
                      pack(v[i][4] * scale, v[i][5] * scale), pack(v[i][6] * scale, v[i][7] * scale)};
    *reinterpret_cast<uint4*>(smem + swizzled(tid / 16 + 16 * i, (tid % 16) * 8)) = chunk;
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic stores -> wgmma reads
  __syncthreads();
  uint32_t X[32], L[32];  // this warpgroup's rows of X; of A, then of B
#pragma unroll
  for (int q = 0; q < 32; ++q) X[q] = *reinterpret_cast<const uint32_t*>(smem + swizzled(row0 + pair_row(t, q), pair_col(t, q)));
  if (p.steps == 0) return write_out<T>(p, X, row0, t);

  float acc[64];
  for (int s = 0; s < p.steps; ++s) {
    const float a = params.abc[3 * s], b = params.abc[3 * s + 1], c = params.abc[3 * s + 2];
    const uint32_t x_now = xs + (s & 1) * kMatrixBytes;
    product<0>(acc, X, x_now);  // A = X X^T
#pragma unroll
    for (int q = 0; q < 32; ++q) L[q] = pack(acc[2 * q], acc[2 * q + 1]);
    store_slab(As, L, row0, t);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();  // A whole: the next product reads every row
    product<0>(acc, L, as);  // A A (A symmetric)
#pragma unroll
    for (int q = 0; q < 32; ++q) {
      const float2 A = unpack(L[q]);
      L[q] = pack(b * A.x + c * acc[2 * q], b * A.y + c * acc[2 * q + 1]);  // B = b A + c A A
    }
    product<1>(acc, L, x_now);  // B X
#pragma unroll
    for (int q = 0; q < 32; ++q) {
      const float2 x = unpack(X[q]);
      X[q] = pack(a * x.x + acc[2 * q], a * x.y + acc[2 * q + 1]);  // X = a X + B X
    }
    if (s + 1 == p.steps) break;
    // the other buffer: a warpgroup still in this step's B X reads this one
    store_slab(smem + ((s + 1) & 1) * kMatrixBytes, X, row0, t);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();  // the next X whole
  }
  write_out<T>(p, X, row0, t);
}

}  // namespace

bool ns5_wgmma_fits(const Ns5Problem& p) {
  return p.long_side() <= kSide && p.short_side() >= 1 && p.steps >= 0 && p.steps <= kFusedMaxSteps &&
         p.batch >= 1 && p.batch <= 0x7fffffff;
}

cudaError_t launch_ns5_wgmma(const Ns5Problem& p, const float* abc, cudaStream_t stream) {
  if (!ns5_wgmma_fits(p)) return cudaErrorInvalidValue;
  WgmmaParams params{};
  params.problem = p;
  for (int i = 0; i < 3 * p.steps; ++i) params.abc[i] = abc[i];
  return dispatch_dtype(p.in.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = ns5_wgmma_kernel<T, false>;
    if constexpr (std::is_same_v<T, float>)  // float quads are 16 bytes; two make a chunk
      if (quads_fit(p, sizeof(T)) && p.n % 8 == 0) kernel = ns5_wgmma_kernel<T, true>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (err != cudaSuccess) return err;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(static_cast<unsigned>(p.batch));
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = kSmemBytes;
    config.stream = stream;
    // Programmatic dependent launch: blocks may start while the previous kernel in the stream
    // finishes, hiding most of the launch gap between back-to-back calls (the kernel's GPU time is
    // ~19 us of a ~23 us call at 48x128x128 on an H100).
    cudaLaunchAttribute dependent{};
    dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    dependent.val.programmaticStreamSerializationAllowed = 1;
    config.attrs = &dependent;
    config.numAttrs = 1;
    return cudaLaunchKernelEx(&config, kernel, params);
  });
}

}  // namespace muonkern
