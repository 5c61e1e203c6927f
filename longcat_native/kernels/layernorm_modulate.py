"""layernorm_modulate: ``LayerNorm(x) * (1 + scale) + shift`` with per-frame shift/scale.

The DiT modulates every token of latent frame ``f`` with ``shift[:, f]`` and ``scale[:, f]``
(adaLN per frame, SPEC section 2 step 5). The same op, with an affine weight/bias and no
modulation, is the pre-cross-attention LayerNorm.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["layernorm_modulate_reference", "check_layernorm_modulate_args"]


def check_layernorm_modulate_args(x, shift, scale, weight, bias):
    """Shape checks shared by the reference and the fused op; returns tokens per frame."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, C], got shape {tuple(x.shape)}")
    B, N, C = x.shape
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale must be given together")
    tokens_per_frame = N
    if shift is not None:
        if shift.dim() != 3 or shift.shape != scale.shape or shift.shape[0] != B or shift.shape[2] != C:
            raise ValueError(
                f"shift/scale must be [B, frames, C] = [{B}, *, {C}], got {tuple(shift.shape)} and {tuple(scale.shape)}"
            )
        frames = shift.shape[1]
        if frames == 0 or N % frames != 0:
            raise ValueError(f"{N} tokens do not split evenly into {frames} frames")
        tokens_per_frame = N // frames
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (C,):
            raise ValueError(f"{name} must be [{C}], got {tuple(p.shape)}")
    return tokens_per_frame


def layernorm_modulate_reference(
    x: torch.Tensor,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Plain-PyTorch oracle, the official ``modulate_fp32(LayerNorm_FP32, ...)`` math.

    x: [B, N, C]; shift, scale: [B, frames, C] (any float dtype, used in float32) or None;
    weight, bias: [C] affine of the norm or None. Statistics, affine and modulation in float32,
    one cast back to ``x.dtype`` at the end.
    """
    tokens_per_frame = check_layernorm_modulate_args(x, shift, scale, weight, bias)
    B, N, C = x.shape
    h = F.layer_norm(
        x.float(),
        (C,),
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    )
    if shift is not None:
        h = h.view(B, -1, tokens_per_frame, C)
        h = h * (scale.float()[:, :, None] + 1) + shift.float()[:, :, None]
        h = h.view(B, N, C)
    return h.to(x.dtype)
