"""``vllm.general_plugins`` entry point: makes ``kv_connector="LlumnixKVConnector"`` resolve.

vLLM runs general plugins in every process (front end, engine core, workers), so
this must be cheap and idempotent.
"""

from __future__ import annotations

from llumnix_kv_engine_vllm import CONNECTOR_MODULE
from llumnix_kv_engine_vllm import CONNECTOR_NAME


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
