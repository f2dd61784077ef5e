"""The GPU check's script and its report, exercised without a GPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check_report, sanitize_cases
from qwen_kernels._backends import REGISTRY

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"
JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1">
<testcase classname="tests.ops.test_rms_norm" name="test_ok"/>
<testcase classname="tests.ops.test_rms_norm" name="test_bad"><failure message="boom"/></testcase>
<testcase classname="tests.ops.test_rms_norm" name="test_gpu"><skipped/></testcase>
</testsuite></testsuites>
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


STEP_ORDER = ["gpu", "build", "info", "tests", "heart", "memcheck", "racecheck", "bench"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("budget", [420, 300])
def test_dry_run_shows_the_step_order_within_the_budget(tmp_path, budget):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "QK_GPU_CHECK_DRY_RUN": "1",
        "QK_GPU_CHECK_BUDGET": str(budget),
    }
    run = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "plan"
    assert [s["name"] for s in report["steps"]] == STEP_ORDER
    assert all(s["status"] == "plan" for s in report["steps"])
    # Worst case: every step takes its whole limit; each still gets time and the sum fits.
    limits = [s["limit"] for s in report["steps"]]
    assert min(limits) >= 10, limits
    assert budget - len(limits) <= sum(limits) <= budget
    assert report["seconds"] == sum(limits)
    assert not list((tmp_path / "logs").iterdir()), "a dry run ran a step"
    for name in STEP_ORDER:
        assert f"== {name} (limit" in run.stdout


def _fake_check(out: Path) -> None:
    (out / "logs").mkdir(parents=True)
    steps = [
        ("gpu", "pass", "0", "2", "60", "bash -c probe_gpu"),
        ("tests", "fail", "1", "100", "300", "python -m pytest -q"),
        ("memcheck", "skip", "-", "0", "0", "no op has a CUDA kernel yet"),
        ("bench", "timeout", "124", "300", "300", "python -m qwen_kernels bench"),
    ]
    (out / "steps.tsv").write_text("".join("\t".join(s) + "\n" for s in steps))
    (out / "logs" / "tests.log").write_text("".join(f"line {i}\n" for i in range(100)))
    (out / "junit.xml").write_text(JUNIT)
    (out / "bench-heart").mkdir()
    (out / "bench-heart" / "results.json").write_text(
        json.dumps(
            {
                "mode": "gpu",
                "timed": True,
                "scale": "quick",
                "env": {"gpu": "H100"},
                "rows": [{"status": "ok"}, {"status": "ok"}, {"status": "skipped"}],
            }
        )
    )


def test_report_lists_every_step_with_its_log_tail(tmp_path):
    _fake_check(tmp_path)
    assert gpu_check_report.main([str(tmp_path), "--started", "1700000000", "--budget", "570"]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "fail"
    assert [s["name"] for s in report["steps"]] == ["gpu", "tests", "memcheck", "bench"]
    tests = report["steps"][1]
    assert tests["exit_code"] == 1 and tests["log"] == "logs/tests.log"
    assert tests["tail"].splitlines() == [f"line {i}" for i in range(60, 100)]
    assert report["steps"][2]["exit_code"] is None
    assert report["tests"]["failed"] == ["tests.ops.test_rms_norm::test_bad"]
    assert (report["tests"]["tests"], report["tests"]["skipped"]) == (3, 1)
    assert report["bench"]["bench-heart"]["rows"] == {"ok": 2, "skipped": 1}
    assert "bench" not in report["bench"]
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# GPU check: FAIL")
    for name in ("gpu", "tests", "memcheck", "bench", "test_bad"):
        assert name in markdown


def test_report_passes_when_steps_pass_or_skip(tmp_path):
    steps = ["gpu\tpass\t0\t1\t60\tprobe", "racecheck\tskip\t-\t0\t0\tno CUDA kernel"]
    (tmp_path / "steps.tsv").write_text("\n".join(steps) + "\n")
    assert gpu_check_report.main([str(tmp_path)]) == 0


def test_report_of_an_empty_check_fails(tmp_path):
    assert gpu_check_report.main([str(tmp_path)]) == 1


def test_sanitizer_cases_cover_every_op():
    for op in REGISTRY:
        found = sanitize_cases.cases_for(op)
        assert found, op
        assert all(case.op == op.rstrip("_") for case in found)
    assert set(sanitize_cases.cuda_ops()) <= set(REGISTRY)


def test_sanitizer_edge_cases_name_ops_with_cuda_kernels():
    for name in sanitize_cases.EDGE_CASES:
        op = name.split()[0]
        assert op in REGISTRY and "cuda" in REGISTRY[op].impls, name
