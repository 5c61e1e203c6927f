"""Flow-matching Euler sampling with the official LongCat-Video schedules and CFG-zero guidance,
bit for bit in float32 as the official pipeline: ``cfg_zero``, the Euler step and
:func:`denoise`, the loop on latents with conditioning frames, the KV cache, the step cache and
the CFG-parallel / data-parallel splits. The schedules (base, distilled, ``t_thresh``
truncation, the ``enhance_hf`` tail) are in :mod:`.schedules`, re-exported here.

Design notes: docs/design/sampler.md.
"""

from __future__ import annotations

import contextlib
import math
import operator
import sys
import time
import warnings
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from ..runtime.compiled import graph_runner_for
from ..runtime.names import MAX_STEPS
from .schedules import (DEFAULT_SHIFT, ENHANCE_HF_START, ENHANCE_HF_STEPS, NUM_DISTILL_STEPS,  # noqa: F401
                        NUM_TRAIN_TIMESTEPS, Schedule, base_sigmas, distill_sigmas, enhance_hf_schedule,
                        flow_schedule, get_schedule, shift_sigmas, truncate_schedule)

__all__ = [
    "NUM_TRAIN_TIMESTEPS", "NUM_DISTILL_STEPS", "DEFAULT_SHIFT", "Schedule",
    "base_sigmas", "distill_sigmas", "shift_sigmas", "flow_schedule", "truncate_schedule",
    "enhance_hf_schedule", "get_schedule", "cfg_zero", "euler_step", "compute_kv_cache", "denoise",
    "NonFiniteLatentsError", "MAX_STEPS",
]

CFG_ZERO_EPS = 1e-8


def cfg_zero(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float,
             eps: float = CFG_ZERO_EPS) -> torch.Tensor:
    """CFG-zero's optimized scale, per sample over all elements, on the device (no host sync):
    ``s* = <v_cond, v_uncond> / (||v_uncond||^2 + eps)``, ``v = v_uncond s* + g (v_cond - v_uncond s*)``.

    (The official code reshapes s* to [B, 1, 1, 1] against 5-D outputs, which broadcasts right
    only for B = 1; here s* is [B, 1, ..., 1], the intended per-sample scale.)
    """
    B = v_cond.shape[0]
    pos = v_cond.reshape(B, -1)
    neg = v_uncond.reshape(B, -1)
    dot = torch.sum(pos * neg, dim=1, keepdim=True)
    sq = torch.sum(neg ** 2, dim=1, keepdim=True) + eps
    st = (dot / sq).view((B,) + (1,) * (v_cond.dim() - 1))
    return v_uncond * st + guidance_scale * (v_cond - v_uncond * st)


def euler_step(x: torch.Tensor, v: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """The scheduler's step on the *negated* model output: ``x + (sigma_next - sigma) * (-v)``,
    float32 (``dt = sigma_next - sigma``, a 0-dim tensor on x's device)."""
    return x.float() + dt * (-v.float())


# -- the loop ------------------------------------------------------------------------------------

def _as_text(embeds, name: str, B: int, caption_channels: Optional[int]) -> torch.Tensor:
    if isinstance(embeds, str):
        raise ValueError(
            f"{name} is a prompt string; denoise takes precomputed embeddings [B, 1, L, caption_channels]. "
            "Encode prompts with LongCatVideoPipeline.encode_prompt (or pipelines.encode_prompts and a "
            "TextEncoder; `pip install 'longcat-native[pipelines]'`), or call LongCatVideoPipeline's generate_* "
            "with prompt strings."
        )
    if not isinstance(embeds, torch.Tensor):
        raise ValueError(f"{name} must be a tensor [B, 1, L, C], got {type(embeds).__name__}")
    if not embeds.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {embeds.dtype}")
    if embeds.is_meta:
        raise ValueError(f"{name} is on the meta device (shapes only, no data); pass a tensor with data")
    if embeds.dim() == 3:
        embeds = embeds[:, None]
    if embeds.dim() != 4 or embeds.shape[1] != 1:
        raise ValueError(f"{name} must be [B, 1, L, C] (or [B, L, C]), got {tuple(embeds.shape)}")
    if caption_channels is not None and embeds.shape[-1] != caption_channels:
        raise ValueError(f"{name} has {embeds.shape[-1]} channels, the model's caption_channels is {caption_channels}")
    if embeds.shape[0] not in (1, B):
        raise ValueError(f"{name} has batch {embeds.shape[0]}, the latents have batch {B} (use 1 or {B})")
    return embeds.expand(B, -1, -1, -1) if embeds.shape[0] != B else embeds


def _as_mask(mask, name: str, embeds: torch.Tensor) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a tensor [B, L], got {type(mask).__name__}")
    if mask.is_meta:
        raise ValueError(f"{name} is on the meta device (shapes only, no data); pass a tensor with data")
    B, L = embeds.shape[0], embeds.shape[2]
    if mask.dim() != 2 or mask.shape[1] != L or mask.shape[0] not in (1, B):
        raise ValueError(f"{name} must be [B, L] = [{B}, {L}], got {tuple(mask.shape)}")
    return mask.expand(B, -1) if mask.shape[0] != B else mask


def _dit_config(dit):
    return getattr(dit, "config", None)


def check_latent_inputs(dit, noise, cond_latents=None) -> Tuple[int, int]:
    """Validate the latents against the model: returns (batch, conditioning frames)."""
    cfg = _dit_config(dit)
    if not isinstance(noise, torch.Tensor) or noise.dim() != 5:
        raise ValueError(f"noise must be a 5-D tensor [B, C, T, H, W], got "
                         f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    if not noise.is_floating_point():
        raise ValueError(f"noise must be floating point, got {noise.dtype}")
    B, C, T, H, W = noise.shape
    if cfg is not None:
        if C != cfg.in_channels:
            raise ValueError(f"noise has {C} channels, the model takes {cfg.in_channels}")
        ph, pw = cfg.patch_size[1], cfg.patch_size[2]
        if H % ph or W % pw:
            raise ValueError(f"latent H x W = {H} x {W} must be divisible by the patch size {ph} x {pw}")
    if min(B, T, H, W) == 0:
        raise ValueError(f"noise has an empty dimension: {tuple(noise.shape)}")
    m = 0
    if cond_latents is not None:
        if not isinstance(cond_latents, torch.Tensor) or cond_latents.dim() != 5:
            raise ValueError("cond_latents must be a 5-D tensor [B, C, m, H, W]")
        Bc, Cc, m, Hc, Wc = cond_latents.shape
        if (Cc, Hc, Wc) != (C, H, W) or Bc not in (1, B):
            raise ValueError(f"cond_latents {tuple(cond_latents.shape)} do not fit the latents {tuple(noise.shape)}: "
                             f"need [{B} or 1, {C}, m, {H}, {W}]")
        if not 0 < m < T:
            raise ValueError(f"cond_latents has {m} frames; it must have at least 1 and fewer than the "
                             f"{T} latent frames (at least one frame must be generated)")
    return B, m


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_kv_cache(dit, cond_latents: torch.Tensor, text_like: Optional[torch.Tensor] = None,
                     offload_kv_cache: bool = False) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """The official ``_cache_clean_latents``: one forward on the clean conditioning latents alone,
    timestep 0 on every frame, no cross-attention, ``return_kv=True``."""
    B, _, m = cond_latents.shape[:3]
    dtype = getattr(dit, "dtype", cond_latents.dtype)
    timestep = torch.zeros(B, m, device=cond_latents.device, dtype=dtype)
    # The official code passes zero text of the prompt's shape (unused under skip_crs_attn).
    empty = None if text_like is None else torch.zeros_like(text_like[:1]).expand(B, -1, -1, -1)
    with torch.no_grad():
        _, kv = dit(cond_latents, timestep, empty, return_kv=True, skip_crs_attn=True,
                    offload_kv_cache=offload_kv_cache)
    return kv


def _expand_cache(kv: Mapping[int, Tuple[torch.Tensor, torch.Tensor]], batch: int):
    """A cache of batch 1 serves any batch (the DiT expands it); a cache of batch B serves a call
    of batch B only, so the CFG call (2B: negative then positive) gets it twice."""
    first = next(iter(kv.values()))[0]
    if first.shape[0] in (1, batch):
        return kv
    reps = batch // first.shape[0]
    if reps * first.shape[0] != batch:
        raise ValueError(f"kv cache batch {first.shape[0]} does not divide the call's batch {batch}")
    return {i: (k.repeat(reps, 1, 1, 1), v.repeat(reps, 1, 1, 1)) for i, (k, v) in kv.items()}




class NonFiniteLatentsError(ValueError):
    """:func:`denoise` produced NaN or Inf latents; the message names the step where they first
    appeared. Raised instead of returning them, so nothing writes a poisoned output."""


def _check_number(name: str, v) -> float:
    """A finite real number (int, float, NumPy or one-element tensor) as a float."""
    if isinstance(v, (bool, str, bytes)) or type(v).__name__ == "bool_":
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a finite number, got {v!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {f}")
    return f


def _check_num_steps(num_steps) -> int:
    """An integer-like step count in [1, MAX_STEPS] as an int."""
    if isinstance(num_steps, bool) or type(num_steps).__name__ == "bool_":
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    try:
        n = operator.index(num_steps)
    except TypeError:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}") from None
    if not 1 <= n <= MAX_STEPS:
        raise ValueError(f"num_steps must be in [1, {MAX_STEPS}], got {n}")
    return n


def _check_finite_inputs(named) -> None:
    """One host read for all of them: each (name, tensor or None) must hold finite values only."""
    named = [(k, t) for k, t in named if t is not None and t.numel()]
    if not named:
        return
    where = named[0][1].device
    ok = torch.stack([torch.isfinite(t).all().to(where) for _, t in named]).tolist()
    bad = [k for (k, _), good in zip(named, ok) if not good]
    if bad:
        raise ValueError(f"denoise: {', '.join(bad)} hold{'s' if len(bad) == 1 else ''} NaN or Inf values")


def denoise(
    dit,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_mask: Optional[torch.Tensor] = None,
    negative_embeds: Optional[torch.Tensor] = None,
    negative_mask: Optional[torch.Tensor] = None,
    num_steps: int = 50,
    guidance_scale: float = 4.0,
    distill: bool = False,
    cond_latents: Optional[torch.Tensor] = None,
    shift: float = DEFAULT_SHIFT,
    progress: bool = True,
    *,
    schedule: Optional[Schedule] = None,
    t_thresh: Optional[float] = None,
    enhance_hf: bool = False,
    use_kv_cache: bool = False,
    kv_cache: Optional[Mapping[int, Tuple[torch.Tensor, torch.Tensor]]] = None,
    offload_kv_cache: bool = False,
    cfg_zero_cond_frames: bool = True,
    callback: Optional[Callable[[int, float, torch.Tensor], None]] = None,
    graphs="auto",
    cache=None,
) -> torch.Tensor:
    """Run the official flow-matching Euler loop on latents; returns float32 latents like ``noise``.

    ``noise`` [B, C, T, H, W] is the starting point (pure noise, or for refinement latents already
    noised to ``t_thresh``). ``prompt_embeds`` [B, 1, L, C_cap] (batch 1 is broadcast) with
    ``prompt_mask`` [B, L]. ``guidance_scale > 1`` runs negative and positive prompts as one batch
    (negative first, as the official pipeline) and combines them with CFG-zero; ``<= 1`` runs the
    positive prompt only, with no negative branch at all. ``distill`` picks the distilled schedule.

    ``cond_latents`` [B or 1, C, m, H, W] replace the first m latent frames; those frames get
    timestep 0, ``num_cond_latents = m`` is passed to the DiT and they are returned bit-exact.
    By default the DiT sees all T frames each step (image-to-video, the official ``generate_i2v``;
    CFG-zero's scale then includes the conditioning frames' outputs, as there). With
    ``use_kv_cache`` (video continuation, the official default there) the clean conditioning frames
    run once through the DiT (``return_kv=True, skip_crs_attn=True``, timestep 0) and every step
    passes only the T - m noisy frames plus that cache via ``kv_cache_dict``; ``kv_cache`` passes a
    cache computed elsewhere. ``cfg_zero_cond_frames=False`` leaves the conditioning frames'
    outputs out of CFG-zero's scale when running without the cache, which then equals the cached
    path up to float rounding (the official no-cache path includes them).

    Keyword-only extras: ``schedule`` (a :class:`Schedule`, overriding num_steps/distill/shift),
    ``t_thresh`` (refinement's truncated base schedule), ``enhance_hf`` (continuation's tail),
    ``offload_kv_cache``, ``callback(step, timestep, latents)`` after each step (``timestep`` a
    Python float; ``latents`` the tensor being denoised, the noisy frames only on the cached
    path; the callback must not modify it), ``graphs`` (each step's forward replays a whole-forward
    CUDA graph: ``"auto"`` on CUDA, see :func:`~longcat_native.runtime.compiled.graph_runner_for`;
    steps with a KV cache run without graphs, with a one-time message). ``progress``
    prints one line per step to stderr with seconds per step; it synchronizes the device once per
    step to time it. With ``progress=False`` the loop makes no host synchronization of its own.

    ``cache``: a :class:`~longcat_native.runtime.step_cache.StepCache` (DBCache / TaylorSeer step
    caching, docs/design/step_cache.md): steps whose first blocks' residual barely changed reuse
    the middle blocks' residual; one host read per step decides. The CFG halves decide together
    (one batch). The run's report is ``cache.stats`` afterwards. An inactive cache
    (``residual_diff_threshold=0``) runs exactly as ``cache=None``. With CUDA graphs a step with an
    active cache replays a graph of its first blocks, reads the signal, then replays the graph of
    a full or of a cached step's rest (each captured once per shape); a whole-forward compiled
    model runs its blocks through a regional compile then.

    Parallel runs (``dit.parallel``, runtime/mesh.py; docs/design/parallel.md): the replica
    lead's inputs are broadcast to its ranks. CFG-parallel (``cfg_parallel=True``) runs a guided
    step's negative half on cfg index 0 and its positive half on index 1 (batch B each), then
    all-gathers the prediction over the pair once per step; CFG-zero and the Euler step run on
    both alike, and a step cache reduces its signal over the replica, so both take the
    single-process decision. With guidance <= 1 both ranks run the whole batch (a warning: the
    second's work is redundant). Data parallel (``dp_size``): replica j denoises the contiguous
    slice ``dp_split(B, dp)[j]`` of the batch (of inputs every rank holds whole) and the slices are
    all-gathered at the end, so every rank returns the single-process [B, ...] result; a replica
    with no item only joins that gather. There ``callback`` sees the replica's slice, and a step
    cache decides per replica, on its items (equal to a single-process run of them alone).
    """
    B, m = check_latent_inputs(dit, noise, cond_latents)
    for name, t in (("noise", noise), ("cond_latents", cond_latents)):
        if t is not None and t.is_meta:
            raise ValueError(f"{name} is on the meta device (shapes only, no data); pass a tensor with data")
    if cond_latents is not None and not cond_latents.is_floating_point():
        raise ValueError(f"cond_latents must be floating point, got {cond_latents.dtype}")
    cfg = _dit_config(dit)
    caption = getattr(cfg, "caption_channels", None)
    guidance_scale = _check_number("guidance_scale", guidance_scale)
    do_cfg = guidance_scale > 1.0
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable, got {type(callback).__name__}")
    if (use_kv_cache or kv_cache is not None) and m == 0:
        raise ValueError("use_kv_cache / kv_cache need cond_latents (the frames the cache holds)")
    if kv_cache is not None:
        if not isinstance(kv_cache, Mapping) or not kv_cache:
            raise ValueError("kv_cache must be a non-empty mapping {block: (k, v)} (what return_kv=True returns)")
        check_origin = getattr(dit, "check_kv_cache_origin", None)
        if check_origin is not None:  # a cache made for another grid or model: an error now
            check_origin(kv_cache, tuple(noise.shape[3:5]))
    if schedule is None:
        num_steps = _check_num_steps(num_steps)
        shift = _check_number("shift", shift)
        schedule = get_schedule(num_steps, distill=distill, shift=shift, t_thresh=t_thresh, enhance_hf=enhance_hf)
    elif not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    if not 1 <= len(schedule) <= MAX_STEPS:
        raise ValueError(f"the schedule has {len(schedule)} steps; it must have 1 to {MAX_STEPS}")

    pos = _as_text(prompt_embeds, "prompt_embeds", B, caption)
    pos_mask = _as_mask(prompt_mask, "prompt_mask", pos)
    if do_cfg:
        if negative_embeds is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} > 1 needs negative_embeds (the official pipeline encodes the "
                "negative prompt, or the empty string); pass them, or guidance_scale <= 1 for no guidance"
            )
        neg = _as_text(negative_embeds, "negative_embeds", B, caption)
        neg_mask = _as_mask(negative_mask, "negative_mask", neg)
        if neg.shape[2] != pos.shape[2]:
            raise ValueError(f"negative_embeds has {neg.shape[2]} tokens and prompt_embeds {pos.shape[2]}; "
                             "they run as one batch and must be padded to the same length")
        text = torch.cat([neg, pos], dim=0)
        if pos_mask is None and neg_mask is None:
            mask = None
        else:
            ones = lambda e: torch.ones(e.shape[0], e.shape[2], dtype=torch.long, device=e.device)  # noqa: E731
            mask = torch.cat([(neg_mask if neg_mask is not None else ones(neg)).to(pos.device),
                              (pos_mask if pos_mask is not None else ones(pos)).to(pos.device)], dim=0)
    else:
        text, mask = pos, pos_mask

    # The inputs hold finite values (the valid text tokens only: masked ones may hold anything).
    text_valid = text if mask is None else torch.where(mask.to(text.device)[:, None, :, None] != 0, text,
                                                       text.new_zeros(()))
    _check_finite_inputs([("noise", noise), ("cond_latents", cond_latents), ("the text embeddings", text_valid)])
    del text_valid
    device = getattr(dit, "device", noise.device)
    text = text.to(device)
    mask = None if mask is None else mask.to(device)
    n = len(schedule)
    ts_host = schedule.timesteps.tolist()  # for progress lines only (computed before the loop)
    timesteps = schedule.timesteps.to(device)
    dts = (schedule.sigmas[1:] - schedule.sigmas[:-1]).to(device)  # sigma_next - sigma, float32

    latents = noise.to(device=device, dtype=torch.float32).clone()
    cond = cond_src = None
    if m:
        cond_src = cond_latents.to(device=device, dtype=torch.float32)
        cond = cond_src.expand(B, -1, -1, -1, -1)
        latents[:, :, :m] = cond

    parallel = getattr(_base_model(dit), "parallel", None)
    if parallel is not None:
        # Every rank of a replica runs this loop; the replica lead's inputs are the ones used
        # everywhere in it, so ranks that drew different noise or encoded prompts differently
        # cannot drift apart.
        latents, text, mask, cond_src = parallel.broadcast_inputs([latents, text, mask, cond_src])
    cfg_split = parallel is not None and parallel.size("cfg") == 2 and do_cfg
    if parallel is not None and parallel.size("cfg") == 2 and not do_cfg:
        warnings.warn(f"denoise: guidance_scale={guidance_scale:g} <= 1 has no negative half to split; both ranks of "
                      "the CFG-parallel pair run the whole (unguided) batch, with equal results", stacklevel=2)
    out_shape = tuple(latents.shape)  # [B, C, T, H, W]: what every rank returns
    items = None
    if parallel is not None and parallel.size("dp") > 1:
        # Data parallel: this replica's contiguous slice of the batch (runtime/mesh.py dp_split),
        # cut from the inputs every rank holds whole (the noise the single-process run draws), so
        # the gathered result is the single-process one. CFG batches are [negative, positive].
        items = lo, hi = parallel.items(B)
        if B < parallel.size("dp") and getattr(_base_model(dit), "weight_sharding", None) is not None:
            # every rank gathers each block's shards in every forward (FSDP2 collectives): a replica
            # with nothing to denoise would leave the others waiting in the first gather
            raise ValueError(f"{B} video(s) over dp_size={parallel.size('dp')} replicas with shard_weights=True: "
                             "every replica must denoise at least one video (the weight gathers are collectives "
                             "of all ranks); pass at least dp_size videos, or a smaller dp_size")
        halves = 2 if do_cfg else 1
        rows = lambda t: None if t is None else torch.cat([c[lo:hi] for c in t.chunk(halves)])  # noqa: E731
        latents, text, mask = latents[lo:hi], rows(text), rows(mask)
        if cond_src is not None and cond_src.shape[0] == B:
            cond_src = cond_src[lo:hi]
        if kv_cache is not None and next(iter(kv_cache.values()))[0].shape[0] == B:
            kv_cache = {b: (k[lo:hi], v[lo:hi]) for b, (k, v) in kv_cache.items()}
        B = hi - lo
    if cfg_split:  # CFG-parallel: this rank's half of the guided batch (cfg index 0: negative)
        half = parallel.index("cfg")
        text = text.chunk(2)[half]
        mask = None if mask is None else mask.chunk(2)[half]

    def run_local(latents, text, mask, cond_src, kv):
        """The loop on this rank's batch -> (latents, first non-finite step or -1, on the device)."""
        cond = None if cond_src is None else cond_src.expand(B, -1, -1, -1, -1)
        cached = use_kv_cache or kv is not None
        batch = 2 * B if do_cfg and not cfg_split else B
        if cached:
            kv = kv if kv is not None else compute_kv_cache(dit, cond_src, text, offload_kv_cache)
            kv = _expand_cache(kv, batch)
            latents = latents[:, :, m:].contiguous()  # only the noisy frames are carried
        frames = latents.shape[2]
        first_noisy = 0 if cached else m

        step_model = graph_runner_for(dit, graphs)
        sc = _check_cache(cache)
        # A CUDA graph runner captures a step with an active cache in parts around the decision (the
        # head, then a full or a cached tail: runtime/compiled.py).
        sc_call = sc if sc is not None and sc.active else None
        # The first step whose latents hold NaN/Inf, kept on the device (-1: none yet) by torch ops
        # only: no host sync per step; read once after the loop.
        first_bad = torch.full((), -1, dtype=torch.long, device=latents.device)
        start = time.perf_counter()
        # CFG-parallel: each rank's signal covers its half; the sums over the replica's ranks are
        # the single-process batch's, so both halves take its decision.
        group = parallel.replica_group if cfg_split else None
        # The cache serves this run until the loop ends (a RuntimeError now if it serves another);
        # a loop that raises releases it without a report.
        with torch.no_grad(), _cache_run(sc, dit, ts_host, group):
            for i in range(n):
                t = timesteps[i]
                model_in = torch.cat([latents, latents], dim=0) if batch != B else latents
                timestep = t.expand(batch, frames)
                if first_noisy:
                    timestep = timestep.clone()
                    timestep[:, :first_noisy] = 0
                kwargs = {}
                if cached:
                    kwargs = dict(num_cond_latents=m, kv_cache_dict=kv)
                elif m:
                    kwargs = dict(num_cond_latents=m)
                if sc is not None:
                    if sc_call is not None:
                        kwargs["step_cache"] = sc_call
                        sc.begin_step(i, _cache_key(dit, model_in, text))
                    else:
                        sc.begin_step(i)
                v = step_model(model_in, timestep, text, mask, **kwargs)
                if sc is not None:
                    sc.end_step(full_without_hook=sc_call is None)
                if isinstance(v, tuple):
                    v = v[0]
                if cfg_split:  # one all-gather per step: [negative half, positive half]
                    v = parallel.all_gather(v, "cfg")
                if do_cfg:
                    v_uncond, v_cond = v.chunk(2)
                    if first_noisy and not cfg_zero_cond_frames:
                        v_uncond, v_cond = v_uncond[:, :, first_noisy:], v_cond[:, :, first_noisy:]
                        v = cfg_zero(v_uncond, v_cond, guidance_scale)
                    else:
                        v = cfg_zero(v_uncond, v_cond, guidance_scale)[:, :, first_noisy:]
                else:
                    v = v[:, :, first_noisy:]
                if first_noisy:
                    latents[:, :, first_noisy:] = euler_step(latents[:, :, first_noisy:], v, dts[i])
                else:
                    latents = euler_step(latents, v, dts[i])
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(latents).all(), i, first_bad)
                if progress:
                    _sync(device)
                    now = time.perf_counter()
                    print(f"denoise step {i + 1}/{n}  t={ts_host[i]:7.2f}  {now - start:.3f} s/step",
                          file=sys.stderr, flush=True)
                    start = now
                if callback is not None:
                    callback(i, ts_host[i], latents)
        if cached:
            latents = torch.cat([cond, latents], dim=2)
        return latents, first_bad

    if B:
        latents, first_bad = run_local(latents, text, mask, cond_src, kv_cache)
    else:  # a replica with no item: nothing to denoise, but it joins the gather below
        first_bad = torch.full((), -1, dtype=torch.long, device=latents.device)
    if items is not None:
        latents, first_bad = _gather_replicas(parallel, latents, first_bad, out_shape)
    # The one host read, after the last step (torch.equal answers a Python bool); the step
    # number is read only when there is an error to report. Under data parallelism every rank
    # raises it (the replicas' first bad steps are gathered with the latents).
    if not torch.equal(first_bad, torch.full_like(first_bad, -1)):
        bad = int(first_bad)
        raise NonFiniteLatentsError(
            f"denoise: the latents became non-finite (NaN or Inf) at step {bad + 1} of {n} (timestep "
            f"{ts_host[bad]:.2f}); nothing is returned. Usual causes: a guidance_scale too large "
            f"(here {guidance_scale:g}), float16 overflow (use bfloat16 or float32), non-finite model weights"
        )
    return latents


def _gather_replicas(parallel, latents, first_bad, out_shape):
    """Every replica's slice of the batch on every rank -> (the whole batch [B, ...] in item
    order, the earliest step any replica went non-finite at, or -1). Slices are padded to the
    largest one (all_gather takes equal sizes), the padding dropped afterwards."""
    from ..runtime.mesh import dp_split

    splits = dp_split(out_shape[0], parallel.size("dp"))
    per = max(hi - lo for lo, hi in splits)
    buf = latents.new_zeros((per,) + tuple(out_shape[1:]))
    buf[: latents.shape[0]] = latents
    everyone = parallel.all_gather(buf, "dp")
    out = torch.cat([everyone[j * per: j * per + hi - lo] for j, (lo, hi) in enumerate(splits)])
    bads = parallel.all_gather(first_bad.view(1), "dp")
    bads = torch.where(bads < 0, torch.full_like(bads, torch.iinfo(torch.long).max), bads).min()
    return out, torch.where(bads == torch.iinfo(torch.long).max, torch.full_like(bads, -1), bads)


def _check_cache(cache):
    if cache is None:
        return None
    from ..runtime.step_cache import StepCache

    if not isinstance(cache, StepCache):
        raise ValueError(f"cache must be a StepCache (longcat_native.StepCache) or None, got {type(cache).__name__}")
    return cache


@contextlib.contextmanager
def _cache_run(sc, dit, ts_host, group=None):
    """One run of the StepCache ``sc`` (None: nothing): begun on entry, ended (its report
    recorded) when the loop completes, released without a report when it raises."""
    if sc is None:
        yield
        return
    token = sc.begin_run(_depth(dit), ts_host, group=group)
    try:
        yield
    except BaseException:
        sc.abort_run(token)
        raise
    sc.end_run(token)


def _base_model(dit):
    """The LongCatDiT under a CompiledModel or a CUDAGraphRunner."""
    for _ in range(3):
        inner = getattr(dit, "__dict__", {}).get("model")
        if inner is None:
            break
        dit = inner
    return dit


def _depth(dit) -> int:
    cfg = _dit_config(dit)
    depth = getattr(cfg, "depth", None)
    return int(depth) if depth is not None else len(_base_model(dit).blocks)


def _cache_key(dit, model_in, text):
    """What the cached residuals depend on besides the step: the LoRA state and the shapes."""
    base = _base_model(dit)
    loras = (tuple(getattr(base, "active_loras", ()) or ()), getattr(base, "lora_mode", None))
    return (loras, tuple(model_in.shape), None if text is None else tuple(text.shape))
