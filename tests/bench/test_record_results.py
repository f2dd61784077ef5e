"""bench/record_results.py: a GPU check's results merged into RESULTS.md, without a GPU."""

import json
import shutil
from pathlib import Path

import pytest

from bench import record_results
from bench.harness import Ceilings, Report, Row
from bench.report import write_all

ENV = {
    "gpu": "NVIDIA H200 (sm_90, 140 GiB, L2 60 MiB)",
    "driver": "580.1",
    "torch": "2.11.0",
    "cuda": "13.0",
    "triton": "3.6.0",
    "python": "3.12.3",
    "qwen-kernels": "0.1.0",
}


def _timed_run(folder: Path, created: str, gpu: str = ENV["gpu"], mode: str = "gpu") -> None:
    row = Row("rms_norm", "frame", "frame", 1, 64, "64x1280", "qwen/triton", "qwen", 10, 0)
    row.status, row.median_ms, row.p20_ms, row.p80_ms = "ok", 0.0123, 0.012, 0.013
    report = Report(
        mode=mode,
        timed=mode == "gpu",
        note="Timed on the GPU.",
        scale="quick",
        command="qwen-kernels bench --quick --op norm_swiglu",
        created=created,
        env={**ENV, "gpu": gpu},
        peers={"transformers": "5.17.0"},
        ceilings=Ceilings(4100.0, 700.0) if mode == "gpu" else None,
        rows=[row],
    )
    write_all(report, folder)


def _check(out: Path, created: str = "2026-12-03T10:00:00+00:00", **run) -> Path:
    for name in ("bench-heart", "bench"):
        _timed_run(out / name, created, **run)
    steps = [{"name": "gpu", "status": "pass", "seconds": 3, "limit": 20}]
    report = {"status": "pass", "seconds": 400, "budget_seconds": 420, "commit": "abc123"}
    tests = {"tests": 9, "failures": 0, "errors": 0, "skipped": 1}
    (out / "report.json").write_text(json.dumps({**report, "steps": steps, "tests": tests}))
    return out


@pytest.fixture
def results_md(tmp_path) -> Path:
    copy = tmp_path / "bench" / "RESULTS.md"
    copy.parent.mkdir()
    shutil.copyfile(record_results.RESULTS_MD, copy)
    return copy


def test_a_run_is_recorded_with_its_card_versions_and_tables(tmp_path, results_md):
    out = _check(tmp_path / "out")
    assert record_results.main([str(out), "--results", str(results_md)]) == 0
    text = results_md.read_text()
    assert record_results.NO_RESULTS not in text
    section = text.split(record_results.MARKER)[1]
    assert section.lstrip().startswith("### NVIDIA H200, 2026-12-03")
    for expected in (
        "| GPU | NVIDIA H200 (sm_90, 140 GiB, L2 60 MiB) |",
        "| torch / CUDA | 2.11.0 / 13.0 |",
        "| triton | 3.6.0 |",
        "commit abc123",
        "bf16 GEMM 700 TFLOP/s",
        "`bash bench/gpu_check.sh OUT` (budget 420 s)",
        "Tests: 9 run, 0 failures, 0 errors, 1 skipped.",
        "#### bench-heart: `qwen-kernels bench --quick --op norm_swiglu`",
        "#### rms_norm",  # the run's own "## rms_norm" table, two levels down
        "0.0123",
    ):
        assert expected in section, expected
    assert "# qwen-kernels benchmarks" not in section
    records = results_md.parent / "results" / "2026-12-03-nvidia-h200"
    assert sorted(p.name for p in records.iterdir()) == [
        "bench-heart.json",
        "bench.json",
        "report.json",
    ]


def test_recording_again_replaces_and_a_newer_run_goes_first(tmp_path, results_md):
    first = _check(tmp_path / "first")
    later = _check(tmp_path / "later", "2026-12-04T10:00:00+00:00", gpu="NVIDIA H100 (sm_90)")
    for out in (first, first, later):
        assert record_results.main([str(out), "--results", str(results_md)]) == 0
    text = results_md.read_text()
    assert text.count("### NVIDIA H200, 2026-12-03") == 1
    assert text.index("### NVIDIA H100, 2026-12-04") < text.index("### NVIDIA H200, 2026-12-03")
    assert text.count("## How a result is recorded") == 1


def test_a_dry_run_or_an_empty_folder_is_not_recorded(tmp_path, results_md):
    before = results_md.read_text()
    dry = _check(tmp_path / "dry", mode="dry-run")
    assert record_results.main([str(dry), "--results", str(results_md)]) == 2
    assert record_results.main([str(tmp_path / "empty"), "--results", str(results_md)]) == 2
    assert results_md.read_text() == before
