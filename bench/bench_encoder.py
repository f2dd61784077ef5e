"""End-to-end benchmark of the Qwen2.5-VL vision tower (7B config, bf16): our encoder with the
best kernels ("auto") and with the eager references ("torch"), each also under torch.compile,
against transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` (eager, sdpa,
flash_attention_2 where installed, and sdpa under torch.compile), and the best the model does on
PyTorch alone: the "torch" references with torch's ``varlen_attn`` for attention, under
torch.compile (on a GPU whose torch has ``torch.nn.attention.varlen``).

    python bench/bench_encoder.py                   # GPU: time every implementation
    python bench/bench_encoder.py --dry-run         # CPU: tiny shapes, run once each, no timing

Reported per case and implementation: median time (CUDA events, ``triton.testing.do_bench``),
patches per second, peak memory above the weights, the share of GPU time outside GEMMs (one
profiled forward), speedup over transformers/sdpa, and the relative error against our eager
reference. Each row is printed as soon as it is measured and ``--out`` is rewritten after every
case (``"complete": false`` until the end); on SIGTERM (``timeout``) the rows measured so far are
written and the exit status is 124. An implementation that fails (a compile error, a missing
flash-attn kernel) gets its error in its row and the others still run; the exit status is 1 when
one failed or disagreed with the reference. Every implementation gets the grid's index tensors
precomputed (transformers through its precomputed-kwargs hooks), so the timings are of the
forward itself. Inside torch.compile our ops are opaque: Inductor fuses only the glue between them.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

import torch
from torch import Tensor, nn
from transformers.initialization import no_init_weights
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_position_ids,
    get_vision_window_index,
)

import qwen_kernels
from qwen_kernels.model import LayerKernels, VisionConfig, VisionEncoder, random_hf_state_dict
from qwen_kernels.model.encoder import VisionAttention
from qwen_kernels.model.layout import GridLayout

try:  # torch.nn.attention.varlen (FlashAttention over packed segments) is in recent torch only
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

Grid = tuple[int, int, int]
Forward = Callable[[], torch.Tensor]

# A copy of the tower small enough for a CPU dry run (real head_dim and windows).
TINY = VisionConfig.tiny()
# Eager attention materialises [heads, L, L] fp32 scores per frame; skip it beyond this many.
EAGER_MAX_FRAME_TOKENS = 16384
DRY_RUN_REL_ERR = 1e-4  # fp32 on the CPU
REL_ERR_LIMIT = 3e-2  # bf16 on the GPU
# GPU kernels that are GEMMs (cuBLAS, cuBLASLt's nvjet, CUTLASS, Inductor's Triton mm templates),
# matched on the name before its template arguments; attention kernels built on CUTLASS (named
# as such anywhere in the full name) are not.
GEMM_KERNEL = re.compile(r"gemm|cutlass|xmma|cublas|nvjet|triton_tem_\w*mm", re.IGNORECASE)
ATTENTION_KERNEL = re.compile(r"flash|attn|attention|fmha", re.IGNORECASE)


@dataclass(frozen=True)
class Case:
    """One batch of inputs: a name and the (t, h, w) patch grid of each input."""

    name: str
    grids: tuple[Grid, ...]

    @property
    def tokens(self) -> int:
        return sum(t * h * w for t, h, w in self.grids)

    @property
    def max_frame(self) -> int:
        return max(h * w for _, h, w in self.grids)


def cases(dry_run: bool, with_64k: bool) -> list[Case]:
    """DESIGN section 8 shapes: the real window mixes of a 1288x952 image and a 16-frame 448x448
    video, and square images of 1k, 4k, 16k (and 64k) patches attended as one frame."""
    if dry_run:
        return [Case("image 112x84 + video 4x56x56", ((1, 8, 6), (2, 4, 4)))]
    found = [
        Case("image 1288x952", ((1, 68, 92),)),
        Case("video 16x448x448", ((8, 32, 32),)),
    ]
    sides = [32, 64, 128] + ([256] if with_64k else [])
    found += [
        Case(f"image {s * 14}x{s * 14} ({s * s // 1024}k patches)", ((1, s, s),)) for s in sides
    ]
    return found


def hf_tower(
    config: VisionConfig, weights: dict[str, torch.Tensor], attn_implementation: str
) -> Qwen2_5_VisionTransformerPretrainedModel:
    """transformers' tower sharing ``weights`` (same dtype and device) without a copy."""
    hf_config = Qwen2_5_VLVisionConfig(**config.to_hf_dict())
    hf_config._attn_implementation = attn_implementation
    with no_init_weights():
        model = Qwen2_5_VisionTransformerPretrainedModel(hf_config)
    model.load_state_dict(weights, strict=True, assign=True)
    device = next(iter(weights.values())).device
    return model.to(device).eval()


def hf_precomputed(config: VisionConfig, grid_thw: torch.Tensor) -> dict[str, object]:
    """The grid-only tensors transformers' forward accepts precomputed."""
    cu_seqlens = get_vision_cu_seqlens(grid_thw)
    window_index, cu_window_seqlens = get_vision_window_index(
        grid_thw, config.spatial_merge_size, config.window_size, config.patch_size
    )
    return {
        "position_ids": get_vision_position_ids(grid_thw, config.spatial_merge_size),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(cu_seqlens.diff().max()),
        "window_index": window_index,
        "cu_window_seqlens": cu_window_seqlens,
        "max_window_seqlen": int(cu_window_seqlens.diff().max()),
    }


class VarlenAttention(nn.Module):
    """A block's attention with torch's ``varlen_attn`` in place of ``qwen.window_attn``: the
    PyTorch-only model (same packed qkv, in-place rotary and weights)."""

    def __init__(self, attn: VisionAttention) -> None:
        super().__init__()
        self.attn = attn

    def forward(
        self,
        x: Tensor,
        layout: GridLayout,
        cu_seqlens: Tensor,
        max_seqlen: int,
        kernels: LayerKernels,
    ) -> Tensor:
        q, k, v = self.attn.rotated_qkv(x, layout, kernels)
        out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
        return self.attn.proj(out.reshape(x.shape[0], -1))


def implementations(
    config: VisionConfig,
    weights: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    compile_backend: str,
) -> dict[str, Callable[[torch.Tensor, Case], Forward]]:
    """Name -> (pixel_values, case) -> a no-argument forward returning the merged tokens.

    Models are built on first use, so a failure to build one is reported in that
    implementation's rows rather than stopping the run.
    """

    def ours(
        kernels: str, compiled: bool, varlen: bool = False
    ) -> Callable[[torch.Tensor, Case], Forward]:
        @functools.cache
        def build() -> tuple[VisionEncoder, Callable[..., torch.Tensor]]:
            encoder = VisionEncoder.from_hf_state_dict(
                weights, config, kernels=kernels, dtype=dtype, device=device
            ).eval()
            if varlen:
                for block in encoder.blocks:
                    block.attn = VarlenAttention(block.attn)
            encode = encoder.encode
            return encoder, torch.compile(encode, backend=compile_backend) if compiled else encode

        def bind(pixels: torch.Tensor, case: Case) -> Forward:
            encoder, encode = build()
            layout = encoder.layout(case.grids)

            def forward() -> torch.Tensor:
                with qwen_kernels.skip_value_checks():
                    return encode(pixels, layout)

            return forward

        return bind

    hf_weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}

    def theirs(attn: str, compiled: bool) -> Callable[[torch.Tensor, Case], Forward]:
        @functools.cache
        def build() -> Callable[..., object]:
            model = hf_tower(config, hf_weights, attn)
            return torch.compile(model, backend=compile_backend) if compiled else model

        def bind(pixels: torch.Tensor, case: Case) -> Forward:
            run = build()
            grid_thw = torch.tensor(case.grids)
            precomputed = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in hf_precomputed(config, grid_thw).items()
            }
            grid_thw = grid_thw.to(device)
            # transformers pops the precomputed entries: hand it a fresh dict per call.
            return lambda: run(pixels, grid_thw, **dict(precomputed)).pooler_output

        return bind

    found = {
        "qwen/auto": ours("auto", compiled=False),
        "qwen/torch": ours("torch", compiled=False),
        "qwen/auto+compile": ours("auto", compiled=True),
        "qwen/torch+compile": ours("torch", compiled=True),
        "transformers/eager": theirs("eager", compiled=False),
        "transformers/sdpa": theirs("sdpa", compiled=False),
        "transformers/sdpa+compile": theirs("sdpa", compiled=True),
    }
    if device.type == "cuda" and varlen_attn is not None:  # FlashAttention: CUDA only
        found["pytorch/varlen+compile"] = ours("torch", compiled=True, varlen=True)
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        found["transformers/flash_attention_2"] = theirs("flash_attention_2", compiled=False)
    return found


@dataclass
class Row:
    """One implementation on one case."""

    case: str
    impl: str
    tokens: int
    median_ms: float | None = None
    patches_per_s: float | None = None
    peak_mib: float | None = None
    non_gemm_share: float | None = None
    speedup_vs_sdpa: float | None = None
    rel_err: float | None = None
    note: str = ""


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm())


def is_gemm_kernel(name: str) -> bool:
    """Whether a GPU kernel name is a GEMM's: a GEMM name before the template arguments (which
    may mention CUTLASS types for any kernel), and no attention kernel (FlashAttention 3 is a
    ``cutlass::device_kernel<flash::...>``)."""
    head = re.split(r"[<(]", name.removeprefix("void "), maxsplit=1)[0]
    return bool(GEMM_KERNEL.search(head)) and not ATTENTION_KERNEL.search(name)


def non_gemm_share(forward: Forward, device: torch.device) -> float | None:
    """Share of the GPU time of one profiled forward spent outside GEMM kernels (memory copies
    and sets count as outside); None when the profiler saw no GPU activity."""
    # CUDA only: the CPU events are unused, and transformers' per-window loop makes ~100k of them.
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        forward()
        torch.cuda.synchronize(device)
    total = gemm = 0.0
    for event in profile.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        elapsed = event.time_range.elapsed_us()
        total += elapsed
        gemm += elapsed if is_gemm_kernel(event.name) else 0.0
    return 1 - gemm / total if total else None


def measure(
    forward: Forward, device: torch.device, warmup_ms: int, rep_ms: int
) -> tuple[torch.Tensor, float | None, float | None, float | None]:
    """(output, median ms, peak MiB above the live tensors, share of GPU time outside GEMMs);
    on the CPU only the output (no timing claimed)."""
    out = forward()  # compiles, fills caches, checks the output
    if device.type != "cuda":
        return out, None, None, None
    import triton.testing

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    forward()
    torch.cuda.synchronize(device)
    estimate_ms = (time.perf_counter() - start) * 1e3
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    # do_bench repeats for about `rep` ms: a slow forward still gets ~5 timed repetitions.
    rep = max(rep_ms, 5 * estimate_ms)
    median = triton.testing.do_bench(forward, warmup=warmup_ms, rep=rep, return_mode="median")
    return out, median, peak, non_gemm_share(forward, device)


def _error_note(error: Exception) -> str:
    """A one-line summary of ``error`` for a result row."""
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else ""
    if len(message) > 160:
        message = message[:157] + "..."
    return f"error: {type(error).__name__}: {message}"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_header() -> None:
    print(
        f"{'case':<28} {'implementation':<32} {'patches':>7} {'ms':>9} {'patches/s':>10} "
        f"{'peak MiB':>9} {'non-GEMM':>8} {'vs sdpa':>7} {'rel err':>8}  note",
        flush=True,
    )


def print_row(r: Row) -> None:
    # Flushed: under `timeout` stdout is a pipe, and a killed run must still show its rows.
    print(
        f"{r.case:<28} {r.impl:<32} {r.tokens:>7} {_fmt(r.median_ms, '.2f'):>9} "
        f"{_fmt(r.patches_per_s, '.0f'):>10} {_fmt(r.peak_mib, '.0f'):>9} "
        f"{_fmt(r.non_gemm_share, '.0%'):>8} {_fmt(r.speedup_vs_sdpa, '.2f'):>7} "
        f"{_fmt(r.rel_err, '.1e'):>8}  {r.note}",
        flush=True,
    )


class Report:
    """The rows measured so far, each printed as it comes and all written to ``out`` (when
    given) on request, so that a run cut short still leaves what it measured."""

    def __init__(self, env: dict[str, str], out: Path | None) -> None:
        self.env = env
        self.out = out
        self.rows: list[Row] = []

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print_row(row)

    def write(self, complete: bool) -> None:
        """Rewrite ``out`` with every row so far; ``complete`` says whether the run finished."""
        if self.out is None:
            return
        payload = {
            "environment": self.env,
            "complete": complete,
            "rows": [asdict(r) for r in self.rows],
        }
        # Write aside, then rename: a kill mid-write leaves the previous file whole.
        partial = self.out.with_name(self.out.name + ".partial")
        partial.write_text(json.dumps(payload, indent=2))
        partial.replace(self.out)


def run(args: argparse.Namespace, report: Report) -> None:
    """Measure every selected implementation on every case, adding the rows to ``report`` as
    they are measured and writing it after each case."""
    device = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("timing needs a CUDA GPU; use --dry-run to check the script on the CPU")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    config = TINY if args.dry_run else VisionConfig.qwen2_5_vl("7b")
    compile_backend = args.compile_backend or ("aot_eager" if args.dry_run else "inductor")
    weights = random_hf_state_dict(config, seed=0)
    impls = implementations(config, weights, dtype, device, compile_backend)
    # An implementation's full name selects only it ("qwen/auto", not "qwen/auto+compile").
    selected = [
        name
        for name in impls
        if not args.only or any(s == name if s in impls else s in name for s in args.only)
    ]
    # The reference first, then transformers/sdpa: each row's speedup is known when it prints.
    others = sorted(
        (n for n in selected if n != "qwen/torch"), key=lambda n: n != "transformers/sdpa"
    )
    order = ["qwen/torch", *others]
    limit = DRY_RUN_REL_ERR if args.dry_run else REL_ERR_LIMIT

    generator = torch.Generator().manual_seed(0)
    for case in cases(args.dry_run, args.with_64k):
        pixels = torch.randn(case.tokens, config.patch_dim, generator=generator)
        pixels = pixels.to(device=device, dtype=dtype)
        expected_shape = (case.tokens // config.merge_unit, config.out_hidden_size)
        reference = sdpa_ms = None
        for name in order:
            row = Row(case.name, name, case.tokens)
            out = None
            if name == "transformers/eager" and case.max_frame > EAGER_MAX_FRAME_TOKENS:
                row.note = f"skipped: frames of {case.max_frame} tokens"
            else:
                try:
                    out, row.median_ms, row.peak_mib, row.non_gemm_share = measure(
                        impls[name](pixels, case), device, args.warmup_ms, args.rep_ms
                    )
                except torch.cuda.OutOfMemoryError:
                    row.note = "out of memory"
                except Exception as error:  # one broken implementation must not end the run
                    row.note = _error_note(error)
                else:
                    if tuple(out.shape) != expected_shape:
                        row.note = f"error: shape {tuple(out.shape)}, expected {expected_shape}"
                if row.note:
                    out = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            if out is not None:
                if name == "qwen/torch":
                    reference = out
                if reference is not None:  # None: the reference failed (its row says why)
                    row.rel_err = rel_err(out, reference)
                    if row.rel_err > limit:
                        row.note = f"rel_err above {limit:g}"
                if row.median_ms is not None:
                    row.patches_per_s = case.tokens / (row.median_ms / 1e3)
            if name == "transformers/sdpa":
                sdpa_ms = row.median_ms
            if sdpa_ms and row.median_ms:
                row.speedup_vs_sdpa = sdpa_ms / row.median_ms
            # The reference runs even when not selected: its failure is reported all the same.
            if name in selected or row.note.startswith("error"):
                report.add(row)
        report.write(complete=False)


def environment() -> dict[str, str]:
    triton_version = "not installed"
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "varlen_attn": "yes" if varlen_attn is not None else "no",
        "qwen-kernels": qwen_kernels.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny tower and shapes on the CPU, each implementation run once",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        help="run these implementations: an implementation's name selects it alone, any other "
        "string every name containing it (qwen/torch always runs: it is the reference)",
    )
    parser.add_argument("--with-64k", action="store_true", help="add the 64k-patch image")
    parser.add_argument(
        "--compile-backend",
        help="torch.compile backend (default: inductor; "
        "aot_eager in a dry run, which checks tracing without compiling)",
    )
    parser.add_argument("--warmup-ms", type=int, default=200)
    parser.add_argument("--rep-ms", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="write the rows and environment as JSON")
    args = parser.parse_args(argv)

    env = environment()
    print(", ".join(f"{k} {v}" for k, v in env.items()))
    report = Report(env, args.out)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        report.write(complete=False)
        sys.stdout.flush()
        # os._exit: exit now, before `timeout` escalates, without waiting on compile workers.
        os._exit(124)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        print_header()
        with torch.no_grad():
            run(args, report)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.dry_run:
        print("dry run: shapes and outputs checked, no timings")
    report.write(complete=True)
    return 1 if any(r.note.startswith(("rel_err", "error")) for r in report.rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
