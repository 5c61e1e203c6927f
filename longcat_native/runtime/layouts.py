"""The parameter names of the checkpoint layouts LongCat-Video weights circulate in, and the map
between each and the official layout (the one every other module of the runtime reads).

- ``official``: meituan-longcat/LongCat-Video's ``dit/`` (``blocks.N.attn.qkv``, ...).
- ``diffusers``: FastVideo's Diffusers-style repos (``FastVideo/LongCat-Video-T2V-Diffusers`` and
  its ``-I2V-`` / ``-VC-`` siblings: ``model_index.json`` + ``transformer/``). The names are those of
  FastVideo's ``fastvideo/models/dits/longcat.py`` as its own converter
  (``scripts/checkpoint_conversion/longcat_to_fastvideo.py``) writes them: the fused self-attention
  ``qkv`` and cross-attention ``kv_linear`` are stored split (``to_q``/``to_k``/``to_v``, row blocks
  of the fused weight in that order), everything else is renamed one to one. The parameter-free
  norms (``mod_norm_attn``, ``mod_norm_ffn``, ``final_layer.norm_final``) have no tensors in either.

Only names live here (no torch): what reads or writes the files is runtime/weights.py (official),
runtime/diffusers_checkpoints.py (diffusers) and runtime/convert.py. Design notes and the whole map
as a table: docs/design/checkpoints.md.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

__all__ = ["LAYOUTS", "DIFFUSERS_SPLITS", "official_to_diffusers", "diffusers_to_official"]

LAYOUTS = ("official", "diffusers", "comfy")

# official fused module (under blocks.N.) -> its diffusers parts, in row order of the fused weight
DIFFUSERS_SPLITS = {
    "attn.qkv": ("self_attn.to_q", "self_attn.to_k", "self_attn.to_v"),
    "cross_attn.kv_linear": ("cross_attn.to_k", "cross_attn.to_v"),
}

# one-to-one renames, official module path -> diffusers module path (regex over the module path,
# the parameter's last component — weight / bias — is carried over unchanged)
_BLOCK_RENAMES = (
    ("adaLN_modulation.1", "adaln_linear_1"),
    ("attn.proj", "self_attn.to_out"),
    ("attn.q_norm", "self_attn.q_norm"),
    ("attn.k_norm", "self_attn.k_norm"),
    ("cross_attn.q_linear", "cross_attn.to_q"),
    ("cross_attn.proj", "cross_attn.to_out"),
    ("cross_attn.q_norm", "cross_attn.q_norm"),
    ("cross_attn.k_norm", "cross_attn.k_norm"),
    ("pre_crs_attn_norm", "norm_cross"),
    ("ffn.w1", "ffn.w1"),
    ("ffn.w2", "ffn.w2"),
    ("ffn.w3", "ffn.w3"),
)
_TOP_RENAMES = (
    ("x_embedder.proj", "patch_embed.proj"),
    ("t_embedder.mlp.0", "time_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_embedder.linear_2"),
    ("y_embedder.y_proj.0", "caption_embedder.linear_1"),
    ("y_embedder.y_proj.2", "caption_embedder.linear_2"),
    ("final_layer.adaLN_modulation.1", "final_layer.adaln_linear"),
    ("final_layer.linear", "final_layer.proj"),
)
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_TOP = re.compile(r"^(.+)\.(weight|bias)$")

_OFF_TO_DIFF_BLOCK = dict(_BLOCK_RENAMES)
_DIFF_TO_OFF_BLOCK = {d: o for o, d in _BLOCK_RENAMES}
_OFF_TO_DIFF_TOP = dict(_TOP_RENAMES)
_DIFF_TO_OFF_TOP = {d: o for o, d in _TOP_RENAMES}
_DIFF_PART = {part: (fused, i, len(parts)) for fused, parts in DIFFUSERS_SPLITS.items() for i, part in enumerate(parts)}


def official_to_diffusers(name: str) -> Optional[List[str]]:
    """An official parameter name -> its diffusers name(s): one name, or the split parts in row
    order (``blocks.3.attn.qkv.weight`` -> ``[...to_q.weight, ...to_k.weight, ...to_v.weight]``).
    None for a name that is not an official LongCat-Video parameter."""
    m = _BLOCK.match(name)
    if m:
        i, module, leaf = m.groups()
        if module in DIFFUSERS_SPLITS:
            return [f"blocks.{i}.{p}.{leaf}" for p in DIFFUSERS_SPLITS[module]]
        if module in _OFF_TO_DIFF_BLOCK:
            return [f"blocks.{i}.{_OFF_TO_DIFF_BLOCK[module]}.{leaf}"]
        return None
    m = _TOP.match(name)
    if m and m.group(1) in _OFF_TO_DIFF_TOP:
        return [f"{_OFF_TO_DIFF_TOP[m.group(1)]}.{m.group(2)}"]
    return None


def diffusers_to_official(name: str) -> Optional[Tuple[str, int, int]]:
    """A diffusers parameter name -> ``(official name, part, parts)``: the fused official tensor
    it is row block ``part`` of ``parts`` of (``parts == 1`` for a one-to-one rename). None for a
    name that is not a FastVideo LongCat parameter."""
    m = _BLOCK.match(name)
    if m:
        i, module, leaf = m.groups()
        if module in _DIFF_PART:
            fused, part, parts = _DIFF_PART[module]
            return f"blocks.{i}.{fused}.{leaf}", part, parts
        if module in _DIFF_TO_OFF_BLOCK:
            return f"blocks.{i}.{_DIFF_TO_OFF_BLOCK[module]}.{leaf}", 0, 1
        return None
    m = _TOP.match(name)
    if m and m.group(1) in _DIFF_TO_OFF_TOP:
        return f"{_DIFF_TO_OFF_TOP[m.group(1)]}.{m.group(2)}", 0, 1
    return None
