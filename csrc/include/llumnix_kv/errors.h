// Error types thrown by the native core. The Python bindings translate each
// one to the matching built-in exception (TimeoutError, ConnectionError,
// OSError, ValueError).
#pragma once

#include <stdexcept>
#include <string>

namespace llumnix_kv {

// No progress was made before the deadline (-> TimeoutError).
class TimeoutError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The peer closed the connection (end of stream) before the transfer ended
// (-> ConnectionError).
class PeerClosedError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A system call failed with errno `code` (-> OSError(code, message), which
// Python maps to the matching subclass such as BrokenPipeError).
class SystemError : public std::runtime_error {
 public:
  SystemError(int code, const std::string& message) : std::runtime_error(message), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  int code_;
};

// A caller passed arguments that cannot describe a valid transfer
// (-> ValueError).
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace llumnix_kv
