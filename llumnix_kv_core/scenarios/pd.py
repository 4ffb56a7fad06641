"""Prefill/decode separation: the prefill instance (P) pushes KV to the decode instance (D).

Request protocol (vLLM's standard PD protocol, plus an optional ``transfer_id``):

* P gets ``kv_transfer_params={"do_remote_decode": True}`` and ``max_tokens=1``. Its
  finished output carries params for D (``do_remote_prefill``, ``transfer_id``,
  ``remote_addresses``, ``remote_engine_id``); pass them unchanged to D.
* To dispatch to both at once, give P ``{"do_remote_decode": True, "transfer_id": T}``
  and D ``{"do_remote_prefill": True, "transfer_id": T, "remote_addresses": [...]}``
  (``prefill_params`` / ``decode_params`` build these); P's listen address is fixed by
  ``kv_connector_extra_config["port"]``.
"""

from __future__ import annotations

import math
import time
from typing import Any

from llumnix_kv_core.config import ConnectorConfig
from llumnix_kv_core.errors import LlumnixKVError
from llumnix_kv_core.interfaces.policy import LoadPlan
from llumnix_kv_core.interfaces.policy import SavePlan
from llumnix_kv_core.interfaces.policy import ScenarioPolicy
from llumnix_kv_core.markers import hookimpl
from llumnix_kv_core.providers import ScenarioPolicyProvider
from llumnix_kv_core.wire import canonical_transfer_id
from llumnix_kv_core.wire import new_transfer_id


def prefill_params(transfer_id: str | None = None) -> dict[str, Any]:
    """``kv_transfer_params`` for the prefill request."""
    out: dict[str, Any] = {"do_remote_decode": True}
    if transfer_id:
        out["transfer_id"] = transfer_id
    return out


def decode_params(transfer_id: str, remote_addresses: list[str], remote_engine_id: str = "") -> dict[str, Any]:
    """``kv_transfer_params`` for a decode request dispatched before P has answered."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "transfer_id": transfer_id,
        "remote_addresses": list(remote_addresses),
        "remote_engine_id": remote_engine_id,
    }


class PDPolicy(ScenarioPolicy):
    name = "pd"

    def __init__(self, config: ConnectorConfig) -> None:
        self.lease_s = config.lease_s

    def load_plan(self, params: dict[str, Any] | None) -> LoadPlan | None:
        if not params or not params.get("do_remote_prefill"):
            return None
        tid = params.get("transfer_id")
        addrs = params.get("remote_addresses")
        if not tid or not addrs:
            msg = (
                "kv_transfer_params has do_remote_prefill but no transfer_id/remote_addresses: pass the "
                "prefill request's output kv_transfer_params unchanged, or build them with decode_params()"
            )
            raise LlumnixKVError(msg)
        return LoadPlan(canonical_transfer_id(tid), tuple(addrs), str(params.get("remote_engine_id", "")))

    def save_plan(self, params: dict[str, Any] | None) -> SavePlan | None:
        if not params or not params.get("do_remote_decode"):
            return None
        tid = canonical_transfer_id(params.get("transfer_id") or new_transfer_id())
        return SavePlan(tid, self._lease(params.get("lease_s")))

    def _lease(self, asked: Any) -> float:
        """A request may ask for a shorter lease than the configured one, never a longer or a broken one."""
        try:
            lease = float(asked)
        except (TypeError, ValueError):
            return self.lease_s
        return min(lease, self.lease_s) if math.isfinite(lease) and lease > 0 else self.lease_s

    def output_params(self, plan: SavePlan, addresses: list[str], engine_id: str) -> dict[str, Any]:
        out = decode_params(plan.transfer_id, addresses, engine_id)
        out["lease_expires_at"] = time.time() + plan.lease_s
        return out


@hookimpl
def llumnix_kv_register_scenarios() -> list[ScenarioPolicyProvider]:
    return [ScenarioPolicyProvider("pd", PDPolicy, "prefill/decode separation: P pushes KV to D")]
