"""What depends on the device, decided in one place: the default model dtype and device, which
block-sparse attention kernel runs, and how much memory a new allocation can get.

The lowest runtime module but names.py (it imports torch only), so that loading
(runtime/construction.py), weight streaming (runtime/streaming.py) and the model use it without
importing each other: ``runtime/`` imports only go down (tests/test_runtime_imports.py).
``runtime.dit`` re-exports every name here (its public names since before the split).
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

__all__ = ["resolve_dtype", "resolve_device", "bsa_kernel_path", "free_memory_bytes"]

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """None -> bfloat16 on CUDA (what the model was trained for), float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        key = dtype.replace("torch.", "").lower()
        if key not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPE_NAMES)}")
        dtype = _DTYPE_NAMES[key]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def resolve_device(device, world_size: int = 1) -> torch.device:
    """None -> CUDA when available (in a parallel run, this rank's GPU: ``LOCAL_RANK`` as
    torchrun sets it), else the CPU."""
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if world_size > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            return device
        return torch.device("cuda")
    return torch.device(device)


def bsa_kernel_path(kernels: str, device: torch.device, attention: str) -> str:
    """Which block-sparse attention runs: the Triton kernel with the fused kernels, and on CUDA
    with every attention backend but ``"reference"``; the plain-PyTorch oracle otherwise.

    BSA is an attention backend, so on a GPU the reference kernel path uses the same BSA kernel as
    the fused one (as the official code does): the oracle does dense masked float32 attention,
    about 470 TFLOP per block at 720p (N = 168,960), and is for checking, not for running."""
    if kernels == "triton" or (device.type == "cuda" and attention != "reference"):
        return "triton"
    return "reference"


def free_memory_bytes(device) -> Optional[int]:
    """Memory a new allocation can get on ``device``, where it can be known: on CUDA the driver's
    free memory plus what PyTorch's caching allocator holds unused; on the CPU (Linux) the
    kernel's MemAvailable plus free swap. None elsewhere (no check is made)."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        if device.type == "cpu":
            fields = {}
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    fields[name] = int(rest.split()[0]) * 1024
            return fields["MemAvailable"] + fields.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, RuntimeError, IndexError):
        return None
    return None
