"""MLA latent caches (vLLM MLA backends incl. CPU_MLA, SGLang MLATokenToKVPool): replicated over TP."""
