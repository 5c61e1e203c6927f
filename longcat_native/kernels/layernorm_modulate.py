"""layernorm_modulate: ``LayerNorm(x) * (1 + scale) + shift`` with per-frame shift/scale.

The DiT modulates every token of latent frame ``f`` with ``shift[:, f]`` and ``scale[:, f]``
(adaLN per frame, docs/model.md, forward pass step 5). The same op, with an affine weight/bias and no
modulation, is the pre-cross-attention LayerNorm.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["layernorm_modulate_reference", "check_layernorm_modulate_args"]


def check_layernorm_modulate_args(x, shift, scale, weight, bias):
    """Shape checks shared by the reference and the fused op; returns tokens per frame."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, C], got shape {tuple(x.shape)}")
    B, N, C = x.shape
    if (shift is None) != (scale is None):
        raise ValueError("shift and scale must be given together")
    tokens_per_frame = N
    if shift is not None:
        if shift.dim() != 3 or shift.shape != scale.shape or shift.shape[0] != B or shift.shape[2] != C:
            raise ValueError(
                f"shift/scale must be [B, frames, C] = [{B}, *, {C}], got {tuple(shift.shape)} and {tuple(scale.shape)}"
            )
        frames = shift.shape[1]
        if frames == 0 or N % frames != 0:
            raise ValueError(f"{N} tokens do not split evenly into {frames} frames")
        tokens_per_frame = N // frames
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (C,):
            raise ValueError(f"{name} must be [{C}], got {tuple(p.shape)}")
    return tokens_per_frame


def layernorm_modulate_reference(
    x: torch.Tensor,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Plain-PyTorch oracle, the official ``modulate_fp32(LayerNorm_FP32, ...)`` math.

    x: [B, N, C]; shift, scale: [B, frames, C] (any float dtype, used in float32) or None;
    weight, bias: [C] affine of the norm or None. Statistics, affine and modulation in float32,
    one cast back to ``x.dtype`` at the end.
    """
    tokens_per_frame = check_layernorm_modulate_args(x, shift, scale, weight, bias)
    B, N, C = x.shape
    h = F.layer_norm(
        x.float(),
        (C,),
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    )
    if shift is not None:
        h = h.view(B, -1, tokens_per_frame, C)
        h = h * (scale.float()[:, :, None] + 1) + shift.float()[:, :, None]
        h = h.view(B, N, C)
    return h.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Fused Triton kernel
# ----------------------------------------------------------------------------------------------

from ._common import (  # noqa: E402
    FLOAT_DTYPES,
    LIBRARY_NAMESPACE,
    check_output,
    check_triton_device,
    import_triton,
    needs_int64_offsets,
    next_power_of_2,
)

triton, tl = import_triton()

__all__ += ["layernorm_modulate", "layernorm_modulate_launch_config", "check_layernorm_modulate_fused_args"]

# The row tiling (layernorm_modulate_launch_config, row_tile, col_tile), the statistics
# (normalize_tile, merge_chunk_stats), the affine + modulation (affine_modulate) and the argument
# checks are shared with residual_layernorm_modulate, whose kernel is this one with a residual add
# in front.

# Rows up to MAX_TILE_C channels are held whole in registers, so x is read once. Wider rows are
# streamed in _LOOP_BLOCK_C chunks and x is read twice (statistics pass, normalization pass):
# a whole 16K-channel row would spill registers.
MAX_TILE_C = 8192
_LOOP_BLOCK_C = 4096
# Elements per program tile (16 KiB of float32): small C gets several rows per program, so
# launches are not dominated by per-program overhead (the CPU interpreter pays per program too).
_TILE_ELEMS = 4096


@triton.jit
def row_tile(n_rows, N, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, USE_INT64: tl.constexpr):
    """Program p's token rows ``[p*BLOCK_R, (p+1)*BLOCK_R)`` of the flattened ``[B*N]`` rows:
    ``(cbase, rmask, b, n)``, the tile's column offsets, row mask, batch and token indices."""
    pid = tl.program_id(0)
    cbase = tl.arange(0, BLOCK_C)
    if USE_INT64:
        pid = pid.to(tl.int64)
        cbase = cbase.to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    return cbase, rows < n_rows, rows // N, rows % N


@triton.jit
def col_tile(c0, cbase, C, rmask):
    """Columns ``c0 + cbase`` of a row tile: ``(cols, cmask, mask)`` (mask: rows x columns)."""
    cols = c0 + cbase
    cmask = cols < C
    return cols, cmask, rmask[:, None] & cmask[None, :]


@triton.jit
def normalize_tile(x, mask, C, eps):
    """Whole rows x (float32, masked lanes 0) normalized with two-pass statistics on the
    registers: mean, then the biased variance of the deviations (as F.layer_norm)."""
    mean = tl.sum(x, axis=1) / C
    diff = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    return diff * rstd[:, None]


@triton.jit
def merge_chunk_stats(x, mask, cmask, mean, m2, count):
    """Folds one chunk's per-row (mean, M2) into the running ones (Chan et al. pairwise update).

    Chunk statistics are two-pass in registers and merged exactly, so there is none of the
    cancellation of a running sum of squares when |mean| >> std.
    """
    nb = tl.sum(cmask.to(tl.float32), axis=0)
    cmean = tl.sum(x, axis=1) / nb
    d = tl.where(mask, x - cmean[:, None], 0.0)
    cm2 = tl.sum(d * d, axis=1)
    total = count + nb
    frac = nb / total
    delta = cmean - mean
    mean = mean + delta * frac
    m2 = m2 + cm2 + delta * delta * (count * frac)
    return mean, m2, total


@triton.jit
def affine_modulate(
    h,  # [BLOCK_R, BLOCK_C] normalized float32
    cols,
    cmask,
    mask,
    rows_b,
    rows_f,
    shift_ptr,
    scale_ptr,
    weight_ptr,
    bias_ptr,
    stride_shb,
    stride_shf,
    stride_shc,
    stride_scb,
    stride_scf,
    stride_scc,
    stride_w,
    stride_bias,
    HAS_MOD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """``h * weight + bias``, then ``* (1 + scale[b, f]) + shift[b, f]``, all in float32.

    rows_b / rows_f: batch and frame index of each row.
    """
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols * stride_w, mask=cmask, other=0.0).to(tl.float32)
        h = h * w[None, :]
    if HAS_BIAS:
        bb = tl.load(bias_ptr + cols * stride_bias, mask=cmask, other=0.0).to(tl.float32)
        h = h + bb[None, :]
    if HAS_MOD:
        sc_off = rows_b[:, None] * stride_scb + rows_f[:, None] * stride_scf + cols[None, :] * stride_scc
        sh_off = rows_b[:, None] * stride_shb + rows_f[:, None] * stride_shf + cols[None, :] * stride_shc
        sc = tl.load(scale_ptr + sc_off, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + sh_off, mask=mask, other=0.0).to(tl.float32)
        h = h * (sc + 1.0) + sh
    return h


@triton.jit
def _layernorm_modulate_kernel(
    x_ptr,
    out_ptr,
    shift_ptr,
    scale_ptr,
    weight_ptr,
    bias_ptr,
    n_rows,  # B * N
    N,
    C,
    tokens_per_frame,
    eps,
    stride_xb,
    stride_xn,
    stride_xc,
    stride_ob,
    stride_on,
    stride_oc,
    stride_shb,
    stride_shf,
    stride_shc,
    stride_scb,
    stride_scf,
    stride_scc,
    stride_w,
    stride_bias,
    HAS_MOD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_INT64: tl.constexpr,
    ONE_TILE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Program p normalizes token rows [p*BLOCK_R, (p+1)*BLOCK_R) of the flattened [B*N] rows.
    # Every stride is a runtime argument (triton specializes a unit channel stride to a
    # constant, so the usual contiguous rows still get vectorized accesses).
    cbase, rmask, b, n = row_tile(n_rows, N, BLOCK_R, BLOCK_C, USE_INT64)
    f = n // tokens_per_frame
    x_row = b * stride_xb + n * stride_xn
    o_row = b * stride_ob + n * stride_on

    if ONE_TILE:
        cols, cmask, mask = col_tile(0, cbase, C, rmask)
        x = tl.load(x_ptr + (x_row[:, None] + cols[None, :] * stride_xc), mask=mask, other=0.0).to(tl.float32)
        h = affine_modulate(
            normalize_tile(x, mask, C, eps), cols, cmask, mask, b, f,
            shift_ptr, scale_ptr, weight_ptr, bias_ptr,
            stride_shb, stride_shf, stride_shc, stride_scb, stride_scf, stride_scc,
            stride_w, stride_bias,
            HAS_MOD, HAS_WEIGHT, HAS_BIAS,
        )
        tl.store(out_ptr + (o_row[:, None] + cols[None, :] * stride_oc), h.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        mean = tl.zeros([BLOCK_R], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_R], dtype=tl.float32)
        count = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols, cmask, mask = col_tile(c0, cbase, C, rmask)
            x = tl.load(x_ptr + (x_row[:, None] + cols[None, :] * stride_xc), mask=mask, other=0.0).to(tl.float32)
            mean, m2, count = merge_chunk_stats(x, mask, cmask, mean, m2, count)
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        for c0 in range(0, C, BLOCK_C):
            cols, cmask, mask = col_tile(c0, cbase, C, rmask)
            x = tl.load(x_ptr + (x_row[:, None] + cols[None, :] * stride_xc), mask=mask, other=0.0).to(tl.float32)
            h = affine_modulate(
                (x - mean[:, None]) * rstd[:, None], cols, cmask, mask, b, f,
                shift_ptr, scale_ptr, weight_ptr, bias_ptr,
                stride_shb, stride_shf, stride_shc, stride_scb, stride_scf, stride_scc,
                stride_w, stride_bias,
                HAS_MOD, HAS_WEIGHT, HAS_BIAS,
            )
            tl.store(
                out_ptr + (o_row[:, None] + cols[None, :] * stride_oc), h.to(out_ptr.dtype.element_ty), mask=mask
            )


def layernorm_modulate_launch_config(C: int, max_tile_c: int = MAX_TILE_C):
    """``(BLOCK_R, BLOCK_C, ONE_TILE, num_warps)`` for rows of C channels; a fixed rule, no autotuning.

    ONE_TILE: next_power_of_2(C) <= max_tile_c, the whole row in one tile (C=4096, the model's
    width, and C=5120 -> BLOCK_C=8192); otherwise chunks of min(4096, max_tile_c). BLOCK_R
    fills a 4096-element tile (C=4096 -> 1 row, C<=256 -> 16 rows). num_warps: one per 512
    tile elements, 2..16 (~16 float32 of x per thread at most).
    """
    tile_c = max(16, next_power_of_2(max(int(C), 1)))
    one_tile = tile_c <= max_tile_c
    block_c = tile_c if one_tile else min(_LOOP_BLOCK_C, next_power_of_2(max_tile_c))
    block_r = max(1, min(16, _TILE_ELEMS // block_c))
    num_warps = max(2, min(16, (block_r * block_c) // 512))
    return block_r, block_c, one_tile, num_warps


def check_layernorm_modulate_fused_args(x, shift, scale, weight, bias):
    """Argument checks of the fused op beyond the reference's shape checks; returns tokens/frame."""
    tokens_per_frame = check_layernorm_modulate_args(x, shift, scale, weight, bias)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t in (("shift", shift), ("scale", scale), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return tokens_per_frame


def _layernorm_modulate_launch(
    x, shift, scale, weight, bias, eps, out, *, _force_int64=False, _max_tile_c=MAX_TILE_C
):
    """Runs the kernel into the preallocated ``out`` (x's shape and dtype, any strides); writes
    every element. ``out`` may be x itself (in place) but must not otherwise overlap the inputs.
    Test hooks: ``_force_int64`` takes the int64-offset path on small tensors, ``_max_tile_c``
    forces the chunked (wide-row) path on small C.
    """
    tokens_per_frame = check_layernorm_modulate_fused_args(x, shift, scale, weight, bias)
    check_output("out", out, x)
    check_triton_device(x, shift, scale, weight, bias, out)
    B, N, C = x.shape
    if out.numel() == 0:
        return out
    has_mod = shift is not None
    dummy = out  # bound to absent operands; never read, their HAS_* flag is a constexpr False
    block_r, block_c, one_tile, num_warps = layernorm_modulate_launch_config(C, _max_tile_c)
    grid = (triton.cdiv(B * N, block_r),)
    _layernorm_modulate_kernel[grid](
        x,
        out,
        shift if has_mod else dummy,
        scale if has_mod else dummy,
        dummy if weight is None else weight,
        dummy if bias is None else bias,
        B * N,
        N,
        C,
        tokens_per_frame,
        float(eps),
        *x.stride(),
        *out.stride(),
        *(shift.stride() if has_mod else (0, 0, 0)),
        *(scale.stride() if has_mod else (0, 0, 0)),
        0 if weight is None else weight.stride(0),
        0 if bias is None else bias.stride(0),
        HAS_MOD=has_mod,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        USE_INT64=bool(_force_int64) or needs_int64_offsets(x, out, shift, scale, weight, bias),
        ONE_TILE=one_tile,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
        # Explicit (triton 3.9 warns when unset): unfused multiply-adds round like the
        # reference's separate torch ops.
        enable_fp_fusion=False,
    )
    return out


# custom_op + register_fake (not triton_op): see _common.py; compiles with zero graph breaks.
@torch.library.custom_op(f"{LIBRARY_NAMESPACE}::layernorm_modulate", mutates_args=())
def _layernorm_modulate_op(
    x: torch.Tensor,
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _layernorm_modulate_launch(x, shift, scale, weight, bias, eps, out)


@_layernorm_modulate_op.register_fake
def _(x, shift, scale, weight, bias, eps):
    check_layernorm_modulate_fused_args(x, shift, scale, weight, bias)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def layernorm_modulate(
    x: torch.Tensor,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Fused ``layernorm_modulate_reference``: one kernel, x read once (twice for C > 8192).

    x: [B, N, C] float32/float16/bfloat16, any strides; shift, scale: [B, frames, C] or None;
    weight, bias: [C] or None. Float32 math; returns a new contiguous tensor in x.dtype.
    """
    check_layernorm_modulate_fused_args(x, shift, scale, weight, bias)
    return torch.ops.longcat_native.layernorm_modulate(x, shift, scale, weight, bias, float(eps))
