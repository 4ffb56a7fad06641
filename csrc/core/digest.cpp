// XXH3-64 written from the xxHash specification (doc/xxhash_spec.md of the xxHash project, v0.2.0),
// for seed 0 and the default 192-byte secret: 0-16, 17-128, 129-240 and 241+ byte inputs each have
// their own algorithm there, and each has its function here. Little-endian reads throughout.
#include "llumnix_kv/digest.h"

#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LLUMNIX_KV_X86 1
#endif

namespace llumnix_kv {

namespace {

using u8 = std::uint8_t;
using u32 = std::uint32_t;
using u64 = std::uint64_t;

constexpr u64 kPrime32_1 = 0x9E3779B1ULL;
constexpr u64 kPrime32_2 = 0x85EBCA77ULL;
constexpr u64 kPrime32_3 = 0xC2B2AE3DULL;
constexpr u64 kPrime64_1 = 0x9E3779B185EBCA87ULL;
constexpr u64 kPrime64_2 = 0xC2B2AE3D27D4EB4FULL;
constexpr u64 kPrime64_3 = 0x165667B19E3779F9ULL;
constexpr u64 kPrime64_4 = 0x85EBCA77C2B2AE63ULL;
constexpr u64 kPrime64_5 = 0x27D4EB2F165667C5ULL;
constexpr u64 kPrimeMx1 = 0x165667919E3779F9ULL;
constexpr u64 kPrimeMx2 = 0x9FB21C651E98DF25ULL;

constexpr std::size_t kSecretSize = 192;
constexpr std::size_t kStripe = 64;
constexpr std::size_t kStripesPerBlock = (kSecretSize - kStripe) / 8;  // 16
constexpr std::size_t kBlock = kStripe * kStripesPerBlock;              // 1024

alignas(64) constexpr u8 kSecret[kSecretSize] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

inline u64 bswap64(u64 x) { return __builtin_bswap64(x); }

inline u64 read64(const u8* p) {
  u64 v;
  std::memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = bswap64(v);
#endif
  return v;
}

inline u32 read32(const u8* p) {
  u32 v;
  std::memcpy(&v, p, sizeof v);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap32(v);
#endif
  return v;
}

inline u64 rotl64(u64 x, int r) { return (x << r) | (x >> (64 - r)); }

// Low half xor high half of the 128-bit product.
inline u64 fold_mul(u64 a, u64 b) {
  const unsigned __int128 m = static_cast<unsigned __int128>(a) * b;
  return static_cast<u64>(m) ^ static_cast<u64>(m >> 64);
}

inline u64 avalanche(u64 x) {
  x ^= x >> 37;
  x *= kPrimeMx1;
  return x ^ (x >> 32);
}

inline u64 avalanche_xxh64(u64 x) {
  x ^= x >> 33;
  x *= kPrime64_2;
  x ^= x >> 29;
  x *= kPrime64_3;
  return x ^ (x >> 32);
}

// The spec's mixStep with seed 0.
inline u64 mix_step(const u8* data, std::size_t secret_offset) {
  return fold_mul(read64(data) ^ read64(kSecret + secret_offset), read64(data + 8) ^ read64(kSecret + secret_offset + 8));
}

u64 hash_small(const u8* p, std::size_t len) {
  if (len > 8) {  // 9-16
    const u64 low = (read64(kSecret + 24) ^ read64(kSecret + 32)) ^ read64(p);
    const u64 high = (read64(kSecret + 40) ^ read64(kSecret + 48)) ^ read64(p + len - 8);
    return avalanche(len + bswap64(low) + high + fold_mul(low, high));
  }
  if (len >= 4) {  // 4-8
    const u64 combined = static_cast<u64>(read32(p + len - 4)) | (static_cast<u64>(read32(p)) << 32);
    u64 v = (read64(kSecret + 8) ^ read64(kSecret + 16)) ^ combined;
    v ^= rotl64(v, 49) ^ rotl64(v, 24);
    v *= kPrimeMx2;
    v ^= (v >> 35) + len;
    v *= kPrimeMx2;
    return v ^ (v >> 28);
  }
  if (len > 0) {  // 1-3
    const u32 combined = static_cast<u32>(p[len - 1]) | (static_cast<u32>(len) << 8) |
                         (static_cast<u32>(p[0]) << 16) | (static_cast<u32>(p[len >> 1]) << 24);
    return avalanche_xxh64(static_cast<u64>(read32(kSecret) ^ read32(kSecret + 4)) ^ combined);
  }
  return avalanche_xxh64(read64(kSecret + 56) ^ read64(kSecret + 64));
}

u64 hash_medium(const u8* p, std::size_t len) {
  u64 acc = len * kPrime64_1;
  if (len <= 128) {
    for (std::size_t i = ((len - 1) >> 5) + 1; i-- > 0;) {
      acc += mix_step(p + 16 * i, 32 * i);
      acc += mix_step(p + len - 16 * i - 16, 32 * i + 16);
    }
    return avalanche(acc);
  }
  for (std::size_t i = 0; i < 8; ++i) acc += mix_step(p + 16 * i, 16 * i);
  acc = avalanche(acc);
  for (std::size_t i = 8; i < (len >> 4); ++i) acc += mix_step(p + 16 * i, 16 * (i - 8) + 3);
  acc += mix_step(p + len - 16, 119);
  return avalanche(acc);
}

// One stripe (8 lanes of 8 bytes) into the accumulators, with the secret at `secret`.
inline void accumulate(u64* __restrict acc, const u8* __restrict stripe, const u8* __restrict secret) {
  for (int i = 0; i < 8; ++i) {
    const u64 value = read64(stripe + 8 * i);
    const u64 keyed = value ^ read64(secret + 8 * i);
    acc[i ^ 1] += value;
    acc[i] += (keyed & 0xFFFFFFFFULL) * (keyed >> 32);
  }
}

inline void scramble(u64* acc) {
  const u8* secret = kSecret + kSecretSize - kStripe;
  for (int i = 0; i < 8; ++i) {
    u64 a = acc[i];
    a ^= a >> 47;
    a ^= read64(secret + 8 * i);
    acc[i] = a * kPrime32_1;
  }
}

// The full blocks of a large input: the spec's rounds (stripes accumulated, then a scramble).
void blocks_scalar(u64* acc, const u8* p, std::size_t blocks) {
  for (std::size_t b = 0; b < blocks; ++b) {
    const u8* block = p + b * kBlock;
    for (std::size_t s = 0; s < kStripesPerBlock; ++s) accumulate(acc, block + s * kStripe, kSecret + 8 * s);
    scramble(acc);
  }
}

#ifdef LLUMNIX_KV_X86
// The same rounds four lanes at a time (AVX2): lo32 * hi32 is one vpmuludq; lane i ^ 1 is a swap of the
// two 64-bit halves of each 128-bit lane.
__attribute__((target("avx2"))) void blocks_avx2(u64* acc_out, const u8* p, std::size_t blocks) {
  __m256i acc[2] = {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc_out)),
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc_out + 4))};
  const __m256i prime = _mm256_set1_epi32(static_cast<int>(kPrime32_1));
  for (std::size_t b = 0; b < blocks; ++b) {
    const u8* block = p + b * kBlock;
    for (std::size_t s = 0; s < kStripesPerBlock; ++s) {
      for (int j = 0; j < 2; ++j) {
        const __m256i data = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + s * kStripe + 32 * j));
        const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kSecret + 8 * s + 32 * j));
        const __m256i keyed = _mm256_xor_si256(data, key);
        const __m256i product = _mm256_mul_epu32(keyed, _mm256_srli_epi64(keyed, 32));
        const __m256i swapped = _mm256_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));
        acc[j] = _mm256_add_epi64(acc[j], _mm256_add_epi64(product, swapped));
      }
    }
    for (int j = 0; j < 2; ++j) {
      const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kSecret + kSecretSize - kStripe + 32 * j));
      __m256i a = _mm256_xor_si256(acc[j], _mm256_srli_epi64(acc[j], 47));
      a = _mm256_xor_si256(a, key);
      const __m256i lo = _mm256_mul_epu32(a, prime);
      const __m256i hi = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), prime);
      acc[j] = _mm256_add_epi64(lo, _mm256_slli_epi64(hi, 32));
    }
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc_out), acc[0]);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc_out + 4), acc[1]);
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2");
#endif

u64 hash_large(const u8* p, std::size_t len) {
  alignas(64) u64 acc[8] = {kPrime32_3, kPrime64_1, kPrime64_2, kPrime64_3,
                            kPrime64_4, kPrime32_2, kPrime64_5, kPrime32_1};
  const std::size_t blocks = (len - 1) / kBlock;  // the last block (even if full) is left to the last round
#ifdef LLUMNIX_KV_X86
  if (kHasAvx2) {
    blocks_avx2(acc, p, blocks);
  } else {
    blocks_scalar(acc, p, blocks);
  }
#else
  blocks_scalar(acc, p, blocks);
#endif
  const u8* last = p + blocks * kBlock;
  const std::size_t full_stripes = (len - blocks * kBlock - 1) / kStripe;
  for (std::size_t s = 0; s < full_stripes; ++s) accumulate(acc, last + s * kStripe, kSecret + 8 * s);
  accumulate(acc, p + len - kStripe, kSecret + kSecretSize - 71);
  u64 result = len * kPrime64_1;
  for (int i = 0; i < 4; ++i) {
    result += fold_mul(acc[2 * i] ^ read64(kSecret + 11 + 16 * i), acc[2 * i + 1] ^ read64(kSecret + 19 + 16 * i));
  }
  return avalanche(result);
}

}  // namespace

std::uint64_t xxh3_64(const void* data, std::size_t len) {
  const u8* p = static_cast<const u8*>(data);
  if (len <= 16) return hash_small(p, len);
  if (len <= 240) return hash_medium(p, len);
  return hash_large(p, len);
}

void digest_segments(const std::uint64_t* addrs, const std::uint64_t* lengths, std::size_t n, std::uint64_t* out) {
  for (std::size_t i = 0; i < n; ++i) {
    out[i] = xxh3_64(reinterpret_cast<const void*>(addrs[i]), static_cast<std::size_t>(lengths[i]));
  }
}

}  // namespace llumnix_kv
