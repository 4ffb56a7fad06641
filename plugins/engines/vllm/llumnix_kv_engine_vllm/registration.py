"""``vllm.general_plugins`` entry point: makes ``kv_connector="LlumnixKVConnector"`` resolve.

vLLM runs general plugins in every process (front end, engine core, workers), so
this must be cheap and idempotent.
"""

from __future__ import annotations

from llumnix_kv_engine_vllm import CONNECTOR_MODULE
from llumnix_kv_engine_vllm import CONNECTOR_NAME
from llumnix_kv_engine_vllm.compat import connector_registered


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if not connector_registered(CONNECTOR_NAME):
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
