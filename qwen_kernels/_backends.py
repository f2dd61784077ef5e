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
from typing import Any

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


# Whether Triton kernels run on CPU tensors through the Triton interpreter: read once, at import,
# as Triton reads it when the kernels are defined. The one answer to "are we interpreting";
# launchers see it as the arch None (triton_kernels/_common.py: launch_arch).
TRITON_INTERPRETING: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
        if device_type == "cpu" and not TRITON_INTERPRETING:
            return "Triton runs CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
        if device_type is None and not (torch.cuda.is_available() or TRITON_INTERPRETING):
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


_NATIVE_PREFIX = "native:"


@dataclass
class OpBackends:
    """The implementations of one op, keyed by backend name (made by ``ops._define.define``).

    ``impls`` maps a backend name to a callable taking the op's arguments (without ``backend``),
    or to a string resolved on first use, so that importing the package never imports Triton or
    builds an extension: ``"module:function"``, or ``OpBackends.native(name)`` for the C++ op
    ``name`` of the CUDA build (``torch.ops.qwen_cuda``) or of its CPU emulation
    (``torch.ops.qwen_emu``), bound to its ``.default`` overload once.
    """

    op: str
    impls: dict[str, Callable | str] = field(default_factory=dict)
    # The op's argument checks (dtypes, shapes, devices), run once per call signature.
    check: Callable[..., None] | None = None
    # What "auto" runs instead of picking a backend, if set (e.g. a chain of the best kernels).
    auto_impl: Callable | None = None
    # Why a kernel backend cannot take inputs whose last dim has this size (e.g. the head dims
    # its kernels hold), or None where it can: "auto" passes over the ones that cannot, to the
    # next in its order, and an explicit backend that cannot is refused with that reason.
    misfit: Callable[[str, int], str | None] | None = None
    # How "auto" decides for this op, when it is more than the device's order (for `info`).
    auto_note: str = ""
    # "auto"'s order of backends on CUDA tensors for these arguments, where it depends on more
    # than the device type (the GPU generation, a segment length), or None for the device's.
    auto_order: Callable[[tuple], tuple[str, ...] | None] | None = None
    # The implementation chosen for each call signature that passed the op's checks: ops look a
    # call up here and `resolve` it on a miss.
    resolved: dict[tuple, Callable] = field(default_factory=dict, init=False, repr=False)

    @staticmethod
    def native(name: str) -> str:
        """The ``impls`` entry of the C++ op ``name`` (for the "cuda" and "cuda_emu" backends)."""
        return _NATIVE_PREFIX + name

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
            if impl.startswith(_NATIVE_PREFIX):
                impl = _load_native(backend, impl)  # the C++ launchers guard the device
            else:
                impl = _import(impl)
                if backend == "triton":
                    impl = on_inputs_device(impl)
            self.impls[backend] = impl
        return impl

    def resolve(self, signature: tuple, backend: str, args: tuple) -> Callable:
        """Run the op's argument checks on ``args``, then ``select(backend, like)`` with the first
        tensor argument as ``like``, and keep the answer in ``resolved`` under ``signature``.

        Checks and selection together cost more host time than the custom op call itself, so an
        op looks its calls up in ``resolved`` first by a signature that holds all they read (see
        ``ops._define``). Checks of tensor values are not part of it; the op runs them on every
        call. What a backend can run is taken to be fixed for the process (Triton reads
        TRITON_INTERPRET once), implementations change only through ``register``, which clears
        ``resolved``, and a failed check raises before anything is kept.
        """
        if self.check is not None:
            self.check(*args)
        like = next(a for a in args if isinstance(a, torch.Tensor))
        order = None
        if backend == "auto" and self.auto_order is not None and like.device.type == "cuda":
            order = self.auto_order(args)
        impl = self.select(backend, like, order)
        if len(self.resolved) >= _MAX_SIGNATURES:
            self.resolved.clear()  # shapes can vary without bound in serving: start over
        self.resolved[signature] = impl
        return impl

    def select(
        self, backend: str, like: torch.Tensor, order: Sequence[str] | None = None
    ) -> Callable:
        """Resolve ``backend`` (possibly "auto") for inputs like ``like`` (its device, dtype and,
        where ``fits`` reads it, last dim). Returns the implementation to call; raises if the
        backend cannot run these inputs here."""
        name = self.select_name(backend, like, order)
        return self.auto_impl if name == AUTO_CHAIN else self._load(name)

    def select_name(
        self, backend: str, like: torch.Tensor, order: Sequence[str] | None = None
    ) -> str:
        """The backend that ``select`` runs for inputs like ``like``: a name of ``BACKENDS``, or
        ``AUTO_CHAIN`` where "auto" runs the op's ``auto_impl``. ``order`` replaces the device's
        order of "auto" (``auto_order``'s answer for the call)."""
        if backend == "auto" and like.numel() == 0:
            return "torch"  # nothing to compute: no launch, no failure
        device = like.device
        # Kernels compute in fp32 at most; fp64 exists to build references on "torch".
        kernel_dtype = like.dtype != torch.float64
        if backend == "auto" and self.auto_impl is not None:
            return AUTO_CHAIN
        if backend == "auto":
            for name in order or _AUTO_ORDER.get(device.type, ("torch",)):
                if name == "torch":
                    return name
                usable = name in self.impls and runtime_missing(name, device.type) is None
                if usable and kernel_dtype and self._misfit(name, like) is None:
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
        misfit = self._misfit(backend, like)
        if misfit is not None:
            raise ValueError(
                f"qwen.{self.op}: backend {backend!r} cannot take these inputs: {misfit}"
            )
        return backend

    def _misfit(self, backend: str, like: torch.Tensor) -> str | None:
        if backend == "torch" or self.misfit is None:
            return None
        return self.misfit(backend, like.shape[-1])


def on_inputs_device(launcher: Callable) -> Callable:
    """``launcher`` run with the device of its first tensor argument current: Triton launches go
    to the current CUDA device and stream, so inputs on cuda:1 while cuda:0 is current would
    otherwise read another GPU's addresses. The one device guard of every Triton launcher (the
    op layer wraps each as it loads it); a no-op for other devices and for the current one."""

    @functools.wraps(launcher)
    def guarded(*args):
        device = next(a for a in args if isinstance(a, torch.Tensor)).device
        if device.type != "cuda" or device.index == torch.cuda.current_device():
            return launcher(*args)
        with torch.cuda.device(device):
            return launcher(*args)

    return guarded


def _import(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def native_library(backend: str) -> Any:
    """``torch.ops.qwen_cuda`` (importing ``qwen_kernels._C``) or, for "cuda_emu",
    ``torch.ops.qwen_emu`` (built on first use)."""
    if backend == "cuda":
        importlib.import_module("qwen_kernels._C")
        return torch.ops.qwen_cuda
    return importlib.import_module("qwen_kernels._emu").load()


def _load_native(backend: str, entry: str) -> Callable:
    name = entry.removeprefix(_NATIVE_PREFIX)
    library = native_library(backend)
    if not hasattr(library, name):
        raise RuntimeError(
            f"the {backend} build has no op {name!r}: it predates this kernel, rebuild the "
            "package (pip install --no-build-isolation -e .)"
        )
    return getattr(library, name).default


# Every op's backend table, by op name (filled by ``ops._define.define``).
REGISTRY: dict[str, OpBackends] = {}


def available_backends() -> dict[str, list[str]]:
    """For every public op, the backends usable on this machine (for some device)."""
    return {op: table.usable() for op, table in REGISTRY.items()}
