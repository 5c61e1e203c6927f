"""The source side of ``longcat-native convert`` (runtime/convert.py): a table of readers, each
turning one checkpoint layout into the official tensors it holds, checked complete against the model
config from the safetensors headers alone (no tensor data read).

A reader is ``Reader(name, detect, open)``: ``detect(path)`` says whether the folder (or file) is in
its layout, ``open(path)`` returns a :class:`Source`: the config in official key names and, for every
official parameter name in model order, a :class:`Ref` saying where its data is (row blocks to
concatenate, rows of a fused tensor, per-row scales when stored quantized). Adding a layout is a
detect and an open appended to :data:`READERS`; the writers (runtime/convert.py) only see Refs.

Design notes: docs/design/checkpoints.md ("Converting").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from . import quantized_checkpoints as qc
from .config import LongCatConfig
from .layouts import diffusers_to_official, official_to_diffusers
from .weights import (FLOAT_DTYPES, CheckpointError, cap_list, check_official_weights, expected_official_shape,
                      index_shards, internal_to_official, list_weight_files, read_headers)

__all__ = ["Part", "Ref", "Source", "Reader", "READERS", "SUBFOLDERS", "TensorFiles", "open_source",
           "official_shapes", "official_config_to_diffusers", "diffusers_config_to_official", "OFFICIAL_CLASS",
           "DIFFUSERS_CLASS"]

OFFICIAL_CLASS = "LongCatVideoTransformer3DModel"  # the official dit/config.json's _class_name
DIFFUSERS_CLASS = "LongCatTransformer3DModel"  # FastVideo's (scripts/checkpoint_conversion/longcat_to_fastvideo.py)
# config.json keys FastVideo spells differently (its LongCatVideoArchConfig field names)
_DIFFUSERS_CONFIG_KEYS = {"num_heads": "num_attention_heads"}
# where a root keeps its DiT, tried in order after the path itself
SUBFOLDERS = ("dit", "transformer", qc.OFFICIAL_INT8_FOLDER, f"dit/{qc.OFFICIAL_INT8_FOLDER}")
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I8": torch.int8}


@dataclass(frozen=True)
class Part:
    """Tensor ``key`` of ``file``, or its rows ``rows[0]:rows[1]``."""

    file: Path
    key: str
    rows: Optional[Tuple[int, int]] = None


@dataclass
class Ref:
    """One official tensor: ``parts`` concatenated along dim 0 and reshaped to ``shape``; stored in
    ``dtype`` (int8 / float8 when ``scale`` is set: then ``w = value * scale[:, None]``). ``scale``:
    one entry per part, each a Part holding that part's float32 per-row scales or a single per-tensor
    scale (ComfyUI's ``scale_weight``), or a number (a constant scale, e.g. 1.0 for unscaled float8)."""

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    parts: Tuple[Part, ...]
    scale: Optional[Tuple[Union[Part, float], ...]] = None


@dataclass
class Source:
    layout: str
    folder: Path
    config: dict  # config.json in official key names, unknown keys kept
    cfg: LongCatConfig
    refs: Dict[str, Ref]  # every official parameter, in model order
    model_dtype: Optional[torch.dtype]  # the one float dtype of the unquantized tensors, None if several
    quantization: Optional[str] = None


@dataclass
class Reader:
    name: str
    detect: Callable[[Path], bool]
    open: Callable[[Path], Source]


class TensorFiles:
    """Safetensors handles opened on first use and closed together (``with``): a handle keeps every
    memory-mapped page it has read resident, so the converter holds them for one group of tensors."""

    def __init__(self):
        self._handles: Dict[Path, object] = {}
        self._ctx: List[object] = []

    def __enter__(self) -> "TensorFiles":
        return self

    def __exit__(self, *exc) -> None:
        for ctx in reversed(self._ctx):
            ctx.__exit__(None, None, None)
        self._handles.clear()
        self._ctx.clear()

    def _get(self, f: Path):
        if f not in self._handles:
            from safetensors import safe_open

            ctx = safe_open(str(f), framework="pt", device="cpu")
            self._handles[f] = ctx.__enter__()
            self._ctx.append(ctx)
        return self._handles[f]

    def _part(self, p: Part) -> torch.Tensor:
        st = self._get(p.file)
        return st.get_tensor(p.key) if p.rows is None else st.get_slice(p.key)[p.rows[0]:p.rows[1]]

    def read(self, ref: Ref) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(value in ref.shape, float32 per-row scales or None)``."""
        values = [self._part(p) for p in ref.parts]
        t = (values[0] if len(values) == 1 else torch.cat(values)).reshape(ref.shape)
        if ref.scale is None:
            return t, None
        if len(ref.scale) != len(values):  # pragma: no cover - a reader's bug
            raise ValueError(f"{ref.name}: {len(ref.scale)} scale entries for {len(values)} parts")
        scales = []
        for v, sc in zip(values, ref.scale):
            rows = v.shape[0]
            s = (torch.full((rows,), float(sc)) if not isinstance(sc, Part)
                 else self._part(sc).reshape(-1).to(torch.float32))
            if s.numel() == 1 and rows != 1:  # a per-tensor scale: the same for every row of its part
                s = s.expand(rows)
            scales.append(s)
        return t, (scales[0] if len(scales) == 1 else torch.cat(scales)).contiguous()


# ---------------------------------------------------------------------------------------------
# Configs and the expected tensors
# ---------------------------------------------------------------------------------------------


def official_config_to_diffusers(config: dict) -> dict:
    """An official config.json as FastVideo's converter writes it: ``_class_name``
    LongCatTransformer3DModel, ``num_heads`` -> ``num_attention_heads``, every other key as it is."""
    out = {_DIFFUSERS_CONFIG_KEYS.get(k, k): v for k, v in config.items()}
    out["_class_name"] = DIFFUSERS_CLASS
    return out


def diffusers_config_to_official(config: dict, where: str = "config.json") -> dict:
    """The inverse of :func:`official_config_to_diffusers`; ``attention_head_dim`` (FastVideo derives
    it as hidden_size / heads) is checked and dropped."""
    out = {}
    back = {v: k for k, v in _DIFFUSERS_CONFIG_KEYS.items()}
    for k, v in config.items():
        ours = back.get(k, k)
        if ours in out and out[ours] != v:
            raise CheckpointError(f"{where}: {k} = {v!r} and {ours} = {out[ours]!r} disagree")
        out[ours] = v
    head_dim = out.pop("attention_head_dim", None)
    if head_dim is not None and isinstance(out.get("hidden_size"), int) and isinstance(out.get("num_heads"), int) \
            and out["num_heads"] and head_dim != out["hidden_size"] // out["num_heads"]:
        raise CheckpointError(f"{where}: attention_head_dim {head_dim!r} is not hidden_size / num_attention_heads "
                              f"({out['hidden_size']} / {out['num_heads']})")
    if "_class_name" in out:
        out["_class_name"] = OFFICIAL_CLASS
    return out


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable config.json ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _meta_model(cfg: LongCatConfig, dtype=torch.float32, quantize=None):
    from .dit import LongCatDiT

    return LongCatDiT.from_config(cfg, device="meta", dtype=dtype, kernels="reference", quantize=quantize)


def official_shapes(cfg: LongCatConfig, model=None) -> Dict[str, Tuple[int, ...]]:
    """Every official parameter name of the model ``cfg`` describes and its shape, in model order."""
    model = _meta_model(cfg) if model is None else model
    out: Dict[str, Tuple[int, ...]] = {}
    for internal, p in model.named_parameters():
        shape = tuple(p.shape)
        if internal.endswith(".ffn.w13.weight"):
            for half, w in ((0, ".w1."), (1, ".w3.")):
                out[internal.replace(".w13.", w)] = expected_official_shape(shape, internal, half, cfg)
        else:
            out[internal_to_official(internal)] = expected_official_shape(shape, internal, None, cfg)
    return out


def _common_dtype(refs: Dict[str, Ref]) -> Optional[torch.dtype]:
    dtypes = {r.dtype for r in refs.values() if r.scale is None}
    return dtypes.pop() if len(dtypes) == 1 else None


def _headers(files: List[Path]) -> Dict[Tuple[Path, str], Tuple[Tuple[int, ...], str]]:
    return {(f, k): (tuple(shape), dt) for f, k, shape, dt in read_headers(files)}


def _report(folder: Path, layout: str, problems: List[Tuple[str, List[str]]]) -> None:
    if any(items for _, items in problems):
        lines = [f"checkpoint {folder} ({layout} layout) does not match its config.json:"]
        lines += [f"  {title} ({len(items)}): {cap_list(items)}" for title, items in problems if items]
        raise CheckpointError("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# The readers
# ---------------------------------------------------------------------------------------------


def _open_official(folder: Path) -> Source:
    config = _read_config(folder)
    cfg = LongCatConfig.from_dict(config, source=str(folder / "config.json"))
    files = list_weight_files(folder)
    model = _meta_model(cfg)
    plan = check_official_weights({n: tuple(p.shape) for n, p in model.named_parameters()}, files, cfg)
    headers = _headers(files)
    found = {key: Ref(key, headers[(f, key)][0], _TORCH_DTYPES[headers[(f, key)][1]], (Part(f, key),))
             for f, entries in plan.by_file.items() for key, _, _ in entries}
    refs = {name: found[name] for name in official_shapes(cfg, model)}
    return Source("official", folder, config, cfg, refs, _common_dtype(refs))


def _diffusers_files(folder: Path) -> List[Path]:
    indexes = sorted(p for p in folder.glob("*.safetensors.index.json") if p.is_file())
    if len(indexes) > 1:
        raise CheckpointError(f"{folder} holds several safetensors indexes ({cap_list([p.name for p in indexes])}); "
                              "keep the one its weights belong to")
    if indexes:
        return index_shards(folder, indexes[0])
    return list_weight_files(folder)  # the single file, or every *.safetensors (FastVideo writes model.safetensors)


def _open_diffusers(folder: Path) -> Source:
    where = str(folder / "config.json")
    config = diffusers_config_to_official(_read_config(folder), where)
    cfg = LongCatConfig.from_dict(config, source=where)
    files = _diffusers_files(folder)
    expected = official_shapes(cfg)
    slots: Dict[str, Dict[int, Tuple[Path, str, str]]] = {}
    unexpected, duplicates, wrong, not_float, mixed, missing = [], [], [], [], [], []
    for f, key, shape, dt in read_headers(files):
        m = diffusers_to_official(key)
        if m is None or m[0] not in expected:
            unexpected.append(key + (" (an official name)" if key in expected else ""))
            continue
        off, part, parts = m
        if part in slots.setdefault(off, {}):
            duplicates.append(key)
            continue
        slots[off][part] = (f, key, dt)
        want = (expected[off][0] // parts,) + tuple(expected[off][1:])
        if tuple(shape) != want:
            wrong.append(f"{key}: checkpoint {list(shape)}, model expects {list(want)}")
        elif dt not in FLOAT_DTYPES:
            not_float.append(f"{key}: {dt}")
    refs = {}
    for off, shape in expected.items():
        names, slot = official_to_diffusers(off), slots.get(off, {})
        absent = [n for i, n in enumerate(names) if i not in slot]
        if absent:
            missing += absent
            continue
        dts = {slot[i][2] for i in range(len(names))}
        if len(dts) > 1:
            mixed.append(f"{off} from " + ", ".join(f"{slot[i][1]} {slot[i][2]}" for i in range(len(names))))
        elif not wrong and not not_float:
            parts = tuple(Part(slot[i][0], slot[i][1]) for i in range(len(names)))
            refs[off] = Ref(off, shape, _TORCH_DTYPES[dts.pop()], parts)
    _report(folder, "diffusers", [("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                                  ("duplicated across shards", duplicates),
                                  ("not floating point (weights must be float tensors)", not_float),
                                  ("split parts of one fused tensor in different dtypes", mixed)])
    return Source("diffusers", folder, config, cfg, refs, _common_dtype(refs))


def _open_quantized(folder: Path, kind: str) -> Source:
    """An official INT8 folder ("official-int8") or a longcat-native save ("native"), checked by the
    loader's own checks (runtime/quantized_checkpoints.py), so convert accepts what loads."""
    mode, saved_dtype = qc.checkpoint_mode(folder, kind, None)
    config = _read_config(folder)
    cfg = LongCatConfig.from_dict(config, source=str(folder / "config.json"))
    files = qc.weight_files(folder, kind)
    described = qc.native_description(folder) if kind == "native" else None
    model = _meta_model(cfg, saved_dtype or torch.float32, mode)
    plan = qc.check_quantized_checkpoint(model, files, kind, cfg, described)
    headers, expected = _headers(files), official_shapes(cfg)
    internal_rows = {n: p.shape[0] for n, p in model.named_parameters()}
    refs: Dict[str, Ref] = {}
    for it in plan.items:
        dtype = _TORCH_DTYPES[headers[(it.file, it.key)][1]]
        if it.internal.endswith(".ffn.w13.weight") and it.half is None:  # ours: w13 fused, w1 and w3 its row halves
            h = internal_rows[it.internal] // 2
            for i, w in enumerate((".w1.", ".w3.")):
                rows = (i * h, (i + 1) * h)
                off = it.internal.replace(".w13.", w)
                scale = (Part(it.scale_file, it.scale_key, rows),) if it.scale_key else None
                refs[off] = Ref(off, expected[off], dtype, (Part(it.file, it.key, rows),), scale)
            continue
        if it.half is not None:  # the official INT8 layout stores w1 and w3 apart
            off = it.internal.replace(".w13.", ".w1." if it.half == 0 else ".w3.")
        else:
            off = internal_to_official(it.internal)
        scale = (Part(it.scale_file, it.scale_key),) if it.scale_key else None
        refs[off] = Ref(off, expected[off], dtype, (Part(it.file, it.key),), scale)
    refs = {name: refs[name] for name in expected}
    model_dtype = saved_dtype if kind == "native" else _common_dtype(refs)
    return Source(kind, folder, config, cfg, refs, model_dtype, mode)


def _is_native(p: Path) -> bool:
    return p.is_dir() and (p / qc.NATIVE_MARKER).is_file()


def _is_official_int8(p: Path) -> bool:
    return p.is_dir() and ((p / qc.OFFICIAL_INT8_CONFIG).is_file() or (p / qc.OFFICIAL_INT8_INDEX).is_file()
                           or any(p.glob("quantized_model*.safetensors")))


def _is_official(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def _is_diffusers(p: Path) -> bool:
    """A config.json of FastVideo's (its class name or key names), or weights with Diffusers names."""
    if not _is_official(p):
        return False
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if isinstance(config, dict) and (config.get("_class_name") == DIFFUSERS_CLASS or "num_attention_heads" in config):
        return True
    files = sorted(p.glob("*.safetensors"))[:1]
    try:
        keys = [k for _, k, _, _ in read_headers(files)]
    except CheckpointError:
        return False
    return any(diffusers_to_official(k) is not None and official_to_diffusers(k) is None for k in keys)


READERS: List[Reader] = [
    Reader("native", _is_native, lambda p: _open_quantized(p, "native")),
    Reader("official-int8", _is_official_int8, lambda p: _open_quantized(p, "official-int8")),
    Reader("diffusers", _is_diffusers, _open_diffusers),
    Reader("official", _is_official, _open_official),
]


def open_source(path: Path) -> Source:
    """The checkpoint at ``path`` (a folder of a known layout, or a root holding one in
    :data:`SUBFOLDERS`), opened by the first reader of :data:`READERS` that recognizes it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"source {str(path)!r} does not exist")
    candidates = [path] + ([path / s for s in SUBFOLDERS] if path.is_dir() else [])
    for c in candidates:
        for reader in READERS:
            if reader.detect(c):
                return reader.open(c)
    looked = ", ".join(repr(str(c)) for c in candidates)
    raise CheckpointError(f"no LongCat-Video DiT checkpoint found at {looked} (readable layouts: "
                          f"{', '.join(r.name for r in READERS)}; a folder needs a config.json, or the marker of "
                          "its layout)")
