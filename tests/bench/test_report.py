"""The timed path of the harness and the report writers, driven by a stub clock: this checks the
arithmetic (bandwidth, floor, speedups) and the files, never a real timing."""

import dataclasses
import json

import pytest
import torch

from bench import harness, report, runner
from bench.bench_norm_swiglu import SUITE
from bench.shapes import TINY

CEILINGS = harness.Ceilings(copy_gbps=1000.0, gemm_tflops=500.0)


def fake_measure(times):
    """A stand-in for do_bench: each implementation takes the next of ``times`` (ms)."""
    queue = iter(times)

    def measure(fn, warmup_ms, rep_ms):
        fn()
        median = next(queue)
        return median, 0.9 * median, 1.1 * median

    return measure


@pytest.fixture
def timed_rows(monkeypatch):
    case = next(c for c in SUITE.cases(TINY) if c.op == "rms_norm")
    impls = [i for i in harness.impls_for(case, SUITE, "cpu") if i.cpu and not i.missing]
    monkeypatch.setattr(harness, "measure", fake_measure([2.0, 1.0, 4.0, 8.0][: len(impls)]))
    monkeypatch.setattr(harness, "l2_bytes", lambda: 1 << 20)
    rows = harness.run_case(case, SUITE, impls, CEILINGS, lambda *args: None, device="cpu")
    return case, rows


def test_timed_rows_carry_bandwidth_floor_and_speedups(timed_rows):
    case, rows = timed_rows
    reference = rows[0]
    assert reference.impl == harness.REFERENCE and reference.status == "ok"
    assert reference.median_ms == 2.0
    assert reference.gbps == pytest.approx(case.bytes / 2e-3 / 1e9)
    assert reference.floor_ms == pytest.approx(case.bytes / 1e12 * 1e3)
    assert reference.pct_of_floor == pytest.approx(100 * reference.floor_ms / 2.0)
    assert reference.tflops is None  # no matrix FLOPs in a norm
    for row in rows[1:]:
        assert row.speedup[harness.REFERENCE] == pytest.approx(2.0 / row.median_ms)
        assert harness.REFERENCE not in reference.speedup or row.kind == "peer"


def test_input_sets_rotate_past_l2():
    case = next(c for c in SUITE.cases(TINY) if c.op == "swiglu")
    sets = harness.input_sets(case, "cpu", l2=1 << 18)
    size = harness.tensor_bytes(sets[0])
    assert len(sets) * size > harness.ROTATE_L2_FACTOR * (1 << 18)
    assert not torch.equal(sets[0]["gate_up"], sets[1]["gate_up"])


def test_floor_takes_the_slower_ceiling():
    assert CEILINGS.floor_ms(10**9, 0) == pytest.approx(1.0)
    assert CEILINGS.floor_ms(10**6, 10**12) == pytest.approx(2.0)


def test_timed_report_files(timed_rows, tmp_path):
    _, rows = timed_rows
    result = harness.Report(
        "gpu",
        True,
        runner.TIMED_NOTE,
        "tiny",
        "qwen-kernels bench",
        "now",
        {"gpu": "stub", "torch": torch.__version__},
        {},
        CEILINGS,
        rows=rows,
    )
    written = report.write_all(result, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["timed"] and data["rows"][0]["median_ms"] == 2.0
    markdown = (tmp_path / "results.md").read_text()
    assert "| median ms |" in markdown and f"x {harness.REFERENCE}" in markdown
    assert "rms_norm" in report.table(result)
    if any(p.suffix == ".png" for p in written):  # only where matplotlib is installed
        assert all(p.stat().st_size > 0 for p in written)


def test_sweeps_are_plotted(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        harness.Row(
            "swiglu",
            f"T={x}",
            "tokens",
            x,
            x,
            "",
            impl,
            "qwen",
            1,
            0,
            status="ok",
            median_ms=x / 1000 * speed,
            pct_of_floor=50.0 / speed,
        )
        for x in (64, 256)
        for impl, speed in (("qwen/torch", 2.0), ("qwen/triton", 1.0))
    ]
    result = harness.Report(
        "gpu", True, "", "tiny", "", "", {"gpu": "stub"}, {}, CEILINGS, rows=rows
    )
    assert report.plot(result, tmp_path) == [tmp_path / "swiglu-tokens.png"]


def test_non_finite_numbers_become_null():
    row = harness.Row(
        "rms_norm", "T=64", "tokens", 64, 64, "", "x", "peer", 1, 0, rel_err=float("inf")
    )
    result = harness.Report("dry-run", False, "", "tiny", "", "", {}, {}, None, rows=[row])
    assert report.to_dict(result)["rows"][0]["rel_err"] is None


def test_profiled_suites_add_memory_and_non_gemm_columns(monkeypatch, tmp_path):
    """A suite with ``profile`` gets each timed row's peak memory and non-GEMM share (from a stub
    profiler here), and the tables show them; other suites' tables do not."""
    profiled = dataclasses.replace(SUITE, profile=True)
    case = next(c for c in profiled.cases(TINY) if c.op == "rms_norm")
    impls = [i for i in harness.impls_for(case, profiled, "cpu") if i.cpu and not i.missing][:2]
    monkeypatch.setattr(harness, "measure", fake_measure([2.0, 1.0]))
    monkeypatch.setattr(harness, "profile", lambda fn: (12.0, 0.25))
    monkeypatch.setattr(harness, "l2_bytes", lambda: 1 << 20)
    rows = harness.run_case(case, profiled, impls, CEILINGS, lambda *args: None, device="cpu")
    assert [(r.peak_mib, r.non_gemm_share) for r in rows] == [(12.0, 0.25)] * 2
    result = harness.Report("gpu", True, "", "tiny", "", "", {}, {}, CEILINGS, rows=rows)
    assert "| peak MiB | non-GEMM |" in report.markdown(result)
    assert "| 12 | 25% |" in report.markdown(result)
    for row in rows:
        row.peak_mib = row.non_gemm_share = None
    assert "peak MiB" not in report.markdown(result)


def test_missing_module_names_the_package_of_absent_modules_and_submodules():
    assert harness.missing_module("torch", "torch") is None
    assert harness.missing_module("torch.nn", "torch") is None
    for module in ("no_such_package_qk", "no_such_package_qk.cute"):
        assert harness.missing_module(module, "the package") == "the package is not installed"
