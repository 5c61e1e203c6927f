"""residual_layernorm_modulate: a (gated) residual add fused with the next sub-layer's norm.

Every residual site of a block is followed by a LayerNorm: ``x = x + gate * y`` then
``h = layernorm_modulate(x)``. Fusing them reads x and y once and writes x and h once.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layernorm_modulate import layernorm_modulate_reference

__all__ = ["residual_layernorm_modulate_reference", "gated_residual_reference"]


def gated_residual_reference(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    """``x + gate * y`` per frame in float32 (official autocast-fp32 block), cast to x's dtype.

    x, y: [B, N, C]; gate: [B, frames, C] or None for a plain residual ``x + y`` in x's dtype
    (the official cross-attention residual is a plain add in the activation dtype).
    """
    if x.shape != y.shape:
        raise ValueError(f"residual operands differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if gate is None:
        return x + y
    B, N, C = x.shape
    frames = gate.shape[1]
    if gate.shape != (B, frames, C) or frames == 0 or N % frames:
        raise ValueError(f"gate must be [B, frames, C] with frames dividing N={N}, got {tuple(gate.shape)}")
    out = x.float().view(B, frames, -1, C) + gate.float()[:, :, None] * y.float().view(B, frames, -1, C)
    return out.view(B, N, C).to(x.dtype)


def residual_layernorm_modulate_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(x_new, h)``: ``x_new = x + gate * y`` and ``h = layernorm_modulate(x_new, ...)``."""
    x_new = gated_residual_reference(x, y, gate)
    return x_new, layernorm_modulate_reference(x_new, shift, scale, weight, bias, eps)


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
)
from .layernorm_modulate import (  # noqa: E402
    MAX_TILE_C,
    affine_modulate,
    check_layernorm_modulate_fused_args,
    col_tile,
    layernorm_modulate_launch_config,
    merge_chunk_stats,
    normalize_tile,
    row_tile,
)

triton, tl = import_triton()

__all__ += ["residual_layernorm_modulate"]


@triton.jit
def _gated_residual_tile(
    x_ptr, y_ptr, gate_ptr, x_row, y_row, g_row, cols, mask,
    stride_xc, stride_yc, stride_gc,
    HAS_GATE: tl.constexpr,
):
    """``x + gate * y`` of one tile in float32 (separately rounded multiply and add, like the
    reference's two torch ops; the launch disables FMA contraction to keep it so)."""
    x = tl.load(x_ptr + (x_row[:, None] + cols[None, :] * stride_xc), mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + (y_row[:, None] + cols[None, :] * stride_yc), mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(gate_ptr + (g_row[:, None] + cols[None, :] * stride_gc), mask=mask, other=0.0).to(tl.float32)
        y = g * y
    return x + y


@triton.jit
def _residual_layernorm_modulate_kernel(
    x_ptr,
    y_ptr,
    gate_ptr,
    x_out_ptr,
    h_out_ptr,
    shift_ptr,
    scale_ptr,
    weight_ptr,
    bias_ptr,
    n_rows,  # B * N
    N,
    C,
    tokens_per_frame_gate,
    tokens_per_frame_mod,
    eps,
    stride_xb,
    stride_xn,
    stride_xc,
    stride_yb,
    stride_yn,
    stride_yc,
    stride_gb,
    stride_gf,
    stride_gc,
    stride_xob,
    stride_xon,
    stride_xoc,
    stride_hob,
    stride_hon,
    stride_hoc,
    stride_shb,
    stride_shf,
    stride_shc,
    stride_scb,
    stride_scf,
    stride_scc,
    stride_w,
    stride_bias,
    HAS_GATE: tl.constexpr,
    HAS_MOD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_INT64: tl.constexpr,
    ONE_TILE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Same row tiling as _layernorm_modulate_kernel. The residual is rounded once to x's dtype
    # and the norm reads the ROUNDED value: exactly what the unfused path (write x, read it
    # back) normalizes. A plain add (no gate) computed in float32 and rounded once equals the
    # low-precision add: float32 has >= 2p+2 bits for fp16/bf16, so double rounding is exact.
    cbase, rmask, b, n = row_tile(n_rows, N, BLOCK_R, BLOCK_C, USE_INT64)
    f_mod = n // tokens_per_frame_mod
    x_row = b * stride_xb + n * stride_xn
    y_row = b * stride_yb + n * stride_yn
    g_row = b * stride_gb + (n // tokens_per_frame_gate) * stride_gf
    xo_row = b * stride_xob + n * stride_xon
    ho_row = b * stride_hob + n * stride_hon

    if ONE_TILE:
        cols, cmask, mask = col_tile(0, cbase, C, rmask)
        x_new = _gated_residual_tile(
            x_ptr, y_ptr, gate_ptr, x_row, y_row, g_row, cols, mask, stride_xc, stride_yc, stride_gc, HAS_GATE
        ).to(x_out_ptr.dtype.element_ty)
        tl.store(x_out_ptr + (xo_row[:, None] + cols[None, :] * stride_xoc), x_new, mask=mask)
        xr = tl.where(mask, x_new.to(tl.float32), 0.0)
        h = affine_modulate(
            normalize_tile(xr, mask, C, eps), cols, cmask, mask, b, f_mod,
            shift_ptr, scale_ptr, weight_ptr, bias_ptr,
            stride_shb, stride_shf, stride_shc, stride_scb, stride_scf, stride_scc,
            stride_w, stride_bias,
            HAS_MOD, HAS_WEIGHT, HAS_BIAS,
        )
        tl.store(
            h_out_ptr + (ho_row[:, None] + cols[None, :] * stride_hoc), h.to(h_out_ptr.dtype.element_ty), mask=mask
        )
    else:
        # Wide rows: pass 1 writes x_new and folds its statistics; pass 2 reads x_new back from
        # x_out (the rounded values, and correct when x_out is x) to normalize.
        mean = tl.zeros([BLOCK_R], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_R], dtype=tl.float32)
        count = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols, cmask, mask = col_tile(c0, cbase, C, rmask)
            x_new = _gated_residual_tile(
                x_ptr, y_ptr, gate_ptr, x_row, y_row, g_row, cols, mask, stride_xc, stride_yc, stride_gc, HAS_GATE
            ).to(x_out_ptr.dtype.element_ty)
            tl.store(x_out_ptr + (xo_row[:, None] + cols[None, :] * stride_xoc), x_new, mask=mask)
            xr = tl.where(mask, x_new.to(tl.float32), 0.0)
            mean, m2, count = merge_chunk_stats(xr, mask, cmask, mean, m2, count)
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        # Threads of the program read back elements other threads stored: the CTA barrier
        # orders those global writes before the reads; .cg reads from L2, past any stale L1.
        tl.debug_barrier()
        for c0 in range(0, C, BLOCK_C):
            cols, cmask, mask = col_tile(c0, cbase, C, rmask)
            xr = tl.load(
                x_out_ptr + (xo_row[:, None] + cols[None, :] * stride_xoc), mask=mask, other=0.0, cache_modifier=".cg"
            ).to(tl.float32)
            h = affine_modulate(
                (xr - mean[:, None]) * rstd[:, None], cols, cmask, mask, b, f_mod,
                shift_ptr, scale_ptr, weight_ptr, bias_ptr,
                stride_shb, stride_shf, stride_shc, stride_scb, stride_scf, stride_scc,
                stride_w, stride_bias,
                HAS_MOD, HAS_WEIGHT, HAS_BIAS,
            )
            tl.store(
                h_out_ptr + (ho_row[:, None] + cols[None, :] * stride_hoc), h.to(h_out_ptr.dtype.element_ty), mask=mask
            )


def _check_residual_args(x, y, gate, shift, scale, weight, bias):
    """Checks of the fused op; returns (tokens per gate frame, tokens per modulation frame)."""
    tokens_per_frame_mod = check_layernorm_modulate_fused_args(x, shift, scale, weight, bias)
    if y.shape != x.shape:
        raise ValueError(f"residual operands differ in shape: x {tuple(x.shape)} vs y {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    if y.dtype not in FLOAT_DTYPES:
        raise ValueError(f"y must be float32, float16 or bfloat16, got {y.dtype}")
    B, N, C = x.shape
    if gate is None:
        if y.dtype != x.dtype:
            # The reference's plain ``x + y`` would promote to another dtype; the fused op always
            # returns x.dtype, so refuse rather than differ silently.
            raise ValueError(f"without a gate, y must have x's dtype {x.dtype}, got {y.dtype}")
        return N, tokens_per_frame_mod
    if gate.dim() != 3 or gate.shape[0] != B or gate.shape[2] != C or gate.shape[1] == 0 or N % gate.shape[1]:
        raise ValueError(
            f"gate must be [B, frames, C] = [{B}, *, {C}] with frames dividing N={N}, got {tuple(gate.shape)}"
        )
    if gate.dtype not in FLOAT_DTYPES:
        raise ValueError(f"gate must be float32, float16 or bfloat16, got {gate.dtype}")
    if gate.device != x.device:
        raise ValueError(f"gate is on {gate.device} but x is on {x.device}")
    return N // gate.shape[1], tokens_per_frame_mod


def _residual_layernorm_modulate_launch(
    x, y, gate, shift, scale, weight, bias, eps, x_out, h_out, *, _force_int64=False, _max_tile_c=MAX_TILE_C
):
    """Runs the kernel into preallocated ``x_out`` and ``h_out`` (x's shape and dtype, any strides);
    writes every element of both. ``x_out`` may be x or y itself (in place); otherwise outputs
    must not overlap the inputs or each other. Test hooks as in ``_layernorm_modulate_launch``.
    """
    tpf_gate, tpf_mod = _check_residual_args(x, y, gate, shift, scale, weight, bias)
    check_output("x_out", x_out, x)
    check_output("h_out", h_out, x)
    check_triton_device(x, y, gate, shift, scale, weight, bias, x_out, h_out)
    B, N, C = x.shape
    if x.numel() == 0:
        return x_out, h_out
    has_mod = shift is not None
    dummy = h_out  # bound to absent operands; never read, their HAS_* flag is a constexpr False
    block_r, block_c, one_tile, num_warps = layernorm_modulate_launch_config(C, _max_tile_c)
    grid = (triton.cdiv(B * N, block_r),)
    _residual_layernorm_modulate_kernel[grid](
        x,
        y,
        dummy if gate is None else gate,
        x_out,
        h_out,
        shift if has_mod else dummy,
        scale if has_mod else dummy,
        dummy if weight is None else weight,
        dummy if bias is None else bias,
        B * N,
        N,
        C,
        tpf_gate,
        tpf_mod,
        float(eps),
        *x.stride(),
        *y.stride(),
        *((0, 0, 0) if gate is None else gate.stride()),
        *x_out.stride(),
        *h_out.stride(),
        *(shift.stride() if has_mod else (0, 0, 0)),
        *(scale.stride() if has_mod else (0, 0, 0)),
        0 if weight is None else weight.stride(0),
        0 if bias is None else bias.stride(0),
        HAS_GATE=gate is not None,
        HAS_MOD=has_mod,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        USE_INT64=bool(_force_int64) or needs_int64_offsets(x, y, gate, x_out, h_out, shift, scale, weight, bias),
        ONE_TILE=one_tile,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
        # x_new must round like the reference's separate multiply and add; an FMA would not.
        enable_fp_fusion=False,
    )
    return x_out, h_out


# custom_op + register_fake (not triton_op): see _common.py; compiles with zero graph breaks.
@torch.library.custom_op(f"{LIBRARY_NAMESPACE}::residual_layernorm_modulate", mutates_args=())
def _residual_layernorm_modulate_op(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    x_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _residual_layernorm_modulate_launch(x, y, gate, shift, scale, weight, bias, eps, x_out, h_out)


@_residual_layernorm_modulate_op.register_fake
def _(x, y, gate, shift, scale, weight, bias, eps):
    _check_residual_args(x, y, gate, shift, scale, weight, bias)
    return (
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
        torch.empty(x.shape, dtype=x.dtype, device=x.device),
    )


def residual_layernorm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused ``residual_layernorm_modulate_reference``: returns ``(x_new, h)`` from one kernel.

    ``x_new = x + gate * y`` (float32 math per frame, or ``x + y`` when gate is None), in x.dtype;
    ``h = layernorm_modulate(x_new, shift, scale, weight, bias, eps)``. x, y: [B, N, C], any strides
    (y in x's dtype when gate is None); gate, shift, scale: [B, frames, C] (their own frame counts);
    weight, bias: [C]. Both outputs are new contiguous tensors.
    """
    _check_residual_args(x, y, gate, shift, scale, weight, bias)
    return torch.ops.longcat_native.residual_layernorm_modulate(x, y, gate, shift, scale, weight, bias, float(eps))
