"""The end-to-end benchmark, a suite of the shared harness (its dry run is in
tests/bench/test_dry_run.py): a failing or wrong implementation is reported in its row while the
others run, the PyTorch-only attention swap keeps the model, and the GEMM kernel classifier that
the profiled share of non-GEMM time rests on."""

import pytest
import torch
from torch import Tensor

import qwen_kernels
from bench import bench_encoder, harness
from bench.shapes import TINY
from qwen_kernels.model import VisionConfig, VisionEncoder, random_hf_state_dict
from tests.model.reference import SMALL, random_pixels


@pytest.fixture
def fresh_models():
    """Models are built once per process: a test that changes how they are built starts and
    leaves the cache empty."""
    bench_encoder._model.cache_clear()
    yield
    bench_encoder._model.cache_clear()


def test_failing_and_wrong_implementations_are_reported_in_their_rows(monkeypatch, fresh_models):
    build = bench_encoder.hf_tower

    class OffByOnePerMille(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            out = self.model(*args, **kwargs)
            out.pooler_output = out.pooler_output * 1.001
            return out

    def broken(config: VisionConfig, weights: dict, attn_implementation: str):
        if attn_implementation == "eager":
            raise RuntimeError("no eager today\nsecond line")
        return OffByOnePerMille(build(config, weights, attn_implementation))

    monkeypatch.setattr(bench_encoder, "hf_tower", broken)
    case = next(c for c in bench_encoder.cases(TINY) if c.series == "real")
    wanted = ("qwen/torch", "qwen/auto", "transformers/eager", "transformers/sdpa")
    impls = [i for i in harness.impls_for(case, bench_encoder.SUITE, "cpu") if i.name in wanted]
    rows = harness.run_case(case, bench_encoder.SUITE, impls, None, lambda *a: None, "cpu")
    by_name = {row.impl: row for row in rows}
    assert by_name["transformers/eager"].status == "error"
    assert by_name["transformers/eager"].detail == "RuntimeError: no eager today"
    assert by_name["transformers/sdpa"].status == "mismatch"
    assert by_name["transformers/sdpa"].rel_err == pytest.approx(1e-3, rel=0.01)
    for name in ("qwen/torch", "qwen/auto"):  # the run went on
        assert by_name[name].status == "ran"
        assert by_name[name].rel_err < bench_encoder.DRY_RUN_REL_ERR


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
    assert harness.is_gemm_kernel(name) is gemm
