"""Merges a GPU check's results into ``bench/RESULTS.md``, so that nobody copies figures by hand.

    python -m bench.record_results OUT_DIR [--results bench/RESULTS.md]

OUT_DIR is the folder that ``bash bench/gpu_check.sh OUT_DIR`` filled on the GPU machine. This
copies its records (report.json and each benchmark run's results.json) into
``bench/results/<date>-<gpu>/`` and writes one section into RESULTS.md, newest first: the card,
date, versions, commit and command, the check's steps and test counts, then each benchmark run's
tables unchanged. Recording the same run again replaces its section. Only timed GPU runs are
recorded: a dry run holds no figures. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.gpu_check_report import BENCH_DIRS

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
MARKER = "<!-- recorded runs, newest first (bench/record_results.py) -->"
NO_RESULTS = "**No results yet.**"


class NotRecordable(ValueError):
    """The folder holds nothing that RESULTS.md records."""


def load_runs(out: Path) -> dict[str, dict[str, Any]]:
    """The check's timed benchmark runs by folder name (``bench-heart``, ``bench``)."""
    runs = {}
    for name in BENCH_DIRS:
        path = out / name / "results.json"
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        if results.get("mode") != "gpu" or not results.get("timed"):
            raise NotRecordable(f"{path} is a {results.get('mode')} run: it holds no timings")
        runs[name] = results
    if not runs:
        raise NotRecordable(f"no benchmark results under {out} ({', '.join(BENCH_DIRS)})")
    return runs


def slug(text: str) -> str:
    """A file-name-safe, lower-case form of ``text``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def card_name(env: dict[str, str]) -> str:
    """The GPU's name without the details in parentheses."""
    return env.get("gpu", "unknown GPU").split(" (")[0]


def _tables(markdown: str) -> list[str]:
    """A results.md without its title and header table, headings two levels down."""
    lines = markdown.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    return ["##" + line if line.startswith("#") else line for line in lines[first:]]


def section(
    report: dict[str, Any], runs: dict[str, dict[str, Any]], out: Path, record: str
) -> tuple[str, list[str]]:
    """The heading and lines of this run's section of RESULTS.md."""
    first = next(iter(runs.values()))
    env, date = first["env"], first["created"][:10]
    ceilings = first.get("ceilings") or {}
    heading = f"### {card_name(env)}, {date}"
    commit = report.get("commit") or "unknown"
    lines = [
        heading,
        "",
        "| | |",
        "| --- | --- |",
        f"| GPU | {env.get('gpu', '')} |",
        f"| driver | {env.get('driver', '')} |",
        f"| torch / CUDA | {env.get('torch', '')} / {env.get('cuda', '')} |",
        f"| triton | {env.get('triton', '')} |",
        f"| python | {env.get('python', '')} |",
        f"| qwen-kernels | {env.get('qwen-kernels', '')}, commit {commit} |",
        f"| ceilings | device-to-device copy {ceilings.get('copy_gbps', 0):.0f} GB/s, "
        f"bf16 GEMM {ceilings.get('gemm_tflops', 0):.0f} TFLOP/s |",
        "| peer packages | "
        + ", ".join(f"{k} {v}" for k, v in first.get("peers", {}).items())
        + " |",
        f"| command | `bash bench/gpu_check.sh OUT` (budget {report.get('budget_seconds')} s) |",
        f"| record | `{record}` |",
        "",
        f"GPU check: **{report.get('status', 'unknown')}** in {report.get('seconds')} s.",
        "",
        "| step | status | seconds | limit |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {s['name']} | {s['status']} | {s['seconds']} | {s['limit']} |"
        for s in report.get("steps", [])
    ]
    tests = report.get("tests")
    if tests and "error" not in tests:
        lines += [
            "",
            f"Tests: {tests['tests']} run, {tests['failures']} failures, {tests['errors']} "
            f"errors, {tests['skipped']} skipped.",
        ]
    for name, results in runs.items():
        lines += ["", f"#### {name}: `{results['command']}`", "", f"> {results['note']}"]
        if not results.get("complete", True):
            lines += ["", "This run was stopped before its last case."]
        lines += ["", *_tables((out / name / "results.md").read_text())]
    return heading, lines


def merge(results_md: str, heading: str, lines: list[str]) -> str:
    """``results_md`` with this section first below the marker, replacing one of the same
    heading; the no-results line goes."""
    if MARKER not in results_md:
        raise NotRecordable(f"RESULTS.md has no marker line {MARKER!r}")
    head, runs = results_md.split(MARKER, 1)
    head = "\n".join(line for line in head.splitlines() if not line.startswith(NO_RESULTS))
    kept = [
        part
        for part in re.split(r"(?m)^(?=### )", runs)
        if part.strip() and not part.startswith(heading + "\n")
    ]
    body = "\n".join(lines).rstrip() + "\n\n" + "".join(p.rstrip() + "\n\n" for p in kept)
    return head.rstrip() + "\n\n" + MARKER + "\n\n" + body.rstrip() + "\n"


def record(out: Path, results_path: Path = RESULTS_MD) -> Path:
    """Copy the run's records beside ``results_path`` and merge its section; returns the folder
    the records went to."""
    runs = load_runs(out)
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    first = next(iter(runs.values()))
    folder = Path("results", f"{first['created'][:10]}-{slug(card_name(first['env']))}")
    target = results_path.parent / folder
    target.mkdir(parents=True, exist_ok=True)
    if report_path.exists():
        shutil.copyfile(report_path, target / "report.json")
    for name in runs:
        shutil.copyfile(out / name / "results.json", target / f"{name}.json")
    heading, lines = section(report, runs, out, f"bench/{folder.as_posix()}/")
    results_path.write_text(merge(results_path.read_text(), heading, lines))
    return target


def main(argv: list[str] | None = None) -> int:
    """Record OUT_DIR's results; exit status 2 when there is nothing to record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder gpu_check.sh wrote into")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="the file to merge into")
    args = parser.parse_args(argv)
    try:
        target = record(args.out, args.results)
    except (NotRecordable, OSError, json.JSONDecodeError) as exc:
        print(f"record_results: {exc}", file=sys.stderr)
        return 2
    print(f"recorded {args.out} into {args.results} (records in {target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
