"""The public ops, one module each; importing this package registers them under torch.ops.qwen."""

from .mrope import mrope, mrope_, mrope_pos, mrope_pos_
from .patch_merge import patch_merge
from .rms_norm import add_rms_norm, rms_norm, rms_norm_backward
from .rms_norm_swiglu import rms_norm_swiglu
from .swiglu import swiglu, swiglu_backward
from .window_attn import window_attn, window_attn_backward, window_attn_forward
from .window_attn_rope import window_attn_rope, window_attn_rope_forward

__all__ = [
    "add_rms_norm",
    "mrope",
    "mrope_",
    "mrope_pos",
    "mrope_pos_",
    "patch_merge",
    "rms_norm",
    "rms_norm_backward",
    "rms_norm_swiglu",
    "swiglu",
    "swiglu_backward",
    "window_attn",
    "window_attn_backward",
    "window_attn_forward",
    "window_attn_rope",
    "window_attn_rope_forward",
]
