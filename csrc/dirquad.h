// muonkern::dirquad: schema and argument rules shared by the CPU and CUDA kernels (the Python
// fallback applies the same rules with the same messages: muonkern/ops/dirquad_args.py).
//
// P = grads.size() parameter tensors; directions holds K directions of P tensors (direction k's
// tensor p at k*P + p); products holds R vectors per direction (vector r of direction k, tensor p at
// (k*R + r)*P + p). Output, float64 (K, 2 + R, P): out[k][0][p] = <g_p, u_kp>,
// out[k][1][p] = <u_kp, u_kp>, out[k][2 + r][p] = <u_kp, h_krp>.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "kernel_dtype.h"

namespace muonkern {

inline constexpr const char* kDirquadSchema =
    "dirquad(Tensor[] grads, Tensor[] directions, Tensor[] products) -> Tensor";

struct DirquadSizes {
  int64_t K, R, P;
};

inline DirquadSizes dirquad_sizes(at::TensorList grads, at::TensorList directions, at::TensorList products) {
  const int64_t P = static_cast<int64_t>(grads.size());
  TORCH_CHECK_VALUE(P > 0, "dirquad: grads is empty (expected one tensor per parameter)");
  const int64_t D = static_cast<int64_t>(directions.size());
  TORCH_CHECK_VALUE(D > 0 && D % P == 0, "dirquad: len(directions) must be a positive multiple of len(grads) = " +
                                             std::to_string(P) + " (K directions of " + std::to_string(P) +
                                             " tensors each), got " + std::to_string(D));
  const int64_t K = D / P;
  const int64_t J = static_cast<int64_t>(products.size());
  TORCH_CHECK_VALUE(J % (K * P) == 0, "dirquad: len(products) must be a multiple of K*len(grads) = " +
                                          std::to_string(K * P) + " (R products per direction), got " +
                                          std::to_string(J));
  const c10::Device device = grads[0].device();
  auto check_list = [&](const char* name, at::TensorList tensors) {
    for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
      const at::Tensor& t = tensors[i];
      const int64_t p = i % P;
      const at::Tensor& ref = grads[p];
      // names built only when a check fails (the message arguments are evaluated then)
      auto what = [&] { return std::string("dirquad: ") + name + "[" + std::to_string(i) + "]"; };
      auto ref_what = [&] { return "grads[" + std::to_string(p) + "]"; };
      const at::ScalarType dtype = t.scalar_type();
      TORCH_CHECK_TYPE(is_kernel_dtype(dtype),
                       what() + " has dtype " + python_dtype_name(dtype) +
                           "; expected a real floating-point tensor (float16, bfloat16, float32 or float64)");
      TORCH_CHECK_TYPE(dtype == ref.scalar_type(),
                       what() + " has dtype " + python_dtype_name(dtype) + ", " + ref_what() +
                           " has dtype " + python_dtype_name(ref.scalar_type()) +
                           "; the tensors of one parameter must share a dtype");
      TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), what() + " has shape " + shape_string(t.sizes()) + ", " +
                                                      ref_what() + " has shape " + shape_string(ref.sizes()));
      TORCH_CHECK_VALUE(t.device() == device,
                        what() + " is on " + t.device().str() + ", grads[0] is on " + device.str());
    }
  };
  check_list("grads", grads);
  check_list("directions", directions);
  check_list("products", products);
  return {K, J / (K * P), P};
}

}  // namespace muonkern
