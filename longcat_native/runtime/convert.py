"""``longcat-native convert``: a LongCat-Video DiT checkpoint rewritten in another layout, tensor by
tensor, as one folder that appears complete or not at all.

Targets (:data:`CONVERT_TARGETS`): ``official`` (the official ``dit/`` layout), ``diffusers``
(FastVideo's ``transformer/`` layout, runtime/layouts.py's names), ``fp8`` / ``int8`` (longcat-native's
quantized save, what ``LongCatDiT.from_pretrained`` reads back as "fp8-weight-only" /
"int8-weight-only"). Sources: the table :data:`READERS` (runtime/convert_sources.py), each turning
a folder (or a ComfyUI single file) into the official tensors it holds, checked complete against the
model config by the loader's own checks before anything is written.

How (docs/design/checkpoints.md, "Converting"):
- The shards are planned from the source's headers alone (names, dtypes, shapes: every output size is
  known before a byte is read), so each shard's safetensors header is written first and its tensors
  are then produced one group at a time (a group: the source tensors one output needs, e.g. ``w1`` and
  ``w3`` for ``w13``, or the three row blocks of ``qkv`` written from one read) and written at once.
  The source files are opened per group and closed after it: their memory-mapped pages leave the
  process with them (an open safetensors handle keeps every page it has read resident). Peak host
  memory is about one group, not a shard and not the model.
- Every output is written into a temporary folder beside DST (``files.atomic_folder``) and renamed
  into place when complete; an error, Ctrl-C or a failed check leaves DST as it was.
- Float outputs are checked finite after their cast (a bf16 -> fp16 overflow is an error naming the
  tensor, not an Inf in the file); quantized ones go through runtime/quantize.py's quantizer, so
  ``--to int8`` writes exactly what ``from_pretrained(src, quantize="int8-weight-only")`` holds.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import quantize as qz
from . import quantized_checkpoints as qc
from .checkpoints import read_config
from .convert_sources import OFFICIAL_CLASS, READERS, Ref, Source, TensorFiles, open_source
from .diffusers_checkpoints import diffusers_config
from .files import atomic_folder
from .layouts import official_to_diffusers
from .names import CONVERT_TARGETS, parse_bytes
from .weights import INDEX_FILE, SINGLE_FILE, cap_list, internal_to_official

__all__ = ["CONVERT_TARGETS", "READERS", "ConvertResult", "convert_checkpoint", "shard_names", "DEFAULT_MAX_SHARD_SIZE"]

DEFAULT_MAX_SHARD_SIZE = "5GB"  # Hugging Face's default (10**9 bytes per GB)
TARGET_MODES = {"fp8": "fp8-weight-only", "int8": "int8-weight-only"}
_ST_NAMES = {**qc._SAFETENSORS_NAMES, torch.float8_e5m2: "F8_E5M2"}  # torch dtype -> safetensors name


@dataclass
class _Out:
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class _Group:
    """Output tensors produced together from one read of their sources (``produce(files)``)."""

    outs: List[_Out]
    produce: Callable[[TensorFiles], List[torch.Tensor]]
    sources: List[str]  # the official names read

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outs)


@dataclass
class ConvertResult:
    source: str
    source_layout: str
    target: str
    dst: str
    tensors: int
    bytes: int
    shards: int
    seconds: float
    peak_rss_bytes: int
    files: List[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"converted {self.source_layout} {self.source} -> {self.target} {self.dst}: {self.tensors:,} tensors, "
                f"{self.bytes / 1e9:.3f} GB in {self.shards} shard{'s' if self.shards != 1 else ''}, "
                f"{self.seconds:.1f} s, peak RSS {self.peak_rss_bytes / 2**30:.2f} GiB")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------
# What each target writes: groups of output tensors, the config, the extra files
# ---------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _float_of(ref: Ref, files: TensorFiles, dtype: torch.dtype) -> torch.Tensor:
    """The official tensor ``ref`` in ``dtype``: as stored, or dequantized with its scales (the product
    in float32, rounded once: runtime/quantize.py's ``dequantize``)."""
    t, s = files.read(ref)
    return qz.dequantize(t, s, dtype) if s is not None else t.to(dtype)


def _float_dtype(ref: Ref, src: Source, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    if ref.name in src.mixed:
        raise ValueError(f"{ref.name} is stored in {src.folder} as row blocks of several dtypes "
                         f"({src.mixed[ref.name]}): there is no one dtype to keep it in; pass --dtype")
    if ref.scale is None:
        return ref.dtype
    if src.model_dtype is None:
        raise ValueError(f"{ref.name} is stored quantized in {src.folder} and the source has no single float dtype "
                         "to dequantize it to; pass --dtype")
    return src.model_dtype


def _official_groups(src: Source, dtype: Optional[torch.dtype]) -> List[_Group]:
    groups = []
    for ref in src.refs.values():
        dt = _float_dtype(ref, src, dtype)
        groups.append(_Group([_Out(ref.name, dt, ref.shape)], lambda files, ref=ref, dt=dt: [_float_of(ref, files, dt)],
                             [ref.name]))
    return groups


def _diffusers_groups(src: Source, dtype: Optional[torch.dtype]) -> List[_Group]:
    groups = []
    for ref in src.refs.values():
        names = official_to_diffusers(ref.name)
        if names is None:  # pragma: no cover - every source's names were checked against the model
            raise ValueError(f"{ref.name} has no Diffusers name (runtime/layouts.py)")
        dt = _float_dtype(ref, src, dtype)
        rows = ref.shape[0] // len(names)
        outs = [_Out(n, dt, (rows,) + tuple(ref.shape[1:])) for n in names]

        def produce(files, ref=ref, dt=dt, n=len(names), rows=rows):
            t = _float_of(ref, files, dt)
            return [t[i * rows:(i + 1) * rows] for i in range(n)]  # row blocks of the fused weight, in order

        groups.append(_Group(outs, produce, [ref.name]))
    return groups


def _model_dtype(src: Source, dtype: Optional[torch.dtype]) -> torch.dtype:
    dt = dtype if dtype is not None else src.model_dtype
    if dt is None:
        dtypes = sorted({_dtype_name(r.dtype) for r in src.refs.values()
                         if r.scale is None and r.name not in src.mixed})
        dtypes += [f"{name}: {parts}" for name, parts in src.mixed.items()][:3]
        raise ValueError(f"{src.folder} stores its float tensors in several dtypes ({', '.join(dtypes)}); a quantized "
                         "save has one model dtype for them: pass --dtype")
    if dt not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{src.folder} stores {_dtype_name(dt)}; the model dtype of a quantized save is float32, "
                         "bfloat16 or float16: pass --dtype")
    return dt


def _quantized_groups(src: Source, mode: str, model_dtype: torch.dtype) -> List[_Group]:
    """The internal layout of ``save_quantized`` (runtime/quantized_checkpoints.py): fused ``w13``,
    ``adaLN_modulation`` without its ``.1``, the patch embedding as a Linear weight; block GEMM weights
    in ``mode``'s storage with float32 per-row ``weight_scale``; everything else in ``model_dtype``."""
    from .dit import LongCatDiT

    meta = LongCatDiT.from_config(src.cfg, device="meta", dtype=model_dtype, kernels="reference", quantize=mode)
    storage = qz.storage_dtype(mode)
    targets = {f"{n}.weight" for n, _ in qz.quantized_layers(meta)}
    groups = []
    for name, t in meta.state_dict().items():
        if name.endswith(".weight_scale"):
            continue  # written with its weight
        shape = tuple(t.shape)
        if name.endswith(".ffn.w13.weight"):
            refs = [src.refs[name.replace(".w13.", ".w1.")], src.refs[name.replace(".w13.", ".w3.")]]
        else:
            refs = [src.refs[internal_to_official(name)]]
        if name in targets:
            outs = [_Out(name, storage, shape), _Out(name + "_scale", torch.float32, (shape[0],))]

            def produce(files, refs=refs, shape=shape):
                q = torch.empty(shape, dtype=storage)
                s = torch.empty(shape[0], dtype=torch.float32)
                r = 0
                for ref in refs:  # w1 and w3 on their own, as from_pretrained quantizes them
                    v, sc = files.read(ref)
                    n = v.shape[0]
                    if sc is not None and v.dtype == storage:  # stored in this storage already: copied as stored
                        q[r:r + n].copy_(v)
                        s[r:r + n].copy_(sc)
                    else:
                        # Rows are quantized independently (per-row scales), so slices of rows give the
                        # same bits as the whole weight at once, with float32 transients of one slice.
                        for a, b in _row_chunks(n, v.shape[1]):
                            w = qz.dequantize(v[a:b], sc[a:b]) if sc is not None else v[a:b]
                            q[r + a:r + b], s[r + a:r + b] = qz.quantize_weight(w, storage)
                            del w
                    r += n
                    del v, sc
                return [q, s]

            groups.append(_Group(outs, produce, [r.name for r in refs]))
        else:
            groups.append(_Group([_Out(name, model_dtype, shape)],
                                 lambda files, ref=refs[0], shape=shape:
                                 [_float_of(ref, files, model_dtype).reshape(shape)],
                                 [refs[0].name]))
    missing = set(src.refs) - {r for g in groups for r in g.sources}
    if missing:  # pragma: no cover - the source was checked complete against the same config
        raise ValueError(f"tensors of {src.folder} with no place in the quantized layout: {cap_list(sorted(missing))}")
    return groups


def shard_names(stem: str, n: int) -> List[str]:
    """The Hugging Face shard names: ``<stem>.safetensors`` for one shard, else
    ``<stem>-00001-of-0000n.safetensors`` ... (five digits, as ``huggingface_hub`` writes them)."""
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _plan_shards(groups: List[_Group], max_bytes: int) -> List[List[_Group]]:
    """Groups in order, a new shard when the next group would pass ``max_bytes`` (a group larger than
    the limit gets a shard of its own, as Hugging Face does with an oversized tensor); a group never
    straddles two shards."""
    shards: List[List[_Group]] = []
    cur, size = [], 0
    for g in groups:
        if cur and size + g.nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(g)
        size += g.nbytes
    if cur:
        shards.append(cur)
    return shards


# Elements per slice of the value checks and the quantizer: their float32 transients stay at 32 MiB
# whatever the tensor (the 13.6B model's qkv is 50M elements: its float32 copy alone would be 200 MB).
_CHUNK_ELEMENTS = 1 << 23


def _row_chunks(rows: int, cols: int) -> List[Tuple[int, int]]:
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _all_finite(t: torch.Tensor) -> bool:
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), _CHUNK_ELEMENTS):
        part = flat[i:i + _CHUNK_ELEMENTS]
        if not bool(torch.isfinite(part.float() if part.element_size() == 1 else part).all()):
            return False
    return True


def _check_values(out: _Out, t: torch.Tensor) -> None:
    """Float outputs finite; quantized weights through their scales (a NaN or Inf source value makes its
    row's amax, so its scale, NaN or Inf; the quantizer clamps every finite value into range)."""
    if tuple(t.shape) != tuple(out.shape) or t.dtype != out.dtype:  # pragma: no cover - a planning bug
        raise RuntimeError(f"{out.name} came out {t.dtype} {list(t.shape)}, planned {out.dtype} {list(out.shape)}")
    if out.name.endswith(".weight_scale"):
        if not (_all_finite(t) and bool((t > 0).all())):
            raise ValueError(f"{out.name[: -len('_scale')]}: NaN or Inf in the source weight (its scales are not "
                             "finite and > 0)")
    elif t.dtype not in (torch.int8, qz.FP8_DTYPE) and not _all_finite(t):
        raise ValueError(f"{out.name}: NaN or Inf after the conversion to {_dtype_name(t.dtype)} (the source value "
                         "is out of that dtype's range, or not finite); pick a wider --dtype")


def _write_tensor(f, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel():
        f.write(t.view(torch.uint8).numpy().data)


def _write_shard(path: Path, groups: List[_Group], metadata: Dict[str, str], progress) -> None:
    """One safetensors file (the format of ``write_safetensors``: 8-byte little-endian header length,
    the JSON header padded with spaces to 8 bytes, the raw data), its header written from the plan
    and then its tensors, one group at a time."""
    header: Dict[str, object] = {}
    offset = 0
    for g in groups:
        for o in g.outs:
            header[o.name] = {"dtype": _ST_NAMES[o.dtype], "shape": list(o.shape),
                              "data_offsets": [offset, offset + o.nbytes]}
            offset += o.nbytes
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for g in groups:
            with TensorFiles() as files:  # opened for this group only: its mapped pages go with it
                tensors = g.produce(files)
                for o, t in zip(g.outs, tensors):
                    _check_values(o, t)
                    _write_tensor(f, t)
                del tensors
            progress(g.nbytes)


# ---------------------------------------------------------------------------------------------
# The checks before any work, and the run
# ---------------------------------------------------------------------------------------------


def _check_dst(dst: Path, src: Source, src_arg: Path, overwrite: bool) -> None:
    real = Path(os.path.realpath(dst))
    folder, root = Path(os.path.realpath(src.folder)), Path(os.path.realpath(src_arg))
    # Beside the DiT inside its root is fine (as the official base_model_int8/ is); inside the folder
    # read, or a folder holding it (which --overwrite would delete), is not.
    if real == folder or folder in real.parents or real == root or real in root.parents or real in folder.parents:
        raise ValueError(f"DST {str(dst)!r} overlaps the source {str(folder)!r} (the same folder, inside it, or "
                         "holding it); write the conversion to a separate folder")
    if real.exists() and not real.is_dir():
        raise ValueError(f"DST {str(dst)!r} is a file; name a folder")
    if real.is_dir() and any(real.iterdir()) and not overwrite:
        raise ValueError(f"DST {str(dst)!r} exists and is not empty; pass --overwrite to replace it as a whole "
                         "(it is swapped for the new folder only once the conversion is complete)")
    parent = real.parent
    while not parent.exists():  # created when the folder is written, as mkdir -p would
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write DST {str(dst)!r}: {str(parent)!r} is not a writable folder")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _progress_bar(total: int, desc: str, quiet: bool):
    """A tqdm bar on an interactive stderr (none when quiet, piped, or tqdm is not installed)."""
    if quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # not a dependency of longcat-native (transformers/diffusers bring it): no bar then
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr)


def convert_checkpoint(src, dst, to: str, *, dtype=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                       overwrite: bool = False, quiet: bool = False) -> ConvertResult:
    """Convert the LongCat-Video DiT checkpoint ``src`` (any layout of :data:`READERS`: an official
    ``dit/`` folder or root, a FastVideo Diffusers ``transformer/`` folder or root, a longcat-native
    quantized save, an official INT8 folder, a ComfyUI single file) to the folder ``dst`` in the
    layout ``to`` (one of :data:`CONVERT_TARGETS`).

    ``dtype``: the float dtype of the output's float tensors (default: as stored; a quantized target's
    model dtype, default the source's single float dtype). ``max_shard_size``: bytes per weight file
    (an int or "5GB", "500MB", "2GiB"; Hugging Face's 5GB by default). ``dst`` must be new or empty
    unless ``overwrite``. Everything is checked (the source complete and well-formed, ``dst``, the free
    disk space) before anything is written; the folder appears at ``dst`` complete or not at all."""
    from .device import resolve_dtype

    start = time.perf_counter()
    if to not in CONVERT_TARGETS:
        raise ValueError(f"--to must be one of {', '.join(CONVERT_TARGETS)}, got {to!r}")
    out_dtype = resolve_dtype(dtype, torch.device("cpu")) if dtype is not None else None
    max_bytes = parse_bytes(max_shard_size)
    if max_bytes <= 0:
        raise ValueError(f"--max-shard-size must be positive, got {max_shard_size!r}")
    src_arg = Path(os.fspath(src)).expanduser()
    dst = Path(os.fspath(dst)).expanduser()
    source = open_source(src_arg)
    _check_dst(dst, source, src_arg, overwrite)

    if to == "official":
        groups, stem, index_name = _official_groups(source, out_dtype), SINGLE_FILE[: -len(".safetensors")], INDEX_FILE
        config = dict(source.config)
        config["_class_name"] = OFFICIAL_CLASS
        extra = {"config.json": config}
        metadata = {"format": "pt"}
    elif to == "diffusers":
        groups, stem, index_name = _diffusers_groups(source, out_dtype), SINGLE_FILE[: -len(".safetensors")], INDEX_FILE
        # The config the loader read, in FastVideo's keys: every key explicit. Keys the source's config
        # has and the model does not read are not carried over: the official loader ignores them (with
        # a warning), the Diffusers one refuses them, so writing them would make DST unloadable.
        extra = {"config.json": diffusers_config(source.cfg)}
        metadata = {"format": "pt"}
        dropped = sorted(getattr(source.cfg, "unknown_keys", {}) or ())
        if dropped:
            warnings.warn(f"{source.folder}: config.json keys {dropped} are not written to the Diffusers config.json "
                          "(the model does not read them; the official loader ignores them, the Diffusers loader "
                          "refuses unknown keys)", stacklevel=2)
    else:
        mode = TARGET_MODES[to]
        model_dtype = _model_dtype(source, out_dtype)
        groups = _quantized_groups(source, mode, model_dtype)
        stem, index_name = qc.NATIVE_WEIGHTS[: -len(".safetensors")], qc.NATIVE_INDEX
        metadata = {"format": qc.NATIVE_FORMAT, "quantization": mode}
        extra = {"config.json": source.cfg.to_dict()}
    shards = _plan_shards(groups, max_bytes)
    names = shard_names(stem, len(shards))
    total = sum(g.nbytes for g in groups)
    if to in TARGET_MODES:
        extra[qc.NATIVE_MARKER] = {
            "format": qc.NATIVE_FORMAT, "format_version": qc.NATIVE_FORMAT_VERSION, "quantization": mode,
            "dtype": _dtype_name(model_dtype), "weights": names[0] if len(names) == 1 else index_name,
            "quantized_layers": sorted({o.name[: -len(".weight")] for g in groups for o in g.outs
                                        if o.dtype == qz.storage_dtype(mode)}, key=_natural),
            "scales": "per output row, float32: w = weight * weight_scale[:, None]",
            "converted_from": f"{source.layout} ({source.folder})",
        }
    existing = Path(os.path.realpath(dst)).parent
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < total:
        raise ValueError(f"the conversion writes {total / 1e9:.2f} GB and the file system of "
                         f"{str(existing)!r} has {free / 1e9:.2f} GB free")

    bar = _progress_bar(total, f"{source.layout} -> {to}", quiet)
    progress = bar.update if bar is not None else (lambda n: None)
    try:
        with atomic_folder(dst, make_parent=True) as tmp:
            weight_map = {}
            for shard, name in zip(shards, names):
                _write_shard(tmp / name, shard, metadata, progress)
                weight_map.update({o.name: name for g in shard for o in g.outs})
            if len(names) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (tmp / index_name).write_text(json.dumps(index, indent=2), encoding="utf-8")
            for fname, obj in extra.items():
                (tmp / fname).write_text(json.dumps(obj, indent=2), encoding="utf-8")
            # DST's config read back by the loader's own reader before DST appears: what convert
            # writes, from_pretrained reads (a failure here is a converter bug, and leaves no DST)
            with warnings.catch_warnings():  # an unknown key kept in an official config was warned of on reading
                warnings.simplefilter("ignore")
                read_config(tmp, "diffusers" if to == "diffusers" else "official")
    finally:
        if bar is not None:
            bar.close()
    return ConvertResult(
        source=str(source.folder), source_layout=source.layout, target=to, dst=str(dst),
        tensors=sum(len(g.outs) for g in groups), bytes=total, shards=len(names), seconds=time.perf_counter() - start,
        peak_rss_bytes=_peak_rss_bytes(), files=sorted(names + ([index_name] if len(names) > 1 else []) + list(extra)))


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]
