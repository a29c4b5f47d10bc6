"""Quantized weights: GGML block formats, the stored representation and CPU compute kernels."""
