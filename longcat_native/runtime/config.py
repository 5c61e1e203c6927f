"""Model configuration: the official ``config.json`` keys, their defaults, and two presets.

Keys keep their official names so code written for ``LongCatVideoTransformer3DModel`` reads
``dit.config.in_channels`` etc. unchanged. Defaults are the official constructor's defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import operator
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["LongCatConfig", "PRESETS", "resolve_config"]

# Keys the official config carries that select back ends of the official code; they have no
# meaning here (the runtime picks its own attention backend) and are accepted silently.
OFFICIAL_BACKEND_KEYS = ("enable_flashattn3", "enable_flashattn2", "enable_xformers")
# Bookkeeping keys written by diffusers' ConfigMixin.
DIFFUSERS_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")

DEFAULT_BSA_PARAMS = {
    "sparsity": 0.9375,
    "cdf_threshold": None,
    "chunk_3d_shape_q": [4, 4, 4],
    "chunk_3d_shape_k": [4, 4, 4],
}


# What every config.json key may hold: integers with their range (generous bounds: the official
# model is hidden 4096, depth 48, 32 heads; a value past them is a typo or a corrupt file, and
# would otherwise surface as an allocation error or a raw torch error deep inside).
INT_RANGES: Dict[str, Tuple[int, int]] = {
    "in_channels": (1, 4096),
    "out_channels": (1, 4096),
    "hidden_size": (1, 65536),
    "depth": (1, 1024),
    "num_heads": (1, 1024),
    "caption_channels": (1, 65536),
    "mlp_ratio": (1, 64),
    "adaln_tembed_dim": (1, 65536),
    "frequency_embedding_size": (2, 65536),
}
BOOL_KEYS = ("enable_flashattn3", "enable_flashattn2", "enable_xformers", "enable_bsa", "text_tokens_zero_pad")
MAX_PATCH = 64
MAX_CP_SPLIT = 1024
MAX_BSA_CHUNK = 1024
# Fields of LongCatConfig that are bookkeeping, not config keys.
_META_FIELDS = ("unknown_keys", "defaulted_keys")


def _as_int(v) -> Optional[int]:
    """``v`` as an int when it is an integer (Python, NumPy, 0-dim integer tensor; not a bool, not
    a float), else None."""
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _int_list(key: str, v, n: int, lo: int, hi: int, problems: List[str]):
    """``v`` as a list of ``n`` ints in [lo, hi], or None with the problem recorded."""
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or len(v) != n:
        problems.append(f"{key} must be a list of {n} integers, got {v!r}")
        return None
    out = [_as_int(x) for x in v]
    if any(x is None or not lo <= x <= hi for x in out):
        problems.append(f"{key} must be a list of {n} integers in [{lo}, {hi}], got {v!r}")
        return None
    return out


def _finite_number(v) -> Optional[float]:
    """``v`` as a float when it is a finite real number (not a bool, not a string), else None."""
    if isinstance(v, bool) or type(v).__name__ == "bool_" or not isinstance(v, numbers.Real):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def check_bsa_params(params, key: str = "bsa_params") -> Tuple[List[str], Optional[Dict[str, Any]]]:
    """Problems with a ``bsa_params`` dict (each naming its key) and the normalized dict: the
    official keys only; ``sparsity`` None or in [0, 1), ``cdf_threshold`` None or in (0, 1] (not
    both None); chunk shapes 3 positive ints each."""
    problems: List[str] = []
    if params is None:
        return problems, None
    if not isinstance(params, dict):
        return [f"{key} must be an object (dict) of block-sparse attention parameters, got {params!r}"], None
    unknown = set(params) - set(DEFAULT_BSA_PARAMS)
    if unknown:
        problems.append(f"{key} has unknown keys {sorted(map(str, unknown))}; known: {sorted(DEFAULT_BSA_PARAMS)}")
    out = dict(params)
    merged = dict(DEFAULT_BSA_PARAMS, **params)
    sp = merged["sparsity"]
    if sp is not None:
        f = _finite_number(sp)
        if f is None or not 0.0 <= f < 1.0:
            problems.append(f"{key}.sparsity must be a number in [0, 1) (the share of key chunks skipped) or null, "
                            f"got {sp!r}")
    cdf = merged["cdf_threshold"]
    if cdf is not None:
        f = _finite_number(cdf)
        if f is None or not 0.0 < f <= 1.0:
            problems.append(f"{key}.cdf_threshold must be a number in (0, 1] or null, got {cdf!r}")
    if sp is None and cdf is None:
        problems.append(f"{key}: sparsity and cdf_threshold cannot both be null (block-sparse attention needs one)")
    for name in ("chunk_3d_shape_q", "chunk_3d_shape_k"):
        if name in params:
            lst = _int_list(f"{key}.{name}", params[name], 3, 1, MAX_BSA_CHUNK, problems)
            if lst is not None:
                out[name] = lst
    return problems, out


@dataclass
class LongCatConfig:
    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 4096
    depth: int = 48
    num_heads: int = 32
    caption_channels: int = 4096
    mlp_ratio: int = 4
    adaln_tembed_dim: int = 512
    frequency_embedding_size: int = 256
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    enable_flashattn3: bool = False
    enable_flashattn2: bool = False
    enable_xformers: bool = False
    enable_bsa: bool = False
    bsa_params: Optional[Dict[str, Any]] = None
    cp_split_hw: Optional[List[int]] = None
    # The official constructor defaults to False; the released checkpoint sets True.
    text_tokens_zero_pad: bool = False
    # Keys found in a config.json that are not model keys (kept, reported once).
    unknown_keys: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Model keys a config.json did not set (so the official defaults were used): named by the
    # checkpoint loader when the weights do not fit, the usual cause being a stripped config.
    defaulted_keys: Tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self):
        self.validate()

    # -- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden_size(self) -> int:
        """Official FeedForwardSwiGLU width: 256 * ceil(int(2 * mlp_ratio * C / 3) / 256)."""
        hidden = int(2 * int(self.hidden_size * self.mlp_ratio) / 3)
        return 256 * ((hidden + 255) // 256)

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    def validate(self) -> None:
        """Check every key by type and range (each problem names its key) and normalize the
        types (integers to int, ``patch_size`` to a tuple, ``cp_split_hw`` to a list). A string
        ``"false"`` for a boolean key is an error, not a truthy value."""
        problems: List[str] = []
        for name, (lo, hi) in INT_RANGES.items():
            v = getattr(self, name)
            iv = _as_int(v)
            if iv is None or not lo <= iv <= hi:
                kind = "a positive integer" if lo == 1 else f"an integer >= {lo}"
                problems.append(f"{name} must be {kind} (at most {hi}), got {v!r}")
            else:
                setattr(self, name, iv)
        for name in BOOL_KEYS:
            v = getattr(self, name)
            if isinstance(v, bool):
                continue
            if type(v).__name__ == "bool_":  # NumPy's
                setattr(self, name, bool(v))
                continue
            hint = " (a JSON string is not a boolean: write true or false without quotes)" if isinstance(v, str) else ""
            problems.append(f"{name} must be true or false, got {v!r}{hint}")
        patch = _int_list("patch_size", self.patch_size, 3, 1, MAX_PATCH, problems)
        if patch is not None:
            self.patch_size = tuple(patch)
            if patch[0] != 1:
                problems.append("patch_size[0] must be 1: the official model does not patch the time axis")
        if self.cp_split_hw is not None:
            split = _int_list("cp_split_hw", self.cp_split_hw, 2, 1, MAX_CP_SPLIT, problems)
            if split is not None:
                self.cp_split_hw = split
        bsa_problems, bsa = check_bsa_params(self.bsa_params)
        problems += bsa_problems
        if not bsa_problems:
            self.bsa_params = bsa
        if not problems:
            if self.hidden_size % self.num_heads:
                problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            elif self.head_dim % 8:
                problems.append(f"head_dim {self.head_dim} must be a multiple of 8 (3D RoPE splits it in 3 even slices)")
            if self.frequency_embedding_size % 2:
                problems.append("frequency_embedding_size must be even")
        if problems:
            raise ValueError("invalid LongCat config: " + "; ".join(problems))

    # -- dict views (diffusers-like) ------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in _META_FIELDS}
        d["patch_size"] = list(d["patch_size"])
        return d

    def __getitem__(self, key):  # diffusers configs are also read like dicts
        if key in self.keys():
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key, default=None):
        return getattr(self, key) if key in self.keys() else default

    def keys(self):
        return [f.name for f in dataclasses.fields(self) if f.name not in _META_FIELDS]

    def __contains__(self, key):
        return key in self.keys()

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in _META_FIELDS]

    @classmethod
    def from_dict(cls, d: Dict[str, Any], overrides: Optional[Dict[str, Any]] = None, source: str = "config") -> "LongCatConfig":
        d = dict(d)
        known = set(cls.field_names())
        unknown = {k: v for k, v in d.items() if k not in known and k not in DIFFUSERS_META_KEYS}
        kwargs = {k: v for k, v in d.items() if k in known}
        for k, v in (overrides or {}).items():
            if k not in known:
                raise TypeError(
                    f"unknown config override {k!r}; config keys are: {', '.join(sorted(known))}"
                )
            kwargs[k] = v
        if unknown:
            warnings.warn(f"{source}: ignoring unknown config keys {sorted(unknown)}", stacklevel=3)
        try:
            cfg = cls(**kwargs)
        except ValueError as e:
            msg = str(e)
            if source != "config" and msg.startswith("invalid LongCat config: "):
                msg = f"invalid LongCat config ({source}): " + msg[len("invalid LongCat config: "):]
            raise ValueError(msg) from None
        cfg.unknown_keys = unknown
        cfg.defaulted_keys = tuple(k for k in INT_RANGES if k not in kwargs) + (
            ("patch_size",) if "patch_size" not in kwargs else ())
        return cfg

    @classmethod
    def from_json_file(cls, path: str, overrides: Optional[Dict[str, Any]] = None) -> "LongCatConfig":
        try:
            with open(path, "r", encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(d, overrides, source=path)

    @property
    def bsa(self) -> Dict[str, Any]:
        """BSA parameters with official defaults filled in."""
        params = dict(DEFAULT_BSA_PARAMS)
        params.update(self.bsa_params or {})
        return params


PRESETS: Dict[str, Dict[str, Any]] = {
    # The official 13.6B checkpoint's dit/config.json.
    "longcat-video": dict(
        in_channels=16, out_channels=16, hidden_size=4096, depth=48, num_heads=32, caption_channels=4096,
        mlp_ratio=4, adaln_tembed_dim=512, frequency_embedding_size=256, patch_size=(1, 2, 2),
        enable_bsa=False, bsa_params=dict(DEFAULT_BSA_PARAMS), cp_split_hw=[1, 1], text_tokens_zero_pad=True,
    ),
    # The shape of the golden fixtures' tiny checkpoint: small enough for CPU tests and demos.
    "tiny": dict(
        in_channels=16, out_channels=16, hidden_size=128, depth=2, num_heads=4, caption_channels=64,
        mlp_ratio=4, adaln_tembed_dim=32, frequency_embedding_size=256, patch_size=(1, 2, 2),
        enable_bsa=False,
        bsa_params={"sparsity": 0.5, "cdf_threshold": None, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]},
        cp_split_hw=[1, 1], text_tokens_zero_pad=True,
    ),
}


def resolve_config(config_or_name, overrides: Optional[Dict[str, Any]] = None) -> LongCatConfig:
    """A preset name, a dict of config keys, a LongCatConfig, or a path to a config.json."""
    if isinstance(config_or_name, LongCatConfig):
        base = config_or_name.to_dict()
        return LongCatConfig.from_dict(base, overrides)
    if isinstance(config_or_name, dict):
        return LongCatConfig.from_dict(config_or_name, overrides, source="config dict")
    if isinstance(config_or_name, (str, os.PathLike)):
        name = os.fspath(config_or_name)
        if name in PRESETS:
            return LongCatConfig.from_dict(PRESETS[name], overrides)
        if os.path.isfile(name):
            return LongCatConfig.from_json_file(name, overrides)
        if os.path.isfile(os.path.join(name, "config.json")):
            return LongCatConfig.from_json_file(os.path.join(name, "config.json"), overrides)
        raise ValueError(
            f"unknown config {name!r}: use a preset ({', '.join(sorted(PRESETS))}), a dict, or a path to a config.json"
        )
    raise TypeError(f"config must be a preset name, dict, LongCatConfig or path, got {type(config_or_name).__name__}")
