"""LoRA for ``LongCatDiT``: the official LoRA files (and FastVideo's, runtime/lora_fastvideo.py),
merged or unmerged, switched exactly.

Design notes (the official format, the modes, exact restore and its memory cost):
docs/design/lora.md; FastVideo's format: docs/design/checkpoints.md ("LoRA files").
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import sharding
from .lora_fastvideo import is_fastvideo_key, read_fastvideo_lora
from .names import merge_alias

__all__ = [
    "LORA_PREFIX", "LORA_HYPHEN", "LORA_MODES", "LORA_FORMATS", "LoRA", "LoRAModuleWeights", "LoRAState",
    "detect_lora_format",
    "read_lora_file", "lora_from_state_dict", "official_lora_targets", "encode_lora_name",
    "load_lora", "enable_loras", "disable_all_loras", "set_lora_mode", "release_base_copies", "base_copy_bytes",
]

LORA_PREFIX = "lora___lorahyphen___"
LORA_HYPHEN = "___lorahyphen___"
LORA_MODES = ("merged", "unmerged")
LORA_FORMATS = ("official", "fastvideo")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_PROBLEMS = 20  # a LoRA error lists this many problems, then counts the rest
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

    lora_name: str  # key stem in the file (official attribute name); FastVideo: see FastVideoModule
    module_name: str  # official dotted name, e.g. "blocks.0.ffn.w3" (a fused one for a FastVideo q/k/v part)
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
    (or :meth:`set_multiplier`) takes effect at the next ``enable_loras``. ``format`` is the
    file's ("official" or "fastvideo"; for the latter ``alpha_scale`` is FastVideo's
    ``int(lora_alpha) / rank`` and ``lora_network_dim`` the largest rank in the file).
    """

    key: str
    path: Optional[str]
    multiplier: float
    lora_network_dim: int
    lora_network_alpha: Optional[float]
    loras: List[LoRAModuleWeights] = field(default_factory=list)
    format: str = "official"

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
                f"rank={self.lora_network_dim}, modules={len(self.loras)}, format={self.format!r})")


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
    """Check ``tensors`` (an official or a FastVideo LoRA state dict, told apart by its keys:
    :func:`detect_lora_format`) against ``model`` and build a :class:`LoRA`. Raises one
    ValueError naming every bad key. ``lora_network_dim`` is checked against an official file's
    rank (as the official loader does); a FastVideo file carries its ranks and alphas per layer
    (FastVideo's loader takes no rank), so there both arguments are only recorded."""
    multiplier = _check_multiplier(multiplier)
    if isinstance(lora_network_dim, bool) or not isinstance(lora_network_dim, int) or lora_network_dim <= 0:
        raise ValueError(f"lora_network_dim must be a positive int (the LoRA rank), got {lora_network_dim!r}")
    if lora_network_alpha is not None:
        if (isinstance(lora_network_alpha, (bool, str)) or not isinstance(lora_network_alpha, (int, float))
                or not math.isfinite(float(lora_network_alpha))):
            raise ValueError(f"lora_network_alpha must be a finite number or None, got {lora_network_alpha!r}")
    if not isinstance(tensors, Mapping):
        raise ValueError(f"LoRA tensors must be a mapping {{name: tensor}}, got {type(tensors).__name__}")
    bad_names = [repr(k) for k in tensors if not isinstance(k, str)]
    if bad_names:
        raise ValueError(f"LoRA tensor names must be strings, got {', '.join(bad_names[:_MAX_PROBLEMS])}")
    targets = official_lora_targets(model)
    where = f"LoRA file {str(path)!r}" if path is not None else "LoRA state dict"
    fmt = detect_lora_format(tensors, where)
    alpha = None if lora_network_alpha is None else float(lora_network_alpha)
    problems: List[str] = []
    if fmt == "fastvideo":
        fv = read_fastvideo_lora(tensors, targets, problems)
        _raise_problems(problems, where, key)
        modules = [LoRAModuleWeights(lora_name=m.lora_name, module_name=m.module_name, internal_name=m.internal_name,
                                     row_offset=m.row_offset, down=m.down, ups=m.ups, alpha_scale=m.alpha_scale,
                                     multiplier=multiplier) for m in fv]
        return LoRA(key=key, path=None if path is None else str(path), multiplier=multiplier,
                    lora_network_dim=max(m.rank for m in modules), lora_network_alpha=alpha, loras=modules,
                    format="fastvideo")

    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    for k in sorted(tensors):
        m = _KEY.match(k)
        if m is None:
            problems.append(f"{k}: not a LoRA key (expected the official <lora_name>.lora_down.weight, "
                            ".lora_up.weight, .lora_up.blocks.<i>.weight, .alpha_scale, or FastVideo's "
                            "<module>.lora_A, .lora_B, .lora_alpha)")
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
            if not isinstance(t, torch.Tensor):
                bad(f"not a tensor ({type(t).__name__})", s)
                ok = False
            elif not t.is_floating_point():
                bad(f"dtype {t.dtype} is not floating point", s)
                ok = False
            elif t.is_meta:
                bad("is on the meta device (no data)", s)
                ok = False
            elif not bool(torch.isfinite(t).all()):
                bad("holds NaN or Inf values", s)
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
    _raise_problems(problems, where, key)
    return LoRA(key=key, path=None if path is None else str(path), multiplier=multiplier,
                lora_network_dim=lora_network_dim, lora_network_alpha=alpha, loras=modules)


def _raise_problems(problems: List[str], where: str, key) -> None:
    if problems:
        shown = problems[:_MAX_PROBLEMS] + ([f"... and {len(problems) - _MAX_PROBLEMS} more"]
                                            if len(problems) > _MAX_PROBLEMS else [])
        raise ValueError(f"{where} (key {key!r}) does not fit this model; {len(problems)} problem(s):\n  "
                         + "\n  ".join(shown))


def detect_lora_format(tensors: Mapping[str, torch.Tensor], where: str = "LoRA state dict") -> str:
    """"official" or "fastvideo", from the keys (an official key never matches FastVideo's
    pattern nor the reverse). A file holding keys of both is refused, naming one of each; a file
    with neither is read as official (whose checks name every key)."""
    official = [k for k in tensors if _KEY.match(k)]
    fastvideo = [k for k in tensors if is_fastvideo_key(k)]
    if official and fastvideo:
        raise ValueError(f"{where} mixes two LoRA formats: {len(official)} official key(s) "
                         f"(e.g. {sorted(official)[0]!r}) and {len(fastvideo)} FastVideo key(s) "
                         f"(e.g. {sorted(fastvideo)[0]!r}); a LoRA file holds one format (load each part "
                         "as its own LoRA key)")
    return "fastvideo" if fastvideo else "official"


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


class LoRAState:
    """The LoRA state a ``LongCatDiT`` owns (``dit.lora_state``): the mode, the active keys, the
    parameters holding merged values, the layers carrying unmerged branches, and the exact host
    copies merged weights are restored from. The loaded files are ``dit.lora_dict`` (official)."""

    def __init__(self):
        self.mode = "merged"
        self.active: List[str] = []
        self.scales: List[float] = []  # each active LoRA's multiplier when applied (a later change waits for enable)
        self.merged: set = set()  # parameter names currently holding merged values
        self.branch_modules: List[nn.Module] = []  # layers carrying unmerged branches
        self.base: Dict[str, _BaseCopy] = {}


def _state(dit) -> LoRAState:
    st = getattr(dit, "lora_state", None)
    if not isinstance(st, LoRAState):
        raise TypeError(f"LoRA needs a LongCatDiT (which owns a lora_state), got {type(dit).__name__}")
    return st


def base_copy_bytes(dit) -> int:
    """Host memory held by the exact copies of weights LoRAs were merged into."""
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
    """Read and check a LoRA file (official or FastVideo format, told apart by its keys), keep it
    as ``dit.lora_dict[key]``. Nothing is applied.

    Loading a key that exists replaces it (as the official loader does); if that key is active,
    the active set is applied again with the new weights, so the model always reflects
    ``lora_dict``. ``path``/``key`` are accepted as aliases of ``lora_path``/``lora_key``.
    """
    lora_path = merge_alias(lora_path, path, "lora_path", "path")
    lora_key = merge_alias(lora_key, key, "lora_key", "key")
    if lora_path is None or lora_key is None:
        raise TypeError("load_lora() needs a file path and a key")
    try:
        hash(lora_key)
    except TypeError:
        raise ValueError(f"lora_key must be hashable (a string), got {lora_key!r}") from None
    st = _state(dit)
    lora = lora_from_state_dict(dit, read_lora_file(lora_path), lora_key, multiplier, lora_network_dim,
                                lora_network_alpha, path=lora_path)
    dit.lora_dict[lora_key] = lora
    _draw_as_official_init(lora)
    if lora_key in st.active:
        enable_loras(dit, list(st.active))
    return lora


def _draw_as_official_init(lora: LoRA) -> None:
    """Advance torch's global CPU RNG as the official ``load_lora`` does: it builds each module's
    ``lora_down`` / ``lora_up`` as ``nn.Linear`` (initialized) and re-initializes ``lora_down``
    (``kaiming_uniform_``) before loading the file over them, one float32 uniform (one 32-bit
    draw) per element: 2 x down + up elements per module. The official refinement then takes its
    stage-1 posterior and ``t_thresh`` noise from that RNG, so with ``torch.manual_seed`` before
    a LoRA load (the demos load the refinement LoRA just before refining) only the same draws
    give the official video. Drawn as float64 (two 32-bit draws each: the same stream, half the
    time: 2.9 s per 1e9 draws on 2 CPU cores; the official rank-128 refinement LoRA is ~0.85e9).

    A FastVideo file draws what the official load of the file it was converted from draws (its
    q/k/v are re-assembled into that file's modules), so a seeded official-style refinement gives
    the same video with either copy of a LoRA. FastVideo's own loader draws nothing, but its
    refinement is its own flow (its noise order and seeding differ from the official demo's),
    which this runtime does not reproduce, so no draws would match nothing. (A one-target module
    with several up blocks, which FastVideo stores as one block-diagonal lora_B, counts its zeros
    too: no published LoRA has one.)"""
    n = sum(2 * m.down.numel() + sum(u.numel() for u in m.ups) for m in lora.loras)
    pairs, chunk = n // 2, 1 << 22
    buf = torch.empty(min(pairs, chunk), dtype=torch.float64)
    while pairs > 0:
        k = min(pairs, chunk)
        buf[:k].uniform_()
        pairs -= k
    if n % 2:
        torch.empty(1).uniform_()


def enable_loras(dit, lora_key_list: Sequence = ()) -> None:
    """Make exactly ``lora_key_list`` active (replacing the active set), in ``dit.lora_mode``."""
    if isinstance(lora_key_list, str):
        lora_key_list = [lora_key_list]
    if lora_key_list is None or not hasattr(lora_key_list, "__iter__"):
        raise ValueError(f"enable_loras takes a list of loaded LoRA keys (e.g. ['cfg_step_lora']), got "
                         f"{lora_key_list!r}; disable_all_loras() (or enable_loras([])) turns every LoRA off")
    keys = list(lora_key_list)
    try:
        for k in keys:
            hash(k)
    except TypeError:
        raise ValueError(f"enable_loras: LoRA keys must be hashable (strings), got {keys!r}") from None
    st = _state(dit)
    unknown = [k for k in keys if k not in dit.lora_dict]
    if unknown:
        raise ValueError(f"enable_loras: unknown LoRA key(s) {unknown}; loaded: {sorted(map(str, dit.lora_dict))} "
                         "(load them first with load_lora(path, key))")
    dups = sorted({str(k) for k in keys if keys.count(k) > 1})
    if dups:
        raise ValueError(f"enable_loras: key(s) {dups} given more than once")
    loras = [dit.lora_dict[k] for k in keys]
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
        st.active, st.scales = [], []
        raise
    st.active, st.scales = keys, [lo.multiplier for lo in loras]


def disable_all_loras(dit) -> None:
    """Back to the base model: merged weights restored bit-exactly, branches removed."""
    st = _state(dit)
    with torch.no_grad():
        _remove_branches(st)
        _restore_all(dit, st)
    st.active, st.scales = [], []


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


# ---------------------------------------------------------------------------------------------
# Merged mode
# ---------------------------------------------------------------------------------------------


def _params(dit) -> Dict[str, nn.Parameter]:
    """Parameters, and the ``weight_scale`` buffers of quantized layers (runtime/quantize.py): a
    merge into a quantized weight rewrites its scales too, so they get exact copies as well."""
    params = dict(dit.named_parameters())
    params.update((n, b) for n, b in dit.named_buffers() if n.endswith(".weight_scale"))
    # Under shard_weights (runtime/sharding.py) a block parameter is this rank's rows: merge and
    # restore work on them (sharding.row_offsets places the deltas), every rank on its own.
    return {n: sharding.local_shard(p)[0] for n, p in params.items()}


def _ensure_base_copy(st: LoRAState, name: str, p: torch.Tensor) -> None:
    """Before ``p`` (holding its original values) is first overwritten: an exact host copy."""
    c = st.base.get(name)
    if c is not None and c.matches(p):
        return
    host = torch.empty(p.shape, dtype=p.dtype, device="cpu")
    host.copy_(p.detach())
    st.base[name] = _BaseCopy(host, p.data_ptr(), p._version, p.dtype, tuple(p.shape))


def _restore(st: LoRAState, name: str, p: torch.Tensor) -> None:
    c = st.base[name]
    p.copy_(c.host)
    c.ptr, c.version = p.data_ptr(), p._version
    st.merged.discard(name)


def _restore_all(dit, st: LoRAState) -> None:
    if not st.merged:
        return
    params = _params(dit)
    for name in sorted(st.merged):
        _restore(st, name, params[name])


def _float32_copy(t: torch.Tensor, device) -> torch.Tensor:
    """A new float32 tensor on ``device`` with ``t``'s values (moved in t's dtype, upcast there)."""
    moved = t.to(device=device)
    return moved.to(torch.float32, copy=moved is t)


def _merge(dit, st: LoRAState, loras: List[LoRA]) -> None:
    params = _params(dit)
    offsets = sharding.row_offsets(dit)  # {name: this rank's first row} under shard_weights, else {}
    plan: Dict[str, List[Tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
    for lora in loras:
        for m in lora.loras:
            scale = lora.multiplier * m.alpha_scale
            for row0, down, up in m.targets():
                plan.setdefault(m.internal_name + ".weight", []).append((row0, down, up, scale))
    # Weights merged before that the new set does not touch: back to the original.
    touched = set(plan) | {n[: -len("weight")] + "weight_scale" for n in plan}
    for name in sorted(st.merged - touched):
        _restore(st, name, params[name])
    for name, items in plan.items():
        p = params[name]
        # A quantized weight (runtime/quantize.py): dequantize, add the deltas in float32,
        # requantize per row (new scales); the exact copies cover the stored values and scales.
        sname = name[: -len("weight")] + "weight_scale"
        wscale = params.get(sname)
        first = offsets.get(name, 0)  # global index of p's first row (this rank's rows, if sharded)
        mine = slice(first, first + p.shape[0])  # p's rows of the (replicated, whole) scales
        if wscale is not None:
            from .quantize import dequantize

            if name in st.merged:
                w = dequantize(st.base[name].host.to(p.device), st.base[sname].host[mine].to(p.device))
            else:
                _ensure_base_copy(st, name, p)
                _ensure_base_copy(st, sname, wscale)
                w = dequantize(p.detach(), wscale.detach()[mine])
        elif name in st.merged:  # holds A's merge: start from the original copy
            w = _float32_copy(st.base[name].host, p.device)
        else:
            _ensure_base_copy(st, name, p)
            w = p.detach().to(dtype=torch.float32, copy=True)
        delta = torch.zeros_like(w)
        for row0, down, up, scale in items:
            lo, hi = max(row0, first), min(row0 + up.shape[0], first + w.shape[0])
            if lo >= hi:  # none of this delta's rows are on this rank
                continue
            d = down.to(device=p.device).to(torch.float32)
            u = up[lo - row0 : hi - row0].to(device=p.device).to(torch.float32)
            delta[lo - first : hi - first].addmm_(u, d, alpha=scale)
        w += delta
        del delta
        st.merged.add(name)  # before the write: if it fails half-way, restore still covers it
        if wscale is None:
            p.copy_(w)  # the one cast to the model dtype
        else:
            from .quantize import quantize_weight

            st.merged.add(sname)
            q, s = quantize_weight(w, p.dtype)
            p.copy_(q)
            if name in offsets:  # every rank's new scales for its rows, into every rank's whole copy
                sharding.gather_rows(dit, wscale, s)
            else:
                wscale.copy_(s)
            del q, s
        del w


# ---------------------------------------------------------------------------------------------
# Unmerged mode
# ---------------------------------------------------------------------------------------------


def _add_branches(dit, st: LoRAState, loras: List[LoRA]) -> None:
    modules = dict(dit.named_modules())
    device, dtype = dit.device, dit.dtype
    for lora in loras:
        for m in lora.loras:
            layer = modules[m.internal_name]
            scale = lora.multiplier * m.alpha_scale
            down_all = m.down.to(device=device, dtype=dtype)
            r = m.rank
            branches = layer.lora_branches
            if not any(layer is x for x in st.branch_modules):
                st.branch_modules.append(layer)
            row = m.row_offset
            for i, up in enumerate(m.ups):
                branches.append((down_all[i * r : (i + 1) * r], up.to(device=device, dtype=dtype), scale, row))
                row += up.shape[0]


def _remove_branches(st: LoRAState) -> None:
    for layer in st.branch_modules:
        layer.lora_branches = []  # a new list: compiled code guarding on the old one recompiles
    st.branch_modules = []
