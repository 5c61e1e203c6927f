"""swiglu: ``silu(a) * b`` over the output of the single concatenated ``w1|w3`` GEMM.

The FFN's first projection is one GEMM producing ``[..., 2F]``: ``a = out[..., :F]`` (w1) and
``b = out[..., F:]`` (w3). The result feeds ``w2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["swiglu_reference"]


def swiglu_reference(ab: torch.Tensor) -> torch.Tensor:
    """Official ``F.silu(w1(x)) * w3(x)`` in the activation dtype. ab: [..., 2F] -> [..., F]."""
    if ab.shape[-1] % 2:
        raise ValueError(f"last dim of the w1|w3 output must be even, got {ab.shape[-1]}")
    a, b = ab.chunk(2, dim=-1)
    return F.silu(a) * b
