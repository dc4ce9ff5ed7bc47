// CUDA-graph cache of muonkern::ns5 (ns5_graphs.h). One graph per (signature, device, stream): its
// buffers are static, so replays on one stream follow each other in stream order, and an entry's
// lock keeps two threads from interleaving input redirection, replay and result launch.
#include "ns5_graphs.h"

#include "kernels/ns5_kernels.h"
#include "ns5_common.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace muonkern {
namespace {

// The cap bounds a process that sees many shapes. It counts captured graphs only: signatures seen
// once (a call count, no GPU memory) are tracked up to kMaxSignatures, so shapes that pass by once
// never keep a recurring shape from its graph. Graphs of calls that are not launch-bound (large
// ones) also count their memory against ns5_graph_budget_bytes().
constexpr int64_t kMaxGraphs = 64;
constexpr size_t kMaxSignatures = 4096;
constexpr int64_t kDefaultGraphBudgetMiB = 1024;

// The captured normalize launch and its arguments, so that a replay can read the caller's G in
// place instead of a copy of it (ns5_normalize_kernel(Ns5Problem, X, warp sums, sums, deferred)).
struct InputNode {
  cudaGraphNode_t node = nullptr;
  cudaKernelNodeParams params{};
  Ns5Problem problem{};
  void* rest[kNormalizePointerArgs] = {};
};

struct CachedGraph {
  std::mutex mutex;
  bool failed = false;  // capture threw once: this signature runs directly from then on
  int calls = 0;
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  // The graph's own input (input_buffer): read by the graph itself where `input` is nullopt, else
  // allocated only once some G has to be copied.
  at::Tensor in;
  ResultLaunch result;
  std::optional<InputNode> input;  // nullopt: the graph reads `in`, so replays copy G into it
};

std::mutex cache_mutex;
std::atomic<int64_t> graph_slots{0};     // graphs captured (or being captured), at most kMaxGraphs
std::atomic<int64_t> budgeted_bytes{0};  // held by those of calls that are not launch-bound

// MUONKERN_NS5_GRAPH_MB (read at every call; default 1024).
int64_t ns5_graph_budget_bytes() {
  return env_int("MUONKERN_NS5_GRAPH_MB", kDefaultGraphBudgetMiB) * (int64_t{1} << 20);
}

void release_graph_slot(int64_t bytes) {
  budgeted_bytes.fetch_sub(bytes);
  graph_slots.fetch_sub(1);
}

bool reserve_graph_slot(int64_t bytes) {
  const bool counted = graph_slots.fetch_add(1) < kMaxGraphs;
  const bool within_budget = budgeted_bytes.fetch_add(bytes) + bytes <= ns5_graph_budget_bytes() || bytes == 0;
  if (counted && within_budget) return true;
  release_graph_slot(bytes);
  return false;
}

// Never destroyed: graphs and their memory pools must not be torn down after CUDA at process exit.
auto& cache() {
  static auto* graphs = new std::unordered_map<std::string, std::unique_ptr<CachedGraph>>();
  return *graphs;
}

// A capture stream of our own per (device, replay stream). cuBLAS(Lt) keys its workspace by stream,
// so every graph that bakes in this stream's workspace replays on one stream, in order, and nothing
// else runs on it.
c10::cuda::CUDAStream capture_stream(const c10::cuda::CUDAStream& replay) {
  static auto* streams = new std::map<std::pair<int, c10::StreamId>, cudaStream_t>();
  const std::pair<int, c10::StreamId> key{replay.device_index(), replay.id()};
  auto it = streams->find(key);  // called under cache_mutex
  if (it == streams->end()) {
    cudaStream_t raw = nullptr;
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&raw, cudaStreamNonBlocking));
    it = streams->emplace(key, raw).first;
  }
  return c10::cuda::getStreamFromExternal(it->second, replay.device_index());
}

// A dense src with dst's strides is one span of memory: one memcpy instead of a copy kernel.
void copy_into(const at::Tensor& dst, const at::Tensor& src, cudaStream_t stream) {
  if (src.is_non_overlapping_and_dense() && src.strides() == dst.strides()) {
    C10_CUDA_CHECK(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), src.nbytes(), cudaMemcpyDeviceToDevice, stream));
  } else {
    dst.copy_(src);
  }
}

// The graph's normalize launch where it reads `in` itself (not a contiguous copy of it).
std::optional<InputNode> find_input_node(cudaGraph_t graph, const at::Tensor& in) {
  size_t count = 0;
  C10_CUDA_CHECK(cudaGraphGetNodes(graph, nullptr, &count));
  std::vector<cudaGraphNode_t> nodes(count);
  C10_CUDA_CHECK(cudaGraphGetNodes(graph, nodes.data(), &count));
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type;
    C10_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
    if (type != cudaGraphNodeTypeKernel) continue;
    InputNode found;
    C10_CUDA_CHECK(cudaGraphKernelNodeGetParams(node, &found.params));
    if (!ns5_is_normalize_kernel(found.params.func)) continue;
    found.node = node;
    std::memcpy(&found.problem, found.params.kernelParams[0], sizeof(Ns5Problem));
    for (int i = 0; i < kNormalizePointerArgs; ++i)
      std::memcpy(&found.rest[i], found.params.kernelParams[i + 1], sizeof(void*));
    if (found.problem.in.data != in.data_ptr()) return std::nullopt;
    return found;
  }
  return std::nullopt;
}

// The graph's input buffer: G's own layout where G is dense (a transposed view, say), so the graph
// runs the launches a direct call on G runs; contiguous otherwise. The same for every G of a
// signature, which holds G's sizes and strides.
at::Tensor input_buffer(const at::Tensor& G) {
  return G.is_non_overlapping_and_dense()
             ? at::empty_strided(G.sizes(), G.strides(), G.options())
             : at::empty_like(G, {}, at::MemoryFormat::Contiguous);
}

void capture(CachedGraph& entry, const at::Tensor& G, const c10::cuda::CUDAStream& side, const Ns5Body& body) {
  entry.in = input_buffer(G);
  auto graph = std::make_unique<at::cuda::CUDAGraph>(/*keep_graph=*/true);  // searched for the input node
  const c10::cuda::CUDAStreamGuard on_side(side);
  // Thread-local: other threads may keep calling CUDA while this one captures.
  graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
  try {
    entry.result = body(entry.in);
  } catch (...) {
    try {
      graph->capture_end();
    } catch (...) {
    }
    entry.failed = true;
    entry.in = at::Tensor();
    entry.result = ResultLaunch();
    throw;
  }
  graph->capture_end();
  entry.input = find_input_node(graph->raw_cuda_graph(), entry.in);
  graph->instantiate();
  entry.graph = std::move(graph);
  // Replays point the normalize launch at G or at a buffer allocated then (redirect_input).
  if (entry.input) entry.in = at::Tensor();
}

// Sets the input the graph's normalize launch reads (replays keep the last one set).
void point_input_at(CachedGraph& entry, const void* data) {
  InputNode& input = *entry.input;
  if (input.problem.in.data == data) return;
  input.problem.in.data = data;
  void* args[1 + kNormalizePointerArgs] = {&input.problem};
  for (int i = 0; i < kNormalizePointerArgs; ++i) args[i + 1] = &input.rest[i];
  cudaKernelNodeParams params = input.params;
  params.kernelParams = args;
  params.extra = nullptr;
  C10_CUDA_CHECK(cudaGraphExecKernelNodeSetParams(entry.graph->raw_cuda_graph_exec(), input.node, &params));
}

// The graph reads G in place where G has the captured layout and a 16-byte aligned start (the
// kernel may read 16-byte vectors); otherwise it reads its own input, a copy of G.
void redirect_input(CachedGraph& entry, const at::Tensor& G, cudaStream_t stream) {
  const bool in_place = entry.input && G.is_non_overlapping_and_dense() &&  // the captured layout
                        reinterpret_cast<uintptr_t>(G.data_ptr()) % 16 == 0;
  if (in_place) {
    point_input_at(entry, G.data_ptr());
    return;
  }
  if (!entry.in.defined()) entry.in = input_buffer(G);  // kept for later copies
  if (entry.input) point_input_at(entry, entry.in.data_ptr());
  copy_into(entry.in, G, stream);
}

}  // namespace

std::optional<at::Tensor> ns5_graph_replay(const at::Tensor& G, const std::string& signature, const Ns5Body& body,
                                           int64_t budgeted) {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return std::nullopt;
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(G.get_device());
  const std::string key = signature + "|dev" + std::to_string(G.get_device()) + "|stream" + std::to_string(stream.id());
  CachedGraph* entry = nullptr;
  c10::cuda::CUDAStream side = stream;
  {
    const std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache().find(key);
    if (it == cache().end()) {
      if (cache().size() >= kMaxSignatures) return std::nullopt;
      it = cache().emplace(key, std::make_unique<CachedGraph>()).first;
    }
    entry = it->second.get();
    side = capture_stream(stream);
  }
  const std::lock_guard<std::mutex> lock(entry->mutex);
  if (entry->failed) return std::nullopt;
  if (!entry->graph) {
    if (entry->calls < 2) ++entry->calls;  // stops at 2: a signature refused a slot keeps asking
    if (entry->calls < 2) return std::nullopt;
    // cache full or over budget: this call runs directly, a later one asks again
    if (!reserve_graph_slot(budgeted)) return std::nullopt;
    try {
      capture(*entry, G, side, body);
    } catch (...) {
      release_graph_slot(budgeted);
      throw;
    }
  }
  redirect_input(*entry, G, stream.stream());
  entry->graph->replay();
  at::Tensor out = at::empty_like(G, {}, at::MemoryFormat::Contiguous);
  entry->result.run(out, stream.stream());
  return out;
}

bool ns5_graph_wanted() {
  const char* value = std::getenv("MUONKERN_NS5_GRAPH");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

int64_t ns5_cached_graphs() { return graph_slots.load(); }
int64_t ns5_graph_bytes() { return budgeted_bytes.load(); }

}  // namespace muonkern
