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
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

__all__ = ["CheckpointError", "find_dit_dir", "list_weight_files", "official_to_internal", "load_official_weights"]

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
    """The safetensors files of a dit/ folder, single-file or sharded (via the index)."""
    dit_dir = Path(dit_dir)
    index = dit_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted({dit_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return files
    single = dit_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    others = sorted(dit_dir.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(p.name for p in dit_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{dit_dir} holds only pickle checkpoints {pickles}; longcat-native reads safetensors only "
            "(pickle files can run code when loaded). Convert them once with safetensors.torch.save_file."
        )
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {dit_dir}")


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


def _expected_official_shape(param: torch.Tensor, internal: str, half: Optional[int], cfg) -> Tuple[int, ...]:
    if half is not None:
        return (param.shape[0] // 2, param.shape[1])
    if internal == "x_embedder.proj.weight":
        return (cfg.hidden_size, cfg.in_channels, *cfg.patch_size)
    return tuple(param.shape)


def _iter_headers(files: List[Path]) -> Iterator[Tuple[Path, str, Tuple[int, ...]]]:
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for key in st.keys():
                    yield f, key, tuple(st.get_slice(key).get_shape())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e


@torch.no_grad()
def load_official_weights(model: torch.nn.Module, files: List[Path], cfg) -> None:
    """Copy every official tensor into ``model`` (already allocated on its device and dtype).

    All headers are checked first, so a mismatched checkpoint fails with one error naming every
    missing, unexpected and wrong-shaped key before any tensor data is read.
    """
    from safetensors import safe_open

    params = dict(model.named_parameters())
    covered: Dict[str, set] = {name: set() for name in params}
    unexpected, wrong_shape, duplicates, plan = [], [], [], []
    for f, key, shape in _iter_headers(files):
        internal, half = official_to_internal(key)
        if internal not in params:
            unexpected.append(key)
            continue
        want = _expected_official_shape(params[internal], internal, half, cfg)
        part = 0 if half is None else half
        if part in covered[internal]:
            duplicates.append(key)
            continue
        covered[internal].add(part)  # present, so not "missing" even when its shape is wrong
        if shape != want:
            wrong_shape.append(f"{key}: checkpoint {list(shape)}, model expects {list(want)}")
            continue
        plan.append((f, key, internal, half))
    missing = []
    for name, parts in covered.items():
        need = {0, 1} if name.endswith(".ffn.w13.weight") else {0}
        for part in sorted(need - parts):
            if name.endswith(".ffn.w13.weight"):
                missing.append(name.replace("w13", "w1" if part == 0 else "w3"))
            else:
                missing.append(_internal_to_official(name))
    if missing or unexpected or wrong_shape or duplicates:
        lines = [f"checkpoint {', '.join(str(f) for f in files)} does not match the model config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape),
                             ("duplicated across shards", duplicates)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise CheckpointError("\n".join(lines))

    by_file: Dict[Path, list] = {}
    for f, key, internal, half in plan:
        by_file.setdefault(f, []).append((key, internal, half))
    for f, entries in by_file.items():
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for key, internal, half in entries:
                param = params[internal]
                src = st.get_tensor(key)  # memory-mapped
                if internal == "x_embedder.proj.weight":
                    src = src.reshape(param.shape)
                dst = param if half is None else param[half * (param.shape[0] // 2) : (half + 1) * (param.shape[0] // 2)]
                dst.copy_(src.to(device=param.device, dtype=param.dtype))
                del src


def _internal_to_official(name: str) -> str:
    m = re.match(r"^(blocks\.\d+|final_layer)\.adaLN_modulation\.(weight|bias)$", name)
    if m:
        return f"{m.group(1)}.adaLN_modulation.1.{m.group(2)}"
    return name
