"""vLLM CPU_ATTN pages: ISA-packed, moved as opaque (block, head) units between hosts of one ISA."""
