"""The end-to-end benchmark's dry run: every implementation runs once on tiny shapes on the CPU
and its output is checked against our eager reference."""

import json

from bench import bench_encoder


def test_dry_run(tmp_path, capsys):
    out_file = tmp_path / "encoder.json"
    assert bench_encoder.main(["--dry-run", "--out", str(out_file)]) == 0
    assert "no timings" in capsys.readouterr().out
    rows = json.loads(out_file.read_text())["rows"]
    impls = {row["impl"] for row in rows}
    assert {"qwen/auto", "qwen/torch+compile", "transformers/sdpa+compile"} <= impls
    for row in rows:
        assert row["median_ms"] is None and row["rel_err"] < bench_encoder.DRY_RUN_REL_ERR, row
