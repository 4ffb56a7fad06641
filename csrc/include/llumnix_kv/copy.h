// Batched host memory copies of scattered segments.
#pragma once

#include <cstddef>
#include <cstdint>

namespace llumnix_kv {

// Below this many bytes in total a copy runs on the calling thread.
constexpr std::uint64_t kInlineCopyBytes = 256 * 1024;
// Each worker gets at least this many bytes, so small copies use few threads.
constexpr std::uint64_t kMinBytesPerTask = 256 * 1024;

// Copies lengths[i] bytes from src[i] to dst[i] for every i. The work is
// split by bytes over up to `num_threads` threads (0 = default): one huge
// segment is divided across threads, many small ones are batched together.
// Segments must not overlap each other's destinations. Call without holding
// any interpreter lock.
void copy_segments(const std::uint64_t* src, const std::uint64_t* dst, const std::uint64_t* lengths,
                   std::size_t n, unsigned num_threads);

}  // namespace llumnix_kv
