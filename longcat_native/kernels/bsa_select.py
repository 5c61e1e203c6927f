"""Block-sparse attention's chunk selection: the 3D-chunk geometry shared with the attention
kernel, the official selection (mean-pooled chunks, top-k / cdf over their scores) as the
plain-PyTorch oracle, the Triton pooling kernel, and the ``bsa_select`` custom op.

The attention over the selected chunks is ``block_sparse_attention.py``; together they are the
official ``flash_attn_bsa_3d`` call. Design notes: docs/design/block_sparse_attention.md.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from ._common import (
    LIBRARY_NAMESPACE,
    WORKSPACE_BYTES,
    allocator_bytes,
    check_triton_device,
    import_triton,
    needs_int64_offsets,
    next_power_of_2,
)

__all__ = [
    "bsa_grid_tiles",
    "bsa_num_selected_topk",
    "bsa_select_from_pooled",
    "bsa_selection_mask",
    "bsa_mask_to_indices",
    "bsa_to_chunk_order",
    "bsa_from_chunk_order",
    "bsa_pool_reference",
    "bsa_select_reference",
    "bsa_select",
    "MAX_HEAD_DIM",
]

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SELECT_SCORE_ELEMS = 1 << 28  # chunk scores scored/selected at once (heads are grouped to fit)

# ---------------------------------------------------------------------------------------------
# Geometry and argument checks
# ---------------------------------------------------------------------------------------------


def _ints3(x, what) -> Tuple[int, int, int]:
    try:
        t = tuple(int(v) for v in x)
    except TypeError:
        raise ValueError(f"{what} must be 3 integers (t, h, w), got {x!r}") from None
    if len(t) != 3:
        raise ValueError(f"{what} must be 3 integers (t, h, w), got {x!r}")
    return t


def bsa_grid_tiles(latent_shape: Sequence[int], chunk_3d_shape: Sequence[int]) -> bool:
    """Whether the token grid ``(T, H, W)`` tiles exactly into chunks of ``(ct, ch, cw)``."""
    g = _ints3(latent_shape, "latent_shape")
    c = _ints3(chunk_3d_shape, "chunk_3d_shape")
    return all(ci > 0 and gi > 0 and gi % ci == 0 for gi, ci in zip(g, c))


class _Geom(NamedTuple):
    """A token grid cut into chunks, with the raster row of (chunk, token-in-chunk):
    ``row = ct_i*s_ct + ch_i*s_ch + cw_i*s_cw + rt*s_t + rh*s_h + rw``."""

    n_chunks: int
    chunk_size: int
    chunk: Tuple[int, int, int]
    nch: int  # chunks along h
    ncw: int  # chunks along w
    s_ct: int
    s_ch: int
    s_cw: int
    s_t: int
    s_h: int


def _geometry(grid, chunk) -> _Geom:
    T, Hh, Ww = grid
    ct, ch, cw = chunk
    nt, nh, nw = T // ct, Hh // ch, Ww // cw
    return _Geom(nt * nh * nw, ct * ch * cw, (ct, ch, cw), nh, nw, ct * Hh * Ww, ch * Ww, cw, Hh * Ww, Ww)


def _check_grid(name, grid, chunk, n_tokens):
    if any(g <= 0 for g in grid):
        raise ValueError(f"latent_shape_{name} must be positive, got {grid}")
    if any(c <= 0 for c in chunk):
        raise ValueError(f"chunk_3d_shape_{name} must be positive, got {chunk}")
    n_grid = grid[0] * grid[1] * grid[2]
    if n_grid != n_tokens:
        raise ValueError(f"{name} has {n_tokens} tokens but latent_shape_{name} {grid} has {n_grid}")
    if any(g % c for g, c in zip(grid, chunk)):
        raise ValueError(
            f"block-sparse attention needs the {name} grid {grid} to tile into chunks {chunk} "
            "(every grid dim a multiple of the chunk dim); pad the latent or use dense attention "
            "(bsa_grid_tiles() checks this in advance)"
        )


def bsa_num_selected_topk(sparsity: float, n_k_chunks: int) -> int:
    """The official top-k count ``int((1 - sparsity) * n_k)`` (Python float arithmetic)."""
    return int((1 - sparsity) * n_k_chunks)


def _check_params(sparsity, cdf_threshold, n_k_chunks):
    if sparsity is None and cdf_threshold is None:
        raise ValueError("block-sparse attention needs sparsity or cdf_threshold (or both)")
    if sparsity is not None and not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if cdf_threshold is not None and not (0.0 < float(cdf_threshold) <= 1.0):
        raise ValueError(f"cdf_threshold must be in (0, 1], got {cdf_threshold}")
    if cdf_threshold is None and bsa_num_selected_topk(float(sparsity), n_k_chunks) == 0:
        raise ValueError(
            f"sparsity {sparsity} over {n_k_chunks} key chunks selects no chunk "
            f"(int((1 - sparsity) * n_k) == 0); lower the sparsity or use smaller chunks"
        )


def _index_width(sparsity, cdf_threshold, n_k_chunks) -> int:
    """Last dim of the selected-indices tensor: the most chunks a query chunk can select.

    cdf: the m largest of n weights sum to at least m / n, so ``cdf[m-1] <= threshold`` needs
    ``m <= threshold * n`` (1% + 1 slack for the rounding of low-precision cumulative sums)."""
    n_topk = 0 if sparsity is None else bsa_num_selected_topk(float(sparsity), n_k_chunks)
    if cdf_threshold is None:
        return n_topk
    n_cdf = int(math.ceil(float(cdf_threshold) * n_k_chunks * 1.01)) + 1
    return min(n_k_chunks, max(n_topk, n_cdf))


def _check_qkv(q, k, v, latent_shape_q, latent_shape_k, chunk_q, chunk_k):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x is None:
            continue
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, heads, tokens, head_dim], got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    ref = [x for x in (q, k, v) if x is not None]
    for x in ref[1:]:
        if x.dtype != ref[0].dtype or x.device != ref[0].device:
            raise ValueError("q, k and v must share dtype and device")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch, heads and head_dim")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must have the shape of k {tuple(k.shape)}")
    grid_q = _ints3(latent_shape_q, "latent_shape_q")
    grid_k = _ints3(latent_shape_k, "latent_shape_k")
    chunk_q = _ints3(chunk_q, "chunk_3d_shape_q")
    chunk_k = _ints3(chunk_k, "chunk_3d_shape_k")
    _check_grid("q", grid_q, chunk_q, q.shape[2])
    _check_grid("k", grid_k, chunk_k, k.shape[2])
    return grid_q, grid_k, chunk_q, chunk_k

# ---------------------------------------------------------------------------------------------
# Plain-PyTorch reference of the selection (the oracle)
# ---------------------------------------------------------------------------------------------


def bsa_to_chunk_order(x: torch.Tensor, grid, chunk) -> torch.Tensor:
    """x ``[B, H, T*Hh*Ww, D]`` in raster order -> 3D-chunk order (the official rearrange
    ``b h (nt ct) (nh ch) (nw cw) d -> b h (nt nh nw ct ch cw) d``); a copy."""
    B, H, _, D = x.shape
    (T, Hh, Ww), (ct, ch, cw) = grid, chunk
    x = x.reshape(B, H, T // ct, ct, Hh // ch, ch, Ww // cw, cw, D).permute(0, 1, 2, 4, 6, 3, 5, 7, 8)
    return x.reshape(B, H, T * Hh * Ww, D)


def bsa_from_chunk_order(x: torch.Tensor, grid, chunk) -> torch.Tensor:
    """The inverse of :func:`bsa_to_chunk_order`: 3D-chunk order -> raster order."""
    B, H, _, D = x.shape
    (T, Hh, Ww), (ct, ch, cw) = grid, chunk
    x = x.reshape(B, H, T // ct, Hh // ch, Ww // cw, ct, ch, cw, D).permute(0, 1, 2, 5, 3, 6, 4, 7, 8)
    return x.reshape(B, H, T * Hh * Ww, D)


def bsa_pool_reference(x_chunk_order: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Official ``mean_pooling_compression``: ``[B, H, n*cs, D] -> [B, H, n, D]`` in x's dtype."""
    B, H, S, D = x_chunk_order.shape
    return x_chunk_order.reshape(B, H, S // chunk_size, chunk_size, D).mean(dim=3)


def bsa_select_from_pooled(
    q_pool: torch.Tensor,
    k_pool: torch.Tensor,
    sparsity: Optional[float],
    cdf_threshold: Optional[float],
    sm_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The official selection (``get_select_indices``) from pooled chunks, on the device.

    q_pool ``[B, H, n_q, D]``, k_pool ``[B, H, n_k, D]`` (the official computes in the input
    dtype; so does this). Returns ``(indices, counts)``: int32 ``[B, H, n_q, S]`` and int32
    ``[B, H, n_q]``; query chunk i attends key chunks ``indices[..., i, :counts[..., i]]``.
    Top-k indices come sorted ascending; cdf indices in descending weight order.
    """
    score = torch.matmul(q_pool, k_pool.transpose(-1, -2))
    n_k = score.shape[-1]
    if cdf_threshold is None:
        n_sel = bsa_num_selected_topk(float(sparsity), n_k)
        idx = torch.topk(score, n_sel, dim=-1).indices
        idx = torch.sort(idx, dim=-1).values
        counts = torch.full(score.shape[:-1], n_sel, dtype=torch.int32, device=score.device)
        return idx.to(torch.int32).contiguous(), counts
    weights = torch.softmax(score * sm_scale, dim=-1)
    # The official sorts all n_k weights; only the first _index_width() can be selected (the m
    # largest of n_k weights carry at least m / n_k of the mass), so a sorted top-k of that
    # width gives the same prefix sums and counts with less memory.
    width = _index_width(sparsity, cdf_threshold, n_k)
    w_sorted = torch.topk(weights, width, dim=-1, largest=True, sorted=True)
    cdf = torch.cumsum(w_sorted.values, dim=-1)
    thr = torch.full(score.shape[:-1] + (1,), float(cdf_threshold), dtype=torch.float32, device=score.device)
    counts = torch.searchsorted(cdf, thr, right=True).squeeze(-1)
    if sparsity is not None:
        counts = counts.clamp(min=bsa_num_selected_topk(float(sparsity), n_k))
    return w_sorted.indices.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


def bsa_selection_mask(indices: torch.Tensor, counts: torch.Tensor, n_k_chunks: int) -> torch.Tensor:
    """bool ``[B, H, n_q, n_k]``: True where query chunk i attends key chunk j."""
    pos = torch.arange(indices.shape[-1], device=indices.device)
    valid = pos < counts[..., None].to(pos.dtype)
    mask = torch.zeros(indices.shape[:-1] + (n_k_chunks,), dtype=torch.bool, device=indices.device)
    return mask.scatter(-1, indices.long(), valid)


def bsa_mask_to_indices(block_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """bool ``[B, H, n_q, n_k]`` -> ``(indices int32 [B, H, n_q, n_k], counts int32 [B, H, n_q])``
    (selected chunks first, ascending)."""
    counts = block_mask.sum(-1).to(torch.int32)
    idx = torch.argsort((~block_mask).to(torch.int8), dim=-1, stable=True)
    return idx.to(torch.int32).contiguous(), counts.contiguous()


def bsa_select_reference(
    q, k, latent_shape_q, latent_shape_k, sparsity=0.875, cdf_threshold=None,
    chunk_3d_shape_q=(4, 4, 8), chunk_3d_shape_k=(4, 4, 8),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Official selection from raster-order q, k: ``(indices, counts)`` as :func:`bsa_select_from_pooled`."""
    grid_q, grid_k, chunk_q, chunk_k = _check_qkv(q, k, None, latent_shape_q, latent_shape_k,
                                                  chunk_3d_shape_q, chunk_3d_shape_k)
    n_k = math.prod([g // c for g, c in zip(grid_k, chunk_k)])  # a list: dynamo cannot trace prod(<generator>)
    _check_params(sparsity, cdf_threshold, n_k)
    q_pool = bsa_pool_reference(bsa_to_chunk_order(q, grid_q, chunk_q), math.prod(chunk_q))
    k_pool = bsa_pool_reference(bsa_to_chunk_order(k, grid_k, chunk_k), math.prod(chunk_k))
    return bsa_select_from_pooled(q_pool, k_pool, sparsity, cdf_threshold, q.shape[-1] ** -0.5)

# ---------------------------------------------------------------------------------------------
# Triton kernels (the chunk helpers are shared with the attention kernel)
# ---------------------------------------------------------------------------------------------


triton, tl = import_triton()


@triton.jit
def _chunk_base(c, NCH, NCW, S_CT, S_CH, S_CW):
    """Row of the first token of chunk ``c`` (a scalar; chunks in raster order of the chunk grid)."""
    return (c // (NCH * NCW)) * S_CT + ((c // NCW) % NCH) * S_CH + (c % NCW) * S_CW


@triton.jit
def _in_chunk_rows(r, S_T, S_H, C_H: tl.constexpr, C_W: tl.constexpr):
    """Row offsets from their chunk's first token of tokens ``r`` (a vector, token-in-chunk indices)."""
    return (r // (C_H * C_W)) * S_T + ((r // C_W) % C_H) * S_H + r % C_W


@triton.jit
def _chunk_rows(c, r, NCH, NCW, S_CT, S_CH, S_CW, S_T, S_H, C_H: tl.constexpr, C_W: tl.constexpr):
    """Rows of tokens ``r`` (a vector, token-in-chunk indices) of chunk ``c`` (a scalar)."""
    return _chunk_base(c, NCH, NCW, S_CT, S_CH, S_CW) + _in_chunk_rows(r, S_T, S_H, C_H, C_W)


@triton.jit
def _bsa_pool_kernel(
    x_ptr, out_ptr,
    H, NC,
    s_b, s_h, s_n, s_d,
    NCH, NCW, S_CT, S_CH, S_CW, S_T, S_H,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    CS: tl.constexpr,
    C_H: tl.constexpr,
    C_W: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """out[b, h, c, :] = float32 mean of chunk c's tokens (one program per (chunk, b*h))."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    base = x_ptr + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
    d = tl.arange(0, D_PAD)
    dmask = d < D
    acc = tl.zeros([BLOCK, D_PAD], dtype=tl.float32)
    for r0 in range(0, CS, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        rows = _chunk_rows(c, r, NCH, NCW, S_CT, S_CH, S_CW, S_T, S_H, C_H, C_W)
        if USE_INT64:
            rows = rows.to(tl.int64)
        x = tl.load(base + rows[:, None] * s_n + d[None, :] * s_d, mask=(r < CS)[:, None] & dmask[None, :], other=0.0)
        acc += x.to(tl.float32)
    pooled = tl.sum(acc, axis=0) / CS
    tl.store(out_ptr + (bh.to(tl.int64) * NC + c) * D + d, pooled, mask=dmask)


def _d_pad(head_dim: int) -> int:
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"block-sparse attention supports head_dim up to {MAX_HEAD_DIM}, got {head_dim}")
    return max(16, next_power_of_2(head_dim))


def _geom_args(g: _Geom):
    return (g.s_ct, g.s_ch, g.s_cw, g.s_t, g.s_h)


def _bsa_pool_launch(x: torch.Tensor, geom: _Geom, out: torch.Tensor, *, _force_int64: bool = False) -> torch.Tensor:
    """Mean of every chunk of x ``[B, H, N, D]`` (any strides, tokens laid out as ``geom``) into
    the preallocated float32 contiguous ``out`` ``[B, H, n_chunks, D]``."""
    B, H, _, D = x.shape
    if out.shape != (B, H, geom.n_chunks, D) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 {(B, H, geom.n_chunks, D)} tensor")
    check_triton_device(x, out)
    if out.numel() == 0:
        return out
    d_pad = _d_pad(D)
    block = max(1, min(next_power_of_2(geom.chunk_size), max(1, 8192 // d_pad)))
    _bsa_pool_kernel[(geom.n_chunks, B * H)](
        x, out, H, geom.n_chunks,
        *x.stride(),
        geom.nch, geom.ncw, *_geom_args(geom),
        D=D, D_PAD=d_pad, CS=geom.chunk_size, C_H=geom.chunk[1], C_W=geom.chunk[2],
        BLOCK=block, USE_INT64=_force_int64 or needs_int64_offsets(x),
        num_warps=4,
    )
    return out

# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def _select_shapes(q, k, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf_threshold):
    n_q = math.prod(g // c for g, c in zip(grid_q, chunk_q))
    n_k = math.prod([g // c for g, c in zip(grid_k, chunk_k)])  # a list: dynamo cannot trace prod(<generator>)
    _check_params(sparsity, cdf_threshold, n_k)
    B, H = q.shape[:2]
    return (B, H, n_q, _index_width(sparsity, cdf_threshold, n_k)), (B, H, n_q)


def _bsa_select_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    latent_shape_q: List[int],
    latent_shape_k: List[int],
    sparsity: Optional[float],
    cdf_threshold: Optional[float],
    chunk_3d_shape_q: List[int],
    chunk_3d_shape_k: List[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    grid_q, grid_k, chunk_q, chunk_k = _check_qkv(q, k, None, latent_shape_q, latent_shape_k,
                                                  chunk_3d_shape_q, chunk_3d_shape_k)
    _select_shapes(q, k, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf_threshold)
    geom_q = _geometry(grid_q, chunk_q)
    geom_k = _geometry(grid_k, chunk_k)
    B, H, _, D = q.shape
    q_pool = torch.empty((B, H, geom_q.n_chunks, D), dtype=torch.float32, device=q.device)
    k_pool = torch.empty((B, H, geom_k.n_chunks, D), dtype=torch.float32, device=q.device)
    _bsa_pool_launch(q, geom_q, q_pool)
    _bsa_pool_launch(k, geom_k, k_pool)
    # Round the pooled chunks to the input dtype and score there, as the official code does.
    q_pool, k_pool = q_pool.to(q.dtype), k_pool.to(k.dtype)
    # Heads in groups so the [n_q, n_k] scores of a group stay under _SELECT_SCORE_ELEMS elements
    # (720p with 4x4x4 chunks: 10560^2 per head); a Python loop over static sizes, no host sync.
    per_head = B * geom_q.n_chunks * geom_k.n_chunks
    group = max(1, min(H, _SELECT_SCORE_ELEMS // max(1, per_head)))
    if group >= H:
        return bsa_select_from_pooled(q_pool, k_pool, sparsity, cdf_threshold, D ** -0.5)
    idx_shape, cnt_shape = _select_shapes(q, k, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf_threshold)
    idx = torch.empty(idx_shape, dtype=torch.int32, device=q.device)
    counts = torch.empty(cnt_shape, dtype=torch.int32, device=q.device)
    for h0 in range(0, H, group):
        i, c = bsa_select_from_pooled(q_pool[:, h0:h0 + group], k_pool[:, h0:h0 + group], sparsity, cdf_threshold,
                                      D ** -0.5)
        idx[:, h0:h0 + group] = i
        counts[:, h0:h0 + group] = c
    return idx, counts


_bsa_select_op = torch.library.custom_op(f"{LIBRARY_NAMESPACE}::bsa_select", mutates_args=())(_bsa_select_impl)


def _bsa_select_workspace(q, k, latent_shape_q, latent_shape_k, sparsity, cdf_threshold, chunk_3d_shape_q,
                          chunk_3d_shape_k) -> int:
    """Bytes :func:`_bsa_select_impl` holds at its peak beyond its outputs (WORKSPACE_BYTES): the
    pooled chunks (float32, then in q's dtype) and one head group's selection temporaries.
    tests/test_memory.py checks it against a trace of the implementation."""

    r = allocator_bytes
    (B, H, n_q, width), _ = _select_shapes(q, k, latent_shape_q, latent_shape_k, chunk_3d_shape_q, chunk_3d_shape_k,
                                           sparsity, cdf_threshold)
    D, es = q.shape[-1], q.element_size()
    n_k = math.prod([g // c for g, c in zip(latent_shape_k, chunk_3d_shape_k)])
    outputs = r(B * H * n_q * width * 4) + r(B * H * n_q * 4)
    group = max(1, min(H, _SELECT_SCORE_ELEMS // max(1, B * n_q * n_k)))
    pools = r(B * H * n_q * D * es) + r(B * H * n_k * D * es)
    # float32 pools, then their copies in q's dtype beside them (.to is a no-op for float32 q)
    converting = pools if es == 4 else pools + r(B * H * n_q * D * 4) + r(B * H * n_k * D * 4)
    rows = B * group * n_q
    score, sel_i64, sel_i32 = r(rows * n_k * es), r(rows * width * 8), r(rows * width * 4)
    if cdf_threshold is None:
        select = score + 3 * sel_i64  # the sort of the top-k indices: its int64 input, values, indices
    else:
        # scores, softmax weights, sorted top-k (values, int64 indices), their cumsum, the int32 copy,
        # searchsorted's int64 counts, the threshold and the int32 counts
        select = max(3 * score, 2 * score + 2 * r(rows * width * es) + sel_i64 + sel_i32 + r(rows * 8) + 2 * r(rows * 4))
    if group < H:
        select += outputs  # allocated before the head groups, filled group by group
    return max(0, max(converting, pools + select) - outputs)


WORKSPACE_BYTES[f"{LIBRARY_NAMESPACE}.bsa_select"] = _bsa_select_workspace


@_bsa_select_op.register_fake
def _bsa_select_fake(q, k, latent_shape_q, latent_shape_k, sparsity, cdf_threshold, chunk_3d_shape_q,
                     chunk_3d_shape_k):
    grid_q, grid_k, chunk_q, chunk_k = _check_qkv(q, k, None, latent_shape_q, latent_shape_k,
                                                  chunk_3d_shape_q, chunk_3d_shape_k)
    idx_shape, cnt_shape = _select_shapes(q, k, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf_threshold)
    return q.new_empty(idx_shape, dtype=torch.int32), q.new_empty(cnt_shape, dtype=torch.int32)

# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------


def _lists(latent_shape_q, latent_shape_k, chunk_q, chunk_k):
    return ([int(x) for x in latent_shape_q], [int(x) for x in latent_shape_k],
            [int(x) for x in chunk_q], [int(x) for x in chunk_k])


def _opt_float(x):
    return None if x is None else float(x)


def bsa_select(
    q: torch.Tensor, k: torch.Tensor, latent_shape_q, latent_shape_k, sparsity: Optional[float] = 0.875,
    cdf_threshold: Optional[float] = None, chunk_3d_shape_q=(4, 4, 8), chunk_3d_shape_k=(4, 4, 8),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunk selection (Triton pooling + the official selection ops), all on the device.

    q ``[B, H, Nq, D]``, k ``[B, H, Nk, D]`` in raster order, any strides. Returns
    ``(indices int32 [B, H, n_q, S], counts int32 [B, H, n_q])``
    (see :func:`bsa_select_from_pooled`; :func:`bsa_selection_mask` turns them into a mask).
    """
    _check_qkv(q, k, None, latent_shape_q, latent_shape_k, chunk_3d_shape_q, chunk_3d_shape_k)
    check_triton_device(q, k)
    gq, gk, cq, ck = _lists(latent_shape_q, latent_shape_k, chunk_3d_shape_q, chunk_3d_shape_k)
    return _bsa_select_op(q, k, gq, gk, _opt_float(sparsity), _opt_float(cdf_threshold), cq, ck)
