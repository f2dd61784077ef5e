"""The vLLM plug-in (``qwen_kernels.vllm``): its switch and its version gate here, without vLLM;
its tests on vLLM's own tower (``tests/vllm``) in ``.venv-vllm`` (``scripts/setup_vllm.sh``), run
as a subprocess of this suite. In CI (``CI=true``) a missing vLLM environment fails the run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_kernels import vllm as plugin
from qwen_kernels.model.config import KernelConfig

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-vllm"
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.mark.parametrize("value", ["", "0", "off", " none "])
def test_off_values(value):
    assert plugin.kernels_from_env(value) is None


def test_unset_is_off(monkeypatch):
    monkeypatch.delenv(plugin.ENV, raising=False)
    assert plugin.kernels_from_env() is None


def test_backend_names_and_json(tmp_path, monkeypatch):
    assert plugin.kernels_from_env("auto") == KernelConfig()
    assert plugin.kernels_from_env("triton") == KernelConfig.uniform("triton")
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"attention": "cuda", "layers": {"7": {"norm": "torch"}}}))
    monkeypatch.setenv(plugin.ENV, str(path))
    config = plugin.kernels_from_env()
    assert config.for_layer(7).norm == "torch" and config.attention == "cuda"


def test_bad_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="QK_VLLM='tpu': expected 'auto', a backend name"):
        plugin.kernels_from_env("tpu")
    with pytest.raises(ValueError, match="cannot read a JSON KernelConfig"):
        plugin.kernels_from_env(str(tmp_path / "missing.json"))
    listed = tmp_path / "list.json"
    listed.write_text("[1]")
    with pytest.raises(ValueError, match="object of KernelConfig fields"):
        plugin.kernels_from_env(str(listed))
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"attention": "tpu"}')
    with pytest.raises(ValueError, match="backend for 'attention' must be one of"):
        plugin.kernels_from_env(str(unknown))


@pytest.mark.parametrize("version", ["0.33.0", "0.33.2rc1", "0.33.1+cpu"])
def test_known_versions(version):
    plugin.check_version(version)


@pytest.mark.parametrize("version", ["0.32.9", "0.34.0", "1.0.0", "dev"])
def test_unknown_versions_are_refused(version):
    with pytest.raises(RuntimeError, match=r"not supported \(supported: vllm >=0\.33, <0\.34\)"):
        plugin.check_version(version)


def test_register_without_qk_vllm_does_nothing(monkeypatch):
    """Off, register() returns before importing vLLM (absent from this environment)."""
    monkeypatch.delenv(plugin.ENV, raising=False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # any import of vllm would raise
    plugin.register()


SUITE_TEST = "test_the_vllm_suite_passes_in_its_environment"


def _vllm_env_ready() -> bool:
    """Whether scripts/setup_vllm.sh finished .venv-vllm (its last stamp)."""
    return (VENV / ".qwen-kernels-build").is_file()


_running: dict[str, subprocess.Popen] = {}


def start_vllm_suite() -> None:
    """Starts tests/vllm in .venv-vllm in the background, once (the session's conftest calls this
    when the collected tests include ``SUITE_TEST``): its minutes in vLLM's interpreter overlap
    the rest of this suite instead of adding to it."""
    if _running or not _vllm_env_ready():
        return
    env = {k: v for k, v in os.environ.items() if k not in (plugin.ENV, "TRITON_INTERPRET")}
    command = [str(VENV / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    _running["suite"] = subprocess.Popen(
        [*command, "tests/vllm"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_vllm_suite() -> None:
    """Ends a background vLLM suite that no test waited for (a run cut short or deselected)."""
    suite = _running.get("suite")
    if suite is not None and suite.poll() is None:
        suite.kill()
        suite.wait()


def test_the_vllm_suite_passes_in_its_environment():
    """tests/vllm in .venv-vllm: vLLM's tower against transformers' with the plug-in on (every
    CPU backend), off, tensor-parallel 2. Its output is printed (pytest -s shows it)."""
    if not _vllm_env_ready():
        message = "no vLLM environment: run `bash scripts/setup_vllm.sh` (about 4 minutes)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    start_vllm_suite()
    suite = _running["suite"]
    try:
        output, _ = suite.communicate(timeout=1800)
    finally:
        stop_vllm_suite()
    print(output)
    assert suite.returncode == 0, output[-6000:]
    summary = output.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary
