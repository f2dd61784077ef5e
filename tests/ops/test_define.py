"""The op layer's one declaration per op (``qwen_kernels/ops/_define.py``): every public function
has its op's schema for a signature and a docstring; calls are memoised by a key derived from the
schema (every tensor's dtype, shape, strides and device), failures are never remembered, value
checks run on every call, and registering an implementation forgets what was resolved."""

import importlib
import inspect

import pytest
import torch

import qwen_kernels
from qwen_kernels._backends import REGISTRY
from qwen_kernels.ops.rms_norm import rms_norm_reference
from tests.helpers import assert_close_to_reference, randn, targets

EPS = 1e-6


@pytest.mark.parametrize("op", sorted(REGISTRY))
def test_public_function_has_the_op_schema(op):
    public = getattr(qwen_kernels, op)
    schema = getattr(torch.ops.qwen, op).default._schema
    parameters = inspect.signature(public).parameters
    assert list(parameters) == [arg.name for arg in schema.arguments]
    for arg in schema.arguments:
        default = parameters[arg.name].default
        expected = arg.default_value if arg.has_default_value() else inspect.Parameter.empty
        assert default == expected, (arg.name, default, expected)
    assert parameters["backend"].default == "auto"
    assert public.__doc__ and public.__doc__.strip()
    assert public.__module__ == "qwen_kernels"


def test_the_memo_key_holds_strides(gen):
    """A strided view and a contiguous copy of it resolve separately (kernels may depend on
    alignment); both keys hold the tensors' dtype, shape, strides and device."""
    table = REGISTRY["rms_norm"]
    table.resolved.clear()
    wide, weight = randn(gen, 6, 2 * 40), randn(gen, 40)
    for x in (wide[:, ::2], wide[:, ::2].contiguous()):
        qwen_kernels.rms_norm(x, weight, EPS, backend="torch")
    keys = list(table.resolved)
    assert len(keys) == 2
    assert {key[3] for key in keys} == {(80, 2), (40, 1)}
    assert keys[0][:3] == ("torch", torch.float32, torch.Size([6, 40]))


def test_failures_are_not_remembered_and_values_are_checked_every_call(gen):
    q = k = v = randn(gen, 8, 2, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    for _ in range(2):
        with pytest.raises(ValueError, match="`max_seqlen` must be a positive int"):
            qwen_kernels.window_attn(q, k, v, cu, 0)
    qwen_kernels.window_attn(q, k, v, cu, 5)
    # The same signature with cu_seqlens values that do not end at T.
    with pytest.raises(ValueError, match="ending at T = 8"):
        qwen_kernels.window_attn(q, k, v, torch.tensor([0, 3, 7], dtype=torch.int32), 5)


def test_register_forgets_resolved_signatures(gen):
    table = REGISTRY["swiglu"]
    gate_up = randn(gen, 4, 32)
    first = qwen_kernels.swiglu(gate_up, backend="torch")
    reference = table.impls["torch"]
    marked = torch.full_like(first, 7.0)
    try:
        table.register("torch", lambda t: marked)
        assert torch.equal(qwen_kernels.swiglu(gate_up, backend="torch"), marked)
    finally:
        table.register("torch", reference)
    torch.testing.assert_close(qwen_kernels.swiglu(gate_up, backend="torch"), first)


@pytest.mark.parametrize(("backend", "device"), targets("rms_norm"))
def test_strided_views_and_contiguous_inputs_in_turn(gen, backend, device):
    """A kernel backend gives right results for a strided view and a contiguous tensor of the
    same shape, called in turn (each under its own memo key)."""
    dtype = torch.bfloat16
    wide = randn(gen, 6, 2 * 40, dtype=dtype).to(device)
    x_strided, x_contiguous = wide[:, ::2], wide[:, ::2].contiguous()
    weight = randn(gen, 40, dtype=dtype).to(device)
    for x in (x_contiguous, x_strided, x_contiguous):
        out = qwen_kernels.rms_norm(x, weight, EPS, backend=backend)
        ref64 = rms_norm_reference(x.cpu().double(), weight.cpu().double(), EPS)
        eager = rms_norm_reference(x.cpu(), weight.cpu(), EPS)
        assert_close_to_reference(out.cpu(), ref64, eager)


def test_triton_launchers_run_on_the_inputs_device(monkeypatch):
    """Every Triton launcher the op layer loads runs under the device of its inputs (a stand-in
    device context records it; the inputs are fake tensors on cuda:1 while cuda:0 is current),
    and under no guard for CPU tensors or the current device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    backends = importlib.import_module("qwen_kernels._backends")
    entered, ran = [], []

    class RecordingDevice:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guarded = backends.on_inputs_device(lambda *args: ran.append(len(entered)))
    with FakeTensorMode():
        other, current = torch.empty(2, device="cuda:1"), torch.empty(2, device="cuda:0")
    guarded(other, 3)
    assert entered == [torch.device("cuda:1")] and ran == [1]
    guarded(current)
    guarded(torch.ones(2))
    assert len(entered) == 1 and ran == [1, 1, 1]
    table = REGISTRY["swiglu"]
    pytest.importorskip("triton")
    assert (
        table._load("triton").__wrapped__
        is importlib.import_module("qwen_kernels.triton_kernels.swiglu").swiglu
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", sorted(REGISTRY))
def test_checks_off_never_sync(op, backend):
    """Inside skip_value_checks() no op makes a host sync (sync debug mode "error"), on each
    series' tiny case of the benchmarks."""
    from bench.harness import Maker
    from bench.sanitize_cases import cases_for

    if backend not in REGISTRY[op].usable("cuda"):
        pytest.skip(f"{op} has no usable {backend} kernel here")
    public = getattr(qwen_kernels, op)
    for case in cases_for(op):
        inputs = case.build(Maker("cuda", seed=0))
        args = [inputs[name] for name in case.args]
        public(*args, backend=backend)  # resolve outside the check
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with qwen_kernels.skip_value_checks():
                public(*args, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
