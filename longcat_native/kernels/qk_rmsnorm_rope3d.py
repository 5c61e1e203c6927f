"""qk_rmsnorm_rope3d: per-head RMSNorm of q and k, then 3D RoPE from each token's (t, h, w).

Layout: q and k are ``[B, N, heads, D]`` (token-major, as the fused qkv GEMM writes them; any
strides). Tokens are ordered t-major, then h, then w over a grid ``(T, Hh, Ww)``; ``t_offset``
shifts every token's frame index (queries of the last T frames of a longer KV-cached grid).

3D RoPE (docs/model.md, 3D RoPE): the head vector is ``[t slice | h slice | w slice]`` of widths
``D - 4*(D//6), 2*(D//6), 2*(D//6)``; in each slice frequency ``i`` rotates channel pair
``(2i, 2i+1)`` by ``pos * 10000**(-2i/width)``.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch

from ._common import (
    LIBRARY_NAMESPACE,
    check_triton_device,
    import_triton,
    needs_int64_offsets,
    next_power_of_2,
)

__all__ = [
    "rope3d_split",
    "rope3d_cos_sin",
    "rope3d_reference",
    "rmsnorm_reference",
    "qk_rmsnorm_rope3d_reference",
    "rope3d_pair_freqs",
    "check_qk_rmsnorm_rope3d_args",
    "qk_rmsnorm_rope3d",
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


# ---------------------------------------------------------------------------------------------
# Fused Triton kernel
# ---------------------------------------------------------------------------------------------

triton, tl = import_triton()


@triton.jit
def _norm_rope_one(
    x_ptr, out_ptr, ku_ptr, w_ptr,
    x_rows, o_rows, row_mask, s_h, s_d, s_w, HEADS,
    cos, sin, eps,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_W: tl.constexpr,
    ROPE: tl.constexpr,
    STORE_KU: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """All heads of one tensor (q or k) for one block of tokens.

    x_rows: element offsets of the tokens' rows in x; o_rows: of their rows in the contiguous
    ``[B, N, heads, D]`` outputs; w_ptr: the norm weight (``[D]``, stride s_w) when HAS_W.
    """
    d = tl.arange(0, D_PAD)
    if HAS_W:
        w = tl.load(w_ptr + d * s_w, mask=d < D, other=0.0).to(tl.float32)
    mask = row_mask[:, None] & (d < D)[None, :]
    if USE_INT64:
        d = d.to(tl.int64)
    # Whole rows are loaded and stored (coalesced); channel pairs are split in registers. The
    # pointers step by one head per iteration: pointer arithmetic is 64-bit, so no h * s_h
    # product can overflow int32 (and scalar strides equal to 1 arrive as constexprs, which
    # cannot be cast).
    x_ptrs = x_ptr + (x_rows[:, None] + d[None, :] * s_d)
    o_off = o_rows[:, None] + d[None, :]
    out_ptrs = out_ptr + o_off
    ku_ptrs = ku_ptr + o_off
    for _ in range(0, HEADS):
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            # RMSNorm_FP32 with the reference's roundings: normalize in float32, round to the
            # input dtype, multiply by the weight in the (promoted) output dtype.
            ms = tl.sum(x * x, axis=1) / D
            rstd = tl.div_rn(1.0, tl.sqrt_rn(ms + eps))
            x = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
            x = (x * w[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)
        if STORE_KU:
            tl.store(ku_ptrs, x.to(ku_ptr.dtype.element_ty), mask=mask)
            ku_ptrs += D
        if ROPE:
            x0, x1 = tl.split(tl.reshape(x, (BLOCK_N, D_PAD // 2, 2)))
            y0 = x0 * cos - x1 * sin
            y1 = x1 * cos + x0 * sin
            x = tl.reshape(tl.join(y0, y1), (BLOCK_N, D_PAD))
        tl.store(out_ptrs, x.to(out_ptr.dtype.element_ty), mask=mask)
        x_ptrs += s_h
        out_ptrs += D


@triton.jit
def _qk_rmsnorm_rope3d_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, freq_ptr,
    q_out_ptr, k_out_ptr, ku_out_ptr,
    N_q, N_k, HEADS,
    sq_b, sq_n, sq_h, sq_d,
    sk_b, sk_n, sk_h, sk_d,
    s_qw, s_kw,
    Hh, Ww, t_offset, eps,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    HALF_T: tl.constexpr,
    HALF_TH: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_Q: tl.constexpr,
    HAS_K: tl.constexpr,
    HAS_QW: tl.constexpr,
    HAS_KW: tl.constexpr,
    ROPE: tl.constexpr,
    STORE_KU: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    # One program per (block of BLOCK_N output tokens, batch item). It loops over the heads of q
    # and of k, so each token's cos/sin (one per channel pair) is computed once for all of them.
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # token index (t-major raster order, in and out)
    if USE_INT64:
        # Every row offset below derives from b or n, so these two casts make them all 64-bit.
        b = b.to(tl.int64)
        n = n.to(tl.int64)
    j = tl.arange(0, D_PAD // 2)  # channel pair
    if ROPE:
        t = n // (Hh * Ww)
        hi = (n // Ww) % Hh
        wi = n % Ww
        # Integer positions are exact in float32, and pos * freq is the reference's own float32
        # product, so the angles match it bit for bit.
        pos_t = (t + t_offset).to(tl.float32)[:, None]
        pos_h = hi.to(tl.float32)[:, None]
        pos_w = wi.to(tl.float32)[:, None]
        jj = j[None, :]
        pos = tl.where(jj < HALF_T, pos_t, tl.where(jj < HALF_TH, pos_h, pos_w))
        freq = tl.load(freq_ptr + j, mask=j < D // 2, other=0.0)
        angle = pos * freq[None, :]
        # Angles reach ~100 rad: this needs full-range trig, not the MUFU approximations. Triton
        # 3.9 lowers tl.cos/tl.sin on CUDA to the full-precision routines (checked in the PTX).
        cos = tl.cos(angle)
        sin = tl.sin(angle)
    else:
        cos = 0.0
        sin = 0.0
    if HAS_Q:
        if pid_n * BLOCK_N < N_q:
            _norm_rope_one(q_ptr, q_out_ptr, q_out_ptr, qw_ptr,
                           b * sq_b + n * sq_n, (b * N_q + n) * HEADS * D, n < N_q, sq_h, sq_d, s_qw, HEADS,
                           cos, sin, eps, D, D_PAD, BLOCK_N, HAS_QW, ROPE, False, USE_INT64)
    if HAS_K:
        if pid_n * BLOCK_N < N_k:
            _norm_rope_one(k_ptr, k_out_ptr, ku_out_ptr, kw_ptr,
                           b * sk_b + n * sk_n, (b * N_k + n) * HEADS * D, n < N_k, sk_h, sk_d, s_kw, HEADS,
                           cos, sin, eps, D, D_PAD, BLOCK_N, HAS_KW, ROPE, STORE_KU, USE_INT64)


@functools.lru_cache(maxsize=None)
def _pair_freqs_cached(head_dim: int, device: str) -> torch.Tensor:
    d_t, d_h, d_w = rope3d_split(head_dim)
    table = torch.cat([_axis_freqs(d_t), _axis_freqs(d_h), _axis_freqs(d_w)])
    return table.to(torch.device(device))


def rope3d_pair_freqs(head_dim: int, device=None) -> torch.Tensor:
    """float32 ``[D/2]``: the frequency of channel pair ``j`` (``2j, 2j+1``) of a head vector.

    Pairs ``j < d_t/2`` follow the frame index, ``j < (d_t+d_h)/2`` the row, the rest the column.
    Built by the reference's own float32 expression and cached per ``(head_dim, device)``.
    """
    return _pair_freqs_cached(int(head_dim), str(torch.device(device if device is not None else "cpu")))


def check_qk_rmsnorm_rope3d_args(q, k, q_weight, k_weight, grid) -> None:
    """Shape checks of the fused op (clear ``ValueError``s); the reference is more lenient."""
    for name, x in (("q", q), ("k", k)):
        if x is None:
            continue
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, N, heads, head_dim], got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.shape[-1] % 8:
            raise ValueError(
                f"head_dim must be a multiple of 8 (3D RoPE), got {name} with head_dim {x.shape[-1]}"
            )
    if q is not None and k is not None:
        if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
            raise ValueError(
                "q and k must share batch size, head count and head_dim: "
                f"q {tuple(q.shape)} vs k {tuple(k.shape)} ([B, N, heads, head_dim])"
            )
        if q.device != k.device:
            raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    for name, x, w in (("q", q, q_weight), ("k", k, k_weight)):
        if w is None:
            continue
        if x is None:
            raise ValueError(f"{name}_weight given without {name}")
        if w.dim() != 1 or w.shape[0] != x.shape[-1]:
            raise ValueError(f"{name}_weight must be [head_dim] = [{x.shape[-1]}], got shape {tuple(w.shape)}")
        if not w.dtype.is_floating_point:
            raise ValueError(f"{name}_weight must be a floating-point tensor, got {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"{name}_weight is on {w.device} but {name} is on {x.device}")
    if grid is not None:
        if len(grid) != 3:
            raise ValueError(f"grid must be (T, Hh, Ww), got {tuple(grid)}")
        if any(int(g) <= 0 for g in grid):
            raise ValueError(f"grid sizes must be positive, got {tuple(grid)}")
        n_grid = int(grid[0]) * int(grid[1]) * int(grid[2])
        for name, x in (("q", q), ("k", k)):
            if x is not None and x.shape[1] != n_grid:
                raise ValueError(
                    f"{name} has {x.shape[1]} tokens but the grid {tuple(int(g) for g in grid)} has {n_grid}"
                )


def _out_dtype(x: torch.Tensor, w: Optional[torch.Tensor]) -> torch.dtype:
    # The reference's ``normed.type_as(x) * weight`` promotes like torch does.
    return x.dtype if w is None else torch.promote_types(x.dtype, w.dtype)


def _block_sizes(head_dim: int) -> Tuple[int, int, int]:
    """``(D_PAD, BLOCK_N, num_warps)``: ~4096 elements per head tile (32 tokens at D = 128)."""
    d_pad = next_power_of_2(head_dim)
    block_n = max(16, min(128, 4096 // d_pad))
    return d_pad, block_n, 4


def _qk_rmsnorm_rope3d_launch(
    q: Optional[torch.Tensor],
    k: Optional[torch.Tensor],
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    grid: Optional[Sequence[int]],
    t_offset: int,
    eps: float,
    q_out: Optional[torch.Tensor],
    k_out: Optional[torch.Tensor],
    k_unroped_out: Optional[torch.Tensor] = None,
    *,
    _force_int64: bool = False,
) -> None:
    """Run the kernel into preallocated contiguous outputs (``[B, N, heads, D]`` each).

    ``q_out``/``k_out`` are required exactly when ``q``/``k`` are given; ``k_unroped_out`` (the
    normalized, un-rotated k) is optional and written in the same launch. ``_force_int64``
    exercises the 64-bit offset path on small tensors (tests).
    """
    check_qk_rmsnorm_rope3d_args(q, k, q_weight, k_weight, grid)
    check_triton_device(q, k, q_weight, k_weight)
    for name, x, out, w in (("q_out", q, q_out, q_weight), ("k_out", k, k_out, k_weight),
                            ("k_unroped_out", k, k_unroped_out, k_weight)):
        if out is None:
            if x is not None and name != "k_unroped_out":
                raise ValueError(f"{name} is required")
            continue
        if x is None:
            raise ValueError(f"{name} given without its input")
        if out.shape != x.shape or not out.is_contiguous() or out.device != x.device:
            raise ValueError(f"{name} must be a contiguous {tuple(x.shape)} tensor on {x.device}")
        if out.dtype != _out_dtype(x, w):
            raise ValueError(f"{name} must have dtype {_out_dtype(x, w)}, got {out.dtype}")
    ref = q if q is not None else k
    if ref is None:
        return
    B, _, heads, D = ref.shape
    N_q = q.shape[1] if q is not None else 0
    N_k = k.shape[1] if k is not None else 0
    N_max = max(N_q, N_k)
    if B == 0 or heads == 0 or N_max == 0:
        return
    d_pad, block_n, num_warps = _block_sizes(D)
    d_t, d_h, _ = rope3d_split(D)
    rope = grid is not None
    if rope:
        _, Hh, Ww = (int(g) for g in grid)
        freqs = rope3d_pair_freqs(D, ref.device)
    else:
        Hh = Ww = 1
        freqs = ref  # never read: ROPE is a constexpr False
    use_int64 = _force_int64 or needs_int64_offsets(q, k, q_out, k_out, k_unroped_out)
    # Stand-ins for absent tensors; the constexpr flags keep the kernel from touching them.
    q_ = q if q is not None else k
    k_ = k if k is not None else q
    qo = q_out if q_out is not None else k_out
    ko = k_out if k_out is not None else q_out
    ku = k_unroped_out if k_unroped_out is not None else ko
    qw = q_weight if q_weight is not None else q_
    kw = k_weight if k_weight is not None else k_
    _qk_rmsnorm_rope3d_kernel[(triton.cdiv(N_max, block_n), B)](
        q_, k_, qw, kw, freqs,
        qo, ko, ku,
        N_q, N_k, heads,
        *q_.stride(), *k_.stride(),
        qw.stride(0) if q_weight is not None else 0,
        kw.stride(0) if k_weight is not None else 0,
        Hh, Ww, int(t_offset), float(eps),
        D=D, D_PAD=d_pad, HALF_T=d_t // 2, HALF_TH=(d_t + d_h) // 2,
        BLOCK_N=block_n,
        HAS_Q=q is not None, HAS_K=k is not None,
        HAS_QW=q_weight is not None, HAS_KW=k_weight is not None,
        ROPE=rope, STORE_KU=k_unroped_out is not None, USE_INT64=use_int64,
        num_warps=num_warps,
    )


# ---------------------------------------------------------------------------------------------
# Registration and public function
# ---------------------------------------------------------------------------------------------


def _alloc_outputs(q, k, q_weight, k_weight, return_k_unroped):
    """Outputs of the op; absent ones are distinct empty tensors (a custom op's outputs may not
    alias each other, and its schema has no optional returns)."""
    ref = q if q is not None else k

    def new(x, w):
        return torch.empty(x.shape, dtype=_out_dtype(x, w), device=x.device)

    q_out = new(q, q_weight) if q is not None else ref.new_empty((0,))
    k_out = new(k, k_weight) if k is not None else ref.new_empty((0,))
    k_unroped = new(k, k_weight) if (k is not None and return_k_unroped) else ref.new_empty((0,))
    return q_out, k_out, k_unroped


@torch.library.custom_op(f"{LIBRARY_NAMESPACE}::qk_rmsnorm_rope3d", mutates_args=())
def _qk_rmsnorm_rope3d_op(
    q: Optional[torch.Tensor],
    k: Optional[torch.Tensor],
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    grid: Optional[List[int]],
    t_offset: int,
    eps: float,
    return_k_unroped: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_out, k_out, k_unroped = _alloc_outputs(q, k, q_weight, k_weight, return_k_unroped)
    _qk_rmsnorm_rope3d_launch(
        q, k, q_weight, k_weight, grid, t_offset, eps,
        q_out if q is not None else None,
        k_out if k is not None else None,
        k_unroped if (k is not None and return_k_unroped) else None,
    )
    return q_out, k_out, k_unroped


@_qk_rmsnorm_rope3d_op.register_fake
def _qk_rmsnorm_rope3d_fake(q, k, q_weight, k_weight, grid, t_offset, eps, return_k_unroped):
    check_qk_rmsnorm_rope3d_args(q, k, q_weight, k_weight, grid)
    return _alloc_outputs(q, k, q_weight, k_weight, return_k_unroped)


def qk_rmsnorm_rope3d(
    q: Optional[torch.Tensor],
    k: Optional[torch.Tensor],
    q_weight: Optional[torch.Tensor],
    k_weight: Optional[torch.Tensor],
    grid: Optional[Sequence[int]] = None,
    t_offset: int = 0,
    eps: float = 1e-6,
    return_k_unroped: bool = False,
):
    """Fused Triton version of :func:`qk_rmsnorm_rope3d_reference` (same arguments and returns).

    q, k: ``[B, N, heads, D]`` with any strides (e.g. views into the fused qkv GEMM output), or
    None; D a multiple of 8. Without a grid q and k may have different token counts
    (cross-attention). Returns fresh contiguous ``[B, N, heads, D]`` tensors (None for an absent
    input): ``(q_out, k_out)``, plus the normalized un-rotated k with ``return_k_unroped``, all
    written by one kernel launch. Registered as
    ``torch.ops.longcat_native.qk_rmsnorm_rope3d`` (``torch.compile`` traces it without graph
    breaks).
    """
    check_qk_rmsnorm_rope3d_args(q, k, q_weight, k_weight, grid)
    if q is None and k is None:
        return (None, None, None) if return_k_unroped else (None, None)
    check_triton_device(q, k, q_weight, k_weight)
    q_out, k_out, k_unroped = _qk_rmsnorm_rope3d_op(
        q, k, q_weight, k_weight,
        None if grid is None else [int(g) for g in grid],
        int(t_offset), float(eps), bool(return_k_unroped and k is not None),
    )
    q_out = q_out if q is not None else None
    k_out = k_out if k is not None else None
    if return_k_unroped:
        return q_out, k_out, (k_unroped if k is not None else None)
    return q_out, k_out
