"""Benchmarks of the qwen ops against their peers, the dry run that CI runs, and the GPU check.

Installed as ``qwen_kernels.bench``. One file per op (``bench_<op>.py``) holds the cases and the
peers; ``harness`` times them, ``report`` writes the results; ``qwen-kernels bench`` runs it all.
"""
