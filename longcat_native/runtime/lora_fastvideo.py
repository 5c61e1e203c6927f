"""FastVideo's LoRA file format for LongCat-Video, read onto the official LoRA targets.

FastVideo (``FastVideo/LongCat-Video-T2V-Distilled-LoRA``, ``-Refinement-LoRA``, written by its
``scripts/checkpoint_conversion/longcat_to_fastvideo.py``) stores per FastVideo ``Linear``
``<module>.lora_A`` ``[r, in]``, ``<module>.lora_B`` ``[out, r]`` and ``<module>.lora_alpha`` (a
scalar), with the module paths of its Diffusers-style DiT (``blocks.N.self_attn.to_q``, ...;
runtime/layouts.py). Its runtime (``fastvideo/pipelines/lora_pipeline.py``,
``fastvideo/layers/lora/linear.py``) merges ``W += strength * scale * B @ A`` per layer, with
``scale = int(alpha) / r`` (``r = A.shape[0]``; 1 where ``int(alpha)`` is 0 or no alpha is
stored). The convention, its sources and where it differs from the official math:
docs/design/checkpoints.md ("LoRA files").

Names and checks only: runtime/lora.py builds its modules from what :func:`read_fastvideo_lora`
returns (so this module imports nothing of it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .layouts import diffusers_to_official

__all__ = ["FASTVIDEO_KEY", "is_fastvideo_key", "fastvideo_scale", "FastVideoModule", "read_fastvideo_lora"]

# FastVideo's loader drops a "diffusion_model." prefix and every ".weight" before matching names,
# so "x.lora_A", "x.lora_A.weight" and "diffusion_model.x.lora_A" are the same key to it.
FASTVIDEO_KEY = re.compile(r"^(?:diffusion_model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_alpha)(?:\.weight)?$")


def is_fastvideo_key(key: str) -> bool:
    return FASTVIDEO_KEY.match(key) is not None


def fastvideo_scale(alpha: Optional[float], rank: int) -> float:
    """The factor FastVideo's merge applies to ``B @ A`` (before the adapter strength):
    ``set_lora_weights`` keeps ``int(alpha)`` (``rank`` when the file has no alpha) and
    ``merge_lora_weights`` scales by ``alpha / rank``, or by 1 when that ``int`` is 0."""
    a = rank if alpha is None else int(alpha)
    return a / rank if a and rank else 1.0


@dataclass
class FastVideoModule:
    """One official LoRA target module built from FastVideo layers (see runtime/lora.py's
    LoRAModuleWeights, which is made from it)."""

    lora_name: str  # the FastVideo module path, or the official name its q/k/v were assembled into
    module_name: str  # official module name (a fused one for a q/k/v part)
    internal_name: str
    row_offset: int
    down: torch.Tensor  # [n * r, in]
    ups: List[torch.Tensor]  # n x [rows / n, r]
    alpha_scale: float  # FastVideo's scale (fastvideo_scale)


@dataclass
class _Layer:
    fv_name: str
    official: str  # official module the layer is (part of)
    part: int
    parts: int
    A: torch.Tensor
    B: torch.Tensor
    scale: float


def _tensor_problem(t) -> Optional[str]:
    if not isinstance(t, torch.Tensor):
        return f"not a tensor ({type(t).__name__})"
    if not t.is_floating_point():
        return f"dtype {t.dtype} is not floating point"
    if t.is_meta:
        return "is on the meta device (no data)"
    if not bool(torch.isfinite(t).all()):
        return "holds NaN or Inf values"
    return None


def read_fastvideo_lora(tensors: Mapping[str, torch.Tensor], targets: Dict[str, Tuple[str, int, int, int]],
                        problems: List[str]) -> List[FastVideoModule]:
    """Check a FastVideo-format LoRA state dict against the model's official targets
    (``official_lora_targets``) and map it onto them. Every problem is appended to ``problems``
    naming its key; the result is complete only when none were added.

    The self-attention ``to_q``/``to_k``/``to_v`` (cross-attention ``to_k``/``to_v``) of one block
    are assembled into one module of the fused official ``attn.qkv`` (``cross_attn.kv_linear``)
    with parallel up blocks when all parts are there with one rank and one scale (exactly the
    official structure FastVideo's converter split them from); otherwise each part is its own
    module over its rows. The math is FastVideo's either way: each layer's own A, B and scale."""
    groups: Dict[str, Dict[str, Tuple[str, torch.Tensor]]] = {}
    for k in sorted(tensors):
        m = FASTVIDEO_KEY.match(k)
        if m is None:
            problems.append(f"{k}: not a FastVideo LoRA key (expected <module>.lora_A, .lora_B or .lora_alpha, "
                            "optionally with a .weight suffix or a diffusion_model. prefix)")
            continue
        g = groups.setdefault(m.group("module"), {})
        if m.group("kind") in g:
            problems.append(f"{k}: the same tensor as {g[m.group('kind')][0]} (FastVideo's loader drops "
                            "'diffusion_model.' and '.weight'); keep one")
            continue
        g[m.group("kind")] = (k, tensors[k])

    layers: List[_Layer] = []
    for module in sorted(groups):
        parts = groups[module]
        named = ", ".join(key for key, _ in parts.values())
        where = diffusers_to_official(module + ".weight")
        if where is None or where[0][: -len(".weight")] not in targets:
            hint = ("the patch embedding is a Conv3d, not a LoRA target" if module.startswith("patch_embed")
                    else "FastVideo's LongCat LoRA targets are e.g. blocks.0.self_attn.to_q, blocks.0.cross_attn.to_k, "
                         "blocks.0.ffn.w1, blocks.0.adaln_linear_1, final_layer.proj, time_embedder.linear_1")
            problems.append(f"{named}: module {module!r} is not a LoRA target of this model ({hint})")
            continue
        official, part, nparts = where[0][: -len(".weight")], where[1], where[2]
        ok = True
        for kind, (key, t) in parts.items():
            p = _tensor_problem(t)
            if p:
                problems.append(f"{key}: {p}")
                ok = False
        for kind in ("lora_A", "lora_B"):
            if kind not in parts:
                problems.append(f"{named}: {module}.{kind} is missing (FastVideo applies a layer only with both "
                                "lora_A and lora_B)")
                ok = False
        alpha = None
        if "lora_alpha" in parts:
            key, t = parts["lora_alpha"]
            if isinstance(t, torch.Tensor) and t.numel() != 1:
                problems.append(f"{key}: lora_alpha must be a scalar, got shape {list(t.shape)}")
                ok = False
            elif ok:
                alpha = float(t.detach().float().reshape(()))
        if not ok:
            continue
        (ka, A), (kb, B) = parts["lora_A"], parts["lora_B"]
        _, _, rows, fin = targets[official]
        rows //= nparts
        if A.dim() != 2 or B.dim() != 2:
            problems.append(f"{ka if A.dim() != 2 else kb}: must be a matrix, got shape "
                            f"{list((A if A.dim() != 2 else B).shape)}")
            continue
        if A.shape[0] != B.shape[1]:
            hint = (f"; FastVideo's converter writes this for an official fused {official.split('.', 2)[-1]} LoRA with "
                    f"one lora_up (it splits lora_down in {nparts} row pieces but each lora_B keeps the full rank), "
                    "which FastVideo's own merge cannot multiply either; load the official file instead"
                    if nparts > 1 and B.shape[1] // nparts == A.shape[0] else "")
            problems.append(f"{ka}, {kb}: rank mismatch, lora_A {list(A.shape)} has {A.shape[0]} rows but lora_B "
                            f"{list(B.shape)} has {B.shape[1]} columns{hint}")
            continue
        if A.shape[0] == 0:
            problems.append(f"{ka}, {kb}: rank 0 (lora_A {list(A.shape)}, lora_B {list(B.shape)})")
            continue
        bad = False
        if A.shape[1] != fin:
            problems.append(f"{ka}: shape {list(A.shape)}, expected [rank, {fin}] for {module} (in_features {fin})")
            bad = True
        if B.shape[0] != rows:
            problems.append(f"{kb}: shape {list(B.shape)}, expected [{rows}, rank] for {module} ({rows} output rows)")
            bad = True
        if bad:
            continue
        layers.append(_Layer(module, official, part, nparts, A, B, fastvideo_scale(alpha, A.shape[0])))
    return _assemble(layers, targets)


def _assemble(layers: List[_Layer], targets) -> List[FastVideoModule]:
    out: List[FastVideoModule] = []
    fused: Dict[str, List[_Layer]] = {}
    for L in layers:
        if L.parts > 1:
            fused.setdefault(L.official, []).append(L)
        else:
            internal, row0, _, _ = targets[L.official]
            out.append(FastVideoModule(L.fv_name, L.official, internal, row0, L.A, [L.B], L.scale))
    for official, ls in sorted(fused.items()):
        ls.sort(key=lambda L: L.part)
        internal, row0, rows, _ = targets[official]
        n = ls[0].parts
        same = (len(ls) == n and len({L.A.shape[0] for L in ls}) == 1 and len({L.scale for L in ls}) == 1
                and len({L.A.dtype for L in ls}) == 1 and len({L.B.dtype for L in ls}) == 1)
        if same:
            # The official structure: one down [n * r, in], piece i feeding up block i.
            out.append(FastVideoModule(_official_stem(official), official, internal, row0,
                                       torch.cat([L.A for L in ls], 0), [L.B for L in ls], ls[0].scale))
        else:
            for L in ls:
                out.append(FastVideoModule(L.fv_name, official, internal, row0 + L.part * (rows // n), L.A, [L.B],
                                           L.scale))
    return out


def _official_stem(official: str) -> str:
    # runtime/lora.py's encode_lora_name, repeated here (this module sits below lora.py)
    return "lora___lorahyphen___" + official.replace(".", "___lorahyphen___")

