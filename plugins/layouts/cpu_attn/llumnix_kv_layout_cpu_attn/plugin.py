from llumnix_kv_core import hookimpl
from llumnix_kv_core.providers import LayoutProvider


@hookimpl
def llumnix_kv_register_layouts() -> list[LayoutProvider]:
    from llumnix_kv_layout_cpu_attn.parser import CpuAttnParser

    return [LayoutProvider("cpu_attn", CpuAttnParser(), engines=("vllm",),
                           description="vLLM CPU_ATTN pages as opaque (block, head) units, same-ISA only")]
