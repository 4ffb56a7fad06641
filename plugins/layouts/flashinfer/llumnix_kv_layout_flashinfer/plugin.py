from llumnix_kv_core import hookimpl
from llumnix_kv_core.providers import LayoutProvider


@hookimpl
def llumnix_kv_register_layouts() -> list[LayoutProvider]:
    from llumnix_kv_layout_flashinfer.parser import FlashInferParser

    return [LayoutProvider("flashinfer", FlashInferParser(), engines=("vllm", "sglang"),
                           description="FlashInfer paged KV, NHD or HND (vLLM FLASHINFER, SGLang HND pools)")]
