"""Quantized block weights (FP8, INT8), chosen at load: the math, the storage, the loaders.

Design notes (the math per mode, the storage and save layouts, the official INT8 format, LoRA on
a quantized model, measured deviations): docs/design/quantization.md.

Modes (``LongCatDiT.from_pretrained(..., quantize=...)`` / ``from_config``):

- ``"fp8"``: float8_e4m3fn weights with per-output-row float32 scales, activations quantized per
  token to float8 on the fly, the GEMM one ``torch._scaled_mm`` with row-wise scales;
- ``"fp8-weight-only"`` / ``"int8-weight-only"``: float8 / int8 storage, dequantized to the model
  dtype at the GEMM, which runs in the model dtype.

Only the block GEMMs are quantized (:data:`TARGETS`); embedders, adaLN and the final layer stay in
the model dtype.

Why our own thin layer and not torchao's tensor subclasses: the runtime copies each block's
parameters and buffers as plain tensors into preallocated device staging buffers (weight
streaming: ``.data`` swaps and ``copy_`` into plain storage), captures CUDA graphs over those
storages, merges LoRA deltas into the weights with ``copy_`` and restores them bit-exactly from
host copies, and traces memory on fake tensors. A tensor-subclass weight (torchao's
``Int8Tensor``/``Float8Tensor``) does not survive a ``copy_`` into plain storage or a ``.data`` swap,
and its inner tensors are invisible to code walking ``parameters()``/``buffers()``. So a quantized
``Linear`` holds plain tensors: ``weight`` an int8/float8 ``nn.Parameter(requires_grad=False)``,
``weight_scale`` a float32 buffer, ``quant`` the mode string ``linear()`` dispatches on. (torchao
0.18's ``Int8WeightOnlyConfig`` also scales by ``amax / 127.5``, not the official ``amax / 127``, so
its stored values differ from the official INT8 checkpoints' anyway.)

The checkpoint formats (the official INT8 folder, our own save, the checks that a folder's tensors
agree with what it says) are runtime/quantized_checkpoints.py, which builds on the storage rules
here (TARGETS, scales per row, :func:`quantize_weight`, :func:`dequantize`).
"""

from __future__ import annotations

import warnings
from typing import Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .names import QUANTIZE_CHOICES

__all__ = [
    "QUANT_MODES", "TARGETS", "FP8_DTYPE", "check_quantize", "storage_dtype", "quantize_weight", "dequantize",
    "quantize_activation", "quantized_linear", "fp8_gemm_supported", "resolve_mode_for_device",
    "quantize_linear_", "quantize_model", "set_quant_mode", "quantized_layers", "model_quantization",
    "weight_bytes",
]

QUANT_MODES = QUANTIZE_CHOICES  # runtime/names.py: the command line lists them without importing torch
# Block GEMMs that are quantized (names under ``blocks.<i>.``, internal layout: fused qkv, kv, w13).
TARGETS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
           "ffn.w13", "ffn.w2")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
WEIGHT_SCALE_MIN = 1e-8  # amax clamp of a weight row (the official INT8 format's)
ACT_SCALE_MIN = 1e-12  # per-token activation scale clamp (an all-zero token quantizes to zeros)
_STORAGE = {"fp8": FP8_DTYPE, "fp8-weight-only": FP8_DTYPE, "int8-weight-only": torch.int8}


def check_quantize(mode) -> Optional[str]:
    """None or one of :data:`QUANT_MODES`; anything else is a ValueError listing the choices."""
    if mode is None or (isinstance(mode, str) and mode in QUANT_MODES):
        return mode
    raise ValueError(f"quantize must be None or one of {list(QUANT_MODES)}, got {mode!r}")


def storage_dtype(mode: str) -> torch.dtype:
    return _STORAGE[check_quantize(mode)]


def _qmax(dtype: torch.dtype) -> float:
    if dtype == torch.int8:
        return INT8_MAX
    if dtype == FP8_DTYPE:
        return FP8_MAX
    raise ValueError(f"quantized storage is int8 or float8_e4m3fn, got {dtype}")


# ---------------------------------------------------------------------------------------------
# The math (plain PyTorch; the tests' float64 emulation restates it)
# ---------------------------------------------------------------------------------------------


def quantize_weight(w: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row quantization of ``w`` [out, in] in float32:
    ``scale = amax(|w|, dim=1).clamp(min=1e-8) / qmax`` (qmax 127 for int8, 448 for float8_e4m3fn),
    int8: ``round(w / scale)`` clamped to [-128, 127]; float8: ``w / scale`` cast (round to nearest).
    Returns ``(q [out, in] dtype, scale [out] float32)``. Rows are independent, so the row halves of a
    fused weight (w13 = [w1; w3]) quantize exactly as w1 and w3 would on their own."""
    qmax = _qmax(dtype)
    w32 = w.float()
    scale = w32.abs().amax(dim=1).clamp(min=WEIGHT_SCALE_MIN) / qmax
    v = w32 / scale[:, None]
    if dtype == torch.int8:
        q = v.round_().clamp_(-128, 127).to(torch.int8)
    else:
        q = v.clamp_(-FP8_MAX, FP8_MAX).to(dtype)  # |v| <= 448 up to float32 rounding
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale[:, None]``, the product computed in float32 and cast to ``dtype``. ``q`` converts to
    any model dtype exactly (int8 and float8_e4m3fn values fit bf16/fp16/fp32), and the in-place
    multiply by the float32 scales computes in float32 and rounds into ``dtype`` once: the same
    values as ``(q.float() * scale[:, None]).to(dtype)`` without a float32 copy of the weight (the
    eager weight-only GEMM's transient is one model-dtype weight; torch.compile fuses it further)."""
    return q.to(dtype, copy=True).mul_(scale.to(torch.float32)[:, None])


# Rows of an activation quantized at once in eager mode. Why: the float32 transients of
# quantize-then-cast are 8 bytes per element of the whole [M, K] input, 5.2 GiB at 720p
# (M = 168,960, K = 4096; traced, runtime/memory.py), more than the forward's chunked activation
# peak (6.5 GiB); in 8192-row slices they are 256 MiB (4096 rows would halve that but double the
# launches and the fake-tensor tracing time of the memory planner). Under torch.compile inductor
# fuses the chain into one kernel that materializes nothing, so the whole tensor goes at once there.
ACT_QUANT_ROWS = 8192


def _quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=ACT_SCALE_MIN)
    return (x32 / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_activation(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token float8 quantization of ``x`` [M, K]: ``scale = max(amax(|x|, -1) / 448,
    1e-12)`` [M, 1] float32, ``x / scale`` cast to float8_e4m3fn (row by row, so slicing the rows
    changes no value)."""
    M = x.shape[0]
    if M <= ACT_QUANT_ROWS or torch.compiler.is_compiling():
        return _quantize_rows(x)
    out = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    for r0 in range(0, M, ACT_QUANT_ROWS):
        out[r0:r0 + ACT_QUANT_ROWS], scale[r0:r0 + ACT_QUANT_ROWS] = _quantize_rows(x[r0:r0 + ACT_QUANT_ROWS])
    return out, scale


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                     mode: str) -> torch.Tensor:
    """The GEMM of a quantized Linear (``linear()`` in model.py): ``x`` [..., in] in the model dtype,
    ``weight`` [out, in] int8/float8, ``scale`` [out] float32; the output in ``x``'s dtype."""
    if mode == "fp8":
        return _fp8_linear(x, weight, scale, bias)
    # Weight-only: dequantize, then the model-dtype GEMM.
    return F.linear(x, dequantize(weight, scale, x.dtype), bias)


def _fp8_linear(x, weight, scale, bias):
    lead, K = x.shape[:-1], x.shape[-1]
    N = weight.shape[0]
    xq, sa = quantize_activation(x.reshape(-1, K))
    sb = scale.reshape(1, N)
    dtype = x.dtype
    if x.device.type == "cuda":
        if K % 16 or N % 16:
            # cuBLAS/CUTLASS FP8 GEMMs need K, N multiples of 16 (every LongCat block GEMM has them):
            # the same math, dequantized, in float32.
            out = torch.addmm(bias.float(), xq.float() * sa, (weight.float() * sb).t()) if bias is not None \
                else (xq.float() * sa) @ (weight.float() * sb).t()
            return out.to(dtype).reshape(*lead, N)
        if dtype != torch.bfloat16:
            # Row-wise scaled FP8 GEMMs produce bfloat16 on CUDA (float32/float16 outputs and a bias
            # with them are not supported by every torch/cuBLAS version): bf16 out, bias after.
            out = torch._scaled_mm(xq, weight.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16).to(dtype)
            out = out if bias is None else out + bias
            return out.reshape(*lead, N)
    out = torch._scaled_mm(xq, weight.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=dtype)
    return out.reshape(*lead, N)


# ---------------------------------------------------------------------------------------------
# The device check: FP8 tensor cores need compute capability 8.9 (Ada) or newer
# ---------------------------------------------------------------------------------------------


def fp8_gemm_supported(capability: Tuple[int, int]) -> bool:
    return tuple(capability) >= (8, 9)


def resolve_mode_for_device(mode: Optional[str], device, capability: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """The mode a model placed on ``device`` runs: ``"fp8"`` on a CUDA device of compute capability
    below 8.9 (no FP8 tensor cores: ``_scaled_mm`` fails there) becomes ``"fp8-weight-only"`` (same
    storage), with one warning. ``capability`` (major, minor) is read from the device when None (so
    the tests pass one on the CPU). The CPU runs ``_scaled_mm`` itself; the meta device plans only."""
    if mode != "fp8":
        return mode
    device = torch.device(device)
    if device.type != "cuda":
        return mode
    cap = tuple(capability) if capability is not None else torch.cuda.get_device_capability(device)
    if fp8_gemm_supported(cap):
        return mode
    warnings.warn(
        f"quantize='fp8': {device} has compute capability {cap[0]}.{cap[1]}, and FP8 GEMMs need 8.9 or newer "
        "(Ada, Hopper, Blackwell); using 'fp8-weight-only' instead (the same float8 weights, dequantized to the "
        "model dtype at each GEMM)",
        stacklevel=3,
    )
    return "fp8-weight-only"


# ---------------------------------------------------------------------------------------------
# Quantizing a model in place, tensor by tensor
# ---------------------------------------------------------------------------------------------


def quantized_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, Linear)`` of every block GEMM that quantization applies to (:data:`TARGETS`)."""
    for i, block in enumerate(model.blocks):
        for t in TARGETS:
            yield f"blocks.{i}.{t}", block.get_submodule(t)


def model_quantization(model: nn.Module) -> Optional[str]:
    """The mode of the model's quantized layers (they share one), or None."""
    for _, layer in quantized_layers(model):
        return layer.quant
    return None


@torch.no_grad()
def quantize_linear_(layer: nn.Module, mode: str, source: Optional[torch.Tensor] = None) -> None:
    """Make ``layer`` (a model.py ``Linear``) a quantized Linear of ``mode``, in place: ``weight``
    becomes an int8/float8 ``nn.Parameter`` and ``weight_scale`` a float32 buffer on the same device.
    On the meta device only the storage changes. ``source`` (the float weight, any dtype) is quantized
    instead of the layer's current weight. A layer of the same storage dtype only changes mode."""
    dtype = storage_dtype(mode)
    w = layer.weight
    if source is None and layer.quant is not None and w.dtype == dtype:
        layer.quant = mode
        return
    if w.is_meta:
        q = torch.empty(w.shape, dtype=dtype, device="meta")
        s = torch.empty(w.shape[0], dtype=torch.float32, device="meta")
    else:
        src = source if source is not None else (w if layer.quant is None else dequantize(w, layer.weight_scale))
        q, s = quantize_weight(src.to(w.device), dtype)
    layer.weight = nn.Parameter(q, requires_grad=False)
    layer.weight_scale = s
    layer.quant = mode


def quantize_model(model: nn.Module, mode: Optional[str]) -> nn.Module:
    """Quantize every block GEMM of ``model`` in place, one tensor at a time (each weight's float32
    copy is the only extra memory). ``mode`` None leaves the model as it is."""
    mode = check_quantize(mode)
    if mode is not None:
        for _, layer in quantized_layers(model):
            quantize_linear_(layer, mode)
    return model


def set_quant_mode(model: nn.Module, mode: str) -> None:
    """Switch between modes sharing one storage ("fp8" <-> "fp8-weight-only") without touching data."""
    for _, layer in quantized_layers(model):
        if layer.quant is not None and layer.weight.dtype == storage_dtype(mode):
            layer.quant = mode


def place(model: nn.Module, device, capability=None) -> None:
    """At placement (``_materialize``): downgrade "fp8" where the device has no FP8 GEMMs."""
    mode = model_quantization(model)
    resolved = resolve_mode_for_device(mode, device, capability)
    if resolved != mode:
        set_quant_mode(model, resolved)


def init_target(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """For random init (``LongCatDiT._init_random``): ``p`` itself, or for a quantized weight a new
    model-dtype tensor of its shape, to fill and hand to :func:`store_init` (one weight at a time)."""
    return p if p.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.empty(p.shape, dtype=dtype, device=p.device)


@torch.no_grad()
def store_init(model: nn.Module, name: str, value: torch.Tensor) -> None:
    layer = model.get_submodule(name.rsplit(".", 1)[0])
    q, s = quantize_weight(value, layer.weight.dtype)
    layer.weight.copy_(q)
    layer.weight_scale.copy_(s)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (quantized storage and scales included; meta-safe)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
