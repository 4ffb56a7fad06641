// CUDA return-code checking shared by the .cu files.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "llumnix_kv/cuda_ops.h"

namespace llumnix_kv {
namespace cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* call) {
  throw CudaError(static_cast<int>(err), std::string(call) + " failed: " + cudaGetErrorName(err) + " (" +
                                             cudaGetErrorString(err) + ")");
}

}  // namespace cuda
}  // namespace llumnix_kv

#define LLUMNIX_CUDA_CHECK(expr)                                              \
  do {                                                                        \
    cudaError_t llumnix_err_ = (expr);                                        \
    if (llumnix_err_ != cudaSuccess) {                                        \
      ::llumnix_kv::cuda::throw_cuda_error(llumnix_err_, #expr);              \
    }                                                                         \
  } while (0)
