// Single-copy transfers between processes of one host (Linux cross-memory attach:
// process_vm_writev / process_vm_readv), scattered segments, split over threads.
#pragma once

#include <cstddef>
#include <cstdint>

namespace llumnix_kv {

// Copies lengths[i] bytes between local[i] in this process and remote[i] in process `pid`
// (write = true: local -> remote; false: remote -> local), every i. The kernel copies once,
// no staging buffer; the work is split by bytes over up to `num_threads` threads (0 = default).
// Needs permission to ptrace `pid` (same user, no stricter Yama policy). Throws SystemError
// (errno: EPERM, ESRCH, EFAULT, ...) naming the failing call. Returns the bytes copied.
std::uint64_t cma_copy(int pid, bool write, const std::uint64_t* local, const std::uint64_t* remote,
                       const std::uint64_t* lengths, std::size_t n, unsigned num_threads);

}  // namespace llumnix_kv
