"""The installed package: every op registered under torch.ops.qwen, the backend report, the
`qwen-kernels info` command and, where it was built, the archs inside qwen_kernels._C."""

import os
import shutil
import subprocess

import pytest
import torch

import qwen_kernels
from qwen_kernels import cli
from qwen_kernels._backends import archs_run_on, cuda_extension_error

OPS = [
    "window_attn",
    "window_attn_rope",
    "mrope",
    "mrope_",
    "mrope_pos",
    "mrope_pos_",
    "rms_norm",
    "add_rms_norm",
    "swiglu",
    "rms_norm_swiglu",
    "patch_merge",
    # What autograd runs: the training forwards and the backward ops.
    "window_attn_forward",
    "window_attn_rope_forward",
    "window_attn_backward",
    "rms_norm_backward",
    "swiglu_backward",
]


@pytest.mark.parametrize("op", OPS)
def test_op_is_registered_with_docstring(op):
    assert hasattr(torch.ops.qwen, op)
    schema = str(getattr(torch.ops.qwen, op).default._schema)
    assert 'str backend="auto"' in schema, schema
    wrapper = getattr(qwen_kernels, op)
    assert wrapper.__doc__ and len(wrapper.__doc__) > 40


def test_schemas_match_the_contract():
    schema = str(torch.ops.qwen.window_attn.default._schema)
    # SymInt: torch.compile keeps the longest segment symbolic (one graph for every grid).
    assert "Tensor cu_seqlens, SymInt max_seqlen, float? softmax_scale=None" in schema
    assert "int[]? mrope_section=None" in str(torch.ops.qwen.mrope.default._schema)
    assert "Tensor? unit_index=None" in str(torch.ops.qwen.patch_merge.default._schema)
    assert "Tensor(a!) q, Tensor(b!) k" in str(torch.ops.qwen.mrope_pos_.default._schema)


def test_available_backends_lists_every_op_with_torch():
    backends = qwen_kernels.available_backends()
    assert set(backends) == set(OPS)
    for op, names in backends.items():
        assert names[0] == "torch", op


def test_subpackages_live_in_the_namespace():
    import qwen_kernels.model
    import qwen_kernels.triton_kernels

    assert qwen_kernels.model.__name__ == "qwen_kernels.model"
    assert qwen_kernels.triton_kernels.__name__ == "qwen_kernels.triton_kernels"


def test_the_benchmarks_and_tools_are_not_installed():
    """The wheel holds the ops, the kernels, the model and the CLI; the benchmarks, the host
    benchmark and the inspector stay tools of the checkout (``bench/``)."""
    import ast
    import importlib.util
    from pathlib import Path

    setup = Path(__file__).resolve().parent.parent / "setup.py"
    if not setup.is_file():
        pytest.skip("not a checkout")
    assert importlib.util.find_spec("qwen_kernels.bench") is None
    assignments = [
        node for node in ast.parse(setup.read_text()).body if isinstance(node, ast.Assign)
    ]
    package_dir = next(
        ast.literal_eval(node.value) for node in assignments if node.targets[0].id == "PACKAGE_DIR"
    )
    assert sorted(package_dir.values()) == ["model", "qwen_kernels", "triton_kernels"]


def test_info_command_prints_the_report(capsys):
    assert cli.main(["info"]) == 0
    printed = capsys.readouterr().out
    for key in ("torch", "triton", "nvcc", "GPUs", "qwen_kernels._C archs", "window_attn"):
        assert key in printed


def test_info_report_names_every_backend():
    report = cli.info_report()
    assert set(report["backends"]) == set(OPS)
    assert report["backends"]["rms_norm"]["torch"] == "yes"


def _find_cuobjdump() -> str:
    """cuobjdump from PATH, the CUDA toolkit, or the copy that Triton ships."""
    import triton

    candidates = [
        shutil.which("cuobjdump"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
        os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"),
    ]
    found = [c for c in candidates if c and os.path.exists(c)]
    if not found:
        pytest.skip("no cuobjdump to list the device code with")
    return found[0]


def _cuda_build_expected() -> bool:
    """setup.py builds _C where nvcc and a CUDA build of torch exist, unless told not to."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    has_nvcc = shutil.which("nvcc") or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    return (
        bool(has_nvcc) and torch.version.cuda is not None and os.environ.get("QK_BUILD_CUDA") != "0"
    )


@pytest.mark.skipif(not _cuda_build_expected(), reason="no CUDA toolkit: _C is not built here")
def test_cuda_extension_is_built_where_nvcc_exists():
    assert cuda_extension_error() is None


@pytest.mark.skipif(cuda_extension_error() is not None, reason="qwen_kernels._C was not built")
def test_cuda_extension_holds_the_archs_it_reports():
    import qwen_kernels._C as ext

    archs = torch.ops.qwen_cuda.build_info().split(";")
    cuobjdump = _find_cuobjdump()
    result = subprocess.run(
        [cuobjdump, "--list-elf", ext.__file__], capture_output=True, text=True, check=False
    )
    listed = result.stdout + result.stderr
    for arch in archs:
        # Older cuobjdump versions print an sm_90a cubin as sm_90.
        assert f"sm_{arch.replace('.', '').rstrip('a')}" in listed, (arch, listed)
    if os.environ.get("QK_CUDA_ARCHS") is None:  # the default build covers Ampere and Hopper
        assert {"8.0", "9.0a"} <= set(archs), archs


@pytest.mark.parametrize(
    ("device", "archs", "runs"),
    [
        (90, ["8.0", "8.6", "8.9", "9.0a"], True),  # sm_90a machine code
        (86, ["8.0", "9.0a"], True),  # sm_80 machine code runs on later Ampere minors
        (120, ["8.0", "9.0a"], True),  # PTX of sm_80, compiled by the driver
        (100, ["9.0a"], False),  # "a" code is for that chip alone, and there is no PTX
        (80, ["8.6"], False),  # older than everything built
        (75, ["8.0", "9.0a"], False),
    ],
)
def test_archs_run_on(device, archs, runs):
    assert archs_run_on(device, archs) is runs


def test_demo_subcommand_hands_its_arguments_to_the_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "qwen-kernels demo" in printed and "--image" in printed and "--backends" in printed
