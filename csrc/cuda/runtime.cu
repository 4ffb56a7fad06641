// Thin checked wrappers over the CUDA runtime used by the Python module.
#include <cuda_runtime.h>

#include <cstring>
#include <string>

#include "check.cuh"
#include "llumnix_kv/cuda_ops.h"

namespace llumnix_kv {
namespace cuda {

namespace {

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
inline cudaEvent_t as_event(std::uintptr_t e) { return reinterpret_cast<cudaEvent_t>(e); }
inline void* as_ptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

}  // namespace

int runtime_version() {
  int v = 0;
  LLUMNIX_CUDA_CHECK(cudaRuntimeGetVersion(&v));
  return v;
}

int driver_version() {
  int v = 0;
  LLUMNIX_CUDA_CHECK(cudaDriverGetVersion(&v));
  return v;
}

int device_count() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    int drv = 0;
    cudaDriverGetVersion(&drv);
    std::string hint = drv == 0 ? "no NVIDIA driver is installed or loadable (libcuda.so.1); install the driver "
                                  "and check nvidia-smi"
                                : "the NVIDIA driver (version " + std::to_string(drv) +
                                      ") found no usable GPU or is older than this CUDA runtime (" +
                                      std::to_string(CUDART_VERSION) + "); check nvidia-smi";
    throw CudaError(static_cast<int>(err), std::string("cudaGetDeviceCount failed: ") + cudaGetErrorName(err) +
                                               " (" + cudaGetErrorString(err) + "): " + hint);
  }
  return count;
}

void set_device(int device) { LLUMNIX_CUDA_CHECK(cudaSetDevice(device)); }

int get_device() {
  int d = 0;
  LLUMNIX_CUDA_CHECK(cudaGetDevice(&d));
  return d;
}

void device_enable_peer_access(int peer) {
  cudaError_t err = cudaDeviceEnablePeerAccess(peer, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();  // clear the non-sticky error
    return;
  }
  LLUMNIX_CUDA_CHECK(err);
}

void synchronize(std::uintptr_t stream) { LLUMNIX_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream))); }

std::uintptr_t malloc_device(std::size_t nbytes) {
  void* p = nullptr;
  LLUMNIX_CUDA_CHECK(cudaMalloc(&p, nbytes));
  return reinterpret_cast<std::uintptr_t>(p);
}

void free_device(std::uintptr_t ptr) { LLUMNIX_CUDA_CHECK(cudaFree(as_ptr(ptr))); }

std::pair<std::size_t, std::size_t> mem_get_info() {
  std::size_t free = 0, total = 0;
  LLUMNIX_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  return {free, total};
}

std::uintptr_t malloc_host(std::size_t nbytes) {
  void* p = nullptr;
  LLUMNIX_CUDA_CHECK(cudaHostAlloc(&p, nbytes, cudaHostAllocPortable | cudaHostAllocMapped));
  return reinterpret_cast<std::uintptr_t>(p);
}

void free_host(std::uintptr_t ptr) { LLUMNIX_CUDA_CHECK(cudaFreeHost(as_ptr(ptr))); }

void memcpy_htod(std::uintptr_t dst, std::uintptr_t src_host, std::size_t nbytes) {
  LLUMNIX_CUDA_CHECK(cudaMemcpy(as_ptr(dst), as_ptr(src_host), nbytes, cudaMemcpyHostToDevice));
}

void memcpy_dtoh(std::uintptr_t dst_host, std::uintptr_t src, std::size_t nbytes) {
  LLUMNIX_CUDA_CHECK(cudaMemcpy(as_ptr(dst_host), as_ptr(src), nbytes, cudaMemcpyDeviceToHost));
}

void memset_device(std::uintptr_t dst, int value, std::size_t nbytes) {
  LLUMNIX_CUDA_CHECK(cudaMemset(as_ptr(dst), value, nbytes));
}

std::uintptr_t stream_create() {
  cudaStream_t s = nullptr;
  LLUMNIX_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return reinterpret_cast<std::uintptr_t>(s);
}

void stream_destroy(std::uintptr_t stream) {
  release_stream_cache(stream);
  LLUMNIX_CUDA_CHECK(cudaStreamDestroy(as_stream(stream)));
}

std::uintptr_t event_create() {
  cudaEvent_t e = nullptr;
  LLUMNIX_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return reinterpret_cast<std::uintptr_t>(e);
}

void event_destroy(std::uintptr_t event) { LLUMNIX_CUDA_CHECK(cudaEventDestroy(as_event(event))); }

void event_record(std::uintptr_t event, std::uintptr_t stream) {
  // Inside a stream capture a plain record only orders work within the graph; an external
  // record becomes a graph node that records the event at every replay, which is what a
  // waiter outside the graph (a transfer stream) needs.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  LLUMNIX_CUDA_CHECK(cudaStreamIsCapturing(as_stream(stream), &capture));
  if (capture == cudaStreamCaptureStatusActive) {
    LLUMNIX_CUDA_CHECK(cudaEventRecordWithFlags(as_event(event), as_stream(stream), cudaEventRecordExternal));
  } else {
    LLUMNIX_CUDA_CHECK(cudaEventRecord(as_event(event), as_stream(stream)));
  }
}

void stream_wait_event(std::uintptr_t stream, std::uintptr_t event) {
  LLUMNIX_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), as_event(event), 0));
}

void event_synchronize(std::uintptr_t event) { LLUMNIX_CUDA_CHECK(cudaEventSynchronize(as_event(event))); }

bool event_query(std::uintptr_t event) {
  cudaError_t err = cudaEventQuery(as_event(event));
  if (err == cudaSuccess) return true;
  if (err == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  throw_cuda_error(err, "cudaEventQuery(event)");
}

std::string ipc_get_mem_handle(std::uintptr_t ptr) {
  static_assert(sizeof(cudaIpcMemHandle_t) == kIpcHandleBytes, "unexpected cudaIpcMemHandle_t size");
  cudaIpcMemHandle_t h;
  LLUMNIX_CUDA_CHECK(cudaIpcGetMemHandle(&h, as_ptr(ptr)));
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

std::uintptr_t ipc_open_mem_handle(const std::string& handle) {
  if (handle.size() != sizeof(cudaIpcMemHandle_t)) {
    throw std::invalid_argument("a CUDA IPC memory handle is " + std::to_string(sizeof(cudaIpcMemHandle_t)) +
                                " bytes, got " + std::to_string(handle.size()));
  }
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  void* p = nullptr;
  LLUMNIX_CUDA_CHECK(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess));
  return reinterpret_cast<std::uintptr_t>(p);
}

void ipc_close_mem_handle(std::uintptr_t ptr) { LLUMNIX_CUDA_CHECK(cudaIpcCloseMemHandle(as_ptr(ptr))); }

}  // namespace cuda
}  // namespace llumnix_kv
