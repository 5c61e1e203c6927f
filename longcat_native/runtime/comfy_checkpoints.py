"""ComfyUI single-file checkpoints of LongCat-Video (Kijai's ``LongCat_TI2V_comfy_*.safetensors``):
recognizing the file and the variants it cannot read, the key names, the config inferred from the
tensor shapes (the file has no config.json), the header check and the copy into the model.

The names are those of ComfyUI-WanVideoWrapper's ``WanModel`` built with ``is_longcat=True``
(``wanvideo/modules/model.py``, ``LongCat/layers.py``): the fused official ``attn.qkv`` and
``cross_attn.kv_linear`` are stored split (``self_attn.q/k/v``, ``cross_attn.k/v``) and fused back
here, so the fused GEMMs stay as they are. fp8 files follow ComfyUI's "scaled fp8" convention
(``comfy/ops.py`` ``scaled_fp8_ops``, ``comfy/model_detection.py``): float8_e4m3fn ``<layer>.weight``,
a float32 per-tensor ``<layer>.scale_weight`` (``w = weight * scale_weight``) and a ``scaled_fp8``
marker tensor. A block GEMM's fp8 bytes go into the model's fp8 storage unchanged, its per-tensor
scale repeated over the rows as the per-row ``weight_scale`` (exact: the dequantized values are
``fp8 * scale_weight``); every other tensor is read into the model dtype. Design notes, with the
sources of every convention: docs/design/checkpoints.md ("ComfyUI fp8 files").

This module imports nothing of checkpoints.py (which calls :func:`single_file_kind` from
``find_checkpoint``): runtime/ imports only go down.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import quantize as qz
from .config import DEFAULT_BSA_PARAMS, LongCatConfig
from .weights import CheckpointError, cap_list

__all__ = ["COMFY_BLOCK_NAMES", "COMFY_TOP_NAMES", "COMFY_PREFIXES", "SCALED_FP8_MARKER", "ComfyCheckpoint",
           "single_file_kind", "open_comfy_checkpoint", "comfy_parts", "infer_config"]

# internal module under ``blocks.N.`` -> its ComfyUI module(s), in row order of the internal weight
COMFY_BLOCK_NAMES = {
    "attn.qkv": ("self_attn.q", "self_attn.k", "self_attn.v"),
    "attn.q_norm": ("self_attn.norm_q",),
    "attn.k_norm": ("self_attn.norm_k",),
    "attn.proj": ("self_attn.o",),
    "cross_attn.q_linear": ("cross_attn.q",),
    "cross_attn.kv_linear": ("cross_attn.k", "cross_attn.v"),
    "cross_attn.q_norm": ("cross_attn.norm_q",),
    "cross_attn.k_norm": ("cross_attn.norm_k",),
    "cross_attn.proj": ("cross_attn.o",),
    "pre_crs_attn_norm": ("norm3",),
    "ffn.w13": ("ffn.w1", "ffn.w3"),
    "ffn.w2": ("ffn.w2",),
    "adaLN_modulation": ("modulation.1",),  # Sequential(SiLU, Linear) in the wrapper
}
COMFY_TOP_NAMES = {
    "x_embedder.proj": "patch_embedding",  # Conv3d [C, Cin, 1, 2, 2] in the file, [C, Cin*4] here
    "t_embedder.mlp.0": "time_embedding.mlp.0",
    "t_embedder.mlp.2": "time_embedding.mlp.2",
    "y_embedder.y_proj.0": "text_embedding.0",
    "y_embedder.y_proj.2": "text_embedding.2",
    "final_layer.adaLN_modulation": "head.modulation.1",
    "final_layer.linear": "head.head",
}
# Key prefixes ComfyUI files carry (comfy/utils.py state_dict_prefix_replace, WanVideoWrapper's loader
# strips "model.diffusion_model." and "model."); all keys of a file share one.
COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "")
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_WEIGHT, SCALE_INPUT = ".scale_weight", ".scale_input"
# Companion tensors of other quantization formats (ComfyUI's mixed-precision "comfy_quant" format,
# NVFP4, diffusers/ModelOpt spellings): a file carrying them is a variant this loader does not read.
_FOREIGN_SUFFIXES = (".comfy_quant", ".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale",
                     ".weight_scale_inv", ".scale_inv")
_FP8 = "F8_E4M3"
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64, _FP8: qz.FP8_DTYPE}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def comfy_parts(internal: str) -> Optional[Tuple[str, ...]]:
    """An internal parameter name -> its ComfyUI key(s), in row order (``blocks.0.attn.qkv.weight``
    -> ``(blocks.0.self_attn.q.weight, ...k.weight, ...v.weight)``); None for a name it has no key for."""
    module, leaf = internal.rsplit(".", 1)
    m = _BLOCK.match(module)
    if m:
        parts = COMFY_BLOCK_NAMES.get(m.group(2))
        return None if parts is None else tuple(f"blocks.{m.group(1)}.{p}.{leaf}" for p in parts)
    top = COMFY_TOP_NAMES.get(module)
    return None if top is None else (f"{top}.{leaf}",)


def single_file_kind(path: Path) -> str:
    """The kind of a checkpoint given as one file: "comfy" for a safetensors file (what it holds is
    checked by :func:`open_comfy_checkpoint`); GGUF and pickle files are a CheckpointError naming them."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF" or path.suffix.lower() == ".gguf":
        raise CheckpointError(f"{path} is a GGUF file (llama.cpp/city96 quantization, e.g. Q8_0 or Q4_K): "
                              "longcat-native does not read GGUF; use an fp8_e4m3fn (scaled) or bf16 ComfyUI "
                              "file, or the official checkpoint")
    if path.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise CheckpointError(f"{path} is a pickle checkpoint; longcat-native reads safetensors only (pickle files "
                              "can run code when loaded)")
    if len(head) < 9 or head[8:9] != b"{":
        raise CheckpointError(f"{path} is not a safetensors file (a single-file checkpoint must be one, e.g. "
                              "LongCat_TI2V_comfy_fp8_e4m3fn_scaled_KJ.safetensors); for the official layout pass "
                              "its folder")
    return "comfy"


@dataclass
class _Part:
    """One file tensor into rows ``[r0, r1)`` of an internal parameter; ``scale``: its dequantization
    factor (fp8 sources; 1.0 for unscaled fp8), None for float sources."""

    key: str
    r0: int
    r1: int
    fp8: bool
    scale: Optional[float] = None
    scale_key: Optional[str] = None


@dataclass
class ComfyCheckpoint:
    """A ComfyUI single-file LongCat-Video checkpoint, read from its header: ``tensors`` maps the
    un-prefixed key (ComfyUI's newer per-layer format renamed to the scaled-fp8 spelling) to
    ``(shape, safetensors dtype)``; ``cfg`` the config inferred from the shapes;
    ``mode`` the quantization the model is built with; ``inferred`` the config keys read from shapes."""

    path: Path
    prefix: str
    tensors: Dict[str, Tuple[Tuple[int, ...], str]]
    file_keys: Dict[str, str]  # un-prefixed (legacy-spelled) name -> the key in the file
    scaled: bool
    cfg: LongCatConfig
    mode: Optional[str]
    inferred: Tuple[str, ...] = ()
    scales: Dict[str, float] = field(default_factory=dict)  # read at open: scale_weight values by layer key

    # -- the header check ---------------------------------------------------------------------
    def check(self, model: nn.Module) -> Dict[str, List[_Part]]:
        """Check every tensor's name, shape and dtype against ``model`` (on the meta device): one
        CheckpointError naming every missing, unexpected (with the missing name it most likely
        stands for: misnamed), misshapen and wrong-dtype tensor, and every fp8 weight of a scaled
        file without its scale. Returns the plan: internal name -> its parts."""
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        claimed = {SCALED_FP8_MARKER} | {k for k in self.tensors if k.endswith(SCALE_INPUT)}
        missing, unexpected, wrong, plan, expect = [], [], [], {}, {}
        for name, shape in shapes.items():
            keys = comfy_parts(name)
            if keys is None:  # pragma: no cover - every model parameter has a ComfyUI name
                raise AssertionError(f"no ComfyUI name for {name}")
            rows = shape[0] // len(keys)
            want = ((self.cfg.hidden_size, self.cfg.in_channels, *self.cfg.patch_size) if name == "x_embedder.proj.weight"
                    else (rows, *shape[1:]))
            parts = []
            for i, key in enumerate(keys):
                expect[key] = want
                if key not in self.tensors:
                    missing.append(key)
                    continue
                claimed.add(key)
                got, dtype = self.tensors[key]
                part = _Part(key, i * rows, (i + 1) * rows, dtype == _FP8)
                if got != want:
                    wrong.append(f"{key}: file {list(got)}, model expects {list(want)}")
                elif dtype not in _ST_DTYPES:
                    wrong.append(f"{key}: dtype {dtype} is not a floating-point dtype this loader reads")
                skey = key[: -len(".weight")] + SCALE_WEIGHT if key.endswith(".weight") else None
                if skey in self.tensors:
                    claimed.add(skey)
                    if not part.fp8:
                        wrong.append(f"{skey}: scales a {dtype} weight (scale_weight belongs to float8_e4m3fn weights)")
                    part.scale, part.scale_key = self.scales.get(skey), skey
                elif part.fp8:
                    if self.scaled and len(got) == 2:
                        missing.append(f"{skey} (the scale of the float8 weight {key})")
                    part.scale = 1.0  # unscaled fp8 (ComfyUI's "fp8_e4m3fn" files): the values as stored
                parts.append(part)
            plan[name] = parts
        for key in self.tensors:
            if key not in claimed:
                unexpected.append(key)
        if missing or unexpected or wrong:
            raise CheckpointError(self._mismatch(missing, unexpected, wrong, expect))
        return plan

    def _mismatch(self, missing, unexpected, wrong, expect) -> str:
        lines = [f"ComfyUI checkpoint {self.path} does not match the LongCat-Video model its shapes describe "
                 f"(inferred {', '.join(f'{k}={getattr(self.cfg, k)}' for k in self.inferred)}):"]
        miss = [m for m in missing if " " not in m]
        named = []
        for k in unexpected:
            close = difflib.get_close_matches(k, miss, n=1, cutoff=0.8)
            if close and self.tensors[k][0] == expect.get(close[0]):
                named.append(f"{k} (misnamed? {close[0]} is missing and has this shape)")
            elif k.endswith(SCALE_WEIGHT):
                named.append(f"{k} (a scale of no weight)")
            else:
                named.append(k)
        pfx = f" (keys shown without the file's prefix {self.prefix!r})" if self.prefix else ""
        for title, items in (("missing", missing), ("unexpected" + pfx, named), ("wrong shape or dtype", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + cap_list(items))
        return "\n".join(lines)

    # -- the copy ---------------------------------------------------------------------------
    @torch.no_grad()
    def copy(self, model: nn.Module, plan: Dict[str, List[_Part]]) -> None:
        """Copy the planned tensors into ``model`` (allocated), one tensor at a time. A float8
        source into fp8 storage: its bytes unchanged, the scale repeated over its rows (no
        requantization); into int8 storage: ``fp8 * scale`` (float32) quantized per row. Into a
        float parameter: ``fp8 * scale`` computed in float32 and rounded into the model dtype once
        (float sources are cast as stored). NaN/Inf values, and fp8 weights whose dequantized values
        overflow the model dtype, are a CheckpointError naming the tensors (one host sync)."""
        from safetensors import safe_open

        params = dict(model.named_parameters())
        model_dtype = model.dtype
        flags: List[Tuple[str, torch.Tensor]] = []
        with contextlib.ExitStack() as stack:
            st = stack.enter_context(safe_open(str(self.path), framework="pt", device="cpu"))
            for name, parts in plan.items():
                p = params[name]
                layer = model.get_submodule(name.rsplit(".", 1)[0])
                quantized = getattr(layer, "quant", None) is not None and name.endswith(".weight")
                for part in parts:
                    src = st.get_tensor(self.file_keys[part.key])
                    if name == "x_embedder.proj.weight":
                        src = src.reshape(p.shape)
                    src = src.to(p.device)
                    dst = p[part.r0:part.r1]
                    if quantized and part.fp8 and p.dtype == qz.FP8_DTYPE:
                        dst.copy_(src)  # the stored bytes
                        layer.weight_scale[part.r0:part.r1].fill_(part.scale)
                        flags.append((part.key, torch.isfinite(src.float()).all()))
                    elif quantized:
                        w = src.float() * part.scale if part.fp8 else src.float()
                        flags.append((part.key, torch.isfinite(w).all()))
                        q, s = qz.quantize_weight(w, p.dtype)
                        dst.copy_(q)
                        layer.weight_scale[part.r0:part.r1].copy_(s)
                        del w, q, s
                    else:
                        dst.copy_(src.float() * part.scale if part.fp8 else src)
                        flags.append((f"{part.key} (in {_name(p.dtype)})", torch.isfinite(dst).all()))
                    del src
                if quantized:  # what a weight-only GEMM dequantizes to must be finite in the model dtype
                    amax = p.float().abs().amax(dim=1) * layer.weight_scale
                    flags.append((f"{name} (dequantized it overflows {_name(model_dtype)})",
                                  torch.isfinite(amax.to(model_dtype)).all()))
        ok = torch.stack([f.to(flags[0][1].device) for _, f in flags]).tolist() if flags else []
        bad = [n for (n, _), good in zip(flags, ok) if not good]
        if bad:
            raise CheckpointError(f"ComfyUI checkpoint {self.path} holds values the model cannot use (NaN, Inf or out "
                                  f"of range) ({len(bad)}): " + cap_list(bad))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# Opening a file: the variants it cannot read, the prefix, the scales, the config, the mode
# ---------------------------------------------------------------------------------------------


def open_comfy_checkpoint(path, quantize: Optional[str], overrides: Optional[dict] = None) -> ComfyCheckpoint:
    """Read a ComfyUI single file's header (and its scalar scales; no weight data), refuse what
    cannot be read (a CheckpointError naming the variant), infer the config from the shapes
    (``overrides``: config keys, as ``from_pretrained``'s keyword arguments), choose the mode.

    ``quantize=None`` on a file whose block weights are float8: "fp8-weight-only" (the file read as
    stored, as the official INT8 folder reads as "int8-weight-only"), with a warning saying so. A
    float file (bf16/fp32 ComfyUI export) with ``quantize=None`` loads unquantized."""
    path = Path(path)
    header, metadata = _read_header(path)
    header, file_keys = _from_comfy_quant(path, header, metadata)
    _refuse_variants(path, header)
    prefix = _find_prefix(path, header)
    tensors, keys = {}, {}
    for k, v in header.items():
        name = k[len(prefix):] if k.startswith(prefix) else k
        tensors[name], keys[name] = v, file_keys.get(k, k)
    scaled = SCALED_FP8_MARKER in tensors or any(k.endswith(SCALE_WEIGHT) for k in tensors)
    scales = _read_scales(path, tensors, keys)
    cfg, inferred = infer_config(path, tensors, overrides)
    fp8 = any(tensors.get(k, ((), ""))[1] == _FP8 for k in _target_keys(cfg))
    mode = qz.check_quantize(quantize)
    if mode is None and fp8:
        mode = "fp8-weight-only"
        warnings.warn(f"{path.name} stores its block weights in float8_e4m3fn: loading them as stored, "
                      "quantize='fp8-weight-only' (float8 weights dequantized to the model dtype at each GEMM); "
                      "pass quantize='fp8' for FP8 GEMMs", stacklevel=3)
    return ComfyCheckpoint(path, prefix, tensors, keys, scaled, cfg, mode, inferred, scales)


def _read_header(path: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as st:
            header = {}
            for k in st.keys():
                sl = st.get_slice(k)
                header[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
            return header, st.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _from_comfy_quant(path: Path, header, metadata):
    """ComfyUI's newer per-layer format (comfy/quant_ops.py; a ``<layer>.comfy_quant`` uint8 JSON
    tensor and/or the header's ``_quantization_metadata`` ``{"layers": {layer: {"format": ...}}}``,
    scales spelled ``weight_scale`` / ``input_scale``): its "float8_e4m3fn" layers are the same
    math as scaled fp8 (qdata * per-tensor float32 scale) and are renamed to that spelling
    (``-> (header, {legacy name: file key})``); any other format is a CheckpointError naming it."""
    layers: Dict[str, str] = {}
    raw = metadata.get("_quantization_metadata")
    try:
        if raw is not None:
            for name, conf in json.loads(raw).get("layers", {}).items():
                layers[name] = conf.get("format")
        cq = [k for k in header if k.endswith(".comfy_quant")]
        if cq:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as st:
                for k in cq:
                    layers[k[: -len(".comfy_quant")]] = json.loads(st.get_tensor(k).numpy().tobytes()).get("format")
    except (ValueError, AttributeError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ComfyUI quantization description ({e})") from e
    if not layers:
        return header, {}
    other = {n: f for n, f in layers.items() if f != "float8_e4m3fn"}
    if other:
        formats = sorted({str(f) for f in other.values()})
        raise CheckpointError(f"{path} is quantized in ComfyUI's mixed-precision format with layers of format "
                              f"{', '.join(formats)}; longcat-native reads its float8_e4m3fn (per-tensor) layers only "
                              f"({len(other)} others): " + cap_list(sorted(other), 6))
    out, keys = {}, {}
    for k, v in header.items():
        if k.endswith(".comfy_quant"):
            continue
        layer, _, leaf = k.rpartition(".")
        name = k
        if layer in layers and leaf in ("weight_scale", "input_scale"):
            name = layer + (SCALE_WEIGHT if leaf == "weight_scale" else SCALE_INPUT)
        out[name], keys[name] = v, k
    return out, keys


def _refuse_variants(path: Path, header) -> None:
    """Every variant this loader cannot read is a CheckpointError naming it, before anything else."""
    def refuse(what, keys):
        raise CheckpointError(f"{path} is {what}; longcat-native reads ComfyUI LongCat-Video files in bf16/fp16/fp32, "
                              "fp8_e4m3fn or fp8_e4m3fn_scaled (per-tensor scale_weight) only. Offending tensors "
                              f"({len(keys)}): " + cap_list(sorted(keys), 6))

    e5m2 = [k for k, (_, d) in header.items() if d in ("F8_E5M2", "F8_E5M2FNUZ", "F8_E4M3FNUZ")]
    if e5m2:
        refuse(f"a {header[e5m2[0]][1]} file (fp8_e5m2 / fp8_e5m2_scaled: another float8 format than the "
               "float8_e4m3fn storage of the fp8 modes)", e5m2)
    foreign = [k for k in header if k.endswith(_FOREIGN_SUFFIXES)]
    if foreign:
        refuse("quantized in another convention than ComfyUI's scaled fp8 (weight_scale / input_scale / "
               "weight_scale_2 companions: diffusers, ModelOpt, NVFP4 or block-scaled files)", foreign)
    shaped = [k for k, (s, _) in header.items() if k.endswith(SCALE_WEIGHT) and s not in ((), (1,))]
    if shaped:
        kind = "block" if any(len(header[k][0]) >= 2 and min(header[k][0]) > 1 for k in shaped) else "per-channel"
        refuse(f"scaled with {kind} scales (scale_weight of shape {list(header[shaped[0]][0])}: ComfyUI's scaled fp8 "
               "has one scale per tensor)", shaped)
    ints = [k for k, (_, d) in header.items() if d in ("U8", "I8", "I4", "U4") and not k.endswith(SCALED_FP8_MARKER)]
    if ints:
        refuse(f"an integer-quantized file ({header[ints[0]][1]} weights: int8, NF4 or packed FP4)", ints)


def _find_prefix(path: Path, header) -> str:
    for p in COMFY_PREFIXES:
        if p + "patch_embedding.weight" in header:
            if p + "time_projection.1.weight" in header or p + "blocks.0.ffn.0.weight" in header \
                    or p + "head.modulation" in header:
                raise CheckpointError(f"{path} is a Wan 2.x diffusion model (it has time_projection / ffn.0 / a "
                                      "modulation parameter, the Wan layout), not LongCat-Video")
            return p
    ends = lambda s: any(k.endswith(s) for k in header)  # noqa: E731
    if ends("x_embedder.proj.weight") and ends("attn.qkv.weight"):
        raise CheckpointError(f"{path} holds weights in the official LongCat-Video layout: pass the dit/ folder that "
                              "holds it with its config.json (or the checkpoint root), not the file")
    if ends("patch_embed.proj.weight"):
        raise CheckpointError(f"{path} holds weights in a Diffusers-style layout: pass its transformer/ folder "
                              "(with config.json), not the file")
    raise CheckpointError(f"{path} is not a LongCat-Video ComfyUI checkpoint: no patch_embedding.weight under any of "
                          f"the prefixes {[p for p in COMFY_PREFIXES if p]} or none; it holds "
                          + cap_list(sorted(header), 6))


def _read_scales(path: Path, tensors, file_keys) -> Dict[str, float]:
    """The per-tensor ``scale_weight`` values (each finite and > 0) by key; ``scale_input`` must be
    ComfyUI's placeholder 1.0 everywhere (comfy/utils.py convert_old_quants drops those): calibrated
    static input scales are the fp8-activation variant, refused (the fp8 modes here quantize
    activations per token, dynamically, and the weight-only modes never quantize them)."""
    from safetensors import safe_open

    out, calibrated, bad = {}, [], []
    names = [k for k in tensors if k.endswith((SCALE_WEIGHT, SCALE_INPUT))]
    if not names:
        return out
    with safe_open(str(path), framework="pt", device="cpu") as st:
        for k in names:
            v = float(st.get_tensor(file_keys[k]).float().reshape(-1)[0]) if tensors[k][0] in ((), (1,)) else float("nan")
            if k.endswith(SCALE_INPUT):
                if v != 1.0:
                    calibrated.append(f"{k} = {v:.6g}")
            elif not (v > 0 and v < float("inf")):
                bad.append(f"{k} = {v}")
            else:
                out[k] = v
    if calibrated:
        raise CheckpointError(f"{path} is an fp8_scaled file with calibrated input scales (scale_input != 1: static "
                              "float8 activation scales for ComfyUI's fp8 x fp8 GEMM), a variant longcat-native does not "
                              f"compute ({len(calibrated)}): " + cap_list(calibrated, 6))
    if bad:
        raise CheckpointError(f"{path}: scale_weight values must be finite and > 0 ({len(bad)}): " + cap_list(bad, 6))
    return out


def _target_keys(cfg: LongCatConfig) -> List[str]:
    return [k for i in range(cfg.depth) for t in qz.TARGETS for k in comfy_parts(f"blocks.{i}.{t}.weight")]


def infer_config(path, tensors, overrides: Optional[dict] = None) -> Tuple[LongCatConfig, Tuple[str, ...]]:
    """The LongCat config a ComfyUI file's shapes describe, ``overrides`` applied on top. From the
    shapes: hidden_size, in_channels and patch_size (patch_embedding [C, Cin, pt, ph, pw]), depth
    (the block indices), num_heads (C / the head dim of self_attn.norm_q), caption_channels
    (text_embedding.0), adaln_tembed_dim and frequency_embedding_size (time_embedding.mlp.0),
    mlp_ratio (the FFN width of ffn.w1: the ratio the official width formula maps to it, 4 when
    4 does), out_channels (head.head rows / patch volume). Not in the file, so the released
    config's values: enable_bsa False, bsa_params the official defaults, cp_split_hw [1, 1],
    text_tokens_zero_pad True."""
    need = {"patch_embedding.weight": 5, "blocks.0.self_attn.norm_q.weight": 1, "text_embedding.0.weight": 2,
            "time_embedding.mlp.0.weight": 2, "blocks.0.ffn.w1.weight": 2, "head.head.weight": 2}
    absent = [f"{k} ({n}-D)" for k, n in need.items() if k not in tensors or len(tensors[k][0]) != n]
    if absent:
        raise CheckpointError(f"{path}: cannot infer the LongCat config, these tensors are missing or of another rank: "
                              + ", ".join(absent))
    hidden, cin, *patch = tensors["patch_embedding.weight"][0]
    head_dim = tensors["blocks.0.self_attn.norm_q.weight"][0][0]
    ffn = tensors["blocks.0.ffn.w1.weight"][0][0]
    ratios = [r for r in range(1, 65) if LongCatConfig.ffn_hidden_size.fget(_Width(hidden, r)) == ffn]
    problems = []
    if not ratios:
        problems.append(f"blocks.0.ffn.w1.weight has {ffn} rows, which no integer mlp_ratio gives for hidden {hidden}")
    if hidden % head_dim:
        problems.append(f"hidden {hidden} is not a multiple of the head dim {head_dim} (self_attn.norm_q)")
    vol = patch[0] * patch[1] * patch[2] if len(patch) == 3 else 1
    out_rows = tensors["head.head.weight"][0][0]
    if out_rows % vol:
        problems.append(f"head.head.weight has {out_rows} rows, not a multiple of the patch volume {vol}")
    if problems:
        raise CheckpointError(f"{path}: the tensor shapes describe no LongCat config: " + "; ".join(problems))
    depth = 1 + max(int(m.group(1)) for m in map(_BLOCK.match, tensors) if m)
    shapes = dict(in_channels=cin, out_channels=out_rows // vol, hidden_size=hidden, depth=depth,
                  num_heads=hidden // head_dim, caption_channels=tensors["text_embedding.0.weight"][0][1],
                  mlp_ratio=4 if 4 in ratios else ratios[0],
                  adaln_tembed_dim=tensors["time_embedding.mlp.0.weight"][0][0],
                  frequency_embedding_size=tensors["time_embedding.mlp.0.weight"][0][1], patch_size=list(patch))
    d = dict(shapes, enable_bsa=False, bsa_params=dict(DEFAULT_BSA_PARAMS), cp_split_hw=[1, 1], text_tokens_zero_pad=True)
    cfg = LongCatConfig.from_dict(d, overrides, source=f"{path} (config inferred from its tensor shapes)")
    return cfg, tuple(shapes)


@dataclass
class _Width:
    """The two fields ``LongCatConfig.ffn_hidden_size`` reads (the formula has one definition)."""

    hidden_size: int
    mlp_ratio: int
