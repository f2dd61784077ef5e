"""Writes a benchmark ``Report``: JSON (the record), Markdown, a console table, and PNG plots
when matplotlib is installed."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .harness import REFERENCE, Report, Row
from .shapes import short_count

Column = tuple[str, Callable[[Row], str]]


def to_dict(report: Report) -> dict[str, Any]:
    """The report as plain JSON data; non-finite floats become null."""
    return _finite(dataclasses.asdict(report))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _num(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def baselines(rows: list[Row]) -> list[str]:
    """The implementations every row of these is compared with: our eager reference and the
    peers, in order of appearance."""
    names = [r.impl for r in rows if r.kind == "peer" or r.impl == REFERENCE]
    return list(dict.fromkeys(names))


def _columns(report: Report, rows: list[Row]) -> list[Column]:
    head: list[Column] = [("case", lambda r: r.case), ("backend", lambda r: r.impl)]
    if not report.timed:
        return [
            *head,
            ("status", lambda r: r.status),
            ("rel err", lambda r: _num(r.rel_err, ".1e")),
            ("bytes", lambda r: str(r.bytes)),
            ("detail", lambda r: r.detail),
        ]
    speedups: list[Column] = [
        (f"x {name}", lambda r, name=name: _num(r.speedup.get(name), ".2f"))
        for name in baselines(rows)
    ]
    profiled: list[Column] = []
    if any(r.peak_mib is not None for r in rows):
        profiled = [
            ("peak MiB", lambda r: _num(r.peak_mib, ".0f")),
            (
                "non-GEMM",
                lambda r: _num(
                    None if r.non_gemm_share is None else 100 * r.non_gemm_share, ".0f", "%"
                ),
            ),
        ]
    return [
        *head,
        ("median ms", lambda r: _num(r.median_ms, ".4g")),
        ("p20-p80 ms", lambda r: "" if r.p20_ms is None else f"{r.p20_ms:.4g}-{r.p80_ms:.4g}"),
        ("GB/s", lambda r: _num(r.gbps, ".0f")),
        ("TFLOP/s", lambda r: _num(r.tflops, ".1f")),
        ("% of floor", lambda r: _num(r.pct_of_floor, ".0f", "%")),
        *profiled,
        *speedups,
        ("status", lambda r: r.status if not r.detail else f"{r.status}: {r.detail}"),
    ]


def _by_op(report: Report) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for row in report.rows:
        groups.setdefault(row.op, []).append(row)
    return groups


def _markdown_table(columns: list[Column], rows: list[Row]) -> list[str]:
    lines = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += [
        "| " + " | ".join(get(r).replace("|", "/") for _, get in columns) + " |" for r in rows
    ]
    return lines


def _header(report: Report) -> list[tuple[str, str]]:
    env = report.env
    ceilings = "not measured (dry run)"
    if report.ceilings:
        ceilings = (
            f"device-to-device copy {report.ceilings.copy_gbps:.0f} GB/s (read + write), "
            f"bf16 GEMM {report.ceilings.gemm_tflops:.0f} TFLOP/s"
        )
    return [
        ("mode", f"{report.mode} (timed: {'yes' if report.timed else 'no'})"),
        ("scale", report.scale),
        ("date (UTC)", report.created),
        ("command", f"`{report.command}`"),
        ("GPU", env.get("gpu", "")),
        ("driver", env.get("driver", "")),
        ("torch / CUDA", f"{env.get('torch', '')} / {env.get('cuda', '')}"),
        ("triton", env.get("triton", "")),
        ("python", env.get("python", "")),
        ("ceilings", ceilings),
        ("peer packages", ", ".join(f"{k} {v}" for k, v in report.peers.items())),
    ]


def markdown(report: Report) -> str:
    """The report as a Markdown page: header, note, one table per op, the cases."""
    lines = ["# qwen-kernels benchmarks", "", f"> {report.note}", "", "| | |", "| --- | --- |"]
    lines += [f"| {key} | {value} |" for key, value in _header(report)]
    for op, rows in _by_op(report).items():
        lines += ["", f"## {op}", ""]
        lines += _markdown_table(_columns(report, rows), rows)
    lines += [
        "",
        "## Cases",
        "",
        "bytes: each input read once, each output written once; FLOPs: matrix multiplies only.",
        "",
    ]
    lines += [
        "| op | case | scale | shape | bytes | FLOPs | bytes match tensors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {c.op} | {c.case} | {c.scale} | {c.shape} | {c.bytes} | {c.flops} | "
        f"{'yes' if c.ok else f'NO ({c.counted_bytes})'} |"
        for c in report.cases
    ]
    return "\n".join(lines) + "\n"


def table(report: Report) -> str:
    """The rows as aligned text, one block per op, for the terminal."""
    blocks = [
        f"{report.mode}: {report.env.get('gpu', '')}, torch {report.env.get('torch')}, "
        f"triton {report.env.get('triton')}"
    ]
    for op, rows in _by_op(report).items():
        columns = _columns(report, rows)
        cells = [[name for name, _ in columns]] + [[get(r) for _, get in columns] for r in rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
        blocks.append(f"\n{op}")
        blocks += [
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            for line in cells
        ]
    return "\n".join(blocks)


def plot(report: Report, out_dir: Path) -> list[Path]:
    """Per op and sweep: time and % of floor against x, one line per implementation. Nothing
    without matplotlib or without timings."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    if not report.timed:
        return []
    written = []
    sweeps: dict[tuple[str, str], list[Row]] = {}
    for row in report.rows:
        if row.median_ms is not None:
            sweeps.setdefault((row.op, row.series), []).append(row)
    for (op, series), rows in sweeps.items():
        if not _is_sweep(rows):
            continue
        fig, (ax_time, ax_floor) = plt.subplots(1, 2, figsize=(12, 4.5))
        for impl in dict.fromkeys(r.impl for r in rows):
            points = sorted((r.x, r.median_ms, r.pct_of_floor) for r in rows if r.impl == impl)
            xs, times, floors = zip(*points, strict=True)
            ax_time.plot(xs, times, marker="o", label=impl)
            ax_floor.plot(xs, floors, marker="o", label=impl)
        ax_time.set(yscale="log", ylabel="median ms")
        ax_floor.set(ylabel="% of floor", ylim=(0, 105))
        ticks = sorted({r.x for r in rows})
        for ax in (ax_time, ax_floor):
            ax.set(xscale="log", xlabel=_x_label(series))
            ax.set_xticks(ticks, [short_count(x) for x in ticks], minor=False)
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
        ax_time.legend(fontsize="small")
        fig.suptitle(f"{op} ({series}) on {report.env.get('gpu', '')}", fontsize="medium")
        fig.tight_layout()
        path = out_dir / f"{op}-{series}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _is_sweep(rows: list[Row]) -> bool:
    """At least two x values, and one row per implementation and x (cases of different kinds,
    like an image's windows and its frames, share an x and are not a sweep)."""
    keys = [(r.impl, r.x) for r in rows]
    return len({r.x for r in rows}) >= 2 and len(set(keys)) == len(keys)


def _x_label(series: str) -> str:
    return "tokens per frame" if series == "frames" else "tokens"


def write_all(report: Report, out_dir: Path) -> list[Path]:
    """Write ``results.json``, ``results.md`` and the plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(to_dict(report), indent=1, allow_nan=False) + "\n")
    md_path.write_text(markdown(report))
    return [json_path, md_path, *plot(report, out_dir)]
