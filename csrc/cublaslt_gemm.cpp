// cuBLASLt plans and launches for ns5 (cublaslt_gemm.h).
#include "cublaslt_gemm.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <cublasLt.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "ns5_common.h"

namespace muonkern {
namespace {

#define MUONKERN_CUBLAS_CHECK(expr)                                                                  \
  do {                                                                                              \
    const cublasStatus_t _status = (expr);                                                          \
    TORCH_CHECK(_status == CUBLAS_STATUS_SUCCESS,                                                  \
                std::string("ns5: " #expr " failed with cuBLAS status ") + std::to_string(_status));  \
  } while (0)

struct GemmShapeHash {
  size_t operator()(const GemmShape& s) const {
    size_t h = 0;
    const auto* bytes = reinterpret_cast<const unsigned char*>(&s);
    for (size_t i = 0; i < sizeof(GemmShape); ++i) h = h * 131 + bytes[i];
    return h;
  }
};

struct GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;  // d is c unless strides differ
  cublasLtMatmulAlgo_t algo{};                    // candidates.front() until timed
  std::vector<cublasLtMatmulAlgo_t> candidates;  // what timing picks from
  bool timed = false;
};

// How many of the heuristic's algorithms the first call times (MUONKERN_NS5_GEMM_CANDIDATES, 1 to 64,
// default 8). Its first choice is often not the fastest for the square and skinny products of ns5 (a
// few percent to tens of percent).
int heuristic_candidates() {
  return static_cast<int>(std::clamp<int64_t>(env_int("MUONKERN_NS5_GEMM_CANDIDATES", 8), 1, 64));
}

// A strided batch, or (pointer_array) a batch whose matrices' addresses cuBLASLt reads from a device array.
cublasLtMatrixLayout_t make_layout(cudaDataType type, int64_t rows, int64_t cols, int64_t ld, int64_t stride,
                                   int batch, bool pointer_array) {
  cublasLtMatrixLayout_t layout;
  MUONKERN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, rows, cols, ld));
  MUONKERN_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
  if (pointer_array) {
    const uint32_t mode = CUBLASLT_BATCH_MODE_POINTER_ARRAY;
    MUONKERN_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, &mode, sizeof(mode)));
  } else {
    MUONKERN_CUBLAS_CHECK(
        cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
  }
  return layout;
}

// A product with few output tiles and a long K (the Gram matrix X X^T of a wide X) leaves most
// SMs idle; splitting K among them fills the chip. The heuristic rarely does this on its own. The
// split count (computed once per plan; none where MUONKERN_NS5_SPLITK=0): what covers the SMs with
// typical 128x128 tiles, at most one split per 512 of K.
std::optional<int32_t> split_k_count(const GemmShape& s) {
  if (env_int("MUONKERN_NS5_SPLITK", 1) == 0) return std::nullopt;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t tiles = ((s.m + 127) / 128) * ((s.n + 127) / 128) * s.batch;
  const int64_t splits = std::min<int64_t>(sms / std::max<int64_t>(tiles, 1), s.k / 512);
  if (splits < 2) return std::nullopt;
  return static_cast<int32_t>(splits);
}

// `algo` split `count` ways, where the algorithm supports split-K at all and the split fits in
// `workspace` bytes.
std::optional<cublasLtMatmulAlgo_t> with_split_k(cublasLtHandle_t handle, const GemmPlan& plan,
                                                 cublasLtMatmulAlgo_t algo, int32_t count, size_t workspace) {
  int supported = 0;
  size_t written = 0;
  if (cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &supported, sizeof(supported),
                                        &written) != CUBLAS_STATUS_SUCCESS ||
      supported == 0)
    return std::nullopt;
  const uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  cublasLtMatmulHeuristicResult_t check{};
  if (cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &count, sizeof(count)) ==
          CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof(scheme)) ==
          CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulAlgoCheck(handle, plan.desc, plan.a, plan.b, plan.c, plan.d, &algo, &check) ==
          CUBLAS_STATUS_SUCCESS &&
      check.workspaceSize <= workspace)
    return algo;
  return std::nullopt;
}

// Plans (descriptors + candidate algorithms) are cached per shape: building one costs more than a
// small GEMM. They are never freed; a process sees few distinct shapes.
// Guards the plans and their timing: one lock per GEMM call.
std::mutex plans_mutex;

// Called under plans_mutex.
GemmPlan& gemm_plan(GemmShape s, cublasLtHandle_t handle, size_t workspace) {
  static std::unordered_map<GemmShape, GemmPlan, GemmShapeHash> plans;
  if (s.stride_d == s.stride_c) s.stride_d = -1;  // one plan whether D's stride is C's implied or given
  auto it = plans.find(s);
  if (it != plans.end()) return it->second;
  GemmPlan plan;
  MUONKERN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const auto ta = static_cast<cublasOperation_t>(s.ta), tb = static_cast<cublasOperation_t>(s.tb);
  MUONKERN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  MUONKERN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  if (s.device_scalars) {
    const cublasLtPointerMode_t mode = CUBLASLT_POINTER_MODE_DEVICE;
    MUONKERN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_POINTER_MODE, &mode, sizeof(mode)));
  }
  const bool na = ta == CUBLAS_OP_N, nb = tb == CUBLAS_OP_N;
  const int batch = static_cast<int>(s.batch);
  const bool pointers = s.pointer_array != 0;
  plan.a = make_layout(CUDA_R_16BF, na ? s.m : s.k, na ? s.k : s.m, s.lda, s.stride_a, batch, pointers);
  plan.b = make_layout(CUDA_R_16BF, nb ? s.k : s.n, nb ? s.n : s.k, s.ldb, s.stride_b, batch, pointers);
  plan.c = make_layout(static_cast<cudaDataType>(s.out_type), s.m, s.n, s.ldc, s.stride_c, batch, pointers);
  plan.d = s.stride_d < 0 ? plan.c
                          : make_layout(static_cast<cudaDataType>(s.out_type), s.m, s.n, s.ldc, s.stride_d, batch, pointers);
  cublasLtMatmulPreference_t pref;
  MUONKERN_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  MUONKERN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                             &workspace, sizeof(workspace)));
  std::vector<cublasLtMatmulHeuristicResult_t> results(heuristic_candidates());
  int found = 0;
  MUONKERN_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, plan.desc, plan.a, plan.b, plan.c, plan.d, pref,
                                                       static_cast<int>(results.size()), results.data(), &found));
  cublasLtMatmulPreferenceDestroy(pref);
  TORCH_CHECK(found > 0, "ns5: cuBLASLt found no algorithm for a " + std::to_string(s.m) + "x" + std::to_string(s.n) +
                            "x" + std::to_string(s.k) + " bf16 GEMM with output type " + std::to_string(s.out_type));
  // each algorithm of the heuristic's list, after its split-K variant where it has one; untimed
  // calls take the first
  const std::optional<int32_t> split_count = split_k_count(s);
  for (int i = 0; i < found; ++i) {
    const cublasLtMatmulAlgo_t& algo = results[i].algo;
    if (split_count) {
      if (auto split = with_split_k(handle, plan, algo, *split_count, workspace)) plan.candidates.push_back(*split);
    }
    plan.candidates.push_back(algo);
  }
  plan.algo = plan.candidates.front();
  return plans.emplace(s, plan).first->second;
}

bool timing_disabled() { return env_int("MUONKERN_NS5_GEMM_TUNE", 1) == 0; }

// Timing: each candidate runs kTimedRuns times as one CUDA graph. Launched one by one from the host,
// GEMMs of a few microseconds ran at the host's pace, every candidate timed alike and the pick was
// noise (768x3072's X X^T took 8.6 to 13.4 us between processes on one kind of H100).
constexpr int kTimedRuns = 5;

// Milliseconds of one replay of `run` x kTimedRuns captured on `side` (infinite where capture or
// replay fails: that candidate is not picked).
template <typename Run>
float replay_ms(cudaStream_t side, const Run& run, cudaEvent_t start, cudaEvent_t stop) {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  bool ok = cudaStreamBeginCapture(side, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
  if (ok) {
    for (int i = 0; i < kTimedRuns; ++i) ok = run(side) == CUBLAS_STATUS_SUCCESS && ok;
    ok = cudaStreamEndCapture(side, &graph) == cudaSuccess && ok;
  }
  ok = ok && cudaGraphInstantiateWithFlags(&exec, graph, 0) == cudaSuccess;
  // the first replay uploads the graph: only the second is timed
  ok = ok && cudaGraphLaunch(exec, side) == cudaSuccess && cudaEventRecord(start, side) == cudaSuccess &&
       cudaGraphLaunch(exec, side) == cudaSuccess && cudaEventRecord(stop, side) == cudaSuccess &&
       cudaEventSynchronize(stop) == cudaSuccess;
  float ms = std::numeric_limits<float>::infinity();
  if (ok && cudaEventElapsedTime(&ms, start, stop) != cudaSuccess) ms = std::numeric_limits<float>::infinity();
  if (exec != nullptr) cudaGraphExecDestroy(exec);
  if (graph != nullptr) cudaGraphDestroy(graph);
  (void)cudaGetLastError();  // a failed capture leaves no error behind for the next CUDA call
  return ms;
}

// The timing's side stream and events, released on every way out (a failed CUDA call throws).
struct StreamDestroyer {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
struct EventDestroyer {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
using UniqueStream = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDestroyer>;
using UniqueEvent = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDestroyer>;

UniqueStream new_stream() {
  cudaStream_t s;
  C10_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return UniqueStream(s);
}

UniqueEvent new_event(unsigned flags) {
  cudaEvent_t e;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, flags));
  return UniqueEvent(e);
}

// Times each candidate on the call's own operands and keeps the fastest. Capture needs a stream
// other than the legacy default, so the runs go to a side stream ordered after `stream`, and
// `stream` waits for them. Reruns must not change the result: callers skip this where D is C with a
// nonzero beta.
cublasLtMatmulAlgo_t fastest(cublasLtHandle_t handle, const GemmPlan& plan, const float* alpha, const void* A,
                             const void* B, const float* beta, const void* C, void* D, void* workspace,
                             size_t workspace_size, cudaStream_t stream) {
  const UniqueStream side_owner = new_stream();
  const UniqueEvent start_owner = new_event(cudaEventDefault), stop_owner = new_event(cudaEventDefault),
                    order_owner = new_event(cudaEventDisableTiming);
  cudaStream_t side = side_owner.get();
  cudaEvent_t start = start_owner.get(), stop = stop_owner.get(), order = order_owner.get();
  C10_CUDA_CHECK(cudaEventRecord(order, stream));
  C10_CUDA_CHECK(cudaStreamWaitEvent(side, order, 0));
  cublasLtMatmulAlgo_t best = plan.algo;
  float best_ms = std::numeric_limits<float>::infinity();
  for (const cublasLtMatmulAlgo_t& algo : plan.candidates) {
    const auto run = [&](cudaStream_t on) {
      return cublasLtMatmul(handle, plan.desc, alpha, A, plan.a, B, plan.b, beta, C, plan.c, D, plan.d, &algo,
                            workspace, workspace_size, on);
    };
    if (run(side) != CUBLAS_STATUS_SUCCESS) continue;  // not for these operands
    const float ms = replay_ms(side, run, start, stop);
    if (ms < best_ms) {
      best_ms = ms;
      best = algo;
    }
  }
  C10_CUDA_CHECK(cudaEventRecord(order, side));
  C10_CUDA_CHECK(cudaStreamWaitEvent(stream, order, 0));
  return best;  // the side stream is released once its work is done
}

// alpha and beta point to host or device floats as s.device_scalars says; `rerun_safe`: rerunning
// the GEMM leaves D as one run does (no accumulation into D), so timing may run it.
void run_gemm(const GemmShape& s, const float* alpha, const __nv_bfloat16* A, const __nv_bfloat16* B, const float* beta,
              bool rerun_safe, const void* C, void* D, cudaStream_t stream) {
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t a, b, c, d;
  cublasLtMatmulAlgo_t algo;
  {
    const std::lock_guard<std::mutex> lock(plans_mutex);
    GemmPlan& plan = gemm_plan(s, handle, workspace_size);
    // The first call of a shape picks its algorithm by timing, except under stream capture (no
    // synchronizing there: a later call does it) and where a rerun would accumulate into D.
    if (!plan.timed && !timing_disabled() && rerun_safe &&
        c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
      plan.algo = fastest(handle, plan, alpha, A, B, beta, C, D, workspace, workspace_size, stream);
      plan.timed = true;
    }
    desc = plan.desc, a = plan.a, b = plan.b, c = plan.c, d = plan.d, algo = plan.algo;
  }
  MUONKERN_CUBLAS_CHECK(cublasLtMatmul(handle, desc, alpha, A, a, B, b, beta, C, c, D, d, &algo, workspace,
                                       workspace_size, stream));
}

}  // namespace

void gemm(const GemmShape& s, float alpha, const __nv_bfloat16* A, const __nv_bfloat16* B, float beta,
          const void* C, void* D, cudaStream_t stream) {
  TORCH_INTERNAL_ASSERT(!s.device_scalars);
  run_gemm(s, &alpha, A, B, &beta, beta == 0.f || C != D, C, D, stream);
}

void gemm(const GemmShape& s, const float* alpha, const __nv_bfloat16* A, const __nv_bfloat16* B, const float* zero,
          void* D, cudaStream_t stream) {
  TORCH_INTERNAL_ASSERT(s.device_scalars);
  run_gemm(s, alpha, A, B, zero, /*rerun_safe=*/true, D, D, stream);
}

}  // namespace muonkern
