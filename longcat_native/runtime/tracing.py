"""Peak memory traced op by op instead of estimated by formula: ``MemoryTracer`` (real or fake
tensors), and a model's forward traced at real shapes on fake tensors (``trace_model_forward``).

The model is a parameter (``model_type``, duck typing): this module sits below the model in
``runtime/`` (weight streaming plans its activation reserve with it) and imports none of it.
``runtime/memory.py`` binds it to ``LongCatDiT`` (``trace_forward_memory``, ``activation_bytes``)
and re-exports the tracer. Design notes: docs/design/memory.md.
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

__all__ = ["MemoryTracer", "MemoryTrace", "LiveTensor", "trace_memory", "storage_bytes", "allocator_bytes",
           "trace_model_forward", "model_activation_bytes", "MODEL_PROTOCOL"]

# What trace_model_forward uses of ``model_type`` (LongCatDiT has it all).
MODEL_PROTOCOL = (
    "model_type.from_config(config, device='meta', dtype=, kernels='triton', attention='sdpa', quantize=, "
    "**overrides) -> a module with .config (patch_size, in_channels, caption_channels, num_heads, head_dim, "
    "depth), .enable_bsa(), .enable_forward_chunking(n), .to_empty(device=), the official call "
    "(x, t, text, mask, kv_cache_dict=), and for step caches .begin_cached_step / .step_cache_tail"
)


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
              and not f.filename.endswith(("tracing.py", "memory.py"))]
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


def storage_bytes(tensors) -> int:
    """Bytes the allocator holds for ``tensors``: each storage once, rounded to its block size."""
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            total += allocator_bytes(st.nbytes())
    return total


def trace_model_forward(model_type, config="longcat-video", *, batch: int = 1, latent=(24, 60, 104), text_len: int = 512,
                        bsa: bool = False, dtype=torch.bfloat16, kv_frames: int = 0,
                        config_overrides: Optional[Dict[str, Any]] = None,
                        ffn_chunk_tokens: Optional[int] = None, quantize: Optional[str] = None,
                        step_cache=None) -> Dict[str, Any]:
    """Peak memory of one forward of the fused path (what ``kernels="auto"`` runs on CUDA) of a
    ``model_type`` model of ``config``, traced on fake tensors: nothing is allocated or computed.
    ``model_type`` is the model class, used by duck typing (:data:`MODEL_PROTOCOL`);
    ``memory.trace_forward_memory`` is this for ``LongCatDiT``. ``latent`` is (T, H, W) of the
    call's own frames; ``kv_frames`` > 0 adds a batch-1 KV cache of that many frames (continuation), which
    the forward receives as inputs; ``ffn_chunk_tokens`` runs each FFN in slices of that many token
    rows (``LongCatDiT.enable_forward_chunking``); ``quantize`` builds the model with quantized block
    weights (runtime/quantize.py: int8/float8 storage + float32 scales); ``step_cache`` (a
    StepCache, runtime/step_cache.py) traces steps of a cached run instead of one forward
    (:func:`_trace_cached_steps`: its buffers live across them). Returns bytes: ``weights``,
    ``inputs`` (latent, timestep, text, KV cache), ``activation_peak`` (the trace's peak: new
    allocations, custom-op scratch and the step cache's buffers included), ``step_cache_bytes``
    (those buffers; 0 without), ``peak`` (weights + inputs + activation peak:
    ``max_memory_allocated`` after a fresh start), and the trace."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dit = model_type.from_config(config, device="meta", dtype=dtype, kernels="triton", attention="sdpa",
                                 quantize=quantize, **(config_overrides or {}))
    if bsa:
        dit.enable_bsa()
    if ffn_chunk_tokens is not None:
        dit.enable_forward_chunking(ffn_chunk_tokens)
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
        weights = storage_bytes(list(dit.parameters()) + list(dit.buffers()))
        # kernels="triton" on fake weights needs no interpreter (nothing is launched) and makes
        # block-sparse attention the Triton kernel's op (runtime.device.bsa_kernel_path), as on CUDA.
        with torch.inference_mode():
            if step_cache is None:
                _, trace = trace_memory(dit, x, t, text, mask, kv_cache_dict=cache)
                cache_bytes = 0
            else:
                if kv_frames:
                    raise ValueError("trace_forward_memory: step_cache with kv_frames is not traced (a step with "
                                     "a KV cache and a step cache runs as any other; trace them one at a time)")
                cache_bytes, trace = trace_memory(_trace_cached_steps, dit, step_cache, x, t, text, mask)
    input_bytes = storage_bytes(inputs)
    N = (T // pt) * (H // ph) * (W // pw)
    return {
        "tokens": N, "batch": batch, "latent": list(latent), "text_tokens": text_len, "bsa": bool(bsa),
        "kv_frames": kv_frames, "dtype": str(dtype).replace("torch.", ""), "weights": weights, "inputs": input_bytes,
        "activation_peak": trace.peak_bytes, "step_cache_bytes": cache_bytes,
        "peak": weights + input_bytes + trace.peak_bytes, "trace": trace,
    }


def _trace_cached_steps(dit, policy, x, t, text, mask) -> int:
    """Three steps of a run with the step cache ``policy`` (on a fresh StepCache with its
    parameters, so ``policy``'s reports are untouched), each as a CUDA graph replays it (the head
    with the signal, then a tail): two full steps (the buffers made, the signal computed against a
    reference, the middle residual or TaylorSeer's differences stored) and a cached step (the
    approximation added). Every kind of step a run takes, with the buffers alive across them, as
    in a run. Returns the buffers' bytes."""
    from .step_cache import StepCache

    sc = StepCache(**policy.params())
    sc.begin_run(dit.config.depth, [1.0, 0.5, 0.25])  # the timesteps only label a report
    for step, cached in enumerate((False, False, True)):
        sc.begin_step(step)
        s, _ = dit.begin_cached_step(x, t, text, mask, step_cache=sc)
        if not cached:
            # Fake tensors hold no values to read: given no sums, decide() takes a full step and
            # sets what store() reads. A cached tail reads only the buffers (what a graph replays).
            sc.decide(None)
        dit.step_cache_tail(s, sc, cached)
        del s
    return storage_bytes(sc.buffers.tensors())


def model_activation_bytes(model_type, cfg, latent, batch: int, dtype, kv_frames: int = 0, bsa: bool = False,
                           text_len: int = 512, quantize: Optional[str] = None) -> Dict[str, Any]:
    """Peak activation memory of one forward of the fused path (what runs on CUDA) of a
    ``model_type`` model, traced by :func:`trace_model_forward` at ``latent`` = (T, H, W): the largest set of live tensors the
    forward allocates, custom-op scratch included, weights and inputs not. ``kv_frames`` > 0: a
    batch-1 KV cache of that many frames is an input, reported as ``kv_cache_bytes``; ``quantize``
    traces the quantized model (runtime/quantize.py). Not counted: the CUDA context, cuBLAS/cuDNN
    workspaces and allocator fragmentation."""
    r = trace_model_forward(model_type, cfg, batch=batch, latent=tuple(latent), text_len=text_len, bsa=bsa, dtype=dtype,
                            kv_frames=kv_frames, quantize=quantize)
    T, H, W = latent
    es = torch.empty((), dtype=dtype).element_size()
    kv_cache = 2 * cfg.depth * kv_frames * (H // cfg.patch_size[1]) * (W // cfg.patch_size[2]) * cfg.hidden_size * es
    return {"tokens": r["tokens"], "peak_activation_bytes": r["activation_peak"], "kv_cache_bytes": kv_cache,
            "peak_forward_bytes": r["peak"], "peak_op": r["trace"].peak_op, "peak_site": r["trace"].peak_site}
