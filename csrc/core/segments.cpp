#include "llumnix_kv/segments.h"

#include <limits>
#include <string>

#include "llumnix_kv/errors.h"

namespace llumnix_kv {

std::uint64_t checked_total(const char* what, const std::uint64_t* addrs, const std::uint64_t* lengths,
                            std::size_t n) {
  constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint64_t len = lengths[i];
    if (len == 0) continue;
    const std::uint64_t addr = addrs[i];
    if (addr == 0) {
      throw InvalidArgument(std::string(what) + "[" + std::to_string(i) + "] is a null address for a segment of " +
                            std::to_string(len) + " bytes");
    }
    if (len > kMax - addr) {
      throw InvalidArgument(std::string(what) + "[" + std::to_string(i) + "] + lengths[" + std::to_string(i) +
                            "] wraps past the end of the address space");
    }
    if (len > kMax - total) {
      throw InvalidArgument("the total of lengths overflows 64 bits");
    }
    total += len;
  }
  return total;
}

}  // namespace llumnix_kv
