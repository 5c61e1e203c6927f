"""Bench test setup: the triton interpreter on machines without CUDA, bench/ importable.

TRITON_INTERPRET must be set before triton is first imported (the fused kernels import it), so
it is set here, before the test module imports anything from ``longcat_native.kernels``.
``longcat_native`` itself comes from the editable install (or PYTHONPATH, bench/device_check.sh).
"""

import os
import sys

from longcat_native.benchmarking.harness import setup_triton_env

setup_triton_env()

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if _BENCH_DIR not in sys.path:  # the tests import bench/suite.py
    sys.path.insert(0, _BENCH_DIR)
