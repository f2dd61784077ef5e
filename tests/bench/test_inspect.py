"""The static kernel report (``qwen-kernels inspect``), as CI runs it: every Triton kernel variant
the benchmark cases launch compiles for sm_80 and sm_90a, and every kernel (Triton and the CUDA
build) keeps its registers out of local memory, uses tensor cores where it multiplies matrices
and 16-byte global loads where it streams aligned memory.

Compiling needs real Triton kernels, not the interpreter the rest of the suite runs, so the
report is made in a subprocess without ``TRITON_INTERPRET``."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from bench import sass_loop
from bench.inspect_kernels import (
    CUDA_ATTENTION_BACKWARD_STEPS,
    CUDA_ATTENTION_STEPS,
    KIND,
    cuda_attention_steps,
    cuda_library,
    padded_mma_share,
)
from qwen_kernels._backends import REGISTRY

ARCHS = ("sm_80", "sm_90a")
# Inputs whose rows start on 16-byte boundaries, per memory-bound op with a Triton kernel
# (meta tensors: the launchers run, nothing executes). A new op must add its own here.
ALIGNED_INPUTS = {
    "rms_norm": "x = t(64, 1280); args = (x, t(1280), 1e-6)",
    "add_rms_norm": "x = t(64, 1280); args = (x, t(64, 1280), t(1280), 1e-6)",
    "swiglu": "args = (t(64, 2 * 1280),)",
    "patch_merge": "args = (t(256, 1280), t(1280), 1e-6, None, 2)",
    "mrope": "args = (t(256, 16, 80), t(256, 16, 80), t(256, 80), t(256, 80), None)",
    "mrope_": "args = (t(256, 16, 80), t(256, 16, 80), t(256, 80), t(256, 80), None)",
    "mrope_pos": "args = (t(256, 16, 80), t(256, 16, 80), i(2, 256), f(20), [10, 10])",
    "mrope_pos_": "args = (t(256, 16, 80), t(256, 16, 80), i(2, 256), f(20), [10, 10])",
    "rms_norm_backward": "x = t(64, 1280); args = (t(64, 1280), x, t(1280), 1e-6, None)",
    "swiglu_backward": "args = (t(64, 1280), t(64, 2 * 1280))",
}


def _python(code: str, *argv: str, status: int = 0) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *argv],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == status, result.stderr[-4000:]
    return result.stdout


CLI = "import sys; from qwen_kernels import cli; sys.exit(cli.main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect")
    _python(
        CLI,
        "inspect",
        "--quick",
        "--arch=8.0,9.0a",
        f"--out={out}",
    )
    markdown = (out / "inspect.md").read_text()
    return json.loads((out / "inspect.json").read_text()), markdown


def triton_ops() -> list[str]:
    return sorted(op for op, table in REGISTRY.items() if "triton" in table.impls)


def test_every_triton_op_compiles_for_both_archs(report):
    rows, _ = report
    for op in triton_ops():
        if op in ("mrope_", "mrope_pos_"):  # benchmarked through their out-of-place forms
            continue
        archs = {row["arch"] for row in rows if row["op"] == op and row["backend"] == "triton"}
        assert archs == set(ARCHS), (op, archs)


def test_the_report_reads_the_cuda_build(report):
    rows, markdown = report
    if cuda_library() is None:
        pytest.skip("qwen_kernels._C is not built here")
    cuda_ops = {row["op"] for row in rows if row["backend"] == "cuda"}
    assert {"rms_norm", "add_rms_norm", "swiglu"} <= cuda_ops
    assert not any("selftest" in row["kernel"] or row["kernel"] == "mma_kernel" for row in rows)
    assert "Regenerate with `qwen-kernels inspect" in markdown


def test_no_kernel_spills(report):
    rows, _ = report
    spilling = [(r["op"], r["kernel"], r["variant"], r["arch"]) for r in rows if r["spills"]]
    assert not spilling


def test_matrix_kernels_use_tensor_cores(report):
    """fp16/bf16 GEMM and attention kernels (fp32 ones compute in fp32 on purpose; the rotary
    pre-pass of the fused op's long path and the backward's D pre-pass, a dot product per row,
    multiply no matrices)."""
    rows, _ = report
    for row in rows:
        kind = KIND.get(row["op"])
        attention = "attn" in row["kernel"] and not row["kernel"].startswith("attn_delta_kernel")
        matrix = kind == "gemm" or (kind == "attention" and attention)
        if matrix and row["dtype"] != "fp32":
            counts = row["counts"]
            assert counts["hmma"] + counts["hgmma"] > 0, (row["op"], row["kernel"], row["arch"])


def test_cuda_attention_steps_follow_the_path_a_segment_takes():
    """Windows skip 8-key tiles past the end; the long path computes whole 64-key tiles for 32
    query rows per warp (16 at head_dim 128); the backward skips on both paths."""
    assert cuda_attention_steps([64, 16], 80) == CUDA_ATTENTION_STEPS
    assert padded_mma_share([64, 16], 80, CUDA_ATTENTION_STEPS) == 1.0
    long_steps = cuda_attention_steps([130, 7], 80)
    assert long_steps == ((32, 64, 16), (32, 64, 8))
    assert cuda_attention_steps([130], 128)[0][0] == 16
    share = (130 * 130 + 7 * 7) / (160 * 192 + 32 * 64)
    assert padded_mma_share([130, 7], 80, long_steps) == pytest.approx(share)
    # The backward skips 8-key tiles and 16-row steps on both paths: 130 rows as 144, keys as 136.
    assert padded_mma_share([64, 16], 80, CUDA_ATTENTION_BACKWARD_STEPS) == 1.0
    backward = 5 * (130 * 130 + 7 * 7) / (2 * (144 * 136 + 16 * 8) + 3 * (144 * 144 + 16 * 16))
    assert padded_mma_share([130, 7], 80, CUDA_ATTENTION_BACKWARD_STEPS) == pytest.approx(backward)


def test_cuda_memory_kernels_have_a_16_byte_variant(report):
    rows, _ = report
    for op in {row["op"] for row in rows if row["backend"] == "cuda"} - set(KIND):
        assert any(r["counts"]["ldg128"] for r in rows if r["op"] == op), op


@pytest.mark.parametrize("op", [op for op in triton_ops() if op not in KIND])
def test_triton_memory_kernels_use_16_byte_loads_on_aligned_rows(op):
    assert op in ALIGNED_INPUTS, f"add aligned inputs for {op} to ALIGNED_INPUTS"
    code = """
        import json, sys, tempfile, torch
        from pathlib import Path
        from bench import inspect_kernels as ik

        t = lambda *shape: torch.empty(shape, dtype=torch.bfloat16, device="meta")
        i = lambda *shape: torch.zeros(shape, dtype=torch.int64)
        f = lambda *shape: torch.ones(shape)
        op = sys.argv[1]
        exec(sys.argv[2])
        calls = [ik.Call(op, "aligned", lambda: ik.launches_of(op, args))]
        rows = ik.triton_rows(calls, ["8.0", "9.0a"], lambda message: None)
        print(json.dumps([[row.kernel, row.arch, row.counts["ldg128"]] for row in rows]))
    """
    rows = json.loads(_python(code, op, ALIGNED_INPUTS[op]).splitlines()[-1])
    assert rows, f"{op} launched no Triton kernel"
    for kernel, arch, wide_loads in rows:
        assert wide_loads > 0, (op, kernel, arch)


def test_kernels_that_claim_a_reference_rounding_compile_without_fp_fusion(report):
    """Multiply-add contraction on a GPU would change the rotated q and k (the interpreter never
    contracts): the rotary kernels and the rotary-fused attention compile without it, and the
    report says so per variant; plain attention (also the long path of the fused op, after its
    rotary pre-pass) keeps it."""
    rows, _ = report
    triton_rows = [row for row in rows if row["backend"] == "triton"]
    assert all(row["fp_fusion"] in (True, False) for row in triton_rows)
    assert any("ROTARY=True" in row["variant"] for row in triton_rows)
    for row in triton_rows:
        rotates = (
            row["op"].startswith("mrope")
            or row["kernel"] == "_rotate_qk_kernel"
            or "ROTARY=True" in row["variant"]
        )
        assert row["fp_fusion"] is not rotates, (row["op"], row["kernel"], row["variant"])


def test_every_row_reports_its_main_loop(report):
    rows, markdown = report
    fields = {"scope", "instructions", "mma", "flop_per_warp", "instr_per_kflop", "left_out"}
    categories = {*sass_loop.CATEGORIES, *sass_loop.MUFU, "mufu_other", "other"}
    for row in rows:
        loop = row["loop"]
        assert fields | categories <= set(loop), (row["kernel"], row["arch"])
        assert sum(loop[c] for c in categories) + loop["mma"] == loop["instructions"]
        if row["counts"]["hmma"] + row["counts"]["hgmma"]:
            assert loop["mma"] > 0 and loop["instr_per_kflop"] > 0, (row["kernel"], row["arch"])
    assert "## Main loops" in markdown


def test_triton_attention_loops_do_one_tiles_products_per_warp(report):
    """QK^T and PV of one BLOCK_M x BLOCK_N tile, split over the warps: the FLOP the loop's mma
    shapes add up to, whether it is a loop over key tiles or the window path's single pass."""
    rows, _ = report
    checked = 0
    for row in rows:
        if row["kernel"] != "_window_attn_kernel" or not row["loop"]["mma"]:
            continue
        v = dict(re.findall(r"(\w+)=(\w+)", row["variant"]))
        if v["HEADS_PER_PROGRAM"] != "1":
            continue
        cols = int(v["D_MAIN"]) + int(v["D_TAIL"])
        tile = 2 * 2 * int(v["BLOCK_M"]) * int(v["BLOCK_N"]) * cols
        assert row["loop"]["flop_per_warp"] == tile // int(v["num_warps"]), row["variant"]
        assert row["loop"]["scope"] == ("kernel" if v["ONE_PASS"] == "True" else "loop")
        checked += 1
    assert checked


DOT_KERNEL = """
    import sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource


    @triton.jit
    def _dot_kernel(a_ptr, b_ptr, c_ptr, n):
        rows = tl.arange(0, 64)
        tile = rows[:, None] * 64 + rows[None, :]
        acc = tl.zeros((64, 64), tl.float32)
        for k in range(n):
            acc += tl.dot(tl.load(a_ptr + k * 4096 + tile), tl.load(b_ptr + k * 4096 + tile))
        tl.store(c_ptr + tile, acc)


    signature = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "n": "i32"}
    source = ASTSource(_dot_kernel, signature, {}, {})
    for capability, path in zip((80, 90), sys.argv[1:]):
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
        open(path, "wb").write(compiled.asm["cubin"])
"""


def test_any_cubin_is_read_the_same_way(tmp_path):
    """--cubin on Triton's cubins of a 64x64x64 bf16 product per iteration (4 warps)."""
    script = tmp_path / "dot.py"  # triton.jit reads the kernel's source from its file
    script.write_text(textwrap.dedent(DOT_KERNEL))
    cubins = [tmp_path / "dot_sm80.cubin", tmp_path / "dot_sm90a.cubin"]
    _python(
        f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')", *map(str, cubins)
    )
    for cubin, arch, mma in zip(cubins, ("sm_80", "sm_90a"), ("HMMA.16816", "HGMMA"), strict=True):
        out = tmp_path / arch
        _python(CLI, "inspect", f"--cubin={cubin}", "--kernel=_dot", f"--out={out}")
        (kernel,) = json.loads((out / "inspect.json").read_text())
        assert kernel["arch"] == arch and kernel["registers"] > 0
        loop = kernel["loop"]
        assert loop["scope"] == "loop"
        assert all(shape.startswith(mma) for shape in loop["mma_shapes"])
        assert loop["flop_per_warp"] == 2 * 64**3 // 4
        assert (
            f"qwen-kernels inspect --cubin={cubin} --kernel=_dot"
            in (out / "inspect.md").read_text()
        )
    _python(CLI, "inspect", f"--cubin={cubins[0]}", "--kernel=nothing_like_it", status=1)
    _python(CLI, "inspect", f"--cubin={cubins[0]}", status=2)  # no --kernel


def test_cubin_mode_on_the_cuda_build_agrees_with_the_report(report, tmp_path):
    rows, _ = report
    library = cuda_library()
    if library is None:
        pytest.skip("qwen_kernels._C is not built here")
    # Every sm_80 variant of the first CUDA kernel with a tensor-core main loop.
    kernel = next(r["kernel"] for r in rows if r["backend"] == "cuda" and r["loop"]["mma"])
    ours = [
        row["loop"]
        for row in rows
        if row["backend"] == "cuda" and row["kernel"] == kernel and row["arch"] == "sm_80"
    ]
    flags = [
        f"--cubin={library}",
        f"--kernel=(^|[ :]){re.escape(kernel)}<",
        "--arch=8.0",
        f"--out={tmp_path}",
    ]
    _python(CLI, "inspect", *flags)
    theirs = [k["loop"] for k in json.loads((tmp_path / "inspect.json").read_text())]
    assert sorted(map(json.dumps, theirs)) == sorted(map(json.dumps, ours))
