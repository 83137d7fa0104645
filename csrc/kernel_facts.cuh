// Host side of the CUDA MoE GEMMs' launchers (moe_decode.cu, moe_prefill.cu): what they ask the
// driver about a kernel, once per (kernel, device) rather than on every launch.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <mutex>

namespace moeprep {

// What a launch needs to know of a kernel on a device, found on its first launch there: the
// shared-memory opt-in set (a per-device attribute), the PTX version it was compiled for, and how
// many of its CTAs the device holds at once.
struct KernelFacts {
  cudaError_t error;
  int ptx_version;
  int64_t resident_ctas;
};

template <int THREADS, int SMEM, typename Kernel>
KernelFacts query(Kernel kernel, int device) {
  KernelFacts f{cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM), 0, 0};
  cudaFuncAttributes compiled{};
  int per_sm = 0, sms = 0;
  if (f.error == cudaSuccess) f.error = cudaFuncGetAttributes(&compiled, kernel);
  if (f.error == cudaSuccess) f.error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, SMEM);
  if (f.error == cudaSuccess) f.error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  f.ptx_version = compiled.ptxVersion;
  f.resident_ctas = static_cast<int64_t>(per_sm) * sms;
  return f;
}

// (one cache per kernel: KERNEL is a template parameter)
template <auto KERNEL, int THREADS, int SMEM>
KernelFacts facts_of() {
  constexpr int kDevices = 64;  // cached for devices 0 to 63, asked each time past them
  static std::once_flag once[kDevices];
  static KernelFacts known[kDevices];
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return KernelFacts{err, 0, 0};
  if (device >= kDevices) return query<THREADS, SMEM>(KERNEL, device);
  std::call_once(once[device], [&] { known[device] = query<THREADS, SMEM>(KERNEL, device); });
  return known[device];
}

}  // namespace moeprep
