"""The tower's shape (``VisionConfig``) and the kernels its layers run (``KernelConfig``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qwen_kernels import _backends

# out_hidden_size (the LLM's hidden size) per released Qwen2.5-VL model; the tower is the same.
_OUT_HIDDEN = {"3b": 2048, "7b": 3584, "32b": 5120, "72b": 8192}

# HF config keys that map one to one onto VisionConfig fields.
_HF_FIELDS = (
    "depth",
    "hidden_size",
    "num_heads",
    "intermediate_size",
    "out_hidden_size",
    "patch_size",
    "temporal_patch_size",
    "spatial_merge_size",
    "window_size",
    "fullatt_block_indexes",
    "in_channels",
    "hidden_act",
    "tokens_per_second",
)


@dataclass(frozen=True)
class VisionConfig:
    """Shape of the Qwen2.5-VL vision tower. Defaults are the released tower (7B LLM width).

    Attributes:
        depth: number of transformer blocks.
        hidden_size: width of the blocks.
        num_heads: attention heads; ``head_dim = hidden_size // num_heads``.
        intermediate_size: SwiGLU width.
        out_hidden_size: width of the merged tokens (the LLM's hidden size).
        patch_size: spatial patch side in pixels.
        temporal_patch_size: frames per patch (an image is repeated to this many frames).
        spatial_merge_size: side of the merge unit in patches (2x2 patches -> one LLM token).
        window_size: side of an attention window in pixels.
        fullatt_block_indexes: blocks that attend over whole frames instead of windows.
        in_channels: image channels.
        hidden_act: MLP activation; only "silu" (SwiGLU) is supported.
        tokens_per_second: temporal position rate of the LLM's M-RoPE for videos.
        rms_norm_eps: epsilon of every RMSNorm in the tower.
        rope_theta: base of the 2D rotary frequencies.
    """

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    hidden_act: str = "silu"
    tokens_per_second: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        if self.head_dim % 4:
            # Half of the rotary frequencies follow the row, half the column.
            raise ValueError(f"head_dim ({self.head_dim}) must be a multiple of 4 (2D rotary)")
        if self.hidden_act != "silu":
            raise ValueError(f"only the SwiGLU (silu) MLP is supported, got {self.hidden_act!r}")
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size % unit:
            raise ValueError(
                f"window_size ({self.window_size}) must be a multiple of patch_size * "
                f"spatial_merge_size ({unit})"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} are outside [0, depth={self.depth})")

    @property
    def head_dim(self) -> int:
        """Width of one attention head (80)."""
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch: channels x temporal patch x patch x patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (4)."""
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """Side of an attention window in merge units (4)."""
        return self.window_size // (self.patch_size * self.spatial_merge_size)

    @classmethod
    def qwen2_5_vl(cls, size: str = "7b") -> VisionConfig:
        """The tower of a released Qwen2.5-VL model: "3b", "7b", "32b" or "72b"."""
        key = size.lower()
        if key not in _OUT_HIDDEN:
            raise ValueError(f"unknown Qwen2.5-VL size {size!r}; expected {list(_OUT_HIDDEN)}")
        return cls(out_hidden_size=_OUT_HIDDEN[key])

    @classmethod
    def tiny(cls) -> VisionConfig:
        """A 4-layer tower with the real head_dim (80), windows and merge, blocks 1 and 3 over
        whole frames: small enough for CPU tests and dry runs, shaped like the real one."""
        return cls(
            depth=4,
            hidden_size=160,
            num_heads=2,
            intermediate_size=224,
            out_hidden_size=96,
            fullatt_block_indexes=(1, 3),
        )

    @classmethod
    def from_hf(cls, config: Any) -> VisionConfig:
        """Build from a transformers vision config, its dict, or a whole Qwen2.5-VL config.

        Accepts a ``Qwen2_5_VLVisionConfig``, the ``vision_config`` dict of a checkpoint's
        ``config.json``, or the full model config (its ``vision_config`` is used). Keys the config
        lacks keep the released tower's values; ``in_chans`` (older checkpoints) is read as
        ``in_channels``.
        """
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        if "vision_config" in values:
            vision = values["vision_config"]
            values = vision.to_dict() if hasattr(vision, "to_dict") else dict(vision)
        if "in_channels" not in values and "in_chans" in values:
            values["in_channels"] = values["in_chans"]
        kwargs: dict[str, Any] = {k: values[k] for k in _HF_FIELDS if values.get(k) is not None}
        for key in ("patch_size", "temporal_patch_size"):
            if isinstance(kwargs.get(key), (list, tuple)):
                sizes = set(kwargs[key])
                if len(sizes) != 1:
                    raise ValueError(f"{key} {kwargs[key]} is not square; it must be one int")
                kwargs[key] = sizes.pop()
        rope = values.get("rope_parameters") or {}
        if rope.get("rope_theta") is not None:
            kwargs["rope_theta"] = float(rope["rope_theta"])
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``vision_config`` dict transformers' ``Qwen2_5_VLVisionConfig`` accepts."""
        values = {k: getattr(self, k) for k in _HF_FIELDS}
        values["fullatt_block_indexes"] = list(self.fullatt_block_indexes)
        values["rope_parameters"] = {"rope_type": "axial", "rope_theta": self.rope_theta}
        return values


LAYER_GROUPS: tuple[str, ...] = ("attention", "rotary", "norm", "mlp")
OP_GROUPS: tuple[str, ...] = (*LAYER_GROUPS, "merge")
BACKEND_NAMES: tuple[str, ...] = ("auto", "torch", "triton", "cuda", "cuda_emu")

# The qwen ops each op group runs; with fuse_mlp_norm the mlp group runs FUSED_MLP_OPS instead, and
# where the rotary runs inside the attention the attention and rotary groups run FUSED_ROTARY_OPS.
GROUP_OPS: dict[str, tuple[str, ...]] = {
    "attention": ("window_attn",),
    "rotary": ("mrope_pos_",),
    "norm": ("rms_norm", "add_rms_norm"),
    "mlp": ("swiglu",),
    "merge": ("patch_merge",),
}
FUSED_MLP_OPS: tuple[str, ...] = ("rms_norm_swiglu",)
FUSED_ROTARY_OPS: tuple[str, ...] = ("window_attn_rope",)


# Per-layer switches besides the groups' backends.
_LAYER_FLAGS: tuple[str, ...] = ("fuse_rotary", "fuse_mlp_norm")


def _check_backend(group: str, backend: object) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend for {group!r} must be one of {BACKEND_NAMES}, got {backend!r}")


def group_ops(
    group: str, fuse_mlp_norm: bool = False, rotary_fused: bool = False
) -> tuple[str, ...]:
    """The qwen ops that op group ``group`` runs (the mlp group depends on ``fuse_mlp_norm``, the
    attention and rotary groups on whether the rotary runs inside the attention)."""
    if group == "mlp" and fuse_mlp_norm:
        return FUSED_MLP_OPS
    if group in ("attention", "rotary") and rotary_fused:
        return FUSED_ROTARY_OPS
    return GROUP_OPS[group]


def op_backends(op: str) -> tuple[str, ...]:
    """The backends that have code for qwen op ``op`` (whether or not they can run here)."""
    impls = _backends.REGISTRY[op].impls
    return tuple(b for b in _backends.BACKENDS if b in impls)


def _misfit(op: str, backend: str, head_dim: int) -> str | None:
    """Why ``backend``'s kernel of ``op`` cannot take ``head_dim`` here, or None (also where the
    op has no such limit, or where the backend cannot run on this machine at all)."""
    table = _backends.REGISTRY[op]
    if backend == "auto" or table.misfit is None or _backends.runtime_missing(backend):
        return None
    return table.misfit(backend, head_dim)


def _has_code(backend: str, ops: tuple[str, ...]) -> bool:
    return backend == "auto" or all(backend in op_backends(op) for op in ops)


def _format_layers(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> "layers 0-2, 5"; one index -> "layer 5"."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    parts = [f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs]
    return ("layers " if len(indices) > 1 else "layer ") + ", ".join(parts)


@dataclass(frozen=True)
class LayerKernels:
    """Backends one block uses, per op group, and whether its MLP front runs fused.

    Attributes:
        attention: ``window_attn``, or ``window_attn_rope`` with the rotary fused in.
        rotary: ``mrope_pos_`` (the 2D rotary, in place on the packed qkv), unless it runs
            inside the attention (``rotary_fused``).
        norm: ``rms_norm`` / ``add_rms_norm`` (the two pre-norms with the residual adds).
        mlp: ``swiglu``, or ``rms_norm_swiglu`` when ``fuse_mlp_norm``.
        fuse_rotary: run the rotary inside the attention kernel (``window_attn_rope``: qkv is
            read once, rotated q and k are never written) wherever ``rotary`` and
            ``attention`` name the same backend and it has that op; False runs ``mrope_pos_``
            and ``window_attn`` apart.
        fuse_mlp_norm: run the second pre-norm, the gate/up GEMM and SwiGLU as one
            ``rms_norm_swiglu`` call (on the ``mlp`` backend) instead of ``add_rms_norm`` +
            GEMM + ``swiglu``. Off by default: it only pays where the fused kernel beats cuBLAS.
    """

    attention: str = "auto"
    rotary: str = "auto"
    norm: str = "auto"
    mlp: str = "auto"
    fuse_rotary: bool = True
    fuse_mlp_norm: bool = False

    def __post_init__(self) -> None:
        for group in LAYER_GROUPS:
            _check_backend(group, getattr(self, group))
        for flag in _LAYER_FLAGS:
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool, got {getattr(self, flag)!r}")

    @property
    def rotary_fused(self) -> bool:
        """Whether the block runs ``window_attn_rope`` (on the attention backend) instead of
        ``mrope_pos_`` + ``window_attn``."""
        return (
            self.fuse_rotary
            and self.rotary == self.attention
            and _has_code(self.attention, FUSED_ROTARY_OPS)
        )


@dataclass(frozen=True)
class KernelConfig(LayerKernels):
    """Backends for the whole encoder, with per-layer overrides.

    ``KernelConfig.uniform("triton")`` (or the plain string "triton" wherever a KernelConfig is
    taken) uses one backend for every group; ``KernelConfig.best_effort("triton")`` uses it for
    the groups whose ops all have Triton kernels and "auto" for the rest;
    ``KernelConfig(norm="cuda", layers={7: {"norm": "torch"}})`` overrides groups of single blocks.

    A config names backends per group; whether every op of a group has code for the backend named
    is checked by ``validate``, which ``VisionEncoder`` runs whenever it takes a config.

    Attributes:
        merge: ``patch_merge`` (the merger's RMSNorm and 2x2 gather, after the last block).
        layers: block index -> {group, "fuse_rotary" or "fuse_mlp_norm": value}, overriding
            the fields above.
    """

    merge: str = "auto"
    layers: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_backend("merge", self.merge)
        layers: dict[int, dict[str, Any]] = {}
        for index, overrides in self.layers.items():
            unknown = set(overrides) - {*LAYER_GROUPS, *_LAYER_FLAGS}
            if unknown:
                raise ValueError(
                    f"layers[{index}] has unknown keys {sorted(unknown)}; per-layer keys are "
                    f"{[*LAYER_GROUPS, *_LAYER_FLAGS]}"
                )
            layers[int(index)] = dict(overrides)
        object.__setattr__(self, "layers", layers)
        for index in layers:
            self.for_layer(index)  # validates the merged values

    @classmethod
    def uniform(cls, backend: str) -> KernelConfig:
        """One backend for every op group of every layer (an encoder refuses it while some op
        has no code for that backend; ``best_effort`` falls back to "auto" for those groups)."""
        return cls(**dict.fromkeys(OP_GROUPS, backend))

    @classmethod
    def best_effort(cls, backend: str, fuse_mlp_norm: bool = False) -> KernelConfig:
        """``backend`` for every op group whose ops all have code for it, "auto" for the rest
        (e.g. "cuda" for the norms and the MLP while attention has only the reference);
        attention and rotary both take it where it has the fused ``window_attn_rope``.

        Args:
            backend: a backend name ("auto" gives the default config).
            fuse_mlp_norm: fuse the MLP front (then the mlp group runs ``rms_norm_swiglu``).
        """
        _check_backend("every group", backend)
        # Attention and rotary take the backend together where it has the fused op.
        fused = _has_code(backend, FUSED_ROTARY_OPS)
        fields = {
            group: backend if _has_code(backend, group_ops(group, fuse_mlp_norm, fused)) else "auto"
            for group in OP_GROUPS
        }
        return cls(**fields, fuse_mlp_norm=fuse_mlp_norm)

    @classmethod
    def coerce(cls, spec: str | KernelConfig | Mapping[str, Any]) -> KernelConfig:
        """A KernelConfig from a backend name, a dict of fields, or a KernelConfig."""
        if isinstance(spec, KernelConfig):
            return spec
        if isinstance(spec, str):
            return cls.uniform(spec)
        if isinstance(spec, Mapping):
            return cls(**spec)
        raise TypeError(f"kernels must be a backend name, a dict or a KernelConfig, got {spec!r}")

    def _shape_problems(self, depth: int, head_dim: int) -> list[str]:
        """What the backends each layer names cannot take at the model's ``head_dim``."""
        misfits: dict[tuple[str, str, str, str], list[int]] = {}
        for index in range(depth):
            layer = self.for_layer(index)
            for group in LAYER_GROUPS:
                backend = getattr(layer, group)
                for op in group_ops(group, layer.fuse_mlp_norm, layer.rotary_fused):
                    why = _misfit(op, backend, head_dim)
                    if why is not None:
                        misfits.setdefault((group, op, backend, why), []).append(index)
        return [
            f"{_format_layers(layers)}: {group!r} runs qwen.{op} on {backend!r} over heads of "
            f"head_dim {head_dim}, which it cannot take: {why}"
            for (group, op, backend, why), layers in misfits.items()
        ]

    def for_layer(self, index: int) -> LayerKernels:
        """The kernels block ``index`` uses: the defaults with that block's overrides."""
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(LayerKernels)}
        return LayerKernels(**{**base, **self.layers.get(index, {})})

    def validate(self, depth: int, head_dim: int | None = None) -> None:
        """Check the config against an encoder of ``depth`` blocks: every override names an
        existing block, every op of every group has code for the backend the group names, and,
        given the model's ``head_dim``, that backend's kernels hold it ("auto" always passes: it
        falls back per call; whether a backend can run on this machine is known only at the
        first call, on the inputs' device, and where its runtime is missing here the shape is
        not checked either).

        Raises:
            ValueError: naming each offending group with its layers, op, the backend asked for
                and the backends that op has, or what the backend's kernels hold.
        """
        bad = sorted(i for i in self.layers if not 0 <= i < depth)
        if bad:
            raise ValueError(f"kernel overrides for layers {bad} outside [0, {depth})")
        # (group, op, backend) -> the layers asking for a backend the op has no code for.
        missing: dict[tuple[str, str, str], list[int]] = {}
        for index in range(depth):
            layer = self.for_layer(index)
            for group in LAYER_GROUPS:
                backend = getattr(layer, group)
                for op in group_ops(group, layer.fuse_mlp_norm, layer.rotary_fused):
                    if not _has_code(backend, (op,)):
                        missing.setdefault((group, op, backend), []).append(index)
        problems = [
            f"{_format_layers(layers)}: {group!r} runs qwen.{op}, which has no {backend!r} "
            f"kernel (it has: {', '.join(op_backends(op))})"
            for (group, op, backend), layers in missing.items()
        ]
        if head_dim is not None and not problems:
            problems += self._shape_problems(depth, head_dim)
        for op in GROUP_OPS["merge"]:
            if not _has_code(self.merge, (op,)):
                problems.append(
                    f"merger: 'merge' runs qwen.{op}, which has no {self.merge!r} kernel "
                    f"(it has: {', '.join(op_backends(op))})"
                )
        if problems:
            raise ValueError(
                "kernel config names backends that cannot run some of its ops: "
                + "; ".join(problems)
                + ". Name a backend those ops have, or use KernelConfig.best_effort(backend) "
                "for that backend where it exists and 'auto' elsewhere (which falls back per "
                "call where a kernel cannot take the shape)."
            )
