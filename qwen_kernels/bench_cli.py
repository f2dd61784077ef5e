"""``qwen-kernels bench`` and ``qwen-kernels inspect``: the benchmark suite and the static report
of the machine code from the command line. Both are tools of a checkout (the ``bench`` folder at
its root), not part of the installed package: the verbs run them from the checkout this package
was installed from (``pip install -e .``), or from the current folder when it is one."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from pathlib import Path
from types import ModuleType


def checkout_tool(module: str) -> ModuleType | None:
    """``bench.<module>`` of the checkout this package lives in (an editable install) or of the
    current folder; None, with a message saying where to run from, when neither is one."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "bench" / "harness.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return importlib.import_module(f"bench.{module}")
    print(
        "qwen-kernels: the benchmarks and the inspector are tools of a checkout of qwen-kernels, "
        "not installed with it: run this from the repository root (or install it there with "
        "pip install -e .)",
        file=sys.stderr,
    )
    return None


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand to the ``qwen-kernels`` parser."""
    parser = commands.add_parser(
        "bench",
        help="benchmark every op against its peers (or check the suite with --dry-run)",
        description="Time every case of every op on the GPU, each usable backend and each "
        "installed peer; print a table and write results.json, results.md and plots.",
    )
    parser.add_argument(
        "--op",
        action="append",
        metavar="NAME",
        help="an op (e.g. window_attn) or a benchmark file (e.g. norm_swiglu); "
        "repeatable; default: all",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer sizes (T = 4k, 16k), for a check within minutes"
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where to write the results (default: bench/out/<timestamp>)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU needed: build and check every case, run each once at tiny "
        "sizes on the CPU; nothing is timed",
    )


def run_bench(args: argparse.Namespace) -> int:
    """Run ``qwen-kernels bench`` with parsed ``args``; returns the exit status."""
    if args.dry_run and "triton" not in sys.modules:
        # Triton kernels run on CPU tensors only under the interpreter, chosen at first import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    runner = checkout_tool("runner")
    if runner is None:
        return 2
    command = shlex.join(["qwen-kernels", "bench", *_flags(args)])
    return runner.main(
        args.op, quick=args.quick, dry_run=args.dry_run, out=args.out, command=command
    )


def _flags(args: argparse.Namespace) -> list[str]:
    flags = [f"--op={name}" for name in args.op or ()]
    flags += ["--quick"] * args.quick + ["--dry-run"] * args.dry_run
    return flags + ([f"--out={args.out}"] if args.out else [])


def add_inspect_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` subcommand to the ``qwen-kernels`` parser."""
    parser = commands.add_parser(
        "inspect",
        help="static report of every kernel's machine code (no GPU needed)",
        description="Compile every Triton kernel variant the benchmark cases launch, and read "
        "the CUDA kernels of qwen_kernels._C, for each arch: registers, spills, shared memory, "
        "occupancy, tensor-core and 16-byte memory instructions, and the instruction mix of each "
        "kernel's main loop. With --cubin, read the main loops of any cubin or library instead.",
    )
    parser.add_argument(
        "--arch",
        help="comma-separated compute capabilities (default: 8.0,9.0a; with --cubin: every "
        "arch in the file)",
    )
    parser.add_argument(
        "--op", action="append", metavar="NAME", help="only this op (repeatable); default: all"
    )
    parser.add_argument(
        "--quick", action="store_true", help="the benchmark's quick sizes instead of the full set"
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="also write DIR/inspect.json and DIR/inspect.md"
    )
    parser.add_argument(
        "--cubin",
        type=Path,
        metavar="FILE",
        help="read this cubin or library with embedded cubins (e.g. FlashAttention's) instead "
        "of our kernels; needs --kernel",
    )
    parser.add_argument(
        "--kernel",
        metavar="REGEX",
        help="with --cubin: the kernels whose demangled name matches REGEX (re.search)",
    )


def run_inspect(args: argparse.Namespace) -> int:
    """Run ``qwen-kernels inspect`` with parsed ``args``; returns the exit status."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("qwen-kernels inspect: unset TRITON_INTERPRET (it compiles real kernels)")
        return 2
    if (args.cubin is None) != (args.kernel is None):
        print("qwen-kernels inspect: --cubin and --kernel go together")
        return 2
    if args.cubin is not None and (args.op or args.quick):
        print("qwen-kernels inspect: --op and --quick choose our kernels, not a --cubin's")
        return 2
    inspect_kernels = checkout_tool("inspect_kernels")
    if inspect_kernels is None:
        return 2
    arch = args.arch or ("" if args.cubin else "8.0,9.0a")
    archs = [a.strip() for a in arch.split(",") if a.strip()]
    flags = [f"--arch={arch}"] if arch else []  # --out does not change the report
    if args.cubin is not None:
        flags += [f"--cubin={args.cubin}", f"--kernel={args.kernel}"]
        command = shlex.join(["qwen-kernels", "inspect", *flags])
        return inspect_kernels.main_cubin(args.cubin, args.kernel, archs, args.out, command)
    flags += [f"--op={op}" for op in args.op or ()] + ["--quick"] * args.quick
    command = shlex.join(["qwen-kernels", "inspect", *flags])
    scale = "quick" if args.quick else "full"
    return inspect_kernels.main(archs, args.out, scale, args.op, command)
