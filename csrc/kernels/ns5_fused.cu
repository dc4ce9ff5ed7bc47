// The fused kernel's shared-memory size and launch (the kernel: ns5_fused_kernel.cuh).
#include "ns5_fused_kernel.cuh"

namespace muonkern {

size_t ns5_fused_smem_bytes(int64_t m, int64_t n, int cluster, bool gram) {
  const int64_t R = m < n ? m : n, C = m < n ? n : m;
  if (R > kFusedMaxShortSide || R < 1) return 0;
  const FusedExtents extents = fused_extents(R, C, cluster);
  const int64_t Rp = extents.Rp, Cs = extents.Cs, squares = gram ? 4 : 2;
  const int64_t bf16_bytes = 2 * Rp * (Cs + kRowPad) + 2 * squares * Rp * (Rp + kRowPad);
  return static_cast<size_t>(bf16_bytes + 64 * sizeof(float) + (cluster > 1 ? 4 * Rp * Rp : 0));
}

cudaError_t launch_ns5_fused(const Ns5Problem& p, const float* abc, const FusedGram& gram, int cluster,
                             cudaStream_t stream) {
  const size_t smem = ns5_fused_smem_bytes(p.m, p.n, cluster, gram.enabled);
  if (p.steps > kFusedMaxSteps || smem == 0) return cudaErrorInvalidValue;
  return gram.enabled ? launch_ns5_fused_gram(p, abc, gram.restarts, cluster, smem, stream)
                      : launch_ns5_fused_standard(p, abc, cluster, smem, stream);
}

}  // namespace muonkern
