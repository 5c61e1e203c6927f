"""Ring attention: the self-attention of a sequence split into ``ring`` segments, one per rank of
the mesh's ``ring`` group. Queries stay on their rank; keys and values travel around the ring
(``ring - 1`` transfers, each issued before the attention of the block in hand so the two
overlap), and the partial outputs over the key blocks merge exactly by their log-sum-exp
(the online-softmax rule, in float32).

Composed with Ulysses (runtime/parallel.py's ``ContextParallel`` holds both groups), the ring
segment of a rank is what its Ulysses all-to-all gathered: every frame's contiguous chunk
``[r * P/R, (r + 1) * P/R)`` of the ``P = H * W`` tokens per frame, frames in order. Design notes
(why that segmenting, conditioning, KV cache, BSA): docs/design/parallel.md, "Ring attention".
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..kernels.qk_rmsnorm_rope3d import rope3d_cos_sin
from .attention import attention_with_lse

__all__ = ["SoftmaxMerge", "merge_partials", "segment_rope_tables", "apply_rope", "ring_norm_rope", "ring_attention",
           "ring_self_attention"]


class SoftmaxMerge:
    """The running merge of attention partials over disjoint key sets: after ``add(out_i, lse_i)``
    for every set, :meth:`result` is the attention over their union. With ``m = logaddexp(m_acc,
    lse_i)``: ``acc = acc * exp(m_acc - m) + out_i * exp(lse_i - m)``, all in float32 (an
    fp16/bf16 partial is upcast first, so the merge adds no rounding of its own)."""

    def __init__(self):
        self.out: Optional[torch.Tensor] = None  # float32 [B, N, H, D]
        self.lse: Optional[torch.Tensor] = None  # float32 [B, N, H, 1]

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        lse = lse.float().transpose(1, 2).unsqueeze(-1)  # [B, H, N] -> [B, N, H, 1], out's layout
        if self.out is None:
            self.out, self.lse = out.float(), lse
            return
        m = torch.logaddexp(self.lse, lse)
        # A row whose scores are all -inf on both sides (no key: not produced by our callers) would
        # give -inf - -inf = NaN; subtracting 0 there keeps it at exp(-inf) = 0.
        m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        self.out = self.out * torch.exp(self.lse - m_safe) + out.float() * torch.exp(lse - m_safe)
        self.lse = m

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return self.out.to(dtype)


def merge_partials(parts: Sequence[Tuple[torch.Tensor, torch.Tensor]], dtype: Optional[torch.dtype] = None):
    """``[(out_i [B, N, H, D], lse_i [B, H, N]), ...]`` -> the merged output (``dtype``, default
    the first partial's)."""
    merge = SoftmaxMerge()
    for out, lse in parts:
        merge.add(out, lse)
    return merge.result(dtype or parts[0][0].dtype)


# -- RoPE at the segment's global positions -------------------------------------------------------

def segment_rope_tables(grid: Sequence[int], head_dim: int, t_offset: int, ring_rank: int, ring_size: int,
                        device) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin ``[T * P/R, D]`` of ring segment ``ring_rank``: the rows of the whole
    grid's table (kernels/qk_rmsnorm_rope3d.py's, so the angles are the single-device ones bit for
    bit) at the segment's tokens, each frame's chunk ``[r * P/R, (r + 1) * P/R)``. Built once per
    forward; every block's q and k reuse it."""
    T, Hh, Ww = (int(g) for g in grid)
    P = Hh * Ww
    c = P // ring_size
    cos, sin = rope3d_cos_sin((T, Hh, Ww), head_dim, t_offset)  # host tables [T*P, D]
    pick = lambda tab: tab.view(T, P, head_dim)[:, ring_rank * c:(ring_rank + 1) * c].reshape(T * c, head_dim)
    return pick(cos).to(device), pick(sin).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, N, heads, D]`` rotated by the tables ``[N, D]`` (channel pairs (2i, 2i+1)), in
    float32, cast back: the formula of ``rope3d_reference`` with the positions taken from a table
    instead of a grid (a ring segment is not a grid of its own)."""
    D = x.shape[-1]
    xf = x.float()
    pairs = xf.unflatten(-1, (D // 2, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]).to(x.dtype)


def ring_norm_rope(ops, q, k, q_weight, k_weight, tables):
    """``(q, k, k_unroped)`` of a ring segment: RMSNorm by the model's op (fused or reference, no
    grid: no RoPE), then :func:`apply_rope` with the segment's tables. ``k_unroped`` is what a
    returned KV cache stores."""
    q, k_unroped = ops.qk_rmsnorm_rope3d(q, k, q_weight, k_weight)
    return apply_rope(q, *tables), apply_rope(k_unroped, *tables), k_unroped


# -- the ring --------------------------------------------------------------------------------------

def ring_attention(cp, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_cond: int, backend: str,
                   kv_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Self-attention of this ring rank's segment against the whole sequence.

    q, k, v: ``[B, n, heads, D]`` (the segment, roped; every ring rank's segment has the same
    ``n``). ``num_cond``: the segment's conditioning tokens, its first ``num_cond`` (each frame's
    chunk is contiguous, so the first frames' chunks lead the segment): they attend only to the
    conditioning keys of every segment, the other queries to all keys (the single-device split,
    model.py). ``kv_cache``: cached (roped) ``(k, v)`` ``[B, Nc, heads, D]``, the whole cache
    for this rank's heads: extra keys for every query, attended here without any transfer.
    Returns ``[B, n, heads, D]`` in q's dtype."""
    R = cp.ring_size
    n = q.shape[1]
    if num_cond and kv_cache is not None:
        raise ValueError("ring attention: conditioning tokens and a KV cache in one call (the official call "
                         "keeps conditioning in the cache)")
    cond, noisy = SoftmaxMerge(), SoftmaxMerge()
    q_cond, q_noisy = q[:, :num_cond], q[:, num_cond:]
    if kv_cache is not None:
        noisy.add(*attention_with_lse(q_noisy, kv_cache[0], kv_cache[1], backend))
    kv = torch.stack((k, v))  # [2, B, n, heads, D]: what travels, one message per step
    for step in range(R):
        # The next block is on its way while this one is attended (an async collective in eager
        # mode; under torch.compile the scheduler sees the same dependency).
        incoming = cp.ring_pass(kv) if step < R - 1 else None
        kb, vb = kv[0], kv[1]
        if num_cond:
            cond.add(*attention_with_lse(q_cond, kb[:, :num_cond], vb[:, :num_cond], backend))
        if n > num_cond:
            noisy.add(*attention_with_lse(q_noisy, kb, vb, backend))
        del kb, vb
        if incoming is not None:
            kv = cp.ring_wait(incoming, kv)
    if not num_cond:
        return noisy.result(q.dtype)
    out = torch.empty_like(q)
    out[:, :num_cond] = cond.result(q.dtype)
    if n > num_cond:
        out[:, num_cond:] = noisy.result(q.dtype)
    return out


def ring_self_attention(q, k, v, ctx, ops, kv_cache=None) -> torch.Tensor:
    """The model's self-attention under a ring (model.py's ``ForwardContext`` ``ctx``): the
    segment's conditioning tokens are the first ``num_cond_latents`` frames' chunks; a KV cache's
    keys (normalized, un-rotated) are rotated on the cache's own grid, as on one device."""
    T, Hh, Ww = ctx.grid
    P = Hh * Ww
    cache = None
    if kv_cache is not None:
        k_cache, v_cache = kv_cache
        _, k_cache = ops.qk_rmsnorm_rope3d(None, k_cache, None, None, ctx.cache_grid)
        cache = (k_cache, v_cache)
    num_cond = ctx.num_cond_tokens // P * (P // ctx.cp.ring_size)
    return ring_attention(ctx.cp, q, k, v, num_cond, ctx.attention, cache)
