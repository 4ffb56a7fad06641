from llumnix_kv_core import hookimpl
from llumnix_kv_core.providers import LayoutProvider


@hookimpl
def llumnix_kv_register_layouts() -> list[LayoutProvider]:
    from llumnix_kv_layout_flash_attn.parser import FlashAttnParser

    return [LayoutProvider("flash_attn", FlashAttnParser(), engines=("vllm", "sglang"),
                           description="paged attention: vLLM fused K|V (any LB*/BL* layout), SGLang MHA pools")]
