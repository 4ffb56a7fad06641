// Python module llumnix_kv_core._native_cuda: one-launch scattered copies on
// the GPU and the CUDA runtime helpers that go with them. The CUDA runtime is
// linked statically and loads the driver on first use, so this module imports
// on machines without a driver; calls then raise RuntimeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "llumnix_kv/cuda_ops.h"

#ifndef LLUMNIX_KV_VERSION
#define LLUMNIX_KV_VERSION "0+unknown"
#endif

namespace py = pybind11;
namespace kc = llumnix_kv::cuda;
using llumnix_kv::bindings::as_u64_array;
using llumnix_kv::bindings::check_same_size;
using llumnix_kv::bindings::U64Array;

namespace {

// The three address arrays of a scattered copy, checked to be of one length.
struct SegmentArrays {
  U64Array src;
  U64Array dst;
  U64Array len;
};

SegmentArrays segment_arrays(const py::object& src_addrs, const py::object& dst_addrs, const py::object& lengths) {
  SegmentArrays a{as_u64_array(src_addrs, "src_addrs"), as_u64_array(dst_addrs, "dst_addrs"),
                  as_u64_array(lengths, "lengths")};
  check_same_size("src_addrs", a.src, "lengths", a.len);
  check_same_size("dst_addrs", a.dst, "lengths", a.len);
  return a;
}

void copy_segments(const py::object& src_addrs, const py::object& dst_addrs, const py::object& lengths,
                   std::uintptr_t stream) {
  const SegmentArrays a = segment_arrays(src_addrs, dst_addrs, lengths);
  // Null or wrapping segments raise std::invalid_argument (ValueError) before
  // any CUDA call.
  py::gil_scoped_release release;
  kc::copy_segments(a.src.data, a.dst.data, a.len.data, a.len.size, stream);
}

void copy_segments_ce(const py::object& src_addrs, const py::object& dst_addrs, const py::object& lengths,
                      std::uintptr_t stream) {
  const SegmentArrays a = segment_arrays(src_addrs, dst_addrs, lengths);
  py::gil_scoped_release release;
  kc::copy_segments_ce(a.src.data, a.dst.data, a.len.data, a.len.size, stream);
}

using nogil = py::call_guard<py::gil_scoped_release>;

}  // namespace

PYBIND11_MODULE(_native_cuda, m) {
  m.doc() =
      "llumnix-kv CUDA core: scattered segment copies in one kernel launch, plus runtime helpers.\n"
      "Pointers, streams and events are plain integers. Errors raise RuntimeError naming the CUDA error.";
  m.attr("__version__") = LLUMNIX_KV_VERSION;
  m.attr("IPC_HANDLE_BYTES") = kc::kIpcHandleBytes;

  m.def("runtime_version", &kc::runtime_version, "CUDA runtime version this module was built with (e.g. 13000).");
  m.def("driver_version", &kc::driver_version, "Installed driver's CUDA version, 0 when no driver is installed.");
  m.def("device_count", &kc::device_count,
        "Number of CUDA devices; raises RuntimeError naming the CUDA error when there is no driver or device.");
  m.def("set_device", &kc::set_device, nogil(), py::arg("device"));
  m.def("get_device", &kc::get_device);
  m.def("device_enable_peer_access", &kc::device_enable_peer_access, nogil(), py::arg("peer"),
        "Let the current device access memory of `peer` (already enabled is not an error).");

  m.def("copy_segments", &copy_segments, py::arg("src_addrs"), py::arg("dst_addrs"), py::arg("lengths"),
        py::arg("stream") = 0,
        "Copy lengths[i] bytes from src_addrs[i] to dst_addrs[i] for every i with ONE kernel launch on\n"
        "`stream` (0 = legacy default stream) of the current device. Addresses may be device, peer-mapped\n"
        "or pinned host memory. Arguments are 1-D numpy.uint64 arrays of equal length. Asynchronous:\n"
        "call synchronize(stream) or record an event before reading the destination.");
  m.def("copy_segments_ce", &copy_segments_ce, py::arg("src_addrs"), py::arg("dst_addrs"), py::arg("lengths"),
        py::arg("stream"),
        "Same contract as copy_segments, through the copy engines' batched API (cudaMemcpyBatchAsync) in one\n"
        "call on `stream` (a created stream; the legacy default stream is refused).");
  m.def("memcpy_async", &kc::memcpy_async, nogil(), py::arg("dst"), py::arg("src"), py::arg("nbytes"),
        py::arg("stream") = 0, "cudaMemcpyAsync(cudaMemcpyDefault): any two UVA addresses, peer-mapped included.");
  m.def("mem_get_address_range", &kc::mem_get_address_range, nogil(), py::arg("ptr"),
        "(base, size) of the device allocation that holds `ptr`; CUDA IPC exports whole allocations.");
  m.def("device_can_access_peer", &kc::device_can_access_peer, nogil(), py::arg("device"), py::arg("peer"));
  m.def("pointer_info", &kc::pointer_info, nogil(), py::arg("ptr"),
        "(kind, device) of a pointer; kind is 'device', 'host' (pinned/registered), 'managed' or 'unregistered'.");
  m.def("event_create_timed", &kc::event_create_timed, nogil(), "A new event with timing enabled.");
  m.def("event_elapsed_ms", &kc::event_elapsed_ms, nogil(), py::arg("start"), py::arg("end"));
  m.def("spin", &kc::spin, nogil(), py::arg("nanoseconds"), py::arg("ctas") = 1, py::arg("stream") = 0,
        "Keep `ctas` CTAs busy for `nanoseconds` on `stream` (a synthetic layer of compute).");
  m.def("sm_count", &kc::sm_count_of, nogil(), py::arg("device"));
  m.def("device_name", &kc::device_name, nogil(), py::arg("device"));
  m.def("synchronize", &kc::synchronize, nogil(), py::arg("stream") = 0);

  m.def("malloc", &kc::malloc_device, nogil(), py::arg("nbytes"));
  m.def("free", &kc::free_device, nogil(), py::arg("ptr"));
  m.def("mem_get_info", &kc::mem_get_info, nogil(), "(free, total) bytes of the current device.");
  m.def("malloc_host", &kc::malloc_host, nogil(), py::arg("nbytes"),
        "Pinned (page-locked, mapped, portable) host memory.");
  m.def("free_host", &kc::free_host, nogil(), py::arg("ptr"));
  m.def("memcpy_htod", &kc::memcpy_htod,
        nogil(), py::arg("dst"), py::arg("src_host_addr"), py::arg("nbytes"));
  m.def("memcpy_dtoh", &kc::memcpy_dtoh,
        nogil(), py::arg("dst_host_addr"), py::arg("src"), py::arg("nbytes"));
  m.def("memset", &kc::memset_device, nogil(), py::arg("dst"),
        py::arg("value"), py::arg("nbytes"));

  m.def("stream_create", &kc::stream_create, "A new non-blocking stream on the current device.", nogil());
  m.def("stream_destroy", &kc::stream_destroy, nogil(), py::arg("stream"));
  m.def("event_create", &kc::event_create, "A new event (timing disabled).", nogil());
  m.def("event_destroy", &kc::event_destroy, nogil(), py::arg("event"));
  m.def("event_record", &kc::event_record, nogil(), py::arg("event"),
        py::arg("stream") = 0,
        "Record `event` on `stream`; inside a stream capture it becomes an event-record node of the graph\n"
        "(recorded at every replay), so streams outside the graph can wait for it.");
  m.def("stream_wait_event", &kc::stream_wait_event,
        nogil(), py::arg("stream"), py::arg("event"));
  m.def("event_synchronize", &kc::event_synchronize, nogil(), py::arg("event"));
  m.def("event_query", &kc::event_query, nogil(), py::arg("event"),
        "True when all work captured by the event has completed.");

  m.def(
      "ipc_get_mem_handle",
      [](std::uintptr_t p) {
        std::string h;
        {
          py::gil_scoped_release release;
          h = kc::ipc_get_mem_handle(p);
        }
        return py::bytes(h);
      },
      py::arg("ptr"), "64-byte handle another process can open with ipc_open_mem_handle.");
  m.def(
      "ipc_open_mem_handle",
      [](const py::bytes& handle) {
        std::string h = handle;
        py::gil_scoped_release release;
        return kc::ipc_open_mem_handle(h);
      },
      py::arg("handle"));
  m.def("ipc_close_mem_handle", &kc::ipc_close_mem_handle, nogil(), py::arg("ptr"));
  m.def("is_vmm", &kc::is_vmm, nogil(), py::arg("ptr"),
        "True when `ptr` lies in virtual memory (cuMemCreate + cuMemMap), which legacy CUDA IPC cannot export.");
  m.def("vmm_granularity", &kc::vmm_granularity, nogil(), py::arg("device"),
        "Minimum granularity of exportable virtual-memory allocations on `device`.");
  m.def(
      "vmm_export_fd",
      [](std::uintptr_t p) {
        kc::VmmExport e{};
        {
          py::gil_scoped_release release;
          e = kc::vmm_export_fd(p);
        }
        return py::make_tuple(e.fd, e.base, e.size);
      },
      py::arg("ptr"),
      "(fd, base, size): the physical allocation mapped at `ptr` exported as a POSIX file descriptor (the\n"
      "caller closes it), and the start and size of its mapping. Raises naming the cause when the memory is\n"
      "not virtual memory or was not created exportable.");
  m.def("vmm_import", &kc::vmm_import, nogil(), py::arg("fd"), py::arg("size"), py::arg("device"),
        "Import an exported allocation, map it and open it for read/write on `device`; returns the mapped\n"
        "address. `fd` stays open (the caller closes it); undo with vmm_unmap(ptr, size).");
  m.def("vmm_unmap", &kc::vmm_unmap, nogil(), py::arg("ptr"), py::arg("size"));
  m.def("vmm_alloc", &kc::vmm_alloc, nogil(), py::arg("device"), py::arg("size"), py::arg("exportable") = true,
        "Virtual memory on `device` as vLLM's extensible KV cache makes it: one cuMemCreate allocation\n"
        "(exportable as a POSIX fd unless `exportable` is False), size rounded up to the granularity, mapped\n"
        "read/write. Free with vmm_free.");
  m.def("vmm_free", &kc::vmm_free, nogil(), py::arg("ptr"));
  m.def(
      "capabilities", [] { return py::make_tuple("cuda_copy", "cuda_ipc", "cuda_copy_ce", "cuda_vmm"); },
      "Features this build provides.");
}
