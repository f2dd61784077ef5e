"""The Qwen2.5-VL vision encoder on the ``torch.ops.qwen`` kernels.

Same computation and the same output rows as transformers'
``Qwen2_5_VisionTransformerPretrainedModel`` (its ``pooler_output``), with these layout changes:

* the Conv3d patch embedding is one Linear over the 1176 values of a patch;
* q, k and v stay packed in the qkv GEMM's output: attention rotates q and k while reading them
  (``window_attn_rope``), or, where a layer runs the two apart, the rotary is applied in place
  on views of it and attention reads the views;
* the gate and up projections are one ``[2I, C]`` GEMM feeding ``swiglu``;
* the residual adds are fused into the following RMSNorm (``add_rms_norm``);
* the merger gathers merge units straight into raster order (``patch_merge`` with the inverse
  window permutation) instead of merging in window order and permuting afterwards.

Training: the parameters start frozen (inference costs nothing for autograd); ``requires_grad_()``
makes ``forward`` and ``encode`` differentiable for the parameters and the pixels, and
``gradient_checkpointing`` recomputes each block in the backward instead of keeping its
activations. Where a gradient is needed, the rotary runs out of place (the in-place form cannot be
differentiated) and the fused MLP front takes the norm weight unfolded (the folded copy is a
constant); under ``no_grad`` or ``inference_mode`` the forward is the inference one and nothing is
saved.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import qwen_kernels as qk
from qwen_kernels.ops._define import needs_grad
from qwen_kernels.ops.rms_norm_swiglu import fold_norm_weight

from .config import KernelConfig, LayerKernels, VisionConfig
from .layout import GridLayout, LayoutCache
from .weights import convert_hf_state_dict, load_checkpoint


class RMSNormWeight(nn.Module):
    """Holds an RMSNorm's weight and epsilon; the norm itself runs in a fused qwen op."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class VisionAttention(nn.Module):
    """Packed qkv projection, 2D rotary (fused into the attention or in place), segment
    attention, output projection."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def rotated_qkv(
        self, x: Tensor, layout: GridLayout, kernels: LayerKernels
    ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v ``[T, H, D]``: views of one packed projection, q and k rotated in place (out
        of place into new tensors where a gradient is needed)."""
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        rotary = (layout.positions, layout.inv_freq, layout.rotary_section)
        if needs_grad(q):
            q, k = qk.mrope_pos(q, k, *rotary, backend=kernels.rotary)
        else:
            qk.mrope_pos_(q, k, *rotary, backend=kernels.rotary)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        layout: GridLayout,
        cu_seqlens: Tensor,
        max_seqlen: int,
        kernels: LayerKernels,
    ) -> Tensor:
        if kernels.rotary_fused:
            qkv = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim)
            out = qk.window_attn_rope(
                qkv,
                cu_seqlens,
                max_seqlen,
                layout.positions,
                layout.inv_freq,
                layout.rotary_section,
                backend=kernels.attention,
            )
        else:
            q, k, v = self.rotated_qkv(x, layout, kernels)
            out = qk.window_attn(q, k, v, cu_seqlens, max_seqlen, backend=kernels.attention)
        return self.proj(out.view(x.shape[0], -1))


class VisionMLP(nn.Module):
    """Weights of the SwiGLU MLP, gate and up projections packed into one (gate rows first).

    The block runs it: its front may be fused with the block's second RMSNorm.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        # (norm weight, gate/up weight, their versions, folded weight): see `folded_gate_up`.
        self._folded: tuple[Tensor, Tensor, tuple, Tensor] | None = None

    def folded_gate_up(self, norm_weight: Tensor) -> Tensor:
        """The gate/up weight with ``norm_weight`` (the block's second RMSNorm) folded in, for
        the fused MLP front (``rms_norm_swiglu`` with ``norm_weight=None``). Kept here, with the
        weights it derives from: made once, and again after either weight changes (an in-place
        update bumps its version; a new tensor, dtype or device changes its identity)."""
        weight = self.gate_up_proj.weight
        # Inference tensors keep no version counter (and cannot change outside inference mode).
        versions = tuple(None if t.is_inference() else t._version for t in (norm_weight, weight))
        cached = self._folded
        if cached is None or cached[0] is not norm_weight or cached[1] is not weight:
            cached = None
        if cached is None or cached[2] != versions:
            folded = fold_norm_weight(norm_weight.detach(), weight.detach())
            self._folded = cached = (norm_weight, weight, versions, folded)
        return cached[3]


class VisionBlock(nn.Module):
    """Pre-norm transformer block; window or full-frame attention.

    Blocks pass ``(out, residual)`` along instead of their sum so that each residual add is fused
    into the next RMSNorm; the sum after block i equals transformers' hidden state after block i.
    """

    def __init__(self, config: VisionConfig, index: int) -> None:
        super().__init__()
        self.full_attention = index in config.fullatt_block_indexes
        self.norm1 = RMSNormWeight(config.hidden_size, config.rms_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = RMSNormWeight(config.hidden_size, config.rms_norm_eps)
        self.mlp = VisionMLP(config)
        self.kernels = LayerKernels()

    def forward(
        self, hidden: Tensor, residual: Tensor | None, layout: GridLayout
    ) -> tuple[Tensor, Tensor]:
        kernels = self.kernels
        if residual is None:
            residual = hidden
            x = qk.rms_norm(hidden, self.norm1.weight, self.norm1.eps, backend=kernels.norm)
        else:
            x, residual = qk.add_rms_norm(
                hidden, residual, self.norm1.weight, self.norm1.eps, backend=kernels.norm
            )
        if self.full_attention:
            cu_seqlens, max_seqlen = layout.cu_frame_seqlens, layout.max_frame_seqlen
        else:
            cu_seqlens, max_seqlen = layout.cu_window_seqlens, layout.max_window_seqlen
        attn = self.attn(x, layout, cu_seqlens, max_seqlen, kernels)

        gate_up = self.mlp.gate_up_proj
        if kernels.fuse_mlp_norm:
            residual = attn + residual
            # Training differentiates through the norm weight: no folded (constant) copy then.
            training = needs_grad(residual, gate_up.weight, self.norm2.weight)
            norm_weight = self.norm2.weight if training else None
            weight = gate_up.weight if training else self.mlp.folded_gate_up(self.norm2.weight)
            h = qk.rms_norm_swiglu(
                residual, norm_weight, weight, gate_up.bias, self.norm2.eps, backend=kernels.mlp
            )
        else:
            x, residual = qk.add_rms_norm(
                attn, residual, self.norm2.weight, self.norm2.eps, backend=kernels.norm
            )
            h = qk.swiglu(gate_up(x), backend=kernels.mlp)
        return self.mlp.down_proj(h), residual


class PatchMerger(nn.Module):
    """RMSNorm, 2x2 merge (``patch_merge``), then Linear, GELU, Linear to the LLM width."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        merged = config.hidden_size * config.merge_unit
        self.merge_size = config.spatial_merge_size
        self.ln_q = RMSNormWeight(config.hidden_size, config.rms_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, config.out_hidden_size)
        )

    def forward(self, hidden: Tensor, unit_index: Tensor, backend: str) -> Tensor:
        merged = qk.patch_merge(
            hidden, self.ln_q.weight, self.ln_q.eps, unit_index, self.merge_size, backend=backend
        )
        return self.mlp(merged)


class VisionEncoder(nn.Module):
    """Qwen2.5-VL vision tower: pixel patches to merged tokens for the LLM.

    Args:
        config: the tower's shape (``VisionConfig.qwen2_5_vl("7b")`` for a released model).
        kernels: a backend name for every op ("auto", "torch", "triton", "cuda", "cuda_emu"), a
            ``KernelConfig``, or a dict of its fields; change it later with ``set_kernels``.

    Weights start as placeholders (``torch.ones`` norms, default Linear init): load real ones with
    ``from_pretrained`` / ``from_hf_state_dict``. The parameters start frozen; to train,
    ``encoder.train().requires_grad_()`` (and ``gradient_checkpointing = True`` to recompute each
    block in the backward instead of keeping its activations).

    Raises:
        ValueError: ``kernels`` names a backend that some op of a group has no code for (see
            ``KernelConfig.validate``).
    """

    def __init__(
        self,
        config: VisionConfig | None = None,
        kernels: str | KernelConfig | Mapping[str, Any] = "auto",
    ) -> None:
        super().__init__()
        self.config = config = config if config is not None else VisionConfig()
        if config.spatial_merge_size != 2:
            raise ValueError(
                f"spatial_merge_size must be 2 (qwen.patch_merge merges 2x2 units), got "
                f"{config.spatial_merge_size}"
            )
        # A Conv3d with kernel = stride = patch is a Linear over the flattened patch.
        self.patch_embed = nn.Linear(config.patch_dim, config.hidden_size, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(config, i) for i in range(config.depth))
        self.merger = PatchMerger(config)
        self._layouts = LayoutCache(config)
        # Frozen until asked: inference pays nothing for autograd (load_state_dict with
        # assign=True keeps this flag for the loaded tensors).
        self.requires_grad_(False)
        self.gradient_checkpointing = False
        self.set_kernels(kernels)

    def set_kernels(self, kernels: str | KernelConfig | Mapping[str, Any]) -> None:
        """Switch the backends of the live model (takes effect on the next forward).

        Raises:
            ValueError: an override names a block the model lacks, or a group names a backend
                that one of its ops has no code for (checked here rather than at the first call).
        """
        config = KernelConfig.coerce(kernels)
        config.validate(self.config.depth, self.config.head_dim)
        self.kernels = config
        for index, block in enumerate(self.blocks):
            block.kernels = config.for_layer(index)

    def layout(self, grid_thw: Tensor | Iterable[Sequence[int]]) -> GridLayout:
        """Index tensors for a batch of grids on the model's device (cached per grid)."""
        return self._layouts.get(grid_thw, self.patch_embed.weight.device)

    def forward(
        self,
        pixel_values: Tensor,
        grid_thw: Tensor | Iterable[Sequence[int]],
        return_hidden: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Encode a batch of images and videos.

        Args:
            pixel_values: ``[T, patch_dim]`` patches of every input, concatenated, as produced by
                ``preprocess_image`` / ``preprocess_video`` (cast to the model's dtype here).
            grid_thw: ``[N, 3]`` (t, h, w) patch grid of each input: a CPU tensor or a nested
                list (a CUDA tensor costs one device-to-host copy per call).
            return_hidden: also return the last block's output.

        Returns:
            ``[T/4, out_hidden_size]`` merged tokens in raster order (input by input, frame by
            frame, row-major over merge units) — transformers' ``pooler_output``; with
            ``return_hidden``, also ``[T, hidden_size]``, the last hidden state in the order of
            ``pixel_values`` rows.
        """
        layout = self.layout(grid_thw)
        # The layout was validated when it was built: skip the per-op checks that would read
        # cu_seqlens back from the device in every layer. The ops' other checks and their backend
        # choice run once per call signature; the layers' later calls look them up.
        with qk.skip_value_checks():
            return self.encode(pixel_values, layout, return_hidden)

    def encode(
        self, pixel_values: Tensor, layout: GridLayout, return_hidden: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``forward`` with a prepared ``layout``: no host work, so ``torch.compile`` can trace
        it whole (run it inside ``qwen_kernels.skip_value_checks()`` to avoid syncs)."""
        # The token count is read from an index tensor's size, not from layout.num_tokens: under
        # torch.compile(dynamic=True) a size stays symbolic, a Python int would be a constant.
        expected = (layout.token_index.shape[0], self.config.patch_dim)
        if tuple(pixel_values.shape) != expected:
            raise ValueError(
                f"pixel_values must be [T, patch_dim] = {list(expected)} for grids "
                f"{list(layout.grid)}, got {list(pixel_values.shape)}"
            )
        # The embedding is per patch, so gather patches into window order before it.
        patches = pixel_values.index_select(0, layout.token_index)
        hidden = self.patch_embed(patches.to(self.patch_embed.weight.dtype))
        residual = None
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointed:
                hidden, residual = checkpoint(block, hidden, residual, layout, use_reentrant=False)
            else:
                hidden, residual = block(hidden, residual, layout)
        if residual is not None:
            hidden = hidden + residual
        merged = self.merger(hidden, layout.unit_index, self.kernels.merge)
        if not return_hidden:
            return merged
        in_input_order = torch.empty_like(hidden).index_copy_(0, layout.token_index, hidden)
        return merged, in_input_order

    @classmethod
    def from_hf_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        config: VisionConfig,
        kernels: str | KernelConfig | Mapping[str, Any] = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> VisionEncoder:
        """Build from transformers-layout weights of the tower.

        Args:
            state_dict: ``Qwen2_5_VisionTransformerPretrainedModel`` keys, bare or under a
                ``visual.`` / ``model.visual.`` prefix (other keys of a full checkpoint are
                ignored). Tensors whose layout matches are used without a copy.
            config: the tower's shape; every tensor's shape is checked against it.
            kernels: as in the constructor.
            dtype: cast every weight to this dtype (default: the dtype of the patch embedding).
            device: move the weights there (default: where they are).

        Raises:
            ValueError: tensors are missing, unexpected or mis-shaped (all of them named).
        """
        weights = convert_hf_state_dict(state_dict, config)
        dtype = dtype if dtype is not None else weights["patch_embed.weight"].dtype
        with torch.device("meta"):
            model = cls(config, kernels)
        weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
        model.load_state_dict(weights, strict=True, assign=True)
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        kernels: str | KernelConfig | Mapping[str, Any] = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> VisionEncoder:
        """Load the tower of a Qwen2.5-VL checkpoint folder.

        The folder holds ``config.json`` and ``model.safetensors`` or sharded safetensors with
        ``model.safetensors.index.json``; only the vision tensors are read (straight to
        ``device``). Pickle checkpoints are refused.
        """
        config, state_dict = load_checkpoint(path, device=device)
        return cls.from_hf_state_dict(state_dict, config, kernels, dtype=dtype, device=device)
