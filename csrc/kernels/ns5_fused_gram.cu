// The fused kernel's Gram iteration, every dtype and cluster size (ns5_fused_kernel.cuh).
#include "ns5_fused_kernel.cuh"

namespace muonkern {

cudaError_t launch_ns5_fused_gram(const Ns5Problem& p, const float* abc, uint32_t restarts, int cluster, size_t smem,
                                  cudaStream_t stream) {
  return launch_fused_algorithm<true>(p, abc, restarts, cluster, smem, stream);
}

}  // namespace muonkern
