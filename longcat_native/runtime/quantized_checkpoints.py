"""Quantized checkpoints: the official INT8 folder read as stored, longcat-native's own save
(``save_quantized``) written as one unit and read back bit-exactly, and the checks that a folder's
tensors agree with what it says (its description, its dtypes, its scales' range).

Design notes: docs/design/quantization.md ("Checkpoint formats", "Files that disagree with
themselves", "The save format"). The storage rules (TARGETS, per-row scales, the quantizer) are
runtime/quantize.py's; this module calls the quantizer through that module (``qz.quantize_weight``),
so the tests that make it raise see every use.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import quantize as qz
from .quantize import FP8_DTYPE, QUANT_MODES, dequantize, model_quantization, quantized_layers, storage_dtype

__all__ = [
    "quantized_kind", "checkpoint_mode", "native_description", "weight_files", "QuantLoadPlan", "plan_from_official",
    "check_quantized_checkpoint", "copy_weights", "write_safetensors", "check_save_target", "save_quantized",
    "NATIVE_MARKER", "NATIVE_WEIGHTS", "NATIVE_INDEX", "NATIVE_FILES", "OFFICIAL_INT8_CONFIG", "OFFICIAL_INT8_INDEX",
    "OFFICIAL_INT8_METHOD",
]

NATIVE_MARKER = "longcat_quantized.json"
NATIVE_WEIGHTS = "model.safetensors"
NATIVE_INDEX = "model.safetensors.index.json"  # a sharded save (longcat-native convert): model-0000i-of-0000n
NATIVE_FORMAT = "longcat-native-quantized"
NATIVE_FORMAT_VERSION = 1
OFFICIAL_INT8_CONFIG = "quantization_config.json"
OFFICIAL_INT8_INDEX = "quantized_model.safetensors.index.json"
OFFICIAL_INT8_SINGLE = "quantized_model.safetensors"
OFFICIAL_INT8_METHOD = "int8_per_channel_symmetric"
OFFICIAL_INT8_FOLDER = "base_model_int8"  # where the official Avatar checkpoint keeps it
_SAFETENSORS_QUANT = {"I8": torch.int8, "F8_E4M3": FP8_DTYPE}


def quantized_kind(d: Path) -> Optional[str]:
    """"native" or "official-int8" from a folder's marker files, else None (the other layouts are
    told apart by runtime/checkpoints.py, which reads these markers through this function)."""
    if not d.is_dir():
        return None
    if (d / NATIVE_MARKER).is_file():
        return "native"
    if ((d / OFFICIAL_INT8_CONFIG).is_file() or (d / OFFICIAL_INT8_INDEX).is_file()
            or any(d.glob("quantized_model*.safetensors"))):
        return "official-int8"
    return None


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

    if kind in ("official", "diffusers"):  # float weights: quantized while loading when asked
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
    if kind == "diffusers":
        from .diffusers_checkpoints import weight_files as diffusers_weight_files

        return diffusers_weight_files(folder)
    if kind == "native":
        if (folder / NATIVE_INDEX).is_file():
            return index_shards(folder, folder / NATIVE_INDEX)
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
    """One tensor to copy: ``key`` in ``file`` into the rows ``half`` of ``internal`` (weights.row_block:
    all, a row half of w13, or a block of FastVideo's split q/k/v);
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

    from .weights import CheckpointError, cap_list, row_block

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
            rows = row_block(p.shape[0], it.half)
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
                    q, s = qz.quantize_weight(w, p.dtype)
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
_NATIVE_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")  # and a sharded save's files (convert)


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

    if quantized_kind(folder) != "native":
        raise ValueError(f"save_quantized: {str(folder)!r} is not empty ({cap_list(entries, 6)}) and is not a folder "
                         f"written by save_quantized (no {NATIVE_MARKER}); name a new or empty folder, so that no "
                         "checkpoint is overwritten")
    foreign = [e for e in entries if e not in NATIVE_FILES and e != NATIVE_INDEX and not _NATIVE_SHARD.match(e)]
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
