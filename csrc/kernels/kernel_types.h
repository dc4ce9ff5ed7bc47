// Types shared by the launch interfaces of every muonkern kernel. Torch-free, like all of kernels/.
#pragma once

#ifdef __CUDACC__
#define MUONKERN_HOST_DEVICE __host__ __device__
#else
#define MUONKERN_HOST_DEVICE
#endif

namespace muonkern {

// Element types the kernels read and write; csrc/kernel_dtype.h maps torch dtypes onto them.
enum class DType : int { Float32, BFloat16, Float16, Float64 };

}  // namespace muonkern
