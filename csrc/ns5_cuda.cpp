// CUDA kernel of muonkern::ns5: picks the fused one-launch kernel for small matrices, the general
// path (normalize kernel, three cuBLASLt batched GEMMs per step with the polynomial in alpha/beta,
// finish kernel) or the Gram iteration on the same pieces, replays calls from CUDA
// graphs (ns5_graphs.h), and turns torch tensors into the torch-free launch structs of kernels/.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>

#include "cublaslt_gemm.h"
#include "kernels/ns5_kernels.h"
#include "kernel_dtype.h"
#include "ns5_common.h"
#include "ns5_graphs.h"
#include "ns5_route.h"

namespace muonkern {
namespace {

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

// p.out stays null for the multi-launch paths: their ResultLaunch gets the output later.
Ns5Problem describe(const at::Tensor& G, void* out, int64_t steps, double eps) {
  Ns5Problem p{};
  p.in.data = G.data_ptr();
  p.in.dtype = to_kernel_dtype(G.scalar_type(), "ns5");
  TORCH_INTERNAL_ASSERT(describe_batch(G, p.in));
  p.in.row_stride = G.stride(-2);
  p.in.col_stride = G.stride(-1);
  p.out = out;
  p.m = G.size(-2);
  p.n = G.size(-1);
  p.batch = G.numel() / (p.m * p.n);
  p.eps = static_cast<float>(eps);
  p.steps = static_cast<int>(steps);
  return p;
}

// The products of the general path and the Gram iteration. Row-major X (R x C) is column-major
// X^T, so in cuBLAS terms (Xc = X^T, ld C):
//   gram   X X^T = Xc^T Xc       (T, N; R x R x C)
//   square M N of R x R matrices (N, N; R x R x R; symmetric and commuting in both uses, so the
//          orientation does not matter)
//   apply  M X   -> Xc M         (N, N; C x R x R; M symmetric)
// and the Gram iteration's last product Q X0 written straight into the output, in its dtype:
//   result          as apply, D of the output's type          (wide: out is X's layout)
//   result, tall    out = (Q X)^T, column-major R x C: Q Xc^T  (N, T; R x C x R)
struct Ns5Products {
  GemmShape gram, square, apply;
  Ns5Products(int64_t R, int64_t C, int64_t batch, int64_t device)
      : gram{CUBLAS_OP_T, CUBLAS_OP_N, R, R, C, C, C, R, R * C, R * C, R * R, batch, device},
        square{CUBLAS_OP_N, CUBLAS_OP_N, R, R, R, R, R, R, R * R, R * R, R * R, batch, device},
        apply{CUBLAS_OP_N, CUBLAS_OP_N, C, R, R, C, R, C, R * C, R * R, R * C, batch, device} {}
  // M X for two X of one matrix each in one launch (batch 1): X and C at in[0] and in[0] + in_stride,
  // D at out[0] and out[0] + out_stride; M repeated (stride 0)
  GemmShape square_pair(int64_t in_stride, int64_t out_stride) const {
    GemmShape s = square;
    s.stride_a = 0;
    s.stride_b = s.stride_c = in_stride;
    s.stride_d = out_stride;
    s.batch = 2;
    return s;
  }
  GemmShape result(bool transposed, cudaDataType out_type) const {
    const int64_t R = square.m, C = apply.m;
    GemmShape s = transposed ? GemmShape{CUBLAS_OP_N, CUBLAS_OP_T, R, C, R, R, C, R, R * R, R * C, R * C, apply.batch,
                                         apply.device}
                             : apply;
    s.out_type = out_type;
    return s;
  }
};

// The cuBLASLt type of the output where the Gram iteration's last product can write it (bf16 or
// fp32 outputs of cuBLASLt's bf16 GEMMs), nullopt otherwise (fp16 and fp64 outputs go through the
// finish kernel).
std::optional<cudaDataType> direct_result_type(const Ns5Problem& p, at::ScalarType out) {
  if (p.steps == 0) return std::nullopt;
  if (out == at::kBFloat16) return CUDA_R_16BF;
  if (out == at::kFloat) return CUDA_R_32F;
  return std::nullopt;
}

// The Gram iteration's large-call options (read at every call; graph_signature keys on all three;
// timings in bench/NOTES.md): MUONKERN_NS5_SPLIT_GRAM=N and MUONKERN_NS5_BLOCK_SQUARE=N, the smallest
// short side whose X X^T and whose B = c R R + b R run in blocks (BlockedProducts; default 2048 each;
// 0 never), and MUONKERN_NS5_DEFER_SCALE (Ns5Workspace; on unless 0: 1.3% at 2048x8192 on an H100,
// alternated 3 times, no change elsewhere).
bool defer_scale_enabled() { return env_int("MUONKERN_NS5_DEFER_SCALE", 1) != 0; }
int split_gram_min_short_side() { return static_cast<int>(env_int("MUONKERN_NS5_SPLIT_GRAM", 2048)); }
int block_square_min_short_side() { return static_cast<int>(env_int("MUONKERN_NS5_BLOCK_SQUARE", 2048)); }

// bf16 working memory of both multi-launch paths: two R x C buffers X[0], X[1] (X[0] normalized from
// p's input here) and `square_buffers` R x R ones, each holding the whole batch. Where the caller
// allows it and the normalize kernel can, X[0] is left unscaled and `scale` points to the device
// floats {1/s^2, 1/s, 0} (ns5_kernels.h) that its first GEMMs apply; otherwise `scale` is null.
struct Ns5Workspace {
  at::Tensor memory;
  __nv_bfloat16* X[2];
  std::vector<__nv_bfloat16*> squares;
  const float* scale = nullptr;
};

// R x R buffers of each algorithm: A, B (general path); two Q, R, P R and B (Gram iteration, in this
// order: ns5_gram_iteration's paired products need R after either Q and P R after either Q).
constexpr int kGeneralSquareBuffers = 2;
constexpr int kGramSquareBuffers = 5;

int64_t workspace_elements(const Ns5Problem& p, int square_buffers) {
  const int64_t R = p.short_side(), C = p.long_side();
  return p.batch * (2 * R * C + square_buffers * R * R);
}

Ns5Workspace normalized_workspace(const Ns5Problem& p, const at::TensorOptions& device, int square_buffers,
                                  bool defer_scale, cudaStream_t stream) {
  const int64_t R = p.short_side(), C = p.long_side();
  const int64_t elements = workspace_elements(p, square_buffers);
  const int64_t scale_at = (elements + 7) / 8 * 8;  // 16-byte aligned, after the matrices; 8 bf16 hold the 3 floats
  defer_scale = defer_scale && defer_scale_enabled() && ns5_normalize_can_defer(p);
  Ns5Workspace w;
  w.memory = at::empty({defer_scale ? scale_at + 8 : elements}, device.dtype(at::kBFloat16));
  auto* base = reinterpret_cast<__nv_bfloat16*>(w.memory.data_ptr());
  w.X[0] = base;
  w.X[1] = base + p.batch * R * C;
  for (int i = 0; i < square_buffers; ++i) w.squares.push_back(base + p.batch * (2 * R * C + i * R * R));
  float* scale = defer_scale ? reinterpret_cast<float*>(base + scale_at) : nullptr;
  at::Tensor scratch = at::empty({ns5_normalize_scratch_floats(p)}, device.dtype(at::kFloat));
  C10_CUDA_CHECK(launch_ns5_normalize(p, w.X[0], scratch.data_ptr<float>(), scale, stream));
  w.scale = scale;
  return w;
}

// D = s A B (s a device float where `scale` is set, else 1).
void scaled_product(GemmShape shape, const float* scale, const float* zero, const __nv_bfloat16* A,
                    const __nv_bfloat16* B, void* D, cudaStream_t stream) {
  if (scale == nullptr) return gemm(shape, 1.f, A, B, 0.f, D, D, stream);
  shape.device_scalars = 1;
  gemm(shape, scale, A, B, zero, D, stream);
}

// The finish kernel as the result launch: `out` <- X, transposed back and cast.
ResultLaunch finish_launch(const Ns5Problem& p, const Ns5Workspace& w, const __nv_bfloat16* X) {
  return {w.memory, [p, X](const at::Tensor& out, cudaStream_t stream) {
            Ns5Problem q = p;
            q.out = out.data_ptr();
            C10_CUDA_CHECK(launch_ns5_finish(q, X, stream));
          }};
}

// The general path, per step (polynomial in alpha/beta):
//   A = X X^T (gram);  B = c A A + b A (square, C = A);  X' = B X + a X (apply, C = X).
// The last product is the result launch where the output is bf16 in the wide orientation (X's
// layout); otherwise the finish kernel is.
ResultLaunch ns5_general(const Ns5Problem& p, const std::vector<double>& abc, const at::TensorOptions& device,
                         at::ScalarType out_dtype, cudaStream_t stream) {
  Ns5Workspace w = normalized_workspace(p, device, kGeneralSquareBuffers, /*defer_scale=*/false, stream);
  const Ns5Products products(p.short_side(), p.long_side(), p.batch, device.device().index());
  __nv_bfloat16 *A = w.squares[0], *B = w.squares[1];
  const bool last_writes_out = !p.transpose() && out_dtype == at::kBFloat16;
  int cur = 0;
  for (int s = 0; s < p.steps; ++s) {
    const float a = static_cast<float>(abc[3 * s]), b = static_cast<float>(abc[3 * s + 1]),
                c = static_cast<float>(abc[3 * s + 2]);
    gemm(products.gram, 1.f, w.X[cur], w.X[cur], 0.f, A, A, stream);
    gemm(products.square, c, A, A, b, A, B, stream);
    if (last_writes_out && s + 1 == p.steps) {
      __nv_bfloat16* X = w.X[cur];
      return {w.memory, [apply = products.apply, X, B, a](const at::Tensor& out, cudaStream_t stream) {
                gemm(apply, 1.f, X, B, a, X, out.data_ptr(), stream);
              }};
    }
    gemm(products.apply, 1.f, w.X[cur], B, a, w.X[cur], w.X[1 - cur], stream);
    cur = 1 - cur;
  }
  return finish_launch(p, w, w.X[cur]);
}

// Symmetric products in blocks. The Gram iteration's X X^T and B = c R R + b R are symmetric: from a
// large enough short side each runs as the lower blocks of a 4 x 4 block grid, one cuBLASLt
// pointer-array batched GEMM (10 of the 16 h x h blocks, h = r / 4: 5/8 of the FLOPs), and a kernel
// mirrors the 6 blocks above the diagonal. X X^T from split_gram_min_short_side() (2048 unless set), B
// from block_square_min_short_side(); r a multiple of 128 (whole 32-row tiles per block for the mirror,
// 16-byte aligned block addresses). On an H100 (bench/cublaslt_xxt_probe.cu, GPU time): X X^T at
// 2048x8192 57.5 us against 83.0 for one GEMM and 70.7 for the two-GEMM split this replaced; R R at
// 2048^2 16.6 against 22.7. B in blocks from 768 made whole calls at 768x3072, 1024x4096 and
// 8x1024x4096 slower (the mirror and pointer kernels cost more than the blocks save there).
constexpr int kSymmetricBlocks = 4;

bool blocked_from(const Ns5Problem& p, int min_short_side) {
  const int64_t r = p.short_side();
  return p.steps > 0 && min_short_side > 0 && r >= min_short_side && r % 128 == 0 && p.batch < 65536;
}

// The pointer arrays of a call's blocked products, written by one kernel launch. Freed when the
// call's launches are enqueued: the caching allocator hands the memory out again only in stream order.
struct BlockedProducts {
  at::Tensor memory;
  int64_t count = 0;                                  // blocks per product: the batch's lower blocks
  int64_t h = 0;                                      // block side
  const void** gram[2] = {nullptr, nullptr};          // X[x] X[x]^T into R, per X buffer (a restart's reads X[1])
  const void** square[kGramSquareBuffers] = {};       // c R R + b R into w.squares[i]

  // `whole` (an X X^T-form product, T N) cut to the blocks of one pointer-array batch
  GemmShape lower(GemmShape whole) const {
    whole.m = whole.n = h;
    whole.stride_a = whole.stride_b = whole.stride_c = 0;
    whole.batch = count;
    whole.pointer_array = 1;
    return whole;
  }
};

// For the Gram iteration with R in w.squares[r_index]; `square_outputs` are the buffers B is written to.
BlockedProducts blocked_products(const Ns5Problem& p, const Ns5Workspace& w, int r_index,
                                 std::initializer_list<int> square_outputs, const at::TensorOptions& device,
                                 cudaStream_t stream) {
  BlockedProducts blocks;
  const bool gram = blocked_from(p, split_gram_min_short_side()), square = blocked_from(p, block_square_min_short_side());
  if (!gram && !square) return blocks;
  SymmetricBlockJobs jobs;
  jobs.nb = kSymmetricBlocks;
  jobs.batch = p.batch;
  jobs.r = p.short_side();
  blocks.h = jobs.r / jobs.nb;
  blocks.count = p.batch * jobs.nb * (jobs.nb + 1) / 2;
  const int64_t arrays = (gram ? 2 * 3 : 0) + (square ? 4 * static_cast<int64_t>(square_outputs.size()) : 0);
  blocks.memory = at::empty({arrays * blocks.count}, device.dtype(at::kLong));
  auto* next = reinterpret_cast<const void**>(blocks.memory.data_ptr());
  const auto add = [&](const __nv_bfloat16* X, int64_t K, const __nv_bfloat16* C, __nv_bfloat16* D) {
    const void** out = next;
    next += (C != nullptr ? 4 : 3) * blocks.count;
    jobs.job[jobs.count++] = SymmetricBlockJob{X, K, C, D, out};
    return out;
  };
  __nv_bfloat16* R = w.squares[r_index];
  if (gram)
    for (int x = 0; x < 2; ++x) blocks.gram[x] = add(w.X[x], p.long_side(), nullptr, R);
  if (square)
    for (const int i : square_outputs) blocks.square[i] = add(R, jobs.r, R, w.squares[i]);
  C10_CUDA_CHECK(launch_symmetric_block_pointers(jobs, stream));
  return blocks;
}

// R = s X[x] X[x]^T (s as in scaled_product), as one GEMM or blocked.
void gram_product(const Ns5Products& products, const BlockedProducts& blocks, const Ns5Workspace& w, int x,
                  const float* scale, const float* zero, __nv_bfloat16* R, cudaStream_t stream) {
  const void** arrays = blocks.gram[x];
  if (arrays == nullptr) return scaled_product(products.gram, scale, zero, w.X[x], w.X[x], R, stream);
  scaled_product(blocks.lower(products.gram), scale, zero, reinterpret_cast<const __nv_bfloat16*>(arrays),
                 reinterpret_cast<const __nv_bfloat16*>(arrays + blocks.count),
                 const_cast<void**>(arrays + 2 * blocks.count), stream);
  C10_CUDA_CHECK(launch_mirror_blocks(R, products.gram.batch, products.gram.m, blocks.h, stream));
}

// w.squares[out] = c R R + b R, as one GEMM or blocked (R R in X X^T form: R is symmetric).
void square_product(const Ns5Products& products, const BlockedProducts& blocks, const Ns5Workspace& w, int out,
                    float c, float b, const __nv_bfloat16* R, cudaStream_t stream) {
  __nv_bfloat16* D = w.squares[out];
  const void** arrays = blocks.square[out];
  if (arrays == nullptr) return gemm(products.square, c, R, R, b, R, D, stream);
  GemmShape whole = products.gram;
  whole.k = whole.lda = whole.ldb = products.square.k;
  gemm(blocks.lower(whole), c, reinterpret_cast<const __nv_bfloat16*>(arrays),
       reinterpret_cast<const __nv_bfloat16*>(arrays + blocks.count), b, arrays + 3 * blocks.count,
       const_cast<void**>(arrays + 2 * blocks.count), stream);
  C10_CUDA_CHECK(launch_mirror_blocks(D, products.square.batch, products.square.m, blocks.h, stream));
}

// The Gram iteration (ns5_gram.cpp states it; the same products):
//   R = X0 X0^T;  per step P = a I + b R + c R R,  Q = P Q (Q = P at a stretch's first step),
//   R = (P R) P;  at a restart X0 = Q X0, R = X0 X0^T;  out = Q X0.
// At a stretch's first step P is written whole straight into Q's buffer (its a I by the diagonal
// kernel). Later steps keep only B = b R + c R R and apply P through beta, P M = B M + a M: one launch
// fewer per step, and a I is added in fp32 before the product's one rounding instead of to a bf16 P.
// For one matrix, P Q and P R of such a step are one launch (square_pair), at every size: an R x R
// product alone can leave SMs idle (1024x4096's ran 128 tiles of 128x64 on 132 SMs; the pair took
// 9.8 us against 6.6 for one product, bench/NOTES.md).
// The last product writes `out` itself, transposed where needed, for bf16 and fp32 outputs: an fp32
// output is then the fp32 accumulator, not rounded to bf16 first (no finish kernel: at 2048x8192 it
// cost 45 us of 956). Unless MUONKERN_NS5_DEFER_SCALE=0, for one wide matrix X0 is bf16(G) unscaled
// (Ns5Workspace): the first Gram product applies 1/s^2 and the first product with X0 (restart or
// result) 1/s, as device-side alpha.
ResultLaunch ns5_gram_iteration(const Ns5Problem& p, const std::vector<double>& abc, const at::TensorOptions& device,
                                at::ScalarType out_dtype, cudaStream_t stream) {
  Ns5Workspace w = normalized_workspace(p, device, kGramSquareBuffers, /*defer_scale=*/p.steps > 0, stream);
  // X0's pending scales: w.scale (1/s^2) for its Gram product, x_scale (1/s) for Q X0, null once
  // applied (or none)
  const float* x_scale = w.scale != nullptr ? w.scale + 1 : nullptr;
  const float* zero = w.scale != nullptr ? w.scale + 2 : nullptr;
  const Ns5Products products(p.short_side(), p.long_side(), p.batch, device.device().index());
  // buffer indices in w.squares (kGramSquareBuffers): the two Q, R, P R and B
  constexpr int kQ0 = 0, kR = 2, kPR = 3, kB = 4;
  __nv_bfloat16* Qs[2] = {w.squares[kQ0], w.squares[kQ0 + 1]};
  __nv_bfloat16 *Rm = w.squares[kR], *PR = w.squares[kPR];
  const bool paired = p.batch == 1;
  const std::vector<int64_t> restarts = gram_restart_steps(p.steps);
  const std::optional<cudaDataType> result_type = direct_result_type(p, out_dtype);
  int cur = 0, q = 0;
  bool stretch_start = true;
  const BlockedProducts blocks = blocked_products(p, w, kR, {kQ0, kQ0 + 1, kB}, device, stream);
  if (p.steps > 0) gram_product(products, blocks, w, cur, w.scale, zero, Rm, stream);
  for (int s = 1; s <= p.steps; ++s) {
    const float a = static_cast<float>(abc[3 * (s - 1)]), b = static_cast<float>(abc[3 * (s - 1) + 1]),
                c = static_cast<float>(abc[3 * (s - 1) + 2]);
    // P = PB + shift I: PB is P itself at a stretch's first step, B later
    const int pb = stretch_start ? kQ0 + q : kB;
    __nv_bfloat16* PB = w.squares[pb];
    const float shift = stretch_start ? 0.f : a;
    square_product(products, blocks, w, pb, c, b, Rm, stream);
    const bool restart = std::find(restarts.begin(), restarts.end(), s) != restarts.end();
    const bool pair = paired && !stretch_start && s < p.steps && !restart;  // P Q and P R in one launch
    if (stretch_start) {
      C10_CUDA_CHECK(launch_add_diagonal(PB, p.batch, p.short_side(), a, stream));
    } else if (pair) {  // [Q', P R] = P [Q, R]
      gemm(products.square_pair(Rm - Qs[q], PR - Qs[1 - q]), 1.f, PB, Qs[q], shift, Qs[q], Qs[1 - q], stream);
      q = 1 - q;
    } else {
      gemm(products.square, 1.f, PB, Qs[q], shift, Qs[q], Qs[1 - q], stream);  // P Q
      q = 1 - q;
    }
    stretch_start = false;
    if (s == p.steps) break;
    if (restart) {
      scaled_product(products.apply, x_scale, zero, w.X[cur], Qs[q], w.X[1 - cur], stream);
      x_scale = nullptr;
      cur = 1 - cur;
      gram_product(products, blocks, w, cur, nullptr, nullptr, Rm, stream);
      stretch_start = true;
      continue;
    }
    if (!pair) gemm(products.square, 1.f, PB, Rm, shift, Rm, PR, stream);  // P R
    gemm(products.square, 1.f, PR, PB, shift, PR, Rm, stream);              // (P R) P
  }
  if (result_type) {
    // out = Q X0: wide, D = Xc Q as `apply`; tall, D = Q Xc^T (A and B swap roles)
    const bool tall = p.transpose();
    const __nv_bfloat16 *A = tall ? Qs[q] : w.X[cur], *B = tall ? w.X[cur] : Qs[q];
    return {w.memory, [shape = products.result(tall, *result_type), A, B, x_scale, zero](const at::Tensor& out,
                                                                                      cudaStream_t stream) {
              scaled_product(shape, x_scale, zero, A, B, out.data_ptr(), stream);
            }};
  }
  if (p.steps > 0) {
    scaled_product(products.apply, x_scale, zero, w.X[cur], Qs[q], w.X[1 - cur], stream);
    cur = 1 - cur;
  }
  return finish_launch(p, w, w.X[cur]);
}

// ---------------------------------------------------------------------------------------------
// Path choice (after the symmetric route below). MUONKERN_NS5_PATH=fused|general forces a path
// (fused only where it fits) and MUONKERN_NS5_CLUSTER=1|2|4|8 the fused path's cluster size;
// otherwise a cost model decides. The fused kernel runs one block per SM at a rate per SM, in waves
// of (matrices x cluster) / SMs, and pays for each reduction over the cluster; the general path pays
// a launch per kernel and runs its products near the chip's GEMM rate.
// Constants fitted to H100 timings (48x128x128, 12x64x768, 1x128x600, 132x64x512, 768x768).
constexpr double kFusedFlopsPerSm = 1.4e12;   // mma.sync from shared memory, one block per SM
constexpr double kClusterStepSeconds = 6e-6;  // per reduction over the cluster (fitted when it took two barriers)
constexpr double kGeneralGemmFlops = 5.0e14;  // cuBLASLt bf16 at sizes that leave the fused path
constexpr double kLaunchSeconds = 8.0e-6;     // per kernel of the general path, host overhead included

bool fused_fits(const Ns5Problem& p, int cluster, const cudaDeviceProp& prop, bool gram) {
  const size_t smem = ns5_fused_smem_bytes(p.m, p.n, cluster, gram);
  return smem > 0 && smem <= prop.sharedMemPerBlockOptin && p.steps <= kFusedMaxSteps;
}

// Cluster size for the fused path, 0 when the matrices do not fit on chip. A matrix is spread over
// more blocks while SMs would otherwise idle and each block keeps at least Rp columns (below that
// the redundant B = bA + cA^2 dominates: 48x128x128 ran 1.5x slower on 2 blocks than on 1), or
// while its slice does not fit one block.
int fused_cluster(const Ns5Problem& p, const cudaDeviceProp& prop, bool gram) {
  const int forced = static_cast<int>(env_int("MUONKERN_NS5_CLUSTER", 0));
  if (forced == 1 || forced == 2 || forced == 4 || forced == 8) return fused_fits(p, forced, prop, gram) ? forced : 0;
  const int64_t Rp = fused_extents(p.short_side(), p.long_side(), 1).Rp, C = p.long_side();
  int cluster = 1;
  while (cluster < kFusedMaxCluster && p.batch * cluster * 2 <= prop.multiProcessorCount && C / (2 * cluster) >= Rp)
    cluster *= 2;
  while (cluster <= kFusedMaxCluster && !fused_fits(p, cluster, prop, gram)) cluster *= 2;
  return cluster <= kFusedMaxCluster ? cluster : 0;
}

// Time on the fused kernel: a block's products (its Rp x C/S slice, the Rp x Rp ones whole) and the
// reductions over the cluster, every step for the standard iteration, at the start and each restart
// for the Gram one.
double fused_seconds(const Ns5Problem& p, int cluster, const cudaDeviceProp& prop, bool gram) {
  const double R = static_cast<double>(fused_extents(p.short_side(), p.long_side(), cluster).Rp),
               Cs = static_cast<double>(p.long_side()) / cluster;
  const double reductions = gram ? 1.0 + static_cast<double>(gram_restart_steps(p.steps).size()) : p.steps;
  const double per_block = ns5_flops_sides(R, Cs, p.steps, gram) / kFusedFlopsPerSm;
  const double waves = std::ceil(static_cast<double>(p.batch * cluster) / prop.multiProcessorCount);
  return waves * (per_block + (cluster > 1 ? reductions * kClusterStepSeconds : 0.0));
}

// Kernels of a general-path call: normalize and finish, then per step 3 GEMMs (standard) or up to 4
// launches (Gram, whose R, restarts and output add a few more).
double general_launches(const Ns5Problem& p, bool gram) { return gram ? 6 + 4 * p.steps : 3 * p.steps + 2; }

// The general path's GEMM time, at kGeneralGemmFlops.
double general_gemm_seconds(const Ns5Problem& p, bool gram) {
  return p.batch * ns5_flops(p.m, p.n, p.steps, gram) / kGeneralGemmFlops;
}

double general_seconds(const Ns5Problem& p, bool gram) {
  return general_launches(p, gram) * kLaunchSeconds + general_gemm_seconds(p, gram);
}

// MUONKERN_NS5_PATH (read at every call): fused, general, symmetric, small, or "auto" when unset.
std::string forced_path() {
  const char* forced = std::getenv("MUONKERN_NS5_PATH");
  return forced != nullptr && *forced != '\0' ? forced : "auto";
}

// Whether the wgmma kernel (kernels/ns5_wgmma.cu: the standard iteration, one block a matrix of at
// most 128 x 128) serves p: on an H100, 48x128x128 took 24.5 us a call against 32.4 for the mma.sync
// fused kernel (python bench/ns5_diagnostics.py wgmma; bench/NOTES.md). On by default
// (MUONKERN_NS5_WGMMA=0 turns it off); only on compute capability 9.0 with sm_90a code built, and a
// forced MUONKERN_NS5_CLUSTER keeps the mma.sync fused kernel (both read at every call, when the
// route is chosen).
bool wgmma_serves(const Ns5Problem& p, const cudaDeviceProp& prop) {
#if defined(MUONKERN_SM90A)
  return prop.major == 9 && prop.minor == 0 && env_int("MUONKERN_NS5_WGMMA", 1) != 0 &&
         env_int("MUONKERN_NS5_CLUSTER", 0) == 0 && ns5_wgmma_fits(p);
#else
  (void)p, (void)prop;
  return false;
#endif
}

// One algorithm's route: the fused kernel where it fits and the model puts it ahead of the general
// path (or MUONKERN_NS5_PATH=fused asks for it), else the general path.
Ns5Route algorithm_route(const Ns5Problem& p, bool gram, const std::string& path, const cudaDeviceProp& prop) {
  const Ns5Route general{"general", gram, 0};
  if (path == "general") return general;
  const int cluster = fused_cluster(p, prop, gram);
  if (cluster == 0) return general;
  if (path == "fused" || fused_seconds(p, cluster, prop, gram) <= general_seconds(p, gram)) return {"fused", gram, cluster};
  return general;
}

// "auto" picks an algorithm, then routes it as that algorithm would be routed, so that ns5(G) equals
// ns5(G, algorithm=<its pick>). The pick is ns5_use_gram's FLOP rule, except where both algorithms
// would run on the fused kernel: there the Gram iteration wherever the model says it is no slower,
// whatever the short side, since it saves reductions over the cluster as well as FLOPs. It measured
// 0.79-0.92 of the standard iteration's time on 12 non-square shapes from 64x32x128 to 16x96x768,
// 1.10 on 48x128x128 and 1.09 on 48x96x128, which the model leaves standard (H200,
// bench/ns5_fused_algorithms.py; bench/NOTES.md). On the general path small short sides lose with
// it (many small products), hence the rule there.
// `rule_gram`: ns5_use_gram's answer for this call (the named algorithm unless "auto").
Ns5Route choose_mma_route(const Ns5Problem& p, std::string_view algorithm, bool rule_gram, const std::string& path,
                          const cudaDeviceProp& prop) {
  const Ns5Route by_rule = algorithm_route(p, rule_gram, path, prop);
  if (algorithm != "auto" || by_rule.gram || by_rule.cluster == 0 || p.m == p.n || p.steps == 0 || p.batch == 0)
    return by_rule;
  const Ns5Route gram = algorithm_route(p, true, path, prop);
  if (gram.cluster > 0 &&
      fused_seconds(p, gram.cluster, prop, true) <= fused_seconds(p, by_rule.cluster, prop, false))
    return gram;
  return by_rule;
}

// The route above, whose fused standard iteration runs on the wgmma kernel (one block a matrix) where
// that serves it. Where the model picks the fused Gram iteration it stays: 48x64x128, 64x32x128 and
// 8x128x64 ran 18.8, 13.6 and 19.7 us there against 20.0, 19.7 and 22.1 on wgmma (H100, a one-off
// loop; python bench/ns5_diagnostics.py wgmma now prints the same comparison).
Ns5Route choose_route(const Ns5Problem& p, std::string_view algorithm, bool rule_gram, const std::string& path,
                      const cudaDeviceProp& prop) {
  const Ns5Route route = choose_mma_route(p, algorithm, rule_gram, path, prop);
  if (route.path == "fused" && !route.gram && wgmma_serves(p, prop)) return {"fused", false, 1, true};
  return route;
}

// ---------------------------------------------------------------------------------------------
// Large matrices on Hopper: the Triton symmetric-product iteration (muonkern/ops/triton_symmetric.py,
// registered from Python as muonkern::ns5_symmetric where triton is installed) computes X X^T and
// b A + c A A on one triangle of tiles, 3m^2n + m^3 FLOPs per step instead of 4m^2n + 2m^3. H100,
// bench/test_bench_ns5.py (triton-sym rows; the cuBLAS path's with MUONKERN_NS5_PATH=general): 4096^2
// 2.68 ms against 3.32 (cuBLAS path), 8192^2 18.8 against 24.9;
// a short side of 2048 (2048x8192) ties and 1024 loses, where the triangle has too few large tiles.
// MUONKERN_NS5_PATH=symmetric takes it at any size (tests), fused|general never; for a call that
// runs the Gram algorithm it takes muonkern::ns5_gram_symmetric (muonkern/ops/triton_gram.py: the Gram
// iteration with every symmetric product on a stream-K Triton kernel). MUONKERN_NS5_PATH=small hands
// standard calls with a short side of at most 128 to muonkern::ns5_small (muonkern/ops/triton_small.py:
// one Triton program per matrix, wgmma on Hopper). "auto" takes neither: on an H100 both are slower
// than the paths it takes (README, bench/test_bench_ns5.py rows triton-gram and triton-small).
constexpr int64_t kSymmetricMinShortSide = 4096;
constexpr int64_t kSmallMaxShortSide = 128;   // muonkern/ops/triton_small.py MAX_SHORT_SIDE

// The Python-registered Triton op that serves a call on non-empty matrices with this short side, if any.
std::optional<c10::OperatorHandle> triton_route(int64_t short_side, const std::string& path, const cudaDeviceProp& prop,
                                                bool gram) {
  const char* name = nullptr;
  if (path == "symmetric")
    name = gram ? "muonkern::ns5_gram_symmetric" : "muonkern::ns5_symmetric";
  else if (path == "small" && !gram && short_side <= kSmallMaxShortSide)
    name = "muonkern::ns5_small";
  else if (path == "auto" && !gram && prop.major == 9 && short_side >= kSymmetricMinShortSide)
    name = "muonkern::ns5_symmetric";
  if (name == nullptr) return std::nullopt;
  // looked up per call: Python registers the ops when muonkern is imported, after this library loads
  auto op = c10::Dispatcher::singleton().findOp({name, ""});
  if (!op.has_value() || !op->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) return std::nullopt;
  return op;
}

// G as the launches read it: itself, or a contiguous copy where more than kMaxBatchDims of its batch
// dims cannot be merged.
at::Tensor launch_layout(const at::Tensor& G) {
  StridedMatrices probe{};
  return describe_batch(G, probe) ? G : G.contiguous();
}

// The launches of a general-path or Gram call up to its output (ns5_graphs.h).
ResultLaunch ns5_body(const at::Tensor& G_in, int64_t steps, const std::vector<double>& abc, double eps, bool gram) {
  const at::Tensor G = launch_layout(G_in);
  const Ns5Problem p = describe(G, nullptr, steps, eps);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  return gram ? ns5_gram_iteration(p, abc, G.options(), G.scalar_type(), stream)
              : ns5_general(p, abc, G.options(), G.scalar_type(), stream);
}

at::Tensor ns5_fused(const at::Tensor& G_in, int64_t steps, const std::vector<double>& abc, double eps,
                     const Ns5Route& route) {
  at::Tensor out = at::empty_like(G_in, {}, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const at::Tensor G = launch_layout(G_in);
  const Ns5Problem p = describe(G, out.data_ptr(), steps, eps);
  std::vector<float> abc32(abc.begin(), abc.end());
  TORCH_INTERNAL_ASSERT(steps <= kFusedMaxSteps, "ns5: the fused kernel takes at most ", kFusedMaxSteps,
                        " steps, got ", steps);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (route.wgmma) {
    C10_CUDA_CHECK(launch_ns5_wgmma(p, abc32.data(), stream));
    return out;
  }
  const FusedGram algorithm{route.gram, route.gram ? gram_restart_mask(steps) : 0u};
  C10_CUDA_CHECK(launch_ns5_fused(p, abc32.data(), algorithm, route.cluster, stream));
  return out;
}

// ---------------------------------------------------------------------------------------------
// CUDA graphs (ns5_graphs.cpp) for the multi-launch paths: where the host's launches take at least
// half as long as the GPU's work, the direct call waits on the host (768x768: 0.0816 against 0.1610
// ms, README's Benchmarks); elsewhere the GPU still starts a graph's kernels closer together
// (2048x8192 and 8x1024x4096: 1-2% on an H100, README's Backends), and those graphs count their workspace against a memory budget. The fused path is
// a single launch already.
bool launch_bound(const Ns5Problem& shape, bool gram) {
  return general_launches(shape, gram) * kLaunchSeconds >= 0.5 * general_gemm_seconds(shape, gram);
}

// Bytes a graph of a call that is not launch-bound counts against the budget (ns5_graph_replay): its
// bf16 workspace (a buffer for G only where some G has to be copied).
int64_t graph_budgeted_bytes(const Ns5Problem& shape, bool gram) {
  if (launch_bound(shape, gram)) return 0;
  return 2 * workspace_elements(shape, gram ? kGramSquareBuffers : kGeneralSquareBuffers);
}

// Everything that fixes the launches of a call.
std::string graph_signature(const at::Tensor& G, bool gram, const std::vector<double>& abc, double eps) {
  std::string s = gram ? "gram" : "general";
  const auto append = [&s](const void* bytes, size_t n) { s.append(static_cast<const char*>(bytes), n); };
  const int8_t dtype = static_cast<int8_t>(G.scalar_type());
  append(&dtype, sizeof(dtype));
  append(&eps, sizeof(eps));
  for (const int64_t size : G.sizes()) append(&size, sizeof(size));
  s += '|';
  for (const int64_t stride : G.strides()) append(&stride, sizeof(stride));
  s += '|';
  append(abc.data(), abc.size() * sizeof(double));  // the step count is abc.size() / 3
  // the Gram iteration's large-call options change its launches
  s += "|defer" + std::to_string(defer_scale_enabled()) + "|split" + std::to_string(split_gram_min_short_side()) +
       "|square" + std::to_string(block_square_min_short_side());
  return s;
}

// Sizes only: what the path choice reads.
Ns5Problem problem_sizes(int64_t batch, int64_t m, int64_t n, int64_t steps) {
  Ns5Problem shape{};
  shape.m = m;
  shape.n = n;
  shape.batch = batch;
  shape.steps = static_cast<int>(steps);
  return shape;
}

// A call's route, with the Triton op that serves it where one does.
struct CallRoute {
  Ns5Route route;
  std::optional<c10::OperatorHandle> triton;
};

CallRoute call_route(const Ns5Problem& shape, std::string_view algorithm) {
  const std::string path = forced_path();
  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  const bool rule_gram = ns5_use_gram(algorithm, shape.m, shape.n, shape.steps);
  if (shape.batch > 0 && shape.m > 0 && shape.n > 0) {
    if (auto op = triton_route(std::min(shape.m, shape.n), path, prop, rule_gram))
      return {{op->operator_name().name, rule_gram, 0}, op};
  }
  return {choose_route(shape, algorithm, rule_gram, path, prop), std::nullopt};
}

at::Tensor ns5_cuda(const at::Tensor& G_in, int64_t steps, std::optional<at::ArrayRef<double>> coefficients,
                    double eps, c10::string_view algorithm) {
  check_ns5_args(G_in, steps, coefficients, eps, algorithm);
  const c10::cuda::CUDAGuard guard(G_in.device());
  const std::vector<double> abc = ns5_step_coefficients(steps, coefficients);
  const Ns5Problem shape = problem_sizes(ns5_batch(G_in), G_in.size(-2), G_in.size(-1), steps);
  const CallRoute call = call_route(shape, algorithm);
  if (call.triton)
    return call.triton->typed<at::Tensor(const at::Tensor&, int64_t, std::optional<at::ArrayRef<double>>, double)>()
        .call(G_in, steps, coefficients, eps);
  const Ns5Route& route = call.route;
  const bool gram = route.gram;
  if (route.cluster > 0) return ns5_fused(G_in, steps, abc, eps, route);
  const auto body = [&](const at::Tensor& G) { return ns5_body(G, steps, abc, eps, gram); };
  if (G_in.numel() > 0 && ns5_graph_wanted()) {
    if (auto out = ns5_graph_replay(G_in, graph_signature(G_in, gram, abc, eps), body, graph_budgeted_bytes(shape, gram)))
      return *out;
  }
  at::Tensor out = at::empty_like(G_in, {}, at::MemoryFormat::Contiguous);
  if (out.numel() > 0) body(G_in).run(out, at::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace

Ns5Route ns5_cuda_route(int64_t batch, int64_t m, int64_t n, int64_t steps, std::string_view algorithm) {
  TORCH_CHECK_VALUE(batch >= 0 && m >= 0 && n >= 0, "ns5_cuda_route: sizes must be >= 0");
  TORCH_CHECK_VALUE(steps >= 0 && steps <= INT32_MAX, "ns5_cuda_route: steps must be in [0, 2^31), got ",
                    steps);
  check_ns5_algorithm(algorithm);
  return call_route(problem_sizes(batch, m, n, steps), algorithm).route;
}

TORCH_LIBRARY_IMPL(muonkern, CUDA, m) { m.impl("ns5", &ns5_cuda); }

}  // namespace muonkern
