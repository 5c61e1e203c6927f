"""qk_rmsnorm_rope3d: per-head RMSNorm of q and k, then 3D RoPE from each token's (t, h, w).

Layout: q and k are ``[B, N, heads, D]`` (token-major, as the fused qkv GEMM writes them; any
strides). Tokens are ordered t-major, then h, then w over a grid ``(T, Hh, Ww)``; ``t_offset``
shifts every token's frame index (queries of the last T frames of a longer KV-cached grid).

3D RoPE (SPEC section 3): the head vector is ``[t slice | h slice | w slice]`` of widths
``D - 4*(D//6), 2*(D//6), 2*(D//6)``; in each slice frequency ``i`` rotates channel pair
``(2i, 2i+1)`` by ``pos * 10000**(-2i/width)``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "rope3d_split",
    "rope3d_cos_sin",
    "rope3d_reference",
    "rmsnorm_reference",
    "qk_rmsnorm_rope3d_reference",
]

ROPE_BASE = 10000.0


def rope3d_split(head_dim: int) -> Tuple[int, int, int]:
    """Channel widths of the (t, h, w) slices of a head vector."""
    if head_dim % 8:
        raise ValueError(f"3D RoPE needs a head_dim that is a multiple of 8, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def _axis_freqs(width: int) -> torch.Tensor:
    # Same float32 expression as the official table so angles match bit for bit.
    return 1.0 / (ROPE_BASE ** (torch.arange(0, width, 2)[: width // 2].float() / width))


def rope3d_cos_sin(
    grid: Sequence[int], head_dim: int, t_offset: int = 0, device=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin tables ``[T*Hh*Ww, D]`` (each angle repeated for its channel pair)."""
    T, Hh, Ww = (int(g) for g in grid)
    d_t, d_h, d_w = rope3d_split(head_dim)
    angles = []
    for n, width, pos_offset in ((T, d_t, t_offset), (Hh, d_h, 0), (Ww, d_w, 0)):
        pos = torch.arange(n, dtype=torch.float32) + float(pos_offset)
        angles.append((pos[:, None] * _axis_freqs(width)[None]).repeat_interleave(2, dim=-1))
    a_t, a_h, a_w = angles
    table = torch.cat(
        [
            a_t[:, None, None, :].expand(T, Hh, Ww, d_t),
            a_h[None, :, None, :].expand(T, Hh, Ww, d_h),
            a_w[None, None, :, :].expand(T, Hh, Ww, d_w),
        ],
        dim=-1,
    ).reshape(T * Hh * Ww, head_dim)
    table = table.to(device)
    return table.cos(), table.sin()


def rope3d_reference(x: torch.Tensor, grid: Sequence[int], t_offset: int = 0) -> torch.Tensor:
    """3D RoPE of x ``[B, N, heads, D]`` in float32, cast back to x's dtype."""
    B, N, H, D = x.shape
    if N != grid[0] * grid[1] * grid[2]:
        raise ValueError(f"{N} tokens do not match the grid {tuple(grid)}")
    cos, sin = rope3d_cos_sin(grid, D, t_offset, x.device)
    xf = x.float()
    pairs = xf.unflatten(-1, (D // 2, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.to(x.dtype)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Official ``RMSNorm_FP32``: statistics in float32, cast back, then times the weight."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return normed * weight


def qk_rmsnorm_rope3d_reference(
    q: Optional[torch.Tensor],
    k: Optional[torch.Tensor],
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    grid: Optional[Sequence[int]] = None,
    t_offset: int = 0,
    eps: float = 1e-6,
    return_k_unroped: bool = False,
):
    """Normalize (when a weight is given) and rotate (when a grid is given) q and k.

    q, k: ``[B, N, heads, D]`` or None (skipped); q_weight/k_weight: ``[D]`` or None (no norm:
    the KV cache's keys are already normalized); grid: ``(T, Hh, Ww)`` of these tokens, or None
    for no RoPE (cross-attention). Returns ``(q_out, k_out)``, plus the normalized, un-rotated
    k when ``return_k_unroped`` (what the KV cache stores).
    """
    q_out = k_out = k_unroped = None
    if q is not None:
        q_out = rmsnorm_reference(q, q_weight, eps) if q_weight is not None else q
        if grid is not None:
            q_out = rope3d_reference(q_out, grid, t_offset)
    if k is not None:
        k_unroped = rmsnorm_reference(k, k_weight, eps) if k_weight is not None else k
        k_out = rope3d_reference(k_unroped, grid, t_offset) if grid is not None else k_unroped
    if return_k_unroped:
        return q_out, k_out, k_unroped
    return q_out, k_out
