"""Fused ops, one per file: the plain-PyTorch reference (the oracle) and the fused Triton kernel.

``get_ops("reference" | "triton")`` returns the namespace of implementations a model's call
sites use, so there is one model definition whatever the kernel path. Both namespaces have the
same functions with the same signatures and semantics.
"""

from __future__ import annotations

from types import SimpleNamespace

# Modules, not functions, are bound here: each op's function has its module's name, and
# binding it would shadow the submodule (``import longcat_native.kernels.swiglu`` must stay a module).
from . import layernorm_modulate as _layernorm_modulate
from . import qk_rmsnorm_rope3d as _qk_rmsnorm_rope3d
from . import residual_layernorm_modulate as _residual_layernorm_modulate
from . import swiglu as _swiglu

__all__ = ["get_ops", "KERNEL_PATHS"]

KERNEL_PATHS = ("reference", "triton")

_OPS = {
    "reference": SimpleNamespace(
        name="reference",
        layernorm_modulate=_layernorm_modulate.layernorm_modulate_reference,
        residual_layernorm_modulate=_residual_layernorm_modulate.residual_layernorm_modulate_reference,
        qk_rmsnorm_rope3d=_qk_rmsnorm_rope3d.qk_rmsnorm_rope3d_reference,
        swiglu=_swiglu.swiglu_reference,
    ),
    "triton": SimpleNamespace(
        name="triton",
        layernorm_modulate=_layernorm_modulate.layernorm_modulate,
        residual_layernorm_modulate=_residual_layernorm_modulate.residual_layernorm_modulate,
        qk_rmsnorm_rope3d=_qk_rmsnorm_rope3d.qk_rmsnorm_rope3d,
        swiglu=_swiglu.swiglu,
    ),
}


def get_ops(kernels: str) -> SimpleNamespace:
    try:
        return _OPS[kernels]
    except KeyError:
        raise ValueError(f"unknown kernel path {kernels!r}; choose one of {KERNEL_PATHS} or 'auto'") from None
