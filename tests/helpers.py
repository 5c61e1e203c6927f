"""Helpers shared by the tests: tolerances and relative-error assertions."""

import torch

# Error bounds relative to the expected output's largest magnitude, by dtype (DEVELOPERS
# convention): fp32 1e-5, fp16 2e-3, bf16 1e-2. The model-level fixture bound is 1e-4 because
# the official outputs were computed by a different float32 program (float64 attention).
KERNEL_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MODEL_RTOL = 1e-4


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual.float() - expected).abs().max() / scale)


def assert_close_rel(actual, expected, rtol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten output?)"
    err = max_rel_err(actual, expected)
    assert err <= rtol, f"{what}: max error {err:.3g} relative to output scale exceeds {rtol:g}"


def requires_cuda(fn):
    import pytest

    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn)
