"""The hooks: pablo.conf and translation tables, and the hooked llama-quantize."""
