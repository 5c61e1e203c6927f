"""Which checkpoint layout a path holds (docs/design/checkpoints.md): ``find_checkpoint`` tells
the official ``dit/`` folder, the official INT8 folder, longcat-native's quantized save and
FastVideo's Diffusers ``transformer/`` folder apart from their marker files and config.json's
``_class_name``, and ``read_config`` reads the config of each. Reading the weights of a layout is
runtime/weights.py (official), runtime/diffusers_checkpoints.py (FastVideo) and
runtime/quantized_checkpoints.py (the quantized ones).

A single file is a ComfyUI checkpoint (kind "comfy", runtime/comfy_checkpoints.py: it has no
config.json, its config is inferred from the tensor shapes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from .config import LongCatConfig
from .diffusers_checkpoints import DIFFUSERS_CLASS, OFFICIAL_CLASS, config_class
from .diffusers_checkpoints import read_config as read_diffusers_config
from .quantized_checkpoints import OFFICIAL_INT8_FOLDER, quantized_kind
from .weights import CheckpointError

__all__ = ["LAYOUTS", "find_checkpoint", "read_config", "checkpoint_config"]

# What each layout (find_checkpoint's kind) is, in words: the INFO line and repr of a loaded model.
LAYOUTS = {
    "official": "official (meituan-longcat/LongCat-Video dit/)",
    "official-int8": "official INT8 (quantized_model*.safetensors)",
    "native": "longcat-native quantized save",
    "diffusers": "FastVideo Diffusers (transformer/, LongCatTransformer3DModel)",
    "comfy": "ComfyUI single file (fp8_e4m3fn scaled or float)",
}


def _folder_kind(d: Path) -> Optional[str]:
    """The layout of folder ``d`` (None: not a DiT folder; "foreign": a config.json of another
    model class)."""
    kind = quantized_kind(d)
    if kind is not None or not (d / "config.json").is_file():
        return kind
    cls = config_class(d)
    if cls == DIFFUSERS_CLASS:
        return "diffusers"
    # no _class_name (a stripped config) reads as official, as it always has
    return "official" if cls in (None, OFFICIAL_CLASS) else "foreign"


def find_checkpoint(path, subfolder: Optional[str], quantize: Optional[str]) -> Tuple[Path, str]:
    """``(folder or file, kind)``: the layout of ``path[/subfolder]`` (docs/design/checkpoints.md).
    kind "official" (config.json + diffusion_pytorch_model*), "official-int8" (the official INT8
    layout), "native" (:func:`save_quantized`), "diffusers" (FastVideo's transformer/:
    ``_class_name`` LongCatTransformer3DModel) or "comfy" (a single ``.safetensors`` file: ComfyUI's;
    GGUF, pickle and non-safetensors files are refused here, naming what they are). Looked for in the path itself,
    then its ``dit/`` and ``transformer/`` (both there: ambiguous, an error), then its
    ``base_model_int8/`` (and ``dit/base_model_int8/``); with ``quantize="int8-weight-only"`` an
    INT8 folder there is preferred to a float one. Nothing found: a FileNotFoundError listing what
    was looked for."""
    root = Path(str(path)).expanduser()
    if subfolder:
        root = root / subfolder
    if not root.exists():
        raise FileNotFoundError(f"checkpoint path {str(root)!r} does not exist")
    if root.is_file():
        from .comfy_checkpoints import single_file_kind

        return root, single_file_kind(root)
    int8_dirs = [root / OFFICIAL_INT8_FOLDER, root / "dit" / OFFICIAL_INT8_FOLDER]
    int8 = next((d for d in int8_dirs if _folder_kind(d) == "official-int8"), None)
    kind = _folder_kind(root)
    if kind is not None:
        return _checked(root, kind)
    found = [(d, k) for d in (root / "dit", root / "transformer") for k in [_folder_kind(d)] if k is not None]
    if len(found) > 1:
        raise CheckpointError(f"{str(root)!r} holds two DiT folders, dit/ ({found[0][1]} layout) and transformer/ "
                              f"({found[1][1]} layout): which to load is ambiguous; pass the folder itself, or "
                              "subfolder='dit' / subfolder='transformer'")
    if found and not (quantize == "int8-weight-only" and int8 is not None and found[0][1] != "official-int8"):
        return _checked(*found[0])
    if int8 is not None:
        return int8, "official-int8"
    model_index = (" (it has a model_index.json: a Diffusers root keeps the DiT in transformer/)"
                   if (root / "model_index.json").is_file() else "")
    raise FileNotFoundError(
        f"no LongCat-Video checkpoint in {str(root)!r}{model_index}: no config.json in it, in its dit/ (official "
        f"layout) or transformer/ (FastVideo Diffusers layout), and no {OFFICIAL_INT8_FOLDER}/ (official INT8). Pass "
        "a dit/ or transformer/ folder, a checkpoint root holding one, or a .safetensors file")


def _checked(folder: Path, kind: str) -> Tuple[Path, str]:
    if kind == "foreign":
        raise CheckpointError(f"{folder / 'config.json'}: _class_name {config_class(folder)!r} is not a LongCat-Video "
                              f"DiT; longcat-native reads {OFFICIAL_CLASS!r} (official dit/) and {DIFFUSERS_CLASS!r} "
                              "(FastVideo's transformer/)")
    return folder, kind


def read_config(folder: Path, kind: str, overrides=None) -> LongCatConfig:
    """The LongCatConfig of a checkpoint folder of layout ``kind`` (``overrides``: official keys)."""
    if kind == "diffusers":
        return read_diffusers_config(folder, overrides)
    return LongCatConfig.from_json_file(str(folder / "config.json"), overrides)


def checkpoint_config(path, subfolder: Optional[str] = None, quantize: Optional[str] = None, overrides=None):
    """``(folder, kind, LongCatConfig)`` of the checkpoint at ``path``, any layout, reading only its
    config (what a caller plans with before loading: the pipelines, ``info``, ``generate``)."""
    folder, kind = find_checkpoint(path, subfolder, quantize)
    if kind == "comfy":  # the config inferred from the header's shapes (no weight data read)
        from .comfy_checkpoints import open_comfy_checkpoint

        return folder, kind, open_comfy_checkpoint(folder, quantize, overrides).cfg
    return folder, kind, read_config(folder, kind, overrides)
