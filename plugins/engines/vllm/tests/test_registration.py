import pytest

pytestmark = pytest.mark.vllm


def test_general_plugin_registers_connector_idempotently() -> None:
    from llumnix_kv_engine_vllm.registration import register
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    register()
    register()
    cls = KVConnectorFactory.get_connector_class_by_name("LlumnixKVConnector")
    from vllm.distributed.kv_transfer.kv_connector.v1.base import SupportsHMA

    assert cls.__name__ == "LlumnixKVConnector"
    assert issubclass(cls, SupportsHMA)


def test_entry_point_is_declared() -> None:
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("llumnix_kv") == "llumnix_kv_engine_vllm.registration:register"
