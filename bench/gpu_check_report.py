"""Assembles the GPU check's report from what ``bench/gpu_check.sh`` recorded.

    python bench/gpu_check_report.py OUT_DIR [--started EPOCH] [--budget SECONDS]

Reads OUT_DIR/steps.tsv (one line per step: name, status, exit code, seconds, limit, command or
reason) and the logs in OUT_DIR/logs/, and writes OUT_DIR/report.json and OUT_DIR/report.md:
every step's status, duration and the tail of its log, the test counts from OUT_DIR/junit.xml and
the summaries of the benchmark runs (OUT_DIR/bench-heart, OUT_DIR/bench) when they exist.
Standard library only, so that it runs when the build or the torch install is broken. Exit status
0 when every step passed or was skipped (or, in a dry run, was planned), 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TAIL_LINES = 40
FAILED_TESTS_SHOWN = 30


@dataclass
class Step:
    """One step of the check as gpu_check.sh recorded it."""

    name: str
    status: str  # pass | fail | timeout | skip | plan (a dry run)
    exit_code: int | None
    seconds: int
    limit: int
    detail: str  # the command, or why the step was skipped
    log: str | None
    tail: str


def read_steps(out: Path) -> list[Step]:
    """The steps in the order they ran, each with the tail of its log."""
    steps = []
    table = out / "steps.tsv"
    lines = table.read_text().splitlines() if table.exists() else []
    for line in lines:
        name, status, code, seconds, limit, detail = (line.split("\t") + [""] * 6)[:6]
        log = out / "logs" / f"{name}.log"
        steps.append(
            Step(
                name=name,
                status=status,
                exit_code=int(code) if code.lstrip("-").isdigit() else None,
                seconds=int(seconds or 0),
                limit=int(limit or 0),
                detail=detail,
                log=str(log.relative_to(out)) if log.exists() else None,
                tail=_tail(log),
            )
        )
    return steps


def _tail(path: Path) -> str:
    if not path.exists():
        return ""
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-TAIL_LINES:])


def junit_summary(path: Path) -> dict[str, Any] | None:
    """Counts of the pytest run and the names of the failing tests, from its junit XML."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": f"unreadable junit XML: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = Counter()
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0))
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {**counts, "failed": failed[:FAILED_TESTS_SHOWN], "failed_total": len(failed)}


BENCH_DIRS = ("bench-heart", "bench")  # the check's benchmark steps, in the order they run


def bench_summary(path: Path, out: Path) -> dict[str, Any]:
    """Mode, GPU and row counts by status of the benchmark results at ``path``."""
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return {"error": f"unreadable results: {exc}"}
    statuses = Counter(row.get("status") for row in results.get("rows", []))
    return {
        "mode": results.get("mode"),
        "timed": results.get("timed"),
        "scale": results.get("scale"),
        "gpu": results.get("env", {}).get("gpu"),
        "rows": dict(statuses),
        "results": str(path.with_suffix(".md").relative_to(out)),
    }


def overall(steps: list[Step]) -> str:
    """ "plan" for a dry run, "pass" when every step passed or was skipped, else "fail"."""
    if steps and all(s.status in ("plan", "skip") for s in steps):
        return "plan"
    return "pass" if steps and all(s.status in ("pass", "skip") for s in steps) else "fail"


def source_commit() -> str | None:
    """The checkout's commit, "+dirty" when it has changes; None outside a git checkout."""
    try:
        run = functools.partial(
            subprocess.run, capture_output=True, text=True, check=True, timeout=30
        )
        commit = run(["git", "rev-parse", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def build_report(out: Path, started: float | None, budget: int | None) -> dict[str, Any]:
    """Everything report.json holds."""
    steps = read_steps(out)
    status = overall(steps)
    now = time.time()
    seconds = sum(s.seconds for s in steps)  # a dry run's plan, or a check without its start
    if started and status != "plan":
        seconds = round(now - started)
    return {
        "status": status,
        "started": _iso(started) if started else None,
        "finished": _iso(now),
        "seconds": seconds,
        "budget_seconds": budget,
        "commit": source_commit(),
        "steps": [dataclasses.asdict(s) for s in steps],
        "tests": junit_summary(out / "junit.xml"),
        "bench": {
            name: bench_summary(out / name / "results.json", out)
            for name in BENCH_DIRS
            if (out / name / "results.json").exists()
        },
    }


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat(
        timespec="seconds"
    )


def markdown(report: dict[str, Any]) -> str:
    """report.md: the verdict, the step table, tests, benchmarks, then each step's log tail."""
    lines = [
        f"# GPU check: {report['status'].upper()}",
        "",
        f"Started {report['started']}, finished {report['finished']}, "
        f"{report['seconds']} s (budget {report['budget_seconds']} s), "
        f"commit {report['commit'] or 'unknown'}.",
        "",
        "| step | status | exit | seconds | limit | command or reason |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for step in report["steps"]:
        code = "" if step["exit_code"] is None else step["exit_code"]
        detail = step["detail"].replace("|", "/")
        lines.append(
            f"| {step['name']} | {step['status']} | {code} | {step['seconds']} | "
            f"{step['limit']} | `{detail}` |"
        )
    tests = report["tests"]
    if tests:
        lines += ["", "## Tests", ""]
        if "error" in tests:
            lines.append(tests["error"])
        else:
            lines.append(
                f"{tests['tests']} tests: {tests['failures']} failures, "
                f"{tests['errors']} errors, {tests['skipped']} skipped."
            )
            lines += [f"- {name}" for name in tests["failed"]]
    bench = report["bench"]
    if bench:
        lines += ["", "## Benchmarks", "", "```json", json.dumps(bench, indent=1), "```"]
    lines += ["", "## Logs", ""]
    for step in report["steps"]:
        if step["tail"]:
            lines += [
                f"### {step['name']} ({step['log']}, last {TAIL_LINES} lines)",
                "",
                "```text",
                step["tail"],
                "```",
                "",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write report.json and report.md into OUT_DIR and print the verdict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder gpu_check.sh wrote into")
    parser.add_argument("--started", type=float, help="when the check began (epoch seconds)")
    parser.add_argument("--budget", type=int, help="the check's time budget in seconds")
    args = parser.parse_args(argv)
    report = build_report(args.out, args.started, args.budget)
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    for step in report["steps"]:
        print(f"{step['name']:<10} {step['status']:<8} {step['seconds']:>4} s")
    print(f"GPU check: {report['status']} -> {args.out / 'report.md'}")
    return 0 if report["status"] in ("pass", "plan") else 1


if __name__ == "__main__":
    sys.exit(main())
