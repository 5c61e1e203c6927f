"""Reading the official checkpoint layout into the internal layout, tensor by tensor.

``dit/config.json`` + ``dit/diffusion_pytorch_model.safetensors`` (or shards listed in
``diffusion_pytorch_model.safetensors.index.json``). Every tensor is memory-mapped, checked,
cast and moved on its own, so peak host memory stays near one tensor, not the model. No
pickle: ``.bin``/``.pt`` checkpoints are refused.

Official -> internal names differ in three places:
- ``x_embedder.proj.weight`` [C, Cin, 1, 2, 2] (Conv3d) -> [C, Cin*4] (Linear over patches)
- ``ffn.w1.weight`` and ``ffn.w3.weight`` -> the two row halves of ``ffn.w13.weight``
- ``*.adaLN_modulation.1.*`` (Sequential(SiLU, Linear)) -> ``*.adaLN_modulation.*``
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

__all__ = ["CheckpointError", "find_dit_dir", "list_weight_files", "official_to_internal", "read_headers",
           "check_official_weights", "copy_official_weights", "load_official_weights", "cap_list",
           "index_shards", "expected_official_shape", "internal_to_official", "row_block", "mismatch_error",
           "LoadPlan"]

SINGLE_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into the model; the message names every problem."""


def find_dit_dir(path, subfolder: Optional[str] = None) -> Path:
    """The folder holding config.json and the weights: ``path[/subfolder]`` or its ``dit/``."""
    root = Path(os.fspath(path)).expanduser()
    if subfolder:
        root = root / subfolder
    if not root.exists():
        raise FileNotFoundError(f"checkpoint path {str(root)!r} does not exist")
    for candidate in (root, root / "dit"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no config.json in {str(root)!r} or {str(root / 'dit')!r}: pass a dit/ folder or a checkpoint root that has one"
    )


def list_weight_files(dit_dir: Path) -> List[Path]:
    """The safetensors files of a dit/ folder, single-file or sharded (via the index).

    The index's ``weight_map`` must map tensor names to shard file names (strings); a shard must
    be a plain relative path inside the folder (an absolute path or one with ``..`` is refused:
    a checkpoint never reads files outside itself). Symbolic links inside the folder (the Hugging
    Face cache's layout) are followed as usual."""
    dit_dir = Path(dit_dir)
    index = dit_dir / INDEX_FILE
    if index.is_file():
        return index_shards(dit_dir, index)
    single = dit_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    others = sorted(p for p in dit_dir.glob("*.safetensors") if p.is_file())
    if others:
        return others
    pickles = sorted(p.name for p in dit_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{dit_dir} holds only pickle checkpoints {pickles}; longcat-native reads safetensors only "
            "(pickle files can run code when loaded). Convert them once with safetensors.torch.save_file."
        )
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {dit_dir}")


def index_shards(dit_dir: Path, index: Path) -> List[Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
    if not isinstance(data, dict) or "weight_map" not in data:
        raise CheckpointError(f"{index}: not a valid safetensors index (no \"weight_map\" object)")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid safetensors index (\"weight_map\" must map tensor names to "
                              f"shard files, got a {type(weight_map).__name__})")
    bad = [f"{k!r}: {v!r}" for k, v in weight_map.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise CheckpointError(f"{index}: \"weight_map\" must map tensor names to shard file names (strings); "
                              f"{len(bad)} entr{'y is' if len(bad) == 1 else 'ies are'} not: " + cap_list(bad))
    if not weight_map:
        raise CheckpointError(f"{index}: \"weight_map\" is empty")
    names = sorted(set(weight_map.values()))
    outside = [n for n in names if not _is_inside(n)]
    if outside:
        raise CheckpointError(f"{index} names shard files outside the checkpoint folder {str(dit_dir)!r} (refused: "
                              f"shards must be plain relative paths there): " + cap_list([repr(n) for n in outside]))
    files = [dit_dir / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index} names shard files that do not exist: " + cap_list(missing))
    return files


def _is_inside(name: str) -> bool:
    """A shard name is a non-empty relative path with no ``..``, no drive and no NUL (checked on
    the text: symbolic links inside the folder, as in the Hugging Face cache, stay allowed)."""
    if not name or "\x00" in name:
        return False
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        return False
    return ".." not in posix.parts and posix.parts not in ((), (".",))


MAX_LISTED = 20  # error messages name this many items of a kind, then count the rest


def cap_list(items: List[str], limit: int = MAX_LISTED) -> str:
    """``a, b, c`` for short lists; the first ``limit`` and ``... and N more`` for long ones (an
    error message stays readable when a whole model's keys are wrong)."""
    items = list(items)
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... and {len(items) - limit} more"


_ADALN = re.compile(r"^(blocks\.\d+|final_layer)\.adaLN_modulation\.1\.(weight|bias)$")
_FFN = re.compile(r"^(blocks\.\d+)\.ffn\.(w1|w3)\.weight$")


def official_to_internal(name: str) -> Tuple[str, Optional[int]]:
    """Official parameter name -> (internal name, w13 half index or None)."""
    m = _ADALN.match(name)
    if m:
        return f"{m.group(1)}.adaLN_modulation.{m.group(2)}", None
    m = _FFN.match(name)
    if m:
        return f"{m.group(1)}.ffn.w13.weight", 0 if m.group(2) == "w1" else 1
    return name, None


# safetensors dtype names of floating-point tensors (anything else cannot be model weights).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ")


def expected_official_shape(shape: Tuple[int, ...], internal: str, half: Optional[int], cfg) -> Tuple[int, ...]:
    if half is not None:
        return (shape[0] // 2, shape[1])
    if internal == "x_embedder.proj.weight":
        return (cfg.hidden_size, cfg.in_channels, *cfg.patch_size)
    return tuple(shape)


def read_headers(files: List[Path]) -> Iterator[Tuple[Path, str, Tuple[int, ...], str]]:
    """``(file, key, shape, dtype name)`` of every tensor, from the safetensors headers only (no
    tensor data is read)."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for key in st.keys():
                    sl = st.get_slice(key)
                    yield f, key, tuple(sl.get_shape()), str(sl.get_dtype())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e


@dataclass
class LoadPlan:
    """What a header check found (:func:`check_official_weights`, the Diffusers layout's
    ``check_diffusers_weights``): per file, ``(checkpoint key, internal name, part)`` of every
    tensor to copy, ``part`` as :func:`row_block` reads it."""

    by_file: Dict[Path, List[Tuple[str, str, Any]]]


def check_official_weights(param_shapes: Dict[str, Tuple[int, ...]], files: List[Path], cfg) -> LoadPlan:
    """Check the checkpoint's headers (names, shapes, dtypes; no data) against the model's
    parameter shapes (``{internal name: shape}``, e.g. of a model on the meta device), so a
    checkpoint that does not fit its config fails before anything is allocated: one
    CheckpointError naming every missing, unexpected, wrong-shaped and non-float key (the first
    few of each kind, then a count)."""
    covered: Dict[str, set] = {name: set() for name in param_shapes}
    unexpected, wrong_shape, duplicates, not_float, plan = [], [], [], [], []
    for f, key, shape, dtype in read_headers(files):
        internal, half = official_to_internal(key)
        if internal not in param_shapes:
            unexpected.append(key)
            continue
        want = expected_official_shape(param_shapes[internal], internal, half, cfg)
        part = 0 if half is None else half
        if part in covered[internal]:
            duplicates.append(key)
            continue
        covered[internal].add(part)  # present, so not "missing" even when its shape is wrong
        if shape != want:
            wrong_shape.append(f"{key}: checkpoint {list(shape)}, model expects {list(want)}")
            continue
        if dtype not in FLOAT_DTYPES:
            not_float.append(f"{key}: {dtype}")
            continue
        plan.append((f, key, internal, half))
    missing = []
    for name, parts in covered.items():
        need = {0, 1} if name.endswith(".ffn.w13.weight") else {0}
        for part in sorted(need - parts):
            if name.endswith(".ffn.w13.weight"):
                missing.append(name.replace("w13", "w1" if part == 0 else "w3"))
            else:
                missing.append(internal_to_official(name))
    if missing or unexpected or wrong_shape or duplicates or not_float:
        hints = []
        foreign = [k for k in unexpected if _is_diffusers_name(k)]
        if foreign:
            hints.append(f"{len(foreign)} unexpected name(s) are FastVideo Diffusers names (e.g. {foreign[0]}): is this "
                         "a transformer/ folder whose config.json lacks \"_class_name\": \"LongCatTransformer3DModel\"?")
        raise mismatch_error(files, cfg, missing, unexpected, wrong_shape, duplicates, not_float, hints)
    by_file: Dict[Path, list] = {}
    for f, key, internal, half in plan:
        by_file.setdefault(f, []).append((key, internal, half))
    return LoadPlan(by_file)


def _is_diffusers_name(key: str) -> bool:
    from .layouts import diffusers_to_official

    mapped = diffusers_to_official(key)
    return mapped is not None and mapped[0] != key


def mismatch_error(files: List[Path], cfg, missing, unexpected, wrong_shape, duplicates, not_float,
                   hints=()) -> "CheckpointError":
    """The one CheckpointError of a header check: every problem of each kind named (the first
    few, then a count), with ``hints`` (why it may be so) after them. Shared by the layouts."""
    lines = [f"checkpoint {cap_list([str(f) for f in files], 4)} does not match the model config:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape),
                         ("duplicated across shards", duplicates),
                         ("not floating point (weights must be float tensors)", not_float)):
        if items:
            lines.append(f"  {title} ({len(items)}): " + cap_list(items))
    defaulted = getattr(cfg, "defaulted_keys", ())
    if defaulted and (missing or wrong_shape):
        lines.append(f"  config.json does not set {', '.join(defaulted)}: the official defaults (the 13.6B "
                     "model) were used for them. Is the config.json complete?")
    lines += [f"  {h}" for h in hints]
    return CheckpointError("\n".join(lines))


def row_block(rows: int, part) -> slice:
    """The rows of a (fused) parameter that one checkpoint tensor fills: all of them (``part``
    None), row half ``part`` of two (an int: official ``ffn.w1``/``w3`` of ``w13``), or block ``i``
    of ``k`` (``(i, k)``: FastVideo's split ``to_q``/``to_k``/``to_v`` of ``qkv`` / ``kv_linear``)."""
    if part is None:
        return slice(None)
    i, k = (part, 2) if isinstance(part, int) else part
    n = rows // k
    return slice(i * n, (i + 1) * n)


@torch.no_grad()
def copy_official_weights(model: torch.nn.Module, plan: LoadPlan) -> None:
    """Copy the checked tensors into ``model`` (allocated on its device and dtype), one tensor at a
    time; every tensor is checked finite after its cast to the model's dtype (one host sync per
    file). A NaN/Inf in the checkpoint, or a value beyond the model dtype's range, is a
    CheckpointError naming the tensors."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    non_finite, overflow = [], []
    for f, entries in plan.by_file.items():
        flags = []
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for key, internal, half in entries:
                param = params[internal]
                src = st.get_tensor(key)  # memory-mapped
                if internal == "x_embedder.proj.weight":
                    src = src.reshape(param.shape)
                dst = param[row_block(param.shape[0], half)]
                dst.copy_(src.to(device=param.device, dtype=param.dtype))
                flags.append(torch.isfinite(dst).all())
                del src
            if flags:
                # the file's one host sync (flags of streamed blocks' host tensors join the device's)
                ok = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
                for (key, _, _), good in zip(entries, ok):
                    if good:
                        continue
                    src = st.get_tensor(key)
                    if torch.isfinite(src.float() if src.dtype not in (torch.float32, torch.float64) else src).all():
                        overflow.append(f"{key} (max |x| = {float(src.float().abs().max()):.4g})")
                    else:
                        non_finite.append(key)
    if non_finite or overflow:
        dtype = next(iter(params.values())).dtype if params else None
        lines = [f"checkpoint {cap_list([str(f) for f in plan.by_file], 4)} holds values the model cannot use:"]
        if non_finite:
            lines.append(f"  NaN or Inf ({len(non_finite)}): " + cap_list(non_finite))
        if overflow:
            lines.append(f"  beyond the range of {str(dtype).replace('torch.', '')} ({len(overflow)}): "
                         + cap_list(overflow) + "; load in a wider dtype (float32 or bfloat16)")
        raise CheckpointError("\n".join(lines))


def load_official_weights(model: torch.nn.Module, files: List[Path], cfg) -> None:
    """Check the headers against ``model`` (:func:`check_official_weights`), then copy every
    official tensor into it (:func:`copy_official_weights`)."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    copy_official_weights(model, check_official_weights(shapes, files, cfg))


def internal_to_official(name: str) -> str:
    m = re.match(r"^(blocks\.\d+|final_layer)\.adaLN_modulation\.(weight|bias)$", name)
    if m:
        return f"{m.group(1)}.adaLN_modulation.1.{m.group(2)}"
    return name
