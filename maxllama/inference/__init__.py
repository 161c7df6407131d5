"""Inference: sampling with a KV cache, and scoring token arrays."""
