// CUDA kernel of muonkern::ns5: picks the fused one-launch kernel for small matrices or the general
// path (normalize kernel, three cuBLASLt batched GEMMs per step with the polynomial in alpha/beta,
// finish kernel), and turns torch tensors into the torch-free launch structs of kernels/.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>

#include "kernels/ns5_kernels.h"
#include "kernel_dtype.h"
#include "ns5_common.h"
#include "ns5_gram.h"

namespace muonkern {
namespace {

#define MUONKERN_CUBLAS_CHECK(expr)                                                                  \
  do {                                                                                              \
    const cublasStatus_t _status = (expr);                                                          \
    TORCH_CHECK(_status == CUBLAS_STATUS_SUCCESS,                                                  \
                std::string("ns5: " #expr " failed with cuBLAS status ") + std::to_string(_status));  \
  } while (0)

// Leading dims, merged where their strides allow, so most inputs fit kMaxBatchDims without a copy.
bool describe_batch(const at::Tensor& G, StridedMatrices& s) {
  s.batch_dims = 0;
  for (int64_t d = 0; d < G.dim() - 2; ++d) {
    const int64_t size = G.size(d), stride = G.stride(d);
    if (size == 1) continue;
    if (s.batch_dims > 0 && s.batch_strides[s.batch_dims - 1] == stride * size) {
      s.batch_sizes[s.batch_dims - 1] *= size;
      s.batch_strides[s.batch_dims - 1] = stride;
      continue;
    }
    if (s.batch_dims == kMaxBatchDims) return false;
    s.batch_sizes[s.batch_dims] = size;
    s.batch_strides[s.batch_dims] = stride;
    ++s.batch_dims;
  }
  return true;
}

Ns5Problem describe(const at::Tensor& G, const at::Tensor& out, int64_t steps, double eps) {
  Ns5Problem p{};
  p.in.data = G.data_ptr();
  p.in.dtype = to_kernel_dtype(G.scalar_type(), "ns5");
  TORCH_INTERNAL_ASSERT(describe_batch(G, p.in));
  p.in.row_stride = G.stride(-2);
  p.in.col_stride = G.stride(-1);
  p.out = out.data_ptr();
  p.m = G.size(-2);
  p.n = G.size(-1);
  p.batch = G.numel() / (p.m * p.n);
  p.eps = static_cast<float>(eps);
  p.steps = static_cast<int>(steps);
  return p;
}

// ---------------------------------------------------------------------------------------------
// cuBLASLt: D = alpha * op(A) op(B) + beta * C, column-major, bf16 operands, fp32 accumulation,
// strided batches. C and D are separate buffers, which is what lets the NS polynomial ride in beta.
// All fields int64 so the struct has no padding and compares/hashes bytewise.
struct GemmShape {
  int64_t ta, tb;  // cublasOperation_t
  int64_t m, n, k, lda, ldb, ldc, stride_a, stride_b, stride_c;
  int64_t batch, device;
  bool operator==(const GemmShape& o) const { return std::memcmp(this, &o, sizeof(GemmShape)) == 0; }
};
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
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

cublasLtMatrixLayout_t make_layout(int64_t rows, int64_t cols, int64_t ld, int64_t stride, int batch) {
  cublasLtMatrixLayout_t layout;
  MUONKERN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, CUDA_R_16BF, rows, cols, ld));
  MUONKERN_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
  MUONKERN_CUBLAS_CHECK(
      cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
  return layout;
}

// A product with few output tiles and a long K (the Gram matrix X X^T of a wide X) leaves most
// SMs idle; splitting K among them fills the chip. The heuristic rarely does this on its own.
cublasLtMatmulAlgo_t with_split_k(cublasLtHandle_t handle, const GemmPlan& plan, cublasLtMatmulAlgo_t algo,
                                  const GemmShape& s, size_t workspace) {
  const char* disabled = std::getenv("MUONKERN_NS5_SPLITK");
  if (disabled != nullptr && std::strcmp(disabled, "0") == 0) return algo;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t tiles = ((s.m + 127) / 128) * ((s.n + 127) / 128) * s.batch;  // typical 128x128 tiles
  const int64_t splits = std::min<int64_t>(sms / std::max<int64_t>(tiles, 1), s.k / 512);
  int supported = 0;
  size_t written = 0;
  if (splits < 2 || cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &supported,
                                                      sizeof(supported), &written) != CUBLAS_STATUS_SUCCESS ||
      !supported)
    return algo;
  cublasLtMatmulAlgo_t split = algo;
  const int32_t num = static_cast<int32_t>(splits);
  const uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  cublasLtMatmulHeuristicResult_t check{};
  if (cublasLtMatmulAlgoConfigSetAttribute(&split, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &num, sizeof(num)) ==
          CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulAlgoConfigSetAttribute(&split, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof(scheme)) ==
          CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulAlgoCheck(handle, plan.desc, plan.a, plan.b, plan.c, plan.c, &split, &check) ==
          CUBLAS_STATUS_SUCCESS &&
      check.workspaceSize <= workspace)
    return split;
  return algo;
}

// Plans (descriptors + heuristic algorithm) are cached per shape: building one costs more than a
// small GEMM. They are never freed; a process sees few distinct shapes.
const GemmPlan& gemm_plan(const GemmShape& s, cublasLtHandle_t handle, size_t workspace) {
  static std::mutex mutex;
  static std::unordered_map<GemmShape, GemmPlan, GemmShapeHash> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(s);
  if (it != plans.end()) return it->second;
  GemmPlan plan;
  MUONKERN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const auto ta = static_cast<cublasOperation_t>(s.ta), tb = static_cast<cublasOperation_t>(s.tb);
  MUONKERN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  MUONKERN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  const bool na = ta == CUBLAS_OP_N, nb = tb == CUBLAS_OP_N;
  const int batch = static_cast<int>(s.batch);
  plan.a = make_layout(na ? s.m : s.k, na ? s.k : s.m, s.lda, s.stride_a, batch);
  plan.b = make_layout(nb ? s.k : s.n, nb ? s.n : s.k, s.ldb, s.stride_b, batch);
  plan.c = make_layout(s.m, s.n, s.ldc, s.stride_c, batch);
  cublasLtMatmulPreference_t pref;
  MUONKERN_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  MUONKERN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                             &workspace, sizeof(workspace)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  MUONKERN_CUBLAS_CHECK(
      cublasLtMatmulAlgoGetHeuristic(handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref, 1, &result, &found));
  cublasLtMatmulPreferenceDestroy(pref);
  TORCH_CHECK(found > 0, "ns5: cuBLASLt found no algorithm for a " + std::to_string(s.m) + "x" + std::to_string(s.n) +
                            "x" + std::to_string(s.k) + " bf16 GEMM");
  plan.algo = with_split_k(handle, plan, result.algo, s, workspace);
  return plans.emplace(s, plan).first->second;
}

void gemm(const GemmShape& s, float alpha, const __nv_bfloat16* A, const __nv_bfloat16* B, float beta,
          const __nv_bfloat16* C, __nv_bfloat16* D, cudaStream_t stream) {
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  const GemmPlan& plan = gemm_plan(s, handle, workspace_size);
  MUONKERN_CUBLAS_CHECK(cublasLtMatmul(handle, plan.desc, &alpha, A, plan.a, B, plan.b, &beta, C, plan.c, D, plan.c,
                                       &plan.algo, at::cuda::getCUDABlasLtWorkspace(), workspace_size, stream));
}

// The general path. Row-major X (R x C) is column-major X^T, so in cuBLAS terms (Xc = X^T, ld C):
//   A  = X X^T        = Xc^T Xc           (T, N; R x R x C)
//   B  = c A A + b A                       (N, N; R x R x R; C = A, beta = b)
//   X' = B X + a X    ->  Xc' = Xc B + a Xc (N, N; C x R x R; C = Xc, beta = a; B is symmetric)
void ns5_general(const Ns5Problem& p, const std::vector<double>& abc, at::Tensor& out, cudaStream_t stream) {
  const int64_t R = p.short_side(), C = p.long_side();
  const int64_t batch = p.batch, device = out.get_device();
  auto bf16_options = out.options().dtype(at::kBFloat16);
  at::Tensor work = at::empty({p.batch * (2 * R * C + 2 * R * R)}, bf16_options);
  at::Tensor scratch = at::empty({ns5_normalize_scratch_floats(p)}, out.options().dtype(at::kFloat));
  auto* base = reinterpret_cast<__nv_bfloat16*>(work.data_ptr());
  __nv_bfloat16* X[2] = {base, base + p.batch * R * C};
  __nv_bfloat16* A = base + 2 * p.batch * R * C;
  __nv_bfloat16* B = A + p.batch * R * R;
  C10_CUDA_CHECK(launch_ns5_normalize(p, X[0], scratch.data_ptr<float>(), stream));

  const GemmShape gram{CUBLAS_OP_T, CUBLAS_OP_N, R, R, C, C, C, R, R * C, R * C, R * R, batch, device};
  const GemmShape square{CUBLAS_OP_N, CUBLAS_OP_N, R, R, R, R, R, R, R * R, R * R, R * R, batch, device};
  const GemmShape update{CUBLAS_OP_N, CUBLAS_OP_N, C, R, R, C, R, C, R * C, R * R, R * C, batch, device};
  // bf16 results in the wide orientation need no finishing pass: the last product writes `out`.
  const bool write_out_directly = !p.transpose() && out.scalar_type() == at::kBFloat16 && p.steps > 0;
  int cur = 0;
  for (int s = 0; s < p.steps; ++s) {
    const float a = static_cast<float>(abc[3 * s]), b = static_cast<float>(abc[3 * s + 1]),
                c = static_cast<float>(abc[3 * s + 2]);
    gemm(gram, 1.f, X[cur], X[cur], 0.f, A, A, stream);
    gemm(square, c, A, A, b, A, B, stream);
    __nv_bfloat16* next = (write_out_directly && s + 1 == p.steps)
                              ? reinterpret_cast<__nv_bfloat16*>(out.data_ptr())
                              : X[1 - cur];
    gemm(update, 1.f, X[cur], B, a, X[cur], next, stream);
    cur = 1 - cur;
  }
  if (!write_out_directly) C10_CUDA_CHECK(launch_ns5_finish(p, X[cur], stream));
}

// ---------------------------------------------------------------------------------------------
// Path choice (after the symmetric route above). MUONKERN_NS5_PATH=fused|general forces a path
// (fused only where it fits) and
// MUONKERN_NS5_CLUSTER=1|2|4|8 the fused path's cluster size; otherwise a cost model decides. The
// fused kernel runs one block per SM at a rate per SM, in waves of (matrices x cluster) / SMs; the
// general path pays a launch per kernel and runs its products near the chip's GEMM rate.
// Constants fitted to H100 timings (48x128x128, 12x64x768, 1x128x600, 132x64x512, 768x768).
constexpr double kFusedFlopsPerSm = 1.4e12;   // mma.sync from shared memory, one block per SM
constexpr double kClusterStepSeconds = 6e-6;  // two cluster barriers + the DSMEM reduction, per step
constexpr double kGeneralGemmFlops = 5.0e14;  // cuBLASLt bf16 at sizes that leave the fused path
constexpr double kLaunchSeconds = 8.0e-6;     // per kernel of the general path, host overhead included

int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::atoi(value) : fallback;
}

bool fused_fits(const Ns5Problem& p, int cluster, const cudaDeviceProp& prop) {
  const size_t smem = ns5_fused_smem_bytes(p.m, p.n, cluster);
  return smem > 0 && smem <= prop.sharedMemPerBlockOptin && p.steps <= kFusedMaxSteps;
}

// Cluster size for the fused path, 0 when the matrices do not fit on chip. A matrix is spread over
// more blocks while SMs would otherwise idle and each block keeps at least Rp columns (below that
// the redundant B = bA + cA^2 dominates: 48x128x128 ran 1.5x slower on 2 blocks than on 1), or
// while its slice does not fit one block.
int fused_cluster(const Ns5Problem& p, const cudaDeviceProp& prop) {
  const int forced = env_int("MUONKERN_NS5_CLUSTER", 0);
  if (forced == 1 || forced == 2 || forced == 4 || forced == 8) return fused_fits(p, forced, prop) ? forced : 0;
  const int64_t Rp = (p.short_side() + 31) / 32 * 32, C = p.long_side();
  int cluster = 1;
  while (cluster < kFusedMaxCluster && p.batch * cluster * 2 <= prop.multiProcessorCount && C / (2 * cluster) >= Rp)
    cluster *= 2;
  while (cluster <= kFusedMaxCluster && !fused_fits(p, cluster, prop)) cluster *= 2;
  return cluster <= kFusedMaxCluster ? cluster : 0;
}

double fused_seconds(const Ns5Problem& p, int cluster, const cudaDeviceProp& prop) {
  const double R = static_cast<double>((p.short_side() + 31) / 32 * 32), Cs = static_cast<double>(p.long_side()) / cluster;
  const double per_block = p.steps * (4 * R * R * Cs + 2 * R * R * R) / kFusedFlopsPerSm;
  const double waves = std::ceil(static_cast<double>(p.batch * cluster) / prop.multiProcessorCount);
  return waves * (per_block + (cluster > 1 ? p.steps * kClusterStepSeconds : 0.0));
}

double general_seconds(const Ns5Problem& p) {
  const double R = static_cast<double>(p.short_side()), C = static_cast<double>(p.long_side());
  return (3 * p.steps + 2) * kLaunchSeconds + p.batch * p.steps * (4 * R * R * C + 2 * R * R * R) / kGeneralGemmFlops;
}

// ---------------------------------------------------------------------------------------------
// Large matrices on Hopper: the Triton symmetric-product iteration (muonkern/ops/triton_symmetric.py,
// registered from Python as muonkern::ns5_symmetric where triton is installed) computes X X^T and
// b A + c A A on one triangle of tiles, 3m^2n + m^3 FLOPs per step instead of 4m^2n + 2m^3. H100,
// bench/test_bench_ns5.py (triton-sym rows; the cuBLAS path's with MUONKERN_NS5_PATH=general): 4096^2
// 2.68 ms against 3.32 (cuBLAS path), 8192^2 18.8 against 24.9;
// a short side of 2048 (2048x8192) ties and 1024 loses, where the triangle has too few large tiles.
// MUONKERN_NS5_PATH=symmetric takes it at any size (tests), fused|general never.
constexpr int64_t kSymmetricMinShortSide = 4096;

std::optional<c10::OperatorHandle> symmetric_route(const at::Tensor& G, const std::string& path,
                                                   const cudaDeviceProp& prop) {
  const int64_t short_side = std::min(G.size(-2), G.size(-1));
  const bool wanted = path == "symmetric" || (path == "auto" && prop.major == 9 && short_side >= kSymmetricMinShortSide);
  if (!wanted || G.numel() == 0) return std::nullopt;
  // looked up per call: Python registers the op when muonkern is imported, after this library loads
  auto op = c10::Dispatcher::singleton().findOp({"muonkern::ns5_symmetric", ""});
  if (!op.has_value() || !op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) return std::nullopt;
  return op;
}

at::Tensor ns5_cuda(const at::Tensor& G_in, int64_t steps, std::optional<at::ArrayRef<double>> coefficients,
                    double eps, c10::string_view algorithm) {
  check_ns5_args(G_in, steps, coefficients, eps, algorithm);
  const c10::cuda::CUDAGuard guard(G_in.device());
  // The Gram algorithm runs as ATen ops (cuBLAS products) on the current stream: ns5_gram.cpp.
  if (ns5_use_gram(algorithm, G_in.size(-2), G_in.size(-1), steps, ns5_batch(G_in), true))
    return ns5_gram(G_in, ns5_step_coefficients(steps, coefficients), eps);
  const char* forced = std::getenv("MUONKERN_NS5_PATH");
  const std::string path = forced != nullptr ? forced : "auto";
  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  if (auto op = symmetric_route(G_in, path, prop))
    return op->typed<at::Tensor(const at::Tensor&, int64_t, std::optional<at::ArrayRef<double>>, double)>().call(
        G_in, steps, coefficients, eps);
  at::Tensor out = at::empty(G_in.sizes(), G_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  StridedMatrices probe{};
  const at::Tensor G = describe_batch(G_in, probe) ? G_in : G_in.contiguous();  // > 8 unmergeable batch dims
  const Ns5Problem p = describe(G, out, steps, eps);
  const std::vector<double> abc = ns5_step_coefficients(steps, coefficients);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int cluster = path == "general" ? 0 : fused_cluster(p, prop);
  if (cluster > 0 && (path == "fused" || fused_seconds(p, cluster, prop) <= general_seconds(p))) {
    std::vector<float> abc32(abc.begin(), abc.end());
    C10_CUDA_CHECK(launch_ns5_fused(p, abc32.data(), cluster, stream));
  } else {
    ns5_general(p, abc, out, stream);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(muonkern, CUDA, m) { m.impl("ns5", &ns5_cuda); }

}  // namespace muonkern
