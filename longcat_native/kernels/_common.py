"""Shared plumbing for the fused kernels: lazy triton import, block sizes, op registration,
argument checks, and the query slicing of the plain-PyTorch attention oracles.

Registration: every fused op is a ``torch.library.custom_op`` with a ``register_fake``
implementation, in the ``longcat_native`` namespace. Why not ``triton_op``/``wrap_triton``:
with torch 2.13 and triton 3.9 under ``TRITON_INTERPRET=1`` (our CPU test setting) a
``triton_op`` fails inside ``torch.compile`` because the interpreter reads data pointers of
fake tensors, while ``custom_op`` + ``register_fake`` compiles with zero graph breaks and
matches eager, on CPU and on CUDA alike. One registration path for both.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Dict, List, Tuple

import torch

LIBRARY_NAMESPACE = "longcat_native"

# Scratch a custom op allocates inside its implementation and frees before it returns, by
# qualified name ("longcat_native.bsa_select"): ``fn(*op_args) -> bytes`` at its peak. The
# memory tracer (runtime/memory.py) sees an op's outputs only and adds this while the op runs.
WORKSPACE_BYTES: Dict[str, Callable[..., int]] = {}

ALLOCATOR_BLOCK_BYTES = 512  # CUDA caching allocator: every request is rounded up to this

# Activation dtypes of the fused kernels.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# float32 attention scores a plain-PyTorch oracle holds at once (:func:`query_row_slices`).
REFERENCE_SCORE_BYTES = 256 * 2**20


def allocator_bytes(nbytes: int) -> int:
    """The caching allocator's size for a request of ``nbytes`` (what max_memory_allocated counts)."""
    return -(-int(nbytes) // ALLOCATOR_BLOCK_BYTES) * ALLOCATOR_BLOCK_BYTES


def triton_interpreting() -> bool:
    """True when triton runs kernels with its CPU interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def import_triton():
    """Import triton lazily with a clear message; returns ``(triton, triton.language)``."""
    try:
        import triton
        import triton.language as tl
    except ImportError as e:  # pragma: no cover - triton is a hard dependency
        raise ImportError(
            "the fused kernels need triton: `pip install triton` (it is a dependency of longcat-native)"
        ) from e
    return triton, tl


def triton_usable_on(device: torch.device) -> bool:
    """Fused kernels run on CUDA tensors, or on CPU tensors under the triton interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreting()


def is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor (shapes only, e.g. runtime/memory.py's trace): ops on it run their
    ``register_fake`` implementations and launch nothing, so it fits any device check."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def check_triton_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None and not triton_usable_on(t.device) and not is_fake(t):
            raise RuntimeError(
                f"the fused triton kernels run on CUDA tensors (or on CPU with TRITON_INTERPRET=1 set "
                f"before triton is imported); got a tensor on {t.device}. Use kernels='reference' instead."
            )


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def needs_int64_offsets(*tensors: torch.Tensor) -> bool:
    """Whether element offsets into any of these tensors can pass 2**31 - 1."""
    for t in tensors:
        if t is None:
            continue
        span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
        if span >= 2**31:
            return True
    return False


def check_output(name: str, out: torch.Tensor, x: torch.Tensor) -> None:
    """A preallocated output must match x's shape, dtype and device and not overlap itself."""
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"{name} must be shape {tuple(x.shape)}, dtype {x.dtype} on {x.device}; "
            f"got shape {tuple(out.shape)}, dtype {out.dtype} on {out.device}"
        )
    # An expanded (stride 0) output would be written by several programs at once.
    if torch._debug_has_internal_overlap(out) == 1:
        raise ValueError(f"{name} has overlapping elements (an expanded view); it cannot be written")


def query_row_slices(n_rows: int, score_bytes_per_row: int) -> List[Tuple[int, int]]:
    """``(start, stop)`` of consecutive slices of ``n_rows`` query rows, each sized so its float32
    scores (``score_bytes_per_row`` per row: batch * heads * keys * 4) stay near
    ``REFERENCE_SCORE_BYTES`` whatever the sequence length (the scores of every row at once would
    be 3.7 TB at 720p, N = 168,960). Used by the attention oracles (``runtime.attention``'s
    reference backend, ``bsa_masked_attention_reference``); Python ints only, no device sync."""
    n, rows = int(n_rows), max(1, REFERENCE_SCORE_BYTES // max(1, int(score_bytes_per_row)))
    return [(start, min(n, start + rows)) for start in range(0, n, rows)]
