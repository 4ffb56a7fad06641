// Virtual-memory (cuMem*) allocations: detection, export as POSIX file descriptors, import and
// mapping in another process, and exportable allocations for tests and benchmarks.
//
// The driver API is reached through the runtime's cudaGetDriverEntryPointByVersion: the module
// never links libcuda, so it still imports on machines without a driver; these functions then
// raise naming the missing driver. <cuda.h> is included for its types only.
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

#include "check.cuh"
#include "llumnix_kv/cuda_ops.h"

namespace llumnix_kv {
namespace cuda {

namespace {

// The driver entry points this file uses, resolved once.
struct Driver {
  decltype(&cuGetErrorName) get_error_name = nullptr;
  decltype(&cuGetErrorString) get_error_string = nullptr;
  decltype(&cuMemRetainAllocationHandle) retain = nullptr;
  decltype(&cuMemRelease) release = nullptr;
  decltype(&cuMemGetAddressRange) address_range = nullptr;
  decltype(&cuMemExportToShareableHandle) export_handle = nullptr;
  decltype(&cuMemImportFromShareableHandle) import_handle = nullptr;
  decltype(&cuMemAddressReserve) reserve = nullptr;
  decltype(&cuMemAddressFree) address_free = nullptr;
  decltype(&cuMemMap) map = nullptr;
  decltype(&cuMemUnmap) unmap = nullptr;
  decltype(&cuMemSetAccess) set_access = nullptr;
  decltype(&cuMemCreate) create = nullptr;
  decltype(&cuMemGetAllocationGranularity) granularity = nullptr;
  decltype(&cuPointerGetAttribute) pointer_attribute = nullptr;
  std::string error;  // why resolution failed; empty when every entry point was found
};

std::string no_driver_hint() {
  int drv = 0;
  cudaDriverGetVersion(&drv);
  cudaGetLastError();
  if (drv == 0) {
    return "no NVIDIA driver is installed or loadable (libcuda.so.1); the virtual-memory functions need it: "
           "install the driver and check nvidia-smi";
  }
  return "the NVIDIA driver (CUDA " + std::to_string(drv) + ") is older than this CUDA runtime (" +
         std::to_string(CUDART_VERSION) + "): update the driver";
}

template <typename Fn>
void resolve(Driver& d, const char* symbol, Fn& out) {
  if (!d.error.empty()) return;
  void* p = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
  cudaError_t err = cudaGetDriverEntryPointByVersion(symbol, &p, CUDART_VERSION, cudaEnableDefault, &status);
  if (err != cudaSuccess) {
    cudaGetLastError();  // leave no error behind for the next, unrelated runtime call
    d.error = std::string("cudaGetDriverEntryPointByVersion(") + symbol + ") failed: " + cudaGetErrorName(err) +
              " (" + cudaGetErrorString(err) + "): " + no_driver_hint();
    return;
  }
  if (status != cudaDriverEntryPointSuccess || p == nullptr) {
    d.error = std::string("the CUDA driver does not provide ") + symbol + ": " + no_driver_hint();
    return;
  }
  out = reinterpret_cast<Fn>(p);
}

const Driver& driver() {
  static std::once_flag once;
  static Driver d;
  std::call_once(once, [] {
    resolve(d, "cuGetErrorName", d.get_error_name);
    resolve(d, "cuGetErrorString", d.get_error_string);
    resolve(d, "cuMemRetainAllocationHandle", d.retain);
    resolve(d, "cuMemRelease", d.release);
    resolve(d, "cuMemGetAddressRange", d.address_range);
    resolve(d, "cuMemExportToShareableHandle", d.export_handle);
    resolve(d, "cuMemImportFromShareableHandle", d.import_handle);
    resolve(d, "cuMemAddressReserve", d.reserve);
    resolve(d, "cuMemAddressFree", d.address_free);
    resolve(d, "cuMemMap", d.map);
    resolve(d, "cuMemUnmap", d.unmap);
    resolve(d, "cuMemSetAccess", d.set_access);
    resolve(d, "cuMemCreate", d.create);
    resolve(d, "cuMemGetAllocationGranularity", d.granularity);
    resolve(d, "cuPointerGetAttribute", d.pointer_attribute);
  });
  if (!d.error.empty()) throw CudaError(static_cast<int>(cudaErrorInsufficientDriver), d.error);
  return d;
}

// "CUDA_ERROR_X (description)" of a driver result.
std::string describe(const Driver& d, CUresult r) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (d.get_error_name(r, &name) != CUDA_SUCCESS || name == nullptr) name = "unknown CUresult";
  if (d.get_error_string(r, &text) != CUDA_SUCCESS || text == nullptr) text = "no description";
  return std::string(name) + " " + std::to_string(static_cast<int>(r)) + " (" + text + ")";
}

// A failed driver call can leave its error in the runtime's per-thread state, where the next,
// unrelated runtime call (a kernel launch checking cudaGetLastError) would find it: clear it.
void clear_runtime_error() { cudaGetLastError(); }

[[noreturn]] void throw_cu(const Driver& d, CUresult r, const std::string& call, const std::string& fix) {
  clear_runtime_error();
  throw CudaError(static_cast<int>(r), call + " failed: " + describe(d, r) + (fix.empty() ? "" : ": " + fix));
}

void check(const Driver& d, CUresult r, const char* call, const std::string& fix = "") {
  if (r != CUDA_SUCCESS) throw_cu(d, r, call, fix);
}

// A failed runtime call, cleared so that it does not fail the next, unrelated one.
void check_runtime(cudaError_t err, const char* call) {
  if (err == cudaSuccess) return;
  cudaGetLastError();
  throw_cuda_error(err, call);
}

// The primary context of the current device, made current (the cuMem calls need one).
void init_context() { check_runtime(cudaFree(nullptr), "cudaFree(nullptr) (context creation)"); }

void use_device(int device) {
  check_runtime(cudaSetDevice(device), "cudaSetDevice(device)");
  init_context();
}

std::string hex(std::uintptr_t v) {
  static const char digits[] = "0123456789abcdef";
  std::string s;
  do {
    s.insert(s.begin(), digits[v & 0xf]);
    v >>= 4;
  } while (v != 0);
  return "0x" + s;
}

CUmemAllocationProp device_prop(int device, bool exportable) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  prop.requestedHandleTypes = exportable ? CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR : CU_MEM_HANDLE_TYPE_NONE;
  return prop;
}

// Releases a retained or created allocation handle unless disarmed (the mapping then holds it).
class HandleGuard {
 public:
  HandleGuard(const Driver& d, CUmemGenericAllocationHandle h) : d_(d), h_(h) {}
  HandleGuard(const HandleGuard&) = delete;
  HandleGuard& operator=(const HandleGuard&) = delete;
  ~HandleGuard() {
    if (armed_) d_.release(h_);  // best effort on an error path; the success path calls release()
  }
  void release() {
    armed_ = false;
    check(d_, d_.release(h_), "cuMemRelease");
  }

 private:
  const Driver& d_;
  CUmemGenericAllocationHandle h_;
  bool armed_ = true;
};

std::size_t granularity_of(const Driver& d, int device, bool exportable) {
  CUmemAllocationProp prop = device_prop(device, exportable);
  std::size_t g = 0;
  check(d, d.granularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM), "cuMemGetAllocationGranularity");
  return g;
}

// Reserves (aligned to `alignment`), maps and opens `handle` for read/write on `device`; unwinds on failure.
std::uintptr_t map_on_device(const Driver& d, CUmemGenericAllocationHandle handle, std::size_t size, int device,
                             std::size_t alignment) {
  CUdeviceptr ptr = 0;
  check(d, d.reserve(&ptr, size, alignment, 0, 0), "cuMemAddressReserve",
        "the process is out of GPU virtual address space");
  CUresult r = d.map(ptr, size, 0, handle, 0);
  if (r != CUDA_SUCCESS) {
    d.address_free(ptr, size);
    throw_cu(d, r, "cuMemMap", "the size must be the exported allocation's, a multiple of the granularity");
  }
  CUmemAccessDesc access{};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  r = d.set_access(ptr, size, &access, 1);
  if (r != CUDA_SUCCESS) {
    d.unmap(ptr, size);
    d.address_free(ptr, size);
    throw_cu(d, r, "cuMemSetAccess",
             "cuda:" + std::to_string(device) + " cannot access this memory (the GPUs need peer access, "
             "NVLink or PCIe P2P)");
  }
  return static_cast<std::uintptr_t>(ptr);
}

// Results that say the driver or context cannot answer, rather than that an address is not virtual memory.
bool driver_unusable(CUresult r) {
  switch (r) {
    case CUDA_ERROR_NOT_INITIALIZED:
    case CUDA_ERROR_DEINITIALIZED:
    case CUDA_ERROR_INVALID_CONTEXT:
    case CUDA_ERROR_CONTEXT_IS_DESTROYED:
    case CUDA_ERROR_NO_DEVICE:
    case CUDA_ERROR_OUT_OF_MEMORY:
    case CUDA_ERROR_ILLEGAL_ADDRESS:
    case CUDA_ERROR_LAUNCH_FAILED:
      return true;
    default:
      return false;
  }
}

}  // namespace

bool is_vmm(std::uintptr_t ptr) {
  const Driver& d = driver();
  init_context();
  CUmemGenericAllocationHandle h = 0;
  CUresult r = d.retain(&h, reinterpret_cast<void*>(ptr));
  if (r != CUDA_SUCCESS) {
    if (driver_unusable(r)) throw_cu(d, r, "cuMemRetainAllocationHandle", "");
    clear_runtime_error();
    return false;  // not mapped by cuMemMap: cudaMalloc, host or unknown memory
  }
  check(d, d.release(h), "cuMemRelease");
  return true;
}

std::size_t vmm_granularity(int device) {
  const Driver& d = driver();
  use_device(device);
  return granularity_of(d, device, true);
}

VmmExport vmm_export_fd(std::uintptr_t ptr) {
  const Driver& d = driver();
  init_context();
  CUdeviceptr base = 0;
  std::size_t size = 0;
  check(d, d.address_range(&base, &size, static_cast<CUdeviceptr>(ptr)), "cuMemGetAddressRange",
        "the address " + hex(ptr) + " is not inside GPU memory of this process");
  CUmemGenericAllocationHandle h = 0;
  CUresult r = d.retain(&h, reinterpret_cast<void*>(base));
  if (r != CUDA_SUCCESS && !driver_unusable(r)) {
    clear_runtime_error();
    throw CudaError(static_cast<int>(r),
                    "GPU memory at " + hex(ptr) + " is not a virtual-memory (cuMemCreate/cuMemMap) allocation "
                    "(cuMemRetainAllocationHandle: " + describe(d, r) + "), so it has no shareable handle: export "
                    "it through legacy CUDA IPC (ipc_get_mem_handle)");
  }
  check(d, r, "cuMemRetainAllocationHandle");
  HandleGuard guard(d, h);
  int fd = -1;
  r = d.export_handle(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
  if (r != CUDA_SUCCESS) {
    unsigned long long allowed = 0;  // a CUmemAllocationHandleType bitmask
    CUresult q = d.pointer_attribute(&allowed, CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES, base);
    if (q == CUDA_SUCCESS && (allowed & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) == 0) {
      clear_runtime_error();
      throw CudaError(static_cast<int>(r),
                      "GPU memory at " + hex(ptr) + " is a virtual-memory allocation created without "
                      "CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR in its requestedHandleTypes, so no other process "
                      "can import it (cuMemExportToShareableHandle: " + describe(d, r) + "): create it exportable "
                      "(vLLM 0.34 does when the KV connector declares exports_fd)");
    }
    throw_cu(d, r, "cuMemExportToShareableHandle",
             "the process needs a free file descriptor (ulimit -n); handle types of the allocation: " +
                 (q == CUDA_SUCCESS ? std::to_string(allowed) : "unknown (" + describe(d, q) + ")"));
  }
  guard.release();
  return {fd, static_cast<std::uintptr_t>(base), size};
}

std::uintptr_t vmm_import(int fd, std::size_t size, int device) {
  if (fd < 0) throw std::invalid_argument("vmm_import needs an open file descriptor, got " + std::to_string(fd));
  if (size == 0) throw std::invalid_argument("vmm_import needs the exported allocation's size, got 0");
  const Driver& d = driver();
  use_device(device);
  const std::size_t g = granularity_of(d, device, true);
  if (size % g != 0) {
    throw std::invalid_argument("vmm_import: " + std::to_string(size) + " bytes is not a multiple of the granularity (" +
                                std::to_string(g) + "); pass the size vmm_export_fd returned");
  }
  CUmemGenericAllocationHandle h = 0;
  check(d,
        d.import_handle(&h, reinterpret_cast<void*>(static_cast<std::uintptr_t>(fd)),
                        CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
        "cuMemImportFromShareableHandle",
        "the descriptor must come from vmm_export_fd (cuMemExportToShareableHandle) of a process of this host");
  HandleGuard guard(d, h);
  std::uintptr_t ptr = map_on_device(d, h, size, device, g);
  guard.release();  // the mapping keeps the allocation alive until vmm_unmap
  return ptr;
}

void vmm_unmap(std::uintptr_t ptr, std::size_t size) {
  const Driver& d = driver();
  init_context();
  CUdeviceptr p = static_cast<CUdeviceptr>(ptr);
  check(d, d.unmap(p, size), "cuMemUnmap", "pass the pointer and size vmm_import mapped");
  check(d, d.address_free(p, size), "cuMemAddressFree");
}

std::uintptr_t vmm_alloc(int device, std::size_t size, bool exportable) {
  if (size == 0) throw std::invalid_argument("vmm_alloc needs a size above 0");
  const Driver& d = driver();
  use_device(device);
  CUmemAllocationProp prop = device_prop(device, exportable);
  const std::size_t g = granularity_of(d, device, exportable);
  const std::size_t rounded = (size + g - 1) / g * g;
  CUmemGenericAllocationHandle h = 0;
  check(d, d.create(&h, rounded, &prop, 0), "cuMemCreate",
        "cuda:" + std::to_string(device) + " needs " + std::to_string(rounded) + " free bytes");
  HandleGuard guard(d, h);
  std::uintptr_t ptr = map_on_device(d, h, rounded, device, g);
  guard.release();  // freed with its mapping in vmm_free
  return ptr;
}

void vmm_free(std::uintptr_t ptr) {
  const Driver& d = driver();
  init_context();
  CUdeviceptr base = 0;
  std::size_t size = 0;
  check(d, d.address_range(&base, &size, static_cast<CUdeviceptr>(ptr)), "cuMemGetAddressRange",
        "pass a pointer vmm_alloc returned");
  if (base != static_cast<CUdeviceptr>(ptr)) {
    throw std::invalid_argument("vmm_free needs the pointer vmm_alloc returned (" + hex(base) + "), got " + hex(ptr));
  }
  vmm_unmap(ptr, size);
}

}  // namespace cuda
}  // namespace llumnix_kv
