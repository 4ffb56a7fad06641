// Python module llumnix_kv_core._native: host-side copy and socket I/O.
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <vector>

#include "common.h"
#include "plan_bindings.h"
#include "llumnix_kv/cma.h"
#include "llumnix_kv/copy.h"
#include "llumnix_kv/digest.h"
#include "llumnix_kv/errors.h"
#include "llumnix_kv/segments.h"
#include "llumnix_kv/socket_io.h"

#ifndef LLUMNIX_KV_VERSION
#define LLUMNIX_KV_VERSION "0+unknown"
#endif

namespace py = pybind11;
using llumnix_kv::bindings::as_u64_array;
using llumnix_kv::bindings::check_same_size;
using llumnix_kv::bindings::U64Array;

namespace {

int as_fd(const py::object& fd) {
  int v = PyObject_AsFileDescriptor(fd.ptr());
  if (v < 0) throw py::error_already_set();
  return v;
}

double as_timeout(const py::object& timeout_s) {
  if (timeout_s.is_none()) return -1.0;
  double t = PyFloat_AsDouble(timeout_s.ptr());
  if (t == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  if (std::isnan(t) || t < 0) {
    throw py::value_error("timeout_s must be a number >= 0 (seconds) or None for no limit, got " +
                          std::string(py::repr(timeout_s)));
  }
  return t;
}

llumnix_kv::IoOptions io_options(double timeout_s) {
  llumnix_kv::IoOptions opt;
  opt.timeout_s = timeout_s;
  opt.on_interrupt = [] {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  };
  return opt;
}

// Holds a contiguous buffer view of a bytes-like object.
class ByteView {
 public:
  explicit ByteView(const py::object& obj) {
    if (obj.is_none()) return;
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) {
      PyErr_Clear();
      throw py::type_error("header must be a contiguous bytes-like object (bytes, bytearray, memoryview), got " +
                           std::string(py::str(py::type::of(obj).attr("__name__"))));
    }
    held_ = true;
  }
  ~ByteView() {
    if (held_) PyBuffer_Release(&view_);
  }
  ByteView(const ByteView&) = delete;
  ByteView& operator=(const ByteView&) = delete;
  const void* data() const { return held_ ? view_.buf : nullptr; }
  std::size_t size() const { return held_ ? static_cast<std::size_t>(view_.len) : 0; }

 private:
  Py_buffer view_{};
  bool held_ = false;
};

void copy_segments(const py::object& src_addrs, const py::object& dst_addrs, const py::object& lengths,
                   int num_threads) {
  U64Array src = as_u64_array(src_addrs, "src_addrs");
  U64Array dst = as_u64_array(dst_addrs, "dst_addrs");
  U64Array len = as_u64_array(lengths, "lengths");
  check_same_size("src_addrs", src, "lengths", len);
  check_same_size("dst_addrs", dst, "lengths", len);
  if (num_threads < 0) throw py::value_error("num_threads must be >= 0 (0 = one per core, capped)");
  llumnix_kv::checked_total("src_addrs", src.data, len.data, len.size);
  llumnix_kv::checked_total("dst_addrs", dst.data, len.data, len.size);
  py::gil_scoped_release release;
  llumnix_kv::copy_segments(src.data, dst.data, len.data, len.size, static_cast<unsigned>(num_threads));
}

py::array_t<std::uint64_t> digest_segments(const py::object& addrs, const py::object& lengths) {
  U64Array a = as_u64_array(addrs, "addrs");
  U64Array len = as_u64_array(lengths, "lengths");
  check_same_size("addrs", a, "lengths", len);
  llumnix_kv::checked_total("addrs", a.data, len.data, len.size);
  py::array_t<std::uint64_t> out(static_cast<py::ssize_t>(len.size));
  std::uint64_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    llumnix_kv::digest_segments(a.data, len.data, len.size, dst);
  }
  return out;
}

std::uint64_t cma_copy(int pid, bool write, const py::object& local_addrs, const py::object& remote_addrs,
                       const py::object& lengths, int num_threads) {
  U64Array local = as_u64_array(local_addrs, "local_addrs");
  U64Array remote = as_u64_array(remote_addrs, "remote_addrs");
  U64Array len = as_u64_array(lengths, "lengths");
  check_same_size("local_addrs", local, "lengths", len);
  check_same_size("remote_addrs", remote, "lengths", len);
  if (num_threads < 0) throw py::value_error("num_threads must be >= 0 (0 = one per core, capped)");
  if (pid <= 0) throw py::value_error("pid must be a process id (> 0)");
  llumnix_kv::checked_total("local_addrs", local.data, len.data, len.size);
  llumnix_kv::checked_total("remote_addrs", remote.data, len.data, len.size);
  py::gil_scoped_release release;
  return llumnix_kv::cma_copy(pid, write, local.data, remote.data, len.data, len.size,
                              static_cast<unsigned>(num_threads));
}

std::uint64_t send_segments(const py::object& fd, const py::object& header, const py::object& addrs,
                            const py::object& lengths, const py::object& timeout_s) {
  const int f = as_fd(fd);
  ByteView head(header);
  U64Array a = as_u64_array(addrs, "addrs");
  U64Array len = as_u64_array(lengths, "lengths");
  check_same_size("addrs", a, "lengths", len);
  llumnix_kv::checked_total("addrs", a.data, len.data, len.size);
  const llumnix_kv::IoOptions opt = io_options(as_timeout(timeout_s));
  py::gil_scoped_release release;
  return llumnix_kv::send_segments(f, head.data(), head.size(), a.data, len.data, len.size, opt);
}

std::uint64_t recv_segments(const py::object& fd, const py::object& addrs, const py::object& lengths,
                            const py::object& timeout_s) {
  const int f = as_fd(fd);
  U64Array a = as_u64_array(addrs, "addrs");
  U64Array len = as_u64_array(lengths, "lengths");
  check_same_size("addrs", a, "lengths", len);
  llumnix_kv::checked_total("addrs", a.data, len.data, len.size);
  const llumnix_kv::IoOptions opt = io_options(as_timeout(timeout_s));
  py::gil_scoped_release release;
  return llumnix_kv::recv_segments(f, a.data, len.data, len.size, opt);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "llumnix-kv native core: batched host copies and scatter/gather socket I/O";
  m.attr("__version__") = LLUMNIX_KV_VERSION;

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const llumnix_kv::TimeoutError& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    } catch (const llumnix_kv::PeerClosedError& e) {
      PyErr_SetString(PyExc_ConnectionError, e.what());
    } catch (const llumnix_kv::SystemError& e) {
      // OSError(errno, message) becomes the matching subclass
      // (BrokenPipeError, ConnectionResetError, ...).
      PyObject* args = Py_BuildValue("(is)", e.code(), e.what());
      if (args != nullptr) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
      }
    } catch (const llumnix_kv::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def("copy_segments", &copy_segments, py::arg("src_addrs"), py::arg("dst_addrs"), py::arg("lengths"),
        py::arg("num_threads") = 0,
        "Copy lengths[i] bytes from src_addrs[i] to dst_addrs[i] for every i (host memory).\n\n"
        "Arguments are 1-D numpy.uint64 arrays of equal length. Work is split by bytes over a\n"
        "persistent thread pool (num_threads=0: one per core, capped); copies under 256 KiB run on\n"
        "the calling thread. Destinations must not overlap. Releases the GIL.");
  m.def("send_segments", &send_segments, py::arg("fd"), py::arg("header"), py::arg("addrs"), py::arg("lengths"),
        py::arg("timeout_s"),
        "Write header, then every segment in order, to the stream socket fd. Returns bytes written.\n\n"
        "timeout_s bounds each wait for progress (None: no limit). Raises TimeoutError,\n"
        "ConnectionError (peer closed) or OSError. Releases the GIL.");
  m.def("recv_segments", &recv_segments, py::arg("fd"), py::arg("addrs"), py::arg("lengths"), py::arg("timeout_s"),
        "Read exactly sum(lengths) bytes from fd into the segments in order. Returns bytes read.\n\n"
        "timeout_s bounds each wait for progress (None: no limit). Raises TimeoutError,\n"
        "ConnectionError (end of stream before all bytes) or OSError. Releases the GIL.");
  m.def("cma_copy", &cma_copy, py::arg("pid"), py::arg("write"), py::arg("local_addrs"), py::arg("remote_addrs"),
        py::arg("lengths"), py::arg("num_threads") = 0,
        "Copy lengths[i] bytes between local_addrs[i] here and remote_addrs[i] in process pid (write=True:\n"
        "here -> there) with Linux cross-memory attach: one copy by the kernel, no staging. Work is split\n"
        "by bytes over up to num_threads threads. Raises OSError (EPERM: not allowed to access the\n"
        "process; ESRCH: no such process; EFAULT: an address is not mapped there). Releases the GIL.");
  m.def("digest_segments", &digest_segments, py::arg("addrs"), py::arg("lengths"),
        "XXH3-64 (seed 0, default secret) of each segment: out[i] hashes lengths[i] bytes at addrs[i].\n\n"
        "Returns a numpy.uint64 array of len(lengths) digests. Runs on the calling thread; releases the GIL.");
  llumnix_kv::bindings::bind_plan(m);
  m.def(
      "capabilities", [] { return std::vector<std::string>{"cpu_copy", "socket_io", "threaded_copy", "cma", "digest"}; },
      "Features this build provides.");
}
