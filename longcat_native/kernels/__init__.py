"""Fused ops, one per file: the plain-PyTorch reference (the oracle) and the fused Triton kernel.

:mod:`.ops` holds the kernel-path table (``get_ops(kernels, bsa)`` -> :class:`~.ops.Ops`).
Importing this package imports neither torch nor triton (the command line reads
``KERNEL_PATHS`` at start-up); ``Ops`` and ``get_ops`` load the op modules on first use.
"""

import importlib

__all__ = ["KERNEL_PATHS", "Ops", "get_ops"]

KERNEL_PATHS = ("reference", "triton")


def __getattr__(name):
    if name in ("Ops", "get_ops"):
        return getattr(importlib.import_module(f"{__name__}.ops"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
