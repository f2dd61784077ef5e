"""The vLLM plug-in's tests run only where vllm is importable: in ``.venv-vllm``, made by
``scripts/setup_vllm.sh``; the main suite runs them there (``tests/test_vllm_plugin.py``). vLLM
runs on the CPU: ``VLLM_TARGET_DEVICE`` must be set before vllm is first imported."""

import importlib.util
import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
# The plug-in is off unless a test turns it on.
os.environ.pop("QK_VLLM", None)

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]
