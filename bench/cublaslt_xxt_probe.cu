// X·Xᵀ (bf16, fp32 accumulation) on cuBLASLt, the ways ns5's Gram iteration could ask for it.
//
//   fill    CUBLASLT_MATMUL_DESC_FILL_MODE lower/upper: cuBLASLt computes one triangle on algorithms with
//           CUBLASLT_ALGO_CAP_UPLO_SUPPORT. Prints what the heuristic returns for bf16 and, where
//           something runs, its time, its triangle against the full product and whether it left the
//           other (NaN-poisoned) triangle alone.
//   split   the two GEMMs the op ran at a short side of 2048 before its blocks (the left panel X·X1ᵀ,
//           then the corner X2·X2ᵀ) one after the other; the same two on two streams at once, each
//           planned for a share of the SMs (CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET); and the lower
//           blocks of a 2x2, 4x4 and 8x8 block grid as one pointer-array batch
//           (CUBLASLT_BATCH_MODE_POINTER_ARRAY), which csrc/ns5_cuda.cpp (gram_product) now runs.
// Every GEMM is the fastest of the heuristic's first 8 algorithms, each timed alone. Times: one
// replay of a CUDA graph of 20 repetitions, median of 5 replays, µs per repetition (GPU time only).
// The split variants' blocks are checked against the full product (max |diff| / max |R|).
//
//   nvcc -O2 -std=c++17 -arch=sm_90a bench/cublaslt_xxt_probe.cu -lcublasLt -o /tmp/xxt_probe && /tmp/xxt_probe
// or, after the extension's build (the same cuBLASLt as the op, pip's where the toolkit has none):
//   cmake --build build/cp3*-* --target cublaslt_xxt_probe && build/cp3*-*/cublaslt_xxt_probe
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

#define CHECK_CUDA(x)                                                                 \
  do {                                                                                \
    cudaError_t e_ = (x);                                                             \
    if (e_ != cudaSuccess) {                                                          \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));  \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)
#define CHECK_LT(x)                                                                 \
  do {                                                                              \
    cublasStatus_t s_ = (x);                                                        \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                              \
      std::printf("%s:%d %s: cuBLAS status %d\n", __FILE__, __LINE__, #x, (int)s_);  \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

namespace {

using bf16 = __nv_bfloat16;
constexpr size_t kWorkspace = 64ull << 20;
constexpr int kRepetitions = 20, kReplays = 5, kCandidates = 8;

cublasLtHandle_t handle;

// One workspace per stream: two GEMMs running at once must not share one.
struct Lane {
  cudaStream_t stream;
  void* workspace;
};

Lane new_lane() {
  Lane lane;
  CHECK_CUDA(cudaStreamCreateWithFlags(&lane.stream, cudaStreamNonBlocking));
  CHECK_CUDA(cudaMalloc(&lane.workspace, kWorkspace));
  return lane;
}

// D (m x n, column-major, ld ldd) = Aᵀ B with A (k x m, ld lda) and B (k x n, ld ldb) column-major: for
// X row-major (r x C), the rows i0.. of X are the column-major C x rows matrix at X + i0 * C, so a
// block X_i X_jᵀ is A = X + i0 C, B = X + j0 C. `batch` > 1: pointer-array batch, the pointers given
// per instance.
struct Gemm {
  int64_t m, n, k, lda, ldb, ldd;
  int batch = 1;
  int sm_target = 0;
  cublasFillMode_t fill = CUBLAS_FILL_MODE_FULL;
  std::vector<const bf16*> A, B;
  std::vector<bf16*> D;
  // set by plan()
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  void** device_pointers = nullptr;  // [A..., B..., D...] for a pointer-array batch
  std::vector<cublasLtMatmulHeuristicResult_t> algos;
  cublasLtMatmulAlgo_t best{};
  double best_us = -1;
};

cublasLtMatrixLayout_t layout(int64_t rows, int64_t cols, int64_t ld, int batch) {
  cublasLtMatrixLayout_t l;
  CHECK_LT(cublasLtMatrixLayoutCreate(&l, CUDA_R_16BF, rows, cols, ld));
  if (batch > 1) {
    const int32_t count = batch;
    const uint32_t mode = CUBLASLT_BATCH_MODE_POINTER_ARRAY;
    CHECK_LT(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
    CHECK_LT(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_MODE, &mode, sizeof(mode)));
  }
  return l;
}

// The heuristic's first kCandidates algorithms (none where it refuses: its status is printed).
void plan(Gemm& g) {
  CHECK_LT(cublasLtMatmulDescCreate(&g.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  CHECK_LT(cublasLtMatmulDescSetAttribute(g.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  CHECK_LT(cublasLtMatmulDescSetAttribute(g.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  const int32_t fill = g.fill, sms = g.sm_target;
  if (g.fill != CUBLAS_FILL_MODE_FULL)
    CHECK_LT(cublasLtMatmulDescSetAttribute(g.desc, CUBLASLT_MATMUL_DESC_FILL_MODE, &fill, sizeof(fill)));
  if (sms > 0) CHECK_LT(cublasLtMatmulDescSetAttribute(g.desc, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &sms, sizeof(sms)));
  g.a = layout(g.k, g.m, g.lda, g.batch);
  g.b = layout(g.k, g.n, g.ldb, g.batch);
  g.d = layout(g.m, g.n, g.ldd, g.batch);
  if (g.batch > 1) {
    std::vector<void*> host;
    for (auto p : g.A) host.push_back(const_cast<bf16*>(p));
    for (auto p : g.B) host.push_back(const_cast<bf16*>(p));
    for (auto p : g.D) host.push_back(p);
    CHECK_CUDA(cudaMalloc(&g.device_pointers, host.size() * sizeof(void*)));
    CHECK_CUDA(cudaMemcpy(g.device_pointers, host.data(), host.size() * sizeof(void*), cudaMemcpyHostToDevice));
  }
  cublasLtMatmulPreference_t pref;
  CHECK_LT(cublasLtMatmulPreferenceCreate(&pref));
  CHECK_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &kWorkspace,
                                                sizeof(kWorkspace)));
  g.algos.resize(kCandidates);
  int found = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(handle, g.desc, g.a, g.b, g.d, g.d, pref, kCandidates, g.algos.data(), &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (status != CUBLAS_STATUS_SUCCESS) {
    std::printf("    heuristic refused: cuBLAS status %d\n", (int)status);
    found = 0;
  }
  g.algos.resize(found);
}

cublasStatus_t launch(const Gemm& g, const cublasLtMatmulAlgo_t& algo, const Lane& lane) {
  const float alpha = 1.f, beta = 0.f;
  const void *A = g.A[0], *B = g.B[0];
  void* D = g.D[0];
  if (g.batch > 1) {
    A = g.device_pointers;
    B = g.device_pointers + g.batch;
    D = g.device_pointers + 2 * g.batch;
  }
  return cublasLtMatmul(handle, g.desc, &alpha, A, g.a, B, g.b, &beta, D, g.d, D, g.d, &algo, lane.workspace,
                        kWorkspace, lane.stream);
}

// µs per repetition of `body` (which launches on `main` and any lanes it forks): median of kReplays
// replays of a graph of kRepetitions repetitions; -1 if capture fails.
double time_us(const Lane& main, const std::function<bool()>& body) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  if (cudaStreamBeginCapture(main.stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) return -1;
  bool ok = true;
  for (int i = 0; i < kRepetitions; ++i) ok = body() && ok;
  if (cudaStreamEndCapture(main.stream, &graph) != cudaSuccess || !ok) {
    cudaGetLastError();
    return -1;
  }
  CHECK_CUDA(cudaGraphInstantiateWithFlags(&exec, graph, 0));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  CHECK_CUDA(cudaGraphLaunch(exec, main.stream));  // uploads the graph
  std::vector<float> ms(kReplays);
  for (float& t : ms) {
    CHECK_CUDA(cudaEventRecord(start, main.stream));
    CHECK_CUDA(cudaGraphLaunch(exec, main.stream));
    CHECK_CUDA(cudaEventRecord(stop, main.stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    CHECK_CUDA(cudaEventElapsedTime(&t, start, stop));
  }
  std::sort(ms.begin(), ms.end());
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms[kReplays / 2] * 1e3 / kRepetitions;
}

int config(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
  int32_t v = -1;
  size_t written = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &v, sizeof(v), &written);
  return v;
}

// Plans g and keeps its fastest algorithm timed alone; prints it. False if nothing ran.
bool tune(Gemm& g, const Lane& lane, const char* label) {
  plan(g);
  for (const auto& r : g.algos) {
    const double us = time_us(lane, [&] { return launch(g, r.algo, lane) == CUBLAS_STATUS_SUCCESS; });
    if (us > 0 && (g.best_us < 0 || us < g.best_us)) g.best_us = us, g.best = r.algo;
  }
  if (g.best_us < 0) {
    std::printf("  %-44s nothing ran (%zu algorithms)\n", label, g.algos.size());
    return false;
  }
  const double gflop = 2.0 * g.m * g.n * g.k * g.batch * 1e-9;
  std::printf("  %-44s %8.2f us  (%.0f TFLOP/s; tile %d, stages %d, split-K %d, of %zu)\n", label, g.best_us,
              gflop / g.best_us * 1e3, config(g.best, CUBLASLT_ALGO_CONFIG_TILE_ID),
              config(g.best, CUBLASLT_ALGO_CONFIG_STAGES_ID), config(g.best, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
              g.algos.size());
  return true;
}

std::vector<float> to_host(const bf16* D, int64_t count) {
  std::vector<bf16> h(count);
  CHECK_CUDA(cudaMemcpy(h.data(), D, count * sizeof(bf16), cudaMemcpyDeviceToHost));
  std::vector<float> f(count);
  for (int64_t i = 0; i < count; ++i) f[i] = __bfloat162float(h[i]);
  return f;
}

// Largest |R - reference| / max |reference| over the lower block triangle (column-major block (i, j),
// i >= j, of size h), NaN-poisoned elsewhere and so skipped; unwritten elements inside count as NaN.
double block_error(const std::vector<float>& got, const std::vector<float>& ref, int64_t r, int64_t h) {
  double worst = 0, scale = 0;
  for (float v : ref) scale = std::max(scale, static_cast<double>(std::fabs(v)));
  for (int64_t c = 0; c < r; ++c)
    for (int64_t row = 0; row < r; ++row) {
      if (row / h < c / h) continue;  // upper blocks: not computed
      const float v = got[c * r + row];
      if (std::isnan(v)) return NAN;
      worst = std::max(worst, static_cast<double>(std::fabs(v - ref[c * r + row])));
    }
  return worst / scale;
}

// Lower blocks (i >= j) of an nb x nb grid of X Xᵀ as one pointer-array batch.
Gemm lower_blocks(const bf16* X, bf16* R, int64_t r, int64_t C, int nb) {
  const int64_t h = r / nb;
  Gemm g{h, h, C, C, C, r};
  for (int i = 0; i < nb; ++i)
    for (int j = 0; j <= i; ++j) {
      g.A.push_back(X + i * h * C);
      g.B.push_back(X + j * h * C);
      g.D.push_back(R + j * h * r + i * h);  // column-major block (i, j)
    }
  g.batch = static_cast<int>(g.A.size());
  return g;
}

void fill_modes(const bf16* X, bf16* R, int64_t r, int64_t C, const Lane& lane) {
  for (cublasFillMode_t fill : {CUBLAS_FILL_MODE_LOWER, CUBLAS_FILL_MODE_UPPER}) {
    Gemm g{r, r, C, C, C, r};
    g.A = {X}, g.B = {X}, g.D = {R};
    g.fill = fill;
    tune(g, lane, fill == CUBLAS_FILL_MODE_LOWER ? "fill mode lower" : "fill mode upper");
  }
}

void probe(int64_t r, int64_t C, const Lane& main, const Lane& side) {
  std::printf("\n== X X^T, X %ld x %ld ==\n", (long)r, (long)C);
  std::vector<bf16> hX(r * C);
  std::mt19937 gen(static_cast<unsigned>(r * 7919 + C));
  std::normal_distribution<float> normal(0.f, 1.f / std::sqrt(static_cast<float>(C)));
  for (auto& v : hX) v = __float2bfloat16(normal(gen));
  bf16 *X, *R;
  CHECK_CUDA(cudaMalloc(&X, r * C * sizeof(bf16)));
  CHECK_CUDA(cudaMalloc(&R, r * r * sizeof(bf16)));
  CHECK_CUDA(cudaMemcpy(X, hX.data(), r * C * sizeof(bf16), cudaMemcpyHostToDevice));

  Gemm full{r, r, C, C, C, r};
  full.A = {X}, full.B = {X}, full.D = {R};
  if (!tune(full, main, "full product")) return;
  CHECK_LT(launch(full, full.best, main));
  CHECK_CUDA(cudaStreamSynchronize(main.stream));
  const std::vector<float> reference = to_host(R, r * r);

  fill_modes(X, R, r, C, main);

  const int64_t h = r / 2;
  Gemm panel{r, h, C, C, C, r}, corner{h, h, C, C, C, r};
  panel.A = {X}, panel.B = {X}, panel.D = {R};
  corner.A = {X + h * C}, corner.B = {X + h * C}, corner.D = {R + h * r + h};
  if (tune(panel, main, "split: left panel X X1^T") && tune(corner, main, "split: corner X2 X2^T")) {
    const double us = time_us(main, [&] {
      return launch(panel, panel.best, main) == CUBLAS_STATUS_SUCCESS &&
             launch(corner, corner.best, main) == CUBLAS_STATUS_SUCCESS;
    });
    std::printf("  %-44s %8.2f us\n", "split: panel then corner (today's order)", us);
  }

  // The two at once: the corner forked onto a second stream; each planned for a share of the SMs.
  cudaEvent_t fork, join;
  CHECK_CUDA(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  CHECK_CUDA(cudaEventCreateWithFlags(&join, cudaEventDisableTiming));
  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  for (int corner_sms : {0, sms / 4, sms / 3, sms * 2 / 5, sms / 2}) {
    Gemm p = panel, c = corner;
    p.best_us = c.best_us = -1;
    p.sm_target = corner_sms > 0 ? sms - corner_sms : 0;
    c.sm_target = corner_sms;
    char label[96];
    std::snprintf(label, sizeof(label), "concurrent: panel on %d SMs", p.sm_target > 0 ? p.sm_target : sms);
    if (!tune(p, main, label)) continue;
    std::snprintf(label, sizeof(label), "concurrent: corner on %d SMs", corner_sms > 0 ? corner_sms : sms);
    if (!tune(c, side, label)) continue;
    const double us = time_us(main, [&] {
      bool ok = cudaEventRecord(fork, main.stream) == cudaSuccess &&
                cudaStreamWaitEvent(side.stream, fork, 0) == cudaSuccess;
      ok = ok && launch(c, c.best, side) == CUBLAS_STATUS_SUCCESS && launch(p, p.best, main) == CUBLAS_STATUS_SUCCESS;
      return ok && cudaEventRecord(join, side.stream) == cudaSuccess &&
             cudaStreamWaitEvent(main.stream, join, 0) == cudaSuccess;
    });
    CHECK_CUDA(cudaMemset(R, 0xFF, r * r * sizeof(bf16)));
    CHECK_CUDA(cudaEventRecord(fork, main.stream));
    CHECK_CUDA(cudaStreamWaitEvent(side.stream, fork, 0));
    CHECK_LT(launch(c, c.best, side));
    CHECK_LT(launch(p, p.best, main));
    CHECK_CUDA(cudaDeviceSynchronize());
    std::printf("  %-44s %8.2f us  (error %.1e)\n", "  both at once", us, block_error(to_host(R, r * r), reference, r, h));
  }

  for (int nb : {2, 4, 8}) {
    Gemm g = lower_blocks(X, R, r, C, nb);
    char label[96];
    std::snprintf(label, sizeof(label), "pointer-array batch: %d lower blocks of %ld^2", g.batch, (long)(r / nb));
    if (!tune(g, main, label)) continue;
    CHECK_CUDA(cudaMemset(R, 0xFF, r * r * sizeof(bf16)));
    CHECK_LT(launch(g, g.best, main));
    CHECK_CUDA(cudaStreamSynchronize(main.stream));
    std::printf("  %-44s error %.1e\n", "", block_error(to_host(R, r * r), reference, r, r / nb));
  }
  CHECK_CUDA(cudaFree(X));
  CHECK_CUDA(cudaFree(R));
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs, cuBLASLt %zu\n", prop.name, prop.multiProcessorCount, cublasLtGetVersion());
  CHECK_LT(cublasLtCreate(&handle));
  const Lane main = new_lane(), side = new_lane();
  // X r x r is the R·R form of the Gram iteration's products (R symmetric).
  const int64_t shapes[][2] = {{2048, 8192}, {1024, 4096}, {768, 3072}, {2048, 2048}, {1024, 1024}, {768, 768}};
  for (const auto& shape : shapes) probe(shape[0], shape[1], main, side);
  return 0;
}
