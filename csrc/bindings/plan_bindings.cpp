// Binding of the plan compiler's per-request stage into llumnix_kv_core._native (bind_plan).
#include "plan_bindings.h"

#include <pybind11/numpy.h>

#include <string>
#include <utility>

#include "llumnix_kv/plan.h"

namespace py = pybind11;

namespace llumnix_kv {
namespace bindings {

namespace {

using I64Array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

I64Array as_i64(const py::handle& obj, const char* name) {
  auto arr = I64Array::ensure(obj);
  if (!arr) throw py::value_error(std::string(name) + " must be convertible to a 1-D int64 array");
  if (arr.ndim() != 1) throw py::value_error(std::string(name) + " must be 1-D");
  return arr;
}

py::array_t<std::uint64_t> to_numpy(std::vector<std::uint64_t>&& v) {
  auto* heap = new std::vector<std::uint64_t>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<std::uint64_t>*>(p); });
  return py::array_t<std::uint64_t>({static_cast<py::ssize_t>(heap->size())}, {sizeof(std::uint64_t)},
                                    heap->data(), owner);
}

py::tuple plan_segments(const py::handle& src_blocks, const py::handle& dst_blocks, std::int64_t src_stride,
                        std::int64_t dst_stride, std::int64_t src_num_blocks, std::int64_t dst_num_blocks,
                        const py::handle& tpl_src, const py::handle& tpl_dst, const py::handle& tpl_len) {
  auto sb = as_i64(src_blocks, "src_blocks");
  auto db = as_i64(dst_blocks, "dst_blocks");
  auto ts = as_i64(tpl_src, "tpl_src");
  auto td = as_i64(tpl_dst, "tpl_dst");
  auto tl = as_i64(tpl_len, "tpl_len");
  if (sb.shape(0) != db.shape(0)) {
    throw py::value_error(std::to_string(sb.shape(0)) + " source blocks but " + std::to_string(db.shape(0)) +
                          " destination blocks");
  }
  if (ts.shape(0) != td.shape(0) || ts.shape(0) != tl.shape(0)) {
    throw py::value_error("template arrays must have the same length");
  }
  SegmentList out;
  {
    py::gil_scoped_release release;
    out = llumnix_kv::plan_segments(sb.data(), db.data(), static_cast<std::size_t>(sb.shape(0)), src_stride,
                                    dst_stride, src_num_blocks, dst_num_blocks, ts.data(), td.data(), tl.data(),
                                    static_cast<std::size_t>(ts.shape(0)));
  }
  return py::make_tuple(to_numpy(std::move(out.src)), to_numpy(std::move(out.dst)), to_numpy(std::move(out.len)));
}

}  // namespace

void bind_plan(py::module_& m) {
  m.def("plan_segments", &plan_segments, py::arg("src_blocks"), py::arg("dst_blocks"), py::arg("src_stride"),
        py::arg("dst_stride"), py::arg("src_num_blocks"), py::arg("dst_num_blocks"), py::arg("tpl_src"),
        py::arg("tpl_dst"), py::arg("tpl_len"),
        "Broadcast a block template over block pairs and coalesce: (src_offsets, dst_offsets, lengths) as\n"
        "numpy.uint64 arrays. Same result as llumnix_kv_core.plan's NumPy path. Raises ValueError for a\n"
        "block id out of range. Releases the GIL.");
}

}  // namespace bindings
}  // namespace llumnix_kv
