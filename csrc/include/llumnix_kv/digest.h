// Digests of DATA payloads: XXH3-64 (seed 0, default secret) of each segment.
#pragma once

#include <cstddef>
#include <cstdint>

namespace llumnix_kv {

// XXH3-64 of `len` bytes at `data`, with seed 0 and the default secret, as the
// xxHash specification (doc/xxhash_spec.md, "XXH3 Algorithm") defines it.
std::uint64_t xxh3_64(const void* data, std::size_t len);

// out[i] = xxh3_64(addrs[i], lengths[i]) for every i; runs on the calling thread.
// Call without holding any interpreter lock.
void digest_segments(const std::uint64_t* addrs, const std::uint64_t* lengths, std::size_t n, std::uint64_t* out);

}  // namespace llumnix_kv
