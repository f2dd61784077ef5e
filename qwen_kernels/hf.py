"""Drop-in use of the ``torch.ops.qwen`` kernels inside a transformers Qwen2.5-VL model.

``patch_qwen2_5_vl(model)`` replaces, on that model instance only, the forwards of

* each vision block: the two pre-norms run ``qwen.rms_norm`` / ``qwen.add_rms_norm`` (the first
  residual add fused into the second norm);
* each vision attention: the 2D rotary runs ``qwen.mrope_`` in place on views of the packed qkv
  projection (with the cos/sin tables the tower already built; ``qwen.mrope`` out of place where
  a gradient is needed) and attention runs
  ``qwen.window_attn`` over the tower's ``cu_seqlens`` (no Python loop over windows, no
  device-to-host read of the segment lengths per layer), or both in ``qwen.window_attn_rope``
  where the package has it and the layer's config fuses the rotary;
* each vision MLP: ``qwen.swiglu`` on the gate and up projections;
* the merger: ``qwen.patch_merge`` (RMSNorm and 2x2 concatenation in one op);
* the vision tower: computes its grid inputs and the longest frame and window once per call from
  ``grid_thw``, moves them to the activations' device once, and skips the ops' per-layer value
  checks that this layout guarantees;
* each text attention layer: its multimodal rotary runs ``qwen.mrope`` (cos/sin form).

Every op has its autograd formula: a patched model fine-tunes as the unpatched one does (vision
tower trained or frozen, some parameters only, ``gradient_checkpointing_enable()``).

Weights stay where they are (the wrappers read the modules' own parameters); classes are never
touched, so other instances keep transformers' code (under an accelerate hook the hooked
``_old_forward`` is replaced, so the hook keeps working). ``PatchHandle.unpatch()`` restores
exactly the forwards the modules had before.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

import qwen_kernels as qk
from qwen_kernels.model.config import KernelConfig, LayerKernels, op_backends
from qwen_kernels.ops._define import needs_grad

# Set on the patched vision tower and text model so that a second patch (of the same model or of
# a part of it) is refused instead of stacking wrappers.
_MARK = "_qwen_kernels_patch"

_TOWER = "Qwen2_5_VisionTransformerPretrainedModel"
_MODEL = "Qwen2_5_VLModel"
_FOR_GENERATION = "Qwen2_5_VLForConditionalGeneration"


class PatchHandle:
    """The forwards a ``patch_qwen2_5_vl`` call replaced; ``unpatch()`` puts them back.

    Attributes:
        kernels: the ``KernelConfig`` the patched modules run.
        modules: every module whose forward was replaced, in patch order.
    """

    def __init__(self, parts: list[nn.Module], kernels: KernelConfig) -> None:
        self.parts = parts
        self.kernels = kernels
        self.modules: list[nn.Module] = []
        # (module, attribute, the instance-level value it had: None when it used its class's).
        self._saved: list[tuple[nn.Module, str, Callable | None]] = []

    def _replace(self, module: nn.Module, forward: Callable) -> None:
        slot = forward_slot(module)
        self._saved.append((module, slot, module.__dict__.get(slot)))
        self.modules.append(module)
        setattr(module, slot, forward)

    @property
    def active(self) -> bool:
        """True until ``unpatch()``."""
        return any(getattr(part, _MARK, None) is self for part in self.parts)

    def unpatch(self) -> None:
        """Restore every replaced forward (a no-op once done)."""
        for module, slot, previous in reversed(self._saved):
            if previous is None:
                delattr(module, slot)
            else:
                setattr(module, slot, previous)
        self._saved.clear()
        self.modules.clear()
        for part in self.parts:
            if getattr(part, _MARK, None) is self:
                delattr(part, _MARK)


def forward_slot(module: nn.Module) -> str:
    """The attribute holding the module's own forward: ``forward``, or ``_old_forward`` under an
    accelerate hook (``device_map`` splits, offload), whose ``forward`` moves the inputs and
    then calls ``_old_forward``; replacing that keeps the hook working."""
    hooked = hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__
    return "_old_forward" if hooked else "forward"


def _structure_error(what: str, found: str) -> ValueError:
    import transformers

    return ValueError(
        f"patch_qwen2_5_vl: {what}, found {found} (transformers {transformers.__version__}); "
        "this patch knows the Qwen2.5-VL modules of transformers 5.17 to 5.24"
    )


def _require(module: nn.Module, path: str, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise _structure_error(
            f"{path} ({type(module).__name__}) lacks {missing}",
            f"attributes {sorted(n for n in vars(module) if not n.startswith('_'))}"
            f" and submodules {[n for n, _ in module.named_children()]}",
        )


def _parts(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(vision tower, text model) of a supported model; either may be None."""
    name = type(model).__name__
    if name == _TOWER:
        return model, None
    inner = model
    if name == _FOR_GENERATION:
        _require(model, "model", ("model",))
        inner = model.model
    if type(inner).__name__ != _MODEL:
        raise _structure_error(
            f"expected a {_FOR_GENERATION}, a {_MODEL} or a {_TOWER}",
            type(model).__name__
            if inner is model
            else f"{name} whose .model is a {type(inner).__name__}",
        )
    _require(inner, "model", ("visual", "language_model"))
    return inner.visual, inner.language_model


def _check_tower(tower: nn.Module) -> None:
    _require(
        tower,
        "visual",
        ("blocks", "merger", "config", "rotary_pos_emb", "spatial_merge_size", "window_size"),
    )
    _require(tower, "visual", ("patch_size", "fullatt_block_indexes"))
    _require(tower.rotary_pos_emb, "visual.rotary_pos_emb", ("inv_freq",))
    for i, block in enumerate(tower.blocks):
        path = f"visual.blocks[{i}]"
        _require(block, path, ("norm1", "norm2", "attn", "mlp"))
        _require(block.attn, f"{path}.attn", ("qkv", "proj", "num_heads", "head_dim", "scaling"))
        _require(block.mlp, f"{path}.mlp", ("gate_proj", "up_proj", "down_proj", "act_fn"))
        for norm in ("norm1", "norm2"):
            _require(getattr(block, norm), f"{path}.{norm}", ("weight", "variance_epsilon"))
    _require(tower.merger, "visual.merger", ("ln_q", "mlp", "hidden_size"))
    act = getattr(tower.config, "hidden_act", None)
    if act != "silu":
        raise _structure_error("the vision MLP must use silu (qwen.swiglu)", f"hidden_act={act!r}")


def _text_forward(attn: nn.Module, path: str) -> types.FunctionType:
    """The undecorated class forward of a text attention layer, checked to call the module-level
    ``apply_rotary_pos_emb`` that the patch rebinds."""
    forward = inspect.unwrap(type(attn).forward)
    code = getattr(forward, "__code__", None)
    if code is None or "apply_rotary_pos_emb" not in code.co_names:
        raise _structure_error(
            f"{path}.forward must call apply_rotary_pos_emb",
            f"{type(attn).__name__}.forward naming {getattr(code, 'co_names', None)}",
        )
    return forward


def _text_layers(text: nn.Module) -> list[tuple[nn.Module, types.FunctionType]]:
    _require(text, "language_model", ("layers",))
    layers = []
    for i, layer in enumerate(text.layers):
        _require(layer, f"language_model.layers[{i}]", ("self_attn",))
        path = f"language_model.layers[{i}].self_attn"
        layers.append((layer.self_attn, _text_forward(layer.self_attn, path)))
    return layers


def _text_rotary(backend: str) -> Callable:
    """transformers' ``apply_rotary_pos_emb`` on ``qwen.mrope``: q, k ``[B, H, S, D]``, cos, sin
    the composed ``[B, S, D]`` tables of the text model's rotary embedding."""

    def apply_rotary_pos_emb(
        q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
    ) -> tuple[Tensor, Tensor]:
        if unsqueeze_dim != 1:
            raise ValueError(
                f"qwen_kernels.hf: apply_rotary_pos_emb takes q, k as [B, H, S, D] "
                f"(unsqueeze_dim=1), got unsqueeze_dim={unsqueeze_dim}"
            )
        q_out, k_out = qk.mrope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, None, backend)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)

    return apply_rotary_pos_emb


def _with_rotary(forward: types.FunctionType, rotary: Callable) -> types.FunctionType:
    """A copy of ``forward`` whose global ``apply_rotary_pos_emb`` is ``rotary``: transformers'
    own attention code of the installed version, only the rotary call rebound."""
    namespace = {**forward.__globals__, "apply_rotary_pos_emb": rotary}
    copy = types.FunctionType(
        forward.__code__, namespace, forward.__name__, forward.__defaults__, forward.__closure__
    )
    copy.__kwdefaults__ = forward.__kwdefaults__
    return functools.update_wrapper(copy, forward)


def _attention_forward(attn: nn.Module, kernels: LayerKernels) -> Callable:
    heads, head_dim, scale = attn.num_heads, attn.head_dim, attn.scaling
    fused = kernels.rotary_fused

    def forward(
        hidden_states: Tensor,
        cu_seqlens: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        max_seqlen: int | None = None,
        qwen_rotary: tuple[Tensor, Tensor, list[int]] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        tokens = hidden_states.shape[0]
        qkv = attn.qkv(hidden_states).view(tokens, 3, heads, head_dim)
        if max_seqlen is None:
            # Called outside the patched tower: one read of the segment lengths.
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if fused and qwen_rotary is not None:
            positions, inv_freq, section = qwen_rotary
            out = qk.window_attn_rope(
                qkv,
                cu_seqlens,
                max_seqlen,
                positions,
                inv_freq,
                section,
                scale,
                backend=kernels.attention,
            )
        else:
            q, k, v = qkv.unbind(1)
            cos, sin = position_embeddings
            if needs_grad(q):  # the in-place form cannot be differentiated
                q, k = qk.mrope(q, k, cos, sin, None, backend=kernels.rotary)
            else:
                qk.mrope_(q, k, cos, sin, None, backend=kernels.rotary)
            out = qk.window_attn(q, k, v, cu_seqlens, max_seqlen, scale, backend=kernels.attention)
        return attn.proj(out.view(tokens, -1))

    return forward


def _mlp_forward(mlp: nn.Module, kernels: LayerKernels) -> Callable:
    def forward(hidden_state: Tensor) -> Tensor:
        # qwen.swiglu reads [gate | up] along the last dim.
        gate_up = torch.cat((mlp.gate_proj(hidden_state), mlp.up_proj(hidden_state)), dim=-1)
        return mlp.down_proj(qk.swiglu(gate_up, backend=kernels.mlp))

    return forward


def _block_forward(block: nn.Module, kernels: LayerKernels) -> Callable:
    norm1, norm2 = block.norm1, block.norm2

    def forward(
        hidden_states: Tensor,
        cu_seqlens: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        x = qk.rms_norm(hidden_states, norm1.weight, norm1.variance_epsilon, backend=kernels.norm)
        attn = block.attn(
            x, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs
        )
        x, residual = qk.add_rms_norm(
            attn, hidden_states, norm2.weight, norm2.variance_epsilon, backend=kernels.norm
        )
        return residual + block.mlp(x)

    return forward


def _merger_forward(merger: nn.Module, merge_size: int, backend: str) -> Callable:
    ln_q = merger.ln_q

    def forward(x: Tensor) -> Tensor:
        merged = qk.patch_merge(
            x, ln_q.weight, ln_q.variance_epsilon, None, merge_size, backend=backend
        )
        return merger.mlp(merged)

    return forward


def _max_seqlens(tower: nn.Module, grid_thw: Tensor) -> tuple[int, int, int]:
    """(tokens, longest frame, longest window) of ``grid_thw``, from its values on the host."""
    merge = tower.spatial_merge_size
    window_units = tower.window_size // merge // tower.patch_size
    grid = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
    tokens = sum(t * h * w for t, h, w in grid)
    frame = max(h * w for _, h, w in grid)
    # Windows tile each frame from its top-left corner, so the first one is the largest.
    window = max(
        min(h // merge, window_units) * min(w // merge, window_units) for _, h, w in grid
    ) * (merge * merge)
    return tokens, frame, window


def vision_kwargs(tower: nn.Module, grid_thw: Tensor) -> dict[str, Any]:
    """The grid-dependent inputs of transformers' vision tower, computed ahead of the call.

    transformers' tower takes these precomputed as keyword arguments (``position_ids``,
    ``cu_seqlens``, ``max_seqlen``, ``window_index``, ``cu_window_seqlens``,
    ``max_window_seqlen``); passed in, the tower's forward does no host work, so
    ``torch.compile(tower, fullgraph=True)`` traces it whole:
    ``compiled(pixel_values, grid_thw, **vision_kwargs(tower, grid_thw))``.
    """
    _, frame, window = _max_seqlens(tower, grid_thw)
    return _vision_kwargs(tower, grid_thw, frame, window)


def _vision_kwargs(tower: nn.Module, grid_thw: Tensor, frame: int, window: int) -> dict[str, Any]:
    """``vision_kwargs`` with the longest frame and window already known."""
    from transformers.vision_utils import (
        get_vision_attention_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    merge = tower.spatial_merge_size
    window_index, cu_window_seqlens = get_vision_window_index(
        grid_thw, merge, tower.window_size, tower.patch_size
    )
    return {
        "position_ids": get_vision_position_ids(grid_thw, merge),
        "cu_seqlens": get_vision_attention_seqlens(grid_thw, tower.config)[0],
        "max_seqlen": frame,
        "window_index": window_index,
        "cu_window_seqlens": cu_window_seqlens,
        "max_window_seqlen": window,
    }


# The keyword arguments through which transformers' tower takes its grid inputs precomputed.
_GRID_KWARGS = (
    "position_ids",
    "cu_seqlens",
    "max_seqlen",
    "window_index",
    "cu_window_seqlens",
    "max_window_seqlen",
)


def _window_rotary(
    tower: nn.Module, position_ids: Tensor, window_index: Tensor
) -> tuple[Tensor, Tensor, list[int]]:
    """``window_attn_rope``'s rotary inputs: (row, column) of each token in window order
    ``[2, T]``, the axial frequencies once per axis, and the section that assigns them."""
    unit = tower.spatial_merge_size**2
    tokens = position_ids.shape[0]
    index = window_index.to(position_ids.device)
    positions = position_ids.view(tokens // unit, unit, 2)[index].reshape(tokens, 2)
    inv_freq = tower.rotary_pos_emb.inv_freq.float()
    half = inv_freq.shape[0]
    # int32 once here, not converted by the kernels in every layer (row/column indices fit).
    rows_columns = positions.t().to(torch.int32, memory_format=torch.contiguous_format)
    return rows_columns, torch.cat((inv_freq, inv_freq)), [half, half]


def _tower_forward(tower: nn.Module, original: Callable, fused: bool) -> Callable:
    def with_rotary(kwargs: dict[str, Any]) -> dict[str, Any]:
        # The blocks pass unknown keyword arguments on to their attention.
        if fused and "position_ids" in kwargs and "window_index" in kwargs:
            rotary = _window_rotary(tower, kwargs["position_ids"], kwargs["window_index"])
            kwargs["qwen_rotary"] = rotary
        return kwargs

    def forward(hidden_states: Tensor, grid_thw: Tensor, **kwargs: Any) -> Any:
        if any(name in kwargs for name in _GRID_KWARGS):
            # The caller's precomputed inputs (e.g. for torch.compile): only the maxima that
            # window_attn needs are added, and the ops check the caller's cu_seqlens.
            if "max_seqlen" not in kwargs or "max_window_seqlen" not in kwargs:
                _, frame, window = _max_seqlens(tower, grid_thw)
                kwargs.setdefault("max_seqlen", frame)
                kwargs.setdefault("max_window_seqlen", window)
            return original(hidden_states, grid_thw, **with_rotary(kwargs))
        tokens, frame, window = _max_seqlens(tower, grid_thw)
        if hidden_states.shape[0] != tokens:
            raise ValueError(
                f"qwen_kernels.hf: the vision tower's hidden_states must have one row per "
                f"patch of grid_thw ({tokens}), got {hidden_states.shape[0]}"
            )
        # Computed once per call and moved to the activations' device once (grid_thw may be on
        # the CPU), instead of read back from the device in every layer.
        device = hidden_states.device
        for name, value in _vision_kwargs(tower, grid_thw, frame, window).items():
            kwargs[name] = value.to(device) if isinstance(value, Tensor) else value
        # The seqlens come from grid_thw and the rows were just counted: the ops need not check
        # cu_seqlens against the device values in every layer.
        with qk.skip_value_checks():
            return original(hidden_states, grid_thw, **with_rotary(kwargs))

    return forward


def tower_kernels(
    kernels: str | KernelConfig | Mapping[str, Any],
    depth: int,
    head_dim: int | None,
    text: bool = False,
    caller: str = "patch_qwen2_5_vl",
) -> KernelConfig:
    """``kernels`` as a validated ``KernelConfig`` for a patched tower of ``depth`` blocks
    (transformers' here, vLLM's in ``qwen_kernels.vllm``): the blocks rotate with cos/sin
    tables (``qwen.mrope_``), and ``text`` adds the text model's ``qwen.mrope``; the fused MLP
    front is refused, since the patched towers keep their own linears.

    Raises:
        ValueError: as ``KernelConfig.validate``, or a rotary backend without the table form,
            or ``fuse_mlp_norm`` set; the message starts with ``caller``.
    """
    config = KernelConfig.coerce(kernels)
    config.validate(depth, head_dim)
    # The rotaries the patch runs besides the encoder's ops (which validate covers): transformers
    # passes cos/sin tables, so the vision blocks run the in-place table form and the text model
    # the out-of-place one, on the top-level rotary backend.
    table_rotaries = {(config.for_layer(index).rotary, "mrope_") for index in range(depth)}
    if text:
        table_rotaries.add((config.rotary, "mrope"))
    for backend, op in sorted(table_rotaries):
        if backend != "auto" and backend not in op_backends(op):
            raise ValueError(
                f"{caller}: 'rotary' = {backend!r} runs qwen.{op} here, which has "
                f"no {backend!r} kernel (it has: {', '.join(op_backends(op))})"
            )
    fused = [i for i in range(depth) if config.for_layer(i).fuse_mlp_norm]
    if fused:
        raise ValueError(
            f"{caller}: fuse_mlp_norm is set for blocks {fused}, but qwen.rms_norm_swiglu "
            "runs the gate/up GEMM itself, and the patched tower keeps its own linears (the "
            "patch copies no weights); use VisionEncoder for the fused MLP front"
        )
    return config


def patch_qwen2_5_vl(
    model: nn.Module, kernels: str | KernelConfig | Mapping[str, Any] = "auto"
) -> PatchHandle:
    """Make a transformers Qwen2.5-VL model run the ``torch.ops.qwen`` kernels, in place.

    Args:
        model: a ``Qwen2_5_VLForConditionalGeneration``, a ``Qwen2_5_VLModel`` (vision tower and
            text model are patched) or a ``Qwen2_5_VisionTransformerPretrainedModel`` alone.
        kernels: a backend name, a ``KernelConfig`` or a dict of its fields, as for
            ``VisionEncoder``; per-layer overrides apply to the vision blocks, ``merge`` to the
            merger, and the text model's rotary runs on the ``rotary`` backend.

    Returns:
        A ``PatchHandle``; ``handle.unpatch()`` restores the original forwards.

    Raises:
        ValueError: the model is of another kind, its modules are not laid out as in the
            transformers versions this patch knows (the message names what was found), it is
            already patched, or ``kernels`` is invalid for its depth (see ``KernelConfig``).
    """
    tower, text = _parts(model)
    parts = [part for part in (tower, text) if part is not None]
    if any(getattr(part, _MARK, None) is not None for part in parts):
        raise ValueError("patch_qwen2_5_vl: this model is already patched; unpatch() it first")
    if tower is not None:
        _check_tower(tower)
    # Structure checks first: nothing is replaced unless the whole model is understood.
    text_layers = _text_layers(text) if text is not None else []
    depth = len(tower.blocks) if tower is not None else 0
    head_dim = tower.blocks[0].attn.head_dim if depth else None
    config = tower_kernels(kernels, depth, head_dim, text=bool(text_layers))

    handle = PatchHandle(parts, config)
    if tower is not None:
        for index, block in enumerate(tower.blocks):
            layer = config.for_layer(index)
            handle._replace(block.attn, _attention_forward(block.attn, layer))
            handle._replace(block.mlp, _mlp_forward(block.mlp, layer))
            handle._replace(block, _block_forward(block, layer))
        merger = _merger_forward(tower.merger, tower.spatial_merge_size, config.merge)
        handle._replace(tower.merger, merger)
        fused = any(config.for_layer(i).rotary_fused for i in range(len(tower.blocks)))
        original = getattr(tower, forward_slot(tower))
        handle._replace(tower, _tower_forward(tower, original, fused))
    if text_layers:
        rotary = _text_rotary(config.rotary)
        for attn, forward in text_layers:
            handle._replace(attn, types.MethodType(_with_rotary(forward, rotary), attn))
    for part in parts:
        setattr(part, _MARK, handle)
    return handle
