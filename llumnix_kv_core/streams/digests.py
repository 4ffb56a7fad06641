"""Per-segment digests of DATA payloads (``wire.F_DIGEST``): computed from the sender's segments,
checked against the receiver's once the payload is in place."""

from __future__ import annotations

import numpy as np

from llumnix_kv_core import native
from llumnix_kv_core.errors import DigestMismatchError


def check(table: np.ndarray, addrs: np.ndarray, expected: np.ndarray) -> DigestMismatchError | None:
    """The mismatch of the segments of ``table`` now at ``addrs`` against the sender's ``expected``, if any."""
    lengths = np.ascontiguousarray(table["length"])
    actual = native.digest_segments(np.ascontiguousarray(addrs, dtype=np.uint64), lengths)
    bad = np.flatnonzero(actual != expected)
    if not bad.size:
        return None
    i = int(bad[0])
    return DigestMismatchError(i, len(lengths), int(table["region"][i]), int(table["offset"][i]), int(lengths[i]),
                               int(expected[i]), int(actual[i]), int(bad.size))
