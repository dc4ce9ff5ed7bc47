// The iteration's default coefficients and the Gram iteration's restart schedule, without torch or
// CUDA headers: the op's kernels (CPU and CUDA) and bench/fused_kernel_timing.cu (built with nvcc
// alone) take them from here.
// muonkern/ops/ns5_args.py holds the same schedule for the fallback.
#pragma once

#include <cstdint>
#include <vector>

namespace muonkern {

// (a, b, c) of KellerJordan/Muon's quintic iteration.
inline constexpr double kJordanCoefficients[3] = {3.4445, -4.7750, 2.0315};

inline constexpr int64_t kGramRestartInterval = 2;  // restart after every 2nd step (5 steps: after 2)

// The steps after which the Gram iteration restarts (1-based): every kGramRestartInterval-th, except
// one that would leave a single step to run.
inline std::vector<int64_t> gram_restart_steps(int64_t steps) {
  std::vector<int64_t> restarts;
  for (int64_t s = kGramRestartInterval; s < steps; s += kGramRestartInterval) restarts.push_back(s);
  if (!restarts.empty() && steps - restarts.back() < kGramRestartInterval) restarts.pop_back();
  return restarts;
}

// The same restarts as a bit mask, bit s for a restart after step s (the fused kernel's FusedGram).
// Restarts come before the last step, so with steps <= 32 (kFusedMaxSteps, what that kernel takes)
// every bit fits.
inline uint32_t gram_restart_mask(int64_t steps) {
  uint32_t mask = 0;
  for (const int64_t s : gram_restart_steps(steps)) mask |= 1u << s;
  return mask;
}

}  // namespace muonkern
