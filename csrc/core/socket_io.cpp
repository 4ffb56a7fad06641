#include "llumnix_kv/socket_io.h"

#include <limits.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "llumnix_kv/errors.h"

namespace llumnix_kv {

namespace {

std::size_t iov_max() {
#ifdef IOV_MAX
  long v = IOV_MAX;
#else
  long v = sysconf(_SC_IOV_MAX);
#endif
  if (v <= 0) v = 1024;
  return static_cast<std::size_t>(v);
}

std::string format_seconds(double s) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%g", s);
  return buf;
}

// Iterates over a list of (pointer, length) pieces, hands out batches of at
// most IOV_MAX iovecs and advances over partially transferred pieces.
class IovCursor {
 public:
  explicit IovCursor(std::size_t capacity) : max_(iov_max()) { pieces_.reserve(capacity); }

  void add(std::uint64_t addr, std::uint64_t len) {
    // Linux transfers at most ~2 GiB per call anyway; splitting keeps each
    // iov_len well inside ssize_t.
    constexpr std::uint64_t kMaxPiece = std::uint64_t{1} << 30;
    while (len > 0) {
      std::uint64_t take = std::min(len, kMaxPiece);
      iovec v;
      v.iov_base = reinterpret_cast<void*>(addr);
      v.iov_len = static_cast<std::size_t>(take);
      pieces_.push_back(v);
      addr += take;
      len -= take;
    }
  }

  bool done() const { return index_ >= pieces_.size(); }
  iovec* batch() { return pieces_.data() + index_; }
  int batch_count() const { return static_cast<int>(std::min(max_, pieces_.size() - index_)); }

  void advance(std::size_t n) {
    while (n > 0 && index_ < pieces_.size()) {
      iovec& v = pieces_[index_];
      if (n >= v.iov_len) {
        n -= v.iov_len;
        ++index_;
      } else {
        v.iov_base = static_cast<char*>(v.iov_base) + n;
        v.iov_len -= n;
        n = 0;
      }
    }
  }

 private:
  std::size_t max_;
  std::vector<iovec> pieces_;
  std::size_t index_ = 0;
};

using Clock = std::chrono::steady_clock;

// Waits until `fd` is ready for `events`. Returns normally when the fd is
// ready (or reports an error/hang-up, which the next I/O call surfaces).
// Throws TimeoutError after `timeout_s` seconds without readiness.
void wait_ready(int fd, short events, const IoOptions& opt, const char* op, std::uint64_t done,
                std::uint64_t total) {
  // Negative, NaN or absurdly long (> ~30 years) timeouts mean no deadline.
  const bool forever = !(opt.timeout_s >= 0.0) || opt.timeout_s > 1e9;
  const Clock::time_point deadline =
      forever ? Clock::time_point::max()
              : Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(opt.timeout_s));
  for (;;) {
    int wait_ms = -1;
    if (!forever) {
      auto left = std::chrono::duration_cast<std::chrono::microseconds>(deadline - Clock::now()).count();
      if (left < 0) left = 0;
      // Round up so that we never wake before the deadline.
      long long ms = (left + 999) / 1000;
      wait_ms = static_cast<int>(std::min<long long>(ms, INT_MAX));
    }
    pollfd p;
    p.fd = fd;
    p.events = events;
    p.revents = 0;
    int rc = ::poll(&p, 1, wait_ms);
    if (rc > 0) {
      if (p.revents & POLLNVAL) {
        throw SystemError(EBADF, std::string(op) + " failed: fd " + std::to_string(fd) + " is not open");
      }
      return;
    }
    if (rc == 0) {
      if (!forever && Clock::now() < deadline) continue;
      const bool sending = events & POLLOUT;
      throw TimeoutError(std::string(op) + " made no progress for " + format_seconds(opt.timeout_s) + " s (" +
                         std::to_string(done) + " of " + std::to_string(total) + " bytes " +
                         (sending ? "sent); the peer is not reading: check the receiver or raise timeout_s"
                                  : "received); the peer is not sending: check the sender or raise timeout_s"));
    }
    if (errno == EINTR) {
      if (opt.on_interrupt) opt.on_interrupt();
      continue;
    }
    int err = errno;
    throw SystemError(err, std::string(op) + " failed in poll(): " + std::strerror(err));
  }
}

}  // namespace

std::uint64_t send_segments(int fd, const void* header, std::size_t header_len, const std::uint64_t* addrs,
                            const std::uint64_t* lengths, std::size_t n, const IoOptions& opt) {
  IovCursor cur(n + 1);
  std::uint64_t total = header_len;
  if (header_len > 0) cur.add(reinterpret_cast<std::uint64_t>(header), header_len);
  for (std::size_t i = 0; i < n; ++i) {
    cur.add(addrs[i], lengths[i]);
    total += lengths[i];
  }
  std::uint64_t sent = 0;
  bool is_socket = true;
  while (!cur.done()) {
    ssize_t rc;
    if (is_socket) {
      msghdr msg;
      std::memset(&msg, 0, sizeof(msg));
      msg.msg_iov = cur.batch();
      msg.msg_iovlen = static_cast<decltype(msg.msg_iovlen)>(cur.batch_count());
      rc = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    } else {
      rc = ::writev(fd, cur.batch(), cur.batch_count());
    }
    if (rc >= 0) {
      sent += static_cast<std::uint64_t>(rc);
      cur.advance(static_cast<std::size_t>(rc));
      continue;
    }
    const int err = errno;
    if (err == EINTR) {
      if (opt.on_interrupt) opt.on_interrupt();
      continue;
    }
    if (err == EAGAIN || err == EWOULDBLOCK) {
      wait_ready(fd, POLLOUT, opt, "send", sent, total);
      continue;
    }
    if (err == ENOTSOCK && is_socket) {
      // Not a socket (a pipe, say): plain writev, waiting for room first
      // so that the timeout bounds each wait.
      is_socket = false;
      wait_ready(fd, POLLOUT, opt, "send", sent, total);
      continue;
    }
    if (err == EPIPE || err == ECONNRESET) {
      throw SystemError(err, "peer closed the connection after " + std::to_string(sent) + " of " +
                                 std::to_string(total) + " bytes were sent (" + std::strerror(err) + ")");
    }
    throw SystemError(err, "send failed after " + std::to_string(sent) + " of " + std::to_string(total) +
                               " bytes: " + std::strerror(err));
  }
  return sent;
}

std::uint64_t recv_segments(int fd, const std::uint64_t* addrs, const std::uint64_t* lengths, std::size_t n,
                            const IoOptions& opt) {
  IovCursor cur(n);
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < n; ++i) {
    cur.add(addrs[i], lengths[i]);
    total += lengths[i];
  }
  std::uint64_t got = 0;
  bool is_socket = true;
  while (!cur.done()) {
    ssize_t rc;
    if (is_socket) {
      msghdr msg;
      std::memset(&msg, 0, sizeof(msg));
      msg.msg_iov = cur.batch();
      msg.msg_iovlen = static_cast<decltype(msg.msg_iovlen)>(cur.batch_count());
      rc = ::recvmsg(fd, &msg, MSG_DONTWAIT);
    } else {
      rc = ::readv(fd, cur.batch(), cur.batch_count());
    }
    if (rc > 0) {
      got += static_cast<std::uint64_t>(rc);
      cur.advance(static_cast<std::size_t>(rc));
      continue;
    }
    if (rc == 0) {
      throw PeerClosedError("peer closed the connection after " + std::to_string(got) + " of " +
                            std::to_string(total) + " bytes were received (end of stream)");
    }
    const int err = errno;
    if (err == EINTR) {
      if (opt.on_interrupt) opt.on_interrupt();
      continue;
    }
    if (err == EAGAIN || err == EWOULDBLOCK) {
      wait_ready(fd, POLLIN, opt, "recv", got, total);
      continue;
    }
    if (err == ENOTSOCK && is_socket) {
      is_socket = false;
      wait_ready(fd, POLLIN, opt, "recv", got, total);
      continue;
    }
    if (err == ECONNRESET) {
      throw SystemError(err, "peer closed the connection after " + std::to_string(got) + " of " +
                                 std::to_string(total) + " bytes were received (" + std::strerror(err) + ")");
    }
    throw SystemError(err, "recv failed after " + std::to_string(got) + " of " + std::to_string(total) +
                               " bytes: " + std::strerror(err));
  }
  return got;
}

}  // namespace llumnix_kv
