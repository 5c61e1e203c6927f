"""Block-sparse attention (BSA) over 3D chunks: a sparse FlashAttention kernel over the chunks
``bsa_select`` chose, behind the official ``flash_attn_bsa_3d`` call; the oracle is
``block_sparse_attention_reference``.

The selection (chunk geometry, pooling, top-k / cdf) is ``bsa_select.py``; its public names are
re-exported here. Design notes (semantics, divergences from the official code, layouts):
docs/design/block_sparse_attention.md.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from ._common import (
    LIBRARY_NAMESPACE,
    check_triton_device,
    import_triton,
    needs_int64_offsets,
    next_power_of_2,
    query_row_slices,
    triton_usable_on,
)
# The selection's public names are re-exported (one import for the whole op); the private ones
# are the chunk geometry and Triton helpers the attention kernel shares.
from . import bsa_select as _selection
from .bsa_select import (  # noqa: F401
    MAX_HEAD_DIM,
    _Geom,
    _check_params,
    _check_qkv,
    _chunk_base,
    _d_pad,
    _geom_args,
    _geometry,
    _in_chunk_rows,
    _chunk_rows,
    _lists,
    bsa_from_chunk_order,
    bsa_grid_tiles,
    bsa_mask_to_indices,
    bsa_num_selected_topk,
    bsa_pool_reference,
    bsa_select,
    bsa_select_from_pooled,
    bsa_select_reference,
    bsa_selection_mask,
    bsa_to_chunk_order,
)

__all__ = [
    *_selection.__all__,
    "bsa_masked_attention_reference",
    "block_sparse_attention_reference",
    "bsa_sparse_attention",
    "block_sparse_attention",
]

_LOG2E = 1.4426950408889634

triton, tl = import_triton()

# ---------------------------------------------------------------------------------------------
# Plain-PyTorch reference (the oracle)
# ---------------------------------------------------------------------------------------------


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
# Triton kernel
# ---------------------------------------------------------------------------------------------


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

    Token rows: ``chunk base row + row offset within the chunk`` (``bsa_select._Geom``); the
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
