// Runtime helpers for the transports and the offload path: copy-engine batched
// copies (the alternative to the gather/scatter kernel), allocation ranges for
// CUDA IPC export, pointer queries, timed events, a stand-in "forward" kernel.
#include <cuda.h>  // driver types only: the driver is reached through cudaGetDriverEntryPointByVersion
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.cuh"
#include "llumnix_kv/cuda_ops.h"
#include "llumnix_kv/segments.h"

namespace llumnix_kv {
namespace cuda {

namespace {

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
inline cudaEvent_t as_event(std::uintptr_t e) { return reinterpret_cast<cudaEvent_t>(e); }

// Busy-waits on the global nanosecond timer; one warp per CTA.
__global__ void spin_kernel(std::uint64_t ns) {
  std::uint64_t t0 = 0, t = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
}

using MemGetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);

MemGetAddressRange address_range_fn() {
  static std::once_flag once;
  static MemGetAddressRange fn = nullptr;
  static cudaError_t err = cudaSuccess;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
    err = cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &p, 12000, cudaEnableDefault, &status);
    if (err == cudaSuccess && status == cudaDriverEntryPointSuccess) fn = reinterpret_cast<MemGetAddressRange>(p);
  });
  if (fn == nullptr) {
    if (err != cudaSuccess) throw_cuda_error(err, "cudaGetDriverEntryPointByVersion(cuMemGetAddressRange)");
    throw CudaError(0, "the CUDA driver does not provide cuMemGetAddressRange; update the NVIDIA driver");
  }
  return fn;
}

}  // namespace

void copy_segments_ce(const std::uint64_t* src, const std::uint64_t* dst, const std::uint64_t* lengths,
                      std::size_t n, std::uintptr_t stream) {
  if (n == 0) return;
  checked_total("src_addrs", src, lengths, n);
  checked_total("dst_addrs", dst, lengths, n);
  if (stream == 0) {
    throw std::invalid_argument(
        "copy_segments_ce needs a created stream (stream_create()); the copy engines' batched API refuses the "
        "legacy default stream");
  }
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<std::size_t> sizes;
  dsts.reserve(n);
  srcs.reserve(n);
  sizes.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    if (lengths[i] == 0) continue;
    dsts.push_back(reinterpret_cast<void*>(dst[i]));
    srcs.push_back(reinterpret_cast<const void*>(src[i]));
    sizes.push_back(static_cast<std::size_t>(lengths[i]));
  }
  if (sizes.empty()) return;
  cudaMemcpyAttributes attr{};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  std::size_t attr_index = 0;
  LLUMNIX_CUDA_CHECK(cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), sizes.size(), &attr, &attr_index, 1,
                                          as_stream(stream)));
}

void memcpy_async(std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, std::uintptr_t stream) {
  LLUMNIX_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes,
                                     cudaMemcpyDefault, as_stream(stream)));
}

std::pair<std::uintptr_t, std::size_t> mem_get_address_range(std::uintptr_t ptr) {
  CUdeviceptr base = 0;
  size_t size = 0;
  CUresult r = address_range_fn()(&base, &size, static_cast<CUdeviceptr>(ptr));
  if (r != CUDA_SUCCESS) {
    throw CudaError(static_cast<int>(r), "cuMemGetAddressRange failed with CUresult " + std::to_string(r) +
                                             ": the address is not inside a device allocation of the current "
                                             "device (check the pointer and call set_device first)");
  }
  return {static_cast<std::uintptr_t>(base), size};
}

bool device_can_access_peer(int device, int peer) {
  int ok = 0;
  LLUMNIX_CUDA_CHECK(cudaDeviceCanAccessPeer(&ok, device, peer));
  return ok != 0;
}

std::pair<std::string, int> pointer_info(std::uintptr_t ptr) {
  cudaPointerAttributes a{};
  LLUMNIX_CUDA_CHECK(cudaPointerGetAttributes(&a, reinterpret_cast<const void*>(ptr)));
  switch (a.type) {
    case cudaMemoryTypeDevice:
      return {"device", a.device};
    case cudaMemoryTypeHost:
      return {"host", a.device};
    case cudaMemoryTypeManaged:
      return {"managed", a.device};
    default:
      return {"unregistered", -1};
  }
}

std::uintptr_t event_create_timed() {
  cudaEvent_t e = nullptr;
  LLUMNIX_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDefault));
  return reinterpret_cast<std::uintptr_t>(e);
}

float event_elapsed_ms(std::uintptr_t start, std::uintptr_t end) {
  float ms = 0.0f;
  LLUMNIX_CUDA_CHECK(cudaEventElapsedTime(&ms, as_event(start), as_event(end)));
  return ms;
}

void spin(std::uint64_t nanoseconds, unsigned ctas, std::uintptr_t stream) {
  if (ctas == 0) ctas = 1;
  spin_kernel<<<ctas, 32, 0, as_stream(stream)>>>(nanoseconds);
  LLUMNIX_CUDA_CHECK(cudaGetLastError());
}

int sm_count_of(int device) {
  int sms = 0;
  LLUMNIX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

std::string device_name(int device) {
  cudaDeviceProp p{};
  LLUMNIX_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  return std::string(p.name);
}

}  // namespace cuda
}  // namespace llumnix_kv
