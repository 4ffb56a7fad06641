#include "llumnix_kv/cma.h"

#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "llumnix_kv/copy.h"
#include "llumnix_kv/errors.h"
#include "llumnix_kv/thread_pool.h"

namespace llumnix_kv {

namespace {

constexpr std::size_t kMaxIov = 1024;  // IOV_MAX on Linux

// Moves bytes [begin, end) of the concatenation of all segments with as few system calls as
// the iovec limit allows; a short transfer is resumed where it stopped.
int move_range(int pid, bool write, const std::uint64_t* local, const std::uint64_t* remote,
               const std::uint64_t* lengths, const std::vector<std::uint64_t>& starts, std::uint64_t begin,
               std::uint64_t end) {
  std::vector<iovec> liov, riov;
  liov.reserve(kMaxIov);
  riov.reserve(kMaxIov);
  const std::size_t n = starts.size() - 1;
  std::size_t i = static_cast<std::size_t>(std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin()) - 1;
  std::uint64_t pos = begin;
  while (pos < end) {
    liov.clear();
    riov.clear();
    std::uint64_t batch = 0;
    std::size_t j = i;
    std::uint64_t p = pos;
    for (; j < n && p < end && liov.size() < kMaxIov; ++j) {
      if (starts[j + 1] <= p) continue;
      const std::uint64_t off = p - starts[j];
      const std::uint64_t stop = std::min(starts[j + 1], end);
      const std::uint64_t len = stop - p;
      liov.push_back({reinterpret_cast<void*>(local[j] + off), static_cast<std::size_t>(len)});
      riov.push_back({reinterpret_cast<void*>(remote[j] + off), static_cast<std::size_t>(len)});
      batch += len;
      p = stop;
    }
    const ssize_t r = write ? process_vm_writev(pid, liov.data(), liov.size(), riov.data(), riov.size(), 0)
                            : process_vm_readv(pid, liov.data(), liov.size(), riov.data(), riov.size(), 0);
    if (r < 0) return errno;
    if (r == 0) return EFAULT;
    pos += static_cast<std::uint64_t>(r);
    while (i < n && starts[i + 1] <= pos) ++i;
    (void)lengths;
    (void)batch;
  }
  return 0;
}

}  // namespace

std::uint64_t cma_copy(int pid, bool write, const std::uint64_t* local, const std::uint64_t* remote,
                       const std::uint64_t* lengths, std::size_t n, unsigned num_threads) {
  if (n == 0) return 0;
  std::vector<std::uint64_t> starts(n + 1);
  starts[0] = 0;
  for (std::size_t i = 0; i < n; ++i) starts[i + 1] = starts[i] + lengths[i];
  const std::uint64_t total = starts[n];
  if (total == 0) return 0;
  const unsigned threads =
      num_threads == 0 ? ThreadPool::default_threads() : std::min(num_threads, ThreadPool::kMaxThreads);
  std::uint64_t tasks = total < kInlineCopyBytes ? 1 : std::max<std::uint64_t>(1, total / kMinBytesPerTask);
  tasks = std::min<std::uint64_t>(tasks, threads);
  std::atomic<int> error{0};
  auto boundary = [&](std::uint64_t t) -> std::uint64_t {
    if (t >= tasks) return total;
    const std::uint64_t q = total / tasks, r = total % tasks;
    return std::min<std::uint64_t>(total, (q * t + (r * t) / tasks) & ~std::uint64_t{4095});
  };
  auto run = [&](std::size_t t) {
    const std::uint64_t b = boundary(t), e = boundary(t + 1);
    if (b >= e) return;
    const int err = move_range(pid, write, local, remote, lengths, starts, b, e);
    if (err != 0) {
      int none = 0;
      error.compare_exchange_strong(none, err);
    }
  };
  if (tasks <= 1) {
    run(0);
  } else {
    ThreadPool::global().run(static_cast<std::size_t>(tasks), static_cast<unsigned>(tasks), run);
  }
  const int err = error.load();
  if (err != 0) {
    std::string what = std::string(write ? "process_vm_writev" : "process_vm_readv") + " to process " +
                       std::to_string(pid) + " failed: " + std::strerror(err);
    if (err == EPERM) what += " (this process may not access the peer's memory: different user, or a Yama ptrace policy)";
    throw SystemError(err, what);
  }
  return total;
}

}  // namespace llumnix_kv
