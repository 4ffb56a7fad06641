// Validation helpers for segment tables (address/length arrays).
#pragma once

#include <cstddef>
#include <cstdint>

namespace llumnix_kv {

// Checks that every non-empty segment has a non-null address, that no
// address + length wraps around, and that the total does not overflow.
// Returns the total number of bytes. Throws InvalidArgument naming `what`
// and the offending index.
std::uint64_t checked_total(const char* what, const std::uint64_t* addrs, const std::uint64_t* lengths,
                            std::size_t n);

}  // namespace llumnix_kv
