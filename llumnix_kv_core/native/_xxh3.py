"""XXH3-64 (seed 0, default secret) in NumPy: the pure-Python stand-in for the native core's digests.

Written from the xxHash specification (doc/xxhash_spec.md of the xxHash project, "XXH3 Algorithm"),
like ``csrc/core/digest.cpp``, and bit-identical to it. The work is vectorised across segments and
within each one: segments of one length share every branch of the algorithm, so they are hashed
together as the rows of one array; and XXH3's accumulation of large inputs is a plain sum over
the 16 stripes of each 1024-byte block, so only the per-block scramble is a Python-level loop
(one NumPy step per KiB of the longest segment, over all rows at once).
"""

from __future__ import annotations

import ctypes

import numpy as np

_U64 = np.uint64
_M32 = _U64(0xFFFFFFFF)
P32_1, P32_2, P32_3 = _U64(0x9E3779B1), _U64(0x85EBCA77), _U64(0xC2B2AE3D)
P64_1, P64_2, P64_3 = _U64(0x9E3779B185EBCA87), _U64(0xC2B2AE3D27D4EB4F), _U64(0x165667B19E3779F9)
P64_4, P64_5 = _U64(0x85EBCA77C2B2AE63), _U64(0x27D4EB2F165667C5)
MX1, MX2 = _U64(0x165667919E3779F9), _U64(0x9FB21C651E98DF25)

SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)
_STRIPE, _STRIPES_PER_BLOCK, _BLOCK = 64, 16, 1024
_BATCH_BYTES = 16 << 20  # rows gathered per batch: bounds the temporary arrays


def _secret64(offset: int, count: int = 1) -> np.ndarray:
    """``count`` little-endian u64 words of the secret from byte ``offset`` (any alignment)."""
    return np.frombuffer(SECRET[offset:offset + 8 * count], dtype="<u8").astype(_U64)


def _s(offset: int) -> np.uint64:
    return _secret64(offset)[0]


def _col64(data: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian u64 at byte ``offset`` of every row of ``data`` (K, L) uint8."""
    return np.ascontiguousarray(data[:, offset:offset + 8]).view("<u8").reshape(-1).astype(_U64)


def _col32(data: np.ndarray, offset: int) -> np.ndarray:
    return np.ascontiguousarray(data[:, offset:offset + 4]).view("<u4").reshape(-1).astype(_U64)


def _fold_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Low 64 bits xor high 64 bits of the 128-bit products ``a * b`` (element-wise)."""
    a_lo, a_hi, b_lo, b_hi = a & _M32, a >> _U64(32), b & _M32, b >> _U64(32)
    lh, hl = a_lo * b_hi, a_hi * b_lo
    mid = ((a_lo * b_lo) >> _U64(32)) + (lh & _M32) + (hl & _M32)
    high = a_hi * b_hi + (lh >> _U64(32)) + (hl >> _U64(32)) + (mid >> _U64(32))
    return (a * b) ^ high


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << _U64(r)) | (x >> _U64(64 - r))


def _avalanche(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> _U64(37))) * MX1
    return x ^ (x >> _U64(32))


def _avalanche_xxh64(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> _U64(33))) * P64_2
    x = (x ^ (x >> _U64(29))) * P64_3
    return x ^ (x >> _U64(32))


def _mix_step(data: np.ndarray, offset: int, secret_offset: int) -> np.ndarray:
    return _fold_mul(_col64(data, offset) ^ _s(secret_offset), _col64(data, offset + 8) ^ _s(secret_offset + 8))


def _small(data: np.ndarray, n: int) -> np.ndarray:
    k = data.shape[0]
    if n > 8:
        low = (_s(24) ^ _s(32)) ^ _col64(data, 0)
        high = (_s(40) ^ _s(48)) ^ _col64(data, n - 8)
        return _avalanche(_U64(n) + low.byteswap() + high + _fold_mul(low, high))
    if n >= 4:
        v = (_s(8) ^ _s(16)) ^ (_col32(data, n - 4) | (_col32(data, 0) << _U64(32)))
        v = (v ^ _rotl(v, 49) ^ _rotl(v, 24)) * MX2
        v = (v ^ ((v >> _U64(35)) + _U64(n))) * MX2
        return v ^ (v >> _U64(28))
    secret32 = np.frombuffer(SECRET[:8], dtype="<u4").astype(_U64)
    if n > 0:
        combined = (data[:, n - 1].astype(_U64) | _U64(n << 8) | (data[:, 0].astype(_U64) << _U64(16))
                    | (data[:, n >> 1].astype(_U64) << _U64(24)))
        return _avalanche_xxh64((secret32[0] ^ secret32[1]) ^ combined)
    return _avalanche_xxh64(np.full(k, _s(56) ^ _s(64), dtype=_U64))


def _medium(data: np.ndarray, n: int) -> np.ndarray:
    acc = np.full(data.shape[0], _U64(n) * P64_1, dtype=_U64)
    if n <= 128:
        for i in range((n - 1) >> 5, -1, -1):
            acc += _mix_step(data, 16 * i, 32 * i)
            acc += _mix_step(data, n - 16 * i - 16, 32 * i + 16)
        return _avalanche(acc)
    for i in range(8):
        acc += _mix_step(data, 16 * i, 16 * i)
    acc = _avalanche(acc)
    for i in range(8, n >> 4):
        acc += _mix_step(data, 16 * i, 16 * (i - 8) + 3)
    return _avalanche(acc + _mix_step(data, n - 16, 119))


_SWAP = np.arange(8) ^ 1  # lane i feeds accumulator i ^ 1


def _stripe_sums(stripes: np.ndarray, secret: np.ndarray) -> np.ndarray:
    """What stripes (..., S, 8) u64 add to the 8 accumulators, summed over S; ``secret`` is (S, 8)."""
    keyed = stripes ^ secret
    products = (keyed & _M32) * (keyed >> _U64(32))
    return products.sum(axis=-2, dtype=_U64) + stripes.sum(axis=-2, dtype=_U64)[..., _SWAP]


def _large(data: np.ndarray, n: int) -> np.ndarray:
    k = data.shape[0]
    acc = np.tile(np.array([P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1], dtype=_U64), (k, 1))
    words = _secret64(0, 24)
    stripe_secret = np.stack([words[s:s + 8] for s in range(_STRIPES_PER_BLOCK)])  # stripe s: bytes 8s ..
    blocks = (n - 1) // _BLOCK
    if blocks:
        body = np.ascontiguousarray(data[:, :blocks * _BLOCK]).view("<u8").astype(_U64, copy=False)
        sums = _stripe_sums(body.reshape(k, blocks, _STRIPES_PER_BLOCK, 8), stripe_secret)
        scramble = words[16:24]
        for b in range(blocks):
            a = acc + sums[:, b]
            acc = ((a ^ (a >> _U64(47))) ^ scramble) * P32_1
    start = blocks * _BLOCK
    full = (n - start - 1) // _STRIPE
    if full:
        tail = np.ascontiguousarray(data[:, start:start + full * _STRIPE]).view("<u8").astype(_U64, copy=False)
        acc += _stripe_sums(tail.reshape(k, full, 8), stripe_secret[:full])
    last = np.ascontiguousarray(data[:, n - _STRIPE:n]).view("<u8").astype(_U64, copy=False)
    acc += _stripe_sums(last.reshape(k, 1, 8), _secret64(192 - 71, 8).reshape(1, 8))
    result = np.full(k, _U64(n) * P64_1, dtype=_U64)
    for i in range(4):
        result += _fold_mul(acc[:, 2 * i] ^ _s(11 + 16 * i), acc[:, 2 * i + 1] ^ _s(19 + 16 * i))
    return _avalanche(result)


def xxh3_rows(data: np.ndarray) -> np.ndarray:
    """XXH3-64 of every row of ``data``, a (K, L) uint8 array: K digests."""
    n = data.shape[1]
    with np.errstate(over="ignore"):
        if n <= 16:
            return _small(data, n)
        if n <= 240:
            return _medium(data, n)
        return _large(data, n)


def digest_segments(addrs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """XXH3-64 of each segment (``lengths[i]`` bytes at ``addrs[i]``), checked uint64 arrays: a uint64 array."""
    out = np.empty(len(lengths), dtype=_U64)
    if not len(lengths):
        return out
    sizes, groups = np.unique(lengths, return_inverse=True)
    for g, size in enumerate(sizes.tolist()):
        index = np.flatnonzero(groups == g)
        per_batch = max(1, _BATCH_BYTES // max(size, 1))
        for lo in range(0, len(index), per_batch):
            rows = index[lo:lo + per_batch]
            data = np.empty((len(rows), size), dtype=np.uint8)
            if size:
                base, memmove = data.ctypes.data, ctypes.memmove
                for r, addr in enumerate(addrs[rows].tolist()):
                    memmove(base + r * size, addr, size)
            out[rows] = xxh3_rows(data)
    return out
