"""One error hierarchy: every message names the cause and the fix."""

from __future__ import annotations


class LlumnixKVError(Exception):
    """Base of every error raised by llumnix-kv."""


class PluginError(LlumnixKVError):
    """A plugin could not be found, loaded or used."""


class UnknownPluginError(PluginError):
    """A configuration names a plugin that is not registered."""


class ConfigError(LlumnixKVError):
    """A configuration value is unknown, of the wrong type or out of range."""


class NativeUnavailableError(LlumnixKVError):
    """The compiled core (or its CUDA part) is not importable or has no device."""


class LayoutError(LlumnixKVError):
    """A KV-cache description could not be turned into a layout or a transfer plan."""


class IncompatiblePeerError(LlumnixKVError):
    """The two sides of a transfer disagree on model, layout or protocol."""


class FrameError(LlumnixKVError):
    """A malformed or unexpected frame arrived on a transport."""


class TransferError(LlumnixKVError):
    """A transfer failed: peer gone, deadline passed, or the peer reported an error."""


class TransferTimeoutError(TransferError, TimeoutError):
    """A transfer or connection did not make progress before its deadline."""


class DigestMismatchError(TransferError):
    """A DATA payload landed with bytes other than the sender's: its segment's digest differs.

    ``segment`` is the first differing segment of the frame (``region``, ``offset``, ``length`` in the
    receiver's memory), ``expected`` the sender's XXH3-64 of it, ``actual`` the receiver's; ``differing``
    counts the frame's differing segments.
    """

    def __init__(self, segment: int, n_segments: int, region: int, offset: int, length: int, expected: int,
                 actual: int, differing: int) -> None:
        self.segment, self.region, self.offset, self.length = segment, region, offset, length
        self.expected, self.actual, self.differing = expected, actual, differing
        super().__init__(
            f"digest mismatch in segment {segment} of {n_segments} (region {region}, offset {offset}, {length} "
            f"bytes): the sender's XXH3-64 is 0x{expected:016x}, the bytes that arrived hash to 0x{actual:016x} "
            f"({differing} of {n_segments} segments differ); the payload was corrupted between the two "
            "instances' memory")
