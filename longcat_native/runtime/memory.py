"""Peak memory of a forward, traced op by op instead of estimated by formula.

:class:`MemoryTracer` is a ``TorchDispatchMode`` that sees every ATen and custom op a function
runs and keeps the bytes of the tensor storages it allocates that are still referenced: the
number ``torch.cuda.max_memory_allocated`` reports, less what existed before (weights, inputs).
Sizes are rounded up to the CUDA caching allocator's 512-byte blocks. A custom op's internal
scratch, invisible from outside, is added while the op runs from ``WORKSPACE_BYTES``
(``kernels/_common.py``; only ``bsa_select`` declares any).

It works on real tensors, and on fake ones (``FakeTensorMode``: shapes and dtypes, no data, no
compute), which is how :func:`trace_forward_memory` traces the 13.6B model at 720p on a laptop
CPU in about two seconds: the same Python code the GPU runs, block by block, with the fused
kernels' ``register_fake`` implementations standing in for the launches.

What it does not see: the CUDA context and cuBLAS/cuDNN workspaces (outside the allocator's
counters too), allocator fragmentation (``memory_reserved`` minus ``memory_allocated``), and
inductor's own buffer planning under ``torch.compile`` (which frees at last use, so it needs no
more than eager). The fake trace runs on CPU fake tensors (a CPU-only torch cannot index fake
CUDA tensors); device-dependent choices are forced to the CUDA ones: the fused kernels, the
Triton block-sparse attention, and SDPA's fused attention (output and log-sum-exp only).
"""

from __future__ import annotations

import gc
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..kernels._common import WORKSPACE_BYTES, allocator_bytes

__all__ = ["MemoryTracer", "MemoryTrace", "trace_memory", "trace_forward_memory", "allocator_bytes"]

@dataclass
class LiveTensor:
    nbytes: int
    op: str
    shape: Tuple[int, ...]
    dtype: str


@dataclass
class MemoryTrace:
    """The result of a trace. Bytes are new allocations only (what existed before is not counted)."""

    peak_bytes: int = 0
    end_bytes: int = 0  # still live when the traced function returned (its outputs, mostly)
    peak_op: str = ""
    peak_site: str = ""  # the innermost package frames calling the op at the peak
    peak_workspace_bytes: int = 0  # custom-op scratch included in peak_bytes
    live_at_peak: List[LiveTensor] = field(default_factory=list)  # largest first
    ops: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes, "end_bytes": self.end_bytes, "peak_op": self.peak_op,
            "peak_site": self.peak_site, "peak_workspace_bytes": self.peak_workspace_bytes, "ops": self.ops,
            "live_at_peak": [dict(nbytes=t.nbytes, op=t.op, shape=list(t.shape), dtype=t.dtype)
                             for t in self.live_at_peak],
        }


def _site() -> str:
    frames = [f for f in traceback.extract_stack() if "/longcat_native/" in f.filename.replace("\\", "/")
              and not f.filename.endswith("memory.py")]
    return " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))


class MemoryTracer(TorchDispatchMode):
    """``with MemoryTracer() as tr: fn()``, then ``tr.result()``. See the module doc.

    A storage is counted once, when the first op returns a tensor on it that none of the op's
    inputs shares (views and in-place ops allocate nothing), and uncounted when Python frees it.
    ``keep_top`` largest live tensors are recorded at the peak. ``collect_cycles`` runs Python's
    cycle collector before each op, for code that leaves tensors in reference cycles (the triton
    interpreter does, on CPU): the trace then counts references, not the collector's timing.
    """

    def __init__(self, keep_top: int = 12, workspace: Optional[Dict[str, Callable[..., int]]] = None,
                 collect_cycles: bool = False):
        super().__init__()
        self._collect = collect_cycles
        self._workspace = WORKSPACE_BYTES if workspace is None else workspace
        self._keep_top = keep_top
        self._live: Dict[int, LiveTensor] = {}
        self._live_bytes = 0
        self._trace = MemoryTrace()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "prim":  # metadata queries (prim.device under FakeTensorMode)
            return func(*args, **kwargs)
        if self._collect:
            gc.collect(1)  # young generations: the cycles a launch just made
        inputs = {id(a.untyped_storage()) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket._qualified_op_name).replace("::", ".")
        for o in tree_flatten(out)[0]:
            if not isinstance(o, torch.Tensor):
                continue
            st = o.untyped_storage()
            key = id(st)
            if key in inputs or key in self._live or st.nbytes() == 0:
                continue
            self._live[key] = LiveTensor(allocator_bytes(st.nbytes()), name, tuple(o.shape),
                                         str(o.dtype).replace("torch.", ""))
            self._live_bytes += self._live[key].nbytes
            weakref.finalize(st, self._free, key)
        ws_fn = self._workspace.get(name)
        ws = int(ws_fn(*args, **kwargs)) if ws_fn is not None else 0
        self._trace.ops += 1
        if self._live_bytes + ws > self._trace.peak_bytes:
            tr = self._trace
            tr.peak_bytes, tr.peak_workspace_bytes, tr.peak_op = self._live_bytes + ws, ws, name
            tr.live_at_peak = sorted(self._live.values(), key=lambda t: -t.nbytes)[: self._keep_top]
            tr.peak_site = _site()
        return out

    def _free(self, key: int) -> None:
        t = self._live.pop(key, None)
        if t is not None:
            self._live_bytes -= t.nbytes

    def result(self) -> MemoryTrace:
        self._trace.end_bytes = self._live_bytes
        return self._trace


def trace_memory(fn: Callable[..., Any], *args, collect_cycles: bool = False, **kwargs) -> Tuple[Any, MemoryTrace]:
    """Run ``fn(*args, **kwargs)`` under a :class:`MemoryTracer`; returns ``(output, trace)``."""
    with MemoryTracer(collect_cycles=collect_cycles) as tracer:
        out = fn(*args, **kwargs)
    return out, tracer.result()


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            total += allocator_bytes(st.nbytes())
    return total


def trace_forward_memory(config="longcat-video", *, batch: int = 1, latent=(24, 60, 104), text_len: int = 512,
                         bsa: bool = False, dtype=torch.bfloat16, kv_frames: int = 0,
                         config_overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Peak memory of one forward of the fused path (what ``kernels="auto"`` runs on CUDA), traced
    on fake tensors: nothing is allocated or computed. ``latent`` is (T, H, W) of the call's own
    frames; ``kv_frames`` > 0 adds a batch-1 KV cache of that many frames (continuation), which
    the forward receives as inputs. Returns bytes: ``weights``, ``inputs`` (latent, timestep, text,
    KV cache), ``activation_peak`` (the trace's peak: new allocations, custom-op scratch
    included), ``peak`` (their sum: ``max_memory_allocated`` after a fresh start), and the trace."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .dit import LongCatDiT

    dit = LongCatDiT.from_config(config, device="meta", dtype=dtype, kernels="triton", attention="sdpa",
                                 **(config_overrides or {}))
    if bsa:
        dit.enable_bsa()
    cfg = dit.config
    T, H, W = latent
    pt, ph, pw = cfg.patch_size
    with FakeTensorMode(allow_non_fake_inputs=True):
        dit = dit.to_empty(device="cpu")
        x = torch.empty(batch, cfg.in_channels, T, H, W, dtype=dtype)
        t = torch.empty(batch, dtype=torch.float32)
        text = torch.empty(batch, 1, text_len, cfg.caption_channels, dtype=dtype)
        mask = torch.ones(batch, text_len, dtype=torch.long)
        inputs = [x, t, text, mask]
        cache = None
        if kv_frames:
            n_cache = kv_frames * (H // ph) * (W // pw)
            shape = (1, cfg.num_heads, n_cache, cfg.head_dim)  # batch 1: shared by every item of the call
            cache = {i: (torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)) for i in range(cfg.depth)}
            inputs += [kv for pair in cache.values() for kv in pair]
        weights = _tensor_bytes(list(dit.parameters()) + list(dit.buffers()))
        # kernels="triton" on fake weights needs no interpreter (nothing is launched) and makes
        # block-sparse attention the Triton kernel's op (runtime.model.bsa_impl), as on CUDA.
        with torch.inference_mode():
            _, trace = trace_memory(dit, x, t, text, mask, kv_cache_dict=cache)
    input_bytes = _tensor_bytes(inputs)
    N = (T // pt) * (H // ph) * (W // pw)
    return {
        "tokens": N, "batch": batch, "latent": list(latent), "text_tokens": text_len, "bsa": bool(bsa),
        "kv_frames": kv_frames, "dtype": str(dtype).replace("torch.", ""), "weights": weights, "inputs": input_bytes,
        "activation_peak": trace.peak_bytes, "peak": weights + input_bytes + trace.peak_bytes, "trace": trace,
    }
