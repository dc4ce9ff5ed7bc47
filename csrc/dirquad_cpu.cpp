// CPU kernel of muonkern::dirquad. Every tensor is cut into fixed chunks; each (direction, chunk)
// item sums its dot products in float64, and the chunk sums are added in chunk order, so the result
// does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "dirquad.h"

namespace muonkern {
namespace {

constexpr int64_t kChunk = 1 << 15;

template <typename T>
void chunk_dots(const T* u, const std::vector<const T*>& others, int64_t begin, int64_t end, double* sums) {
  for (size_t c = 0; c < others.size(); ++c) {
    const T* o = others[c];
    double acc = 0.0;
    for (int64_t i = begin; i < end; ++i) acc += static_cast<double>(u[i]) * static_cast<double>(o[i]);
    sums[c] = acc;
  }
}

at::Tensor dirquad_cpu(at::TensorList grads, at::TensorList directions, at::TensorList products) {
  const auto [K, R, P] = dirquad_sizes(grads, directions, products);
  const int64_t cols = 2 + R;
  auto contiguous = [](at::TensorList ts) {
    std::vector<at::Tensor> out;
    out.reserve(ts.size());
    for (const auto& t : ts) out.push_back(t.contiguous());
    return out;
  };
  const std::vector<at::Tensor> g = contiguous(grads), u = contiguous(directions), h = contiguous(products);

  // chunk_offset[p] .. chunk_offset[p+1]: the chunks of parameter p.
  std::vector<int64_t> chunk_offset(P + 1, 0), chunk_param;
  for (int64_t p = 0; p < P; ++p) {
    const int64_t n = (g[p].numel() + kChunk - 1) / kChunk;
    chunk_offset[p + 1] = chunk_offset[p] + n;
    for (int64_t c = 0; c < n; ++c) chunk_param.push_back(p);
  }
  const int64_t C = chunk_offset[P];
  std::vector<double> partial(static_cast<size_t>(K * C * cols), 0.0);

  at::parallel_for(0, K * C, 1, [&](int64_t first, int64_t last) {
    for (int64_t item = first; item < last; ++item) {
      const int64_t k = item / C, c = item % C, p = chunk_param[c];
      const int64_t begin = (c - chunk_offset[p]) * kChunk;
      const int64_t end = std::min(begin + kChunk, g[p].numel());
      const at::Tensor& uk = u[k * P + p];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, uk.scalar_type(), "dirquad_cpu", [&] {
        std::vector<const scalar_t*> others{g[p].const_data_ptr<scalar_t>(), uk.const_data_ptr<scalar_t>()};
        for (int64_t r = 0; r < R; ++r) others.push_back(h[(k * R + r) * P + p].const_data_ptr<scalar_t>());
        chunk_dots(uk.const_data_ptr<scalar_t>(), others, begin, end, &partial[item * cols]);
      });
    }
  });

  at::Tensor out = at::zeros({K, cols, P}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t k = 0; k < K; ++k)
    for (int64_t p = 0; p < P; ++p)
      for (int64_t c = chunk_offset[p]; c < chunk_offset[p + 1]; ++c)
        for (int64_t col = 0; col < cols; ++col) o[(k * cols + col) * P + p] += partial[(k * C + c) * cols + col];
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(muonkern, CPU, m) { m.impl("dirquad", &dirquad_cpu); }

}  // namespace muonkern
