"""Built-in scenario policies."""
