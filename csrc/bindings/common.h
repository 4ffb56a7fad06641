// Argument conversion shared by the Python bindings.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace llumnix_kv {
namespace bindings {

namespace py = pybind11;

// A validated, C-contiguous 1-D numpy.uint64 array kept alive for the call.
struct U64Array {
  py::array array;
  const std::uint64_t* data = nullptr;
  std::size_t size = 0;
};

inline U64Array as_u64_array(const py::handle& obj, const char* name) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::value_error(std::string(name) + " must be a 1-D numpy.uint64 array, got " +
                          std::string(py::str(py::type::of(obj).attr("__name__"))) +
                          "; convert with numpy.asarray(x, dtype=numpy.uint64) or call through "
                          "llumnix_kv_core.native, which accepts lists");
  }
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().equal(py::dtype::of<std::uint64_t>())) {
    throw py::value_error(std::string(name) + " must have dtype uint64, got " + std::string(py::str(arr.dtype())) +
                          "; convert with numpy.asarray(x, dtype=numpy.uint64)");
  }
  if (arr.ndim() != 1) {
    throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(arr.ndim()) + " dimensions");
  }
  if (!(arr.flags() & py::array::c_style)) {
    arr = py::array_t<std::uint64_t, py::array::c_style>::ensure(arr);
    if (!arr) throw py::error_already_set();
  }
  U64Array out;
  out.data = static_cast<const std::uint64_t*>(arr.data());
  out.size = static_cast<std::size_t>(arr.shape(0));
  out.array = std::move(arr);
  return out;
}

inline void check_same_size(const char* a_name, const U64Array& a, const char* b_name, const U64Array& b) {
  if (a.size != b.size) {
    throw py::value_error(std::string(a_name) + " and " + b_name + " must have the same length (got " +
                          std::to_string(a.size) + " and " + std::to_string(b.size) + ")");
  }
}

}  // namespace bindings
}  // namespace llumnix_kv
