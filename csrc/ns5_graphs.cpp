// CUDA-graph cache of muonkern::ns5 (ns5_graphs.h). One graph per (signature, device, stream): its
// input and output buffers are static, so replays on one stream follow each other in stream order,
// and an entry's lock keeps two threads from interleaving copy-in, replay and copy-out.
#include "ns5_graphs.h"

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

namespace muonkern {
namespace {

// Launch-bound calls are small, so their graphs hold little memory; the cap bounds a process that
// sees many shapes.
constexpr size_t kMaxGraphs = 64;

struct CachedGraph {
  std::mutex mutex;
  bool failed = false;  // capture threw once: this signature runs directly from then on
  int calls = 0;
  std::unique_ptr<at::cuda::CUDAGraph> graph;
  at::Tensor in, out;
};

std::mutex cache_mutex;
std::atomic<int64_t> captured{0};

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

bool graphs_disabled() {
  const char* value = std::getenv("MUONKERN_NS5_GRAPH");
  return value != nullptr && std::strcmp(value, "0") == 0;
}

// A dense src with dst's strides is one span of memory: one memcpy instead of a copy kernel.
void copy_into(const at::Tensor& dst, const at::Tensor& src, cudaStream_t stream) {
  if (src.is_non_overlapping_and_dense() && src.strides() == dst.strides()) {
    C10_CUDA_CHECK(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), src.nbytes(), cudaMemcpyDeviceToDevice, stream));
  } else {
    dst.copy_(src);
  }
}

void capture(CachedGraph& entry, const at::Tensor& G, const c10::cuda::CUDAStream& side,
             const std::function<at::Tensor(const at::Tensor&)>& compute) {
  // G's own layout where it is dense (a transposed view, say), so the graph runs the launches a
  // direct call on G runs.
  entry.in = G.is_non_overlapping_and_dense()
                 ? at::empty_strided(G.sizes(), G.strides(), G.options())
                 : at::empty(G.sizes(), G.options().memory_format(at::MemoryFormat::Contiguous));
  auto graph = std::make_unique<at::cuda::CUDAGraph>();
  const c10::cuda::CUDAStreamGuard on_side(side);
  // Thread-local: other threads may keep calling CUDA while this one captures.
  graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
  try {
    entry.out = compute(entry.in);
  } catch (...) {
    try {
      graph->capture_end();
    } catch (...) {
    }
    entry.failed = true;
    entry.in = entry.out = at::Tensor();
    throw;
  }
  graph->capture_end();
  entry.graph = std::move(graph);
  ++captured;
}

}  // namespace

std::optional<at::Tensor> ns5_graph_replay(const at::Tensor& G, const std::string& signature,
                                           const std::function<at::Tensor(const at::Tensor&)>& compute) {
  if (graphs_disabled() || c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None)
    return std::nullopt;
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(G.get_device());
  const std::string key = signature + "|dev" + std::to_string(G.get_device()) + "|stream" + std::to_string(stream.id());
  CachedGraph* entry = nullptr;
  c10::cuda::CUDAStream side = stream;
  {
    const std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache().find(key);
    if (it == cache().end()) {
      if (cache().size() >= kMaxGraphs) return std::nullopt;
      it = cache().emplace(key, std::make_unique<CachedGraph>()).first;
    }
    entry = it->second.get();
    side = capture_stream(stream);
  }
  const std::lock_guard<std::mutex> lock(entry->mutex);
  if (entry->failed) return std::nullopt;
  if (!entry->graph) {
    if (++entry->calls < 2) return std::nullopt;
    capture(*entry, G, side, compute);
  }
  copy_into(entry->in, G, stream.stream());
  entry->graph->replay();
  at::Tensor out = at::empty(entry->out.sizes(), entry->out.options());
  copy_into(out, entry->out, stream.stream());
  return out;
}

int64_t ns5_cached_graphs() { return captured.load(); }

}  // namespace muonkern
