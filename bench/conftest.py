"""Bench test setup: the triton interpreter on machines without CUDA, repo root importable.

TRITON_INTERPRET must be set before triton is first imported (longcat_native imports it), so it
is set here, before the test module imports anything from longcat_native.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_BENCH_DIR)
for _p in (_REPO_ROOT, _BENCH_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)
