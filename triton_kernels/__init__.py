"""Triton kernels, one module per op; installed as ``qwen_kernels.triton_kernels``."""
