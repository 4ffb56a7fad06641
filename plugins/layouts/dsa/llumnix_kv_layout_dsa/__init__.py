"""DeepSeek sparse attention (V3.2 DSA): MLA latent page plus lightning-indexer page per layer."""
