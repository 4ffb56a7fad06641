#include "llumnix_kv/copy.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "llumnix_kv/thread_pool.h"

namespace llumnix_kv {

namespace {

inline void copy_bytes(std::uint64_t dst, std::uint64_t src, std::uint64_t n) {
  if (n != 0) {
    std::memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), static_cast<std::size_t>(n));
  }
}

}  // namespace

void copy_segments(const std::uint64_t* src, const std::uint64_t* dst, const std::uint64_t* lengths,
                   std::size_t n, unsigned num_threads) {
  if (n == 0) return;

  // Prefix sums of lengths: segment i covers [starts[i], starts[i + 1]) of
  // the virtual concatenation of all segments.
  std::vector<std::uint64_t> starts(n + 1);
  starts[0] = 0;
  for (std::size_t i = 0; i < n; ++i) starts[i + 1] = starts[i] + lengths[i];
  const std::uint64_t total = starts[n];
  if (total == 0) return;

  unsigned threads = num_threads == 0 ? ThreadPool::default_threads() : std::min(num_threads, ThreadPool::kMaxThreads);
  std::uint64_t tasks = total < kInlineCopyBytes ? 1 : std::max<std::uint64_t>(1, total / kMinBytesPerTask);
  tasks = std::min<std::uint64_t>(tasks, threads);

  if (tasks <= 1) {
    for (std::size_t i = 0; i < n; ++i) copy_bytes(dst[i], src[i], lengths[i]);
    return;
  }

  // Task t copies bytes [t * total / tasks, (t + 1) * total / tasks) of the
  // concatenation, which may start and end inside segments. Boundaries are
  // rounded to 64 bytes so that threads do not share cache lines of a
  // destination more than necessary.
  auto boundary = [&](std::uint64_t t) -> std::uint64_t {
    if (t >= tasks) return total;
    // 128-bit free: total / tasks * t may overflow only for totals > 2^58,
    // so compute as quotient and remainder.
    std::uint64_t q = total / tasks, r = total % tasks;
    std::uint64_t b = q * t + (r * t) / tasks;
    return std::min<std::uint64_t>(total, b & ~std::uint64_t{63});
  };
  ThreadPool::global().run(static_cast<std::size_t>(tasks), static_cast<unsigned>(tasks), [&](std::size_t t) {
    const std::uint64_t begin = boundary(t);
    const std::uint64_t end = boundary(t + 1);
    if (begin >= end) return;
    // First segment whose end is beyond `begin`.
    std::size_t i = static_cast<std::size_t>(std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin()) - 1;
    std::uint64_t pos = begin;
    while (pos < end && i < n) {
      const std::uint64_t seg_end = starts[i + 1];
      if (seg_end > pos) {
        const std::uint64_t off = pos - starts[i];
        const std::uint64_t stop = std::min(seg_end, end);
        copy_bytes(dst[i] + off, src[i] + off, stop - pos);
        pos = stop;
      }
      ++i;
    }
  });
}

}  // namespace llumnix_kv
