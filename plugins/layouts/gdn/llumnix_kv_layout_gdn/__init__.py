"""Gated DeltaNet (Qwen3-Next) state pages: conv state (SD or DS) + temporal state, last state moves."""
