"""The LongCat-Video DiT: one model definition for every kernel path.

Read top to bottom: embedders, the block, the model's forward. The math mirrors the official
``LongCatVideoTransformer3DModel`` (docs/model.md); float32 islands (timestep embedding,
adaLN modulation, gated residuals, final projection) run in float32 with the weights upcast,
exactly as the official autocast-to-float32 regions do.

Internal layout differs from the official module tree only where it buys speed:
``x_embedder.proj`` is a Linear over flattened 1x2x2 patches (same numbers as the Conv3d), and
``ffn.w13`` holds ``w1`` and ``w3`` stacked so the FFN's first GEMM is one launch.
The call sites ``ops.<op>`` (a ``kernels.Ops``, resolved per call by ``LongCatDiT.resolved_ops``)
pick the plain-PyTorch reference or the fused kernels, block-sparse attention included.

Why ~700 lines: the whole network in one file, read top to bottom; forward chunking and the step
cache's head and tails (the forward split around its decision, so CUDA graphs can capture each
part) are a few lines each where they act, not separate layers.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.ops import Ops
from ..kernels.block_sparse_attention import bsa_grid_tiles
from .attention import attention
from .config import LongCatConfig
from .profiling import nvtx_range
from .quantize import dequantize, quantized_linear
from .ring import ring_norm_rope, ring_self_attention, segment_rope_tables

__all__ = ["LongCatTransformer", "Linear", "timestep_features", "patchify", "unpatchify"]


# ---------------------------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------------------------


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a 1-D float tensor: cosines first, then sines (official order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def patchify(x: torch.Tensor, patch: Tuple[int, int, int]) -> torch.Tensor:
    """[B, Cin, T, H, W] -> [B, N, Cin*pt*ph*pw], tokens t-major then h then w; the feature order
    (cin, pt, ph, pw) is the flattening order of the official Conv3d weight."""
    B, C, T, H, W = x.shape
    pt, ph, pw = patch
    x = x.view(B, C, T // pt, pt, H // ph, ph, W // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, (T // pt) * (H // ph) * (W // pw), C * pt * ph * pw)


def unpatchify(x: torch.Tensor, grid: Tuple[int, int, int], patch: Tuple[int, int, int], c_out: int) -> torch.Tensor:
    """[B, N, pt*ph*pw*c_out] (c_out fastest) -> [B, c_out, T, H, W]."""
    B = x.shape[0]
    nt, nh, nw = grid
    pt, ph, pw = patch
    x = x.view(B, nt, nh, nw, pt, ph, pw, c_out)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(B, c_out, nt * pt, nh * ph, nw * pw)


class Linear(nn.Linear):
    """``nn.Linear`` that owns the low-rank branches of unmerged LoRAs (runtime/lora.py):
    ``lora_branches`` lists ``(down [r, in], up [rows, r], scale, first_row)``, empty when none.
    It exists from construction on, so code compiled before a LoRA is loaded guards on it and
    recompiles when branches appear (dynamo does not guard on an attribute that is absent).

    Quantization (runtime/quantize.py, docs/design/quantization.md): ``quant`` is None (``weight``
    in the model dtype) or a mode string ("fp8", "fp8-weight-only", "int8-weight-only"): then
    ``weight`` is a plain int8/float8_e4m3fn ``nn.Parameter(requires_grad=False)`` [out, in] and
    ``weight_scale`` a float32 buffer [out] (``w = weight * weight_scale[:, None]``). Plain tensors,
    not a tensor subclass, so weight streaming's copies into staging buffers, CUDA graphs, the LoRA
    merge/restore copies and the fake-tensor memory tracer see ordinary storage. ``quant`` is set
    here so compiled code guards on it, like ``lora_branches``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_branches: list = []
        self.quant: Optional[str] = None
        self.register_buffer("weight_scale", None)

    def _apply(self, fn, recurse=True):
        # ``dit.to(torch.float16)`` casts every floating-point tensor, float8 weights and their
        # float32 scales included: a quantized layer keeps its storage dtypes (moves still apply).
        if self.quant is None:
            return super()._apply(fn, recurse)
        keep_w, keep_s = self.weight.data, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != keep_w.dtype:
            self.weight.data = keep_w.to(self.weight.device)
        if self.weight_scale.dtype != keep_s.dtype:
            self._buffers["weight_scale"] = keep_s.to(self.weight_scale.device)
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", quant={self.quant!r}" if self.quant is not None else "")


def linear(x: torch.Tensor, layer: Linear) -> torch.Tensor:
    """``layer(x)`` (the quantized GEMM of its mode when ``layer.quant`` is set), plus the low-rank
    branches of any unmerged LoRA on it (runtime/lora.py), in the model dtype."""
    if layer.quant is None:
        out = F.linear(x, layer.weight, layer.bias)
    else:
        out = quantized_linear(x, layer.weight, layer.weight_scale, layer.bias, layer.quant)
    return _add_lora(out, x, layer.lora_branches, out.dtype) if layer.lora_branches else out


def linear_fp32(x: torch.Tensor, layer: Linear) -> torch.Tensor:
    """A Linear in float32 with the weights upcast: the official autocast(float32) regions (never
    quantized by ``quantize=``; a quantized layer here is dequantized to float32)."""
    bias = None if layer.bias is None else layer.bias.float()
    weight = layer.weight.float() if layer.quant is None else dequantize(layer.weight, layer.weight_scale)
    out = F.linear(x.float(), weight, bias)
    return _add_lora(out, x.float(), layer.lora_branches, torch.float32) if layer.lora_branches else out


def _add_lora(out, x, branches, dtype):
    """``out[..., rows] += scale * up(down(x))`` per branch ``(down [r, in], up [rows, r], scale,
    first_row)``: a branch may cover a slice of the output rows (one of q|k|v of the fused qkv,
    w1 or w3 of the fused w13)."""
    out = out.clone() if any(up.shape[0] != out.shape[-1] for _, up, _, _ in branches) else out
    for down, up, scale, row0 in branches:
        delta = F.linear(F.linear(x, down.to(dtype)), up.to(dtype)) * scale
        if up.shape[0] == out.shape[-1]:
            out = out + delta
        else:
            out[..., row0 : row0 + up.shape[0]] += delta
    return out


class PatchEmbed(nn.Module):
    def __init__(self, cfg: LongCatConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = Linear(cfg.in_channels * cfg.patch_volume, cfg.hidden_size)

    def forward(self, x, cp=None):
        """[B, Cin, T, H, W] -> [B, N, C]; under context parallelism this rank's tokens only: its
        2D tile's (Ulysses alone) or its chunk of every frame (with a ring; runtime/parallel.py)."""
        if cp is None:
            return linear(patchify(x, self.patch_size), self.proj)
        if not cp.ring:
            return linear(patchify(cp.local_latents(x, self.patch_size), self.patch_size), self.proj)
        pt, ph, pw = self.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        return linear(cp.local_tokens(patchify(x, self.patch_size), grid), self.proj)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: LongCatConfig):
        super().__init__()
        self.frequency_embedding_size = cfg.frequency_embedding_size
        self.mlp = nn.Sequential(
            Linear(cfg.frequency_embedding_size, cfg.adaln_tembed_dim),
            nn.SiLU(),
            Linear(cfg.adaln_tembed_dim, cfg.adaln_tembed_dim),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: float32 [M] -> float32 [M, adaln_tembed_dim]."""
        h = F.silu(linear_fp32(timestep_features(t, self.frequency_embedding_size), self.mlp[0]))
        return linear_fp32(h, self.mlp[2])


class CaptionEmbedder(nn.Module):
    def __init__(self, cfg: LongCatConfig):
        super().__init__()
        self.y_proj = nn.Sequential(
            Linear(cfg.caption_channels, cfg.hidden_size),
            nn.GELU(approximate="tanh"),
            Linear(cfg.hidden_size, cfg.hidden_size),
        )

    def forward(self, y):
        return linear(F.gelu(linear(y, self.y_proj[0]), approximate="tanh"), self.y_proj[2])


# ---------------------------------------------------------------------------------------------
# The block
# ---------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, cfg: LongCatConfig):
        super().__init__()
        C, D = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.head_dim = cfg.num_heads, D
        self.qkv = Linear(C, 3 * C)
        self.q_norm = RMSNormWeight(D)
        self.k_norm = RMSNormWeight(D)
        self.proj = Linear(C, C)


class CrossAttention(nn.Module):
    def __init__(self, cfg: LongCatConfig):
        super().__init__()
        C, D = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.head_dim = cfg.num_heads, D
        self.q_linear = Linear(C, C)
        self.kv_linear = Linear(C, 2 * C)
        self.q_norm = RMSNormWeight(D)
        self.k_norm = RMSNormWeight(D)
        self.proj = Linear(C, C)


class RMSNormWeight(nn.Module):
    """Holds the learned [D] weight of a per-head RMSNorm; the math lives in the kernels."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class AffineNormWeights(nn.Module):
    """Weight and bias of the pre-cross-attention LayerNorm (eps 1e-6, float32 math)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: LongCatConfig):
        super().__init__()
        C, Fh = cfg.hidden_size, cfg.ffn_hidden_size
        self.hidden_size = Fh
        self.w13 = Linear(C, 2 * Fh, bias=False)  # rows [w1; w3]
        self.w2 = Linear(Fh, C, bias=False)


class LongCatBlock(nn.Module):
    """One single-stream block. ``forward`` takes ``xh = [x, h]``, the residual stream and its
    already normalized+modulated copy, and returns ``(x, ffn_out, gate_mlp, new_kv)``: the last
    gated residual is left to the caller, which fuses it with the next block's norm.

    ``xh`` is a list the block empties: it holds the caller's only references, so each activation
    is freed as soon as it is dead, in eager mode too. Traced at 720p (runtime/memory.py), the FFN's
    peak held 19.4 GiB with plain arguments and locals (the caller's x and h, both attention
    outputs and the previous block's ffn_out were still referenced); it holds 11.7 GiB now, what
    it needs: x, the w13 output and the SwiGLU output."""

    def __init__(self, cfg: LongCatConfig):
        super().__init__()
        C = cfg.hidden_size
        self.adaLN_modulation = Linear(cfg.adaln_tembed_dim, 6 * C)
        self.attn = SelfAttention(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.pre_crs_attn_norm = AffineNormWeights(C)
        self.ffn = FeedForward(cfg)

    def modulation(self, t: torch.Tensor):
        """float32 [B, T, 6C] -> six [B, T, C] views: shift/scale/gate for attention, then FFN."""
        return linear_fp32(F.silu(t), self.adaLN_modulation).chunk(6, dim=-1)

    def forward(self, xh: list, mod, ctx: "ForwardContext", ops, kv_cache=None):
        # nvtx_range: NVTX + record_function ranges for profiling (runtime/profiling.py); a shared
        # null context when profiling is off and always under torch.compile.
        x, h = xh
        xh.clear()
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        with nvtx_range("block.self_attn"):
            hbox = [h]  # the attention's to free once qkv is computed (the class doc's rule)
            del h
            attn_out, new_kv = self._self_attention(hbox, ctx, ops, kv_cache)
        if ctx.skip_crs_attn:
            with nvtx_range("op.residual_layernorm_modulate"):
                x, h = ops.residual_layernorm_modulate(x, attn_out, gate_msa, shift_mlp, scale_mlp)
            del attn_out
        else:
            norm = self.pre_crs_attn_norm
            with nvtx_range("op.residual_layernorm_modulate"):
                x, h = ops.residual_layernorm_modulate(x, attn_out, gate_msa, weight=norm.weight, bias=norm.bias)
            del attn_out
            with nvtx_range("block.cross_attn"):
                cross_out = self._cross_attention(h, ctx, ops)
            with nvtx_range("op.residual_layernorm_modulate"):
                x, h = ops.residual_layernorm_modulate(x, cross_out, None, shift_mlp, scale_mlp)
            del cross_out
        with nvtx_range("block.ffn"):
            chunk = ctx.ffn_chunk_tokens
            if chunk is not None and h.shape[0] * h.shape[1] > chunk:
                ffn_out = self._chunked_ffn(h, ops, chunk)
                del h
            else:
                with nvtx_range("op.ffn_w13"):
                    ab = linear(h, self.ffn.w13)
                del h
                with nvtx_range("op.swiglu"):
                    ab = ops.swiglu(ab)
                with nvtx_range("op.ffn_w2"):
                    ffn_out = linear(ab, self.ffn.w2)
        return x, ffn_out, gate_mlp, new_kv

    def _chunked_ffn(self, h, ops, chunk: int):
        """The FFN ``chunk`` token rows at a time (w13 -> SwiGLU -> w2 per slice, written into the
        output): the live set is x, h, the output and one slice's [chunk, 3F] instead of the whole
        [N, 3F] of the w13 and SwiGLU outputs (traced at 720p: runtime/memory.py)."""
        B, N, C = h.shape
        rows = h.reshape(B * N, C)
        out = rows.new_empty(B * N, self.ffn.w2.out_features)
        for start in range(0, B * N, chunk):
            with nvtx_range("op.ffn_w13"):
                ab = linear(rows[start:start + chunk], self.ffn.w13)
            with nvtx_range("op.swiglu"):
                ab = ops.swiglu(ab)
            with nvtx_range("op.ffn_w2"):
                out[start:start + chunk] = linear(ab, self.ffn.w2)
            del ab
        return out.view(B, N, -1)

    def _self_attention(self, hbox: list, ctx, ops, kv_cache):
        a = self.attn
        h = hbox.pop()
        B, n, C = h.shape
        chunk = ctx.ffn_chunk_tokens
        if chunk is not None and ctx.cp is None and B * n > chunk:
            normed, v = self._chunked_qkv(h, ctx, ops, chunk)
            qkv = None
            del h
        else:
            with nvtx_range("op.qkv"):
                qkv = linear(h, a.qkv).view(B, n, 3, a.num_heads, a.head_dim)
            del h  # dead: the attention's live set is qkv and what it derives
            if ctx.cp is not None:
                # Ulysses: this rank's tokens x all heads -> all tokens (global order) x its heads; the
                # rest of the attention is the single-device code on fewer heads (runtime/parallel.py).
                with nvtx_range("comm.qkv_all_to_all"):
                    qkv = ctx.cp.tokens_to_heads(qkv, ctx.grid)
            q, k, v = qkv.unbind(2)
            with nvtx_range("op.qk_rmsnorm_rope3d"):
                if ctx.rope is not None:  # a ring segment: RoPE from its tables (runtime/ring.py)
                    normed = ring_norm_rope(ops, q, k, a.q_norm.weight, a.k_norm.weight, ctx.rope)
                else:
                    normed = ops.qk_rmsnorm_rope3d(q, k, a.q_norm.weight, a.k_norm.weight, ctx.grid,
                                                   t_offset=ctx.cache_frames, return_k_unroped=ctx.return_kv)
        q, k = normed[:2]
        new_kv = None
        if ctx.return_kv:
            k_unroped = normed[2]
            new_kv = (k_unroped, v)
            if ctx.cp is not None:
                with nvtx_range("comm.kv_all_gather"):
                    new_kv = (ctx.cp.gather_heads(k_unroped, ctx.grid), ctx.cp.gather_heads(v, ctx.grid))
        nc = ctx.num_cond_tokens
        T, Hh, Ww = ctx.grid
        if ctx.rope is not None:
            with nvtx_range("op.ring_attention"):
                out = ring_self_attention(q, k, v, ctx, ops, kv_cache)
        elif kv_cache is not None:
            # Cached keys are normalized, un-rotated; they take the first frames of the grid.
            k_cache, v_cache = kv_cache
            with nvtx_range("op.qk_rmsnorm_rope3d"):
                _, k_cache = ops.qk_rmsnorm_rope3d(None, k_cache, None, None, ctx.cache_grid)
            out = self._attend(q, torch.cat([k_cache, k], 1), torch.cat([v_cache, v], 1), T,
                               ctx.cache_frames + T, ctx, ops)
        elif nc > 0:
            # Conditioning tokens attend among themselves; noisy tokens attend to everything.
            m = nc // (Hh * Ww)
            out = torch.empty_like(q)
            out[:, :nc] = self._attend(q[:, :nc], k[:, :nc], v[:, :nc], m, m, ctx, ops)
            out[:, nc:] = self._attend(q[:, nc:], k, v, T - m, T, ctx, ops)
        else:
            out = self._attend(q, k, v, T, T, ctx, ops)
        del qkv, q, k, v, normed  # dead before the projection allocates its output
        if ctx.cp is not None:
            with nvtx_range("comm.out_all_to_all"):
                out = ctx.cp.heads_to_tokens(out, ctx.grid)
        with nvtx_range("op.proj"):
            out = linear(out.reshape(B, n, C), a.proj)
        return out, new_kv

    def _chunked_qkv(self, h, ctx, ops, chunk: int):
        """qkv -> RMSNorm + RoPE a few whole frames at a time (at least one; as many as fit in
        ``chunk`` token rows), written into q (h's storage), k (and un-rotated k) and v: the live
        set is x, those [N, C] buffers and one slice's [rows, 3C], not h and the whole [N, 3C] qkv
        that the v view would keep alive through the attention. Whole frames keep RoPE's
        positions right: a slice is the grid (frames, H, W) at t_offset = its first frame. Traced
        at 720p (BSA, 16,384-row slices) this and the sliced FFN take the forward's activation peak
        from 11.69 to 6.5 GiB (runtime/memory.py); each slice is one more qkv and norm launch."""
        a = self.attn
        B, n, C = h.shape
        T, Hh, Ww = ctx.grid
        per_frame = Hh * Ww
        frames = max(1, chunk // (B * per_frame))
        shape = (B, n, a.num_heads, a.head_dim)
        # q goes into h's own storage: a slice's rows of h are dead once its qkv is computed, and
        # the caller handed over its only reference (hbox), so the live set is one [N, C] smaller.
        q_buf = h.view(shape) if h.is_contiguous() else h.new_empty(shape)
        outs = [q_buf] + [h.new_empty(shape) for _ in range(2 if ctx.return_kv else 1)]
        v = h.new_empty(shape)
        for f0 in range(0, T, frames):
            f1 = min(T, f0 + frames)
            rows = slice(f0 * per_frame, f1 * per_frame)
            with nvtx_range("op.qkv"):
                qkv = linear(h[:, rows], a.qkv).view(B, (f1 - f0) * per_frame, 3, a.num_heads, a.head_dim)
            q, k, v_rows = qkv.unbind(2)
            v[:, rows] = v_rows
            with nvtx_range("op.qk_rmsnorm_rope3d"):
                part = ops.qk_rmsnorm_rope3d(q, k, a.q_norm.weight, a.k_norm.weight, (f1 - f0, Hh, Ww),
                                             t_offset=ctx.cache_frames + f0, return_k_unroped=ctx.return_kv)
            for buf, piece in zip(outs, part):
                buf[:, rows] = piece
            del qkv, q, k, v_rows, part
        return tuple(outs), v

    @staticmethod
    def _attend(q, k, v, frames_q, frames_k, ctx, ops):
        """Dense attention, or block-sparse over the (frames, H, W) grids of q and k when BSA is
        on and the call's latent has more than one frame (the official rule)."""
        bsa = ctx.bsa
        if bsa is not None and ctx.grid[0] > 1 and q.shape[1] > 0:
            _, Hh, Ww = ctx.grid
            grid_q, grid_k = (frames_q, Hh, Ww), (frames_k, Hh, Ww)
            if bsa_grid_tiles(grid_q, bsa["chunk_3d_shape_q"]) and bsa_grid_tiles(grid_k, bsa["chunk_3d_shape_k"]):
                with nvtx_range("op.block_sparse_attention"):
                    out = ops.block_sparse_attention(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), grid_q, grid_k,
                        bsa["sparsity"], bsa["cdf_threshold"], bsa["chunk_3d_shape_q"], bsa["chunk_3d_shape_k"],
                    )
                return out.transpose(1, 2)
            warnings.warn(
                f"block-sparse attention: latent grids q {grid_q} / k {grid_k} do not tile into the chunks "
                f"{bsa['chunk_3d_shape_q']} / {bsa['chunk_3d_shape_k']}; using dense attention for them "
                "(pad the latent to a multiple of the chunk shape to keep BSA)",
                stacklevel=2,
            )
        with nvtx_range("op.attention"):
            return attention(q, k, v, ctx.attention)

    def _cross_attention(self, h, ctx, ops):
        a = self.cross_attn
        B, N, C = h.shape
        nc = ctx.num_cond_tokens_local  # only noisy tokens take part (0 on the KV-cache path)
        hq = h[:, nc:]
        with nvtx_range("op.cross_q_kv"):
            q = linear(hq, a.q_linear).view(B, N - nc, a.num_heads, a.head_dim)
            k, v = linear(ctx.text, a.kv_linear).view(B, -1, 2, a.num_heads, a.head_dim).unbind(2)
        with nvtx_range("op.qk_rmsnorm"):
            q, k = ops.qk_rmsnorm_rope3d(q, k, a.q_norm.weight, k_weight=a.k_norm.weight)
        with nvtx_range("op.cross_attention"):
            out = attention(q, k, v, ctx.attention, key_valid=ctx.text_valid)
        with nvtx_range("op.cross_proj"):
            out = linear(out.reshape(B, N - nc, C), a.proj)
        if nc:
            out = torch.cat([out.new_zeros(B, nc, C), out], dim=1)
        return out


class FinalLayer(nn.Module):
    def __init__(self, cfg: LongCatConfig):
        super().__init__()
        self.adaLN_modulation = Linear(cfg.adaln_tembed_dim, 2 * cfg.hidden_size)
        self.linear = Linear(cfg.hidden_size, cfg.patch_volume * cfg.out_channels)

    def modulation(self, t):
        return linear_fp32(F.silu(t), self.adaLN_modulation).chunk(2, dim=-1)  # shift, scale


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


# Why BSA is refused under ring attention (runtime/dit.py's enable_bsa says the same).
_RING_BSA = ("block-sparse attention is not supported with ring attention (ring_size > 1): its 3D chunks straddle "
             "the ring segments and each query chunk's selected key chunks would have to be fetched from other ranks; "
             "disable BSA (dit.disable_bsa(), config enable_bsa=false) or use Ulysses alone (ring_size=1)")


class ForwardContext:
    """Per-call facts every block reads (shapes, text, conditioning)."""

    __slots__ = ("grid", "cache_grid", "cache_frames", "num_cond_tokens", "num_cond_tokens_local", "text",
                 "text_valid", "skip_crs_attn", "return_kv", "attention", "bsa", "cp", "ffn_chunk_tokens", "rope")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))
        if self.num_cond_tokens_local is None:  # no context parallelism: the rank holds every token
            self.num_cond_tokens_local = self.num_cond_tokens


class ResidualStream:
    """The forward's state between its parts (LongCatTransformer.run_blocks and the step cache's
    head and tail): the residual stream ``x``, its normalized+modulated copy ``h`` for the next
    block, that block's modulation ``mod``, the timestep embedding ``t``, and the call's fixed
    facts. Its tensors are what a CUDA graph of the head leaves for a graph of the tail
    (runtime/compiled.py)."""

    __slots__ = ("x", "h", "mod", "t", "ctx", "ops", "kv_cache", "kv_sink", "block_fn", "x_in", "r")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))

    def copy(self) -> "ResidualStream":
        """A new ResidualStream on the same tensors (a part that rebinds its fields leaves this one
        as it was)."""
        return ResidualStream(**{k: getattr(self, k) for k in self.__slots__})

    def tensors(self) -> list:
        """Every tensor the stream holds (views included), in a fixed order."""
        out = [self.x, self.h, self.t, self.x_in, self.r, self.ctx.text, self.ctx.text_valid]
        out += list(self.mod or ())
        return [t for t in out if isinstance(t, torch.Tensor)]


class LongCatTransformer(nn.Module):
    """The network. Input checking and the public API live in ``LongCatDiT`` (runtime/dit.py)."""

    def __init__(self, cfg: LongCatConfig):
        super().__init__()
        self.cfg = cfg
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg)
        self.y_embedder = CaptionEmbedder(cfg)
        self.blocks = nn.ModuleList([LongCatBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        # Token rows per FFN slice (LongCatDiT.enable_forward_chunking), None: the whole sequence.
        self.ffn_chunk_tokens: Optional[int] = None
        # A WeightStreamer (runtime/streaming.py) when some blocks' weights live in host memory and
        # are copied into device staging buffers ahead of use; None: every block is resident.
        self.weight_streamer = None

    def run(self, *args, step_cache=None, **kwargs) -> torch.Tensor:
        """The forward on checked inputs (LongCatDiT.forward checks them; the arguments are
        :meth:`begin`'s). ``step_cache``: a StepCache (runtime/step_cache.py) that decides after the
        first blocks whether to skip the middle ones, or None."""
        s = self.begin(*args, keep_input=step_cache is not None, **kwargs)
        if step_cache is None:
            self.run_blocks(s, 0, len(self.blocks))
            return self.finish(s)
        sums = self.step_cache_head(s, step_cache)
        return self.step_cache_tail(s, step_cache, step_cache.decide(sums))

    def begin(
        self,
        hidden_states: torch.Tensor,  # [B, Cin, T, H, W], model dtype
        timestep: torch.Tensor,  # [B, T] float32 (already rounded through the model dtype)
        text: Optional[torch.Tensor],  # [B, L, caption_channels], model dtype (unused with skip_crs_attn)
        text_mask: Optional[torch.Tensor],  # bool [B, L] (True = valid) or None
        num_cond_latents: int,
        kv_cache: Optional[Dict[int, Tuple[torch.Tensor, torch.Tensor]]],  # [B, Nc, H, D] views
        cache_frames: int,
        kv_sink,  # None, or a mapping that receives each block's (k, v) [B, N, heads, D]
        skip_crs_attn: bool,
        attention_backend: str,
        ops: Ops,  # the kernel path (kernels/__init__.py)
        cp=None,  # ContextParallel (runtime/parallel.py) or None: this rank embeds its tile only
        block_fn: Optional[Callable] = None,  # called as block_fn(block, *args) instead of block(*args)
        keep_input: bool = False,  # keep the stream entering block 0 (x_in: the step cache's signal)
    ):
        """Embedding and the first norm: the :class:`ResidualStream` entering block 0."""
        cfg = self.cfg
        B, _, T, H, W = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        grid = (T // pt, H // ph, W // pw)
        tokens_per_frame = grid[1] * grid[2]
        local_tokens_per_frame = tokens_per_frame
        rope = None  # the ring segment's RoPE tables (None: RoPE from the grid)
        if cp is not None:
            cp.check_grid(grid)  # before any collective, the same error on every rank
            if cp.ring and cfg.enable_bsa:
                raise ValueError(_RING_BSA)
            local_tokens_per_frame //= cp.size
            if cp.ring:
                rope = segment_rope_tables(grid, cfg.head_dim, cache_frames, cp.ring_rank, cp.ring_size,
                                           hidden_states.device)

        with nvtx_range("embed.x_t_y"):
            x = self.x_embedder(hidden_states, cp)  # [B, N, C] (this rank's N / cp.size under CP)
            t = self.t_embedder(timestep.flatten()).view(B, grid[0], -1)  # float32 [B, T, C_t]
            y = text_valid = None
            if not skip_crs_attn:
                y = self.y_embedder(text)  # [B, L, C]
        if y is not None and text_mask is not None:
            # Masked-out tokens contribute nothing, whatever they hold: selected away with where
            # (a multiply by 0 would keep a NaN or Inf). With text_tokens_zero_pad (the official
            # setting) the zeroed tokens are then attended like the others; without it they are
            # also left out of the attention, and zeroing them first keeps a non-finite value out
            # of the attention's weighted sum (0 * NaN is NaN), for the same result otherwise.
            y = torch.where(text_mask[:, :, None], y, y.new_zeros(()))
            if not cfg.text_tokens_zero_pad:
                text_valid = text_mask

        ctx = ForwardContext(
            grid=grid,
            cache_grid=(cache_frames, grid[1], grid[2]),
            cache_frames=cache_frames,
            num_cond_tokens=num_cond_latents * tokens_per_frame,
            num_cond_tokens_local=num_cond_latents * local_tokens_per_frame,
            text=y,
            text_valid=text_valid,
            skip_crs_attn=skip_crs_attn,
            return_kv=kv_sink is not None,
            attention=attention_backend,
            bsa=cfg.bsa if cfg.enable_bsa else None,
            cp=cp,
            ffn_chunk_tokens=self.ffn_chunk_tokens,
            rope=rope,
        )

        with nvtx_range("op.modulation"):
            mod = self.blocks[0].modulation(t)
        with nvtx_range("op.layernorm_modulate"):
            h = ops.layernorm_modulate(x, mod[0], mod[1])
        return ResidualStream(x=x, h=h, mod=mod, t=t, ctx=ctx, ops=ops, kv_cache=kv_cache, kv_sink=kv_sink,
                              block_fn=block_fn, x_in=x if keep_input else None)

    # Step caching (runtime/step_cache.py, docs/design/step_cache.md): the forward in two parts
    # around the decision, so a CUDA graph runner can capture each part (runtime/compiled.py):
    # the head (embedding, the first Fn blocks, the signal), the host's decision, then a tail: the
    # middle blocks and the store (a full step), or the cached residual added and fused with the
    # norm of block depth - Bn (a cached step), then the last Bn blocks and the final layer.
    def step_cache_head(self, s: "ResidualStream", sc, always: bool = False):
        """Blocks ``[0, Fn)`` on ``s``; returns the signal sums (:meth:`StepCache.signal`)."""
        self.run_blocks(s, 0, sc.Fn_compute_blocks)
        with nvtx_range("step_cache.signal"):
            sums, s.r = sc.signal(s.x, s.x_in, s.ctx.num_cond_tokens_local, s.ctx.cp, always=always)
        s.x_in = None
        return sums

    def step_cache_tail(self, s: "ResidualStream", sc, cached: bool) -> torch.Tensor:
        depth = len(self.blocks)
        mid_end = depth - sc.Bn_compute_blocks
        r, s.r = s.r, None  # the Fn residual: the new reference on a full step, unused on a cached one
        if cached:
            del r
            with nvtx_range("step_cache.cached_residual"):
                approx = sc.approximation()
            self._add_residual(s, approx, None, mid_end)
            del approx
        else:
            with nvtx_range("step_cache.start_full"):
                x_mid_in = sc.start_full(r, s.x)  # None: staged in the cache's buffer
            del r  # the reference now: not held through the middle blocks
            self.run_blocks(s, sc.Fn_compute_blocks, mid_end)
            with nvtx_range("step_cache.store"):
                sc.store(s.x, x_mid_in)
            del x_mid_in
        self.run_blocks(s, mid_end, depth)
        return self.finish(s)

    def run_blocks(self, s: "ResidualStream", start: int, stop: int) -> None:
        """Blocks ``[start, stop)`` on the stream ``s`` (each block's last gated residual fused
        with the next norm: block ``stop``'s attention norm, or the final layer's)."""
        streamer = self.weight_streamer
        for i in range(start, stop):
            block = self.blocks[i]
            with nvtx_range("block", i):  # "block.{i}"
                if streamer is not None:  # block i's weights on the device, the next one's on the way
                    streamer.before_block(i)
                block_kv = None if s.kv_cache is None else s.kv_cache[i]
                xh = [s.x, s.h]  # the block's to free (LongCatBlock's doc)
                s.x = s.h = None
                if s.block_fn is None:
                    x, ffn_out, gate_mlp, new_kv = block(xh, s.mod, s.ctx, s.ops, block_kv)
                else:  # regional compilation: one compiled function runs every block (runtime/compiled.py)
                    x, ffn_out, gate_mlp, new_kv = s.block_fn(block, xh, s.mod, s.ctx, s.ops, block_kv)
                if new_kv is not None:
                    s.kv_sink[i] = new_kv
                self._add_residual(s, ffn_out, gate_mlp, i + 1, x)
                del x, ffn_out  # not held through the next block

    def _add_residual(self, s: "ResidualStream", residual, gate, next_block: int, x=None) -> None:
        """``s.x = x + gate * residual`` fused with the norm of block ``next_block`` (the final
        layer's past the last block), which also gives ``s.h`` and ``s.mod``."""
        t = s.t
        with nvtx_range("op.modulation"):
            if next_block < len(self.blocks):
                s.mod = self.blocks[next_block].modulation(t)
                shift, scale = s.mod[0], s.mod[1]
            else:
                s.mod = None
                shift, scale = self.final_layer.modulation(t)
        x = s.x if x is None else x
        s.x = s.h = None  # the old h is dead (a cached step drops block Fn's)
        with nvtx_range("op.residual_layernorm_modulate"):
            s.x, s.h = s.ops.residual_layernorm_modulate(x, residual, gate, shift, scale)

    def finish(self, s: "ResidualStream") -> torch.Tensor:
        """The final projection of ``s.h`` (normalized by the last block's fused residual),
        gathered across ranks, unpatchified: float32 [B, C_out, T, H, W]."""
        ctx, cfg = s.ctx, self.cfg
        h, s.h, s.x = s.h, None, None
        with nvtx_range("final.linear"):
            out = linear_fp32(h, self.final_layer.linear)  # [B, N, pt*ph*pw*C_out] float32
        del h
        if ctx.cp is not None:
            with nvtx_range("comm.output_all_gather"):
                out = ctx.cp.gather_tokens(out, ctx.grid)
        return unpatchify(out, ctx.grid, cfg.patch_size, cfg.out_channels)
