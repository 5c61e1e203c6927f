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

Why ~620 lines in one file: the math, the in-place conversion and the three checkpoint formats'
readers and writer share the storage rules (TARGETS, scales per row); split, each would restate them.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .names import QUANTIZE_CHOICES

__all__ = [
    "QUANT_MODES", "TARGETS", "FP8_DTYPE", "check_quantize", "storage_dtype", "quantize_weight", "dequantize",
    "quantize_activation", "quantized_linear", "fp8_gemm_supported", "resolve_mode_for_device",
    "quantize_linear_", "quantize_model", "set_quant_mode", "quantized_layers", "model_quantization",
    "find_checkpoint", "save_quantized", "NATIVE_MARKER", "NATIVE_WEIGHTS", "OFFICIAL_INT8_CONFIG",
    "OFFICIAL_INT8_INDEX", "OFFICIAL_INT8_METHOD",
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


# ---------------------------------------------------------------------------------------------
# Checkpoints: the official INT8 folder, our own quantized save, the official float layout
# ---------------------------------------------------------------------------------------------

NATIVE_MARKER = "longcat_quantized.json"
NATIVE_WEIGHTS = "model.safetensors"
NATIVE_FORMAT = "longcat-native-quantized"
NATIVE_FORMAT_VERSION = 1
OFFICIAL_INT8_CONFIG = "quantization_config.json"
OFFICIAL_INT8_INDEX = "quantized_model.safetensors.index.json"
OFFICIAL_INT8_SINGLE = "quantized_model.safetensors"
OFFICIAL_INT8_METHOD = "int8_per_channel_symmetric"
OFFICIAL_INT8_FOLDER = "base_model_int8"  # where the official Avatar checkpoint keeps it
_SAFETENSORS_QUANT = {"I8": torch.int8, "F8_E4M3": FP8_DTYPE}


def _folder_kind(d: Path) -> Optional[str]:
    if not d.is_dir():
        return None
    if (d / NATIVE_MARKER).is_file():
        return "native"
    if ((d / OFFICIAL_INT8_CONFIG).is_file() or (d / OFFICIAL_INT8_INDEX).is_file()
            or any(d.glob("quantized_model*.safetensors"))):
        return "official-int8"
    if (d / "config.json").is_file():
        return "official"
    return None


def find_checkpoint(path, subfolder: Optional[str], quantize: Optional[str]) -> Tuple[Path, str]:
    """``(folder, kind)``: kind "official" (config.json + diffusion_pytorch_model*), "official-int8"
    (the official INT8 layout) or "native" (:func:`save_quantized`). Looked for in ``path[/subfolder]``,
    then its ``dit/``, then its ``base_model_int8/`` (and ``dit/base_model_int8/``); with
    ``quantize="int8-weight-only"`` an INT8 folder there is preferred to the float one."""
    from .weights import find_dit_dir

    root = Path(str(path)).expanduser()
    if subfolder:
        root = root / subfolder
    if not root.exists():
        raise FileNotFoundError(f"checkpoint path {str(root)!r} does not exist")
    int8_dirs = [root / OFFICIAL_INT8_FOLDER, root / "dit" / OFFICIAL_INT8_FOLDER]
    if quantize == "int8-weight-only" and _folder_kind(root) is None and _folder_kind(root / "dit") != "official-int8":
        for d in int8_dirs:
            if _folder_kind(d) == "official-int8":
                return d, "official-int8"
    for d in [root, root / "dit", *int8_dirs]:
        kind = _folder_kind(d)
        if kind is not None:
            if kind == "official" and quantize == "int8-weight-only" and d == root / "dit":
                for q in int8_dirs:
                    if _folder_kind(q) == "official-int8":
                        return q, "official-int8"
            return d, kind
    return find_dit_dir(path, subfolder), "official"  # raises its FileNotFoundError


def _read_json(path: Path, what: str) -> dict:
    from .weights import CheckpointError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable {what} ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def checkpoint_mode(folder: Path, kind: str, quantize: Optional[str]) -> Tuple[Optional[str], Optional[torch.dtype]]:
    """``(mode the model is built with, the saved model dtype or None)`` for a checkpoint folder:
    ``quantize`` when given; else "int8-weight-only" for the official INT8 layout, the saved mode for
    ours, None (unquantized) for the official float layout."""
    from .weights import CheckpointError

    if kind == "official":
        return quantize, None
    if kind == "official-int8":
        cfg_path = folder / OFFICIAL_INT8_CONFIG
        if not cfg_path.is_file():
            raise CheckpointError(f"{folder} holds official INT8 weights but no {OFFICIAL_INT8_CONFIG} (it names "
                                  f"the quantization method, {OFFICIAL_INT8_METHOD!r})")
        method = _read_json(cfg_path, "quantization config").get("quantization_method")
        if method != OFFICIAL_INT8_METHOD:
            raise CheckpointError(f"{cfg_path}: quantization_method {method!r} is not supported; longcat-native reads "
                                  f"{OFFICIAL_INT8_METHOD!r} (the official INT8 checkpoints)")
        return quantize or "int8-weight-only", None
    saved, dt = native_description(folder)
    return quantize if quantize is not None else saved, dt


_MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_description(folder: Path) -> Tuple[Optional[str], torch.dtype]:
    """``(quantization, model dtype)`` as a :func:`save_quantized` folder's description says them,
    each checked to be a known value (a CheckpointError otherwise). What the description says is
    checked against the stored tensors by :func:`check_quantized_checkpoint`."""
    from .weights import CheckpointError

    where = folder / NATIVE_MARKER
    meta = _read_json(where, "longcat-native quantized model description")
    if meta.get("format") != NATIVE_FORMAT or meta.get("format_version") != NATIVE_FORMAT_VERSION:
        raise CheckpointError(f"{where}: format {meta.get('format')!r} version "
                              f"{meta.get('format_version')!r}; this longcat-native reads {NATIVE_FORMAT!r} version "
                              f"{NATIVE_FORMAT_VERSION}")
    saved = meta.get("quantization")
    if saved is not None and saved not in QUANT_MODES:
        raise CheckpointError(f"{where}: unknown quantization {saved!r} (one of {list(QUANT_MODES)} or null)")
    if meta.get("dtype") not in _MODEL_DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {meta.get('dtype')!r} (one of {list(_MODEL_DTYPES)})")
    return saved, _MODEL_DTYPES[meta["dtype"]]


def weight_files(folder: Path, kind: str) -> List[Path]:
    from .weights import CheckpointError, index_shards, list_weight_files

    if kind == "official":
        return list_weight_files(folder)
    if kind == "native":
        f = folder / NATIVE_WEIGHTS
        if not f.is_file():
            raise CheckpointError(f"{folder}: {NATIVE_WEIGHTS} is missing (written by save_quantized)")
        return [f]
    if (folder / OFFICIAL_INT8_INDEX).is_file():
        return index_shards(folder, folder / OFFICIAL_INT8_INDEX)
    if (folder / OFFICIAL_INT8_SINGLE).is_file():
        return [folder / OFFICIAL_INT8_SINGLE]
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(f"no {OFFICIAL_INT8_SINGLE} or {OFFICIAL_INT8_INDEX} in {folder}")
    return files


@dataclass
class _Item:
    """One tensor to copy: ``key`` in ``file`` into ``internal`` (row half ``half`` of w13, or all);
    ``scale_key``/``scale_file``: its per-row scales when the source is quantized."""

    internal: str
    half: Optional[int]
    key: str
    file: Path
    scale_key: Optional[str] = None
    scale_file: Optional[Path] = None


@dataclass
class QuantLoadPlan:
    items: List[_Item] = field(default_factory=list)


def plan_from_official(plan) -> QuantLoadPlan:
    """weights.py's checked LoadPlan of the official float layout as a :class:`QuantLoadPlan`."""
    return QuantLoadPlan([_Item(internal, half, key, f) for f, entries in plan.by_file.items()
                          for key, internal, half in entries])


def check_quantized_checkpoint(model: nn.Module, files: List[Path], kind: str, cfg,
                               described: Optional[Tuple[Optional[str], torch.dtype]] = None) -> QuantLoadPlan:
    """Check the headers of an official-INT8 or native checkpoint against ``model`` (on the meta
    device): one CheckpointError naming every missing, unexpected, wrong-shaped, wrong-dtype or
    duplicated tensor, and every quantized weight without its scales.

    ``described``: for a native folder, ``(quantization, dtype)`` as its description says them
    (:func:`native_description`); every stored dtype must agree with it (the block GEMM weights in
    the storage of that mode, or in the model dtype for null; everything else in the model dtype,
    scales float32), whatever mode the model is built with. Why: a description that disagrees with
    its tensors would otherwise be believed: int8 weights under "fp8" re-quantized, under null
    dequantized, silently."""
    from .weights import (FLOAT_DTYPES, CheckpointError, expected_official_shape, internal_to_official,
                          cap_list, official_to_internal, read_headers)

    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    official = kind == "official-int8"
    targets = {f"{n}.weight" for n, _ in quantized_layers(model)}
    lies: List[str] = []
    said = ""
    if described is not None:
        d_mode, d_dtype = described
        d_store = _SAFETENSORS_NAMES[storage_dtype(d_mode)] if d_mode is not None else None
        d_float = _SAFETENSORS_NAMES[d_dtype]
        said = f"{NATIVE_MARKER}, which says quantization {json.dumps(d_mode)}, dtype {str(d_dtype).replace('torch.', '')}"

        def check_described(key, internal, dtype, quantized):
            if internal in targets and d_mode is not None:
                if dtype != d_store:
                    lies.append(f"{key}: stored {dtype}, expected {d_store}")
            elif quantized:
                lies.append(f"{key}: stored quantized ({dtype}), expected {d_float}"
                            + ("" if internal in targets else " (save_quantized quantizes only the block GEMMs)"))
            elif dtype != d_float:
                lies.append(f"{key}: stored {dtype}, expected {d_float}")
    q_suffix = ".weight_int8" if official else ".weight"
    weights: Dict[Tuple[str, int], Tuple[str, Path, Tuple[int, ...], str, bool]] = {}
    scales: Dict[Tuple[str, int], Tuple[str, Path, Tuple[int, ...], str]] = {}
    unexpected, duplicates, wrong = [], [], []

    def locate(name):
        return official_to_internal(name) if official else (name, None)

    def claim(table, internal, half, key, value) -> bool:
        """Record ``value`` for the tensor's slot; a second tensor for the same slot is a duplicate."""
        slot = (internal, 0 if half is None else half)
        if slot in table:
            duplicates.append(key)
            return False
        table[slot] = value
        return True

    for f, key, shape, dtype in read_headers(files):
        if key.endswith(".weight_scale"):
            internal, half = locate(key[: -len("_scale")])
            if internal not in shapes or not internal.endswith(".weight"):
                unexpected.append(key)
                continue
            if described is not None and dtype != "F32":
                lies.append(f"{key}: stored {dtype}, expected F32 (save_quantized stores float32 scales)")
            claim(scales, internal, half, key, (key, f, shape, dtype))
            continue
        quantized = key.endswith(".weight_int8") if official else dtype in _SAFETENSORS_QUANT
        internal, half = locate(key[: -len(q_suffix)] + ".weight" if quantized else key)
        if internal not in shapes:
            unexpected.append(key)
            continue
        if not claim(weights, internal, half, key, (key, f, shape, dtype, quantized)):
            continue
        if described is not None:
            check_described(key, internal, dtype, quantized)
        want = expected_official_shape(shapes[internal], internal, half, cfg) if official else shapes[internal]
        if shape != want:
            wrong.append(f"{key}: checkpoint {list(shape)}, model expects {list(want)}")
        elif quantized and official and dtype != "I8":
            wrong.append(f"{key}: dtype {dtype}, the official INT8 format stores int8 (I8)")
        elif quantized and not internal.endswith(".weight"):
            wrong.append(f"{key}: a quantized dtype ({dtype}) for a tensor that is not a Linear weight")
        elif not quantized and dtype not in FLOAT_DTYPES:
            wrong.append(f"{key}: dtype {dtype} is not floating point")

    missing, plan = [], QuantLoadPlan()
    for name in shapes:
        split = official and name.endswith(".ffn.w13.weight")
        for part, half in ([(0, 0), (1, 1)] if split else [(0, None)]):
            entry = weights.get((name, part))
            if entry is None:
                missing.append(name.replace("w13", "w1" if part == 0 else "w3") if split
                               else (internal_to_official(name) if official else name))
                continue
            key, f, wshape, _, quantized = entry
            item = _Item(name, half, key, f)
            if quantized:
                s = scales.pop((name, part), None)
                if s is None:
                    missing.append(f"{key[: -len(q_suffix)]}.weight_scale (the scales of {key})")
                    continue
                skey, sf, sshape, sdtype = s
                if sshape != (wshape[0],):
                    wrong.append(f"{skey}: shape {list(sshape)}, expected [{wshape[0]}] (one scale per row of {key})")
                    continue
                if sdtype not in ("F32", "F16", "BF16"):
                    wrong.append(f"{skey}: dtype {sdtype}, scales are float32")
                    continue
                item.scale_key, item.scale_file = skey, sf
            plan.items.append(item)
    unexpected += [v[0] + " (scales of no quantized weight)" for v in scales.values()]
    if missing or unexpected or wrong or duplicates or lies:
        lines = [f"checkpoint {cap_list([str(f) for f in files], 4)} does not match the model config"
                 + (" or its description:" if lies else ":")]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape or dtype", wrong),
                             ("duplicated across shards", duplicates), (f"disagree with {said}", lies)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + cap_list(items))
        raise CheckpointError("\n".join(lines))
    return plan


@torch.no_grad()
def copy_weights(model: nn.Module, plan: QuantLoadPlan) -> None:
    """Copy the planned tensors into ``model`` (allocated), one tensor at a time, through a quantize
    step where the destination is quantized: a source already quantized in the destination's storage
    dtype is copied as stored (values and scales, bit-exact); any other source is dequantized to
    float32 (if quantized) and quantized per row. Non-quantized destinations get the (dequantized)
    values cast to the model dtype. NaN/Inf values, non-positive scales, and quantized weights whose
    dequantized values overflow the model dtype (what a weight-only GEMM computes in: a row's
    largest |q| x its scale must be finite in that dtype) -> CheckpointError naming them."""
    from safetensors import safe_open

    from .weights import CheckpointError, cap_list

    params = dict(model.named_parameters())
    model_dtype = next(p.dtype for p in params.values() if p.dtype in (torch.float32, torch.bfloat16, torch.float16))
    overflow = f"dequantized with its scales it overflows {str(model_dtype).replace('torch.', '')}"
    bad: List[Tuple[str, torch.Tensor]] = []
    with contextlib.ExitStack() as stack:
        handles: Dict[Path, object] = {}

        def get(f, key):
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            return handles[f].get_tensor(key)

        for it in plan.items:
            p = params[it.internal]
            dev = p.device
            rows = slice(None) if it.half is None else slice(it.half * (p.shape[0] // 2), (it.half + 1) * (p.shape[0] // 2))
            src = get(it.file, it.key)
            if it.internal == "x_embedder.proj.weight":
                src = src.reshape(p.shape)
            src = src.to(dev)
            src_scale = None
            if it.scale_key is not None:
                src_scale = get(it.scale_file, it.scale_key).to(device=dev, dtype=torch.float32)
                bad.append((f"{it.scale_key} (scales must be finite and > 0)", (torch.isfinite(src_scale) & (src_scale > 0)).all()))
            layer = model.get_submodule(it.internal.rsplit(".", 1)[0]) if it.internal.endswith(".weight") else None
            if layer is not None and getattr(layer, "quant", None) is not None:
                if src_scale is not None and src.dtype == p.dtype:
                    p[rows].copy_(src)
                    layer.weight_scale[rows].copy_(src_scale)
                    if p.dtype != torch.int8:
                        bad.append((it.key, torch.isfinite(src.float()).all()))
                else:
                    w = src.float() if src_scale is None else dequantize(src, src_scale)
                    bad.append((it.key, torch.isfinite(w).all()))
                    q, s = quantize_weight(w, p.dtype)
                    p[rows].copy_(q)
                    layer.weight_scale[rows].copy_(s)
                    del w, q, s
                bad.append((f"{it.key} ({overflow})", _dequantized_fits(p[rows], layer.weight_scale[rows], model_dtype)))
            else:
                w = src if src_scale is None else dequantize(src, src_scale, p.dtype)
                p[rows].copy_(w)
                bad.append((f"{it.key} (after the cast to {str(p.dtype).replace('torch.', '')})", torch.isfinite(p[rows]).all()))
            del src
        # one host sync (flags of streamed blocks' host tensors join the device's)
        ok = torch.stack([flag.to(bad[0][1].device) for _, flag in bad]).tolist() if bad else []
    problems = [name for (name, _), good in zip(bad, ok) if not good]
    if problems:
        raise CheckpointError(f"checkpoint holds values the model cannot use (NaN, Inf, out of range or bad scales) "
                              f"({len(problems)}): " + cap_list(problems))


def _dequantized_fits(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d bool tensor (no host sync): every value of ``dequantize(q, scale, dtype)`` is finite.
    Per row only the largest magnitude matters (the scale is one per row), computed as
    :func:`dequantize` computes it (the float32 product rounded into ``dtype`` once)."""
    amax = q.float().abs().amax(dim=1)
    return torch.isfinite((amax * scale.float()).to(dtype)).all()


# ---------------------------------------------------------------------------------------------
# Our own save format
# ---------------------------------------------------------------------------------------------


_SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
                      FP8_DTYPE: "F8_E4M3", torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64",
                      torch.float64: "F64", torch.bool: "BOOL"}
NATIVE_FILES = ("config.json", NATIVE_MARKER, NATIVE_WEIGHTS)  # everything save_quantized writes


def write_safetensors(path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` to ``path`` in the safetensors format (what ``safetensors.safe_open``
    reads), one tensor at a time: each is copied to the host on its own, so saving a model on the
    GPU needs one tensor of host memory, not a host copy of the whole model (``save_file`` takes
    the whole dict as host tensors), and tensors that are views of one storage (a streamed block's
    packed host copy) are written as what they are, without copying the storage first.

    The format: 8 bytes little-endian header length, the JSON header (name -> dtype, shape,
    data_offsets into the data; ``__metadata__``), padded with spaces to 8 bytes, then the raw
    little-endian data of each tensor in header order."""
    import sys

    if sys.byteorder != "little":  # pragma: no cover - the format is little-endian
        raise RuntimeError("write_safetensors: the safetensors format is little-endian; this machine is not")
    header: Dict[str, object] = {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"write_safetensors: {name} has dtype {t.dtype}, which this writer does not store")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            if t.numel():
                f.write(t.view(torch.uint8).numpy().data)
            del t


def check_save_target(folder: Path) -> None:
    """A folder ``save_quantized`` may write: new, empty, or a previous save holding only what a
    save writes (it is replaced as a whole). Anything else is a ValueError: saving into an official
    ``dit/`` folder would rewrite its config.json and leave its float weights beside ours."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"save_quantized: {str(folder)!r} is a file; name a folder")
    if not folder.is_dir():
        return
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    from .weights import cap_list

    if _folder_kind(folder) != "native":
        raise ValueError(f"save_quantized: {str(folder)!r} is not empty ({cap_list(entries, 6)}) and is not a folder "
                         f"written by save_quantized (no {NATIVE_MARKER}); name a new or empty folder, so that no "
                         "checkpoint is overwritten")
    foreign = [e for e in entries if e not in NATIVE_FILES]
    if foreign:
        raise ValueError(f"save_quantized: {str(folder)!r} is a previous save but also holds files save_quantized did "
                         f"not write ({cap_list(foreign, 6)}); a save replaces the whole folder, so move them or name "
                         "another folder")


def save_quantized(model: nn.Module, path) -> Path:
    """Write ``model`` to the folder ``path`` in longcat-native's quantized layout: ``model.safetensors``
    (internal names; a quantized Linear's ``<name>.weight`` int8 or float8_e4m3fn [out, in] and
    ``<name>.weight_scale`` float32 [out]; everything else in the model dtype), ``config.json``
    (the model config) and ``longcat_quantized.json`` (format, version, mode, model dtype).
    ``from_pretrained(path)`` loads it back bit-exactly, without re-quantizing.

    The folder is written as one unit (``files.atomic_folder``: a new folder renamed into place),
    so an interrupted save leaves the previous save whole. ``path`` must be new, empty or a
    previous save (:func:`check_save_target`). The weights come from ``model.state_dict()``: for a
    streaming model, the host copies of its streamed blocks, not the staging buffers."""
    from .files import atomic_folder

    if next(model.parameters()).is_meta:
        raise ValueError("save_quantized: the model is on the meta device (no data to save)")
    st = getattr(model, "lora_state", None)
    if st is not None and (st.merged or st.branch_modules):
        raise ValueError("save_quantized: LoRAs are active (merged weights or branches); call disable_all_loras() "
                         "first: the saved model is the base model")
    folder = Path(str(path)).expanduser()
    check_save_target(folder)
    mode = model_quantization(model)
    dtype = str(model.dtype).replace("torch.", "")
    description = {
        "format": NATIVE_FORMAT, "format_version": NATIVE_FORMAT_VERSION, "quantization": mode, "dtype": dtype,
        "weights": NATIVE_WEIGHTS, "quantized_layers": [n for n, _ in quantized_layers(model)] if mode else [],
        "scales": "per output row, float32: w = weight * weight_scale[:, None]",
    }
    with atomic_folder(folder, make_parent=True) as tmp:
        write_safetensors(tmp / NATIVE_WEIGHTS, model.state_dict(),
                          metadata={"format": NATIVE_FORMAT, "quantization": str(mode)})
        (tmp / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2), encoding="utf-8")
        (tmp / NATIVE_MARKER).write_text(json.dumps(description, indent=2), encoding="utf-8")
    return folder
