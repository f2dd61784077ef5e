"""Training benchmark of the Qwen2.5-VL vision tower (7B config, bf16): one forward and backward
(``qwen-kernels bench --op encoder_training``), with its peak memory above what was live before.

Ours: the trainable encoder on the best kernels ("auto"), with activation checkpointing, on the
eager references ("torch"), and "auto" under torch.compile. Peers: transformers' tower with sdpa,
flash_attention_2 where installed, sdpa with Liger-Kernel's RMSNorm (what Liger patches in the
Qwen2.5-VL tower) where installed, and sdpa under torch.compile. Every implementation trains all
parameters and the pixels; a step returns the pixels' gradient and every parameter's (in the
encoder's layout), which the harness compares with the eager references'. Cases: a 1344x1344
image and a 16-frame 448x448 video; the dry run trains the tiny tower in fp32 on the CPU.

Goals of this benchmark (not a test): a step at least 1.3x as fast as the fastest transformers
attention, at most 0.7x its peak memory.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from qwen_kernels.model import VisionConfig, VisionEncoder
from qwen_kernels.model.weights import convert_hf_state_dict, hf_shapes

from .bench_encoder import compile_for, encoder_flops, hf_forward, hf_tower, tower_weights
from .harness import REL_ERR_LIMIT, Case, Impl, Inputs, Maker, Suite, missing_module
from .shapes import TINY, Grid, Scale

OP = "encoder_training"
GRIDS = {"image-1344x1344": (1, 96, 96), "video-16x448x448": (8, 32, 32)}
TINY_GRIDS = {"tiny-image": (1, 8, 12)}
TINY_REL_ERR = 1e-3  # fp32 gradients of the tiny tower on the CPU, summed in other orders


def cases(scale: Scale) -> list[Case]:
    """The issue's image and video (the tiny tower on a small image at the dry run's scale)."""
    tiny = scale is TINY
    config = VisionConfig.tiny() if tiny else VisionConfig.qwen2_5_vl("7b")
    dtype = torch.float32 if tiny else torch.bfloat16
    grids = TINY_GRIDS if tiny else GRIDS
    return [_case(name, grid, config, dtype) for name, grid in grids.items()]


def _case(name: str, grid: Grid, config: VisionConfig, dtype: torch.dtype) -> Case:
    tokens = math.prod(grid)
    size = torch.empty((), dtype=dtype).element_size()
    weights = sum(math.prod(shape) for shape in hf_shapes(config).values())
    pixels, out = tokens * config.patch_dim, tokens // config.merge_unit * config.out_hidden_size
    return Case(
        op=OP,
        name=name,
        series="real",
        x=tokens,
        tokens=tokens,
        shape=f"pixels [{tokens}, {config.patch_dim}], {weights / 1e6:.0f}M weights, "
        f"{str(dtype).split('.')[-1]}: forward and backward of every parameter and the pixels",
        # The pixels, the weights and the output's gradient read once; the pixels' and the
        # weights' gradients written once.
        bytes=(2 * pixels + 2 * weights + out) * size,
        # The backward's matrix products are twice the forward's.
        flops=3 * encoder_flops(config, grid),
        args=("pixels", "weights", "grad"),
        build=functools.partial(_build, config, dtype, grid),
        reference=functools.partial(_step_of, "qwen/torch"),
        rel_err_limit=TINY_REL_ERR if dtype == torch.float32 else REL_ERR_LIMIT,
    )


def _build(config: VisionConfig, dtype: torch.dtype, grid: Grid, make: Maker) -> Inputs:
    out_rows = math.prod(grid) // config.merge_unit
    return {
        "pixels": make.randn(math.prod(grid), config.patch_dim, dtype=dtype),
        "weights": tower_weights(config, dtype, make.device),
        "grad": make.randn(out_rows, config.out_hidden_size, dtype=dtype),
        "grids": (grid,),
        "model": (config, dtype, make.device),
    }


@functools.cache
def _model(name: str, config: VisionConfig, dtype: torch.dtype, device: torch.device) -> Callable:
    """Implementation ``name``, its parameters trainable copies, built once per process: a
    function of (pixels, grids) returning the forward as a function of the pixels, the
    parameters' gradients in the encoder's layout, and what clears them (as zero_grad does)."""
    family, _, variant = name.partition("/")
    kernels, _, mode = variant.partition("+")
    weights = {k: v.clone() for k, v in tower_weights(config, dtype, device).items()}
    if family == "qwen":
        encoder = VisionEncoder.from_hf_state_dict(weights, config, kernels=kernels)
        encoder.train().requires_grad_()
        encoder.gradient_checkpointing = mode == "checkpoint"
        encode = compile_for(encoder.encode, device) if mode == "compile" else encoder.encode

        def grads() -> dict[str, Tensor]:
            return {n: p.grad for n, p in encoder.named_parameters()}

        def bind_ours(pixels: Tensor, grids: tuple[Grid, ...]) -> tuple[Callable, ...]:
            forward = functools.partial(encode, layout=encoder.layout(grids))
            return forward, grads, functools.partial(encoder.zero_grad, set_to_none=True)

        return bind_ours
    tower = hf_tower(config, weights, kernels).train().requires_grad_()
    if mode == "liger":
        _use_liger_rms_norm(tower)
    run = compile_for(tower, device) if mode == "compile" else tower

    def hf_grads() -> dict[str, Tensor]:
        return convert_hf_state_dict({n: p.grad for n, p in tower.named_parameters()}, config)

    def bind(pixels: Tensor, grids: tuple[Grid, ...]) -> tuple[Callable, ...]:
        forward = hf_forward(run, config, grids, device)
        return forward, hf_grads, functools.partial(tower.zero_grad, set_to_none=True)

    return bind


def _use_liger_rms_norm(tower: torch.nn.Module) -> None:
    """Liger-Kernel's RMSNorm in each of the tower's RMSNorms (instance forwards only)."""
    from liger_kernel.transformers.functional import liger_rms_norm

    for module in tower.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = functools.partial(
                lambda x, m: liger_rms_norm(x, m.weight, m.variance_epsilon), m=module
            )


def _prepare(name: str, inputs: Inputs) -> Inputs:
    forward, grads, reset = _model(name, *inputs["model"])(inputs["pixels"], inputs["grids"])
    return {**inputs, "forward": forward, "grads": grads, "model_grads_reset": reset}


def _step(inputs: Inputs) -> tuple[Tensor, ...]:
    """One forward and backward: the pixels' gradient, then every parameter's by name."""
    inputs["model_grads_reset"]()
    pixels = inputs["pixels"].detach().requires_grad_()
    inputs["forward"](pixels).backward(inputs["grad"])
    grads = inputs["grads"]()
    return (pixels.grad, *(grads[name] for name in sorted(grads)))


def _step_of(name: str, inputs: Inputs) -> Tensor:
    return _step(_prepare(name, inputs))


def _impl(name: str, **fields: object) -> Impl:
    prepare = functools.partial(_prepare, name)
    return Impl(name, _step, prepare=prepare, compiles=name.endswith("+compile"), **fields)


def ours(case: Case, device_type: str) -> list[Impl]:
    names = ("qwen/auto", "qwen/auto+checkpoint", "qwen/torch", "qwen/auto+compile")
    return [_impl(name, kind="qwen") for name in names]


def peers(op: str) -> list[Impl]:
    return [
        _impl("transformers/sdpa"),
        _impl(
            "transformers/flash_attention_2",
            missing=missing_module("flash_attn", "flash-attn"),
            cpu=False,
        ),
        _impl(
            "transformers/sdpa+liger",
            missing=missing_module("liger_kernel", "liger-kernel"),
            cpu=False,
        ),
        _impl("transformers/sdpa+compile"),
    ]


SUITE = Suite(
    "encoder_training", (OP,), cases, peers, ours=ours, profile=True, warmup_ms=200, rep_ms=1000
)
