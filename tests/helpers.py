"""Helpers shared by the tests: the device, tolerances, relative-error assertions, and the random
inputs of the kernel tests (seeded, built on the CPU and moved, so a GPU run draws the same)."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Dtypes the kernel tests run on a CPU: the triton interpreter gets bf16 arithmetic wrong
# (DEVELOPERS.md), so bf16 runs only on a GPU.
CPU_DTYPES = [torch.float32, torch.float16]
NAN = float("nan")  # outputs are poisoned with it before a kernel writes them

# Error bounds relative to the expected output's largest magnitude, by dtype (DEVELOPERS
# convention): fp32 1e-5, fp16 2e-3, bf16 1e-2. The model-level fixture bound is 1e-4 because
# the official outputs were computed by a different float32 program (float64 attention).
KERNEL_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MODEL_RTOL = 1e-4


def randn(*shape, seed, dtype=torch.float32, mul=1.0, add=0.0):
    """``randn * mul + add`` from a fresh generator seeded ``seed``, on DEVICE in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * mul + add).to(device=DEVICE, dtype=dtype)


def modulation(B, frames, C, seed):
    """The six adaLN chunks ``(shift, scale, gate, ...)`` as the model has them: float32
    ``[B, frames, C]`` views of one contiguous ``[B, frames, 6C]`` tensor."""
    chunks = randn(B, frames, 6 * C, seed=seed, mul=0.5).chunk(6, dim=-1)
    assert chunks[0].stride() == (frames * 6 * C, 6 * C, 1)
    return chunks


def layernorm_affine(C, seed):
    """A LayerNorm's ``(weight, bias)``, ``[C]`` each (weight near 1)."""
    return randn(C, seed=seed, mul=0.5, add=1.0), randn(C, seed=seed + 1, mul=0.5)


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
