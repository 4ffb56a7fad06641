// Host-side API of the CUDA part of the native core. This header needs no
// CUDA headers: pointers, streams and events travel as integers. Every
// function checks each CUDA return code and throws CudaError naming the
// failing call and the CUDA error (cudaGetErrorName / cudaGetErrorString).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace llumnix_kv {
namespace cuda {

class CudaError : public std::runtime_error {
 public:
  CudaError(int code, const std::string& message) : std::runtime_error(message), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  int code_;
};

// Size of a CUDA IPC memory handle in bytes.
constexpr std::size_t kIpcHandleBytes = 64;

int runtime_version();
int driver_version();  // 0 when no driver is installed
int device_count();    // throws when no driver or no device
void set_device(int device);
int get_device();
void device_enable_peer_access(int peer);  // already-enabled is not an error

// Copies lengths[i] bytes from src[i] to dst[i] for every i with one kernel
// launch on `stream` (device, peer-mapped or pinned host addresses).
// Asynchronous with respect to the host.
void copy_segments(const std::uint64_t* src, const std::uint64_t* dst, const std::uint64_t* lengths, std::size_t n,
                   std::uintptr_t stream);
void synchronize(std::uintptr_t stream);

std::uintptr_t malloc_device(std::size_t nbytes);
void free_device(std::uintptr_t ptr);
std::pair<std::size_t, std::size_t> mem_get_info();  // (free, total) bytes of the current device
std::uintptr_t malloc_host(std::size_t nbytes);
void free_host(std::uintptr_t ptr);
void memcpy_htod(std::uintptr_t dst, std::uintptr_t src_host, std::size_t nbytes);
void memcpy_dtoh(std::uintptr_t dst_host, std::uintptr_t src, std::size_t nbytes);
void memset_device(std::uintptr_t dst, int value, std::size_t nbytes);

std::uintptr_t stream_create();
void stream_destroy(std::uintptr_t stream);
std::uintptr_t event_create();
void event_destroy(std::uintptr_t event);
void event_record(std::uintptr_t event, std::uintptr_t stream);
void stream_wait_event(std::uintptr_t stream, std::uintptr_t event);
void event_synchronize(std::uintptr_t event);
bool event_query(std::uintptr_t event);

std::string ipc_get_mem_handle(std::uintptr_t ptr);
std::uintptr_t ipc_open_mem_handle(const std::string& handle);
void ipc_close_mem_handle(std::uintptr_t ptr);

// The same copy through the copy engines' batched API (cudaMemcpyBatchAsync),
// one call; `stream` must be a created stream.
void copy_segments_ce(const std::uint64_t* src, const std::uint64_t* dst, const std::uint64_t* lengths,
                      std::size_t n, std::uintptr_t stream);
void memcpy_async(std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, std::uintptr_t stream);
// (base, size) of the device allocation holding `ptr` (what CUDA IPC exports).
std::pair<std::uintptr_t, std::size_t> mem_get_address_range(std::uintptr_t ptr);
bool device_can_access_peer(int device, int peer);
// ("device" | "host" | "managed" | "unregistered", device ordinal) of a pointer.
std::pair<std::string, int> pointer_info(std::uintptr_t ptr);
std::uintptr_t event_create_timed();
float event_elapsed_ms(std::uintptr_t start, std::uintptr_t end);
// Keeps `ctas` CTAs busy for `nanoseconds` (a stand-in for a layer's compute).
void spin(std::uint64_t nanoseconds, unsigned ctas, std::uintptr_t stream);
int sm_count_of(int device);
std::string device_name(int device);

// Virtual-memory (cuMemCreate/cuMemMap) allocations, through the driver entry points the runtime
// hands out (the module never links libcuda).
struct VmmExport {
  int fd;               // POSIX file descriptor of the physical allocation; the caller closes it
  std::uintptr_t base;  // start of the mapping that holds the exported pointer
  std::size_t size;     // bytes of that mapping (the allocation's size)
};
bool is_vmm(std::uintptr_t ptr);  // ptr lies in memory mapped by cuMemMap
std::size_t vmm_granularity(int device);
VmmExport vmm_export_fd(std::uintptr_t ptr);
// Imports, reserves, maps and opens for read/write on `device`; does not close `fd`.
std::uintptr_t vmm_import(int fd, std::size_t size, int device);
void vmm_unmap(std::uintptr_t ptr, std::size_t size);
// Exportable (POSIX fd) unless `exportable` is false; size rounded up to the granularity.
std::uintptr_t vmm_alloc(int device, std::size_t size, bool exportable);
void vmm_free(std::uintptr_t ptr);

// Drops the cached descriptor buffers of `stream` (called by stream_destroy).
void release_stream_cache(std::uintptr_t stream);

}  // namespace cuda
}  // namespace llumnix_kv
