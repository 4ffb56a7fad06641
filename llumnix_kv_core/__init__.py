"""llumnix-kv core: plugin registry, layouts, wire format, transfer agent."""

from llumnix_kv_core.markers import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
