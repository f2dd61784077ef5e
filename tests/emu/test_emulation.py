"""The CUDA emulation layer (csrc/emu), through the self-test kernels of csrc/emu_selftest.

Every test runs the emulated kernels (``torch.ops.qwen_emu``, CPU tensors). The ``gpu`` variants
run the same kernels built by nvcc (``torch.ops.qwen_cuda``) against the same expectations, so the
emulated fragment layouts and warp collectives are checked against the hardware. Expected values
follow the documented semantics (PTX ISA, CUDA programming guide), written out here independently
of the emulation's code.
"""

from __future__ import annotations

import functools
import operator
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from qwen_kernels import _emu

SELFTEST_SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "emu_selftest" / "selftest.cu"


@pytest.fixture(scope="module")
def emu_ops() -> Any:
    if not _emu.is_available():
        pytest.skip("the CUDA emulation needs a C++20 compiler and the csrc/ sources")
    return _emu.load()


@functools.cache
def _gpu_selftest_ops() -> Any:
    """The self-test kernels built by nvcc for this GPU, as an extension of their own: they are
    not part of the shipped qwen_kernels._C."""
    from torch.utils import cpp_extension

    major, minor = torch.cuda.get_device_capability()
    csrc = SELFTEST_SOURCE.parents[1]
    cpp_extension.load(
        name="qwen_kernels_selftest",
        sources=[str(p) for p in sorted(SELFTEST_SOURCE.parent.glob("*.c*"))],
        extra_cflags=["-std=c++20", "-DQK_OPS_NAMESPACE=qwen_selftest"],
        extra_cuda_cflags=[
            "-std=c++20",
            "-DQK_OPS_NAMESPACE=qwen_selftest",
            f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}",
        ],
        extra_include_paths=[str(csrc)],
        is_python_module=False,
    )
    return torch.ops.qwen_selftest


@pytest.fixture(params=["emu", pytest.param("cuda", marks=pytest.mark.gpu)])
def target(request) -> tuple[Any, torch.device]:
    """(op namespace, device) of the build under test."""
    if request.param == "emu":
        return request.getfixturevalue("emu_ops"), torch.device("cpu")
    return _gpu_selftest_ops(), torch.device("cuda")


def _as_u32(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().to(torch.int64) & 0xFFFFFFFF


def test_conversions_round_to_nearest_even(target, gen):
    ops, device = target
    # Signed zeros, inf, NaN, fp16 overflow and subnormals, fp32 subnormals, ties to even.
    specials = [
        0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65519.99, 65520.0, 3.4e38,
        2.0**-25, 2.0**-24 * 1.5, 2.0**-24 * 2.5, 6e-5, 1e-40,
        1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8,
    ]  # fmt: skip
    scaled = torch.randn(2, 1000, generator=gen) * torch.tensor([[1e3], [1e-5]])
    x = torch.cat([torch.tensor(specials), scaled.flatten()])
    h, b, hf, bf = ops.selftest_convert(x.to(device))
    h, b, hf, bf = h.cpu(), b.cpu(), hf.cpu(), bf.cpu()
    for got, want in ((h, x.half()), (b, x.bfloat16())):
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    torch.testing.assert_close(hf, x.half().float(), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(bf, x.bfloat16().float(), equal_nan=True, rtol=0, atol=0)


def test_ex2_approx_ftz_within_two_ulp_and_flushing_subnormals(target, gen):
    """ex2.approx.ftz.f32: within 2 ulp of 2^x (the CUDA C Programming Guide's exp2f bound, the
    same instruction), exact at the specials, subnormal inputs read as 0 and subnormal results
    flushed to +0. The emulation rounds 2^x to nearest; the hardware may differ by those 2 ulp."""
    ops, device = target
    specials = [0.0, -0.0, 1.0, -1.0, 10.0, -126.0, 127.0, 128.0, -150.0, 1e-40, -1e-40]
    specials += [float("inf"), float("-inf"), float("nan")]
    x = torch.cat([torch.tensor(specials), torch.rand(4000, generator=gen) * 250 - 125])
    got = ops.selftest_ex2(x.to(device)).cpu()
    exact = torch.exp2(x.double())
    want = [1.0, 1.0, 2.0, 0.5, 1024.0, 2.0**-126, 2.0**127, float("inf"), 0.0, 1.0, 1.0]
    assert got[:11].tolist() == want
    assert got[11] == float("inf") and got[12] == 0.0 and torch.isnan(got[13])
    ulp = torch.exp2(torch.floor(torch.log2(exact[14:])) - 23)
    assert ((got[14:].double() - exact[14:]).abs() <= 2 * ulp).all()
    if device.type == "cpu":  # the emulation's own choice: rounded to nearest
        assert torch.equal(got[14:], exact[14:].float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_m16n8k16_matches_matmul(target, dtype, gen):
    ops, device = target
    a = torch.randn(32, 48, generator=gen).to(dtype)
    b = torch.randn(16, 48, generator=gen).to(dtype)
    c = torch.randn(32, 16, generator=gen)
    d = ops.selftest_mma(a.to(device), b.to(device), c.to(device)).cpu()
    ref = a.double() @ b.double().T + c.double()
    # Products are exact; tensor cores add in fp32 with their own rounding. A wrong fragment
    # layout is off by O(1).
    torch.testing.assert_close(d.double(), ref, rtol=1e-4, atol=1e-3)


def _ldmatrix_reference(src: torch.Tensor, num: int, trans: bool) -> torch.Tensor:
    """PTX ISA: lane 4g + t gets elements (g, 2t), (g, 2t+1) of matrix i (transposed: (2t, g),
    (2t+1, g)) in register i, the first in the low half."""
    m = src.to(torch.int64).view(num, 8, 8) & 0xFFFF
    if trans:
        m = m.transpose(1, 2)
    out = torch.empty(32, num, dtype=torch.int64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i in range(num):
            out[lane, i] = m[i, g, 2 * t] | m[i, g, 2 * t + 1] << 16
    return out


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("num", [1, 2, 4])
def test_ldmatrix_fragment_layout(target, num, trans, gen):
    ops, device = target
    src = torch.randint(-(2**15), 2**15, (8 * num, 8), generator=gen, dtype=torch.int16)
    out = ops.selftest_ldmatrix(src.to(device), num, trans)
    assert torch.equal(_as_u32(out), _ldmatrix_reference(src, num, trans))


# (mode, arg, width); mode 0: __shfl_sync from lane (lane * arg + 3) % 64, 1: up, 2: down, 3: xor.
SHUFFLES = [
    (0, 1, 32), (0, 7, 32), (0, 5, 16), (0, 3, 8), (0, 11, 4), (0, 0, 1),
    (1, 1, 32), (1, 3, 16), (1, 2, 8), (1, 5, 4),
    (2, 1, 32), (2, 4, 16), (2, 3, 8), (2, 1, 2),
    (3, 1, 32), (3, 16, 32), (3, 5, 8), (3, 8, 4), (3, 2, 2),
]  # fmt: skip


def _shuffle_source(lane: int, mode: int, arg: int, width: int) -> int:
    """The lane read, per the CUDA programming guide: within segments of `width` lanes; up/down
    past the segment's edge read their own value; xor may read earlier segments, not later ones."""
    start = lane // width * width
    if mode == 0:
        return start + (lane * arg + 3) % 64 % width
    if mode == 1:
        return lane - arg if lane - start >= arg else lane
    if mode == 2:
        return lane + arg if lane - start + arg < width else lane
    return lane ^ arg if (lane ^ arg) < start + width else lane


def test_shuffles_with_widths(target, gen):
    ops, device = target
    n = 64
    x = torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int32)
    table = torch.tensor(SHUFFLES, dtype=torch.int32)
    out32, out64 = ops.selftest_shuffle(x.to(device), table.to(device))
    wide = x.to(torch.int64) << 32 | (~x).to(torch.int64) & 0xFFFFFFFF
    for row, (mode, arg, width) in enumerate(SHUFFLES):
        src = [t // 32 * 32 + _shuffle_source(t % 32, mode, arg, width) for t in range(n)]
        assert torch.equal(out32[row].cpu(), x[src]), (mode, arg, width)
        assert torch.equal(out64[row].cpu(), wide[src]), (mode, arg, width)


@pytest.mark.parametrize("active", [96, 70, 33, 0])
def test_votes_with_exited_lanes(target, active, gen):
    ops, device = target
    n = 96
    pred = torch.randint(-3, 3, (n,), generator=gen, dtype=torch.int32)
    pred[32:64] = 5  # a warp where every lane votes true
    out = ops.selftest_vote(pred.to(device), active).cpu()
    # Threads from `active` on exit first: they keep the poison -7, and their lanes drop out of
    # the masks of the others.
    expected = torch.full((3, n), -7, dtype=torch.int32)
    for warp in range(n // 32):
        lanes = range(warp * 32, min(active, warp * 32 + 32))
        mask = sum(1 << (t % 32) for t in lanes)
        ballot = sum(1 << (t % 32) for t in lanes if pred[t] != 0)
        ballot_i32 = ballot - (1 << 32) if ballot >= 1 << 31 else ballot
        for t in lanes:
            expected[:, t] = torch.tensor([ballot_i32, ballot != 0, ballot == mask])
    assert torch.equal(out, expected)


def test_atomics(target, gen):
    ops, device = target
    n = 1000
    xf = torch.randn(n, generator=gen)
    xi = torch.randint(-1000, 1000, (n,), generator=gen, dtype=torch.int32)
    fout, iout = ops.selftest_atomics(xf.to(device), xi.to(device))
    fout, iout = fout.cpu(), iout.cpu()
    bins = torch.stack([xf[i::8].double().sum() for i in range(8)])
    torch.testing.assert_close(fout[:8].double(), bins, rtol=1e-5, atol=1e-4)
    assert fout[8] == xf.max()
    values = xi.tolist()
    bits_or = functools.reduce(operator.or_, values)
    bits_xor = functools.reduce(operator.xor, values)
    assert iout[:6].tolist() == [sum(values), max(values), min(values), bits_or, bits_xor, n]
    assert 0 <= iout[6] < n  # the index of whichever thread exchanged last


def test_block_reduction_with_shared_memory_and_shuffles(target, gen):
    ops, device = target
    n = 5000
    x = torch.randn(n, generator=gen)
    sums, positive = ops.selftest_block_sum(x.to(device))
    padded = torch.cat([x, torch.zeros(5 * 1024 - n)]).view(5, 4, 256)
    partial = padded[:, 0] + padded[:, 1] + padded[:, 2] + padded[:, 3]
    expected = padded.double().sum((1, 2))
    torch.testing.assert_close(sums.cpu().double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(positive.cpu(), (partial > 0).sum(1).to(torch.int32))


@pytest.mark.parametrize("valid_rows", [64, 40])
def test_cp_async_pipeline(target, valid_rows, gen):
    ops, device = target
    x = torch.randn(64, 32, generator=gen)
    out = ops.selftest_cp_async(x.to(device), valid_rows, True).cpu()
    expected = x.clone()
    expected[valid_rows:] = 0
    assert torch.equal(out, expected)


def test_gemm_with_cp_async_ldmatrix_and_mma(target, gen):
    ops, device = target
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randn(64, 96, generator=gen).to(dtype)
        b = torch.randn(32, 96, generator=gen).to(dtype)
        ref = a.double() @ b.double().T
        nk = ops.selftest_gemm(a.to(device), b.to(device), False).cpu()
        kn = ops.selftest_gemm(a.to(device), b.T.contiguous().to(device), True).cpu()
        torch.testing.assert_close(nk.double(), ref, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(kn.double(), ref, rtol=1e-4, atol=1e-3)


def test_many_barriers(target, gen):
    ops, device = target
    x = torch.randn(3, 128, generator=gen)
    out = ops.selftest_barriers(x.flatten().to(device), 10).cpu()
    expected = x
    for _ in range(10):
        expected = expected + expected.roll(-1, dims=1)
    assert torch.equal(out, expected.flatten())


def test_shared_memory_exchange_with_barrier(target, gen):
    ops, device = target
    x = torch.randn(256, generator=gen)
    out = ops.selftest_race(x.to(device), True).cpu()
    assert torch.equal(out, x.view(2, 128).roll(-32, dims=1).flatten())


def test_missing_barrier_gives_wrong_result(emu_ops, gen):
    """Threads interleave under the emulation: without the __syncthreads() a thread reads another
    warp's slot before that warp wrote it, and dynamic shared memory starts as NaN."""
    x = torch.randn(256, generator=gen)
    out = emu_ops.selftest_race(x, False)
    assert not torch.equal(out, x.view(2, 128).roll(-32, dims=1).flatten())
    assert torch.isnan(out).any()


def test_missing_cp_async_wait_gives_wrong_result(emu_ops, gen):
    """cp.async completes at the wait that covers it, not at issue."""
    x = torch.randn(64, 32, generator=gen)
    assert torch.isnan(emu_ops.selftest_cp_async(x, 64, False)).all()


def _call_site(marker: str) -> str:
    """The "csrc/emu_selftest/selftest.cu:LINE" of the line ending in `// misuse: marker`."""
    lines = SELFTEST_SOURCE.read_text().splitlines()
    (line,) = [i + 1 for i, text in enumerate(lines) if text.endswith(f"// misuse: {marker}")]
    return f"csrc/emu_selftest/selftest.cu:{line}"


@pytest.mark.parametrize(
    ("mode", "markers"),
    [
        (0, ["divergent-then", "divergent-else"]),
        (1, ["after-return"]),
        (2, ["mask-names-exited"]),
        (3, ["exit-while-awaited"]),
        (4, ["smem-limit"]),
    ],
    ids=[
        "divergent-barrier",
        "barrier-after-return",
        "mask-names-exited",
        "exit-while-awaited",
        "smem-limit",
    ],
)
def test_misuse_raises_naming_the_call_site(emu_ops, mode, markers, gen):
    out = torch.zeros(128, dtype=torch.int32)
    with pytest.raises(RuntimeError) as info:
        emu_ops.selftest_misuse(out, mode)
    message = str(info.value)
    for marker in markers:
        assert re.search(re.escape(_call_site(marker)) + r"\b", message), message
    # The failed launch leaves the emulator usable.
    x = torch.randn(128, generator=gen)
    assert torch.equal(emu_ops.selftest_race(x, True), x.roll(-32))
