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
