"""Test setup: the triton interpreter on machines without CUDA, fixture paths, tolerances.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, before any
test module imports longcat_native.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib

import pytest

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "longcat_tiny"

@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES

