"""Context parallelism: one forward split over ``cp_size`` ranks with torch.distributed (the
official scheme: Ulysses attention over a 2D split of the token grid). The process groups are
runtime/mesh.py's (this is its ``ulysses`` dimension).

Design notes: docs/design/parallel.md.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["ContextParallel", "optimal_split_hw", "resolve_split_hw", "comm_bytes_per_block"]


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
    """The split of one forward over the ranks of ``group`` (the mesh's ``ulysses`` group;
    docs/design/parallel.md)."""

    def __init__(self, group, split_hw: Tuple[int, int], num_heads: int, device=None):
        dist = _dist()
        self.group = group
        device = torch.device("cpu") if device is None else torch.device(device)
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.split_h, self.split_w = (int(v) for v in split_hw)
        if self.split_h * self.split_w != self.size:
            raise ValueError(f"cp_split_hw={list(split_hw)} has {self.split_h * self.split_w} tiles for "
                             f"{self.size} ranks")
        if num_heads % self.size:
            raise ValueError(f"context parallelism splits attention heads over ranks: num_heads={num_heads} is "
                             f"not divisible by cp_size={self.size}")
        self.num_heads = num_heads
        self.local_heads = num_heads // self.size
        self.device = device

    def __repr__(self) -> str:
        return f"ContextParallel(rank={self.rank}, size={self.size}, split_hw=({self.split_h}, {self.split_w}))"

    # -- the token split ------------------------------------------------------------------------
    def check_grid(self, grid: Tuple[int, int, int]) -> None:
        _, nh, nw = grid
        if nh % self.split_h or nw % self.split_w:
            raise ValueError(
                f"context parallelism over {self.size} ranks splits the token grid H x W = {nh} x {nw} into "
                f"{self.split_h} x {self.split_w} tiles: H must be divisible by {self.split_h} and W by "
                f"{self.split_w} (latent H, W are twice the token grid's)"
            )

    def tile(self, grid: Tuple[int, int, int]) -> Tuple[int, int, int, int]:
        """This rank's token rows ``[h0, h1)`` and columns ``[w0, w1)``."""
        _, nh, nw = grid
        hl, wl = nh // self.split_h, nw // self.split_w
        r, c = divmod(self.rank, self.split_w)
        return r * hl, (r + 1) * hl, c * wl, (c + 1) * wl

    def local_latents(self, x: torch.Tensor, patch: Tuple[int, int, int]) -> torch.Tensor:
        """[B, C, T, H, W] latents -> this rank's spatial tile (a view)."""
        T, H, W = x.shape[2:]
        h0, h1, w0, w1 = self.tile((T // patch[0], H // patch[1], W // patch[2]))
        return x[:, :, :, h0 * patch[1]: h1 * patch[1], w0 * patch[2]: w1 * patch[2]]

    def local_heads_of(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's heads of a full-head tensor (a view)."""
        return t.narrow(dim, self.rank * self.local_heads, self.local_heads)

    # -- collectives ----------------------------------------------------------------------------
    def _all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed._functional_collectives as funcol

        return _wait(funcol.all_to_all_single(x.contiguous(), None, None, self.group))

    def _all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x -> [size, *x.shape], rank-major."""
        import torch.distributed._functional_collectives as funcol

        # all_gather_single is the newer name (torch >= 2.10); same op.
        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
        out = _wait(gather(x.contiguous(), 0, self.group))
        return out.view(self.size, *x.shape)

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

    def tokens_to_heads(self, x: torch.Tensor, grid) -> torch.Tensor:
        """[B, n_local, S, heads, D] (this rank's tokens, all heads; S stacked tensors such as q|k|v)
        -> [B, N, S, heads/size, D] (every token in global order, this rank's heads)."""
        B, n, S, H, D = x.shape
        x = x.view(B, n, S, self.size, H // self.size, D).permute(3, 0, 1, 2, 4, 5)  # dest rank first
        y = self._all_to_all(x)  # [size (source rank), B, n, S, H/size, D]
        return self._rank_major_to_global(y, grid, 3)

    def heads_to_tokens(self, x: torch.Tensor, grid) -> torch.Tensor:
        """[B, N, heads/size, D] (global order) -> [B, n_local, heads, D]: the inverse exchange."""
        y = self._all_to_all(self._global_to_rank_major(x, grid))  # [size (head group), B, n, H/size, D]
        size, B, n, Hl, D = y.shape
        return y.permute(1, 2, 0, 3, 4).reshape(B, n, size * Hl, D)

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, heads/size, D] -> [B, N, heads, D] (for a returned KV cache)."""
        y = self._all_gather(x)  # [size, B, N, H/size, D]
        size, B, N, Hl, D = y.shape
        return y.permute(1, 2, 0, 3, 4).reshape(B, N, size * Hl, D)

    def gather_tokens(self, x: torch.Tensor, grid) -> torch.Tensor:
        """[B, n_local, F] -> [B, N, F] in global (t, h, w) order (the final layer's output)."""
        return self._rank_major_to_global(self._all_gather(x), grid, 1)


def _wait(t: torch.Tensor) -> torch.Tensor:
    """Functional collectives return an async wrapper in eager mode; wait explicitly so no
    collective is left in flight (and so the result is a plain tensor)."""
    wait = getattr(t, "wait", None)
    return wait() if callable(wait) else t


def comm_bytes_per_block(cp_size: int, batch: int, tokens: int, hidden: int, dtype_bytes: int = 2,
                         return_kv: bool = False) -> dict:
    """Bytes each rank sends per block (it receives as many): the qkv all-to-all (3 tensors) and
    the attention output's way back, where ``(P-1)/P`` of each local tensor leaves the rank; with
    ``return_kv`` the all-gather of k and v, where the rank's part goes to each of ``P-1`` peers."""
    P = cp_size
    local = batch * tokens * hidden * dtype_bytes / P  # one [B, N/P, C] tensor
    frac = (P - 1) / P
    out = {"qkv_all_to_all": 3 * local * frac, "out_all_to_all": local * frac}
    if return_kv:
        out["kv_all_gather"] = 2 * local * (P - 1)
    out["total"] = sum(out.values())
    return out
