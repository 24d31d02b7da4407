"""PegaFlow: KV cache offloading for vLLM."""

__version__ = "0.1.0"
