"""orchestrate: a patched llama.cpp fork for quantization research."""

__version__ = "0.1.0"
