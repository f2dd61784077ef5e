"""The timing harness shared by the per-op benchmark files.

A benchmark file describes *cases* (one op at one shape: how to build a random input set, the
bytes that must move and the matrix FLOPs) and *peers* (other implementations of the same math).
The harness adds one implementation per usable backend of our op, then for each case either

* times every implementation on the GPU: CUDA events through ``triton.testing.do_bench``
  (warm-up, median and 20/80 % quantiles, L2 flushed before each run), input sets rotated so that
  the working set exceeds L2, each result set against a floor measured in the same process; or
* runs every implementation once on the CPU (the dry run): no timing, but the same builders,
  the byte counts checked against the tensors, and each output compared with the reference.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import itertools
import math
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import qwen_kernels
from qwen_kernels._backends import REGISTRY
from qwen_kernels._checks import skip_value_checks

from .shapes import Scale

Inputs = dict[str, Any]

SCHEMA_VERSION = 1
REFERENCE = "qwen/torch"  # our eager reference: the baseline of every comparison
# Outputs are bf16; two roundings of the same fp32 math differ by ~4e-3 in relative norm.
REL_ERR_LIMIT = 3e-2
WARMUP_MS, REP_MS = 25, 100
ROTATE_L2_FACTOR = 2  # rotated input sets hold at least this many L2s
MAX_SETS = 64
MAX_SETS_BYTES = 8 << 30
COPY_BYTES = 1 << 30
GEMM_SIZE = 8192


class Maker:
    """Builds one input set: seeded random tensors on a device, shape-only ones on "meta"."""

    def __init__(self, device: torch.device | str, seed: int) -> None:
        self.device = torch.device(device)
        self.gen = None
        if self.device.type != "meta":
            self.gen = torch.Generator(self.device).manual_seed(seed)

    def randn(self, *shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Standard normal values of ``dtype``."""
        if self.gen is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return torch.randn(shape, generator=self.gen, dtype=dtype, device=self.device)

    def randint(self, high: int, *shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        """Integers in ``[0, high)``."""
        if self.gen is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return torch.randint(high, shape, generator=self.gen, dtype=dtype, device=self.device)

    def put(self, values: Sequence | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Fixed values (segment bounds, index maps) on the device."""
        return torch.as_tensor(values, dtype=dtype).to(self.device)


@dataclass(frozen=True)
class Case:
    """One op at one shape.

    Attributes:
        op: the qwen op (``qwen_kernels.<op>``).
        name: the shape in a few words, unique per op ("image-1288x952", "T=4k").
        series: cases of one series form a sweep over ``x`` (plotted as one line per backend).
        x: the swept quantity: tokens, or tokens per frame for full attention.
        tokens: tokens in the input.
        shape: the tensor shapes, for the reader.
        bytes: each input read once plus each output written once.
        flops: matrix-multiply FLOPs (a multiply-add counts 2); 0 for elementwise ops.
        args: the op's positional arguments, as keys of the input set.
        build: makes one input set (the op's arguments by name, plus metadata peers may use).
        lengths: attention only: the segment lengths (for the useful share of mma tiles).
        reference: computes the expected output from an input set (None: our op's "torch"
            backend on ``args``).
        rel_err_limit: the largest relative error against the reference that counts as right.
    """

    op: str
    name: str
    series: str
    x: int
    tokens: int
    shape: str
    bytes: int
    flops: int
    args: tuple[str, ...]
    build: Callable[[Maker], Inputs]
    lengths: tuple[int, ...] | None = None
    reference: Callable[[Inputs], Any] | None = None
    rel_err_limit: float = REL_ERR_LIMIT


@dataclass(frozen=True)
class Impl:
    """One implementation timed on a case: a backend of our op or a peer.

    ``run`` returns the op's output in the op's layout (views are fine). ``prepare`` derives what a
    peer needs from an input set (a padded index, a block mask) once per set, outside the timing.
    ``compiles``: the first call compiles (seconds to minutes), so the runner runs it after the
    rest, and a run stopped by its time limit loses these rows first.
    """

    name: str
    run: Callable[[Inputs], Any]
    kind: str = "peer"
    missing: str | None = None
    cpu: bool = True
    # Why it cannot run on the CPU of this machine although it runs on CPUs (the dry run skips
    # it with this reason).
    cpu_missing: str | None = None
    prepare: Callable[[Inputs], Inputs] | None = None
    series: frozenset[str] | None = None
    compiles: bool = False

    def applies_to(self, case: Case) -> bool:
        """Whether this implementation computes ``case``'s form of the op."""
        return self.series is None or case.series in self.series


@dataclass(frozen=True)
class Suite:
    """One benchmark file: its cases at a scale, and the peers of each of its ops.

    ``ours`` gives our implementations of a case on a device type (None: one per usable backend
    of the case's op). ``profile``: timed rows also get the peak memory of a call and its share
    of GPU time outside GEMMs (one profiled call). ``warmup_ms`` and ``rep_ms`` are
    ``do_bench``'s: a suite of slow calls asks for longer repetitions.
    """

    name: str
    ops: tuple[str, ...]
    cases: Callable[[Scale], list[Case]]
    peers: Callable[[str], list[Impl]]
    ours: Callable[[Case, str], list[Impl]] | None = None
    profile: bool = False
    warmup_ms: int = WARMUP_MS
    rep_ms: int = REP_MS


@dataclass(frozen=True)
class Ceilings:
    """What this GPU sustains, measured at the start of the run."""

    copy_gbps: float  # device-to-device copy of COPY_BYTES, read + write counted
    gemm_tflops: float  # bf16 GEMM of GEMM_SIZE^3

    def floor_ms(self, nbytes: int, flops: int) -> float:
        """The time no implementation can beat: max(bytes / bandwidth, FLOPs / matrix rate)."""
        return max(nbytes / (self.copy_gbps * 1e9), flops / (self.gemm_tflops * 1e12)) * 1e3


@dataclass
class Row:
    """The result of one implementation on one case."""

    op: str
    case: str
    series: str
    x: int
    tokens: int
    shape: str
    impl: str
    kind: str
    bytes: int
    flops: int
    status: str = "skipped"  # ok | ran | mismatch | skipped | error
    detail: str = ""
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    floor_ms: float | None = None
    pct_of_floor: float | None = None
    rel_err: float | None = None
    peak_mib: float | None = None  # profiled suites: peak memory of a call above what was live
    non_gemm_share: float | None = None  # profiled suites: GPU time outside GEMM kernels
    speedup: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, case: Case, impl: Impl, **result: Any) -> Row:
        """The row of ``impl`` on ``case``, with the ``result`` fields given."""
        return cls(
            case.op,
            case.name,
            case.series,
            case.x,
            case.tokens,
            case.shape,
            impl.name,
            impl.kind,
            case.bytes,
            case.flops,
            **result,
        )


@dataclass
class CaseCheck:
    """A case as built: its counts, and whether they match the tensors it made."""

    op: str
    case: str
    scale: str
    tokens: int
    shape: str
    bytes: int
    flops: int
    counted_bytes: int
    ok: bool


@dataclass
class Report:
    """Everything one run produced; written as JSON and Markdown by ``report``."""

    mode: str  # "gpu" or "dry-run"
    timed: bool
    note: str
    scale: str
    command: str
    created: str
    env: dict[str, str]
    peers: dict[str, str]
    ceilings: Ceilings | None
    cases: list[CaseCheck] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    complete: bool = True  # False when the run was stopped before its last case
    schema: int = SCHEMA_VERSION


def qwen_impls(op: str, args: tuple[str, ...], device_type: str) -> list[Impl]:
    """One implementation per backend of ``op`` usable on ``device_type`` here."""
    function = getattr(qwen_kernels, op)
    return [
        Impl(f"qwen/{backend}", functools.partial(_call, function, args, backend), kind="qwen")
        for backend in REGISTRY[op].usable(device_type)
    ]


def _call(function: Callable, args: tuple[str, ...], backend: str, inputs: Inputs) -> Any:
    return function(*(inputs[name] for name in args), backend=backend)


def impls_for(case: Case, suite: Suite, device_type: str) -> list[Impl]:
    """Ours (our op's backends, or the suite's own), then the peers of this case's form."""
    if suite.ours is None:
        ours = qwen_impls(case.op, case.args, device_type)
    else:
        ours = suite.ours(case, device_type)
    return ours + [peer for peer in suite.peers(case.op) if peer.applies_to(case)]


def compile_peer(reference: Callable, args: tuple[str, ...]) -> Impl:
    """``torch.compile`` of an eager reference, compiled once per process (on the first call,
    outside the timing) and shared by every case, as a user would."""
    call = functools.partial(_call_compiled, reference, args)
    return Impl("torch.compile", call, cpu=False, compiles=True)


@functools.cache
def _compiled(function: Callable) -> Callable:
    return torch.compile(function)


def _call_compiled(function: Callable, args: tuple[str, ...], inputs: Inputs) -> Any:
    return _compiled(function)(*(inputs[name] for name in args))


@functools.cache
def cpu_bf16_sdpa_problem() -> str | None:
    """Why torch's own SDPA fails for bf16 CPU tensors here, or None. Seen with
    ``ATEN_CPU_CAPABILITY=default`` on a CPU with AVX-512 BF16: the CPU flash-attention kernel is
    chosen by the CPU's features and then refuses the capability ("pack_vnni2 is only supported
    when avx512 is supported"); peers and tests built on it cannot run there."""
    q = torch.ones(1, 2, 64, 80, dtype=torch.bfloat16)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as exc:
        return f"torch's CPU SDPA fails for bf16 on this machine ({_first_line(exc)})"
    return None


def missing_module(module: str, package: str) -> str | None:
    """Why a peer's package cannot be used, or None when it is importable (``module`` may be a
    submodule, whose parent package may be missing too)."""
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        found = None
    return None if found else f"{package} is not installed"


def tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in an input set, an output, or a tuple of them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors(item)]
    return []


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a view counts only its own elements)."""
    return sum(t.numel() * t.element_size() for t in tensors(value))


def check_counts(case: Case, scale: str, device: str) -> CaseCheck:
    """Build ``case`` on ``device`` ("meta" costs nothing at any size), run our op's reference
    (its fake kernel on "meta") and compare the case's byte count with the tensors moved."""
    inputs = case.build(Maker(device, seed=0))
    output = _reference(case, inputs)
    counted = tensor_bytes({name: inputs[name] for name in case.args}) + tensor_bytes(output)
    return CaseCheck(
        case.op,
        case.name,
        scale,
        case.tokens,
        case.shape,
        case.bytes,
        case.flops,
        counted,
        counted == case.bytes and case.bytes > 0,
    )


def rel_err(out: Any, ref: Any) -> float:
    """``||out - ref|| / ||ref||`` over all output tensors (a tensor, or tuples of them) in fp64;
    inf on a shape mismatch or a non-finite output. The one relative error of the benchmarks and
    the tests."""
    outs, refs = tensors(out), tensors(ref)
    if len(outs) != len(refs) or any(o.shape != r.shape for o, r in zip(outs, refs, strict=True)):
        return math.inf
    diff = norm = 0.0
    for o, r in zip(outs, refs, strict=True):
        o64, r64 = o.detach().double(), r.detach().double()
        if not bool(torch.isfinite(o64).all()):
            return math.inf
        diff += float((o64 - r64).square().sum())
        norm += float(r64.square().sum())
    return math.sqrt(diff / max(norm, 1e-60))


def clone_inputs(inputs: Inputs) -> Inputs:
    """A fresh copy of the tensors of an input set (peers may rotate in place)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def input_sets(case: Case, device: str, l2: int, seed: int = 0) -> list[Inputs]:
    """Input sets to rotate through: enough that together they exceed ``l2`` bytes
    ``ROTATE_L2_FACTOR`` times, within ``MAX_SETS`` and ``MAX_SETS_BYTES``."""
    first = case.build(Maker(device, seed))
    size = max(1, tensor_bytes(first))
    count = min(MAX_SETS, ROTATE_L2_FACTOR * l2 // size + 1, max(1, MAX_SETS_BYTES // size))
    return [first] + [case.build(Maker(device, seed + i)) for i in range(1, count)]


def cycler(impl: Impl, sets: list[Inputs]) -> Callable[[], Any]:
    """A no-argument call of ``impl`` that takes the next input set each time (prepared once)."""
    prepared = [impl.prepare(s) for s in sets] if impl.prepare else sets
    cycle = itertools.cycle(prepared)

    def call() -> Any:
        # Value checks read device memory (a host sync); peers do none, and the untimed
        # correctness call keeps them, so the timed calls skip them.
        with skip_value_checks():
            return impl.run(next(cycle))

    return call


def measure(
    fn: Callable[[], Any], warmup_ms: int = WARMUP_MS, rep_ms: int = REP_MS
) -> tuple[float, float, float]:
    """Median, 20 % and 80 % quantile of ``fn``'s GPU time in ms (CUDA events, L2 flushed)."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


# GPU kernels that are GEMMs (cuBLAS, cuBLASLt's nvjet, CUTLASS, Inductor's Triton mm templates),
# matched on the name before its template arguments; attention kernels built on CUTLASS (named
# as such anywhere in the full name) are not.
GEMM_KERNEL = re.compile(r"gemm|cutlass|xmma|cublas|nvjet|triton_tem_\w*mm", re.IGNORECASE)
ATTENTION_KERNEL = re.compile(r"flash|attn|attention|fmha", re.IGNORECASE)


def is_gemm_kernel(name: str) -> bool:
    """Whether a GPU kernel name is a GEMM's: a GEMM name before the template arguments (which
    may mention CUTLASS types for any kernel), and no attention kernel (FlashAttention 3 is a
    ``cutlass::device_kernel<flash::...>``)."""
    head = re.split(r"[<(]", name.removeprefix("void "), maxsplit=1)[0]
    return bool(GEMM_KERNEL.search(head)) and not ATTENTION_KERNEL.search(name)


def profile(fn: Callable[[], Any], device: str = "cuda") -> tuple[float, float | None]:
    """Peak memory of one call of ``fn`` above the tensors live before it (MiB), and the share of
    the GPU time of one profiled call spent outside GEMM kernels (memory copies and sets count as
    outside; None when the profiler saw no GPU activity)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    # CUDA activity only: CPU events are unused, and some peers make ~100k of them per call.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as trace:
        fn()
        torch.cuda.synchronize(device)
    total = gemm = 0.0
    for event in trace.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            elapsed = event.time_range.elapsed_us()
            total += elapsed
            gemm += elapsed if is_gemm_kernel(event.name) else 0.0
    return peak, (1 - gemm / total if total else None)


def measure_ceilings(device: str = "cuda") -> Ceilings:
    """Time a device-to-device copy of 1 GiB and a bf16 8192^3 GEMM on ``device``."""
    ceilings = Ceilings(copy_gbps=_copy_gbps(device), gemm_tflops=_gemm_tflops(device))
    torch.cuda.empty_cache()
    return ceilings


def _copy_gbps(device: str) -> float:
    src = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_ms, _, _ = measure(lambda: dst.copy_(src))
    return 2 * COPY_BYTES / (copy_ms * 1e-3) / 1e9


def _gemm_tflops(device: str) -> float:
    a, b = (
        torch.randn(GEMM_SIZE, GEMM_SIZE, dtype=torch.bfloat16, device=device) for _ in range(2)
    )
    c = torch.empty_like(a)
    gemm_ms, _, _ = measure(lambda: torch.mm(a, b, out=c))
    return 2 * GEMM_SIZE**3 / (gemm_ms * 1e-3) / 1e12


def run_case(
    case: Case,
    suite: Suite,
    impls: list[Impl],
    ceilings: Ceilings | None,
    progress: Callable[[Case, Impl, Row | None], None],
    device: str = "cuda",
) -> list[Row]:
    """Run every implementation of ``case``: timed on ``device`` when ``ceilings`` is given,
    else once each (the dry run; implementations that need a GPU are skipped).

    ``progress`` is called before each implementation (row None) and after it (its row).
    """
    timed = ceilings is not None
    l2 = l2_bytes() if timed else 0
    sets = input_sets(case, device, l2) if timed else [case.build(Maker(device, seed=0))]
    pristine = clone_inputs(sets[0])
    reference = _reference(case, pristine)
    rows = []
    for impl in impls:
        progress(case, impl, None)
        rows.append(_run_impl(case, suite, impl, sets, pristine, reference, ceilings))
        progress(case, impl, rows[-1])
        _release(device)
    add_speedups(rows)
    return rows


def _reference(case: Case, inputs: Inputs) -> Any:
    if case.reference is not None:
        return case.reference(clone_inputs(inputs))
    return _call(getattr(qwen_kernels, case.op), case.args, "torch", clone_inputs(inputs))


def _run_impl(
    case: Case,
    suite: Suite,
    impl: Impl,
    sets: list[Inputs],
    pristine: Inputs,
    reference: Any,
    ceilings: Ceilings | None,
) -> Row:
    row = Row.of(case, impl)
    if impl.missing:
        row.detail = impl.missing
        return row
    if ceilings is None and not impl.cpu:
        row.detail = "needs a GPU: not run in the dry run"
        return row
    if ceilings is None and impl.cpu_missing:
        row.detail = impl.cpu_missing
        return row
    try:
        checked = clone_inputs(pristine)
        row.rel_err = rel_err(
            impl.run(impl.prepare(checked) if impl.prepare else checked), reference
        )
        row.status = "ok" if ceilings else "ran"
        if ceilings:
            call = cycler(impl, sets)
            fill_timing(row, measure(call, suite.warmup_ms, suite.rep_ms), ceilings)
            if suite.profile:
                row.peak_mib, row.non_gemm_share = profile(call)
    except Exception as exc:  # a failing peer or kernel is reported, the suite goes on
        row.status, row.detail = "error", f"{type(exc).__name__}: {_first_line(exc)}"
        return row
    if not row.rel_err <= case.rel_err_limit:
        row.status = "mismatch"
        row.detail = (
            f"relative error {row.rel_err:.3g} against {REFERENCE} (limit {case.rel_err_limit})"
        )
    return row


def fill_timing(row: Row, quantiles: tuple[float, float, float], ceilings: Ceilings) -> None:
    """Set ``row``'s times (median, p20, p80 in ms) and what follows from them."""
    row.median_ms, row.p20_ms, row.p80_ms = quantiles
    seconds = row.median_ms * 1e-3
    row.gbps = row.bytes / seconds / 1e9
    row.tflops = row.flops / seconds / 1e12 if row.flops else None
    row.floor_ms = ceilings.floor_ms(row.bytes, row.flops)
    row.pct_of_floor = 100.0 * row.floor_ms / row.median_ms


def add_speedups(rows: list[Row]) -> None:
    """Each timed row's speedup over every timed peer and over our eager reference."""
    baselines = {
        r.impl: r.median_ms
        for r in rows
        if r.median_ms and (r.kind == "peer" or r.impl == REFERENCE)
    }
    for row in rows:
        if row.median_ms:
            row.speedup = {
                name: ms / row.median_ms for name, ms in baselines.items() if name != row.impl
            }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _release(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def l2_bytes() -> int:
    """L2 size of GPU 0 (50 MiB, an H100's, where torch does not say)."""
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _driver() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (no nvidia-smi)"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (nvidia-smi failed)"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def environment() -> dict[str, str]:
    """GPU, driver and the versions that the numbers depend on."""
    env = {
        "gpu": "none",
        "driver": "n/a",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "CPU-only build",
        "triton": _version("triton"),
        "python": platform.python_version(),
        "qwen-kernels": qwen_kernels.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = (
            f"{props.name} (sm_{props.major}{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB, L2 {l2_bytes() >> 20} MiB)"
        )
        env["driver"] = _driver()
    return env


def peer_packages() -> dict[str, str]:
    """Versions of the optional peer packages ("not installed" where absent)."""
    return {name: _version(name) for name in ("transformers", "liger-kernel", "flash-attn")}
