// Replays launch-bound muonkern::ns5 calls from cached CUDA graphs. A 768x768 call on the general
// path enqueues 17 kernels whose host cost is about three times their GPU time; replayed from a
// graph it costs three: copy G in, launch the graph, copy the result out.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <string>

namespace muonkern {

// compute(G) replayed from a graph cached under `signature` (which must determine every launch that
// compute makes, G's shape, strides and dtype included) on the current stream. nullopt where the caller runs
// compute itself: the first call of a signature (it loads kernels and builds cuBLASLt plans
// uncaptured), while the current stream is being captured (the caller's own graph records the
// launches), with MUONKERN_NS5_GRAPH=0, or once the cache is full.
std::optional<at::Tensor> ns5_graph_replay(const at::Tensor& G, const std::string& signature,
                                           const std::function<at::Tensor(const at::Tensor&)>& compute);

// How many graphs this process has captured (tests read it through muonkern._C.ns5_cached_graphs).
int64_t ns5_cached_graphs();

}  // namespace muonkern
