// Scatter/gather transfers of memory segments over stream sockets.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace llumnix_kv {

struct IoOptions {
  // Longest wait for any progress, in seconds; negative = wait forever.
  double timeout_s = -1.0;
  // Called (without any lock held) when a system call was interrupted by a
  // signal; may throw to abort the transfer (e.g. on KeyboardInterrupt).
  std::function<void()> on_interrupt;
};

// Writes `header` and then every segment in order to the stream socket `fd`.
// Uses sendmsg with MSG_NOSIGNAL | MSG_DONTWAIT and up to IOV_MAX iovecs per
// call; waits with poll() when the socket buffer is full. Returns the number
// of bytes written (header + segments). Throws TimeoutError, or SystemError
// (EPIPE/ECONNRESET when the peer closed, with a message saying so).
// A non-socket fd (e.g. a pipe) falls back to writev after a poll().
std::uint64_t send_segments(int fd, const void* header, std::size_t header_len, const std::uint64_t* addrs,
                            const std::uint64_t* lengths, std::size_t n, const IoOptions& options);

// Reads exactly sum(lengths) bytes from `fd` into the segments in order
// (recvmsg with MSG_DONTWAIT, up to IOV_MAX iovecs per call; poll() while no
// data is pending). Returns the number of bytes read. Throws TimeoutError,
// PeerClosedError (end of stream before all bytes arrived) or SystemError.
std::uint64_t recv_segments(int fd, const std::uint64_t* addrs, const std::uint64_t* lengths, std::size_t n,
                            const IoOptions& options);

}  // namespace llumnix_kv
