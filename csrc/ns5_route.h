// How muonkern::ns5 serves a call on the current CUDA device: the path and algorithm its choice
// (csrc/ns5_cuda.cpp) takes, for tests, benchmarks and users who want to know what ran.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace muonkern {

struct Ns5Route {
  std::string path;  // "fused", "general" or the Triton op's name ("muonkern::ns5_symmetric", ...)
  bool gram = false; // the Gram iteration, else the standard one
  int cluster = 0;   // blocks per matrix on the fused path, 0 elsewhere
  bool wgmma = false; // the fused standard iteration on the wgmma kernel (cluster 1)
};

// The route of ns5(G, steps, algorithm=...) for `batch` m x n matrices on the current CUDA device,
// under the current MUONKERN_NS5_* environment.
Ns5Route ns5_cuda_route(int64_t batch, int64_t m, int64_t n, int64_t steps, std::string_view algorithm);

}  // namespace muonkern
