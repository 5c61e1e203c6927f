"""Attention dispatch: one place that turns q, k, v into an attention output.

Tensors are token-major ``[B, N, heads, D]`` (what the qkv GEMM and the fused RoPE kernel
write); backends that want ``[B, heads, N, D]`` get transposed views, never copies.

Backends:
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (every device; on CUDA it
  dispatches to its flash/memory-efficient kernels).
- ``reference``: explicit float32 softmax attention, the oracle; memory is bounded by
  processing queries in chunks.
FlashAttention-2/3 backends arrive with the attention issue; asking for them now is a clear error.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["ATTENTION_BACKENDS", "resolve_attention_backend", "attention"]

ATTENTION_BACKENDS = ("sdpa", "reference")
_PLANNED_BACKENDS = {"flash3": "flash_attn_interface", "flash2": "flash_attn"}

# The reference backend materializes [B, heads, q_chunk, Nk] float32 scores; chunking the
# queries keeps that near 256 MiB whatever the sequence length.
_REFERENCE_SCORE_BYTES = 256 * 2**20


def resolve_attention_backend(name: str, device: torch.device) -> str:
    if name == "auto":
        return "sdpa"
    if name in ATTENTION_BACKENDS:
        return name
    if name in _PLANNED_BACKENDS:
        pkg = _PLANNED_BACKENDS[name]
        have = importlib.util.find_spec(pkg) is not None
        raise ValueError(
            f"attention={name!r} is not supported by this version of longcat-native yet"
            + ("" if have else f" (it would also need the `{pkg}` package: pip install 'longcat-native[cuda]')")
            + "; use attention='sdpa' or 'auto'"
        )
    raise ValueError(f"unknown attention backend {name!r}; choose 'auto', {', '.join(map(repr, ATTENTION_BACKENDS))}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str,
    key_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Softmax attention with scale D**-0.5. q [B, Nq, H, D], k/v [B, Nk, H, D] -> [B, Nq, H, D].

    key_valid: optional bool [B, Nk]; each batch item attends only to its valid keys. An item
    with no valid key gets a zero output (what flash-attn's varlen kernels return).
    """
    if q.shape[1] == 0:
        return q.new_empty(q.shape)
    if backend == "sdpa":
        return _attention_sdpa(q, k, v, key_valid)
    if backend == "reference":
        return _attention_reference(q, k, v, key_valid)
    raise ValueError(f"unknown attention backend {backend!r}")


def _attention_sdpa(q, k, v, key_valid):
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    out = out.transpose(1, 2)
    if key_valid is not None:
        # Rows with every key masked come out NaN from SDPA; flash-attn varlen returns 0.
        out = torch.where(key_valid.any(dim=1)[:, None, None, None], out, out.new_zeros(()))
    return out


def _attention_reference(q, k, v, key_valid):
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    scale = D**-0.5
    kf, vf = k.float(), v.float()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    chunk = max(1, _REFERENCE_SCORE_BYTES // max(1, B * H * Nk * 4))
    for s in range(0, Nq, chunk):
        qf = q[:, s : s + chunk].float()
        scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if key_valid is not None:
            probs = torch.nan_to_num(probs, nan=0.0)
        out[:, s : s + chunk] = torch.einsum("bhqk,bkhd->bqhd", probs, vf).to(q.dtype)
    return out
