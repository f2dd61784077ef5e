"""The benchmark suite's dry run, as CI runs it: every case built and its byte count checked,
every implementation that runs on the CPU run once at tiny sizes, and results written that claim
no timing."""

import dataclasses
import io
import json

import pytest

from bench import harness, runner, suites
from bench.shapes import FULL, TINY
from qwen_kernels import cli
from qwen_kernels._backends import REGISTRY

TOP_KEYS = {
    "mode",
    "timed",
    "note",
    "scale",
    "command",
    "created",
    "env",
    "peers",
    "ceilings",
    "cases",
    "rows",
    "complete",
    "schema",
}
ROW_KEYS = {f.name for f in dataclasses.fields(harness.Row)}
CASE_KEYS = {f.name for f in dataclasses.fields(harness.CaseCheck)}
TIMING_KEYS = (
    "median_ms",
    "p20_ms",
    "p80_ms",
    "gbps",
    "tflops",
    "floor_ms",
    "pct_of_floor",
    "peak_mib",
    "non_gemm_share",
)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    log = io.StringIO()
    code = runner.main(
        None, quick=False, dry_run=True, out=out, command="qwen-kernels bench --dry-run", stream=log
    )
    results = json.loads((out / "results.json").read_text())
    return code, results, (out / "results.md").read_text(), log.getvalue()


def _case(results, op, name, scale="full"):
    found = [c for c in results["cases"] if (c["op"], c["case"], c["scale"]) == (op, name, scale)]
    assert len(found) == 1, (op, name, scale)
    return found[0]


def test_dry_run_passes(dry_run):
    code, _, _, log = dry_run
    assert code == 0, "\n".join(line for line in log.splitlines() if line.startswith("FAILED"))


def test_results_follow_the_schema_and_claim_no_timing(dry_run):
    _, results, _, _ = dry_run
    assert set(results) == TOP_KEYS
    assert results["schema"] == harness.SCHEMA_VERSION
    assert (results["mode"], results["timed"], results["ceilings"]) == ("dry-run", False, None)
    assert results["complete"] is True
    assert "nothing was timed" in results["note"]
    assert {"gpu", "driver", "torch", "cuda", "triton", "python"} <= set(results["env"])
    assert set(results["peers"]) == {"transformers", "liger-kernel", "flash-attn"}
    for case in results["cases"]:
        assert set(case) == CASE_KEYS
    for row in results["rows"]:
        assert set(row) == ROW_KEYS
        assert row["status"] in ("ran", "skipped"), row
        assert all(row[key] is None for key in TIMING_KEYS), row
        assert row["speedup"] == {}


def test_every_op_is_benchmarked(dry_run):
    _, results, _, _ = dry_run
    benched = set(suites.benched_ops())
    towers = {"encoder", "encoder_training", "vllm_tower"}
    assert benched | set(suites.NOT_BENCHED) == set(REGISTRY) | towers
    assert {row["op"] for row in results["rows"]} == benched
    assert {case["op"] for case in results["cases"] if case["scale"] == "full"} == benched
    # Every case has a row of our eager references, but vLLM's tower (whose rows are vLLM's, with
    # and without the plug-in; the reference is our encoder on them).
    reference_rows = {(r["op"], r["case"]) for r in results["rows"] if r["impl"] == "qwen/torch"}
    tiny_cases = {
        (c["op"], c["case"])
        for c in results["cases"]
        if c["scale"] == "tiny" and c["op"] != "vllm_tower"
    }
    assert reference_rows == tiny_cases


def test_byte_counts_match_the_tensors(dry_run):
    _, results, _, _ = dry_run
    assert {case["scale"] for case in results["cases"]} == {"full", "tiny"}
    for case in results["cases"]:
        assert case["bytes"] > 0 and case["ok"], case
        assert case["counted_bytes"] == case["bytes"], case


def test_byte_and_flop_counts_equal_an_independent_count(dry_run):
    _, results, _, _ = dry_run
    # 1288x952 px: 92x68 patches, 46x34 merge units, windows of 4x4 units: 11x8 full windows
    # (64 tokens), 11 + 8 edge windows of 2x4 units (32 tokens), 1 corner of 2x2 (16 tokens).
    tokens, windows, heads, head_dim = 92 * 68, 12 * 9, 16, 80
    image = _case(results, "window_attn", "image-1288x952/windows")
    assert image["tokens"] == tokens
    assert image["bytes"] == 4 * tokens * heads * head_dim * 2 + 4 * (windows + 1)
    assert image["flops"] == 4 * heads * head_dim * (88 * 64**2 + 19 * 32**2 + 16**2)
    norm = _case(results, "rms_norm", "T=1k")
    assert norm["bytes"] == 2 * 1024 * 1280 * 2 + 1280 * 2
    fused = _case(results, "rms_norm_swiglu", "T=4k")
    assert fused["flops"] == 2 * 4096 * 1280 * 6840
    # The 7B tower on the image: per block qkv, proj, gate, up and down; the patch embedding;
    # the merger's two matrices on a quarter of the rows; QK^T and PV of 28 window blocks and of
    # 4 blocks over the whole frame.
    hidden, inter, merged, out = 1280, 3420, 4 * 1280, 3584
    block = 3 * hidden * hidden + hidden * hidden + 3 * hidden * inter
    matrices = 2 * tokens * (32 * block + hidden * 3 * 2 * 14 * 14)
    matrices += 2 * (tokens // 4) * (merged * merged + out * merged)
    squares = 28 * (88 * 64**2 + 19 * 32**2 + 16**2) + 4 * tokens**2
    encoder = _case(results, "encoder", "image-1288x952")
    assert encoder["flops"] == matrices + 4 * hidden * squares


def test_markdown_has_every_op_and_no_times(dry_run):
    _, results, markdown, _ = dry_run
    assert "nothing was timed" in markdown
    for op in suites.benched_ops():
        assert f"\n## {op}\n" in markdown
    assert "median ms" not in markdown
    assert markdown.count("\n| ") >= len(results["rows"]) + len(results["cases"])


def test_missing_peers_are_listed_as_skipped(dry_run):
    _, results, _, _ = dry_run
    for row in results["rows"]:
        if row["impl"] == "liger" and results["peers"]["liger-kernel"] == "not installed":
            assert row["status"] == "skipped" and "not installed" in row["detail"]


def test_a_wrong_byte_count_fails_the_run():
    case = next(c for c in suites.SUITES[0].cases(FULL))
    check = harness.check_counts(dataclasses.replace(case, bytes=case.bytes + 2), "full", "meta")
    assert not check.ok and check.counted_bytes == case.bytes
    report = harness.Report("dry-run", False, "", "full", "", "", {}, {}, None, cases=[check])
    assert len(runner.failures(report)) == 1


def test_cli_dry_run_of_one_op(tmp_path, capsys):
    assert cli.main(["bench", "--dry-run", "--op", "patch_merge", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert {row["op"] for row in results["rows"]} == {"patch_merge"}
    assert results["command"] == f"qwen-kernels bench --op=patch_merge --dry-run --out={tmp_path}"
    printed = capsys.readouterr().out
    assert "[1/" in printed and "patch_merge" in printed


def test_cli_rejects_an_unknown_op(tmp_path, capsys):
    assert cli.main(["bench", "--dry-run", "--op", "no_such_op", "--out", str(tmp_path)]) == 2
    assert "no_such_op" in capsys.readouterr().err


def test_peers_that_compile_run_after_everything_else(monkeypatch):
    calls = []

    def record(case, suite, impls, ceilings, progress, device, stream):
        calls.extend(impls)
        return []

    monkeypatch.setattr(runner, "_run_or_report", record)
    work = runner._cases(suites.select(None), TINY)
    report = runner._new_report("dry-run", TINY, "test", None)
    runner._run_all(report, work, "cuda", None, io.StringIO())
    compiling = [impl.compiles for impl in calls]
    assert any(compiling) and not all(compiling)
    assert compiling == sorted(compiling), "a compiling peer ran before an uncompiled row"
