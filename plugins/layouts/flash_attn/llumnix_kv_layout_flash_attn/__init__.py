"""Standard paged-attention pages (vLLM FLASH_ATTN / TRITON_ATTN / FLEX_ATTENTION, SGLang MHA): K|V per cell."""
