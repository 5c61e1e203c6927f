"""Context parallelism: one forward split over ``ring x cp_size`` ranks with torch.distributed:
Ulysses attention (the official scheme, over a 2D split of the token grid when alone) composed
with ring attention (runtime/ring.py). The process groups are runtime/mesh.py's (its ``ring``
and ``ulysses`` dimensions).

Design notes: docs/design/parallel.md.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["ContextParallel", "context_parallel", "optimal_split_hw", "resolve_split_hw", "comm_bytes_per_block"]


def optimal_split_hw(cp_size: int) -> Tuple[int, int]:
    """The most square ``(split_h, split_w)`` with ``split_h * split_w == cp_size`` and
    ``split_h <= split_w`` (video is wider than tall): 2 -> (1, 2), 4 -> (2, 2), 8 -> (2, 4)."""
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be a positive int, got {cp_size!r}")
    a = max(d for d in range(1, math.isqrt(cp_size) + 1) if cp_size % d == 0)
    return a, cp_size // a


def resolve_split_hw(cp_size: int, configured: Optional[Sequence[int]]) -> Tuple[int, int]:
    """The config's ``cp_split_hw`` when it multiplies to ``cp_size``; the optimal split when the
    config has none or the single-device default [1, 1]; an error otherwise."""
    if configured is not None:
        sh, sw = (int(v) for v in configured)
        if sh * sw == cp_size:
            return sh, sw
        if (sh, sw) != (1, 1):
            raise ValueError(f"cp_split_hw={list(configured)} splits the token grid into {sh * sw} tiles but "
                             f"cp_size={cp_size}; pass a split whose product is cp_size, or none")
    return optimal_split_hw(cp_size)


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("context parallelism needs torch.distributed, which this torch build lacks")
    return dist


class ContextParallel:
    """The split of one forward over the ranks of the mesh's ``ring`` x ``ulysses`` block
    (docs/design/parallel.md). ``group`` is every rank of that block (what the step cache's
    signal and the final gathers reduce over), ``ulysses_group`` the ranks that exchange heads,
    ``ring_group`` the ranks whose keys and values travel around the ring; a size-1 dimension's
    group is None. ``size`` counts the ranks one forward's tokens are split over (ring x Ulysses),
    ``rank`` is this rank's index among them (``ring_rank * ulysses_size + ulysses_rank``).

    Token layouts: Ulysses alone keeps the official 2D tiles of the (H, W) grid (``split_hw``);
    with a ring, every frame's ``P = H * W`` tokens (in (h, w) order) are cut into ``size`` equal
    contiguous chunks and rank ``c`` holds chunk ``c`` of every frame, so the Ulysses exchange of
    ring rank ``r``'s ranks assembles ring segment ``r``: chunk ``[r * P/R, (r + 1) * P/R)`` of
    every frame ("Ring attention" in the design note says why)."""

    def __init__(self, group, split_hw: Tuple[int, int], num_heads: int, device=None, ring_group=None,
                 cp_group=None):
        dist = _dist()
        device = torch.device("cpu") if device is None else torch.device(device)
        self.ulysses_group, self.ring_group = group, ring_group
        self.ulysses_size = dist.get_world_size(group) if group is not None else 1
        self.ulysses_rank = dist.get_rank(group) if group is not None else 0
        self.ring_size = dist.get_world_size(ring_group) if ring_group is not None else 1
        self.ring_rank = dist.get_rank(ring_group) if ring_group is not None else 0
        self.size = self.ring_size * self.ulysses_size
        self.rank = self.ring_rank * self.ulysses_size + self.ulysses_rank
        if cp_group is None:
            if self.ring_size > 1 and self.ulysses_size > 1:
                raise ValueError("ring x Ulysses context parallelism needs the group of all its ranks (cp_group)")
            cp_group = group if self.ring_size == 1 else ring_group
        self.group = cp_group
        self.split_h, self.split_w = (int(v) for v in split_hw)
        if self.ring_size > 1:
            if (self.split_h, self.split_w) != (1, 1):
                raise ValueError(f"cp_split_hw={list(split_hw)}: with ring attention the tokens are split in per-frame "
                                 "chunks, not 2D tiles; pass no cp_split_hw (or [1, 1])")
        elif self.split_h * self.split_w != self.ulysses_size:
            raise ValueError(f"cp_split_hw={list(split_hw)} has {self.split_h * self.split_w} tiles for "
                             f"{self.ulysses_size} ranks")
        if num_heads % self.ulysses_size:
            raise ValueError(f"context parallelism splits attention heads over ranks: num_heads={num_heads} is "
                             f"not divisible by cp_size={self.ulysses_size}")
        self.num_heads = num_heads
        self.local_heads = num_heads // self.ulysses_size
        self.device = device

    @property
    def ring(self) -> bool:
        """Ring attention is on (the per-frame chunk layout)."""
        return self.ring_size > 1

    def __repr__(self) -> str:
        if self.ring:
            return (f"ContextParallel(rank={self.rank}, size={self.size}, ring={self.ring_size}, "
                    f"ulysses={self.ulysses_size})")
        return f"ContextParallel(rank={self.rank}, size={self.size}, split_hw=({self.split_h}, {self.split_w}))"

    # -- the token split ------------------------------------------------------------------------
    def check_grid(self, grid: Tuple[int, int, int]) -> None:
        _, nh, nw = grid
        if self.ring:
            if (nh * nw) % self.size:
                raise ValueError(
                    f"ring attention over ring {self.ring_size} x Ulysses {self.ulysses_size} = {self.size} ranks "
                    f"splits each latent frame's token grid H x W = {nh} x {nw} = {nh * nw} tokens into {self.size} "
                    f"equal chunks: {nh * nw} is not divisible by {self.size} (latent H, W are twice the token "
                    "grid's; pick a resolution whose tokens per frame divide, or fewer ranks)")
            return
        if nh % self.split_h or nw % self.split_w:
            raise ValueError(
                f"context parallelism over {self.size} ranks splits the token grid H x W = {nh} x {nw} into "
                f"{self.split_h} x {self.split_w} tiles: H must be divisible by {self.split_h} and W by "
                f"{self.split_w} (latent H, W are twice the token grid's)"
            )

    def tile(self, grid: Tuple[int, int, int]) -> Tuple[int, int, int, int]:
        """This rank's token rows ``[h0, h1)`` and columns ``[w0, w1)`` (Ulysses' 2D tiles)."""
        _, nh, nw = grid
        hl, wl = nh // self.split_h, nw // self.split_w
        r, c = divmod(self.rank, self.split_w)
        return r * hl, (r + 1) * hl, c * wl, (c + 1) * wl

    def local_latents(self, x: torch.Tensor, patch: Tuple[int, int, int]) -> torch.Tensor:
        """[B, C, T, H, W] latents -> this rank's spatial tile (a view; Ulysses' 2D tiles)."""
        T, H, W = x.shape[2:]
        h0, h1, w0, w1 = self.tile((T // patch[0], H // patch[1], W // patch[2]))
        return x[:, :, :, h0 * patch[1]: h1 * patch[1], w0 * patch[2]: w1 * patch[2]]

    def local_tokens(self, x: torch.Tensor, grid) -> torch.Tensor:
        """[B, T*P, F] tokens in global order -> this rank's chunk of every frame [B, T*P/size, F]
        (the ring layout)."""
        T, nh, nw = grid
        c = nh * nw // self.size
        B, F = x.shape[0], x.shape[-1]
        return x.view(B, T, nh * nw, F)[:, :, self.rank * c:(self.rank + 1) * c].reshape(B, T * c, F)

    def local_heads_of(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's heads of a full-head tensor (a view)."""
        return t.narrow(dim, self.ulysses_rank * self.local_heads, self.local_heads)

    # -- collectives ----------------------------------------------------------------------------
    def _all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Over the Ulysses group."""
        import torch.distributed._functional_collectives as funcol

        return _wait(funcol.all_to_all_single(x.contiguous(), None, None, self.ulysses_group))

    def _all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x -> [size, *x.shape], rank-major, over every context-parallel rank (``group``)."""
        import torch.distributed._functional_collectives as funcol

        # all_gather_single is the newer name (torch >= 2.10); same op.
        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
        out = _wait(gather(x.contiguous(), 0, self.group))
        return out.view(self.size, *x.shape)

    def ring_pass(self, x: torch.Tensor):
        """Start sending ``x`` to the next ring rank and receiving the previous one's (same shape):
        one functional ``permute_tensor`` (traceable; in eager mode it returns at once and the
        transfer runs while the caller computes). :meth:`ring_wait` gives the received tensor."""
        import torch.distributed._functional_collectives as funcol

        R = self.ring_size
        return funcol.permute_tensor(x.contiguous().view(-1), [(i + 1) % R for i in range(R)], self.ring_group)

    def ring_wait(self, incoming, like: torch.Tensor) -> torch.Tensor:
        return _wait(incoming).view(like.shape)

    def _rank_major_to_global(self, x: torch.Tensor, grid, trailing: int) -> torch.Tensor:
        """[size, B, T*hl*wl, *rest] (per-rank tiles) -> [B, T*Nh*Nw, *rest] in (t, h, w) order."""
        T, nh, nw = grid
        hl, wl = nh // self.split_h, nw // self.split_w
        rest = x.shape[3:]
        B = x.shape[1]
        x = x.view(self.split_h, self.split_w, B, T, hl, wl, *rest)
        x = x.permute(2, 3, 0, 4, 1, 5, *range(6, 6 + len(rest)))  # B, T, sh, hl, sw, wl, rest
        return x.reshape(B, T * nh * nw, *rest)

    def _global_to_rank_major(self, x: torch.Tensor, grid) -> torch.Tensor:
        """[B, T*Nh*Nw, *rest] -> [size, B, T*hl*wl, *rest] (tile of rank r at index r)."""
        T, nh, nw = grid
        hl, wl = nh // self.split_h, nw // self.split_w
        B, rest = x.shape[0], x.shape[2:]
        x = x.reshape(B, T, self.split_h, hl, self.split_w, wl, *rest)
        x = x.permute(2, 4, 0, 1, 3, 5, *range(6, 6 + len(rest)))  # sh, sw, B, T, hl, wl, rest
        return x.reshape(self.size, B, T * hl * wl, *rest)

    @staticmethod
    def _chunks_to_frames(x: torch.Tensor, T: int) -> torch.Tensor:
        """[K, B, T*c, *rest] (chunk k of every frame at index k) -> [B, T*K*c, *rest], each
        frame's chunks side by side in chunk order."""
        K, B, n = x.shape[:3]
        rest = x.shape[3:]
        x = x.view(K, B, T, n // T, *rest).permute(1, 2, 0, 3, *range(4, 4 + len(rest)))
        return x.reshape(B, n * K, *rest)

    @staticmethod
    def _frames_to_chunks(x: torch.Tensor, T: int, K: int) -> torch.Tensor:
        """The inverse: [B, T*K*c, *rest] -> [K, B, T*c, *rest]."""
        B, n = x.shape[:2]
        rest = x.shape[2:]
        x = x.reshape(B, T, K, n // (T * K), *rest).permute(2, 0, 1, 3, *range(4, 4 + len(rest)))
        return x.reshape(K, B, n // K, *rest)

    def tokens_to_heads(self, x: torch.Tensor, grid) -> torch.Tensor:
        """[B, n_local, S, heads, D] (this rank's tokens, all heads; S stacked tensors such as q|k|v)
        -> [B, N', S, heads/ulysses, D], this rank's heads of: every token in global order
        (Ulysses alone), or this ring rank's segment, frames in order (with a ring)."""
        if self.ulysses_size == 1:
            return x  # a ring alone: the rank's chunks are its segment already
        B, n, S, H, D = x.shape
        U = self.ulysses_size
        x = x.view(B, n, S, U, H // U, D).permute(3, 0, 1, 2, 4, 5)  # dest rank first
        y = self._all_to_all(x)  # [U (source rank), B, n, S, H/U, D]
        if self.ring:
            return self._chunks_to_frames(y, grid[0])
        return self._rank_major_to_global(y, grid, 3)

    def heads_to_tokens(self, x: torch.Tensor, grid) -> torch.Tensor:
        """[B, N', heads/ulysses, D] (what :meth:`tokens_to_heads` gave) -> [B, n_local, heads, D]:
        the inverse exchange."""
        if self.ulysses_size == 1:
            return x
        if self.ring:
            send = self._frames_to_chunks(x, grid[0], self.ulysses_size)
        else:
            send = self._global_to_rank_major(x, grid)
        y = self._all_to_all(send)  # [U (head group), B, n, H/U, D]
        U, B, n, Hl, D = y.shape
        return y.permute(1, 2, 0, 3, 4).reshape(B, n, U * Hl, D)

    def gather_heads(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        """[B, N', heads/ulysses, D] -> [B, N, heads, D] in global order (for a returned KV cache;
        ``grid`` is needed with a ring, whose segments are gathered too)."""
        y = self._all_gather(x)  # [size, B, N', Hl, D]
        size, B, n, Hl, D = y.shape
        if not self.ring:
            return y.permute(1, 2, 0, 3, 4).reshape(B, n, size * Hl, D)
        R, U, T = self.ring_size, self.ulysses_size, grid[0]
        y = y.view(R, U, B, T, n // T, Hl, D).permute(2, 3, 0, 4, 1, 5, 6)  # B, T, R, P/R, U, Hl, D
        return y.reshape(B, n * R, U * Hl, D)

    def gather_tokens(self, x: torch.Tensor, grid) -> torch.Tensor:
        """[B, n_local, F] -> [B, N, F] in global (t, h, w) order (the final layer's output)."""
        if self.ring:
            return self._chunks_to_frames(self._all_gather(x), grid[0])
        return self._rank_major_to_global(self._all_gather(x), grid, 1)


def context_parallel(par, split_hw: Tuple[int, int], num_heads: int, device) -> Optional[ContextParallel]:
    """The :class:`ContextParallel` of a :class:`~longcat_native.runtime.mesh.Parallel` (None when
    its ring x Ulysses block is one rank). With both a ring and Ulysses, the group of the whole
    block is made here: ``new_group`` is collective over the world, so every rank makes every
    block's group, in the same order (the block of ranks ``[i*R*U, (i+1)*R*U)``: ring and ulysses
    are the mesh's innermost dimensions)."""
    R, U = par.size("ring"), par.size("ulysses")
    if R * U == 1:
        return None
    cp_group = None
    if R > 1 and U > 1:
        dist = _dist()
        world = par.config.world_size
        mine = par.rank // (R * U)
        for i in range(world // (R * U)):
            g = dist.new_group(list(range(i * R * U, (i + 1) * R * U)))
            if i == mine:
                cp_group = g
    return ContextParallel(par.group("ulysses") if U > 1 else None, split_hw, num_heads, device,
                           ring_group=par.group("ring") if R > 1 else None, cp_group=cp_group)


def _wait(t: torch.Tensor) -> torch.Tensor:
    """Functional collectives return an async wrapper in eager mode; wait explicitly so no
    collective is left in flight (and so the result is a plain tensor)."""
    wait = getattr(t, "wait", None)
    return wait() if callable(wait) else t


def comm_bytes_per_block(cp_size: int, batch: int, tokens: int, hidden: int, dtype_bytes: int = 2,
                         return_kv: bool = False, ring_size: int = 1) -> dict:
    """Bytes each rank sends per block (it receives as many). ``cp_size`` is the Ulysses size
    ``U``, ``ring_size`` the ring's ``R``; a rank holds ``tokens / (R*U)`` tokens of the sequence.

    - ``qkv_all_to_all`` (3 tensors) and ``out_all_to_all`` (the attention output's way back):
      ``(U-1)/U`` of each local ``[B, N/(R*U), C]`` tensor leaves the rank;
    - ``ring_kv``: the ``R - 1`` ring steps, each sending this rank's k and v of its segment and
      heads, ``2 x [B, N/R, C/U]``;
    - ``kv_all_gather`` (``return_kv``): k and v of the rank's part go to each of its ``R*U - 1``
      peers. (A KV cache passed in costs nothing: every rank attends its heads of the whole cache.)"""
    U, R = cp_size, ring_size
    P = U * R
    local = batch * tokens * hidden * dtype_bytes / P  # one [B, N/P, C] tensor
    frac = (U - 1) / U
    out = {"qkv_all_to_all": 3 * local * frac, "out_all_to_all": local * frac}
    if R > 1:
        out["ring_kv"] = 2 * local * (R - 1)  # [B, N/R, C/U] is as large as [B, N/P, C]
    if return_kv:
        out["kv_all_gather"] = 2 * local * (P - 1)
    out["total"] = sum(out.values())
    return out
