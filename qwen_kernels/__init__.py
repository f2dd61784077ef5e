"""qwen-kernels: CUDA and Triton kernels for the Qwen2.5-VL vision encoder as torch custom ops.

Importing the package registers every op under ``torch.ops.qwen``; the functions below are the
same ops with docstrings (the ``*_backward`` ops are what autograd runs for the others). Each
takes ``backend`` = "auto", "torch", "triton", "cuda" or "cuda_emu"; ``available_backends()``
says which run on this machine.
"""

from ._backends import available_backends
from ._checks import skip_value_checks
from .ops import (
    add_rms_norm,
    mrope,
    mrope_,
    mrope_pos,
    mrope_pos_,
    patch_merge,
    rms_norm,
    rms_norm_backward,
    rms_norm_swiglu,
    swiglu,
    swiglu_backward,
    window_attn,
    window_attn_backward,
    window_attn_forward,
    window_attn_rope,
    window_attn_rope_forward,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "add_rms_norm",
    "available_backends",
    "mrope",
    "mrope_",
    "mrope_pos",
    "mrope_pos_",
    "patch_merge",
    "rms_norm",
    "rms_norm_backward",
    "rms_norm_swiglu",
    "skip_value_checks",
    "swiglu",
    "swiglu_backward",
    "window_attn",
    "window_attn_backward",
    "window_attn_forward",
    "window_attn_rope",
    "window_attn_rope_forward",
]
