// Launch interface of the dirquad CUDA kernels (torch-free; csrc/dirquad_cuda.cpp fills it).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace muonkern {

// Elements per chunk: one block reduces one chunk of one parameter for one direction.
inline constexpr int64_t kDirquadChunk = 1 << 15;
// Dot products one block accumulates per pass over its chunk (u is re-read once per pass).
inline constexpr int kDirquadColumnsPerPass = 4;

// Device-side tables, all int64: pointers are stored as integers. Parameter p has numel[p] elements
// of type dtype[p] (a DType) and owns chunks chunk_offset[p] .. chunk_offset[p+1]-1; chunk_param[c]
// is the parameter of chunk c.
struct DirquadProblem {
  const int64_t* grad_ptrs;       // P
  const int64_t* direction_ptrs;  // K*P, direction k's tensor p at k*P + p
  const int64_t* product_ptrs;    // K*R*P, product r of direction k at (k*R + r)*P + p
  const int64_t* numel;           // P
  const int64_t* dtype;           // P
  const int64_t* chunk_offset;    // P + 1
  const int64_t* chunk_param;     // chunks
  int64_t K, R, P, chunks;
  double* partial;  // (K*chunks, 2 + R) scratch
  double* out;      // (K, 2 + R, P)
};

// Two launches: the chunk sums, then their reduction per parameter in chunk order (deterministic).
cudaError_t launch_dirquad(const DirquadProblem& problem, cudaStream_t stream);

}  // namespace muonkern
