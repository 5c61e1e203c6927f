"""Reading FastVideo's Diffusers-style DiT folder (``transformer/`` of
``FastVideo/LongCat-Video-T2V-Diffusers`` and its ``-I2V-`` / ``-VC-`` siblings) as it is stored.

- ``config.json``: FastVideo's keys (``_class_name`` ``LongCatTransformer3DModel``,
  ``num_attention_heads``, ...) translated to a :class:`LongCatConfig`; a key this loader does not
  know, or two keys that contradict each other, is a CheckpointError naming them (a silently
  ignored key could change the model).
- the weights: every ``*.safetensors`` of the folder (FastVideo globs them; the converter writes
  ``model.safetensors``, diffusers ``diffusion_pytorch_model*.safetensors``), or the shards a
  ``*.safetensors.index.json`` lists. Parameter names are FastVideo's (runtime/layouts.py):
  ``to_q``/``to_k``/``to_v`` and cross-attention ``to_k``/``to_v`` are fused back at load time into
  the model's ``qkv`` / ``kv_linear`` rows, ``ffn.w1``/``w3`` into ``w13``, and the Conv3d
  ``patch_embed.proj.weight`` is reshaped into the linear ``x_embedder``.

The header check (:func:`check_diffusers_weights`) returns the same ``LoadPlan`` as the official
layout's, so the copy (weights.copy_official_weights, or quantized_checkpoints.copy_weights through
``plan_from_official`` for ``quantize=`` modes; streamed blocks alike) is the one the official
layout uses: tensor by tensor, memory-mapped. Design notes: docs/design/checkpoints.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .config import DIFFUSERS_META_KEYS, OFFICIAL_BACKEND_KEYS, LongCatConfig
from .layouts import diffusers_to_official, official_to_diffusers
from .weights import (FLOAT_DTYPES, CheckpointError, LoadPlan, index_shards, internal_to_official, mismatch_error,
                      read_headers)

__all__ = ["DIFFUSERS_CLASS", "OFFICIAL_CLASS", "config_class", "read_config", "diffusers_config", "weight_files",
           "expected_diffusers_tensors", "check_diffusers_weights"]

DIFFUSERS_CLASS = "LongCatTransformer3DModel"  # FastVideo's native DiT (fastvideo/models/dits/longcat.py)
OFFICIAL_CLASS = "LongCatVideoTransformer3DModel"  # the official one (and FastVideo's wrapper of it)

# config.json keys with the same name and meaning in both layouts (the official keys).
_SAME_KEYS = ("in_channels", "out_channels", "hidden_size", "depth", "caption_channels", "mlp_ratio",
              "adaln_tembed_dim", "frequency_embedding_size", "patch_size", "enable_bsa", "bsa_params", "cp_split_hw",
              "text_tokens_zero_pad") + OFFICIAL_BACKEND_KEYS
# FastVideo's DiTArchConfig fields that only restate other keys: checked against them, then dropped.
_DERIVED = ("attention_head_dim", "num_channels_latents")
# FastVideo fields that are accepted only at their no-op value (anything else changes what runs).
_NO_OP = {"boundary_ratio": None, "exclude_lora_layers": []}


def config_class(folder: Path) -> Optional[str]:
    """The ``_class_name`` of ``folder/config.json`` (None: no such key, or no readable object;
    reading the config properly reports those)."""
    try:
        data = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    name = data.get("_class_name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def read_config(folder: Path, overrides: Optional[Dict[str, Any]] = None) -> LongCatConfig:
    """``folder/config.json`` in FastVideo's keys as a :class:`LongCatConfig` (``overrides`` in
    the official key names, as ``from_pretrained`` takes them).

    ``num_attention_heads`` is ``num_heads`` (a leftover ``num_heads`` must agree with it);
    ``attention_head_dim`` and ``num_channels_latents`` must equal what the other keys give;
    ``text_tokens_zero_pad`` defaults to FastVideo's True (the official constructor's default is
    False: a FastVideo config without it means True). Unknown keys are a CheckpointError."""
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable config.json ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    if data.get("_class_name") != DIFFUSERS_CLASS:
        raise CheckpointError(f"{path}: _class_name {data.get('_class_name')!r}, expected {DIFFUSERS_CLASS!r} "
                              "(FastVideo's LongCat DiT)")
    known = set(_SAME_KEYS) | set(_DERIVED) | set(_NO_OP) | set(DIFFUSERS_META_KEYS) | {"num_attention_heads",
                                                                                      "num_heads"}
    problems = []
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        problems.append(f"unknown keys {unknown} (the keys read: {sorted(known - set(DIFFUSERS_META_KEYS))})")
    # FastVideo's DiTArchConfig defaults these to 0 (no model): a config must set them. The
    # official num_heads is read where a converter left it instead of num_attention_heads.
    missing = [k for k, alt in (("hidden_size", None), ("num_attention_heads", "num_heads"))
               if k not in data and alt not in data]
    if missing:
        problems.append(f"{', '.join(missing)} not set (FastVideo requires them; there is no default)")
    heads = data.get("num_attention_heads", data.get("num_heads"))
    if "num_heads" in data and "num_attention_heads" in data and data["num_heads"] != heads:
        problems.append(f"num_heads {data['num_heads']!r} contradicts num_attention_heads {heads!r}")
    for key, value in _NO_OP.items():
        if key in data and data[key] != value:
            problems.append(f"{key} {data[key]!r}: longcat-native reads only {json.dumps(value)} (one transformer, "
                            "LoRAs on every layer)")
    if problems:
        raise CheckpointError(f"{path}: not a FastVideo LongCat config this loader can read: " + "; ".join(problems))
    d = {k: data[k] for k in _SAME_KEYS + tuple(DIFFUSERS_META_KEYS) if k in data}
    d["num_heads"] = heads
    d.setdefault("text_tokens_zero_pad", True)
    try:
        cfg = LongCatConfig.from_dict(d, overrides, source=str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    # Checked on the validated config (integers normalized), with the overrides applied: the derived
    # keys restate the file's own sizes, so an override of those sizes does not make them contradict.
    file_cfg = cfg if not overrides else LongCatConfig.from_dict(d, None, source=str(path))
    derived = {"attention_head_dim": file_cfg.head_dim, "num_channels_latents": file_cfg.in_channels}
    what = {"attention_head_dim": "hidden_size / num_attention_heads", "num_channels_latents": "in_channels"}
    bad = [f"{k} {data[k]!r} contradicts {what[k]} ({v})" for k, v in derived.items() if k in data and data[k] != v]
    if bad:
        raise CheckpointError(f"{path}: " + "; ".join(bad))
    return cfg


def diffusers_config(cfg: LongCatConfig) -> Dict[str, Any]:
    """The FastVideo ``config.json`` of ``cfg``, the inverse of :func:`read_config` (what the
    converter writes): every key explicit, so no default of either layout decides a value (FastVideo
    defaults ``text_tokens_zero_pad`` to True, the official constructor to False)."""
    d = cfg.to_dict()
    out: Dict[str, Any] = {"_class_name": DIFFUSERS_CLASS, "num_attention_heads": d.pop("num_heads")}
    out.update((k, d.pop(k)) for k in _SAME_KEYS if k in d)
    if d:  # a LongCatConfig field this layout has no key for: a bug here, not a bad file
        raise RuntimeError(f"runtime/diffusers_checkpoints.py has no FastVideo config key for {sorted(d)}")
    return out


def weight_files(folder: Path) -> List[Path]:
    """The safetensors files of a Diffusers DiT folder: the shards its index lists
    (``*.safetensors.index.json``; two indexes are ambiguous), else every ``*.safetensors`` there
    (FastVideo's own rule). Pickle files are refused, as in the official layout."""
    folder = Path(folder)
    indexes = sorted(p for p in folder.glob("*.safetensors.index.json") if p.is_file())
    if len(indexes) > 1:
        raise CheckpointError(f"{folder} holds {len(indexes)} safetensors indexes ({', '.join(p.name for p in indexes)}): "
                              "which one describes the weights is ambiguous; keep one")
    if indexes:
        return index_shards(folder, indexes[0])
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    if pickles:
        raise CheckpointError(f"{folder} holds only pickle checkpoints {pickles}; longcat-native reads safetensors only "
                              "(pickle files can run code when loaded)")
    raise CheckpointError(f"no *.safetensors (model.safetensors, diffusion_pytorch_model*.safetensors or shards "
                          f"with an index) in {folder}")


def expected_diffusers_tensors(param_shapes: Dict[str, Tuple[int, ...]], cfg) -> Dict[str, Tuple[str, Any, Tuple[int, ...]]]:
    """``{diffusers name: (internal name, part, shape)}``: every tensor a FastVideo folder must hold
    for a model with these parameters (``{internal name: shape}``, e.g. of a meta model), the row
    block ``part`` of the internal parameter it fills (weights.row_block) and its stored shape."""
    out = {}
    for internal, shape in param_shapes.items():
        if internal.endswith(".ffn.w13.weight"):  # stored as w1 and w3, the two row halves
            for half, name in enumerate(("w1", "w3")):
                out[internal.replace("w13", name)] = (internal, half, (shape[0] // 2, *shape[1:]))
            continue
        official = internal_to_official(internal)
        names = official_to_diffusers(official)
        if names is None:  # the model has a parameter layouts.py does not map: a bug, not a bad file
            raise RuntimeError(f"runtime/layouts.py has no Diffusers name for the parameter {official}")
        if len(names) == 1:
            stored = (cfg.hidden_size, cfg.in_channels, *cfg.patch_size) if internal == "x_embedder.proj.weight" else shape
            out[names[0]] = (internal, None, tuple(stored))
        else:
            for i, name in enumerate(names):
                out[name] = (internal, (i, len(names)), (shape[0] // len(names), *shape[1:]))
    return out


def check_diffusers_weights(param_shapes: Dict[str, Tuple[int, ...]], files: List[Path], cfg) -> LoadPlan:
    """Check a FastVideo folder's safetensors headers (names, shapes, dtypes; no data) against the
    model's parameter shapes: one CheckpointError naming every missing, unexpected (misnamed),
    wrong-shaped, duplicated and non-float tensor, in FastVideo's names; else the plan of the copy."""
    expected = expected_diffusers_tensors(param_shapes, cfg)
    seen, unexpected, wrong_shape, duplicates, not_float = set(), [], [], [], []
    by_file: Dict[Path, list] = {}
    for f, key, shape, dtype in read_headers(files):
        if key not in expected:
            unexpected.append(key)
            continue
        if key in seen:
            duplicates.append(key)
            continue
        seen.add(key)
        internal, part, want = expected[key]
        if shape != want:
            wrong_shape.append(f"{key}: checkpoint {list(shape)}, model expects {list(want)}")
        elif dtype not in FLOAT_DTYPES:
            not_float.append(f"{key}: {dtype}")
        else:
            by_file.setdefault(f, []).append((key, internal, part))
    missing = [k for k in expected if k not in seen]
    if missing or unexpected or wrong_shape or duplicates or not_float:
        hints = []
        official = [k for k in unexpected if diffusers_to_official(k) is None and official_to_diffusers(k)]
        if official:
            hints.append(f"{len(official)} unexpected name(s) are official-layout names (e.g. {official[0]}), but "
                         f"config.json says {DIFFUSERS_CLASS} (FastVideo's names): the config does not belong to "
                         "these weights")
        raise mismatch_error(files, cfg, missing, unexpected, wrong_shape, duplicates, not_float, hints)
    return LoadPlan(by_file)

