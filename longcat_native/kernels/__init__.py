"""Fused ops, one per file: the plain-PyTorch reference (the oracle) and the fused Triton kernel.

``get_ops("reference" | "triton")`` returns the namespace of implementations a model's call
sites use, so there is one model definition whatever the kernel path.
"""

from __future__ import annotations

from types import SimpleNamespace

from .layernorm_modulate import layernorm_modulate_reference
from .qk_rmsnorm_rope3d import qk_rmsnorm_rope3d_reference, rope3d_reference, rmsnorm_reference
from .residual_layernorm_modulate import gated_residual_reference, residual_layernorm_modulate_reference
from .swiglu import swiglu_reference

__all__ = ["get_ops", "KERNEL_PATHS"]

KERNEL_PATHS = ("reference", "triton")

_REFERENCE_OPS = SimpleNamespace(
    name="reference",
    layernorm_modulate=layernorm_modulate_reference,
    residual_layernorm_modulate=residual_layernorm_modulate_reference,
    qk_rmsnorm_rope3d=qk_rmsnorm_rope3d_reference,
    swiglu=swiglu_reference,
)


def get_ops(kernels: str) -> SimpleNamespace:
    if kernels == "reference":
        return _REFERENCE_OPS
    if kernels == "triton":
        raise NotImplementedError(
            "kernels='triton' (the fused Triton path) is not available in this version yet; "
            "use kernels='reference'"
        )
    raise ValueError(f"unknown kernel path {kernels!r}; choose one of {KERNEL_PATHS} or 'auto'")
