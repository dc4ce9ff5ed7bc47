// Times the fused ns5 kernel alone, without torch: BATCH random fp32 M x N matrices, 5 steps of
// KellerJordan/Muon's coefficients, 200 back-to-back launches over 8 rotating inputs between CUDA
// events, 7 rounds; prints the median round's and the fastest round's time per call. With DUMP it
// also writes one input and its output (float32, input then output) for bench/fused_kernel_check.py
// to hold against a float64 NS5. Built with nvcc alone (no torch, seconds of GPU time per variant:
// build on any machine with nvcc, run the binary on the GPU one):
//
//   nvcc -arch=sm_90a -std=c++17 -O3 -t 0 -Icsrc -Icsrc/kernels -o fused_kernel_timing bench/fused_kernel_timing.cu \
//        csrc/kernels/ns5_fused.cu csrc/kernels/ns5_fused_standard.cu csrc/kernels/ns5_fused_gram.cu
//   ./fused_kernel_timing BATCH M N gram|standard CLUSTER [DUMP]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "ns5_kernels.h"
#include "ns5_schedule.h"

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(err));
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) {
    std::fprintf(stderr, "usage: %s BATCH M N gram|standard CLUSTER [DUMP]\n", argv[0]);
    return 2;
  }
  const int64_t batch = std::atoll(argv[1]), m = std::atoll(argv[2]), n = std::atoll(argv[3]);
  const bool gram = std::strcmp(argv[4], "gram") == 0;
  const int cluster = std::atoi(argv[5]);
  const char* dump = argc > 6 ? argv[6] : nullptr;
  constexpr int kSteps = 5, kInputs = 8, kCalls = 200, kRounds = 7;
  const size_t elements = static_cast<size_t>(batch * m * n);

  std::mt19937 rng(1234);
  std::normal_distribution<float> normal;
  std::vector<float> host(elements);
  std::vector<float*> in(kInputs), out(kInputs);
  for (int i = 0; i < kInputs; ++i) {
    for (float& v : host) v = normal(rng);
    check(cudaMalloc(&in[i], elements * 4), "cudaMalloc");
    check(cudaMalloc(&out[i], elements * 4), "cudaMalloc");
    check(cudaMemcpy(in[i], host.data(), elements * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
    check(cudaMemset(out[i], 0xff, elements * 4), "cudaMemset");  // NaN: unwritten elements show
  }
  float abc[3 * kSteps];
  for (int i = 0; i < 3 * kSteps; ++i) abc[i] = static_cast<float>(muonkern::kJordanCoefficients[i % 3]);
  const auto problem = [&](int i) {
    muonkern::Ns5Problem p{};
    p.in.data = in[i];
    p.in.dtype = muonkern::DType::Float32;
    p.in.batch_dims = 1;
    p.in.batch_sizes[0] = batch;
    p.in.batch_strides[0] = m * n;
    p.in.row_stride = n;
    p.in.col_stride = 1;
    p.out = out[i];
    p.batch = batch;
    p.m = m;
    p.n = n;
    p.eps = 1e-7f;
    p.steps = kSteps;
    return p;
  };
  const muonkern::FusedGram algorithm{gram, gram ? muonkern::gram_restart_mask(kSteps) : 0u};  // the op's restarts
  cudaStream_t stream;
  check(cudaStreamCreate(&stream), "cudaStreamCreate");
  for (int i = 0; i < 2 * kInputs; ++i)
    check(muonkern::launch_ns5_fused(problem(i % kInputs), abc, algorithm, cluster, stream), "launch");
  check(cudaStreamSynchronize(stream), "warm-up");
  if (dump != nullptr) {
    std::vector<float> output(elements);
    check(cudaMemcpy(output.data(), out[0], elements * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
    check(cudaMemcpy(host.data(), in[0], elements * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
    FILE* f = std::fopen(dump, "wb");
    std::fwrite(host.data(), 4, elements, f);
    std::fwrite(output.data(), 4, elements, f);
    std::fclose(f);
  }
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  std::vector<float> us;
  for (int round = 0; round < kRounds; ++round) {
    check(cudaEventRecord(start, stream), "cudaEventRecord");
    for (int i = 0; i < kCalls; ++i)
      check(muonkern::launch_ns5_fused(problem(i % kInputs), abc, algorithm, cluster, stream), "launch");
    check(cudaEventRecord(stop, stream), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "timed launches");
    float ms = 0.f;
    check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    us.push_back(ms * 1e3f / kCalls);
  }
  std::sort(us.begin(), us.end());
  std::printf("%lldx%lldx%lld %s cluster %d: median %.2f us, min %.2f us per call\n", static_cast<long long>(batch),
              static_cast<long long>(m), static_cast<long long>(n), gram ? "gram" : "standard", cluster,
              us[kRounds / 2], us[0]);
  return 0;
}
