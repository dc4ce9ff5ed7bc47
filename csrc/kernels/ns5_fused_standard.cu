// The fused kernel's standard iteration, every dtype and cluster size (ns5_fused_kernel.cuh).
#include "ns5_fused_kernel.cuh"

namespace muonkern {

cudaError_t launch_ns5_fused_standard(const Ns5Problem& p, const float* abc, int cluster, size_t smem,
                                      cudaStream_t stream) {
  return launch_fused_algorithm<false>(p, abc, 0u, cluster, smem, stream);
}

}  // namespace muonkern
