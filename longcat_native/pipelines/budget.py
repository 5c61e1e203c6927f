"""A device memory budget for a whole generation run: every stage traced, the settings that fit.

``plan_memory(budget)`` answers "does the official run fit this card, and how": it traces the
device peak of every stage of the run (the umT5 text encoder, each denoising pass, each VAE
encode and decode) with the memory tracer (runtime/memory.py: the real code of our DiT, of
transformers' umT5 and of diffusers' Wan VAE, run at the real shapes on fake tensors: nothing is
allocated or computed), then picks, in this order, the cheapest settings that fit:

1. forward chunking of the DiT (the same math in more launches) when a denoising pass needs it;
2. as many DiT blocks resident as the largest denoising pass allows, the others streamed
   (runtime/streaming.py): every streamed block crosses the bus every forward;
3. model offload (diffusers' ``enable_model_cpu_offload``): the DiT (a streamed one: its resident
   part) waits in host memory while the text encoder or the VAE runs, when they do not fit beside
   it: once per stage, not once per step (the text encoder is on the device only while it
   encodes in any case);
4. the text encoder layer by layer (``enable_sequential_cpu_offload``) when it does not fit alone;
5. VAE tiling when a whole-frame decode or encode does not fit even alone (this one CHANGES
   PIXELS at the tile seams; the plan says so and the pipeline warns).

Before any of that, the run's floor (each stage's weights, inputs and overhead with every allowed
setting on, from sizes alone) is compared with the budget: when it is over, the plan gives up
without tracing (``plan.traced`` False), since no setting could make the run fit.

A stage's peak is the bytes PyTorch allocates on the device: the weights resident during it,
its inputs and outputs, its traced activation peak, and ``overhead_bytes`` (1 GiB: the CUDA
context, cuBLAS workspaces and the caching allocator's slack, which the tracer cannot see).
Design notes: docs/design/memory.md.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..runtime.names import parse_bytes
from .shapes import VAE_SPACE_STRIDE, VAE_TIME_STRIDE, latent_size, refine_frame_padding

__all__ = ["Stage", "StagePlan", "MemoryPlan", "official_t2v_stages", "plan_memory", "format_plan",
           "trace_text_encoder", "trace_vae", "dit_device_bytes", "UMT5_XXL_CONFIG", "OVERHEAD_BYTES", "CHUNK_TOKENS"]

GiB = 1024 ** 3
OVERHEAD_BYTES = GiB  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack: not traced
CHUNK_TOKENS = 16384  # forward-chunking slice (runtime/dit.py enable_forward_chunking's default)

# The official text encoder (google/umt5-xxl's encoder, as in the checkpoint's text_encoder/):
# used when no checkpoint folder is given. 5.68e9 parameters.
UMT5_XXL_CONFIG = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
                   "vocab_size": 256384, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
                   "relative_attention_max_distance": 128, "is_encoder_decoder": False}
# The Wan VAE's T-dependence is traced at these latent frame counts and extended linearly (see
# trace_vae); tests/test_budget.py checks the line against a full trace.
_VAE_TRACE_FRAMES = (3, 4)


@dataclass(frozen=True)
class Stage:
    """One stage of a run: ``kind`` "text_encode" (``batch`` prompts of ``tokens``), "denoise"
    (a DiT forward on ``latent`` = (T, H, W), ``batch`` with CFG, ``bsa``), "vae_decode" or
    "vae_encode" (of ``latent`` frames, batch 1)."""

    name: str
    kind: str
    batch: int = 1
    latent: Tuple[int, int, int] = (0, 0, 0)
    tokens: int = 512
    bsa: bool = False


def official_t2v_stages(num_frames: int = 93, size: Tuple[int, int] = (480, 832),
                        refine_size: Tuple[int, int] = (704, 1280), refine: bool = True) -> List[Stage]:
    """The official 3-stage text-to-video run: the prompts (positive and negative) encoded; the
    480p 50-step CFG base (batch 2) and the 16-step distilled pass (batch 1, same latent; its peak is
    the base's or less, so it is not a stage of its own); the stage-1 video decoded; then the 720p
    refinement: the doubled, upsampled video encoded, 5 BSA steps without CFG, decoded."""
    lat = latent_size(num_frames, *size)
    stages = [Stage("text_encode", "text_encode", batch=2),
              Stage("denoise_480p", "denoise", batch=2, latent=lat),
              Stage("vae_decode_480p", "vae_decode", latent=lat)]
    if refine:
        pad = refine_frame_padding(num_frames)
        n = pad["noise_latents"] + pad["cond_latents"]
        rl = (n, refine_size[0] // VAE_SPACE_STRIDE, refine_size[1] // VAE_SPACE_STRIDE)
        stages += [Stage("vae_encode_720p", "vae_encode", latent=rl),
                   Stage("denoise_720p", "denoise", batch=1, latent=rl, bsa=True),
                   Stage("vae_decode_720p", "vae_decode", latent=rl)]
    return stages


# -- traced pieces ---------------------------------------------------------------------------------

def _bytes_of(tensors) -> int:
    from ..runtime.memory import storage_bytes  # one storage counted once, in allocator blocks

    return storage_bytes(list(tensors))


@functools.lru_cache(maxsize=16)
def _dit_sizes(cfg_json: str, dtype: torch.dtype, quantize: Optional[str]):
    from ..runtime.dit import LongCatDiT
    from ..runtime.streaming import block_sizes

    return block_sizes(LongCatDiT.from_config(json.loads(cfg_json), device="meta", dtype=dtype, quantize=quantize))


@functools.lru_cache(maxsize=16)
def _dit_shard_sizes(cfg_json: str, dtype: torch.dtype, quantize: Optional[str]):
    from ..runtime.dit import LongCatDiT
    from ..runtime.sharding import shard_sizes

    return shard_sizes(LongCatDiT.from_config(json.loads(cfg_json), device="meta", dtype=dtype, quantize=quantize))


def dit_device_bytes(cfg, dtype=torch.bfloat16, quantize: Optional[str] = None,
                     resident_blocks: Optional[int] = None, shard_ranks: int = 1) -> Dict[str, int]:
    """The DiT's weight bytes on the device (runtime/streaming.py's rule, on a meta model): with
    ``resident_blocks`` (None: all) resident and the rest streamed, the resident weights, the
    staging sets, their total, and the bytes streamed per forward. ``shard_ranks`` > 1
    (``shard_weights=True`` over that many ranks, runtime/sharding.py; no streaming): ONE rank's
    bytes, ``shards`` (its 1/N of the blocks) + ``replicated`` (the root) + ``gathered`` (the
    block running and the one prefetched, whole) = ``total``."""
    from ..runtime.sharding import sharded_device_bytes
    from ..runtime.streaming import sized_device_bytes

    cfg = _config(cfg)
    if shard_ranks > 1:
        if resident_blocks is not None:
            raise ValueError("sharded weights do not stream: resident_blocks goes with shard_ranks=1")
        return sharded_device_bytes(_dit_shard_sizes(json.dumps(cfg.to_dict(), sort_keys=True), dtype, quantize),
                                    shard_ranks)
    sizes = _dit_sizes(json.dumps(cfg.to_dict(), sort_keys=True), dtype, quantize)
    r = cfg.depth if resident_blocks is None else resident_blocks
    resident, staging = sized_device_bytes(sizes, r)
    return {"resident": resident, "staging": staging, "total": resident + staging,
            "streamed_per_forward": sum(p for p, _ in sizes[2][r:])}


@functools.lru_cache(maxsize=64)
def _denoise_activation(cfg_json: str, batch: int, latent: Tuple[int, int, int], bsa: bool, dtype: torch.dtype,
                        quantize: Optional[str], chunk: Optional[int], text_len: int,
                        cache_params: Optional[Tuple[Tuple[str, Any], ...]] = None) -> Tuple[int, int, int, str]:
    """(inputs, activation peak, step-cache buffers, peak op) of a denoising pass, traced;
    ``cache_params`` (a StepCache's params() as sorted items, hashable for the cache of traces)
    traces the steps of a cached run (runtime/memory.py ``trace_forward_memory``)."""
    from ..runtime.memory import trace_forward_memory

    step_cache = None
    if cache_params is not None:
        from ..runtime.step_cache import StepCache

        step_cache = StepCache(**dict(cache_params))
    r = trace_forward_memory(json.loads(cfg_json), batch=batch, latent=latent, bsa=bsa, dtype=dtype,
                             text_len=text_len, ffn_chunk_tokens=chunk, quantize=quantize, step_cache=step_cache)
    return r["inputs"], r["activation_peak"], r["step_cache_bytes"], r["trace"].peak_op


def _umt5_meta(config_json: Optional[str], dtype: torch.dtype):
    """transformers' ``UMT5EncoderModel`` of ``config_json`` (default :data:`UMT5_XXL_CONFIG`) on
    the meta device, in ``dtype``."""
    from .media import require

    transformers = require("transformers")
    cfg = dict(UMT5_XXL_CONFIG if config_json is None else json.loads(config_json))
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path"):
        cfg.pop(key, None)
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(transformers.UMT5Config(**cfg))
    return model.to(dtype).eval()


def _wan_vae_meta(config_json: Optional[str], dtype: torch.dtype):
    """diffusers' ``AutoencoderKLWan`` of ``config_json`` (default the Wan 2.1 VAE) on the meta
    device, in ``dtype``."""
    from .media import require

    diffusers = require("diffusers")
    cfg = {} if config_json is None else {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        vae = diffusers.AutoencoderKLWan(**cfg)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # its "cast with torch_dtype" advice is for loading
    try:
        return vae.to(dtype).eval()
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)


@functools.lru_cache(maxsize=8)
def trace_text_encoder(config_json: Optional[str] = None, batch: int = 2, tokens: int = 512,
                       dtype: torch.dtype = torch.bfloat16) -> Dict[str, Any]:
    """transformers' ``UMT5EncoderModel`` of ``config_json`` (default :data:`UMT5_XXL_CONFIG`)
    encoding ``batch`` prompts of ``tokens``, traced on fake tensors: weights, inputs + output,
    activation peak (bytes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..runtime.memory import trace_memory

    model = _umt5_meta(config_json, dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        model.tie_weights()  # to_empty makes new tensors: the shared embedding is one table again
        ids = torch.zeros(batch, tokens, dtype=torch.long)
        mask = torch.ones(batch, tokens, dtype=torch.long)
        weights = _bytes_of(list(model.parameters()) + list(model.buffers()))
        with torch.inference_mode():
            out, trace = trace_memory(lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state)
        io = _bytes_of([ids, mask])
        from .components import layer_pieces

        largest = max(_bytes_of(list(m.parameters()) + list(m.buffers())) for m in layer_pieces(model))
    return {"weights": weights, "largest_piece": largest, "inputs": io, "activation_peak": trace.peak_bytes,
            "peak_op": trace.peak_op}


@functools.lru_cache(maxsize=32)
def _vae_trace(config_json: Optional[str], op: str, frames: int, h: int, w: int, tiling: bool,
               dtype: torch.dtype) -> Tuple[int, int, int]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..runtime.memory import trace_memory
    from .components import VideoVAE

    vae = _wan_vae_meta(config_json, dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        vae = vae.to_empty(device="cpu")
        v = VideoVAE(vae, device="cpu", tiling=tiling)
        weights = _bytes_of(list(vae.parameters()) + list(vae.buffers()))
        if op == "decode":
            x = torch.empty(1, v.z_dim, frames, h, w)
            fn = v.decode
        else:
            # The pipelines hand the VAE pixels in its dtype (LongCatVideoPipeline.encode_refine_input).
            x = torch.empty(1, 3, VAE_TIME_STRIDE * (frames - 1) + 1, h * VAE_SPACE_STRIDE, w * VAE_SPACE_STRIDE,
                            dtype=dtype)
            fn = v.encode
        with torch.inference_mode():
            _, trace = trace_memory(fn, x)
        io = _bytes_of([x])
    return weights, io, trace.peak_bytes


def trace_vae(config_json: Optional[str] = None, op: str = "decode", latent: Tuple[int, int, int] = (24, 60, 104),
              tiling: bool = False, dtype: torch.dtype = torch.bfloat16, exact: bool = False) -> Dict[str, Any]:
    """Our ``VideoVAE`` (diffusers' ``AutoencoderKLWan`` of ``config_json``, default the Wan 2.1
    VAE) decoding ``latent`` = (T, h, w) latents or encoding the matching 4(T-1)+1 frames, traced
    on fake tensors. The Wan VAE runs one latent frame (four video frames) at a time with a causal
    cache, so only its output and input grow with T: the peak is traced at T = 3 and 4 (the first chunk is one frame, so T = 2 is off the line) and
    extended along that line (``exact=True`` traces T itself, minutes at 720p on a CPU)."""
    T, h, w = latent
    if exact or T <= max(_VAE_TRACE_FRAMES):
        weights, io, peak = _vae_trace(config_json, op, T, h, w, tiling, dtype)
    else:
        t1, t2 = _VAE_TRACE_FRAMES
        weights, io1, p1 = _vae_trace(config_json, op, t1, h, w, tiling, dtype)
        _, io2, p2 = _vae_trace(config_json, op, t2, h, w, tiling, dtype)
        peak = p2 + (p2 - p1) * (T - t2)
        io = io2 + (io2 - io1) * (T - t2)
    return {"weights": weights, "inputs": io, "activation_peak": peak, "tiling": tiling, "exact": exact}


# -- the floor: what no setting removes, known without a trace -------------------------------------

def _raw_bytes(module) -> int:
    """A module's parameter and buffer bytes, a shared one once, not rounded to allocator blocks
    (at most what a traced stage counts for them)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@functools.lru_cache(maxsize=8)
def _text_encoder_weights(config_json: Optional[str], dtype: torch.dtype) -> Tuple[int, int]:
    """(all weights, the largest piece sequential offload holds) of the text encoder, on meta."""
    from .components import layer_pieces

    model = _umt5_meta(config_json, dtype)
    return _raw_bytes(model), max(_raw_bytes(m) for m in layer_pieces(model))


@functools.lru_cache(maxsize=8)
def _vae_weights(config_json: Optional[str], dtype: torch.dtype) -> int:
    return _raw_bytes(_wan_vae_meta(config_json, dtype))


# -- the plan ------------------------------------------------------------------------------------

@dataclass
class StagePlan:
    name: str
    kind: str
    device_bytes: int  # what the stage allocates on the device at its peak, overhead included
    on_device: List[str]  # components resident during the stage
    parts: Dict[str, int]  # the bytes device_bytes sums
    fits: bool
    note: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "device_bytes": self.device_bytes, "on_device": self.on_device,
                "parts": self.parts, "fits": self.fits, "note": self.note}


@dataclass
class MemoryPlan:
    """What :func:`plan_memory` chose. ``ffn_chunk_tokens`` (None: off), ``resident_blocks``
    (None: every block resident, else the others are streamed), ``offload_dit`` (the DiT goes to
    host memory during the text-encoder and VAE stages), ``vae_tiling``, and every stage's
    traced device peak."""

    budget_bytes: int
    quantize: Optional[str]
    dtype: str
    ffn_chunk_tokens: Optional[int]
    resident_blocks: Optional[int]
    depth: int
    offload_dit: bool
    vae_tiling: bool
    text_encoder_layer_by_layer: bool = False
    step_cache: Optional[Dict[str, Any]] = None  # the StepCache's params() the denoising stages were traced with
    shard_ranks: int = 1  # > 1: the DiT's weights sharded over that many ranks (shard_weights), bytes per rank
    stages: List[StagePlan] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    floor_bytes: int = 0  # the largest stage's bytes no allowed setting removes (a lower bound, not traced)
    traced: bool = True  # False: the floor was over the budget, nothing was traced (stages show their floors)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    @property
    def peak_bytes(self) -> int:
        return max((s.device_bytes for s in self.stages), default=0)

    @property
    def streams(self) -> bool:
        return self.resident_blocks is not None and self.resident_blocks < self.depth

    def to_dict(self) -> Dict[str, Any]:
        return {"budget_bytes": self.budget_bytes, "quantize": self.quantize, "dtype": self.dtype,
                "fits": self.fits, "peak_bytes": self.peak_bytes, "ffn_chunk_tokens": self.ffn_chunk_tokens,
                "resident_blocks": self.resident_blocks, "depth": self.depth, "streams": self.streams,
                "offload_dit": self.offload_dit, "vae_tiling": self.vae_tiling,
                "text_encoder_layer_by_layer": self.text_encoder_layer_by_layer, "step_cache": self.step_cache,
                "shard_ranks": self.shard_ranks,
                "stages": [s.to_dict() for s in self.stages], "notes": list(self.notes),
                "floor_bytes": self.floor_bytes, "traced": self.traced}


def _config(cfg):
    from ..runtime.config import resolve_config

    return resolve_config(cfg, {}) if not hasattr(cfg, "depth") else cfg


def plan_memory(budget, *, dit_config="longcat-video", quantize: Optional[str] = None, dtype=torch.bfloat16,
                stages: Optional[Sequence[Stage]] = None, text_encoder_config: Optional[dict] = None,
                vae_config: Optional[dict] = None, allow_streaming: bool = True, allow_chunking: bool = True,
                allow_vae_tiling: bool = True, allow_sequential_text_encoder: bool = True, overhead_bytes: int = OVERHEAD_BYTES,
                step_cache=None, shard_ranks: int = 1) -> MemoryPlan:
    """The settings with which ``stages`` (default :func:`official_t2v_stages`) fit ``budget``
    (bytes or a string such as "24GiB") of device memory, and every stage's traced device peak.
    ``plan.fits`` is False when nothing allowed fits; the stages then say which is over.
    The text encoder and VAE configs default to the official ones (a checkpoint's
    ``text_encoder/config.json`` and ``vae/config.json`` when given); tracing them needs the
    ``pipelines`` extra (transformers, diffusers). ``step_cache`` (a StepCache, which the
    pipelines use in every denoising pass): each denoising stage is traced as steps of a cached
    run, its buffers (part ``step_cache``) and the tensors its signal keeps through the blocks
    counted; the buffers are sized on every token of the stage, so a stage with conditioning
    frames in the stream (the refinement's) is counted a little high. ``shard_ranks`` > 1: the
    DiT built with ``shard_weights=True`` over that many ranks, the plan one rank's: its shards,
    the replicated root and, while denoising, the two gathered blocks (runtime/sharding.py);
    sharded weights neither stream nor move to host memory between stages (both are off)."""
    budget = parse_bytes(budget)
    if isinstance(shard_ranks, bool) or not isinstance(shard_ranks, int) or shard_ranks < 1:
        raise ValueError(f"plan_memory: shard_ranks must be a positive int (the ranks the weights are sharded over), "
                         f"got {shard_ranks!r}")
    if shard_ranks > 1:
        allow_streaming = False

    def dit_bytes(resident, denoising=True):
        if shard_ranks == 1:
            return dit_device_bytes(cfg, dtype, quantize, resident)["total"]
        b = dit_device_bytes(cfg, dtype, quantize, None, shard_ranks)
        return b["total"] if denoising else b["shards"] + b["replicated"]  # gathered only inside a forward
    cache_params = None
    if step_cache is not None:
        from ..runtime.step_cache import StepCache

        if not isinstance(step_cache, StepCache):
            raise ValueError(f"plan_memory: step_cache must be a StepCache, got {type(step_cache).__name__}")
        cache_params = tuple(sorted(step_cache.params().items()))
    cfg = _config(dit_config)
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)
    stages = list(official_t2v_stages() if stages is None else stages)
    te_json = None if text_encoder_config is None else json.dumps(text_encoder_config, sort_keys=True)
    vae_json = None if vae_config is None else json.dumps(vae_config, sort_keys=True)
    denoise = [s for s in stages if s.kind == "denoise"]
    latents_bytes = {s.name: 4 * 4 * cfg.in_channels * s.batch * math.prod(s.latent) for s in denoise}
    item = torch.empty((), dtype=dtype).element_size()

    def floor_parts(s):
        """What stage ``s`` needs with every allowed setting on, from sizes alone (no trace): its
        fewest weights (the DiT streamed, the text encoder one piece at a time), its inputs (the
        DiT's and the text encoder's, traced exactly at these shapes), the latents, the overhead.
        Activations and the VAE's inputs come on top: each part is at most the planned one."""
        if s.kind == "denoise":
            weights = dit_bytes(None)
            if allow_streaming:
                weights = min(weights, dit_device_bytes(cfg, dtype, quantize, 0)["total"])
            inputs = s.batch * (cfg.in_channels * math.prod(s.latent) * item + s.tokens * cfg.caption_channels * item
                                + 8 * s.tokens + 4)  # latent, text, mask, timestep
            return {"dit_weights": weights, "inputs": inputs, "latents": latents_bytes[s.name],
                    "overhead": overhead_bytes}
        if s.kind == "text_encode":
            whole, piece = _text_encoder_weights(te_json, dtype)
            return {"text_encoder_weights": piece if allow_sequential_text_encoder else whole,
                    "inputs": 2 * 8 * s.batch * s.tokens, "overhead": overhead_bytes}
        if s.kind in ("vae_decode", "vae_encode"):
            return {"vae_weights": _vae_weights(vae_json, dtype), "overhead": overhead_bytes}
        raise ValueError(f"unknown stage kind {s.kind!r}")

    # The floor first: tracing a stage at the real shapes takes seconds to minutes, and when even
    # the floor of one stage is over the budget no setting can make the run fit. Give up then, with
    # every stage's floor in the table.
    floors = {s.name: floor_parts(s) for s in stages}
    floor = max((sum(p.values()) for p in floors.values()), default=0)
    if floor > budget:
        over = max(stages, key=lambda s: sum(floors[s.name].values()))
        # No setting is chosen (they stay off): there is nothing to run them with.
        plan = MemoryPlan(budget, quantize, str(dtype).replace("torch.", ""), None, None, cfg.depth,
                          offload_dit=False, vae_tiling=False,
                          step_cache=None if cache_params is None else dict(cache_params),
                          floor_bytes=floor, traced=False, shard_ranks=shard_ranks)
        plan.stages = [StagePlan(s.name, s.kind, sum(floors[s.name].values()), ["dit"] if s.kind == "denoise" else
                                 ["text_encoder" if s.kind == "text_encode" else "vae"], floors[s.name],
                                 sum(floors[s.name].values()) <= budget, "floor, not traced")
                       for s in stages]
        plan.notes.append(f"gave up before tracing: stage {over.name} needs at least {floor / GiB:.2f} GiB with every "
                          f"allowed setting on (weights, inputs and overhead alone), over the budget")
        return plan

    def denoise_need(s, chunk, resident):
        inputs, act, cache, _ = _denoise_activation(cfg_json, s.batch, tuple(s.latent), s.bsa, dtype, quantize, chunk,
                                                    s.tokens, cache_params)
        parts = {"dit_weights": dit_bytes(resident), "inputs": inputs,
                 "activations": act - cache, "latents": latents_bytes[s.name], "overhead": overhead_bytes}
        if cache_params is not None:  # the traced peak is activations + these buffers
            parts["step_cache"] = cache
        return parts

    def worst(chunk, resident):
        return max((sum(denoise_need(s, chunk, resident).values()) for s in denoise), default=0)

    def side_alone(s, tiling, sequential):
        """A text-encoder or VAE stage's bytes without the DiT."""
        if s.kind == "text_encode":
            t = trace_text_encoder(te_json, s.batch, s.tokens, dtype)
            weights = t["largest_piece"] if sequential else t["weights"]
            return {"text_encoder_weights": weights, "inputs": t["inputs"], "activations": t["activation_peak"],
                    "overhead": overhead_bytes}
        if s.kind in ("vae_decode", "vae_encode"):
            t = trace_vae(vae_json, s.kind[4:], tuple(s.latent), tiling, dtype)
            return {"vae_weights": t["weights"], "inputs": t["inputs"], "activations": t["activation_peak"],
                    "overhead": overhead_bytes}
        raise ValueError(f"unknown stage kind {s.kind!r}")

    sides = [s for s in stages if s.kind != "denoise"]
    # One switch each, decided over all of their stages: VAE tiling (every encode and decode) and
    # the text encoder's layer-by-layer offload, only when a stage does not fit even alone.
    tiling = allow_vae_tiling and any(sum(side_alone(s, False, False).values()) > budget
                                      for s in sides if s.kind.startswith("vae_"))
    sequential = allow_sequential_text_encoder and any(sum(side_alone(s, False, False).values()) > budget
                                                       for s in sides if s.kind == "text_encode")

    def side_parts(s):
        return side_alone(s, tiling and s.kind.startswith("vae_"), sequential)

    chunk, resident, notes = None, None, []
    if denoise and worst(None, None) > budget and allow_chunking:
        chunk = CHUNK_TOKENS
        notes.append(f"forward chunking on ({CHUNK_TOKENS}-token slices: the same math, more launches)")
    if denoise and worst(chunk, None) > budget and allow_streaming:
        # Per forward every block not resident crosses the bus: as many resident as the largest
        # denoising pass allows. The other stages then make room by model offload (the DiT's
        # resident part crosses the bus once per stage, not once per step).
        resident = next((r for r in range(cfg.depth - 1, -1, -1) if worst(chunk, r) <= budget), 0)
        streamed = dit_device_bytes(cfg, dtype, quantize, resident)["streamed_per_forward"]
        notes.append(f"{cfg.depth - resident} of {cfg.depth} blocks streamed from host memory "
                     f"({streamed / GiB:.2f} GiB over the bus per forward)")
    dit_on = dit_bytes(resident, denoising=False)
    # A sharded model stays where it is (moving it would break FSDP2's views of the shards).
    offload = shard_ranks == 1 and any(sum(side_parts(s).values()) + dit_on > budget for s in sides)
    plan = MemoryPlan(budget, quantize, str(dtype).replace("torch.", ""), chunk, resident, cfg.depth,
                      offload_dit=offload, vae_tiling=tiling, text_encoder_layer_by_layer=sequential,
                      step_cache=None if cache_params is None else dict(cache_params), notes=notes, floor_bytes=floor,
                      shard_ranks=shard_ranks)
    if shard_ranks > 1:
        notes.append(f"DiT weights sharded over {shard_ranks} ranks (shard_weights): per rank its shards, the "
                     "replicated embedders and final layer, and 2 whole blocks while denoising (current + prefetched)")
    rows: List[StagePlan] = []
    for s in stages:
        if s.kind == "denoise":
            parts, on, note = denoise_need(s, chunk, resident), ["dit"], ""
        else:
            parts = side_parts(s)
            comp = "text_encoder" if s.kind == "text_encode" else "vae"
            on = [comp]
            if not offload:
                parts["dit_weights"] = dit_on
                on.append("dit")
            note = "tiled" if comp == "vae" and tiling else "layer by layer" if comp == "text_encoder" and sequential else ""
        rows.append(StagePlan(s.name, s.kind, sum(parts.values()), on, parts, sum(parts.values()) <= budget, note))
    if sequential:
        notes.append("the text encoder runs one layer at a time on the device (sequential offload)")
    if plan.offload_dit:
        notes.append("the DiT moves to host memory during the text-encoder and VAE stages")
    if plan.vae_tiling:
        notes.append("VAE tiling on: it changes pixels at the tile seams (the official pipeline never tiles)")
    plan.stages = rows
    return plan


def _gib(n: int) -> str:
    return f"{n / GiB:6.2f} GiB"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table: one row per stage (traced device peak, what is on the device, the
    parts), then the settings chosen."""
    verdict = (f"does NOT fit (peak at least {_gib(plan.peak_bytes).strip()}: not traced, the floor is over)"
               if not plan.traced else ("fits" if plan.fits else "does NOT fit") + f" (peak {_gib(plan.peak_bytes).strip()})")
    per_rank = f" sharded over {plan.shard_ranks} ranks (per rank)" if plan.shard_ranks > 1 else ""
    lines = [f"device budget {_gib(plan.budget_bytes).strip()}, DiT weights {plan.quantize or plan.dtype}{per_rank}: "
             + verdict]
    for s in plan.stages:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in s.parts.items())
        lines.append(f"  {s.name:18s} {_gib(s.device_bytes)} {'ok ' if s.fits else 'OVER'}  on device: "
                     f"{'+'.join(s.on_device)}{' (' + s.note + ')' if s.note else ''}  [{parts} GiB]")
    if not plan.traced:
        lines.append("  settings: none chosen (the floor is over the budget with every setting on)")
        lines += [f"  note: {n}" for n in plan.notes]
        return "\n".join(lines)
    settings = [f"forward chunking {plan.ffn_chunk_tokens or 'off'}",
                f"resident blocks {plan.depth if plan.resident_blocks is None else plan.resident_blocks}/{plan.depth}",
                f"model offload {'on' if plan.offload_dit else 'off'}",
                f"text encoder {'layer by layer' if plan.text_encoder_layer_by_layer else 'whole'}",
                f"VAE {'tiled' if plan.vae_tiling else 'whole frames'}"]
    sc = plan.step_cache
    if sc is not None:
        settings.append(f"step cache F{sc['Fn_compute_blocks']}B{sc['Bn_compute_blocks']}"
                        + (f" TaylorSeer order {sc['taylorseer_order']}" if sc["enable_taylorseer"] else ""))
    lines.append("  settings: " + ", ".join(settings))
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
