from llumnix_kv_core import hookimpl
from llumnix_kv_core.providers import LayoutProvider


@hookimpl
def llumnix_kv_register_layouts() -> list[LayoutProvider]:
    from llumnix_kv_layout_dsa.parser import DsaParser

    return [LayoutProvider("dsa", DsaParser(), engines=("vllm", "sglang"),
                           description="DeepSeek-V3.2 sparse attention: MLA latent + indexer page per layer")]
