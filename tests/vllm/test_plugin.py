"""The vLLM plug-in on vLLM 0.33's own Qwen2.5-VL vision tower, on the CPU: with the plug-in on,
the tower gives transformers' output on every backend this machine runs (torch, the Triton
interpreter, the CUDA emulation), images and a video, and the qwen ops are the code that ran
(counted, with their backends); off, nothing changes; tensor parallelism 2 over two gloo
processes; idempotent registration through the entry point; unknown vLLM releases refused."""

import json
import socket
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
import vllm
from vllm.model_executor.models import qwen2_5_vl

import qwen_kernels
import qwen_kernels.vllm as plugin
from bench.bench_host import CountQwenOps
from qwen_kernels.model.config import KernelConfig
from tests.helpers import rel_err

from . import towers

# fp32 on both sides: each block rounds a few intermediate results (unit roundoff 6e-8) and the
# two towers sum over rows of up to 224 terms in different orders, which leaves about 3e-7 over 4
# blocks (vLLM's own tower matches transformers' to 2e-7); a 1e-3 error in one op's output is 5000
# times larger than this bound (test_a_wrong_op_is_caught).
FP32_TOL = 2e-6
# Every backend the tower's ops can run on the CPU here; a missing one fails, it is not skipped.
BACKENDS = ["torch", "triton", "cuda_emu"]
GRIDS = {"images": towers.IMAGES, "video": towers.VIDEO, "both": towers.IMAGES + towers.VIDEO}


@pytest.fixture(scope="module")
def world():
    with plugin.standalone_world():
        yield


@pytest.fixture(scope="module")
def reference():
    return towers.hf_tower()


@pytest.fixture
def plugin_env(monkeypatch):
    """Sets QK_VLLM and registers through the installed entry point; the tower class and the
    plug-in's state are restored afterwards."""
    tower_class = qwen2_5_vl.Qwen2_5_VisionTransformer
    monkeypatch.setattr(tower_class, "__init__", tower_class.__init__)
    monkeypatch.setattr(plugin._State, "kernels", None)
    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "qwen_kernels"]

    def register(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(plugin.ENV, raising=False)
        else:
            monkeypatch.setenv(plugin.ENV, value)
        entry.load()()

    return register


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(tower, grids, seed=7):
    px = towers.pixels(grids, seed)
    with CountQwenOps() as counter:
        out = towers.vllm_forward(tower, px, grids)
    return out, px, counter


def _expected_counts(kernels: KernelConfig) -> dict[str, int]:
    counts = {"rms_norm": 0, "add_rms_norm": 0, "swiglu": 0, "patch_merge": 1}
    for index in range(towers.VISION.depth):
        layer = kernels.for_layer(index)
        for op in ("rms_norm", "add_rms_norm", "swiglu"):
            counts[op] += 1
        ops = ("window_attn_rope",) if layer.rotary_fused else ("mrope_", "window_attn")
        for op in ops:
            counts[op] = counts.get(op, 0) + 1
    return counts


def test_entry_point_is_installed():
    plugins = entry_points(group="vllm.general_plugins")
    assert [e.value for e in plugins if e.name == "qwen_kernels"] == ["qwen_kernels.vllm:register"]


def test_off_changes_nothing(world, reference, plugin_env):
    before = qwen2_5_vl.Qwen2_5_VisionTransformer.__init__
    plugin_env(None)
    assert qwen2_5_vl.Qwen2_5_VisionTransformer.__init__ is before
    tower = towers.vllm_tower(reference)
    assert "forward" not in vars(tower)
    grids = GRIDS["both"]
    out, px, counter = _run(tower, grids)
    assert not counter.counts, "the plug-in is off, yet qwen ops ran"
    assert rel_err(out, towers.hf_forward(reference, px, grids)) < FP32_TOL


@pytest.mark.parametrize("grids", GRIDS.values(), ids=GRIDS.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_plugin_matches_transformers(world, reference, plugin_env, backend, grids):
    plugin_env(backend)
    tower = towers.vllm_tower(reference)
    out, px, counter = _run(tower, grids)
    expected = towers.hf_forward(reference, px, grids)
    assert out.shape == expected.shape
    assert rel_err(out, expected) < FP32_TOL
    kernels = KernelConfig.uniform(backend)
    assert dict(counter.counts) == _expected_counts(kernels)
    assert {b for _, b in counter.backends} == {backend}


def test_unfused_rotary_and_layer_overrides_from_json(world, reference, plugin_env, tmp_path):
    """A JSON KernelConfig: the rotary apart (qwen.mrope_ with cos/sin tables) on one backend,
    one block overridden to another."""
    fields = {"fuse_rotary": False, "norm": "torch", "layers": {"2": {"attention": "triton"}}}
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps(fields))
    plugin_env(str(path))
    tower = towers.vllm_tower(reference)
    grids = GRIDS["both"]
    out, px, counter = _run(tower, grids)
    assert rel_err(out, towers.hf_forward(reference, px, grids)) < FP32_TOL
    kernels = KernelConfig.coerce(fields)
    assert dict(counter.counts) == _expected_counts(kernels)
    assert counter.backends["mrope_", "auto"] == towers.VISION.depth
    assert counter.backends["window_attn", "triton"] == 1
    assert counter.backends["rms_norm", "torch"] == towers.VISION.depth


@pytest.mark.parametrize("op", ["window_attn_rope", "swiglu", "add_rms_norm", "patch_merge"])
def test_a_wrong_op_is_caught(world, reference, plugin_env, monkeypatch, op):
    """An op whose output is off by 1e-3 fails the comparison: FP32_TOL is tight enough."""
    right = getattr(qwen_kernels, op)

    def wrong(*args, **kwargs):
        out = right(*args, **kwargs)
        return tuple(o * 1.001 for o in out) if isinstance(out, tuple) else out * 1.001

    monkeypatch.setattr(qwen_kernels, op, wrong)
    plugin_env("torch")
    tower = towers.vllm_tower(reference)
    grids = GRIDS["images"]
    out, px, _ = _run(tower, grids)
    assert rel_err(out, towers.hf_forward(reference, px, grids)) > FP32_TOL


def test_registration_is_idempotent(world, reference, plugin_env):
    plugin_env("torch")
    wrapped = qwen2_5_vl.Qwen2_5_VisionTransformer.__init__
    plugin_env("torch")
    assert qwen2_5_vl.Qwen2_5_VisionTransformer.__init__ is wrapped
    tower = towers.vllm_tower(reference)
    _, _, counter = _run(tower, GRIDS["images"])
    assert counter.counts["patch_merge"] == 1
    with pytest.raises(ValueError, match="already patched"):
        plugin.patch_vision_tower(tower, towers.VISION, "torch")


def test_the_cuda_graph_path_runs_vllms_tower(world, reference, plugin_env):
    """Metadata without grid_thw (vLLM's encoder CUDA-graph replay) goes to vLLM's forward."""
    plugin_env("torch")
    tower = towers.vllm_tower(reference)
    grids = GRIDS["images"]
    px = towers.pixels(grids, 3)
    metadata = tower.prepare_encoder_metadata([list(g) for g in grids])
    with CountQwenOps() as counter, torch.no_grad():
        out = tower(px, None, encoder_metadata=metadata)
    assert not counter.counts
    assert rel_err(out, towers.hf_forward(reference, px, grids)) < FP32_TOL


def test_unknown_vllm_release_is_refused(plugin_env, monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    with pytest.raises(RuntimeError, match=r"vLLM 0\.34\.0 is not supported .*>=0\.33, <0\.34"):
        plugin_env("auto")
    assert not getattr(qwen2_5_vl.Qwen2_5_VisionTransformer.__init__, plugin._MARK, False)


def test_bad_kernel_choice_is_refused(plugin_env):
    with pytest.raises(ValueError, match="QK_VLLM='tpu'"):
        plugin_env("tpu")


def test_tensor_parallel_2(tmp_path, reference):
    """Two gloo ranks, one head each: both give transformers' output through the qwen ops."""
    import torch.multiprocessing as mp

    port = _free_port()
    mp.start_processes(
        towers.tensor_parallel_rank, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    grids = GRIDS["both"]
    expected = towers.hf_forward(reference, towers.pixels(grids, 11), grids)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["heads"] == towers.VISION.num_heads // 2
        assert result["counts"]["window_attn_rope"] == towers.VISION.depth
        assert rel_err(result["out"], expected) < FP32_TOL


def test_benchmark_dry_run(tmp_path):
    """bench/bench_vllm.py's dry run: both towers run once on the CPU and match the reference."""
    command = [sys.executable, "-m", "qwen_kernels", "bench", "--dry-run", "--op", "vllm_tower"]
    run = subprocess.run(
        [*command, "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert sorted(row["impl"] for row in rows) == sorted(["vllm", "vllm+qwen/auto"] * 2)
    assert all(row["status"] == "ran" for row in rows), rows
