"""Attention dispatch: one place that turns q, k, v (token-major ``[B, N, heads, D]``) into an
attention output, for the backends flash3, flash2, cudnn, sdpa, reference and auto. No backend
but ``reference`` may copy a device tensor to the host.

Design notes: docs/design/attention.md.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..kernels._common import query_row_slices
from .names import ATTENTION_BACKENDS, ATTENTION_CHOICES

__all__ = ["ATTENTION_BACKENDS", "ATTENTION_CHOICES", "check_attention_name", "resolve_attention_backend",
           "attention", "attention_with_lse"]

_FLASH_DTYPES = (torch.float16, torch.bfloat16)

# Package that provides each flash backend, and how to get it.
_FLASH_PACKAGES = {"flash3": "flash_attn_interface", "flash2": "flash_attn"}
_INSTALL_HINT = {
    "flash2": "install FlashAttention-2: pip install 'longcat-native[cuda]' (or: pip install flash-attn "
              "--no-build-isolation)",
    "flash3": "install the FlashAttention-3 Hopper build, which provides `flash_attn_interface`: "
              "git clone https://github.com/Dao-AILab/flash-attention && cd flash-attention/hopper && "
              "python setup.py install",
}

# SDPA kernels the ``cudnn`` backend allows, in priority order (a module attribute so CPU tests can
# put the math kernel here and run the dispatch path). Read when the backend runs, not at import.
_CUDNN_SDPA_ORDER = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION")


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _flash_module(backend: str) -> Tuple[Optional[object], Optional[str]]:
    """``(module, None)`` when the package of a flash backend imports, else ``(None, reason)``.

    Cached: the import is tried once per process (tests call ``_flash_module.cache_clear()``)."""
    pkg = _FLASH_PACKAGES[backend]
    try:
        return importlib.import_module(pkg), None
    except ImportError as e:  # not installed, or a build that does not match this torch / CUDA
        return None, f"{type(e).__name__}: {e}"
    except OSError as e:  # e.g. a missing CUDA shared library
        return None, f"{type(e).__name__}: {e}"


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: Optional[int]) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _device_capability(device: torch.device) -> Optional[Tuple[int, int]]:
    """The CUDA compute capability of ``device``, or None when it is not a CUDA device (decided
    without any CUDA query). Resolution's one device check: tests pretend a GPU by patching it."""
    if device.type != "cuda":
        return None
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


def check_attention_name(name: str) -> None:
    """Validate an ``attention=`` choice without looking at a device (model construction)."""
    if name not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(map(repr, ATTENTION_CHOICES))}")


def _flash_problems(backend: str, device: torch.device, dtype: Optional[torch.dtype]) -> list:
    """Why ``backend`` cannot run here (empty list: it can)."""
    problems = []
    capability = _device_capability(device)
    if capability is None:
        problems.append(f"it needs a CUDA device and the model is on {device}")
    if dtype is not None and dtype not in _FLASH_DTYPES:
        problems.append(f"flash-attn computes in float16/bfloat16 only and the model dtype is {dtype} "
                        "(load the model in bfloat16, or use attention='sdpa')")
    if backend == "flash3" and capability is not None:
        major, minor = capability
        if major != 9:
            problems.append(f"FlashAttention-3 needs a Hopper GPU (compute capability 9.x) and {device} is "
                            f"sm_{major}{minor} (use attention='flash2' or 'auto')")
    module, err = _flash_module(backend)
    if module is None:
        problems.append(f"the `{_FLASH_PACKAGES[backend]}` package is not importable ({err}); {_INSTALL_HINT[backend]}")
    return problems


def _flash_usable(backend: str, device: torch.device, dtype: Optional[torch.dtype]) -> bool:
    if _device_capability(device) is None:
        return False  # decided before any CUDA query or import attempt
    if dtype is not None and dtype not in _FLASH_DTYPES:
        return False
    return not _flash_problems(backend, device, dtype)


def resolve_attention_backend(name: str, device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend a model with ``attention=name`` uses on ``device`` with activations ``dtype``.

    ``auto``: flash3 (CUDA capability 9.x with ``flash_attn_interface`` importable), else flash2
    (CUDA with ``flash_attn`` importable), else sdpa; the flash backends only when ``dtype`` is
    float16/bfloat16 (``dtype=None``: not known, not checked). An explicitly requested backend
    that cannot run raises ``ValueError`` saying why and what to install. Cheap after the first
    call (importability and device capability are cached)."""
    check_attention_name(name)
    device = torch.device(device)
    if name == "auto":
        for backend in ("flash3", "flash2"):
            if _flash_usable(backend, device, dtype):
                return backend
        return "sdpa"
    if name == "cudnn":
        problems = []
        if _device_capability(device) is None:
            problems.append(f"it needs a CUDA device and the model is on {device}")
        if dtype is not None and dtype not in _FLASH_DTYPES:
            problems.append(f"cuDNN's fused attention computes in float16/bfloat16 only and the model dtype is "
                            f"{dtype} (load the model in bfloat16, or use attention='sdpa')")
        if "set_priority" not in inspect.signature(sdpa_kernel).parameters:
            problems.append(f"torch {torch.__version__} has no SDPA kernel priorities "
                            "(torch.nn.attention.sdpa_kernel(..., set_priority=True)); upgrade torch")
        if problems:
            raise ValueError("attention='cudnn' cannot be used: " + "; ".join(problems) + ".")
    if name in _FLASH_PACKAGES:
        problems = _flash_problems(name, device, dtype)
        if problems:
            raise ValueError(f"attention={name!r} cannot be used: " + "; ".join(problems)
                             + ". attention='sdpa' works everywhere; attention='auto' picks the fastest available.")
    return name


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str,
    key_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Softmax attention with scale D**-0.5. q [B, Nq, H, D], k/v [B, Nk, H, D] -> [B, Nq, H, D].

    ``backend`` is a resolved backend (:func:`resolve_attention_backend`). key_valid: optional
    bool [B, Nk]; each batch item attends only to its valid keys. An item with no valid key gets
    a zero output (what flash-attn's varlen kernels return).
    """
    if q.shape[1] == 0:
        return q.new_empty(q.shape)
    if backend == "sdpa":
        return _attention_sdpa(q, k, v, key_valid)
    if backend == "cudnn":
        with sdpa_kernel([getattr(SDPBackend, kernel) for kernel in _CUDNN_SDPA_ORDER], set_priority=True):
            return _attention_sdpa(q, k, v, key_valid)
    if backend == "flash3" or backend == "flash2":
        return _attention_flash(q, k, v, key_valid, backend)
    if backend == "reference":
        return _attention_reference(q, k, v, key_valid)
    raise ValueError(f"unknown attention backend {backend!r}")


def _attention_sdpa(q, k, v, key_valid):
    mask = None if key_valid is None else key_valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    out = out.transpose(1, 2)
    if key_valid is not None:
        # Rows with every key masked come out NaN from SDPA; flash-attn varlen returns 0.
        out = torch.where(key_valid.any(dim=1)[:, None, None, None], out, out.new_zeros(()))
    return out


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # flash-attn requires stride(-1) == 1 and takes any other strides as they are (the strided
    # q/k/v views of the fused qkv output, an expanded batch-1 K/V cache): copy only when needed.
    return t if t.stride(-1) == 1 else t.contiguous()


def _first(out):
    # Some flash_attn_interface (FA3) versions return (out, softmax_lse); FA2 returns out.
    return out[0] if isinstance(out, (tuple, list)) else out


def _attention_flash2(q, k, v, key_valid=None):
    return _attention_flash(q, k, v, key_valid, "flash2")


def _attention_flash3(q, k, v, key_valid=None):
    return _attention_flash(q, k, v, key_valid, "flash3")


def _attention_flash(q, k, v, key_valid, backend):
    module, err = _flash_module(backend)
    if module is None:
        raise ValueError(f"attention={backend!r}: the `{_FLASH_PACKAGES[backend]}` package is not importable "
                         f"({err}); {_INSTALL_HINT[backend]}")
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    scale = D**-0.5
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if key_valid is None:
        # [B, N, H, D] is flash-attn's native layout: no transposes.
        return _first(module.flash_attn_func(q, k, v, softmax_scale=scale, causal=False))
    if Nk == 0:
        return q.new_zeros(q.shape)
    device = q.device
    # Packed queries: every query token of every item (a view when q's batch stride allows).
    q_packed = q.reshape(B * Nq, H, D)
    cu_q = torch.arange(0, (B + 1) * Nq, Nq, dtype=torch.int32, device=device)
    # Packed keys/values: the stable argsort of ~valid lists the valid (item, position) pairs
    # first, in order (docs/design/attention.md); the tail rows are never read by the kernel.
    valid = key_valid.to(device=device, dtype=torch.bool)
    perm = torch.argsort((~valid).reshape(-1).to(torch.int8), stable=True)
    b_idx, j_idx = perm // Nk, perm % Nk
    # Advanced indexing gathers from expanded (stride-0 batch) K/V without materializing them.
    k_packed, v_packed = k[b_idx, j_idx], v[b_idx, j_idx]  # [B*Nk, H, D], contiguous
    cu_k = F.pad(torch.cumsum(valid.sum(dim=1, dtype=torch.int32), dim=0, dtype=torch.int32), (1, 0))
    out = _first(module.flash_attn_varlen_func(q_packed, k_packed, v_packed, cu_q, cu_k, Nq, Nk,
                                               softmax_scale=scale, causal=False))
    out = out.view(B, Nq, H, D)
    return torch.where(valid.any(dim=1)[:, None, None, None], out, out.new_zeros(()))


def _attention_reference(q, k, v, key_valid):
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    scale = D**-0.5
    kf, vf = k.float(), v.float()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for s, e in query_row_slices(Nq, B * H * Nk * 4):  # [B, H, rows, Nk] float32 scores at a time
        qf = q[:, s:e].float()
        scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
        if key_valid is not None:
            scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if key_valid is not None:
            probs = torch.nan_to_num(probs, nan=0.0)
        out[:, s:e] = torch.einsum("bhqk,bkhd->bqhd", probs, vf).to(q.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Attention with its log-sum-exp (ring attention's partial results)
# ---------------------------------------------------------------------------------------------


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str):
    """Dense softmax attention (scale D**-0.5, no mask) that also returns the log-sum-exp of each
    query's scores: ``(out [B, Nq, H, D] in q's dtype, lse float32 [B, H, Nq])``. Partial results
    over disjoint key sets merge exactly with it (runtime/ring.py, docs/design/parallel.md).

    Every backend's kernel computes the log-sum-exp anyway; this asks for it: flash-attn's
    ``return_attn_probs`` (FA2: ``softmax_lse``; FA3 returns it with the output), SDPA's
    underlying ATen kernels (the CPU flash kernel; on CUDA the flash kernel for fp16/bf16 and the
    memory-efficient one for float32; cuDNN's for ``cudnn``), the float32 oracle for
    ``reference``. Never a host sync."""
    B, Nq, H, D = q.shape
    if Nq == 0 or k.shape[1] == 0:
        raise ValueError(f"attention_with_lse needs queries and keys, got {Nq} queries and {k.shape[1]} keys")
    scale = D**-0.5
    if backend == "reference":
        return _lse_reference(q, k, v, scale)
    if backend in ("flash2", "flash3"):
        module, err = _flash_module(backend)
        if module is None:
            raise ValueError(f"attention={backend!r}: the `{_FLASH_PACKAGES[backend]}` package is not importable "
                             f"({err}); {_INSTALL_HINT[backend]}")
        q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
        res = module.flash_attn_func(q, k, v, softmax_scale=scale, causal=False, return_attn_probs=True)
        return res[0], res[1].float()  # lse [B, H, Nq]
    if backend not in ("sdpa", "cudnn"):
        raise ValueError(f"unknown attention backend {backend!r}")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, N, D] views
    aten = torch.ops.aten
    if q.device.type != "cuda":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False, scale=scale)
    elif backend == "cudnn":
        out, lse = aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, False, False,
                                                            scale=scale)[:2]
    elif q.dtype in _FLASH_DTYPES:
        out, lse = aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False, scale=scale)[:2]
    else:  # float32 on CUDA: the memory-efficient kernel
        out, lse = aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0, False, scale=scale)[:2]
    # [B, H, Nq]; the memory-efficient kernel pads the rows to a multiple of 32, and some cuDNN
    # versions return [B, H, Nq, 1].
    return out.transpose(1, 2), lse.reshape(B, H, -1)[:, :, :Nq].float()


def _lse_reference(q, k, v, scale):
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    kf, vf = k.float(), v.float()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    for s, e in query_row_slices(Nq, B * H * Nk * 4):
        scores = torch.einsum("bqhd,bkhd->bhqk", q[:, s:e].float(), kf) * scale
        lse[:, :, s:e] = torch.logsumexp(scores, dim=-1)
        out[:, s:e] = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), vf).to(q.dtype)
    return out, lse
