"""The static report of our kernels' machine code, made without a GPU (``qwen-kernels inspect``).

Triton kernels: every launch that the "triton" backend of each op makes for the benchmark cases
is captured (the launchers run on shape-only tensors; nothing executes), specialised exactly as
the JIT would (Triton's own argument binder: dtypes, divisibility by 16, integer constants) and
compiled offline for each target arch. CUDA kernels: the cubins inside ``qwen_kernels._C``.
Both are read with the cuobjdump that ships with Triton (or the CUDA toolkit's): registers,
local memory (spills), shared memory, and counts of the instructions that decide speed:

    HMMA = mma.sync, HGMMA = wgmma (tensor cores), LDSM = ldmatrix, LDGSTS = cp.async,
    LDG/STG .128 = 16-byte global loads/stores, LDL/STL = local memory (spills).

Theoretical occupancy (warps per SM) follows the A100 and H100 limits. For attention kernels the
share of tensor-core work that is useful (not padding) comes from the case's segment lengths and
the kernel's tiles. Every kernel's ``loop`` is the instruction mix of one steady-state iteration of
its main loop, read from the SASS control-flow graph (``bench/sass_loop.py`` says how). Any other
cubin or library (e.g. FlashAttention's) is read the same way with ``--cubin FILE --kernel REGEX``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen_kernels._backends import REGISTRY
from qwen_kernels.ops._define import prepared
from qwen_kernels.triton_kernels._common import Launch, recorded_launches

from . import sass_loop
from .harness import Case, Maker
from .shapes import SCALES, Scale
from .suites import SUITES

DEFAULT_ARCHS = ("8.0", "9.0a")
RESERVED_SHARED = 1024  # bytes of shared memory the driver keeps per block
# What each op's kernels must show: tensor-core math, or 16-byte global accesses.
KIND = {"rms_norm_swiglu": "gemm"} | dict.fromkeys(
    (
        "window_attn",
        "window_attn_rope",
        "window_attn_forward",
        "window_attn_rope_forward",
        "window_attn_backward",
    ),
    "attention",
)
INSTRUCTIONS = {
    "hmma": r"\bHMMA\.",
    "hgmma": r"\bHGMMA\.",
    "ldsm": r"\bLDSM\.",
    "ldgsts": r"\bLDGSTS\.",
    "ldg128": r"\bLDG\.E(\.[A-Z0-9_]+)*\.128\b",
    "stg128": r"\bSTG\.E(\.[A-Z0-9_]+)*\.128\b",
    "ldl": r"\bLDL\b",
    "stl": r"\bSTL\b",
}


@dataclass(frozen=True)
class GpuLimits:
    """Per-SM limits that bound how many blocks of a kernel run at once."""

    name: str
    registers: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    shared_bytes: int = 167936  # usable shared memory per SM
    reserved_shared_per_block: int = RESERVED_SHARED

    def warps_per_sm(self, warps: int, registers: int, shared_bytes: int) -> int:
        """Theoretical occupancy of a block of ``warps`` warps using ``registers`` per thread and
        ``shared_bytes`` of shared memory (registers are allocated per warp in units of 256)."""
        per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
        by_registers = self.registers // (per_warp * warps)
        by_shared = self.shared_bytes // (shared_bytes + self.reserved_shared_per_block)
        blocks = min(by_registers, by_shared, self.max_warps // warps, self.max_blocks)
        return blocks * warps


GPUS = (GpuLimits("A100"), GpuLimits("H100", shared_bytes=233472))


@dataclass
class Row:
    """One compiled kernel variant on one arch."""

    op: str
    backend: str
    kernel: str
    variant: str
    arch: str
    dtype: str  # of the activations: "bf16", "fp16" or "fp32"
    warps: int | None
    registers: int
    stack_bytes: int
    spill_bytes: int
    shared_bytes: int
    counts: dict[str, int]
    occupancy: dict[str, int | None]
    cases: list[str] = field(default_factory=list)
    useful_mma: float | None = None
    # Whether multiply-adds may contract into FMAs (Triton's enable_fp_fusion; None for the CUDA
    # kernels, whose contraction nvcc decides per expression): off where a kernel claims a
    # reference's rounding.
    fp_fusion: bool | None = None
    loop: dict[str, Any] | None = None  # sass_loop.Iteration.to_dict() of its main loop

    @property
    def spills(self) -> bool:
        """Registers spilled to local memory (as ptxas counts them). A stack frame without
        spills is an array the code indexes at run time (e.g. sincosf's slow path)."""
        return self.spill_bytes > 0


# ---------------------------------------------------------------------------------------------
# Tools


def _tool(name: str, toolkit_first: bool = False) -> str:
    """cuobjdump / ptxas: Triton's bundled copy (present wherever Triton is, and of the PTX
    version Triton writes) or the CUDA toolkit's (which built qwen_kernels._C)."""
    bundled = None
    with contextlib.suppress(ImportError):
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    toolkit = [Path(home, "bin", name), shutil.which(name)]
    order = [*toolkit, bundled] if toolkit_first else [bundled, *toolkit]
    for candidate in order:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise RuntimeError(f"inspect needs {name} (from the triton package or a CUDA toolkit)")


def _run(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def _demangle(names: Sequence[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(
        ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
    ).stdout
    return dict(zip(names, out.splitlines(), strict=True))


@dataclass
class _Function:
    registers: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(INSTRUCTIONS, 0))
    loop: dict[str, Any] | None = None


def read_binary(
    path: Path, arch: str = "sm_80", names: Sequence[str] = ()
) -> dict[tuple[str, str], _Function]:
    """Per (arch, mangled function name) of a cubin (compiled for ``arch``) or of a library with
    embedded cubins (which name their archs): resource usage, instruction counts and the main
    loop's mix. ``names`` (mangled) restricts the SASS read to those functions."""
    cuobjdump = _tool("cuobjdump")
    only = ["-fun", ",".join(names)] if names else []
    functions = resource_usage(path, arch)
    default_arch = arch
    patterns = {key: re.compile(p) for key, p in INSTRUCTIONS.items()}
    sass: dict[tuple[str, str], list[str]] = {}
    current = None
    for line in _run(cuobjdump, "-sass", *only, str(path)).splitlines():
        if m := re.match(r"\s*(?:arch = |code for )(sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            current = (arch, m.group(1))
            # A bare cubin's resource usage names no arch: it was filed under the default.
            if current not in functions and (default := (default_arch, m.group(1))) in functions:
                functions[current] = functions.pop(default)
                functions[current].shared_bytes = _own_shared(arch, functions[current].shared_bytes)
            functions.setdefault(current, _Function())
            sass[current] = []
        elif current is not None and "/*" in line:
            sass[current].append(line)
            for key, pattern in patterns.items():
                if pattern.search(line):
                    functions[current].counts[key] += 1
    for key, lines in sass.items():
        iteration = sass_loop.main_loop(sass_loop.parse(lines))
        functions[key].loop = iteration.to_dict() if iteration else None
    return {key: functions[key] for key in sass} if names else functions


def resource_usage(path: Path, arch: str = "sm_80") -> dict[tuple[str, str], _Function]:
    """Registers, stack and shared memory per (arch, mangled function name) of a cubin (compiled
    for ``arch``) or of a library with embedded cubins (which name their archs)."""
    functions: dict[tuple[str, str], _Function] = {}
    current = None
    for line in _run(_tool("cuobjdump"), "-res-usage", str(path)).splitlines():
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            current = functions.setdefault((arch, m.group(1)), _Function())
        elif current is not None and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", line)):
            current.registers, current.stack_bytes, shared = map(int, m.groups())
            current.shared_bytes = _own_shared(arch, shared)
    return functions


def _own_shared(arch: str, shared: int) -> int:
    """From sm_90 on cuobjdump's count includes the 1 KiB the driver reserves per block; the
    occupancy model adds that reservation on every arch itself."""
    return (
        shared - RESERVED_SHARED if int(arch[3:5]) >= 90 and shared >= RESERVED_SHARED else shared
    )


def ptxas_spills(ptx: str, arch: str, toolkit_first: bool = False) -> dict[str, int]:
    """Spill bytes (stores + loads) per kernel entry when ptxas compiles ``ptx`` for ``arch``
    (e.g. "sm_90a"): the count that tells spilled registers from a stack array."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "kernels.ptx")
        source.write_text(ptx)
        result = subprocess.run(
            [
                _tool("ptxas", toolkit_first),
                "-v",
                f"-arch={arch}",
                "-o",
                str(Path(tmp, "out.cubin")),
                str(source),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    spills, entry = {}, None
    for line in result.stderr.splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            entry = m.group(1)
        elif entry and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            spills[entry] = int(m.group(1)) + int(m.group(2))
            entry = None
    return spills


def _occupancy(warps: int | None, registers: int, shared_bytes: int) -> dict[str, int | None]:
    return {
        gpu.name: gpu.warps_per_sm(warps, registers, shared_bytes) if warps else None
        for gpu in GPUS
    }


# ---------------------------------------------------------------------------------------------
# Triton


@dataclass(frozen=True)
class Specialised:
    """A launch specialised for one arch as Triton's JIT specialises arguments by default (types
    from ``triton.runtime.jit.mangle_type``, which makes an integer 1 and None constants;
    pointers and integers divisible by 16 marked so): ``key`` is everything that decides the
    code, ``variant`` says it briefly for the report."""

    key: tuple
    variant: str
    source: Any  # triton.compiler.ASTSource
    target: Any  # triton.backends.compiler.GPUTarget
    options: dict


def _divisible_by_16(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0  # 0 for meta tensors, as for fresh allocations
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def specialise(launch: Launch, arch: str) -> Specialised:
    """``launch`` as the JIT would compile it for ``arch`` (e.g. "9.0a")."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    fn = launch.kernel
    values = dict(zip((p.name for p in fn.params), launch.args, strict=False)) | launch.kwargs
    signature, constexprs, attrs, shown, aligned = {}, {}, {}, [], []
    for index, param in enumerate(fn.params):
        value = values.get(param.name, param.default)
        kind = (
            "constexpr" if param.is_constexpr else mangle_type(value, not param.do_not_specialize)
        )
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = value
            shown.append(f"{param.name}={value}")
        elif not param.do_not_specialize_on_alignment and _divisible_by_16(value):
            attrs[(index,)] = [["tt.divisibility", 16]]
            aligned.append(param.name)
    options = dict(launch.options)
    variant = ", ".join(
        [*shown, *(f"{k}={v}" for k, v in options.items() if k != "enable_fp_fusion")]
    )
    if aligned:
        variant += f"; 16-divisible: {', '.join(aligned)}"
    if not options.get("enable_fp_fusion", True):
        variant += "; no fp fusion"
    major, minor = _capability(arch)
    key = (fn.__name__, arch, tuple(signature.items()), variant)
    source = ASTSource(fn, signature, constexprs, attrs)
    return Specialised(key, variant, source, GPUTarget("cuda", major * 10 + minor, 32), options)


def launches_of(op: str, args: Sequence[Any]) -> list[Launch]:
    """The Triton launches the "triton" backend of ``op`` makes for ``args`` (not run)."""
    impl = REGISTRY[op]._load("triton")
    with recorded_launches() as launches:
        impl(*prepared(op, args))
    return launches


def _case_launches(case: Case) -> list[Launch]:
    """The launches for a benchmark case: inputs built shape-only ("meta") where the launcher
    needs no values, as CPU tensors otherwise."""
    schema = getattr(torch.ops.qwen, case.op).default._schema
    # The op's arguments after the case's own, at their defaults (softmax_scale=None, ...).
    defaults = [a.default_value for a in schema.arguments[len(case.args) :] if a.name != "backend"]
    for device in ("meta", "cpu"):
        inputs = case.build(Maker(device, seed=0))
        try:
            return launches_of(case.op, [*[inputs[name] for name in case.args], *defaults])
        except (NotImplementedError, RuntimeError):
            if device == "cpu":
                raise
    return []


@dataclass
class Call:
    """One op on one input set (a benchmark case, or inputs a test chose): ``launches`` runs its
    Triton launcher and returns the launches it makes (called once per target arch, since
    launchers choose their configurations per GPU generation)."""

    op: str
    name: str
    launches: Callable[[], list[Launch]]
    lengths: Sequence[int] | None = None  # attention: the segment lengths, for the mma share


def _sm(arch: str) -> str:
    """The cubin name of a compute capability: "9.0a" -> "sm_90a"."""
    return f"sm_{arch.replace('.', '')}"


def _capability(arch: str) -> tuple[int, int]:
    number = round(float(arch.rstrip("a")) * 10)
    return number // 10, number % 10


def triton_rows(
    calls: Sequence[Call], archs: Sequence[str], progress: Callable[[str], None]
) -> list[Row]:
    """Compile every distinct Triton launch of ``calls`` for ``archs`` and read its cubin."""
    import triton

    from qwen_kernels.triton_kernels._common import offline_target

    rows: dict[tuple, Row] = {}
    compiled: dict[tuple, Any] = {}  # ops that launch the same variant share its compile
    for call in calls:
        for arch in archs:
            with offline_target(_capability(arch)):
                launches = call.launches()
            for launch in launches:
                variant = specialise(launch, arch)
                row_key = (call.op, *variant.key)
                if variant.key not in compiled:
                    progress(f"compiling {call.op} {launch.kernel.__name__} for {arch}")
                    compiled[variant.key] = triton.compile(
                        variant.source, target=variant.target, options=variant.options
                    )
                if row_key not in rows:
                    kernel = compiled[variant.key]
                    rows[row_key] = _triton_row(call.op, launch, kernel, variant.variant, arch)
                rows[row_key].cases.append(call.name)
                _note_useful_share(rows[row_key], call, launch)
    return list(rows.values())


def _triton_row(op: str, launch: Launch, compiled: Any, variant: str, arch: str) -> Row:
    sm = _sm(arch)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "kernel.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        functions = read_binary(cubin, sm)
    function = next(iter(functions.values()))
    spills = ptxas_spills(compiled.asm["ptx"], sm)
    warps = compiled.metadata.num_warps
    # Triton allocates its shared memory dynamically: the metadata holds the total.
    shared = max(function.shared_bytes, compiled.metadata.shared)
    first_tensor = next(a for a in launch.args if isinstance(a, torch.Tensor))
    return Row(
        op=op,
        backend="triton",
        kernel=launch.kernel.__name__,
        variant=variant,
        arch=sm,
        dtype=_DTYPE_NAMES.get(first_tensor.dtype, str(first_tensor.dtype)),
        warps=warps,
        registers=function.registers,
        stack_bytes=function.stack_bytes,
        spill_bytes=sum(spills.values()),
        shared_bytes=shared,
        counts=function.counts,
        occupancy=_occupancy(warps, function.registers, shared),
        fp_fusion=getattr(compiled.metadata, "enable_fp_fusion", None),
        loop=function.loop,
    )


def padded_mma_share(
    lengths: Sequence[int], head_dim: int, steps: Sequence[tuple[int, int, int]]
) -> float:
    """The share of tensor-core work spent on real tokens and head dims when each segment of
    ``lengths`` runs its products QK^T and PV in tiles: ``steps`` holds, per product, (query rows,
    keys, head-dim columns) of the smallest unit of work a kernel skips or does whole."""
    useful = done = 0
    for length in lengths:
        for rows, keys, cols in steps:
            useful += length * length * head_dim
            done += _round_up(length, rows) * _round_up(length, keys) * _round_up(head_dim, cols)
    return useful / done if done else 1.0


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _note_useful_share(row: Row, call: Call, launch: Launch) -> None:
    """Triton attention: tiles of BLOCK_M query rows by BLOCK_N keys, the head dim in blocks of
    D_MAIN + D_TAIL columns, the whole tile computed for every segment."""
    kwargs = launch.kwargs
    if KIND.get(call.op) != "attention" or call.lengths is None or "BLOCK_M" not in kwargs:
        return
    cols = kwargs["D_MAIN"] + kwargs["D_TAIL"]
    tile = (kwargs["BLOCK_M"], kwargs["BLOCK_N"], cols)
    share = padded_mma_share(call.lengths, kwargs["HEAD_DIM"], [tile, tile])
    row.useful_mma = share if row.useful_mma is None else min(row.useful_mma, share)


# The CUDA attention kernels' units of work (csrc/window_attn/kernel_traits.h), head_dim exactly
# (k-steps of 16 for 64/80/128). The window path: a warp per 16 query rows, QK^T over 8-key
# tiles and PV over 16-key steps, each skipped past the segment end. The long path: a warp per
# 32 query rows (16 for head_dim 128) over whole 64-key tiles, masked rather than skipped.
CUDA_ATTENTION_STEPS = ((16, 8, 16), (16, 16, 8))


# The CUDA backward's (csrc/window_attn/window_attn_backward.cu), window and long paths alike: a
# warp per 16 query rows for S = QK^T and dP = dO V^T over 8-key tiles, and dQ = dS K over 16-key
# steps; a warp per 16 key rows for dV = P^T dO and dK = dS^T Q over 16-query steps; each skipped
# past the segment end.
CUDA_ATTENTION_BACKWARD_STEPS = ((16, 8, 16), (16, 8, 16), (16, 16, 8), (16, 16, 8), (16, 16, 8))


def cuda_attention_steps(lengths: Sequence[int], head_dim: int) -> tuple[tuple[int, int, int], ...]:
    """The units of work of the CUDA forward path that segments of ``lengths`` run."""
    if max(lengths, default=0) <= 64:
        return CUDA_ATTENTION_STEPS
    rows = 16 if head_dim >= 128 else 32
    return ((rows, 64, 16), (rows, 64, 8))


# ---------------------------------------------------------------------------------------------
# CUDA

# Kernel name prefix (demangled, without namespaces) -> the op it serves; the rms_norm kernel
# serves add_rms_norm too (its last template argument says whether it adds a residual).
_CUDA_KERNEL_OPS = {
    "swiglu_backward_kernel": "swiglu_backward",
    "rms_norm_backward_kernel": "rms_norm_backward",
    "column_sum_kernel": "rms_norm_backward",  # the weight gradient's second stage
    "swiglu_kernel": "swiglu",
    "patch_merge": "patch_merge",
    "mrope": "mrope",
    "window_attn_backward": "window_attn_backward",  # before "window_attn", its prefix
    "attn_delta_kernel": "window_attn_backward",  # the long and fp32 paths' D pre-pass
    "window_attn": "window_attn",
}


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _cuda_dtype(template_args: str) -> str:
    """The activation dtype of a CUDA kernel variant: the first of its template arguments that
    names one (kernels with none, such as the fp32 attention kernel, are fp32)."""
    found = re.search(r"__nv_bfloat16|__half|float", template_args)
    return (
        {"__nv_bfloat16": "bf16", "__half": "fp16"}.get(found.group(0), "fp32") if found else "fp32"
    )


def _cuda_op(kernel: str) -> str:
    if kernel.startswith("rms_norm_kernel"):
        return "add_rms_norm" if kernel.rstrip(">").endswith("true") else "rms_norm"
    for prefix, op in _CUDA_KERNEL_OPS.items():
        if kernel.startswith(prefix):
            return op
    return kernel.split("<")[0]


def cuda_library() -> Path | None:
    """The built ``qwen_kernels._C`` shared library, or None when it is not built."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_kernels._C")
    return Path(spec.origin) if spec and spec.origin else None


def _ptx_modules(library: Path) -> list[str]:
    """The PTX modules embedded in ``library`` (one per source file of the build)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [_tool("cuobjdump"), "-xptx", "all", str(library)],
            cwd=tmp,
            capture_output=True,
            check=True,
        )
        return [p.read_text() for p in sorted(Path(tmp).glob("*.ptx"))]


def _declared_warps(ptx: str) -> dict[str, int]:
    """Warps per block of the kernels that declare it (``__launch_bounds__`` -> ``.maxntid`` in
    the embedded PTX); the others choose their block size at launch."""
    warps, entry = {}, None
    for line in ptx.splitlines():
        if m := re.match(r"\s*\.(?:visible )?\.entry (\S+)\(", line):
            entry = m.group(1)
        elif entry and (m := re.match(r"\s*\.maxntid (\d+), (\d+), (\d+)", line)):
            warps[entry] = math.prod(map(int, m.groups())) // 32
        elif line.strip() == "{":
            entry = None
    return warps


def cuda_rows(archs: Sequence[str]) -> list[Row]:
    """Every kernel in ``qwen_kernels._C`` for ``archs`` (the cubins the build holds)."""
    library = cuda_library()
    if library is None:
        return []
    wanted = {_sm(a) for a in archs}
    functions = {key: f for key, f in read_binary(library).items() if key[0] in wanted}
    readable = _demangle(sorted({name for _, name in functions}))
    modules = _ptx_modules(library)
    declared = _declared_warps("\n".join(modules))
    # The build embeds the PTX of its oldest arch only: spills for the other archs are those of
    # that PTX compiled for them (close to, not the same as, their own cubins).
    spills: dict[str, dict[str, int]] = {}
    for arch in sorted({a for a, _ in functions}):
        spills[arch] = {}
        for module in modules:
            spills[arch].update(ptxas_spills(module, arch, toolkit_first=True))
    rows = []
    for (arch, name), function in sorted(functions.items()):
        full = readable[name]
        kernel = re.sub(r"^void ", "", full)
        kernel = re.sub(r"\([^()]*\)$", "", kernel)  # drop the parameter list
        kernel = re.sub(r"(\w+::|\(anonymous namespace\)::)", "", kernel)
        base = kernel.split("<")[0]
        variant = kernel[len(base) :] or "-"
        rows.append(
            Row(
                op=_cuda_op(kernel),
                backend="cuda",
                kernel=base,
                variant=variant,
                arch=arch,
                dtype=_cuda_dtype(variant),
                warps=declared.get(name),
                registers=function.registers,
                stack_bytes=function.stack_bytes,
                spill_bytes=spills[arch].get(name, 0),
                shared_bytes=function.shared_bytes,
                counts=function.counts,
                occupancy=_occupancy(declared.get(name), function.registers, function.shared_bytes),
                loop=function.loop,
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def inspect(
    archs: Sequence[str] = DEFAULT_ARCHS,
    scale: Scale | str = "full",
    ops: Sequence[str] | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> list[Row]:
    """Rows for every Triton launch of the benchmark cases at ``scale`` and every CUDA kernel of
    ``qwen_kernels._C``, compiled or read for each of ``archs`` (e.g. "8.0", "9.0a")."""
    calls = [
        Call(case.op, case.name, functools.partial(_case_launches, case), case.lengths)
        for case in benchmark_cases(scale, ops)
        if "triton" in REGISTRY[case.op].impls
    ]
    rows = triton_rows(calls, archs, progress)
    rows += [row for row in cuda_rows(archs) if not ops or row.op in ops]
    return rows


def benchmark_cases(scale: Scale | str, ops: Sequence[str] | None = None) -> list[Case]:
    """The benchmark suite's cases at ``scale`` (of ``ops``, or all)."""
    scale = SCALES[scale] if isinstance(scale, str) else scale
    found = [case for suite in SUITES for case in suite.cases(scale) if case.op in REGISTRY]
    return [case for case in found if not ops or case.op in ops]


def summary(rows: Sequence[Row], cases: Sequence[Case] = ()) -> list[str]:
    """One line per op: variants, worst registers, spills, tensor-core and vector instructions;
    for attention cases, the useful share of the CUDA kernels' mma work."""
    lines = []
    for case in cases:
        if KIND.get(case.op) == "attention" and case.lengths and "cuda" in REGISTRY[case.op].impls:
            # q (or the packed qkv) on "meta": its shape, nothing allocated.
            head_dim = case.build(Maker("meta", seed=0))[case.args[0]].shape[-1]
            steps = (
                CUDA_ATTENTION_BACKWARD_STEPS
                if case.op == "window_attn_backward"
                else cuda_attention_steps(case.lengths, head_dim)
            )
            share = padded_mma_share(case.lengths, head_dim, steps)
            lines.append(f"{case.op} cuda, {case.name}: useful mma share {share:.0%}")
    for op in sorted({row.op for row in rows}):
        mine = [row for row in rows if row.op == op]
        spilled = sum(row.spills for row in mine)
        mma = sum(row.counts["hmma"] + row.counts["hgmma"] > 0 for row in mine)
        wide = sum(row.counts["ldg128"] > 0 for row in mine)
        useful = [row.useful_mma for row in mine if row.useful_mma is not None]
        text = (
            f"{op}: {len(mine)} variant rows, registers <= {max(r.registers for r in mine)}, "
            f"{spilled} spilling, {mma} with tensor-core mma, {wide} with 16-byte loads"
        )
        if useful:
            text += f", useful mma share >= {min(useful):.0%}"
        lines.append(text)
    return lines


def markdown(rows: Sequence[Row], command: str, cases: Sequence[Case] = ()) -> str:
    """The report as Markdown: the command, the summary, then one table row per variant."""
    header = (
        "| op | backend | kernel | arch | dtype | variant | warps | regs | spill B | stack B | "
        "smem B | "
        "warps/SM A100 | warps/SM H100 | HMMA | HGMMA | LDSM | LDGSTS | LDG.128 | STG.128 | "
        "LDL/STL | useful mma |"
    )
    lines = [
        "# Static kernel report",
        "",
        f"Regenerate with `{command}` (no GPU needed).",
        "",
        *[f"- {line}" for line in summary(rows, cases)],
        "",
        header,
        "|" + " --- |" * (header.count("|") - 1),
    ]
    for r in rows:
        c = r.counts
        useful = f"{r.useful_mma:.0%}" if r.useful_mma is not None else ""
        lines.append(
            f"| {r.op} | {r.backend} | `{r.kernel}` | {r.arch} | {r.dtype} | {r.variant} | "
            f"{r.warps or ''} | "
            f"{r.registers} | {r.spill_bytes} | {r.stack_bytes} | {r.shared_bytes} | "
            f"{r.occupancy['A100'] or ''} | "
            f"{r.occupancy['H100'] or ''} | {c['hmma']} | {c['hgmma']} | {c['ldsm']} | "
            f"{c['ldgsts']} | {c['ldg128']} | {c['stg128']} | {c['ldl'] + c['stl']} | {useful} |"
        )
    looped = [r for r in rows if r.loop and r.loop["mma"]]
    if looped:
        lines += ["", *main_loops_table(looped)]
    return "\n".join(lines) + "\n"


LOOP_COLUMNS = (
    "scope | instr | mma | instr/kFLOP | LDSM | LDGSTS/LDG | EX2 | SIN/COS | "
    "float (FFMA/FMUL/FADD) | int/addr | barriers | control | left out | nested loops"
)
LOOP_NOTE = (
    "One steady-state iteration of each kernel's innermost loop that holds tensor-core mma (scope "
    "`kernel`: no such loop, one pass through the kernel), per warp, from the SASS control-flow "
    "graph. FLOP per warp: HMMA.16816 = 2\\*16\\*8\\*16; HGMMA.64xNx16 = 2\\*64\\*N\\*16 / 4 "
    "(a warpgroup's 4 warps issue it). *left out*: instructions in blocks of the loop that a full "
    "tile does not run (tail masks, divergence fallbacks, slow paths), in how many address ranges; "
    "*nested loops*: loops inside the main loop, counted for one trip. Per-block detail: the "
    "`loop` fields of inspect.json."
)


def loop_cells(loop: dict[str, Any]) -> str:
    """The Main-loops columns (LOOP_COLUMNS) of one ``loop`` dict, as Markdown cells."""
    mma = " + ".join(f"{n} {shape}" for shape, n in loop["mma_shapes"].items()) or "0"
    ratio = loop["instr_per_kflop"]
    floats = loop["ffma"] + loop["fmul"] + loop["fadd"] + loop["float_other"]
    left_out = loop["left_out"]
    dropped = sum(span["instructions"] for span in left_out)
    return " | ".join(
        str(cell)
        for cell in (
            loop["scope"],
            loop["instructions"],
            mma,
            f"{ratio:.2f}" if ratio is not None else "",
            loop["ldsm"],
            f"{loop['ldgsts']}/{loop['ldg']}",
            loop["ex2"],
            f"{loop['sin']}/{loop['cos']}",
            f"{floats} ({loop['ffma']}/{loop['fmul']}/{loop['fadd']})",
            loop["int_addr"],
            loop["barriers"],
            loop["control"],
            f"{dropped} in {len(left_out)}" if left_out else "0",
            len(loop["inner_loops"]),
        )
    )


def _loop_table_head(header: str) -> list[str]:
    """The note on how main loops are counted, then a table's header and separator lines."""
    return [LOOP_NOTE, "", header, "|" + " --- |" * (header.count("|") - 1)]


def main_loops_table(rows: Sequence[Row]) -> list[str]:
    """The "Main loops" section: one line per row that has a main loop with mma."""
    lines = ["## Main loops", ""]
    lines += _loop_table_head(f"| op | backend | kernel | arch | variant | {LOOP_COLUMNS} |")
    for r in rows:
        lines.append(
            f"| {r.op} | {r.backend} | `{r.kernel}` | {r.arch} | {r.variant} | "
            f"{loop_cells(r.loop)} |"
        )
    return lines


def cubin_kernels(path: Path, pattern: str, archs: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The kernels of any cubin or library with embedded cubins (FlashAttention's, say) whose
    demangled name matches ``pattern`` (``re.search``), on ``archs`` (e.g. "8.0"; default: all
    in the file): resource usage, instruction counts and the main loop, as plain dicts."""
    wanted = {_sm(a) for a in archs}
    readable = _demangle(sorted({name for _, name in resource_usage(path)}))
    regex = re.compile(pattern)
    names = sorted(name for name in readable if regex.search(readable[name]))
    if not names:
        return []
    functions = read_binary(path, names=names)
    return [
        {
            "kernel": readable[name],
            "mangled": name,
            "arch": arch,
            "registers": function.registers,
            "stack_bytes": function.stack_bytes,
            "shared_bytes": function.shared_bytes,
            "counts": function.counts,
            "loop": function.loop,
        }
        for (arch, name), function in sorted(functions.items())
        if not wanted or arch in wanted
    ]


def cubin_markdown(kernels: Sequence[dict[str, Any]], command: str) -> str:
    """The ``--cubin`` report: the command, then one Main-loops line per kernel."""
    lines = ["# Static kernel report", "", f"Regenerate with `{command}` (no GPU needed).", ""]
    lines += _loop_table_head(f"| kernel | arch | regs | stack B | smem B | {LOOP_COLUMNS} |")
    for k in kernels:
        # The parameter list repeats the template arguments of a CUTLASS kernel: dropped.
        name = re.sub(r"^void |\([^()]*\)$", "", k["kernel"])
        cells = loop_cells(k["loop"]) if k["loop"] else " | " * LOOP_COLUMNS.count("|")
        lines.append(
            f"| `{name}` | {k['arch']} | {k['registers']} | {k['stack_bytes']} | "
            f"{k['shared_bytes']} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def main_cubin(
    path: Path, pattern: str, archs: Sequence[str], out: Path | None, command: str
) -> int:
    """Print the report on the kernels of ``path`` that match ``pattern`` (and write
    ``inspect.json`` + ``inspect.md`` into ``out``); 1 when none matches."""
    kernels = cubin_kernels(path, pattern, archs)
    if not kernels:
        print(f"inspect: no kernel of {path} matches {pattern!r}")
        return 1
    text = cubin_markdown(kernels, command)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "inspect.json").write_text(json.dumps(kernels, indent=1) + "\n")
        (out / "inspect.md").write_text(text)
        print(f"inspect: wrote {out / 'inspect.json'} and {out / 'inspect.md'}")
    return 0


def to_json(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Rows as plain dicts, with the spill verdict."""
    return [{**dataclasses.asdict(row), "spills": row.spills} for row in rows]


def main(
    archs: Sequence[str], out: Path | None, scale: str, ops: Sequence[str] | None, command: str
) -> int:
    """Print the report (and write ``inspect.json`` + ``inspect.md`` into ``out``)."""
    rows = inspect(
        archs, scale, ops, progress=lambda message: print(f"inspect: {message}", flush=True)
    )
    text = markdown(rows, command, benchmark_cases(scale, ops))
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "inspect.json").write_text(json.dumps(to_json(rows), indent=1) + "\n")
        (out / "inspect.md").write_text(text)
        print(f"inspect: wrote {out / 'inspect.json'} and {out / 'inspect.md'}")
    return 0
