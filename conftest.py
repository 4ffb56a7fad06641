"""Hardware and engine markers: tests skip with a reason when what they need is absent.

``LLUMNIX_KV_REQUIRE=gpu,vllm`` turns those skips into failures (for runners that have them).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest


@functools.cache
def _missing(marker: str) -> str | None:
    """Why tests with ``marker`` cannot run here, or None."""
    if marker in ("vllm", "sglang"):
        if importlib.util.find_spec(marker) is None:
            return f"{marker} is not installed (pip install 'llumnix-kv[{marker}]')"
        return None
    if marker == "gpu":
        try:
            from llumnix_kv_core import native

            n = native.cuda().device_count()
        except Exception as exc:
            return f"no usable CUDA device: {exc}"
        return None if n > 0 else "no CUDA device"
    if marker == "rdma":
        if not os.path.isdir("/sys/class/infiniband") or not os.listdir("/sys/class/infiniband"):
            return "no RDMA device in /sys/class/infiniband"
        return None
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    required = {m for m in os.environ.get("LLUMNIX_KV_REQUIRE", "").split(",") if m}
    for item in items:
        for marker in ("vllm", "sglang", "gpu", "rdma"):
            if marker in item.keywords and (why := _missing(marker)):
                if marker in required:
                    msg = f"LLUMNIX_KV_REQUIRE names {marker!r} but {why}"
                    raise pytest.UsageError(msg)
                item.add_marker(pytest.mark.skip(reason=why))
