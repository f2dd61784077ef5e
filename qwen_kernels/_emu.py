"""The ``"cuda_emu"`` backend: the CUDA kernels of ``csrc/`` compiled for the CPU.

Every ``csrc/**/*.cu`` is compiled as C++20 by the host compiler with ``-DQK_EMULATE``, against the
emulation headers in ``csrc/emu`` (threads of a block run as fibers, warp collectives and inline PTX
are emulated), together with ``csrc/**/*.cpp``. The ops register under ``torch.ops.qwen_emu`` for
CPU tensors, mirroring ``torch.ops.qwen_cuda`` of the CUDA build.

The library is built on first use into ``$XDG_CACHE_HOME/qwen_kernels/emu-<key>`` (default
``~/.cache``; the key covers the checkout, the compiler, torch and Python). Editing a kernel
rebuilds only its file (editing a header rebuilds them all), and an unchanged tree loads the
cached library. ``QK_EMU_VERBOSE=1`` shows the compiler's output.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["EmuBuildError", "is_available", "load", "source_dir"]

_NAME = "qwen_kernels_emu"
_FLAGS = (
    "-std=c++20",  # older torch would add -std=c++17; the emulation needs C++20
    "-O2",
    "-DQK_EMULATE",
    "-DQK_OPS_NAMESPACE=qwen_emu",
    "-DQK_DISPATCH_KEY=CPU",
)
_HEADER_SUFFIXES = (".h", ".cuh", ".hpp", ".inc")
_lock = threading.Lock()


class EmuBuildError(RuntimeError):
    """The emulated CUDA kernels could not be compiled or loaded."""


def source_dir() -> Path | None:
    """The ``csrc`` folder of this checkout (or install), or None when it is absent."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "csrc"):
        if (candidate / "emu" / "cuda_emu.h").is_file():
            return candidate
    return None


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


@functools.cache
def _compiler_problem() -> str | None:
    """Why the host compiler cannot build the emulation, or None when it can."""
    cxx = shutil.which(_compiler())
    if cxx is None:
        return f"no C++ compiler found (looked for {_compiler()!r}; set CXX)"
    probe = "#include <bit>\n#include <source_location>\nint main() { return 0; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "probe.cpp")
        source.write_text(probe)
        result = subprocess.run(
            [cxx, "-std=c++20", "-fsyntax-only", str(source)],
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        return f"{cxx} does not compile C++20: {result.stderr.strip()[-500:]}"
    return None


def is_available() -> bool:
    """True when the emulation can be built here: POSIX, a C++20 compiler and the sources."""
    return os.name == "posix" and source_dir() is not None and _compiler_problem() is None


def _sources(csrc: Path) -> list[Path]:
    return sorted(csrc.rglob("*.cu")) + sorted(csrc.rglob("*.cpp"))


def _build_dir(csrc: Path) -> Path:
    """One build folder per checkout, compiler, torch and Python; within it ninja rebuilds only
    the objects whose sources or included headers changed."""
    digest = hashlib.sha256()
    version = subprocess.run(
        [_compiler(), "--version"], capture_output=True, text=True, check=False
    ).stdout
    for part in (version, torch.__version__, sys.version, str(csrc), *_FLAGS):
        digest.update(part.encode() + b"\0")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "qwen_kernels" / f"emu-{digest.hexdigest()[:16]}"


def _wrappers(csrc: Path, build_dir: Path) -> list[str]:
    """One .cpp per source that #includes it, so that the compiler treats .cu files as C++ while
    errors and call sites still name the original file.

    A wrapper also carries a digest of its source and of every header in csrc/, and is rewritten
    only when that changes: ninja then rebuilds exactly the stale objects, even when another
    process compiled a source while it was being edited (which mtimes alone would miss).
    """
    headers = hashlib.sha256()
    for path in sorted(p for p in csrc.rglob("*") if p.suffix in _HEADER_SUFFIXES):
        headers.update(str(path.relative_to(csrc)).encode() + b"\0" + path.read_bytes() + b"\0")
    folder = build_dir / "src"
    folder.mkdir(parents=True, exist_ok=True)
    wrappers = []
    for source in _sources(csrc):
        digest = hashlib.sha256(headers.digest() + source.read_bytes()).hexdigest()[:16]
        text = f'// sources {digest}\n#include "{source}"\n'
        wrapper = folder / ("__".join(source.relative_to(csrc).parts) + ".cpp")
        if not wrapper.is_file() or wrapper.read_text() != text:
            # Replaced atomically: another process may be compiling the old one.
            partial = wrapper.with_name(f"{wrapper.name}.{os.getpid()}.tmp")
            partial.write_text(text)
            partial.replace(wrapper)
        wrappers.append(wrapper)
    for stale in set(folder.glob("*.cpp")) - set(wrappers):
        stale.unlink()
    return [str(w) for w in wrappers]


def _build() -> Any:
    csrc = source_dir()
    if csrc is None:
        raise EmuBuildError("qwen_kernels: the csrc/ sources of the CUDA kernels are not installed")
    problem = _compiler_problem()
    if problem is not None:
        raise EmuBuildError(f"qwen_kernels: cannot build the CUDA emulation: {problem}")
    from torch.utils import cpp_extension

    build_dir = _build_dir(csrc)
    try:
        cpp_extension.load(
            name=_NAME,
            sources=_wrappers(csrc, build_dir),
            extra_cflags=[*_FLAGS, f"-I{csrc}"],
            build_directory=str(build_dir),
            verbose=os.environ.get("QK_EMU_VERBOSE") == "1",
            with_cuda=False,
            is_python_module=False,
        )
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        raise EmuBuildError(
            f"qwen_kernels: building the CUDA emulation in {build_dir} failed "
            f"(QK_EMU_VERBOSE=1 shows the full compiler output):\n{str(exc)[-6000:]}"
        ) from exc
    return torch.ops.qwen_emu


_ops: Any = None
_error: EmuBuildError | None = None


def load() -> Any:
    """Build (on first use) and load the emulated kernels; returns ``torch.ops.qwen_emu``.

    Raises:
        EmuBuildError: no usable compiler, no sources, or the build failed (with the compiler's
            messages). A failed build is not retried in the same process.
    """
    global _ops, _error
    with _lock:
        if _error is not None:
            raise EmuBuildError(str(_error))
        if _ops is None:
            try:
                _ops = _build()
            except EmuBuildError as exc:
                _error = exc
                raise
        return _ops
