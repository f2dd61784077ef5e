"""Build of qwen-kernels: the Python package, plus the CUDA extension ``qwen_kernels._C`` when a
CUDA toolkit and a CUDA build of torch are present.

Knobs (environment):
  QK_BUILD_CUDA=0/1   force the CUDA extension off / on (default: build when possible)
  QK_CUDA_ARCHS       ";"-separated compute capabilities, default "8.0;8.6;8.9;9.0a"
  MAX_JOBS            parallel compile jobs (read by torch's ninja build)
  NVCC_THREADS        nvcc --threads (default 1)
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent  # absolute: builds may run from another folder
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0a"
SELFTEST_DIR = "emu_selftest"
PACKAGE_DIR = {
    "qwen_kernels": "qwen_kernels",
    "qwen_kernels.triton_kernels": "triton_kernels",
    "qwen_kernels.model": "model",
}


def _packages() -> list[str]:
    """Every package under the mapped source folders (those holding an __init__.py)."""
    found = []
    for package, folder in PACKAGE_DIR.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.append(".".join((package, *relative)))
    return found


def _find_cuda_home() -> str | None:
    # Torch guesses the toolkit from `nvcc` on PATH, which a wrapper script can mislead: pin it.
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and Path("/usr/local/cuda/bin/nvcc").exists():
        home = "/usr/local/cuda"
    if home and Path(home, "bin", "nvcc").exists():
        os.environ["CUDA_HOME"] = home
        return home
    return None


def _cuda_build_blocker() -> str | None:
    """Why the CUDA extension cannot or should not be built, or None to build it."""
    forced = os.environ.get("QK_BUILD_CUDA")
    if forced == "0":
        return "QK_BUILD_CUDA=0"
    problem = None
    if _find_cuda_home() is None:
        problem = "no CUDA toolkit found (set CUDA_HOME)"
    else:
        try:
            import torch
        except ImportError:
            problem = "torch is not installed in the build environment"
        else:
            if torch.version.cuda is None:
                problem = f"torch {torch.__version__} is a CPU-only build"
    if problem and forced == "1":
        raise RuntimeError(f"QK_BUILD_CUDA=1 but the CUDA extension cannot be built: {problem}")
    return problem


def _gencode_flags(archs: str) -> list[str]:
    """Machine code for each arch, plus PTX of the oldest portable one so that GPUs newer than
    the list still run (JIT-compiled by the driver); "a" archs (9.0a) are not portable."""
    listed = [a.strip() for a in archs.split(";") if a.strip()]
    flags = []
    for arch in listed:
        number = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
    portable = sorted((a for a in listed if not a.endswith("a")), key=float)
    if portable:
        number = portable[0].replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


def _cuda_extension():
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("QK_CUDA_ARCHS", DEFAULT_ARCHS)
    # The emulation's self-test kernels are not shipped: tests build them apart (tests/emu).
    sources = sorted(
        str(p.relative_to(ROOT))
        for pattern in ("*.cu", "*.cpp")
        for p in (ROOT / "csrc").rglob(pattern)
        if SELFTEST_DIR not in p.relative_to(ROOT / "csrc").parts
    )
    common = ["-O3", "-std=c++20", "-DQK_OPS_NAMESPACE=qwen_cuda", f'-DQK_CUDA_ARCHS="{archs}"']
    nvcc = [
        *common,
        "-lineinfo",
        "--expt-relaxed-constexpr",
        f"--threads={os.environ.get('NVCC_THREADS', '1')}",
        *_gencode_flags(archs),
    ]
    extension = CUDAExtension(
        name="qwen_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": common, "nvcc": nvcc},
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


blocker = _cuda_build_blocker()
if blocker is None:
    ext_modules, cmdclass = _cuda_extension()
    archs = os.environ.get("QK_CUDA_ARCHS", DEFAULT_ARCHS)
    print(f"qwen-kernels: building the CUDA extension for {archs}")
else:
    ext_modules, cmdclass = [], {}
    print(f"qwen-kernels: installing without the CUDA extension ({blocker})")

setup(
    # csrc/ travels inside the package: the "cuda_emu" backend compiles it on first use.
    packages=[*_packages(), "qwen_kernels.csrc"],
    package_dir={**PACKAGE_DIR, "qwen_kernels.csrc": "csrc"},
    package_data={
        "qwen_kernels.model": ["assets/*"],
        "qwen_kernels.csrc": ["**/*.cu", "**/*.cpp", "**/*.h", "**/*.md"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
