"""The end-to-end benchmark's dry run: every implementation runs once on tiny shapes on the CPU
and its output is checked against our eager reference; a failing implementation is reported in
its row; implementation selection, the JSON rewritten after every case; the PyTorch-only
attention swap and the GEMM kernel classifier."""

import json

import pytest
import torch
from torch import Tensor

import qwen_kernels
from bench import bench_encoder
from qwen_kernels.model import VisionConfig, VisionEncoder, random_hf_state_dict
from tests.model.reference import SMALL, random_pixels


def test_dry_run(tmp_path, capsys):
    out_file = tmp_path / "encoder.json"
    assert bench_encoder.main(["--dry-run", "--out", str(out_file)]) == 0
    assert "no timings" in capsys.readouterr().out
    rows = json.loads(out_file.read_text())["rows"]
    impls = {row["impl"] for row in rows}
    assert {"qwen/auto", "qwen/torch+compile", "transformers/sdpa+compile"} <= impls
    for row in rows:
        assert row["median_ms"] is None and row["non_gemm_share"] is None, row
        assert row["rel_err"] < bench_encoder.DRY_RUN_REL_ERR, row


def test_only_an_implementation_name_selects_it_alone(tmp_path):
    out_file = tmp_path / "encoder.json"
    assert bench_encoder.main(["--dry-run", "--only", "qwen/auto", "--out", str(out_file)]) == 0
    rows = json.loads(out_file.read_text())["rows"]
    assert {row["impl"] for row in rows} == {"qwen/auto"}  # not qwen/auto+compile


def test_json_is_rewritten_after_every_case(tmp_path, monkeypatch):
    """A run killed part-way leaves the rows of the cases it finished, marked incomplete."""
    written = []
    write = bench_encoder.Report.write

    def record(report: bench_encoder.Report, complete: bool) -> None:
        write(report, complete)
        written.append(json.loads(report.out.read_text()))

    monkeypatch.setattr(bench_encoder.Report, "write", record)
    out_file = tmp_path / "encoder.json"
    assert bench_encoder.main(["--dry-run", "--only", "qwen/auto", "--out", str(out_file)]) == 0
    # The dry run has one case: written once after it, then once more at the end.
    assert [w["complete"] for w in written] == [False, True]
    assert written[0]["rows"] == written[1]["rows"] and written[0]["rows"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.json"]


def test_failing_implementation_is_reported_in_its_row(tmp_path, monkeypatch, capsys):
    build = bench_encoder.hf_tower

    def eager_breaks(config: VisionConfig, weights: dict, attn_implementation: str):
        if attn_implementation == "eager":
            raise RuntimeError("no eager today\nsecond line")
        return build(config, weights, attn_implementation)

    monkeypatch.setattr(bench_encoder, "hf_tower", eager_breaks)
    out_file = tmp_path / "encoder.json"
    argv = ["--dry-run", "--only", "transformers/eager", "qwen/auto", "--out", str(out_file)]
    assert bench_encoder.main(argv) == 1
    assert "error: RuntimeError: no eager today" in capsys.readouterr().out
    rows = {row["impl"]: row for row in json.loads(out_file.read_text())["rows"]}
    failed = rows.pop("transformers/eager")
    assert failed["note"] == "error: RuntimeError: no eager today" and failed["rel_err"] is None
    assert "qwen/auto" in rows  # the run went on and reported the others
    for row in rows.values():
        assert row["rel_err"] < bench_encoder.DRY_RUN_REL_ERR, row


def test_varlen_attention_swap(gen, monkeypatch):
    """The PyTorch-only model with a CPU stand-in for varlen_attn (FlashAttention is CUDA only)
    gives the encoder's output: the swap keeps the weights, rotary and segments."""

    def window_attn(
        q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int
    ) -> Tensor:
        assert cu_q is cu_k and max_q == max_k
        return qwen_kernels.window_attn(q, k, v, cu_q, max_q, backend="torch")

    monkeypatch.setattr(bench_encoder, "varlen_attn", window_attn)
    weights = random_hf_state_dict(SMALL, seed=3)
    encoder = VisionEncoder.from_hf_state_dict(weights, SMALL, kernels="torch")
    grid = [(1, 6, 10), (2, 4, 8)]
    pixels = random_pixels(gen, grid)
    expected = encoder(pixels, grid)
    for block in encoder.blocks:
        block.attn = bench_encoder.VarlenAttention(block.attn)
    torch.testing.assert_close(encoder(pixels, grid), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, gemm",
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_cublas", True),
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", True),
        ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn", True),
        ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16_64x64_64x4_tn>(P)", True),
        ("triton_tem_fused_addmm_3", True),
        (
            "void pytorch_flash::flash_fwd_kernel<Traits<80, 128, 64, 4, cutlass::bfloat16_t>>(P)",
            False,
        ),
        ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(AttentionKernel<cutlass::bfloat16_t>)", False),
        ("void cutlass::device_kernel<flash::FlashAttnFwdSm90<Traits>>(P)", False),
        ("triton_poi_fused_add_mul_0", False),
        ("void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>(int)", False),
        ("Memcpy DtoD (Device -> Device)", False),
    ],
)
def test_gemm_kernel_names(name, gemm):
    assert bench_encoder.is_gemm_kernel(name) is gemm
