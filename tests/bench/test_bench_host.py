"""The host-cost benchmark in its tiny mode: it runs on the CPU, prints a row per op and per
forward, and the forwards make the qwen op calls they should (no timing is asserted)."""

import math

from bench import bench_host


def test_tiny_mode_prints_every_row(capsys):
    assert bench_host.main(["--tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ops = {
        line.split()[0]: line.split()[1:]
        for line in lines
        if line.split()[:1] and line.split()[0] in bench_host.op_cases("cpu")
    }
    assert set(ops) == set(bench_host.op_cases("cpu"))
    for cells in ops.values():
        values = [float(c) for c in cells]
        # Times per call (bare, torch, auto, auto skip), then the three differences to the bare
        # op, which noise can make negative.
        assert len(values) == 7 and all(math.isfinite(v) for v in values)
        assert all(v > 0 for v in values[:4])
    forwards = [line for line in lines if line.startswith(("56x56", "112x112"))]
    calls = {}
    for line in forwards:
        image, rest = line[:11].strip(), line[11:]
        impl, numbers = rest[:28].strip(), rest[28:].split()
        assert float(numbers[0]) > 0 and numbers[1] == "nan"
        calls[image, impl] = int(numbers[2])
    depth = 4
    # Two norms, rotary-fused attention and SwiGLU per block; the merge.
    per_forward = 4 * depth + 1
    for image in ("56x56", "112x112"):
        assert calls[image, "VisionEncoder torch"] == per_forward
        assert calls[image, "VisionEncoder auto"] == per_forward
        assert calls[image, "transformers patched auto"] == per_forward
        assert calls[image, "transformers sdpa"] == 0
