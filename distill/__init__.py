"""distill: distil a large language model into a small, quantized, gated student served by vLLM."""

__version__ = "0.1.0"
