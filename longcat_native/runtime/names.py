"""The names a user picks from (kernel paths, attention backends, dtypes) and the official spellings
of arguments, with no torch import: the command line offers them without paying for torch at start-up."""

from ..kernels import KERNEL_PATHS

__all__ = ["KERNEL_PATHS", "KERNEL_CHOICES", "ATTENTION_BACKENDS", "ATTENTION_CHOICES", "DTYPE_CHOICES", "MAX_STEPS", "merge_alias",
           "OFFLOAD_CHOICES", "QUANTIZE_CHOICES", "CONVERT_TARGETS", "parse_bytes"]

KERNEL_CHOICES = KERNEL_PATHS + ("auto",)  # "auto": the fused path on CUDA, the reference elsewhere
ATTENTION_BACKENDS = ("flash3", "flash2", "cudnn", "sdpa", "reference")
ATTENTION_CHOICES = ("auto",) + ATTENTION_BACKENDS
DTYPE_CHOICES = ("float32", "bfloat16", "float16")  # also accepted: fp32, bf16, fp16, half, float
MAX_STEPS = 1000  # denoising steps: the model was trained on 1000 timesteps; more is a mistake


def merge_alias(ours, theirs, our_name: str, their_name: str):
    """Accept the official (diffusers) spelling of an argument as an alias of ours: the one given,
    or an error when both are given and disagree."""
    if theirs is None:
        return ours
    if ours is not None and ours != theirs:
        raise ValueError(f"{our_name}={ours!r} and {their_name}={theirs!r} disagree; pass one of them")
    return theirs


QUANTIZE_CHOICES = ("fp8", "fp8-weight-only", "int8-weight-only")  # runtime/quantize.py's modes
CONVERT_TARGETS = ("official", "diffusers", "fp8", "int8")  # longcat-native convert --to (runtime/convert.py)
OFFLOAD_CHOICES = ("none", "blocks")  # weight offload (runtime/streaming.py): "blocks" streams blocks from host memory

_BYTE_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
               "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_bytes(value) -> int:
    """A byte count from an int (``25769803776``) or a string: a number and a unit, case-insensitive,
    space optional: ``"24GiB"``, ``"24 GB"`` (10**9), ``"1.5g"`` (a bare K/M/G/T is binary: GiB),
    ``"512MiB"``, ``"4096"`` (bytes). Fractions of a byte round down. Anything else (negative,
    non-finite, an unknown unit, a bool, empty) is a ValueError naming the accepted forms."""
    import math
    import re

    forms = 'an int or a string like "24GiB", "24GB" (10**9 B), "1.5G" (GiB), "512MiB" or "4096"'
    if isinstance(value, bool):
        raise ValueError(f"a byte count must be {forms}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a byte count must not be negative, got {value}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a byte count must be finite and not negative, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"a byte count must be {forms}, got {type(value).__name__}")
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([A-Za-z]*)\s*", value)
    unit = m.group(3).lower() if m else None
    if m is None or unit not in _BYTE_UNITS:
        raise ValueError(f"cannot read {value!r} as a byte count: use {forms}")
    number = float(m.group(1) + (f"e{m.group(2)}" if m.group(2) else ""))
    total = number * _BYTE_UNITS[unit]
    if not math.isfinite(total):
        raise ValueError(f"byte count {value!r} is out of range")
    return int(total)
