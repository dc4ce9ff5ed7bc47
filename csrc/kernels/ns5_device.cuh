// Device helpers shared by the ns5 kernels: dtype conversion, strided batch addressing, block sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ns5_kernels.h"

namespace muonkern {

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }

__device__ __forceinline__ int64_t batch_offset(const StridedMatrices& s, int64_t b) {
  int64_t offset = 0;
  for (int d = s.batch_dims - 1; d >= 0; --d) {
    offset += (b % s.batch_sizes[d]) * s.batch_strides[d];
    b /= s.batch_sizes[d];
  }
  return offset;
}

// Whether G's rows and the output's can move four elements per access (the fused kernel's load_quads
// and store_quads, the wgmma kernel's loads): the wide orientation, unit column stride, every other
// stride and both base addresses multiples of four elements (then so is every block's slice of the
// fused kernel: Cs is a multiple of 16).
inline bool quads_fit(const Ns5Problem& p, size_t element_bytes) {
  if (p.transpose() || p.in.col_stride != 1 || p.n % 4 != 0 || p.in.row_stride % 4 != 0) return false;
  for (int d = 0; d < p.in.batch_dims; ++d)
    if (p.in.batch_strides[d] % 4 != 0) return false;
  const uintptr_t quad_bytes = 4 * element_bytes;
  return reinterpret_cast<uintptr_t>(p.in.data) % quad_bytes == 0 &&
         reinterpret_cast<uintptr_t>(p.out) % quad_bytes == 0;
}

// Sum of `v` over the block; every thread gets the result. `scratch` holds 32 values.
template <typename T> __device__ __forceinline__ T block_sum(T v, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Calls f(T{}) with the C++ type of `dtype`.
template <typename F> cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    case DType::Float16: return f(__half{});
    case DType::Float64: return f(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace muonkern
