from llumnix_kv_core import hookimpl
from llumnix_kv_core.providers import LayoutProvider


@hookimpl
def llumnix_kv_register_layouts() -> list[LayoutProvider]:
    from llumnix_kv_layout_mla.parser import MlaParser

    return [LayoutProvider("mla", MlaParser(), engines=("vllm", "sglang"),
                           description="MLA latent pages (one latent per token, replicated over TP)")]
