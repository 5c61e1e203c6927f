"""swiglu: ``silu(a) * b`` over the output of the single concatenated ``w1|w3`` GEMM.

The FFN's first projection is one GEMM producing ``[..., 2F]``: ``a = out[..., :F]`` (w1) and
``b = out[..., F:]`` (w3). The result feeds ``w2``.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ._common import LIBRARY_NAMESPACE, check_triton_device, import_triton, needs_int64_offsets, next_power_of_2

__all__ = ["swiglu_reference", "swiglu"]


def swiglu_reference(ab: torch.Tensor) -> torch.Tensor:
    """Official ``F.silu(w1(x)) * w3(x)`` in the activation dtype. ab: [..., 2F] -> [..., F]."""
    if ab.shape[-1] % 2:
        raise ValueError(f"last dim of the w1|w3 output must be even, got {ab.shape[-1]}")
    a, b = ab.chunk(2, dim=-1)
    return F.silu(a) * b


# ---------------------------------------------------------------------------------------------
# Fused Triton kernel
# ---------------------------------------------------------------------------------------------

triton, tl = import_triton()

# Leading dims of ab/out are collapsed (jointly) to at most this many (size, stride) pairs; the
# kernel maps a flat row index onto them. Views needing more are launched slice by slice.
_KERNEL_ROW_DIMS = 3
_MAX_BLOCK_C = 1024  # columns per program: F = 11008 -> 11 column blocks, last one 3/4 full
_ELEMS_PER_PROGRAM = 1024  # small F: several rows per program so lanes are not wasted


@triton.jit
def _swiglu_kernel(
    ab_ptr,
    out_ptr,
    n_rows,
    F,
    R1,
    R2,
    ab_s0,
    ab_s1,
    ab_s2,
    out_s0,
    out_s1,
    out_s2,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_INT64: tl.constexpr,
):
    """out[r, c] = silu(ab[r, c]) * ab[r, F + c] over rows r (3 strided leading dims) x cols c."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    col_mask = cols < F
    if USE_INT64:
        rows = rows.to(tl.int64)
    # flat row -> (r0, r1, r2) over leading dims of sizes (R0, R1, R2)
    r2 = rows % R2
    r12 = rows // R2
    r1 = r12 % R1
    r0 = r12 // R1
    ab_row = r0 * ab_s0 + r1 * ab_s1 + r2 * ab_s2
    out_row = r0 * out_s0 + r1 * out_s1 + r2 * out_s2
    mask = row_mask[:, None] & col_mask[None, :]
    a_off = ab_row[:, None] + cols[None, :]
    # Loads upcast to float32: all math in float32 (and the interpreter's bf16 arithmetic is wrong).
    a = tl.load(ab_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(ab_ptr + (a_off + F), mask=mask, other=0.0).to(tl.float32)
    y = a / (1.0 + tl.exp(-a)) * b
    tl.store(out_ptr + (out_row[:, None] + cols[None, :]), y.to(out_ptr.dtype.element_ty), mask=mask)


def _swiglu_blocks(n_feat: int):
    """Fixed block sizes chosen from F (= n_feat): ``(BLOCK_R, BLOCK_C, num_warps)``."""
    block_c = min(next_power_of_2(max(n_feat, 1)), _MAX_BLOCK_C)
    block_r = max(1, _ELEMS_PER_PROGRAM // block_c)
    return block_r, block_c, 4


def _collapse_leading(shape, *strides_list):
    """Jointly merge adjacent leading dims that are contiguous in every tensor; drop size-1 dims.

    Returns ``(sizes, [strides per tensor])`` (outermost first, possibly empty).
    """
    dims = [(s, list(st)) for s, *st in zip(shape, *strides_list) if s != 1]
    merged = []
    for size, st in dims:
        if merged:
            psize, pst = merged[-1]
            if all(p == q * size for p, q in zip(pst, st)):
                merged[-1] = (psize * size, st)
                continue
        merged.append((size, st))
    sizes = [m[0] for m in merged]
    strides = [[m[1][i] for m in merged] for i in range(len(strides_list))]
    return sizes, strides


def _check_swiglu_args(ab: torch.Tensor) -> int:
    if ab.dim() < 1:
        raise ValueError("swiglu needs ab of shape [..., 2F], got a 0-d tensor")
    if ab.shape[-1] % 2:
        raise ValueError(f"last dim of the w1|w3 output must be even, got {ab.shape[-1]}")
    if not ab.is_floating_point():
        raise ValueError(f"swiglu needs a floating point input, got {ab.dtype}")
    return ab.shape[-1] // 2


def _swiglu_launch(ab: torch.Tensor, out: torch.Tensor, *, _force_int64: bool = False) -> torch.Tensor:
    """Write ``silu(ab[..., :F]) * ab[..., F:]`` into the preallocated ``out`` [..., F]; returns out.

    Any strides on the leading dims of ab and out; the last dim of each must be contiguous
    (stride 1). ``_force_int64`` exercises the 64-bit offset path on small tensors (tests).
    """
    n_feat = _check_swiglu_args(ab)
    if out.shape != ab.shape[:-1] + (n_feat,):
        raise ValueError(f"out must have shape {tuple(ab.shape[:-1]) + (n_feat,)}, got {tuple(out.shape)}")
    if out.dtype != ab.dtype:
        raise ValueError(f"out dtype {out.dtype} differs from ab dtype {ab.dtype}")
    if out.device != ab.device:
        raise ValueError(f"out is on {out.device}, ab on {ab.device}")
    check_triton_device(ab, out)
    if out.numel() == 0:
        return out
    if ab.stride(-1) != 1 or (n_feat > 1 and out.stride(-1) != 1):
        raise ValueError(
            "swiglu needs the last dim of ab and out contiguous (stride 1), got strides "
            f"{ab.stride(-1)} and {out.stride(-1)}; the leading dims may have any strides"
        )
    use_int64 = _force_int64 or needs_int64_offsets(ab, out)
    block_r, block_c, num_warps = _swiglu_blocks(n_feat)

    sizes, (ab_st, out_st) = _collapse_leading(ab.shape[:-1], ab.stride()[:-1], out.stride()[:-1])
    n_extra = max(0, len(sizes) - _KERNEL_ROW_DIMS)
    pad = _KERNEL_ROW_DIMS - (len(sizes) - n_extra)
    k_sizes = [1] * pad + sizes[n_extra:]
    k_ab = [0] * pad + ab_st[n_extra:]
    k_out = [0] * pad + out_st[n_extra:]
    n_rows = k_sizes[0] * k_sizes[1] * k_sizes[2]
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_feat, block_c))

    # Collapsed views with the kernel's 3 leading dims; rarely-needed extra outer dims loop here.
    ab_v = ab.as_strided(sizes + [2 * n_feat], ab_st + [1])
    out_v = out.as_strided(sizes + [n_feat], out_st + [1])
    for idx in itertools.product(*(range(s) for s in sizes[:n_extra])):
        _swiglu_kernel[grid](
            ab_v[idx],
            out_v[idx],
            n_rows,
            n_feat,
            k_sizes[1],
            k_sizes[2],
            *k_ab,
            *k_out,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            USE_INT64=use_int64,
            num_warps=num_warps,
        )
    return out


@torch.library.custom_op(f"{LIBRARY_NAMESPACE}::swiglu", mutates_args=())
def _swiglu_op(ab: torch.Tensor) -> torch.Tensor:
    n_feat = _check_swiglu_args(ab)
    out = torch.empty(ab.shape[:-1] + (n_feat,), dtype=ab.dtype, device=ab.device)
    return _swiglu_launch(ab, out)


@_swiglu_op.register_fake
def _swiglu_fake(ab: torch.Tensor) -> torch.Tensor:
    n_feat = _check_swiglu_args(ab)
    return ab.new_empty(ab.shape[:-1] + (n_feat,))


def swiglu(ab: torch.Tensor) -> torch.Tensor:
    """Fused ``silu(a) * b`` for ``ab = [a | b]`` of shape [..., 2F] -> [..., F] in ab's dtype.

    Math in float32, one cast to ``ab.dtype``. ab may be any strided view whose last dim is
    contiguous. Registered as ``torch.ops.longcat_native.swiglu`` (torch.compile friendly).
    """
    _check_swiglu_args(ab)
    return _swiglu_op(ab)
