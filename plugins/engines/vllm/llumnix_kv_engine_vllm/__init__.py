"""vLLM adapter: the ``LlumnixKVConnector`` KV connector (vLLM 0.32/0.33)."""

CONNECTOR_NAME = "LlumnixKVConnector"
CONNECTOR_MODULE = "llumnix_kv_engine_vllm.connector"
