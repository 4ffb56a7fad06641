"""FlashInfer paged KV (vLLM FLASHINFER, SGLang HND pools): NHD or HND pages, heads split over TP."""
