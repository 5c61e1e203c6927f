"""Model configuration: the official ``config.json`` keys, their defaults, and two presets.

Keys keep their official names so code written for ``LongCatVideoTransformer3DModel`` reads
``dit.config.in_channels`` etc. unchanged. Defaults are the official constructor's defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
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

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.cp_split_hw is not None:
            self.cp_split_hw = [int(v) for v in self.cp_split_hw]
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
        problems = []
        for name in ("in_channels", "out_channels", "hidden_size", "depth", "num_heads", "caption_channels",
                     "mlp_ratio", "adaln_tembed_dim", "frequency_embedding_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                problems.append(f"{name} must be a positive integer, got {v!r}")
        if not problems:
            if self.hidden_size % self.num_heads:
                problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            elif self.head_dim % 8:
                problems.append(f"head_dim {self.head_dim} must be a multiple of 8 (3D RoPE splits it in 3 even slices)")
            if self.frequency_embedding_size % 2:
                problems.append("frequency_embedding_size must be even")
        if len(self.patch_size) != 3 or any(p <= 0 for p in self.patch_size):
            problems.append(f"patch_size must be 3 positive integers, got {self.patch_size}")
        elif self.patch_size[0] != 1:
            problems.append("patch_size[0] must be 1: the official model does not patch the time axis")
        if self.cp_split_hw is not None and (len(self.cp_split_hw) != 2 or min(self.cp_split_hw) < 1):
            problems.append(f"cp_split_hw must be two positive integers, got {self.cp_split_hw}")
        if self.bsa_params is not None:
            unknown = set(self.bsa_params) - set(DEFAULT_BSA_PARAMS)
            if unknown:
                problems.append(f"bsa_params has unknown keys {sorted(unknown)}; known: {sorted(DEFAULT_BSA_PARAMS)}")
        if problems:
            raise ValueError("invalid LongCat config: " + "; ".join(problems))

    # -- dict views (diffusers-like) ------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "unknown_keys"}
        d["patch_size"] = list(d["patch_size"])
        return d

    def __getitem__(self, key):  # diffusers configs are also read like dicts
        if key in self.keys():
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key, default=None):
        return getattr(self, key) if key in self.keys() else default

    def keys(self):
        return [f.name for f in dataclasses.fields(self) if f.name != "unknown_keys"]

    def __contains__(self, key):
        return key in self.keys()

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "unknown_keys"]

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
        cfg = cls(**kwargs)
        cfg.unknown_keys = unknown
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
