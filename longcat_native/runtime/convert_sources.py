"""The source side of ``longcat-native convert`` (runtime/convert.py): a table of readers, each
turning one checkpoint layout into the official tensors it holds, checked complete against the model
config from the safetensors headers alone (no tensor data read).

A reader is ``Reader(name, detect, open)``: ``detect(path)`` says whether the folder (or file) is in
its layout, ``open(path)`` returns a :class:`Source`: the config in official key names and, for every
official parameter name in model order, a :class:`Ref` saying where its data is (row blocks to
concatenate, rows of a fused tensor, per-row scales when stored quantized). Adding a layout is a
detect and an open appended to :data:`READERS`; the writers (runtime/convert.py) only see Refs.

The built-in readers are the loader's own code: detection is ``checkpoints.find_checkpoint`` (the
same layouts, subfolders and refusals as ``from_pretrained``), configs and header checks are
those of weights.py, diffusers_checkpoints.py, quantized_checkpoints.py and comfy_checkpoints.py,
so the converter accepts and refuses what the loader does.

Design notes: docs/design/checkpoints.md ("Converting").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from . import quantized_checkpoints as qc
from .checkpoints import LAYOUTS, find_checkpoint, read_config
from .comfy_checkpoints import open_comfy_checkpoint
from .config import LongCatConfig
from .diffusers_checkpoints import DIFFUSERS_CLASS, OFFICIAL_CLASS, check_diffusers_weights
from .weights import (CheckpointError, LoadPlan, check_official_weights, expected_official_shape, internal_to_official,
                      read_headers)

__all__ = ["Part", "Ref", "Source", "Reader", "READERS", "TensorFiles", "open_source", "official_shapes",
           "OFFICIAL_CLASS", "DIFFUSERS_CLASS"]

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
    # official name -> its parts' dtypes, for a tensor stored as row blocks in several float dtypes
    # (the loader casts each into the model dtype; "as stored" names no one dtype: --dtype needed)
    mixed: Dict[str, str] = field(default_factory=dict)


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
# The expected tensors, and plans turned into Refs
# ---------------------------------------------------------------------------------------------


def _meta_model(cfg: LongCatConfig, dtype=torch.float32, quantize=None):
    from .dit import LongCatDiT

    return LongCatDiT.from_config(cfg, device="meta", dtype=dtype, kernels="reference", quantize=quantize)


def _shapes(model) -> Dict[str, Tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


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


def _common_dtype(refs: Dict[str, Ref], mixed: Dict[str, str]) -> Optional[torch.dtype]:
    dtypes = {r.dtype for r in refs.values() if r.scale is None}
    return dtypes.pop() if len(dtypes) == 1 and not mixed else None


def _headers(files: List[Path]) -> Dict[Tuple[Path, str], str]:
    return {(f, k): dt for f, k, _, dt in read_headers(files)}


def _official_name(internal: str, part) -> Tuple[str, int]:
    """``(official name, row block index)`` of one entry of a ``LoadPlan`` (weights.row_block's
    ``part``): a ``w13`` half is the official ``w1`` / ``w3``, a ``(i, k)`` block is block i of the
    fused official tensor (FastVideo's split q/k/v), None the whole tensor."""
    if isinstance(part, int):
        return internal.replace(".w13.", ".w1." if part == 0 else ".w3."), 0
    return internal_to_official(internal), (0 if part is None else part[0])


def _float_refs(plan: LoadPlan, files: List[Path], expected: Dict[str, Tuple[int, ...]]):
    """The Refs of a float layout's checked plan (official or Diffusers: every entry already checked
    by the loader's header check), and the tensors whose row blocks come in several dtypes."""
    dtypes = _headers(files)
    blocks: Dict[str, Dict[int, Tuple[Path, str]]] = {}
    for f, entries in plan.by_file.items():
        for key, internal, part in entries:
            name, i = _official_name(internal, part)
            blocks.setdefault(name, {})[i] = (f, key)
    refs, mixed = {}, {}
    for name, shape in expected.items():
        parts = [blocks[name][i] for i in sorted(blocks[name])]
        stored = [_TORCH_DTYPES[dtypes[p]] for p in parts]
        dtype = stored[0]
        for d in stored[1:]:  # torch.cat promotes the blocks to a dtype holding each exactly
            dtype = torch.promote_types(dtype, d)
        if len(set(stored)) > 1:
            mixed[name] = ", ".join(f"{k} {str(d).replace('torch.', '')}" for (_, k), d in zip(parts, stored))
        refs[name] = Ref(name, shape, dtype, tuple(Part(f, k) for f, k in parts))
    return refs, mixed


# ---------------------------------------------------------------------------------------------
# The readers
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))  # read_config (run first) reported an unreadable one
    if not isinstance(data, dict):  # pragma: no cover - likewise
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _open_float(folder: Path, kind: str) -> Source:
    """The official ``dit/`` or FastVideo's ``transformer/`` folder: the loader's config reader and
    header check (``check_official_weights`` / ``check_diffusers_weights``), whose plan becomes the
    Refs. The official config.json is kept as written (unknown keys too: the official loader ignores
    them with a warning); a Diffusers one is the config the loader read, in official keys."""
    try:
        cfg = read_config(folder, kind)
    except ValueError as e:  # LongCatConfig's own validation (a bad value), as from_pretrained raises it
        raise CheckpointError(str(e)) from None
    if kind == "official":
        config = _read_json(folder / "config.json")
    else:
        config = dict(cfg.to_dict(), _class_name=OFFICIAL_CLASS)
    files = qc.weight_files(folder, kind)
    check = check_official_weights if kind == "official" else check_diffusers_weights
    model = _meta_model(cfg)
    plan = check(_shapes(model), files, cfg)
    refs, mixed = _float_refs(plan, files, official_shapes(cfg, model))
    return Source(kind, folder, config, cfg, refs, _common_dtype(refs, mixed), mixed=mixed)


def _open_quantized(folder: Path, kind: str) -> Source:
    """An official INT8 folder ("official-int8") or a longcat-native save ("native"), checked by the
    loader's own checks (runtime/quantized_checkpoints.py), so convert accepts what loads."""
    mode, saved_dtype = qc.checkpoint_mode(folder, kind, None)
    config = _read_json(folder / "config.json")
    cfg = LongCatConfig.from_dict(config, source=str(folder / "config.json"))
    files = qc.weight_files(folder, kind)
    described = qc.native_description(folder) if kind == "native" else None
    model = _meta_model(cfg, saved_dtype or torch.float32, mode)
    plan = qc.check_quantized_checkpoint(model, files, kind, cfg, described)
    headers, expected = _headers(files), official_shapes(cfg)
    internal_rows = {n: p.shape[0] for n, p in model.named_parameters()}
    refs: Dict[str, Ref] = {}
    for it in plan.items:
        dtype = _TORCH_DTYPES[headers[(it.file, it.key)]]
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
    model_dtype = saved_dtype if kind == "native" else _common_dtype(refs, {})
    return Source(kind, folder, config, cfg, refs, model_dtype, mode)


def _open_comfy(path: Path) -> Source:
    """A ComfyUI single file (runtime/comfy_checkpoints.py: its refusals, the config inferred from
    the shapes, the header check). The check's plan has, per internal parameter, one ``_Part`` per
    file key in row order: each becomes a Part of the official tensor's Ref, with its scale when it
    is float8 (the per-tensor ``scale_weight`` tensor, or 1.0 for an unscaled float8 weight), so
    ``--to fp8`` keeps the stored bytes and every other target dequantizes ``fp8 * scale``."""
    # The quantize mode only decides what a load would build (and, when None, warns that the file
    # loads as fp8-weight-only); the converter's target decides what is written.
    comfy = open_comfy_checkpoint(path, "fp8-weight-only")
    cfg = comfy.cfg
    model = _meta_model(cfg)
    plan = comfy.check(model)
    expected = official_shapes(cfg, model)
    refs, mixed, split = {}, {}, []
    for internal, parts in plan.items():
        if internal.endswith(".ffn.w13.weight"):  # stored as w1 and w3, the official names
            named = [(internal.replace(".w13.", w), [p]) for w, p in zip((".w1.", ".w3."), parts)]
        else:
            named = [(internal_to_official(internal), parts)]
        for name, ps in named:
            stored = [_TORCH_DTYPES[comfy.tensors[p.key][1]] for p in ps]
            if len({p.fp8 for p in ps}) > 1:
                split.append(f"{name} from " + ", ".join(f"{p.key} {comfy.tensors[p.key][1]}" for p in ps))
                continue
            files = tuple(Part(path, comfy.file_keys[p.key]) for p in ps)
            if ps[0].fp8:
                scale = tuple(Part(path, comfy.file_keys[p.scale_key]) if p.scale_key else float(p.scale) for p in ps)
                refs[name] = Ref(name, expected[name], stored[0], files, scale)
                continue
            dtype = stored[0]
            for d in stored[1:]:
                dtype = torch.promote_types(dtype, d)
            if len(set(stored)) > 1:
                mixed[name] = ", ".join(f"{p.key} {comfy.tensors[p.key][1]}" for p in ps)
            refs[name] = Ref(name, expected[name], dtype, files)
    if split:
        raise CheckpointError(f"ComfyUI checkpoint {path}: the converter cannot write a tensor whose row blocks are "
                              f"stored partly float8 and partly float ({len(split)}): " + "; ".join(split[:4])
                              + ". Load it with from_pretrained (it reads such files), or convert a file stored "
                              "uniformly")
    refs = {name: refs[name] for name in expected}
    config = dict(cfg.to_dict(), _class_name=OFFICIAL_CLASS)
    return Source("comfy", path, config, cfg, refs, _common_dtype(refs, mixed), mixed=mixed)


def _layout_here(path: Path) -> Optional[str]:
    """The layout ``checkpoints.find_checkpoint`` finds at ``path`` itself (None: none, or only in
    a subfolder). Its refusals (a config.json of another model class, a GGUF or pickle file, dit/
    and transformer/ both present) are raised as they are."""
    try:
        found, kind = find_checkpoint(path, None, None)
    except FileNotFoundError:
        return None
    return kind if Path(found) == path else None


def _reader(kind: str, open_fn: Callable[[Path], Source]) -> Reader:
    return Reader(kind, lambda p: _layout_here(p) == kind, open_fn)


READERS: List[Reader] = [
    _reader("native", lambda p: _open_quantized(p, "native")),
    _reader("official-int8", lambda p: _open_quantized(p, "official-int8")),
    _reader("diffusers", lambda p: _open_float(p, "diffusers")),
    _reader("official", lambda p: _open_float(p, "official")),
    _reader("comfy", _open_comfy),
]


def open_source(path: Path) -> Source:
    """The checkpoint at ``path``, opened by the first reader of :data:`READERS` whose ``detect``
    recognizes it; else where ``checkpoints.find_checkpoint`` finds it (a root's ``dit/``,
    ``transformer/`` or ``base_model_int8/``, as ``from_pretrained`` looks), opened by the reader of
    that layout."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"source {str(path)!r} does not exist")
    for reader in READERS:
        if reader.detect(path):
            return reader.open(path)
    names = ", ".join(r.name for r in READERS)
    try:
        folder, kind = find_checkpoint(path, None, None)
    except FileNotFoundError as e:
        raise CheckpointError(f"no LongCat-Video DiT checkpoint found at {str(path)!r} (readable layouts: {names}): "
                              f"{e}") from None
    reader = next((r for r in READERS if r.name == kind), None)
    if reader is None:  # pragma: no cover - every layout of checkpoints.LAYOUTS has a reader
        raise CheckpointError(f"{folder} is a {LAYOUTS[kind]} checkpoint and no converter reader reads it "
                              f"(readers: {names})")
    return reader.open(folder)
