"""residual_layernorm_modulate: a (gated) residual add fused with the next sub-layer's norm.

Every residual site of a block is followed by a LayerNorm: ``x = x + gate * y`` then
``h = layernorm_modulate(x)``. Fusing them reads x and y once and writes x and h once.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layernorm_modulate import layernorm_modulate_reference

__all__ = ["residual_layernorm_modulate_reference", "gated_residual_reference"]


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    """``x + gate * y`` per frame in float32 (official autocast-fp32 block), cast to x's dtype.

    x, y: [B, N, C]; gate: [B, frames, C] or None for a plain residual ``x + y`` in x's dtype
    (the official cross-attention residual is a plain add in the activation dtype).
    """
    if x.shape != y.shape:
        raise ValueError(f"residual operands differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if gate is None:
        return x + y
    B, N, C = x.shape
    frames = gate.shape[1]
    if gate.shape != (B, frames, C) or frames == 0 or N % frames:
        raise ValueError(f"gate must be [B, frames, C] with frames dividing N={N}, got {tuple(gate.shape)}")
    out = x.float().view(B, frames, -1, C) + gate.float()[:, :, None] * y.float().view(B, frames, -1, C)
    return out.view(B, N, C).to(x.dtype)


def residual_layernorm_modulate_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(x_new, h)``: ``x_new = x + gate * y`` and ``h = layernorm_modulate(x_new, ...)``."""
    x_new = gated_residual_reference(x, y, gate)
    return x_new, layernorm_modulate_reference(x_new, shift, scale, weight, bias, eps)
