"""Block-sparse attention (BSA) over 3D chunks: chunk selection and a sparse FlashAttention kernel,
behind the official ``flash_attn_bsa_3d`` call; the oracle is ``block_sparse_attention_reference``.

Design notes (semantics, divergences from the official code, layouts):
docs/design/block_sparse_attention.md.

Why one file of ~800 lines: it is one op in the one-file-per-op order, but that op has two
Triton kernels (chunk pooling, the sparse attention) behind two custom ops (selection,
attention), each with its reference; splitting it would scatter the shared chunk geometry.
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
    query_row_slices,
    triton_usable_on,
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
    "bsa_masked_attention_reference",
    "block_sparse_attention_reference",
    "bsa_select",
    "bsa_sparse_attention",
    "block_sparse_attention",
    "MAX_HEAD_DIM",
]

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
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
# Plain-PyTorch reference (the oracle) and the shared selection
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


def bsa_masked_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
    chunk_size_q: int, chunk_size_k: int, sm_scale: Optional[float] = None,
) -> torch.Tensor:
    """Dense softmax attention with an explicit chunk mask, in float32, cast to q's dtype.

    q ``[B, H, n_q*cs_q, D]``, k/v ``[B, H, n_k*cs_k, D]`` in chunk order, block_mask bool
    ``[B, H, n_q, n_k]``. Query rows whose chunk selects nothing get 0. Memory is bounded
    whatever the sequence length (query rows are processed in slices).
    """
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    B, H, Nq = q.shape[:3]
    Nk = k.shape[2]
    kf_t, vf = k.float().transpose(-1, -2), v.float()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for r0, r1 in query_row_slices(Nq, B * H * Nk * 4):  # [B, H, rows, Nk] float32 scores at a time
        chunk_of_row = torch.arange(r0, r1, device=q.device) // chunk_size_q
        tok_mask = block_mask[:, :, chunk_of_row].repeat_interleave(chunk_size_k, dim=3)
        s = torch.matmul(q[:, :, r0:r1].float(), kf_t) * scale
        s = s.masked_fill(~tok_mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.where(tok_mask.any(-1, keepdim=True), p, torch.zeros((), dtype=p.dtype, device=p.device))
        out[:, :, r0:r1] = torch.matmul(p, vf).to(q.dtype)
    return out


def block_sparse_attention_reference(
    q, k, v, latent_shape_q, latent_shape_k, sparsity=0.875, cdf_threshold=None,
    chunk_3d_shape_q=(4, 4, 8), chunk_3d_shape_k=(4, 4, 8), *, return_mask: bool = False,
):
    """Plain-PyTorch oracle of :func:`block_sparse_attention` (official rearrange, pooling and
    selection; the attention is dense float32 with the chunk mask). With ``return_mask`` also
    returns the bool chunk mask ``[B, H, n_q, n_k]`` (chunks in 3D-chunk order)."""
    grid_q, grid_k, chunk_q, chunk_k = _check_qkv(q, k, v, latent_shape_q, latent_shape_k,
                                                  chunk_3d_shape_q, chunk_3d_shape_k)
    n_k = math.prod([g // c for g, c in zip(grid_k, chunk_k)])  # a list: dynamo cannot trace prod(<generator>)
    _check_params(sparsity, cdf_threshold, n_k)
    cs_q, cs_k = math.prod(chunk_q), math.prod(chunk_k)
    qc = bsa_to_chunk_order(q, grid_q, chunk_q)
    kc = bsa_to_chunk_order(k, grid_k, chunk_k)
    vc = bsa_to_chunk_order(v, grid_k, chunk_k)
    idx, counts = bsa_select_from_pooled(bsa_pool_reference(qc, cs_q), bsa_pool_reference(kc, cs_k),
                                         sparsity, cdf_threshold, q.shape[-1] ** -0.5)
    mask = bsa_selection_mask(idx, counts, n_k)
    out = bsa_from_chunk_order(bsa_masked_attention_reference(qc, kc, vc, mask, cs_q, cs_k), grid_q, chunk_q)
    return (out, mask) if return_mask else out


# ---------------------------------------------------------------------------------------------
# Triton kernels
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
def _key_tile(rk, d, dmask, sk_n, sk_d, sv_n, sv_d, K_ST, K_SH, CK_H: tl.constexpr, CK_W: tl.constexpr,
              CS_K: tl.constexpr, USE_INT64: tl.constexpr):
    """Key tile ``rk`` (token-in-chunk indices): its element offsets in k and in v from its chunk's
    first row, its token mask and its load mask."""
    k_intra = _in_chunk_rows(rk, K_ST, K_SH, CK_H, CK_W)
    if USE_INT64:
        k_intra = k_intra.to(tl.int64)
    kmask = rk < CS_K
    return (k_intra[:, None] * sk_n + d[None, :] * sk_d, k_intra[:, None] * sv_n + d[None, :] * sv_d, kmask,
            kmask[:, None] & dmask[None, :])


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


@triton.jit
def _bsa_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, idx_ptr, cnt_ptr,
    qk_scale,
    H,
    sq_b, sq_h, sq_n, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_n, so_d,
    si_b, si_h, si_m,
    sc_b, sc_h, sc_m,
    Q_NCH, Q_NCW, Q_SCT, Q_SCH, Q_SCW, Q_ST, Q_SH,
    K_NCH, K_NCW, K_SCT, K_SCH, K_SCW, K_ST, K_SH,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    CS_Q: tl.constexpr,
    CQ_H: tl.constexpr,
    CQ_W: tl.constexpr,
    CS_K: tl.constexpr,
    CK_H: tl.constexpr,
    CK_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILES_Q: tl.constexpr,
    TILES_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """One program: BLOCK_M query tokens of one query chunk, one (batch, head). Online softmax
    over the tokens of the key chunks ``idx[b, h, qc, :cnt[b, h, qc]]`` only; float32 state.

    Token rows: ``chunk base row + row offset within the chunk`` (module doc, ``_Geom``); the
    in-chunk offsets of a key tile are computed once when a key chunk is a single tile, so the
    loop does a few scalar ops per chunk besides the two loads and two dots.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qc = pid // TILES_Q
    qt = pid % TILES_Q
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_base = q_ptr + b64 * sq_b + h64 * sq_h
    k_base = k_ptr + b64 * sk_b + h64 * sk_h
    v_base = v_ptr + b64 * sv_b + h64 * sv_h
    o_base = o_ptr + b64 * so_b + h64 * so_h

    # Query (and output: the same layout) rows of this tile.
    r = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < CS_Q
    q_rows = _chunk_rows(qc, r, Q_NCH, Q_NCW, Q_SCT, Q_SCH, Q_SCW, Q_ST, Q_SH, CQ_H, CQ_W)
    if USE_INT64:
        q_rows = q_rows.to(tl.int64)
    d = tl.arange(0, D_PAD)
    dmask = d < D
    q = tl.load(q_base + q_rows[:, None] * sq_n + d[None, :] * sq_d, mask=rmask[:, None] & dmask[None, :], other=0.0)

    n_sel = tl.load(cnt_ptr + b64 * sc_b + h64 * sc_h + qc * sc_m)
    idx_base = idx_ptr + b64 * si_b + h64 * si_h + qc.to(tl.int64) * si_m

    # In-chunk offsets of the first key tile (the only one when TILES_K == 1).
    rk0 = tl.arange(0, BLOCK_N)
    k_off0, v_off0, kmask0, kv_mask0 = _key_tile(rk0, d, dmask, sk_n, sk_d, sv_n, sv_d, K_ST, K_SH, CK_H, CK_W,
                                                 CS_K, USE_INT64)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    # One flat loop over (selected chunk, key tile in the chunk) so the compiler pipelines it.
    for it in range(0, n_sel * TILES_K):
        if TILES_K == 1:
            kc = tl.load(idx_base + it)
            k_off = k_off0
            v_off = v_off0
            kmask = kmask0
            kv_mask = kv_mask0
        else:
            kc = tl.load(idx_base + it // TILES_K)
            k_off, v_off, kmask, kv_mask = _key_tile((it % TILES_K) * BLOCK_N + rk0, d, dmask, sk_n, sk_d, sv_n,
                                                     sv_d, K_ST, K_SH, CK_H, CK_W, CS_K, USE_INT64)
        cb = _chunk_base(kc, K_NCH, K_NCW, K_SCT, K_SCH, K_SCW)
        if USE_INT64:
            cb = cb.to(tl.int64)
        k = tl.load(k_base + cb * sk_n + k_off, mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if CS_K % BLOCK_N != 0:
            qk = tl.where(kmask[None, :], qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cb * sv_n + v_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    # No selected chunk: l_i == 0 and acc == 0 -> output 0 (the official kernel writes NaN).
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(o_base + q_rows[:, None] * so_n + d[None, :] * so_d, out.to(o_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


def _d_pad(head_dim: int) -> int:
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"block-sparse attention supports head_dim up to {MAX_HEAD_DIM}, got {head_dim}")
    return max(16, next_power_of_2(head_dim))


def _attn_config(cs_q: int, cs_k: int, head_dim: int, dtype: torch.dtype):
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)``: query tiles up to 128 tokens of one chunk,
    key tiles up to 128 (64 at head_dim > 64) tokens of one chunk, >= 16 (tl.dot)."""
    d_pad = _d_pad(head_dim)
    block_m = min(128, max(16, next_power_of_2(cs_q)))
    block_n = min(128 if d_pad <= 64 else 64, max(16, next_power_of_2(cs_k)))
    if dtype == torch.float32:  # 2x the registers / shared memory per element
        block_m = min(block_m, 64)
        block_n = min(block_n, 32)
    if d_pad > 128:
        block_m = min(block_m, 64)
        block_n = min(block_n, 32)
    num_warps = 8 if block_m >= 128 else 4
    num_stages = 2 if (dtype == torch.float32 or d_pad > 128) else 3
    return block_m, block_n, num_warps, num_stages


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


def _bsa_attention_launch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    indices: torch.Tensor, counts: torch.Tensor,
    geom_q: _Geom, geom_k: _Geom,
    out: torch.Tensor, sm_scale: float, *, _force_int64: bool = False,
) -> torch.Tensor:
    """Sparse attention into the preallocated ``out`` (q's shape and dtype, any strides).

    q ``[B, H, Nq, D]`` cut into chunks as ``geom_q``, k/v ``[B, H, Nk, D]`` as ``geom_k`` (any
    strides), all in raster order, out too. indices ``[B, H, n_q, S]``
    and counts ``[B, H, n_q]`` (int32, last dim of indices stride 1): query chunk i attends key
    chunks ``indices[..., i, :counts[..., i]]``.
    """
    B, H, Nq, D = q.shape
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be a {q.dtype} {tuple(q.shape)} tensor on {q.device}")
    if indices.dtype != torch.int32 or counts.dtype != torch.int32:
        raise ValueError("indices and counts must be int32")
    if indices.shape[:3] != (B, H, geom_q.n_chunks) or counts.shape != (B, H, geom_q.n_chunks):
        raise ValueError(
            f"indices must be [B, H, n_q, S] and counts [B, H, n_q] with n_q = {geom_q.n_chunks}, got "
            f"{tuple(indices.shape)} and {tuple(counts.shape)}"
        )
    if indices.shape[-1] > 1 and indices.stride(-1) != 1:
        raise ValueError("indices must be contiguous along its last dim")
    check_triton_device(q, k, v, out, indices, counts)
    if out.numel() == 0:
        return out
    block_m, block_n, num_warps, num_stages = _attn_config(geom_q.chunk_size, geom_k.chunk_size, D, q.dtype)
    tiles_q = triton.cdiv(geom_q.chunk_size, block_m)
    tiles_k = triton.cdiv(geom_k.chunk_size, block_n)
    _bsa_attn_kernel[(geom_q.n_chunks * tiles_q, B * H)](
        q, k, v, out, indices, counts,
        float(sm_scale) * _LOG2E,
        H,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *indices.stride()[:3], *counts.stride(),
        geom_q.nch, geom_q.ncw, *_geom_args(geom_q),
        geom_k.nch, geom_k.ncw, *_geom_args(geom_k),
        D=D, D_PAD=_d_pad(D),
        CS_Q=geom_q.chunk_size, CQ_H=geom_q.chunk[1], CQ_W=geom_q.chunk[2],
        CS_K=geom_k.chunk_size, CK_H=geom_k.chunk[1], CK_W=geom_k.chunk[2],
        BLOCK_M=block_m, BLOCK_N=block_n, TILES_Q=tiles_q, TILES_K=tiles_k,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        USE_INT64=_force_int64 or needs_int64_offsets(q, k, v, out),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def _alloc_like_q(q: torch.Tensor) -> torch.Tensor:
    """Output buffer of q's shape: ``[B, N, H, D]``-contiguous (transposed) when q's token dim
    is outer to its head dim (e.g. a view of the qkv GEMM output), else contiguous. Decided from
    strides alone, so the fake and the real op agree."""
    B, H, N, D = q.shape
    if q.stride(2) > q.stride(1) and H > 1 and N > 1:
        return torch.empty((B, N, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    return torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)


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


@torch.library.custom_op(f"{LIBRARY_NAMESPACE}::bsa_attention", mutates_args=())
def _bsa_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    latent_shape_q: List[int],
    latent_shape_k: List[int],
    chunk_3d_shape_q: List[int],
    chunk_3d_shape_k: List[int],
    sm_scale: float,
) -> torch.Tensor:
    grid_q, grid_k, chunk_q, chunk_k = _check_qkv(q, k, v, latent_shape_q, latent_shape_k,
                                                  chunk_3d_shape_q, chunk_3d_shape_k)
    out = _alloc_like_q(q)
    return _bsa_attention_launch(q, k, v, indices.contiguous(), counts, _geometry(grid_q, chunk_q),
                                 _geometry(grid_k, chunk_k), out, sm_scale)


@_bsa_attention_op.register_fake
def _bsa_attention_fake(q, k, v, indices, counts, latent_shape_q, latent_shape_k, chunk_3d_shape_q,
                        chunk_3d_shape_k, sm_scale):
    _check_qkv(q, k, v, latent_shape_q, latent_shape_k, chunk_3d_shape_q, chunk_3d_shape_k)
    return _alloc_like_q(q)


# ---------------------------------------------------------------------------------------------
# Public functions
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


def bsa_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
    latent_shape_q, latent_shape_k, chunk_3d_shape_q=(4, 4, 8), chunk_3d_shape_k=(4, 4, 8),
    *, sm_scale: Optional[float] = None,
) -> torch.Tensor:
    """The sparse attention kernel alone, for a given selection ``(indices, counts)``.

    q, k, v and the output in raster order (as :func:`block_sparse_attention`). ``sm_scale``
    defaults to ``head_dim ** -0.5``.
    """
    _check_qkv(q, k, v, latent_shape_q, latent_shape_k, chunk_3d_shape_q, chunk_3d_shape_k)
    check_triton_device(q, k, v, indices, counts)
    gq, gk, cq, ck = _lists(latent_shape_q, latent_shape_k, chunk_3d_shape_q, chunk_3d_shape_k)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    return _bsa_attention_op(q, k, v, indices, counts, gq, gk, cq, ck, scale)


def _use_triton(q: torch.Tensor, impl: str) -> bool:
    if impl == "auto":
        return triton_usable_on(q.device)
    if impl in ("triton", "reference"):
        return impl == "triton"
    raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    latent_shape_q,
    latent_shape_k,
    sparsity: Optional[float] = 0.875,
    cdf_threshold: Optional[float] = None,
    chunk_3d_shape_q=(4, 4, 8),
    chunk_3d_shape_k=(4, 4, 8),
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Block-sparse attention with the official ``flash_attn_bsa_3d`` call (module doc).

    q ``[B, H, Tq*Hq*Wq, D]``, k/v ``[B, H, Tk*Hk*Wk, D]``, tokens in (t, h, w) order, any
    strides; returns o like q (``[B, H, Nq, D]``, q's dtype). ``sparsity=0`` is dense attention.
    Raises ``ValueError`` when a grid does not tile into its chunks. ``impl``: ``"triton"``
    (CUDA, or CPU under TRITON_INTERPRET=1), ``"reference"`` (plain PyTorch), ``"auto"`` (Triton
    where it runs, else the reference).
    """
    if not _use_triton(q, impl):
        return block_sparse_attention_reference(q, k, v, latent_shape_q, latent_shape_k, sparsity, cdf_threshold,
                                                chunk_3d_shape_q, chunk_3d_shape_k)
    idx, counts = bsa_select(q, k, latent_shape_q, latent_shape_k, sparsity, cdf_threshold,
                             chunk_3d_shape_q, chunk_3d_shape_k)
    return bsa_sparse_attention(q, k, v, idx, counts, latent_shape_q, latent_shape_k,
                                chunk_3d_shape_q, chunk_3d_shape_k)

