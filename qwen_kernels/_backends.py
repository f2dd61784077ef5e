"""Backend discovery and selection shared by every op.

A backend is usable for a call when its code exists for the op, its runtime exists on this
machine (a CUDA GPU, the built ``_C`` extension, Triton, a C++ compiler for the emulation) and it
runs on the device of the inputs. ``"auto"`` walks a per-device preference list and takes the first
usable backend, so it never fails where ``"torch"`` would work.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

BACKENDS: tuple[str, ...] = ("torch", "triton", "cuda", "cuda_emu")
BACKEND_CHOICES: tuple[str, ...] = ("auto", *BACKENDS)
# What `OpBackends.select_name` answers where "auto" runs an op's chain of other ops.
AUTO_CHAIN = "chain"
# Call signatures an op keeps before it starts over (a few hundred bytes each).
_MAX_SIGNATURES = 4096

# Preference of "auto" per device type.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("torch",),
}


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_missing() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    return None


@functools.cache
def cuda_extension_error() -> str | None:
    """Why ``qwen_kernels._C`` cannot be loaded, or None once it is loaded."""
    try:
        importlib.import_module("qwen_kernels._C")
    except ImportError as exc:
        return f"qwen_kernels._C is not built or failed to load ({exc})"
    return None


def archs_run_on(device: int, archs: Sequence[str]) -> bool:
    """Whether a build for ``archs`` (e.g. ["8.0", "9.0a"]) runs on GPU ``device`` (e.g. 90).

    The build holds machine code for each arch (an "a" arch runs only on that exact chip, the
    others also on later minors of the same major) and PTX of the oldest portable arch, which
    the driver compiles for any later GPU.
    """
    numbers = [(round(float(a.rstrip("a")) * 10), a.endswith("a")) for a in archs]
    machine_code = any(
        device == number if exact else (device // 10 == number // 10 and device >= number)
        for number, exact in numbers
    )
    portable = [number for number, exact in numbers if not exact]
    return machine_code or bool(portable and device >= min(portable))


@functools.cache
def _cuda_arch_missing() -> str | None:
    major, minor = torch.cuda.get_device_capability()
    archs = [a for a in torch.ops.qwen_cuda.build_info().split(";") if a]
    if archs_run_on(major * 10 + minor, archs):
        return None
    return f"qwen_kernels._C was built for {';'.join(archs)}, not for this sm_{major}{minor} GPU"


def _emu_missing() -> str | None:
    try:
        emu = importlib.import_module("qwen_kernels._emu")
    except ImportError as exc:
        return f"the CUDA emulation layer is not part of this install ({exc})"
    return None if emu.is_available() else "no C++20 compiler was found for the CUDA emulation"


def runtime_missing(backend: str, device_type: str | None = None) -> str | None:
    """Why ``backend`` cannot run here (on ``device_type`` if given), or None when it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        missing = _triton_missing()
        if missing:
            return missing
        if device_type == "cpu" and not triton_interpreting():
            return "Triton runs CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
        if device_type is None and not (torch.cuda.is_available() or triton_interpreting()):
            return "no CUDA GPU and TRITON_INTERPRET is not set"
        return None
    if backend == "cuda":
        if device_type not in (None, "cuda"):
            return "the cuda backend needs CUDA tensors (use cuda_emu for CPU tensors)"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
        return cuda_extension_error() or _cuda_arch_missing()
    if backend == "cuda_emu":
        if device_type not in (None, "cpu"):
            return "the cuda_emu backend runs CPU tensors only"
        return _emu_missing()
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_CHOICES}")


@dataclass
class OpBackends:
    """The implementations of one op, keyed by backend name.

    ``impls`` maps a backend name to a callable taking the op's arguments (without ``backend``).
    Kernel backends are registered lazily as ``"module:function"`` strings so that importing the
    package never imports Triton or builds an extension.
    """

    op: str
    impls: dict[str, Callable | str] = field(default_factory=dict)
    # What "auto" runs instead of picking a backend, if set (e.g. a chain of the best kernels).
    auto_impl: Callable | None = None
    # Whether a kernel backend takes inputs whose last dim has this size (e.g. its head dims):
    # "auto" passes over the ones that do not, to the next in its order.
    fits: Callable[[str, int], bool] | None = None
    # How "auto" decides for this op, when it is more than the device's order (for `info`).
    auto_note: str = ""
    # The implementation chosen for each call signature that passed the op's checks: ops look a
    # call up here and `resolve` it on a miss.
    resolved: dict[tuple, Callable] = field(default_factory=dict, init=False, repr=False)

    def register(self, backend: str, impl: Callable | str) -> None:
        """Add (or replace) the implementation of ``backend``."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        self.impls[backend] = impl
        self.resolved.clear()

    def usable(self, device_type: str | None = None) -> list[str]:
        """Backends that have code for this op and can run here (on ``device_type``)."""
        return [b for b in BACKENDS if b in self.impls and runtime_missing(b, device_type) is None]

    def _load(self, backend: str) -> Callable:
        impl = self.impls[backend]
        if isinstance(impl, str):
            module, _, name = impl.partition(":")
            impl = getattr(importlib.import_module(module), name)
            self.impls[backend] = impl
        return impl

    def resolve(
        self, signature: tuple, backend: str, like: torch.Tensor, check: Callable, *args
    ) -> Callable:
        """Run the op's argument checks ``check(*args)``, then ``select(backend, like)``, and keep
        the answer in ``resolved`` under the call's ``signature``.

        Checks and selection together cost more host time than the custom op call itself, so an
        op looks its calls up in ``resolved`` first (``resolved.get(signature) or resolve(...)``)
        by a signature that holds all they read: the backend name, each tensor's ``tensor_key``
        and the other arguments. Checks of tensor values are not part of it; the op runs them on
        every call. What a backend can run is taken to be fixed for the process (Triton too reads
        TRITON_INTERPRET once), implementations change only through ``register``, which clears
        ``resolved``, and a failed check raises before anything is kept.
        """
        check(*args)
        impl = self.select(backend, like)
        if len(self.resolved) >= _MAX_SIGNATURES:
            self.resolved.clear()  # shapes can vary without bound in serving: start over
        self.resolved[signature] = impl
        return impl

    def select(self, backend: str, like: torch.Tensor) -> Callable:
        """Resolve ``backend`` (possibly "auto") for inputs like ``like`` (its device, dtype and,
        where ``fits`` reads it, last dim). Returns the implementation to call; raises if the
        backend cannot run these inputs here."""
        name = self.select_name(backend, like)
        return self.auto_impl if name == AUTO_CHAIN else self._load(name)

    def select_name(self, backend: str, like: torch.Tensor) -> str:
        """The backend that ``select`` runs for inputs like ``like``: a name of ``BACKENDS``, or
        ``AUTO_CHAIN`` where "auto" runs the op's ``auto_impl``."""
        if backend == "auto" and like.numel() == 0:
            return "torch"  # nothing to compute: no launch, no failure
        device = like.device
        # Kernels compute in fp32 at most; fp64 exists to build references on "torch".
        kernel_dtype = like.dtype != torch.float64
        if backend == "auto" and self.auto_impl is not None:
            return AUTO_CHAIN
        if backend == "auto":
            for name in _AUTO_ORDER.get(device.type, ("torch",)):
                usable = name in self.impls and runtime_missing(name, device.type) is None
                fits = name == "torch" or (
                    kernel_dtype and (self.fits is None or self.fits(name, like.shape[-1]))
                )
                if usable and fits:
                    return name
            return "torch"
        if backend not in BACKENDS:
            raise ValueError(
                f"qwen.{self.op}: `backend` must be one of {BACKEND_CHOICES}, got {backend!r}"
            )
        if backend not in self.impls:
            have = ", ".join(b for b in BACKENDS if b in self.impls)
            raise RuntimeError(
                f"qwen.{self.op}: no {backend!r} kernel exists for this op yet (it has: {have})"
            )
        missing = runtime_missing(backend, device.type)
        if missing:
            raise RuntimeError(f"qwen.{self.op}: backend {backend!r} is unavailable: {missing}")
        if not kernel_dtype and backend != "torch":
            raise ValueError(
                f"qwen.{self.op}: backend {backend!r} takes fp16, bf16 or fp32 inputs, got "
                "float64 (only the 'torch' reference runs in float64)"
            )
        return backend


def tensor_key(t: torch.Tensor | None) -> tuple | None:
    """The part of a call signature (``OpBackends.resolve``) a tensor argument contributes: its
    dtype, shape and device (strides are not checked by any op: kernels take any)."""
    return None if t is None else (t.dtype, t.shape, t.device)


class NativeOp:
    """A C++ op of the CUDA build (``torch.ops.qwen_cuda``) or of its CPU emulation
    (``torch.ops.qwen_emu``, built on first use)."""

    def __init__(self, backend: str, name: str) -> None:
        self.backend, self.name = backend, name

    def __call__(self, *args):
        if self.backend == "cuda":
            importlib.import_module("qwen_kernels._C")
            library = torch.ops.qwen_cuda
        else:
            library = importlib.import_module("qwen_kernels._emu").load()
        if not hasattr(library, self.name):
            raise RuntimeError(
                f"the {self.backend} build has no op {self.name!r}: it predates this kernel, "
                "rebuild the package (pip install --no-build-isolation -e .)"
            )
        return getattr(library, self.name)(*args)


def register_native(table: OpBackends, name: str | None = None) -> None:
    """Register the C++ op ``name`` (default: the op's name) as the "cuda" and "cuda_emu"
    backends of ``table``: the same kernel source, compiled by nvcc and by the emulation."""
    for backend in ("cuda", "cuda_emu"):
        table.register(backend, NativeOp(backend, name or table.op))


REGISTRY: dict[str, OpBackends] = {}


def op_backends(op: str, torch_impl: Callable, **kwargs) -> OpBackends:
    """Create and register the backend table of ``op`` with its eager reference."""
    table = OpBackends(op, {"torch": torch_impl}, **kwargs)
    REGISTRY[op] = table
    return table


def available_backends() -> dict[str, list[str]]:
    """For every public op, the backends usable on this machine (for some device)."""
    return {op: table.usable() for op, table in REGISTRY.items()}
