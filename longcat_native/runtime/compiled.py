"""The compiled runtime: ``compile_model`` (torch.compile with per-device defaults, bounded and
reported recompiles) and ``CUDAGraphRunner`` (whole-forward CUDA graphs with an LRU of shapes).

Design notes: docs/design/compiled.md.
"""

from __future__ import annotations

import collections
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch

from . import sharding
from .dit import LongCatDiT

__all__ = ["compile_model", "CompiledModel", "CUDAGraphRunner", "default_compile_mode", "graph_runner_for",
           "release_graphs"]


def default_compile_mode(device) -> str:
    """"default" everywhere (docs/design/compiled.md names the CUDA alternative)."""
    return "default"


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _describe_inputs(example_inputs) -> List[Any]:
    out = []
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            out.append(tuple(t.shape))
    return out


class CompiledModel:
    """A compiled DiT: call it like the model. ``stats()`` reports compilations."""

    def __init__(self, model, mode=None, fullgraph=True, dynamic=False, backend="inductor",
                 recompile_limit: int = 8, options: Optional[Dict[str, Any]] = None, warn_on_recompile=True,
                 regional: bool = False):
        self.model = model
        self.regional = bool(regional)
        self.mode = default_compile_mode(_model_device(model)) if mode is None else mode
        self.recompile_limit = int(recompile_limit)
        self.warn_on_recompile = warn_on_recompile
        self._compiles: List[Dict[str, Any]] = []
        self._calls = 0
        self._eager_calls = 0
        if backend == "inductor":
            inner = torch._TorchCompileInductorWrapper(self.mode, options, dynamic)
        elif isinstance(backend, str):
            inner = torch._dynamo.lookup_backend(backend)
        else:
            inner = backend

        def counting_backend(gm, example_inputs):
            shapes = _describe_inputs(example_inputs)
            t0 = time.perf_counter()
            compiled = inner(gm, example_inputs)
            self._compiles.append({"input_shapes": shapes, "seconds": time.perf_counter() - t0})
            if len(self._compiles) > 1 and self.warn_on_recompile:
                warnings.warn(f"longcat_native.compile: recompiling ({len(self._compiles) - 1} recompile(s) so far, "
                              f"limit {self.recompile_limit}) for graph inputs {shapes}", stacklevel=2)
            return compiled

        # A model sharded with shard_weights (runtime/sharding.py): dynamo refuses FSDP2's hooks
        # (marked skipped), so only the block body is compiled and the hooks' work runs eagerly
        # around it; a whole-forward compile would trace every hook.
        sharded = sharding.is_sharded(_base_model(model))
        if sharded and not self.regional:
            raise ValueError("a model built with shard_weights=True compiles regionally only "
                             "(compile(dit, regional=True)): FSDP2 gathers each block in hooks around the block "
                             "call, which torch.compile does not trace; the regional compile runs them eagerly "
                             "around the compiled block")
        # mode is applied through the inductor wrapper (torch.compile forbids mode with a backend).
        target = (_call_block_forward if sharded else _call_block) if self.regional else model
        self.compiled = torch.compile(target, backend=counting_backend, fullgraph=fullgraph, dynamic=dynamic)
        if sharded:
            self.compiled = sharding.block_runner(_base_model(model), self.compiled)
        # A whole-forward compile cannot hold a step cache's data-dependent skip (a host read
        # between the first blocks and the rest): steps with an active StepCache run the blocks
        # through a regional compile of one block, made on first use (docs/design/step_cache.md).
        self._block_compile = lambda: torch.compile(_call_block, backend=counting_backend, fullgraph=fullgraph,
                                                    dynamic=dynamic)
        self._step_cache_blocks = None

    def step_cache_block_fn(self):
        """The compiled block a step with a step cache runs its blocks through (the regional
        compile, or one made on first use for a whole-forward compile)."""
        if self.regional:
            return self.compiled
        if self._step_cache_blocks is None:
            self._step_cache_blocks = self._block_compile()
        return self._step_cache_blocks

    def __call__(self, *args, **kwargs):
        self._calls += 1
        try:
            with torch._dynamo.config.patch(recompile_limit=self.recompile_limit):
                if kwargs.get("step_cache") is not None and not self.regional:
                    return self.model(*args, block_fn=self.step_cache_block_fn(), **kwargs)
                if not self.regional:
                    return self.compiled(*args, **kwargs)
                return self.model(*args, block_fn=self.compiled, **kwargs)
        except _LIMIT_ERRORS:
            # fullgraph=True turns "recompile limit hit" into an error: run this shape eagerly.
            self._eager_calls += 1
            if self._eager_calls == 1:
                warnings.warn(f"longcat_native.compile: recompile limit ({self.recompile_limit}) reached; "
                              "new shapes run eagerly (raise recompile_limit, or keep the shapes of a run few)",
                              stacklevel=2)
            return self.model(*args, **kwargs)

    def stats(self) -> Dict[str, Any]:
        n = len(self._compiles)
        return {
            "mode": self.mode,
            "regional": self.regional,
            "calls": self._calls,
            "compiles": n,
            "recompiles": max(0, n - 1),
            "recompile_limit": self.recompile_limit,
            "eager_calls_past_limit": self._eager_calls,
            "compile_seconds": sum(c["seconds"] for c in self._compiles),
            "graphs": [dict(c) for c in self._compiles],
        }

    def __getattr__(self, name):
        # Only reached for attributes not set in __init__: the model's (config, dtype, ...).
        if name in ("model", "compiled"):
            raise AttributeError(name)
        return getattr(self.model, name)


def compile_model(model, mode: Optional[str] = None, fullgraph: bool = True, dynamic: bool = False,
                  backend="inductor", recompile_limit: int = 8, options: Optional[Dict[str, Any]] = None,
                  warn_on_recompile: bool = True, regional: bool = False) -> CompiledModel:
    """``torch.compile`` the DiT with this runtime's defaults (docs/design/compiled.md): the whole forward, or
    with ``regional=True`` one block shared by all blocks (far less compile time per shape);
    returns a :class:`CompiledModel` (call it like the model; ``.stats()`` for compile counts)."""
    return CompiledModel(model, mode=mode, fullgraph=fullgraph, dynamic=dynamic, backend=backend,
                         recompile_limit=recompile_limit, options=options, warn_on_recompile=warn_on_recompile,
                         regional=regional)


def _call_block(block, *args):
    """What regional compilation compiles: one block's call, the block an argument."""
    return torch.nn.Module.__call__(block, *args)


def _call_block_forward(block, *args):
    """What regional compilation compiles for a sharded model: the block's body without its
    module hooks (FSDP2's, run by ``sharding.block_runner`` around this)."""
    return type(block).forward(block, *args)


def _base_model(model):
    return model.model if isinstance(model, CompiledModel) else model


# ---------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------

_LIMIT_ERRORS = tuple(e for e in (getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None),
                                  getattr(torch._dynamo.exc, "FailOnCacheLimitHit", None)) if e is not None)

_TENSOR_ARGS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask")


def cuda_graph_capture(fn: Callable[..., torch.Tensor], static: Dict[str, Any], pool=None, warmup: int = 2):
    """Warm ``fn(**static)`` up on a side stream, capture it into a CUDA graph in ``pool``;
    returns ``(replay, static_output)``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn(**static)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(**static)
    return graph.replay, out


def _error_line(e: BaseException) -> str:
    """``Type: first line of the message`` (200 characters at most), for a one-line warning."""
    msg = str(e)
    return f"{type(e).__name__}: {msg.splitlines()[0][:200] if msg else ''}"


class _Entry:
    __slots__ = ("static", "replay", "output", "replays")

    def __init__(self, static, replay, output):
        self.static, self.replay, self.output, self.replays = static, replay, output, 0


class _CachedStepEntry:
    """One shape's graphs for steps with a step cache (docs/design/step_cache.md): the head
    (embedding, the first Fn blocks, the signal sums) and a tail per decision (full: the middle
    blocks and the store; cached: the cached residual added), each captured on first use. The
    tails read the head's stream tensors and the cache's buffers, which this entry keeps."""

    __slots__ = ("static", "head", "sums", "stream", "buffers", "tails", "eager_tails", "replays", "cache")

    def __init__(self, static, head, sums, stream, buffers, cache):
        self.static, self.head, self.sums, self.stream, self.buffers = static, head, sums, stream, buffers
        # {"sc": the StepCache of the current step}: what the parts' Python (a warm-up, a
        # stand-in capture) calls; a real graph only reads the buffers' fixed storage.
        self.cache = cache
        self.tails: Dict[bool, tuple] = {}  # cached -> (replay, output)
        self.eager_tails: set = set()  # decisions whose tail failed to capture: run eagerly on the stream
        self.replays = 0


class CUDAGraphRunner:
    """Whole-forward CUDA graphs per input shape (docs/design/compiled.md). Call it like the DiT.
    With a step cache a step is captured in parts around the decision: :class:`_CachedStepEntry`."""

    def __init__(self, model, max_graphs: int = 4, text_len: Optional[int] = None, fallback: Optional[Callable] = None,
                 capture_fn: Optional[Callable] = None, warmup: int = 2, clone_output: bool = True, pool=None):
        if max_graphs < 1:
            raise ValueError("max_graphs must be >= 1")
        self.model = model
        self.fn = fallback if fallback is not None else model  # what is captured, and what runs uncaptured
        self.max_graphs = int(max_graphs)
        self.text_len = text_len
        self.warmup = warmup
        self.clone_output = clone_output
        self._custom_capture = capture_fn is not None
        self._capture_fn = capture_fn
        self._pool = pool
        self._graphs: "collections.OrderedDict[tuple, _Entry]" = collections.OrderedDict()
        self._uncapturable: set = set()
        self._warned: set = set()
        self._stats = collections.Counter()
        self._fallback_reasons: collections.Counter = collections.Counter()
        self._weights_seen: Optional[tuple] = None  # weight storages the captured graphs read

    # -- attribute access falls through to the model ------------------------------------------
    def __getattr__(self, name):
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    # -- keys ---------------------------------------------------------------------------------
    def _zero_pad_mode(self) -> bool:
        cfg = getattr(self.model, "config", None)
        return bool(getattr(cfg, "text_tokens_zero_pad", False))

    def prepare_text(self, text, mask):
        """``(text, mask)`` padded to ``text_len`` tokens with the mask marking the padding, when
        padding is exact (docs/design/compiled.md); unchanged otherwise. mask ``[B, 1, 1, L]`` becomes ``[B, L]``."""
        if text is None:
            return text, mask
        if mask is not None and mask.dim() == 4:
            mask = mask[:, 0, 0]
        L = text.shape[-2]
        if self.text_len is None or L >= self.text_len or self._zero_pad_mode():
            return text, mask
        pad = self.text_len - L
        B = text.shape[0]
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=text.device)
        mask = torch.cat([mask != 0, torch.zeros(B, pad, dtype=torch.bool, device=mask.device)], dim=-1)
        text = torch.nn.functional.pad(text, [0, 0, 0, pad])  # [B, (1,) L, C]: pads the token dim
        return text, mask

    def key(self, inputs: Dict[str, Any], num_cond_latents: int, skip_crs_attn: bool) -> tuple:
        """The capture key of a call (after text padding)."""
        m = self.model
        parts: List[Any] = []
        for name in _TENSOR_ARGS:
            t = inputs.get(name)
            parts.append(None if t is None else (name, tuple(t.shape), str(t.dtype)))
        cfg = getattr(m, "config", None)
        active = tuple(getattr(m, "active_loras", ()) or ())
        mode = getattr(m, "lora_mode", None) if active else None
        kernels = attention = None
        try:
            kernels = m.resolved_kernels()
            attention = m.resolved_attention()
        except Exception:  # noqa: BLE001 - a fake model in tests; not part of the key then
            pass
        # BSA's parameters (sparsity, chunk shapes) are Python values baked into a graph.
        bsa = None
        if getattr(cfg, "enable_bsa", False):
            bsa = tuple((k, repr(v)) for k, v in sorted(getattr(cfg, "bsa", {}).items()))
        # The FFN slicing (LongCatDiT.enable_forward_chunking) is a Python loop baked into a graph.
        ffn_chunk = getattr(m, "ffn_chunk_tokens", None)
        return tuple(parts) + (int(num_cond_latents), bool(skip_crs_attn), torch.is_inference_mode_enabled(),
                               bsa, kernels, attention, active, mode, ffn_chunk)

    def weights_fingerprint(self) -> tuple:
        """The storages a captured graph reads besides its static inputs: every parameter and
        buffer of the model and every unmerged LoRA branch (runtime/lora.py), with the branch
        scales (Python floats baked into the graph). For the real config that is 974 tensors,
        about 3 ms of Python on a 2-core CPU, against seconds per 480p forward."""
        m = self.model.model if isinstance(self.model, CompiledModel) else self.model
        if not isinstance(m, torch.nn.Module):
            return ()
        parts: List[Any] = [t.data_ptr() for t in m.parameters()]
        parts += [t.data_ptr() for t in m.buffers()]
        for mod in m.modules():
            for down, up, scale, row0 in getattr(mod, "lora_branches", ()):
                parts += (down.data_ptr(), up.data_ptr(), float(scale), int(row0))
        return tuple(parts)

    def _check_weights(self) -> None:
        """Drop every graph when a weight storage the graphs read has moved (docs/design/compiled.md)."""
        fp = self.weights_fingerprint()
        if fp != self._weights_seen:
            if self._graphs:
                self._graphs.clear()
                self._stats["weight_invalidations"] += 1
            self._weights_seen = fp

    # -- calling ------------------------------------------------------------------------------
    def _fallback_reason(self, return_kv, kv_cache_dict, offload_kv_cache, num_cond_latents) -> Optional[str]:
        if not self._custom_capture and _model_device(self.model).type != "cuda":
            return "the model is not on a CUDA device"
        if return_kv:
            return "return_kv=True (the per-block KV outputs are not captured)"
        if kv_cache_dict:
            return "a kv_cache_dict (host-offloaded or per-call KV caches are not captured)"
        if offload_kv_cache:
            return "offload_kv_cache=True (host copies on side streams cannot be captured)"
        if isinstance(num_cond_latents, torch.Tensor):
            return "a tensor num_cond_latents (pass an int)"
        if getattr(self.model, "cp", None) is not None:
            # NCCL can be captured, but the all-to-alls have not been validated under capture
            # on a multi-GPU machine yet; eager/compiled collectives are the safe default.
            return "context parallelism (collectives are not captured)"
        return None

    def _warn_once(self, reason: str) -> None:
        self._fallback_reasons[reason] += 1
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"CUDAGraphRunner: {reason}; running without CUDA graphs", stacklevel=3)

    def __call__(self, hidden_states, timestep, encoder_hidden_states=None, encoder_attention_mask=None,
                 num_cond_latents=0, return_kv=False, kv_cache_dict=None, skip_crs_attn=False,
                 offload_kv_cache=False, step_cache=None):
        sc_kw = {} if step_cache is None else {"step_cache": step_cache}
        reason = self._fallback_reason(return_kv, kv_cache_dict, offload_kv_cache, num_cond_latents)
        if reason is not None:
            self._warn_once(reason)
            return self.fn(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                           num_cond_latents=num_cond_latents, return_kv=return_kv, kv_cache_dict=kv_cache_dict,
                           skip_crs_attn=skip_crs_attn, offload_kv_cache=offload_kv_cache, **sc_kw)
        text, mask = (None, None) if skip_crs_attn else self.prepare_text(encoder_hidden_states, encoder_attention_mask)
        inputs = {"hidden_states": hidden_states, "timestep": timestep, "encoder_hidden_states": text,
                  "encoder_attention_mask": mask}
        k = self.key(inputs, num_cond_latents, skip_crs_attn)
        if step_cache is not None:  # Fn, Bn and the TaylorSeer order are baked into the parts
            k = k + (("step_cache",) + step_cache.graph_key(),)
        self._check_weights()
        if k in self._uncapturable:
            self._warn_once("capture failed for this shape earlier")
            return self.fn(**inputs, num_cond_latents=num_cond_latents, skip_crs_attn=skip_crs_attn, **sc_kw)
        if step_cache is not None:
            return self._cached_step(k, inputs, num_cond_latents, skip_crs_attn, step_cache)
        entry = self._entry_for(k, inputs, lambda: self._capture(k, inputs, num_cond_latents, skip_crs_attn))
        if entry is None:
            return self.fn(**inputs, num_cond_latents=num_cond_latents, skip_crs_attn=skip_crs_attn)
        entry.replay()
        entry.replays += 1
        self._stats["replays"] += 1
        return entry.output.clone() if self.clone_output else entry.output

    def _capture_graph(self, fn, static):
        """``(replay, output)`` of ``fn(**static)`` captured (the test hook ``capture_fn``, or a
        CUDA graph in the runner's one pool)."""
        if self._custom_capture:
            return self._capture_fn(fn, static)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return cuda_graph_capture(fn, static, pool=self._pool, warmup=self.warmup)

    def _entry_for(self, k, inputs, capture):
        """Key ``k``'s entry with the call's inputs in its static buffers; ``capture()`` makes a
        new one (None: the capture failed)."""
        entry = self._graphs.get(k)
        if entry is None:
            return capture()
        self._graphs.move_to_end(k)
        with torch.no_grad():
            for name, t in inputs.items():
                if t is not None:
                    entry.static[name].copy_(t)
        return entry

    def _prepare_capture(self, inputs) -> Dict[str, Any]:
        """Room for one more entry (the least recently used ones evicted) and the static copies
        of ``inputs`` on the model's device, which the new entry's graphs read."""
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)  # least recently used
            self._stats["evictions"] += 1
        dev = _model_device(self.model)
        return {name: (None if t is None else t.detach().to(dev).clone()) for name, t in inputs.items()}

    def _capture(self, k, inputs, num_cond_latents, skip_crs_attn) -> Optional[_Entry]:
        static = self._prepare_capture(inputs)
        fn = self.fn

        def forward(**kw):
            with torch.no_grad():
                return fn(**kw, num_cond_latents=num_cond_latents, skip_crs_attn=skip_crs_attn)

        try:
            replay, out = self._capture_graph(forward, static)
        except Exception as e:  # noqa: BLE001 - any capture failure falls back, once per key
            self._uncapturable.add(k)
            self._warn_once(f"CUDA graph capture failed ({_error_line(e)})")
            return None
        entry = _Entry(static, replay, out)
        self._graphs[k] = entry
        self._stats["captures"] += 1
        return entry  # capture only records kernels: the caller replays to compute this call

    # -- steps with a step cache -----------------------------------------------------------------
    def _base_and_block_fn(self):
        block_fn = self.fn.step_cache_block_fn() if isinstance(self.fn, CompiledModel) else None
        base = self.model.model if isinstance(self.model, CompiledModel) else self.model
        return base, block_fn

    def _cached_step(self, k, inputs, num_cond_latents, skip_crs_attn, sc):
        """One step with a step cache: replay the head, read the signal (the step's one host
        read, in ``sc.decide``), replay the tail of the decision. Each part is captured on first
        use; a part that fails to capture runs uncaptured (the whole step when the head does)."""
        entry = self._entry_for(k, inputs, lambda: self._capture_head(k, inputs, num_cond_latents, skip_crs_attn, sc))
        if entry is None:
            return self.fn(**inputs, num_cond_latents=num_cond_latents, skip_crs_attn=skip_crs_attn, step_cache=sc)
        sc.adopt_buffers(entry.buffers)
        entry.cache["sc"] = sc
        entry.head()
        cached = sc.decide(entry.sums if sc.needs_signal() else None)
        tail = entry.tails.get(cached)
        if tail is None and cached not in entry.eager_tails:
            tail = self._capture_tail(entry, sc, cached)
            entry.head()  # the tail's warm-up runs consumed the head's outputs (q is written into h)
        entry.replays += 1
        if tail is None:
            base, _ = self._base_and_block_fn()
            with torch.no_grad():
                return base.step_cache_tail(entry.stream.copy(), sc, cached)
        tail[0]()
        self._stats["replays"] += 1
        return tail[1].clone() if self.clone_output else tail[1]

    def _capture_head(self, k, inputs, num_cond_latents, skip_crs_attn, sc) -> Optional[_CachedStepEntry]:
        static = self._prepare_capture(inputs)
        base, block_fn = self._base_and_block_fn()
        last, cache = {}, {"sc": sc}

        def head(**kw):
            with torch.no_grad():
                s, sums = base.begin_cached_step(**kw, num_cond_latents=num_cond_latents, skip_crs_attn=skip_crs_attn,
                                                 step_cache=cache["sc"], block_fn=block_fn)
            last["stream"] = s
            return (sums, *s.tensors())

        try:
            replay, out = self._capture_graph(head, static)
        except Exception as e:  # noqa: BLE001 - any capture failure falls back, once per key
            self._mark_buffers_used_here(sc)
            self._uncapturable.add(k)
            self._warn_once(f"CUDA graph capture failed ({_error_line(e)})")
            return None
        self._mark_buffers_used_here(sc)
        # The captured call's stream: its tensors are the ones a replay writes.
        entry = _CachedStepEntry(static, replay, out[0], last["stream"], sc.buffers, cache)
        self._graphs[k] = entry
        self._stats["captures"] += 1
        return entry

    def _mark_buffers_used_here(self, sc) -> None:
        """The cache's buffers may have been made by a warm-up run on the capture's side stream;
        they are used on this one from now on, so the allocator must not reuse them early."""
        if sc.buffers is not None and not self._custom_capture and torch.cuda.is_available():
            stream = torch.cuda.current_stream()
            for t in sc.buffers.tensors():
                if t.is_cuda:
                    t.record_stream(stream)

    def _capture_tail(self, entry: _CachedStepEntry, sc, cached: bool):
        base, _ = self._base_and_block_fn()

        def tail():
            with torch.no_grad():
                return base.step_cache_tail(entry.stream.copy(), entry.cache["sc"], cached)

        # The warm-up runs of a full tail store into the buffers (TaylorSeer's differences are
        # not idempotent): what they held is put back before the real replay.
        saved = entry.buffers.snapshot() if not cached else None
        try:
            tail_graph = self._capture_graph(tail, {})
        except Exception as e:  # noqa: BLE001 - this decision's tail runs uncaptured from now on
            entry.eager_tails.add(cached)
            self._warn_once(f"CUDA graph capture of a {'cached' if cached else 'full'} step's tail failed "
                            f"({_error_line(e)})")
            tail_graph = None
        if saved is not None:
            entry.buffers.restore(saved)
        if tail_graph is not None:
            entry.tails[cached] = tail_graph
            self._stats["captures"] += 1
        return tail_graph

    # -- introspection ------------------------------------------------------------------------
    def keys(self) -> List[tuple]:
        """Captured keys, least recently used first."""
        return list(self._graphs.keys())

    def reset(self) -> None:
        """Drop every captured graph and forget failed captures (weights that move are noticed
        on their own: docs/design/compiled.md)."""
        self._graphs.clear()
        self._uncapturable.clear()
        self._weights_seen = None

    def stats(self) -> Dict[str, Any]:
        return {
            "graphs": len(self._graphs),
            "max_graphs": self.max_graphs,
            "captures": self._stats["captures"],
            "replays": self._stats["replays"],
            "evictions": self._stats["evictions"],
            "weight_invalidations": self._stats["weight_invalidations"],
            "fallbacks": dict(self._fallback_reasons),
            "uncapturable_keys": len(self._uncapturable),
        }


# -- the pipelines' runner ---------------------------------------------------------------------


def _graphs_supported(model) -> bool:
    """Whole-forward graphs apply to a CUDA model without context parallelism or weight sharding
    (FSDP2 swaps each block's parameters between its shard and the gathered copy every call)."""
    return (_model_device(model).type == "cuda" and getattr(model, "cp", None) is None
            and not sharding.is_sharded(model))


def graph_runner_for(dit, graphs="auto"):
    """What ``denoise`` (and so every pipeline) calls each step: a :class:`CUDAGraphRunner` over
    ``dit`` when graphs apply, else ``dit`` itself.

    ``graphs``: ``"auto"`` (default) uses graphs for a ``LongCatDiT`` (or a :class:`CompiledModel`
    of one, which then is what gets captured) on CUDA without context parallelism, and quietly
    returns ``dit`` elsewhere; ``True`` requires them (a clear error where they cannot apply);
    ``False`` never. A passed-in :class:`CUDAGraphRunner` is used as it is. The runner is kept on
    the model (``dit.graph_runner``), so successive pipeline calls (segments of a long video, the refinement stage)
    replay graphs captured earlier; :func:`release_graphs` frees them.
    """
    if graphs not in (True, False, "auto"):
        raise ValueError(f"graphs must be True, False or 'auto', got {graphs!r}")
    if graphs is False or isinstance(dit, CUDAGraphRunner):
        return dit
    base = dit.model if isinstance(dit, CompiledModel) else dit
    if not isinstance(base, LongCatDiT) or not _graphs_supported(base):
        if graphs is True:
            where = ("not a LongCatDiT" if not isinstance(base, LongCatDiT) else
                     "under context parallelism" if getattr(base, "cp", None) is not None else
                    "sharded (shard_weights=True)" if sharding.is_sharded(base) else
                     f"on {_model_device(base)}, not CUDA")
            raise ValueError(f"graphs=True needs a LongCatDiT on a CUDA device; the model is {where}. "
                             "Use graphs='auto' or False.")
        return dit
    runner = base.graph_runner
    if runner is None or runner.fn is not dit:
        runner = base.graph_runner = CUDAGraphRunner(base, fallback=None if dit is base else dit)
    return runner


def release_graphs(dit) -> bool:
    """Drop the graphs :func:`graph_runner_for` captured for ``dit`` and return their memory to the
    device (the pipelines call it before the VAE decodes, which needs that memory more than the
    next denoising call needs the graphs: a later call captures again, once). True if any were held."""
    base = dit.model if isinstance(dit, (CompiledModel, CUDAGraphRunner)) else dit
    runner = getattr(base, "graph_runner", None)
    if runner is None:
        return False
    base.graph_runner = None
    runner.reset()
    if _model_device(base).type == "cuda":
        torch.cuda.empty_cache()
    return True
