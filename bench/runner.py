"""Runs the benchmark suites, timed on a GPU or as the CPU dry run, and writes the results."""

from __future__ import annotations

import datetime
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from . import report as report_io
from .harness import (
    Case,
    Ceilings,
    Impl,
    Report,
    Row,
    Suite,
    add_speedups,
    check_counts,
    environment,
    impls_for,
    measure_ceilings,
    peer_packages,
    run_case,
)
from .shapes import FULL, QUICK, TINY, Scale
from .suites import select

TIMED_NOTE = (
    "Medians of CUDA-event timings (triton.testing.do_bench: warm-up, L2 flushed before each run), "
    "random inputs rotated past L2. Floor = max(bytes / copy bandwidth, FLOPs / bf16 GEMM rate), "
    "both measured at the start of this run; speedup = the other row's time / this row's time."
)
DRY_NOTE = (
    "Dry run on the CPU: nothing was timed and this file holds no timings. Every case was built "
    "(at full size on the meta device) and its byte count checked against its tensors; each "
    "implementation that runs on the CPU ran once at tiny sizes and was compared with the eager "
    "reference."
)


class Interrupted(BaseException):
    """SIGTERM arrived (e.g. from ``timeout``): stop measuring and write what was measured."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted


@dataclass
class Progress:
    """Prints ``[12/80] window_attn image-1288x952/windows qwen/triton ... 0.123 ms``."""

    total: int
    stream: TextIO
    done: int = 0

    def __call__(self, case: Case, impl: Impl, row: Row | None) -> None:
        if row is None:
            self.done += 1
            print(
                f"[{self.done}/{self.total}] {case.op} {case.name} {impl.name} ...",
                end=" ",
                file=self.stream,
                flush=True,
            )
        else:
            print(outcome(row), file=self.stream, flush=True)


def outcome(row: Row) -> str:
    """One row in a few words."""
    if row.status == "ok" and row.median_ms is not None:
        return f"{row.median_ms:.4g} ms, {row.pct_of_floor:.0f}% of floor"
    if row.status == "ran":
        return f"ran (rel err {row.rel_err:.1e})"
    return f"{row.status}: {row.detail}" if row.detail else row.status


def _cases(selected: list[tuple[Suite, tuple[str, ...]]], scale: Scale) -> list[tuple[Suite, Case]]:
    return [
        (suite, case) for suite, ops in selected for case in suite.cases(scale) if case.op in ops
    ]


def _new_report(mode: str, scale: Scale, command: str, ceilings: Ceilings | None) -> Report:
    return Report(
        mode=mode,
        timed=ceilings is not None,
        note=TIMED_NOTE if ceilings else DRY_NOTE,
        scale=scale.name,
        command=command,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        env=environment(),
        peers=peer_packages(),
        ceilings=ceilings,
    )


def _run_all(
    report: Report,
    work: list[tuple[Suite, Case]],
    device: str,
    ceilings: Ceilings | None,
    stream: TextIO,
) -> None:
    plans = [(suite, case, impls_for(case, suite, device)) for suite, case in work]
    progress = Progress(sum(len(impls) for _, _, impls in plans), stream)
    rows: list[list[Row]] = [[] for _ in plans]
    try:
        # Implementations that compile on first use go last, over all cases: a run stopped by
        # its time limit then loses peer rows, not ours.
        for compiling in (False, True):
            for case_rows, (suite, case, impls) in zip(rows, plans, strict=True):
                chosen = [impl for impl in impls if impl.compiles == compiling]
                if chosen:
                    case_rows += _run_or_report(
                        case, suite, chosen, ceilings, progress, device, stream
                    )
    except Interrupted:
        report.complete = False
        done = sum(len(case_rows) for case_rows in rows)
        report.note += f" Stopped early: {done} of {progress.total} rows were run."
        print("\ninterrupted: writing what was measured", file=stream)
    for case_rows in rows:
        add_speedups(case_rows)
        report.rows += case_rows


def _run_or_report(
    case: Case,
    suite: Suite,
    impls: list[Impl],
    ceilings: Ceilings | None,
    progress: Progress,
    device: str,
    stream: TextIO,
) -> list[Row]:
    try:
        return run_case(case, suite, impls, ceilings, progress, device)
    except Exception as exc:  # building the inputs or the reference failed: report, go on
        print(f"case failed: {type(exc).__name__}: {exc}", file=stream)
        detail = f"case setup failed: {type(exc).__name__}: {exc}"
        return [Row.of(case, impl, status="error", detail=detail) for impl in impls]


def timed_report(
    selected: list[tuple[Suite, tuple[str, ...]]], scale: Scale, command: str, stream: TextIO
) -> Report:
    """Time every case of ``selected`` at ``scale`` on the GPU."""
    if not torch.cuda.is_available():
        raise RuntimeError("timing needs a CUDA GPU and none is visible; use --dry-run")
    print("measuring the ceilings (1 GiB device copy, bf16 8192^3 GEMM) ...", file=stream)
    ceilings = measure_ceilings()
    print(
        f"copy {ceilings.copy_gbps:.0f} GB/s, GEMM {ceilings.gemm_tflops:.0f} TFLOP/s", file=stream
    )
    report = _new_report("gpu", scale, command, ceilings)
    work = _cases(selected, scale)
    report.cases = [check_counts(case, scale.name, "meta") for _, case in work]
    _run_all(report, work, "cuda", ceilings, stream)
    return report


def dry_run_report(
    selected: list[tuple[Suite, tuple[str, ...]]], scale: Scale, command: str, stream: TextIO
) -> Report:
    """Check every case at ``scale`` on the meta device, and run every case once at TINY size on
    the CPU backends. Claims no timing."""
    report = _new_report("dry-run", scale, command, None)
    report.cases = [check_counts(case, scale.name, "meta") for _, case in _cases(selected, scale)]
    tiny = _cases(selected, TINY)
    report.cases += [check_counts(case, TINY.name, "cpu") for _, case in tiny]
    _run_all(report, tiny, "cpu", None, stream)
    return report


def failures(report: Report) -> list[str]:
    """What makes a run fail: a byte count that disagrees with its tensors, or one of our
    kernels that errors or disagrees with the reference (peers' failures are only reported)."""
    bad = [
        f"byte count of {c.op} {c.case} ({c.scale}): case says {c.bytes}, tensors {c.counted_bytes}"
        for c in report.cases
        if not c.ok
    ]
    bad += [
        f"{r.op} {r.case} {r.impl}: {r.status}: {r.detail}"
        for r in report.rows
        if r.kind == "qwen" and r.status in ("error", "mismatch")
    ]
    if not report.complete:
        bad.append("the run was stopped before its last case")
    return bad


def default_out_dir() -> Path:
    """``bench/out/<UTC timestamp>`` under the current directory."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("bench", "out", stamp)


def main(
    names: Sequence[str] | None,
    quick: bool,
    dry_run: bool,
    out: Path | None,
    command: str,
    stream: TextIO | None = None,
) -> int:
    """Run, print to ``stream`` (stdout) the progress and the table, write JSON, Markdown and plots
    into ``out``; 0 unless something of ours failed (see ``failures``)."""
    stream = stream or sys.stdout
    try:
        selected = select(names)
    except ValueError as exc:
        print(f"qwen-kernels bench: {exc}", file=sys.stderr)
        return 2
    scale = QUICK if quick else FULL
    build = dry_run_report if dry_run else timed_report
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if on_main_thread else None
    try:
        report = build(selected, scale, command, stream)
    except RuntimeError as exc:
        print(f"qwen-kernels bench: {exc}", file=sys.stderr)
        return 2
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    out = out or default_out_dir()
    print(report_io.table(report), file=stream)
    for path in report_io.write_all(report, out):
        print(f"wrote {path}", file=stream)
    bad = failures(report)
    for line in bad:
        print(f"FAILED {line}", file=stream)
    return 1 if bad else 0
