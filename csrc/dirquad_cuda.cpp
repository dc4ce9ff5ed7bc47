// CUDA kernel of muonkern::dirquad: packs pointers, sizes and the chunk table of every tensor into
// one int64 table (one host-to-device copy from pinned memory) and launches kernels/dirquad.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "dirquad.h"
#include "kernels/dirquad_kernels.h"

namespace muonkern {
namespace {

at::Tensor dirquad_cuda(at::TensorList grads, at::TensorList directions, at::TensorList products) {
  const auto [K, R, P] = dirquad_sizes(grads, directions, products);
  const int64_t cols = 2 + R;
  TORCH_CHECK_VALUE(K <= 65535, "dirquad: at most 65535 directions per call on CUDA, got " + std::to_string(K));
  const c10::cuda::CUDAGuard guard(grads[0].device());

  // Contiguous views (copies only where needed), alive until the kernels are enqueued; the caching
  // allocator keeps a freed copy's memory from being reused before the stream reaches it.
  std::vector<at::Tensor> keep;
  keep.reserve(grads.size() + directions.size() + products.size());
  std::vector<int64_t> table;
  auto add_pointers = [&](at::TensorList ts) {
    for (const auto& t : ts) {
      keep.push_back(t.contiguous());
      table.push_back(reinterpret_cast<int64_t>(keep.back().const_data_ptr()));
    }
  };
  add_pointers(grads);
  add_pointers(directions);
  add_pointers(products);
  const int64_t numel_at = static_cast<int64_t>(table.size());
  for (const auto& g : grads) table.push_back(g.numel());
  const int64_t dtype_at = static_cast<int64_t>(table.size());
  for (const auto& g : grads) table.push_back(static_cast<int64_t>(to_kernel_dtype(g.scalar_type(), "dirquad")));
  const int64_t offset_at = static_cast<int64_t>(table.size());
  table.push_back(0);
  for (int64_t p = 0; p < P; ++p)
    table.push_back(table.back() + (grads[p].numel() + kDirquadChunk - 1) / kDirquadChunk);
  const int64_t chunks = table.back();
  const int64_t param_at = static_cast<int64_t>(table.size());
  for (int64_t p = 0; p < P; ++p)
    for (int64_t c = table[offset_at + p]; c < table[offset_at + p + 1]; ++c) table.push_back(p);

  at::Tensor host = at::empty({static_cast<int64_t>(table.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(table.begin(), table.end(), host.data_ptr<int64_t>());
  const at::Tensor device_table = host.to(grads[0].device(), /*non_blocking=*/true);
  const int64_t* d = device_table.const_data_ptr<int64_t>();

  const auto f64 = grads[0].options().dtype(at::kDouble);
  at::Tensor partial = at::empty({K * chunks, cols}, f64);
  at::Tensor out = at::empty({K, cols, P}, f64);

  DirquadProblem pb;
  pb.grad_ptrs = d;
  pb.direction_ptrs = d + P;
  pb.product_ptrs = d + P + K * P;
  pb.numel = d + numel_at;
  pb.dtype = d + dtype_at;
  pb.chunk_offset = d + offset_at;
  pb.chunk_param = d + param_at;
  pb.K = K;
  pb.R = R;
  pb.P = P;
  pb.chunks = chunks;
  pb.partial = partial.data_ptr<double>();
  pb.out = out.data_ptr<double>();
  C10_CUDA_CHECK(launch_dirquad(pb, at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(muonkern, CUDA, m) { m.impl("dirquad", &dirquad_cuda); }

}  // namespace muonkern
