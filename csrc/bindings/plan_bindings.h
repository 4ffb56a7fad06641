// The plan compiler's functions in llumnix_kv_core._native.
#pragma once

#include <pybind11/pybind11.h>

namespace llumnix_kv {
namespace bindings {

void bind_plan(pybind11::module_& m);

}  // namespace bindings
}  // namespace llumnix_kv
