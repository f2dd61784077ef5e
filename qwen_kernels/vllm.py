"""vLLM plug-in: vLLM's Qwen2.5-VL vision tower on the ``torch.ops.qwen`` kernels.

vLLM calls ``register()`` (entry point ``qwen_kernels`` of the group ``vllm.general_plugins``) in
every engine and worker process before it builds a model. The plug-in is off unless ``QK_VLLM``
is set, to ``auto``, to a backend name (``torch``, ``triton``, ``cuda``, ``cuda_emu``) or to the
path of a JSON file of ``KernelConfig`` fields; installing qwen-kernels alone changes nothing.

When on, every ``Qwen2_5_VisionTransformer`` built afterwards runs its forward here:

* the grid's token order, attention segments (windows and whole frames), their longest lengths
  and the rotary inputs are computed once per distinct grid on the host and cached on the device,
  not read back from the device per layer (``model.layout``);
* per block: ``qwen.rms_norm``, vLLM's qkv projection, the 2D rotary on ``qwen.mrope_`` (cos/sin
  tables built once per forward) and ``qwen.window_attn``, or both in ``qwen.window_attn_rope``
  where the config fuses the rotary; vLLM's output projection; ``qwen.add_rms_norm`` (the first
  residual add fused into the second norm); vLLM's gate/up projection, ``qwen.swiglu``, vLLM's
  down projection;
* the merger: ``qwen.patch_merge`` (RMSNorm, 2x2 concatenation and the gather back to the input
  order in one op), then vLLM's MLP.

The linears (with their tensor-parallel all-reduce and any quantization), the patch embedding and
weight loading stay vLLM's. With tensor parallelism each rank runs the ops on its own heads
(``--mm-encoder-tp-mode data`` keeps every head on every rank). The encoder CUDA-graph path
(metadata without ``grid_thw``) runs vLLM's own forward, with one warning per process.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import qwen_kernels as qk
from qwen_kernels.hf import tower_kernels
from qwen_kernels.model.config import KernelConfig, LayerKernels, VisionConfig
from qwen_kernels.model.layout import GridLayout, LayoutCache
from qwen_kernels.ops.mrope import rope_tables

logger = logging.getLogger(__name__)

ENV = "QK_VLLM"
# vLLM releases whose Qwen2.5-VL tower this plug-in was written against: [first, last] minor.
SUPPORTED = ((0, 33), (0, 33))
_MARK = "_qwen_kernels"
_OFF = ("", "0", "off", "false", "none")


def supported_range() -> str:
    """The vLLM releases the plug-in knows, e.g. ">=0.33, <0.34"."""
    (major, first), (_, last) = SUPPORTED
    return f">={major}.{first}, <{major}.{last + 1}"


def check_version(version: str) -> None:
    """Refuse a vLLM release whose tower layout this plug-in does not know.

    Raises:
        RuntimeError: naming ``version`` and the supported range.
    """
    parts = version.split(".")
    try:
        key = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        key = None
    if key is None or not SUPPORTED[0] <= key <= SUPPORTED[1]:
        raise RuntimeError(
            f"qwen_kernels.vllm: vLLM {version} is not supported (supported: vllm "
            f"{supported_range()}); unset {ENV} to run vLLM without the plug-in"
        )


def kernels_from_env(value: str | None = None) -> KernelConfig | None:
    """The ``KernelConfig`` that ``QK_VLLM`` (or ``value``) asks for; None when the plug-in is off.

    Raises:
        ValueError: a value that is neither a backend name nor a readable JSON file of
            ``KernelConfig`` fields.
    """
    spec = (os.environ.get(ENV, "") if value is None else value).strip()
    if spec.lower() in _OFF:
        return None
    if spec.endswith(".json") or os.sep in spec:
        path = Path(spec)
        try:
            fields = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{ENV}={spec!r}: cannot read a JSON KernelConfig: {error}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{ENV}={spec!r}: the JSON must be an object of KernelConfig fields")
        return KernelConfig.coerce(fields)
    try:
        return KernelConfig.coerce(spec)
    except ValueError as error:
        raise ValueError(
            f"{ENV}={spec!r}: expected 'auto', a backend name or a path to a JSON KernelConfig "
            f"({error})"
        ) from None


class _State:
    kernels: KernelConfig | None = None
    warned_graph_path = False


def register() -> None:
    """vLLM's entry point: with ``QK_VLLM`` set, every vLLM Qwen2.5-VL vision tower built from
    now on runs the qwen ops. Idempotent (vLLM calls it in every process, and may call it again).

    Raises:
        RuntimeError: the installed vLLM is a release the plug-in does not know.
        ValueError: ``QK_VLLM`` is not a valid kernel choice.
    """
    kernels = kernels_from_env()
    if kernels is None:
        return
    import vllm

    check_version(vllm.__version__)
    from vllm.model_executor.models import qwen2_5_vl

    _State.kernels = kernels
    tower_class = qwen2_5_vl.Qwen2_5_VisionTransformer
    if getattr(tower_class.__init__, _MARK, False):
        return
    original_init = tower_class.__init__
    signature = inspect.signature(original_init)

    @functools.wraps(original_init)
    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        vision_config = signature.bind(self, *args, **kwargs).arguments["vision_config"]
        patch_vision_tower(self, VisionConfig.from_hf(vision_config), _State.kernels)

    setattr(__init__, _MARK, True)
    tower_class.__init__ = __init__
    logger.info("qwen_kernels: vLLM's Qwen2.5-VL vision tower runs the qwen ops (%s)", kernels)


@contextlib.contextmanager
def standalone_world(world_size: int = 1, rank: int = 0, port: int | None = None) -> Iterator[None]:
    """vLLM's config and process groups for using its modules outside an engine (benchmarks,
    tests): eager (no compilation), gloo, ``world_size`` tensor-parallel ranks on one host.

    Args:
        world_size: tensor-parallel ranks; every rank enters this with its own ``rank``.
        rank: this process's rank.
        port: the rendezvous port on 127.0.0.1, the same for every rank (None: a free one; only
            for one rank).

    Without a CUDA GPU, vLLM runs on the CPU (``VLLM_TARGET_DEVICE=cpu`` unless set; it takes
    effect where vllm was not imported yet).
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.config import CompilationConfig, CompilationMode, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    if port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    config = VllmConfig(compilation_config=CompilationConfig(mode=CompilationMode.NONE))
    with set_current_vllm_config(config):
        parallel_state.init_distributed_environment(
            world_size=world_size,
            rank=rank,
            local_rank=rank,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            backend="gloo",
        )
        parallel_state.initialize_model_parallel(world_size)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()


def patch_vision_tower(
    tower: nn.Module, config: VisionConfig, kernels: str | KernelConfig | dict[str, Any] = "auto"
) -> None:
    """Make one built vLLM ``Qwen2_5_VisionTransformer`` run the qwen ops (see the module doc).

    Args:
        tower: the vLLM tower (its weights may be loaded before or after).
        config: its shape, e.g. ``VisionConfig.from_hf(hf_config.vision_config)``.
        kernels: a backend name, a ``KernelConfig`` or a dict of its fields.

    Raises:
        ValueError: the tower is already patched, or ``kernels`` cannot run its ops.
    """
    from vllm.model_executor.models.utils import cast_overflow_tensors

    if getattr(tower, _MARK, None) is not None:
        raise ValueError("qwen_kernels.vllm: this vision tower is already patched")
    head_dim = tower.blocks[0].attn.hidden_size_per_attention_head
    config_kernels = tower_kernels(kernels, len(tower.blocks), head_dim, caller="qwen_kernels.vllm")
    layouts = LayoutCache(config)
    original = tower.forward
    layers = [config_kernels.for_layer(i) for i in range(len(tower.blocks))]
    full = set(tower.fullatt_block_indexes)
    merge_size = tower.spatial_merge_size

    def forward(
        x: Tensor,
        grid_thw: list[list[int]] | Tensor | None,
        *,
        encoder_metadata: dict[str, Tensor] | None = None,
    ) -> Tensor:
        if grid_thw is None:
            if not _State.warned_graph_path:
                _State.warned_graph_path = True
                logger.warning(
                    "qwen_kernels: the encoder CUDA-graph path (no grid_thw) runs vLLM's own "
                    "vision tower"
                )
            return original(x, grid_thw, encoder_metadata=encoder_metadata)
        hidden = tower.patch_embed(tower.input_norm(x.to(device=tower.device), tower.dtype))
        layout = layouts.get(grid_thw, hidden.device)
        if hidden.shape[0] != layout.num_tokens:
            raise ValueError(
                f"qwen_kernels.vllm: {hidden.shape[0]} patches for a grid of "
                f"{layout.num_tokens} ({list(layout.grid)})"
            )
        hidden = hidden.index_select(0, layout.token_index)
        tables = None
        if not all(layer.rotary_fused for layer in layers):
            tables = rope_tables(
                layout.positions, layout.inv_freq, layout.rotary_section, torch.float32
            )
        # The layout's segments were checked when it was built: the ops skip the per-layer
        # value checks that would read cu_seqlens back from the device.
        with qk.skip_value_checks():
            for index, block in enumerate(tower.blocks):
                if index in full:
                    segments = (layout.cu_frame_seqlens, layout.max_frame_seqlen)
                else:
                    segments = (layout.cu_window_seqlens, layout.max_window_seqlen)
                hidden = _block(block, layers[index], hidden, segments, layout, tables)
            if hidden.dtype == torch.float16:
                # As vLLM's tower: fp16 may overflow in the last blocks of the 3B tower.
                hidden = cast_overflow_tensors(hidden)
            ln_q = tower.merger.ln_q
            merged = qk.patch_merge(
                hidden,
                ln_q.weight,
                ln_q.variance_epsilon,
                layout.unit_index,
                merge_size,
                backend=config_kernels.merge,
            )
        return tower.merger.mlp(merged)

    tower.forward = forward
    setattr(tower, _MARK, config_kernels)


def _block(
    block: nn.Module,
    kernels: LayerKernels,
    x: Tensor,
    segments: tuple[Tensor, int],
    layout: GridLayout,
    tables: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """One vLLM ``Qwen2_5_VisionBlock`` on the qwen ops; the linears are the block's own."""
    attn, mlp, norm1, norm2 = block.attn, block.mlp, block.norm1, block.norm2
    tokens = x.shape[0]
    heads, head_dim = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
    cu_seqlens, max_seqlen = segments
    h = qk.rms_norm(x, norm1.weight, norm1.variance_epsilon, backend=kernels.norm)
    qkv = attn.qkv(h)[0].view(tokens, 3, heads, head_dim)
    if kernels.rotary_fused:
        out = qk.window_attn_rope(
            qkv,
            cu_seqlens,
            max_seqlen,
            layout.positions,
            layout.inv_freq,
            layout.rotary_section,
            attn.attn.scale,
            backend=kernels.attention,
        )
    else:
        q, k, v = qkv.unbind(1)
        qk.mrope_(q, k, *tables, None, backend=kernels.rotary)
        out = qk.window_attn(
            q, k, v, cu_seqlens, max_seqlen, attn.attn.scale, backend=kernels.attention
        )
    attended = attn.proj(out.view(tokens, heads * head_dim))[0]
    h, residual = qk.add_rms_norm(
        attended, x, norm2.weight, norm2.variance_epsilon, backend=kernels.norm
    )
    gate_up = mlp.gate_up_proj(h)[0]
    return residual + mlp.down_proj(qk.swiglu(gate_up, backend=kernels.mlp))[0]
