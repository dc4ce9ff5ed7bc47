// Replays multi-launch muonkern::ns5 calls from cached CUDA graphs. A 768x768 call on the general
// path enqueues 17 kernels whose host cost is about three times their GPU time; replayed from a
// graph it costs two launches: the graph, pointed at the caller's G, then the launch that writes
// the fresh output. Large calls gain too, less: the GPU starts a graph's kernels closer together
// (2048x8192: 1-2% on an H100, README's Backends), but their graphs hold their workspace, hence a
// budget.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include <functional>
#include <optional>
#include <string>

namespace muonkern {

// The launch of a multi-launch ns5 call that writes its output (the last product or the finish
// kernel), split off from the launches before it so that a graph of those can be replayed into a
// fresh output tensor each time. `workspace` keeps alive the buffers `run` reads.
struct ResultLaunch {
  at::Tensor workspace;
  std::function<void(const at::Tensor& out, cudaStream_t stream)> run;
};

// The call's launches up to its output: the normalize kernel reading G first, then the rest.
using Ns5Body = std::function<ResultLaunch(const at::Tensor& G)>;

// body(G) replayed from a graph cached under `signature` (which must determine every launch body
// makes: G's shape, strides and dtype included) on the current stream, then the result launch into
// a fresh contiguous tensor. The graph's normalize launch is pointed at G itself where G has the
// captured layout and a 16-byte aligned start; otherwise G is copied into a buffer of the graph's
// first (allocated when first needed). `budgeted`: the bytes the graph would hold, counted against
// MUONKERN_NS5_GRAPH_MB (MiB, default 1024, read at every call) by the caller's choice: 0 for
// launch-bound calls, which graphs serve whatever they hold. nullopt where the caller runs body
// itself: the first call of a signature (it loads kernels and builds cuBLASLt plans uncaptured),
// while the current stream is being captured (the caller's own graph records the launches), or
// while the cache holds its most graphs (64; signatures seen only once do not count) or the budget
// has no room for this one.
std::optional<at::Tensor> ns5_graph_replay(const at::Tensor& G, const std::string& signature, const Ns5Body& body,
                                           int64_t budgeted);

// Whether calls go through ns5_graph_replay: unless MUONKERN_NS5_GRAPH=0 (read at every call).
bool ns5_graph_wanted();

// How many graphs this process has captured, counting one another thread is capturing (tests read it
// through muonkern._C.ns5_cached_graphs).
int64_t ns5_cached_graphs();
// Bytes those graphs count against MUONKERN_NS5_GRAPH_MB (muonkern._C.ns5_graph_bytes).
int64_t ns5_graph_bytes();

}  // namespace muonkern
