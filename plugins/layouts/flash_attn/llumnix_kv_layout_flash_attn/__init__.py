"""Standard paged-attention pages (vLLM FLASH_ATTN / TRITON_ATTN / FLEX_ATTENTION): fused K|V per cell."""
