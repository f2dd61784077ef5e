"""Benchmarks of the qwen ops against their peers, the dry run that CI runs, and the GPU check.

A tool of the checkout, not part of the installed package: run it from the repository root
(``qwen-kernels bench`` and ``qwen-kernels inspect`` find it there). One file per op
(``bench_<op>.py``) holds the cases and the peers; ``harness`` times them, ``report`` writes the
results; ``qwen-kernels bench`` runs it all.
"""
