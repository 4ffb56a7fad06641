"""The pluggy markers of the ``llumnix_kv`` project."""

import pluggy

PROJECT = "llumnix_kv"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
