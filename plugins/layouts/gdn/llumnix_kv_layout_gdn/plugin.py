from llumnix_kv_core import hookimpl
from llumnix_kv_core.providers import LayoutProvider


@hookimpl
def llumnix_kv_register_layouts() -> list[LayoutProvider]:
    from llumnix_kv_layout_gdn.parser import GdnParser

    return [LayoutProvider("gdn", GdnParser(), engines=("vllm", "sglang"),
                           description="Gated DeltaNet state slots (conv SD/DS + temporal), last state moves")]
