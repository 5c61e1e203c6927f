"""The kernel-path table: ``get_ops(kernels, bsa)`` returns the :class:`Ops` a model's call sites
use, so there is one model definition whatever the kernel path: the same functions with the
same signatures and semantics on both paths, block-sparse attention included.

The tables are built once, at import, so ``get_ops`` is a dict lookup that ``torch.compile``
traces through without a graph break."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

from . import KERNEL_PATHS
from . import block_sparse_attention as _bsa
from . import layernorm_modulate as _layernorm_modulate
from . import qk_rmsnorm_rope3d as _qk_rmsnorm_rope3d
from . import residual_layernorm_modulate as _residual_layernorm_modulate
from . import swiglu as _swiglu

__all__ = ["Ops", "get_ops"]


class Ops(NamedTuple):
    """One kernel path: ``name`` is the path of the fused ops, ``bsa`` the implementation behind
    ``block_sparse_attention`` (which one runs is decided by ``runtime.dit.bsa_kernel_path``)."""

    name: str
    bsa: str
    layernorm_modulate: Callable
    residual_layernorm_modulate: Callable
    qk_rmsnorm_rope3d: Callable
    swiglu: Callable
    block_sparse_attention: Callable


def _build(kernels: str, bsa: str) -> Ops:
    # Modules, not functions, are imported above: each op's function has its module's name, and
    # binding it in this package would shadow the submodule.
    ref = kernels == "reference"
    return Ops(
        name=kernels,
        bsa=bsa,
        layernorm_modulate=(_layernorm_modulate.layernorm_modulate_reference if ref
                            else _layernorm_modulate.layernorm_modulate),
        residual_layernorm_modulate=(_residual_layernorm_modulate.residual_layernorm_modulate_reference if ref
                                     else _residual_layernorm_modulate.residual_layernorm_modulate),
        qk_rmsnorm_rope3d=_qk_rmsnorm_rope3d.qk_rmsnorm_rope3d_reference if ref else _qk_rmsnorm_rope3d.qk_rmsnorm_rope3d,
        swiglu=_swiglu.swiglu_reference if ref else _swiglu.swiglu,
        block_sparse_attention=functools.partial(_bsa.block_sparse_attention, impl=bsa),
    )


_TABLE = {(k, b): _build(k, b) for k in KERNEL_PATHS for b in KERNEL_PATHS}


def get_ops(kernels: str, bsa: Optional[str] = None) -> Ops:
    """The ops of kernel path ``kernels`` ("reference" | "triton"), with block-sparse attention
    run by ``bsa`` ("reference" | "triton"; default: the same path)."""
    ops = _TABLE.get((kernels, kernels if bsa is None else bsa))
    if ops is None:
        bad = kernels if kernels not in KERNEL_PATHS else bsa
        raise ValueError(f"unknown kernel path {bad!r}; choose one of {KERNEL_PATHS} or 'auto'")
    return ops
