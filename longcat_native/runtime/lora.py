"""LoRA for ``LongCatDiT``: the official LoRA files, merged or unmerged, switched exactly.

The official format (``longcat_video/modules/lora_utils.py``)
--------------------------------------------------------------
A safetensors file; per targeted ``nn.Linear`` of the official model, with its module name
encoded as ``"lora___lorahyphen___" + name.replace(".", "___lorahyphen___")``:

- ``<lora_name>.lora_down.weight`` ``[n * r, in]``;
- ``<lora_name>.lora_up.weight`` ``[out, r]`` (``n = 1``), or for a fused projection
  ``<lora_name>.lora_up.blocks.{i}.weight`` ``[out / n, r]``, ``i < n`` (``LoRAUPParallel``:
  the down output is chunked in n pieces of r, piece i feeds up block i, which writes output
  rows ``[i * out/n, (i+1) * out/n)``; the cfg_step LoRA uses n = 3 on ``attn.qkv`` and n = 2 on
  ``cross_attn.kv_linear``);
- ``<lora_name>.alpha_scale``: a scalar.

The official module adds ``up(down(x)) * multiplier * alpha_scale`` to the layer's output, with
``alpha_scale`` *as stored in the file* (the ``lora_network_alpha / lora_network_dim`` the
loader computes is only the buffer's initial value, overwritten by the strict
``load_state_dict``). ``lora_network_dim`` is the rank the official loader builds its modules
with, so a file of another rank fails there; here it is checked and reported the same way.
``lora_network_alpha`` has no effect (recorded only). LoRAs target only ``nn.Linear`` layers
(the official patch embedding is a Conv3d, so ``x_embedder.proj`` is not a target).

Official -> internal targets: ``ffn.w1`` / ``ffn.w3`` are the row halves ``[0, F)`` / ``[F, 2F)``
of our ``ffn.w13``; ``*.adaLN_modulation.1`` is our ``*.adaLN_modulation``; every other name is
the same. A file naming anything else, or with a wrong shape or rank, is rejected with one
``ValueError`` that names every bad key; nothing is changed then.

What is kept where
------------------
``dit.lora_dict[key]`` is a :class:`LoRA` (official attribute name): its tensors are kept on the
host exactly as the file stores them (dtype included; upcasting to float32 is exact, so this
loses nothing and halves the memory of a bf16 file), with ``alpha_scale`` as a Python float of
the file's float32 value. The model's weights are never touched by ``load_lora``.

Modes (``dit.lora_mode``; ``enable_loras`` applies the active set in the current mode)
-------------------------------------------------------------------------------------
- ``"merged"`` (default): per touched weight, ``W = cast(float32(W0) + sum_k scale_k * up_k @ down_k)``,
  the deltas summed in float32 on the model's device, cast to the model dtype once. A step costs
  nothing extra. ``W0`` always comes from the original weights, never from a merged one:
  switching A -> B restores what only A touched and recomputes what B touches from ``W0``.
- ``"unmerged"``: the low-rank branches run next to each layer (``linear()`` in model.py reads
  ``layer.__dict__["lora_branches"]``: tuples ``(down [r, in], up [rows, r], scale, first_row)``,
  one per up block, the blocks of a fused projection sharing views of one down tensor). The
  branch weights live on the model's device in the model's dtype (as the official
  ``enable_loras`` casts them); switching costs only that copy. After ``dit.to(...)``, call
  ``enable_loras`` again so the branches follow. With ``torch.compile``: compile after the first
  ``load_lora`` (which gives every Linear an empty branch list that compiled code guards on);
  a model compiled before any LoRA was loaded does not notice branches appearing
  (``torch._dynamo.reset()`` fixes that). Merged mode has no such caveat.

Exact restore and its memory cost
---------------------------------
Before a weight is first merged, an exact copy of it (its own dtype) goes to host memory;
``disable_all_loras`` and switches copy it back (bit-exact by construction). The copies are kept
after ``disable_all_loras`` so the next ``enable_loras`` needs no device-to-host copy; a copy is
trusted only while the parameter is the same storage with an unchanged version counter (any
in-place write, e.g. ``load_state_dict``, makes a fresh copy be taken). Cost: host memory equal
to the touched weights, for the official cfg_step target set about 12.9 B parameters of the
13.6 B model (~26 GB in bfloat16). :func:`release_base_copies` frees them (the next merge takes
them again); ``base_copy_bytes(dit)`` reports the current amount. Do not modify weights while
LoRAs are merged: restoring writes the copies back.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    "LORA_PREFIX", "LORA_HYPHEN", "LORA_MODES", "LoRA", "LoRAModuleWeights",
    "read_lora_file", "lora_from_state_dict", "official_lora_targets", "encode_lora_name",
    "load_lora", "enable_loras", "disable_all_loras", "set_lora_mode", "get_lora_mode",
    "active_loras", "release_base_copies", "base_copy_bytes",
]

LORA_PREFIX = "lora___lorahyphen___"
LORA_HYPHEN = "___lorahyphen___"
LORA_MODES = ("merged", "unmerged")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_KEY = re.compile(r"^(?P<stem>[^.]+)\."
                  r"(?P<kind>lora_down\.weight|lora_up\.weight|lora_up\.blocks\.(?P<blk>\d+)\.weight|alpha_scale)$")


def encode_lora_name(module_name: str) -> str:
    """Official module name -> the key stem of its LoRA tensors."""
    return LORA_PREFIX + module_name.replace(".", LORA_HYPHEN)


def _decode_lora_name(stem: str) -> str:
    # As the official loader: drop the prefix, hyphens back to dots.
    return stem.replace(LORA_PREFIX, "").replace(LORA_HYPHEN, ".")


# ---------------------------------------------------------------------------------------------
# What a LoRA holds
# ---------------------------------------------------------------------------------------------


@dataclass
class LoRAModuleWeights:
    """One targeted official Linear: its file tensors (host, file dtype) and where it lands."""

    lora_name: str  # key stem in the file (official attribute name)
    module_name: str  # official dotted name, e.g. "blocks.0.ffn.w3"
    internal_name: str  # our module, e.g. "blocks.0.ffn.w13"
    row_offset: int  # first row of the official module inside ours (F for ffn.w3, else 0)
    down: torch.Tensor  # [n * r, in]
    ups: List[torch.Tensor]  # n x [rows / n, r]
    alpha_scale: float  # the file's value (float32)
    multiplier: float = 1.0  # mirrors the owning LoRA's (official attribute)

    @property
    def rank(self) -> int:
        return self.ups[0].shape[1]

    def targets(self) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
        """``(first_row in the internal weight, down [r, in], up [rows, r])`` per up block."""
        r, row = self.rank, self.row_offset
        for i, up in enumerate(self.ups):
            yield row, self.down[i * r : (i + 1) * r], up
            row += up.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.down, *self.ups])


@dataclass
class LoRA:
    """A loaded LoRA file (``dit.lora_dict[key]``). ``loras`` (official name) lists its modules.

    The effective scale of module m is ``multiplier * m.alpha_scale``. Changing ``multiplier``
    (or :meth:`set_multiplier`) takes effect at the next ``enable_loras``.
    """

    key: str
    path: Optional[str]
    multiplier: float
    lora_network_dim: int
    lora_network_alpha: Optional[float]
    loras: List[LoRAModuleWeights] = field(default_factory=list)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = _check_multiplier(multiplier)
        for m in self.loras:
            m.multiplier = self.multiplier

    def to(self, *args, **kwargs) -> "LoRA":
        """Compatibility with code that moves official LoRA networks: the tensors stay on the
        host; ``enable_loras`` puts what it needs on the model's device."""
        return self

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.loras)

    def __repr__(self) -> str:
        return (f"LoRA(key={self.key!r}, path={self.path!r}, multiplier={self.multiplier}, "
                f"rank={self.lora_network_dim}, modules={len(self.loras)})")


def _check_multiplier(m) -> float:
    if isinstance(m, torch.Tensor) and m.numel() == 1:
        m = m.item()
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(float(m)):
        raise ValueError(f"multiplier must be a finite number, got {m!r}")
    return float(m)


# ---------------------------------------------------------------------------------------------
# Reading and checking a file
# ---------------------------------------------------------------------------------------------


def read_lora_file(path) -> Dict[str, torch.Tensor]:
    """All tensors of a LoRA safetensors file, on the host. Pickle files are refused."""
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"LoRA file {str(p)!r} does not exist")
    refuse = (f"LoRA file {str(p)!r} is a pickle file; longcat-native reads safetensors only (pickle files "
              "can run code when loaded). Convert it once with safetensors.torch.save_file.")
    if p.suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(refuse)
    from safetensors.torch import load_file

    try:  # parsing a safetensors file never runs code, whatever it holds
        return load_file(str(p), device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        with open(p, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise ValueError(refuse) from None  # a torch.save zip archive or a raw pickle stream
        raise ValueError(f"LoRA file {str(p)!r} is not a readable safetensors file ({e})") from e


def official_lora_targets(model: nn.Module) -> Dict[str, Tuple[str, int, int, int]]:
    """Every official Linear a LoRA may target: ``{official name: (internal module, first row,
    rows, in_features)}``. The official patch embedding is a Conv3d, not a target."""
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name == "x_embedder.proj":
            continue
        rows, fin = mod.out_features, mod.in_features
        if name.endswith(".ffn.w13"):
            half = rows // 2
            out[name[: -len("w13")] + "w1"] = (name, 0, half, fin)
            out[name[: -len("w13")] + "w3"] = (name, half, half, fin)
        elif name.endswith("adaLN_modulation"):
            out[name + ".1"] = (name, 0, rows, fin)
        else:
            out[name] = (name, 0, rows, fin)
    return out


def lora_from_state_dict(model: nn.Module, tensors: Dict[str, torch.Tensor], key, multiplier=1.0,
                         lora_network_dim: int = 128, lora_network_alpha=64, path=None) -> LoRA:
    """Check ``tensors`` (the official LoRA layout) against ``model`` and build a :class:`LoRA`.
    Raises one ValueError naming every bad key."""
    multiplier = _check_multiplier(multiplier)
    if isinstance(lora_network_dim, bool) or not isinstance(lora_network_dim, int) or lora_network_dim <= 0:
        raise ValueError(f"lora_network_dim must be a positive int (the LoRA rank), got {lora_network_dim!r}")
    targets = official_lora_targets(model)
    where = f"LoRA file {str(path)!r}" if path is not None else "LoRA state dict"

    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    problems: List[str] = []
    for k in sorted(tensors):
        m = _KEY.match(k)
        if m is None:
            problems.append(f"{k}: not a LoRA key (expected <lora_name>.lora_down.weight, .lora_up.weight, "
                            ".lora_up.blocks.<i>.weight or .alpha_scale)")
            continue
        groups.setdefault(m.group("stem"), {})[k[len(m.group("stem")) + 1 :]] = tensors[k]
    if not groups and not problems:
        problems.append("the file holds no LoRA tensors")

    modules: List[LoRAModuleWeights] = []
    for stem in sorted(groups):
        parts = groups[stem]
        keys = f"{stem}.{{{', '.join(sorted(parts))}}}" if len(parts) > 1 else f"{stem}.{next(iter(parts))}"
        bad = lambda msg, suffix=None: problems.append(  # noqa: E731
            f"{stem}.{suffix}: {msg}" if suffix else f"{keys}: {msg}")
        if not stem.startswith(LORA_PREFIX):
            bad(f"the module name does not start with the official prefix {LORA_PREFIX!r}")
            continue
        official = _decode_lora_name(stem)
        if official not in targets:
            hint = ("the official patch embedding is a Conv3d, not a LoRA target" if official.startswith("x_embedder")
                    else "targets are the official Linear layers, e.g. blocks.0.attn.qkv, blocks.0.ffn.w1, "
                         "blocks.0.adaLN_modulation.1, final_layer.linear")
            bad(f"module {official!r} is not a LoRA target of this model ({hint})")
            continue
        internal, row0, rows, fin = targets[official]
        ok = True
        for s, t in parts.items():
            if not t.is_floating_point():
                bad(f"dtype {t.dtype} is not floating point", s)
                ok = False
        down = parts.get("lora_down.weight")
        if down is None:
            bad("lora_down.weight is missing")
            ok = False
        if "alpha_scale" not in parts:
            bad("alpha_scale is missing (the official loader requires it)")
            ok = False
        elif parts["alpha_scale"].numel() != 1:
            bad(f"alpha_scale must be a scalar, got shape {list(parts['alpha_scale'].shape)}", "alpha_scale")
            ok = False
        blocks = sorted(int(s.split(".")[2]) for s in parts if s.startswith("lora_up.blocks."))
        if "lora_up.weight" in parts and blocks:
            bad("has both lora_up.weight and lora_up.blocks.<i>.weight")
            ok = False
        elif "lora_up.weight" not in parts and not blocks:
            bad("the up weight is missing (lora_up.weight or lora_up.blocks.<i>.weight)")
            ok = False
        elif blocks and blocks != list(range(len(blocks))):
            bad(f"up blocks must be numbered 0..n-1, got {blocks}")
            ok = False
        if not ok:
            continue
        ups_keys = ["lora_up.weight"] if not blocks else [f"lora_up.blocks.{i}.weight" for i in blocks]
        n, r = len(ups_keys), lora_network_dim
        if rows % n:
            bad(f"{official} has {rows} output rows, not divisible into {n} up blocks")
            continue
        file_rank = _consistent_rank(down, [parts[s] for s in ups_keys], n, rows, fin)
        if file_rank is not None and file_rank != r:
            bad(f"rank {file_rank} in the file but lora_network_dim={r} (the official loader builds rank-{r} "
                f"modules and rejects this file); pass lora_network_dim={file_rank}")
            continue
        want_down = (n * r, fin)
        if tuple(down.shape) != want_down:
            bad(f"shape {list(down.shape)}, expected {list(want_down)} for {official} "
                f"(in_features {fin}, rank {r}, {n} up block{'s' if n > 1 else ''})", "lora_down.weight")
            ok = False
        for s in ups_keys:
            want_up = (rows // n, r)
            if tuple(parts[s].shape) != want_up:
                bad(f"shape {list(parts[s].shape)}, expected {list(want_up)} for {official} "
                    f"({rows} output rows in {n} block{'s' if n > 1 else ''}, rank {r})", s)
                ok = False
        if not ok:
            continue
        modules.append(LoRAModuleWeights(
            lora_name=stem, module_name=official, internal_name=internal, row_offset=row0,
            down=parts["lora_down.weight"], ups=[parts[s] for s in ups_keys],
            alpha_scale=float(parts["alpha_scale"].detach().float().reshape(())), multiplier=multiplier,
        ))
    if problems:
        raise ValueError(f"{where} (key {key!r}) does not fit this model; {len(problems)} problem(s):\n  "
                         + "\n  ".join(problems))
    alpha = None if lora_network_alpha is None else float(lora_network_alpha)
    return LoRA(key=key, path=None if path is None else str(path), multiplier=multiplier,
                lora_network_dim=lora_network_dim, lora_network_alpha=alpha, loras=modules)


def _consistent_rank(down, ups, n, rows, fin) -> Optional[int]:
    """The file's rank when every shape fits the target except for the rank, else None."""
    if down.dim() != 2 or any(u.dim() != 2 for u in ups) or down.shape[0] % n:
        return None
    r = down.shape[0] // n
    ok = down.shape[1] == fin and all(tuple(u.shape) == (rows // n, r) for u in ups)
    return r if ok else None


# ---------------------------------------------------------------------------------------------
# Per-model state
# ---------------------------------------------------------------------------------------------


@dataclass
class _BaseCopy:
    host: torch.Tensor  # exact copy of the original weight
    ptr: int  # the parameter's storage when the copy was known to match it
    version: int
    dtype: torch.dtype
    shape: Tuple[int, ...]

    def matches(self, p: torch.Tensor) -> bool:
        return (p.data_ptr() == self.ptr and p._version == self.version and p.dtype == self.dtype
                and tuple(p.shape) == self.shape)


class _LoRAState:
    def __init__(self):
        self.mode = "merged"
        self.active: List[str] = []
        self.merged: set = set()  # parameter names currently holding merged values
        self.branch_modules: List[nn.Module] = []  # layers carrying unmerged branches
        self.base: Dict[str, _BaseCopy] = {}


def _state(dit) -> _LoRAState:
    st = dit.__dict__.get("_lora_state")
    if st is None:
        st = dit.__dict__["_lora_state"] = _LoRAState()
    if getattr(dit, "lora_dict", None) is None:
        dit.lora_dict = {}
    return st


def get_lora_mode(dit) -> str:
    return _state(dit).mode


def active_loras(dit) -> List[str]:
    return list(_state(dit).active)


def base_copy_bytes(dit) -> int:
    return sum(c.host.numel() * c.host.element_size() for c in _state(dit).base.values())


def release_base_copies(dit) -> None:
    """Free the host copies of weights that are not merged right now."""
    st = _state(dit)
    for name in list(st.base):
        if name not in st.merged:
            del st.base[name]


# ---------------------------------------------------------------------------------------------
# Public operations
# ---------------------------------------------------------------------------------------------


def load_lora(dit, lora_path=None, lora_key=None, multiplier=1.0, lora_network_dim=128, lora_network_alpha=64,
              *, path=None, key=None) -> LoRA:
    """Read and check a LoRA file, keep it as ``dit.lora_dict[key]``. Nothing is applied.

    Loading a key that exists replaces it (as the official loader does); if that key is active,
    the active set is applied again with the new weights, so the model always reflects
    ``lora_dict``. ``path``/``key`` are accepted as aliases of ``lora_path``/``lora_key``.
    """
    lora_path = _alias(lora_path, path, "lora_path", "path")
    lora_key = _alias(lora_key, key, "lora_key", "key")
    if lora_path is None or lora_key is None:
        raise TypeError("load_lora() needs a file path and a key")
    try:
        hash(lora_key)
    except TypeError:
        raise ValueError(f"lora_key must be hashable (a string), got {lora_key!r}") from None
    st = _state(dit)
    _ensure_branch_slots(dit)
    lora = lora_from_state_dict(dit, read_lora_file(lora_path), lora_key, multiplier, lora_network_dim,
                                lora_network_alpha, path=lora_path)
    dit.lora_dict[lora_key] = lora
    if lora_key in st.active:
        enable_loras(dit, list(st.active))
    return lora


def enable_loras(dit, lora_key_list: Sequence = ()) -> None:
    """Make exactly ``lora_key_list`` active (replacing the active set), in ``dit.lora_mode``."""
    if isinstance(lora_key_list, str):
        lora_key_list = [lora_key_list]
    keys = list(lora_key_list)
    st = _state(dit)
    unknown = [k for k in keys if k not in dit.lora_dict]
    if unknown:
        raise ValueError(f"enable_loras: unknown LoRA key(s) {unknown}; loaded: {sorted(map(str, dit.lora_dict))} "
                         "(load them first with load_lora(path, key))")
    dups = sorted({str(k) for k in keys if keys.count(k) > 1})
    if dups:
        raise ValueError(f"enable_loras: key(s) {dups} given more than once")
    loras = [dit.lora_dict[k] for k in keys]
    _ensure_branch_slots(dit)
    try:
        with torch.no_grad():
            _remove_branches(st)
            if st.mode == "merged":
                _merge(dit, st, loras)
            else:
                _restore_all(dit, st)
                _add_branches(dit, st, loras)
    except BaseException:
        # Leave the model clean (base weights, no branches) rather than half-switched.
        with torch.no_grad():
            _remove_branches(st)
            _restore_all(dit, st)
        st.active = []
        raise
    st.active = keys


def disable_all_loras(dit) -> None:
    """Back to the base model: merged weights restored bit-exactly, branches removed."""
    st = _state(dit)
    with torch.no_grad():
        _remove_branches(st)
        _restore_all(dit, st)
    st.active = []


def set_lora_mode(dit, mode: str) -> None:
    """"merged" or "unmerged"; an active set is re-applied in the new mode."""
    if mode not in LORA_MODES:
        raise ValueError(f"lora_mode must be one of {LORA_MODES}, got {mode!r}")
    st = _state(dit)
    if mode == st.mode:
        return
    st.mode = mode
    if st.active:
        enable_loras(dit, list(st.active))


def _alias(ours, theirs, our_name, their_name):
    if theirs is None:
        return ours
    if ours is not None and ours != theirs:
        raise ValueError(f"{our_name}={ours!r} and {their_name}={theirs!r} disagree; pass one of them")
    return theirs


# ---------------------------------------------------------------------------------------------
# Merged mode
# ---------------------------------------------------------------------------------------------


def _params(dit) -> Dict[str, nn.Parameter]:
    return dict(dit.named_parameters())


def _ensure_base_copy(st: _LoRAState, name: str, p: torch.Tensor) -> None:
    """Before ``p`` (holding its original values) is first overwritten: an exact host copy."""
    c = st.base.get(name)
    if c is not None and c.matches(p):
        return
    host = torch.empty(p.shape, dtype=p.dtype, device="cpu")
    host.copy_(p.detach())
    st.base[name] = _BaseCopy(host, p.data_ptr(), p._version, p.dtype, tuple(p.shape))


def _restore(st: _LoRAState, name: str, p: torch.Tensor) -> None:
    c = st.base[name]
    p.copy_(c.host)
    c.ptr, c.version = p.data_ptr(), p._version
    st.merged.discard(name)


def _restore_all(dit, st: _LoRAState) -> None:
    if not st.merged:
        return
    params = _params(dit)
    for name in sorted(st.merged):
        _restore(st, name, params[name])


def _float32_copy(t: torch.Tensor, device) -> torch.Tensor:
    """A new float32 tensor on ``device`` with ``t``'s values (moved in t's dtype, upcast there)."""
    moved = t.to(device=device)
    return moved.to(torch.float32, copy=moved is t)


def _merge(dit, st: _LoRAState, loras: List[LoRA]) -> None:
    params = _params(dit)
    plan: Dict[str, List[Tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
    for lora in loras:
        for m in lora.loras:
            scale = lora.multiplier * m.alpha_scale
            for row0, down, up in m.targets():
                plan.setdefault(m.internal_name + ".weight", []).append((row0, down, up, scale))
    # Weights merged before that the new set does not touch: back to the original.
    for name in sorted(st.merged - plan.keys()):
        _restore(st, name, params[name])
    for name, items in plan.items():
        p = params[name]
        if name in st.merged:  # holds A's merge: start from the original copy
            w = _float32_copy(st.base[name].host, p.device)
        else:
            _ensure_base_copy(st, name, p)
            w = p.detach().to(dtype=torch.float32, copy=True)
        delta = torch.zeros_like(w)
        for row0, down, up, scale in items:
            d = down.to(device=p.device).to(torch.float32)
            u = up.to(device=p.device).to(torch.float32)
            delta[row0 : row0 + u.shape[0]].addmm_(u, d, alpha=scale)
        w += delta
        del delta
        st.merged.add(name)  # before the write: if it fails half-way, restore still covers it
        p.copy_(w)  # the one cast to the model dtype
        del w


# ---------------------------------------------------------------------------------------------
# Unmerged mode
# ---------------------------------------------------------------------------------------------


def _add_branches(dit, st: _LoRAState, loras: List[LoRA]) -> None:
    modules = dict(dit.named_modules())
    device, dtype = dit.device, dit.dtype
    for lora in loras:
        for m in lora.loras:
            layer = modules[m.internal_name]
            scale = lora.multiplier * m.alpha_scale
            down_all = m.down.to(device=device, dtype=dtype)
            r = m.rank
            branches = layer.__dict__.setdefault("lora_branches", [])
            if not any(layer is x for x in st.branch_modules):
                st.branch_modules.append(layer)
            row = m.row_offset
            for i, up in enumerate(m.ups):
                branches.append((down_all[i * r : (i + 1) * r], up.to(device=device, dtype=dtype), scale, row))
                row += up.shape[0]


def _remove_branches(st: _LoRAState) -> None:
    for layer in st.branch_modules:
        layer.__dict__["lora_branches"] = []  # an empty slot, not a missing one (see _ensure_branch_slots)
    st.branch_modules = []


def _ensure_branch_slots(dit) -> None:
    """Give every Linear an empty ``lora_branches`` list. torch.compile guards on the value of a
    ``__dict__`` entry that exists, but not on the absence of one: a model compiled while the
    entry is missing keeps running its LoRA-free graph after branches appear. With the slot in
    place from the first ``load_lora`` on, adding branches triggers a recompile."""
    for m in dit.modules():
        if isinstance(m, nn.Linear):
            m.__dict__.setdefault("lora_branches", [])
