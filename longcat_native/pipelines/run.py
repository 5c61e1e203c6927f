"""A whole ``longcat-native generate`` run as a library: :func:`~.plan.plan_generate` (pipelines/plan.py)
checks the request and reads the small inputs, then :func:`run_generate` loads, encodes, denoises
through :func:`~.tasks.generate`, decodes and writes, measuring each stage, and records what ran
in the output's metadata. The request and plan names are importable from here too."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import torch

from ..runtime.files import atomic_output
from ..runtime.memory import StageMemory
from .options import find_lora_file, make_noise
from .plan import (TINY_DEFAULT_LATENT, TINY_TEXT_TOKENS, GeneratePlan, GenerateRequest, memory_plan, parallel_layout,
                   parallel_world, plan_generate, refine_memory_estimate, request_step_cache)
from .shapes import VAE_SPACE_STRIDE, VAE_TIME_STRIDE, square_vae_tile
from .tasks import generate

__all__ = ["TINY_DEFAULT_LATENT", "GenerateRequest", "GeneratePlan", "GenerateResult", "plan_generate",
           "run_generate", "refine_memory_estimate"]


@dataclass
class GenerateResult:
    """``summary``: what the command prints (one JSON object with ``--json``); None on the ranks
    other than 0 of a parallel run. ``config``: the DiT's config."""

    summary: Optional[dict]
    finite: bool
    config: Any


def _random_text(prompt: str, tokens: int, channels: int):
    """Deterministic stand-in embeddings for a prompt string when no text encoder exists (only for
    the random-weights default): normal values seeded by the prompt's SHA-256; the mask marks one
    token per word plus one (an end token), like a padded tokenizer output."""
    seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")
    g = torch.Generator(device="cpu").manual_seed(seed)
    embeds = torch.randn(1, 1, tokens, channels, generator=g)
    valid = min(tokens, 1 + len(prompt.split()))
    mask = torch.zeros(1, tokens, dtype=torch.long)
    mask[:, :valid] = 1
    return embeds, mask


# -- the run's stages ------------------------------------------------------------------------------

def _device(r: GenerateRequest) -> torch.device:
    """``device``, else CUDA (this rank's GPU, LOCAL_RANK, under torchrun), else the CPU."""
    if r.device:
        return torch.device(r.device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if parallel_world(r) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda")


def _finish_parallel(dit, own_group: bool) -> None:
    """In a parallel run: wait for every rank (so rank 0 reports once every replica's files are
    written), then tear the process group down if this run created it."""
    if getattr(dit, "parallel", None) is None:
        return
    import torch.distributed as dist

    dist.barrier()
    if own_group:
        dist.destroy_process_group()


def _item_path(out: str, index: int) -> str:
    """Item ``index``'s file of a run that writes one file per video: ``<stem>-<index><ext>``."""
    stem, ext = os.path.splitext(out)
    return f"{stem}-{index}{ext}"


def _parallel_args(r: GenerateRequest) -> dict:
    return dict(cp_size=r.cp_size, ring_size=r.ring_size, cfg_parallel=r.cfg_parallel, dp_size=r.dp_size,
                shard_weights=r.shard_weights)


def _load(plan: GeneratePlan, mem: StageMemory, device, notes: List[str], mplan=None):
    """The DiT (and the VAE when needed) -> (dit, vae, source)."""
    from ..runtime.dit import LongCatDiT

    r = plan.request
    memory = {"quantize": r.quantize}
    if mplan is not None and mplan.streams:
        memory.update(offload="blocks", resident_blocks=mplan.resident_blocks)
    elif r.offload not in (None, "none"):
        memory.update(offload=r.offload)
    with mem.stage("load"):
        if plan.random_weights:
            dit = LongCatDiT.from_config("tiny", dtype=r.dtype, device=device, seed=0,
                                         kernels=r.kernels, attention=r.attention, **_parallel_args(r), **memory)
            source = "embedded tiny preset, RANDOM WEIGHTS"
            notes.insert(0, "RANDOM WEIGHTS: the tiny preset with seed-0 random parameters, not a trained model; "
                            "the latents are a smoke test, not a video")
        else:
            dit = LongCatDiT.from_pretrained(r.checkpoint, dtype=r.dtype, device=device,
                                             kernels=r.kernels, attention=r.attention, **_parallel_args(r), **memory)
            source = str(dit.checkpoint_path or r.checkpoint)
        vae = None
        if plan.need_vae:
            from .components import VideoVAE

            tile, stride = square_vae_tile(plan.vae_tile or 256)
            vae = VideoVAE.from_pretrained(plan.root, dtype=dit.dtype, device=device,
                                           tiling=plan.vae_tile is not None or bool(mplan and mplan.vae_tiling),
                                           tile=tile, tile_stride=stride)
    return dit, vae, source


def _conditioning(plan: GeneratePlan, pipe, cfg, mem: StageMemory, notes: List[str], g: torch.Generator,
                  batch: int):
    """The conditioning latents -> (cond, refine_cond, pad, noise): read from a file, encoded from
    pixels (refinement: the official pixel path, padded) or, for the random-weights default,
    random. From pixels, the official order: the noise of all frames first (``noise``), then the
    VAE posterior sampled with the same generator (``--vae-mean``: the posterior mean); the
    refinement's stage-1 posterior from torch's global generator."""
    r, cond, pixels, refine_cond, pad, noise = plan.request, plan.cond, plan.pixels, None, None, None
    sample = not r.vae_mean
    if cond is None and plan.random_weights and r.task in ("i2v", "vc"):
        frames = 1 if r.task == "i2v" else 1 + (plan.cond_frames - 1) // VAE_TIME_STRIDE
        cond = torch.randn(1, cfg.in_channels, frames, plan.latent[1], plan.latent[2],
                           generator=torch.Generator(device="cpu").manual_seed(r.seed + 1))
        notes.append(f"conditioning latents: RANDOM ({frames} frame(s), no VAE)")
    how = "posterior sampled" if sample else "posterior mean"
    if pixels is not None:
        with mem.stage("vae_encode"):
            if r.task in ("i2v", "vc"):
                noise = make_noise((batch, cfg.in_channels) + tuple(plan.latent), generator=g,
                                   device=pipe.dit.device)
            if r.task == "i2v":
                cond = pipe.encode_image(pixels, tuple(pixels.shape[2:]), generator=g, sample=sample, repeat=batch)
                notes.append(f"image {r.image} -> {pixels.shape[2]}x{pixels.shape[3]}, encoded by the VAE ({how})")
            elif r.task == "vc":
                cond = pipe.encode_video(pixels, tuple(pixels.shape[3:]), generator=g, sample=sample, repeat=batch)
                notes.append(f"last {pixels.shape[2]} frames of {r.video}, encoded by the VAE ({how})")
            else:  # refine from a stage-1 video, the official pixel path
                cond, refine_cond, pad = pipe.encode_refine_input(pixels, plan.refine_size,
                                                                  spatial_refine_only=r.spatial_refine_only,
                                                                  vae_sample=sample, generator=g)
                notes.append(f"stage-1 video {r.video} ({pixels.shape[0]} frames) upsampled to "
                             f"{pad['frames']} frames at {plan.refine_size[0]}x{plan.refine_size[1]}, "
                             f"encoded by the VAE ({how})")
    return cond, refine_cond, pad, noise


def _refine_arguments(plan: GeneratePlan, dit, cond, refine_cond, pad, notes: List[str]) -> dict:
    """generate_refine's task arguments: the refinement LoRA and BSA with a checkpoint, the
    already padded latents of the pixel path, or the latents to upsample."""
    r, kw = plan.request, {}
    if not plan.random_weights:
        if hasattr(dit, "enable_loras") and find_lora_file(dit, "refinement_lora"):
            kw["lora"] = "refinement_lora"
        if hasattr(dit, "enable_bsa"):
            kw["enable_bsa"] = True
        notes.append(f"refinement LoRA {'on' if 'lora' in kw else 'OFF (not found or not supported)'}, "
                     f"BSA {'on' if kw.get('enable_bsa') else 'OFF (not supported)'}")
    if pad is not None:  # already upsampled and padded by encode_refine_input
        kw.update(cond_latents=refine_cond, size=tuple(cond.shape[3:]), temporal_upsample=False, pad_frames=False)
    else:
        kw.update(temporal_upsample=not r.spatial_refine_only)
        if plan.refine_size is not None:
            kw["size"] = tuple(v // VAE_SPACE_STRIDE for v in plan.refine_size)
    return dict(kw, stage1_latents=cond, t_thresh=r.t_thresh)


def _task_arguments(plan: GeneratePlan, cond, lora_key, guided: dict, noise=None) -> dict:
    """tasks.generate's arguments for t2v, i2v, vc and long."""
    r = plan.request
    if r.task == "t2v":
        return dict(latent=plan.latent, lora=lora_key, **guided)
    if r.task == "i2v":
        return dict(image_latents=cond, num_frames=plan.frames, lora=lora_key, latents=noise, **guided)
    cont = dict(num_cond_frames=plan.cond_frames, use_kv_cache=not r.no_kv_cache, lora=lora_key, **guided)
    if r.task == "vc":
        return dict(video_latents=cond, num_frames=plan.frames, latents=noise, **cont)
    return dict(latent=plan.latent, num_segments=r.segments, **cont)


class _PrecomputedText:
    """A stand-in text encoder for the long-video pixel chain of the command: the prompts were
    encoded before the DiT was loaded; each ``encode_prompts`` call gets the positive embeddings
    first, then the negative ones (its order), and ``offload`` starts the next call."""

    def __init__(self, text, caption_channels: int):
        self.text, self.caption_channels, self._calls = text, caption_channels, 0

    def encode(self, prompts, dtype=None, max_length=None):
        pe, pm, ne, nm = self.text
        out = (pe, pm) if self._calls == 0 else (ne, nm)
        self._calls += 1
        return out

    def offload(self) -> None:
        self._calls = 0


def _long_pixels(plan: GeneratePlan, dit, vae, text, lora_key, guided: dict, notes: List[str]):
    """Task long, the official demo: each segment decoded to uint8 frames, the next one
    continuing the last --cond-frames of them, re-encoded -> (latents of every segment's new
    frames concatenated, uint8 frames)."""
    from .pipeline import LongCatVideoPipeline

    r = plan.request
    if text[0].shape[0] != 1:
        raise ValueError(f"--chain pixels makes one video; the prompt embeddings have batch {text[0].shape[0]} "
                         "(use --chain latent)")
    pipe = LongCatVideoPipeline(dit, _PrecomputedText(text, dit.config.caption_channels), vae)
    segs: List[torch.Tensor] = []
    kw = {k: v for k, v in guided.items() if k != "guidance_scale"}
    prompt = r.prompt if isinstance(r.prompt, str) else r.prompt[0]  # plan_generate allows one here
    frames = pipe.generate_long(prompt, r.negative_prompt, num_segments=r.segments, num_frames=plan.frames,
                                num_cond_frames=plan.cond_frames, latent=plan.latent, resize=r.resize,
                                guidance_scale=guided["guidance_scale"], use_kv_cache=not r.no_kv_cache,
                                vae_sample=not r.vae_mean, output_type="video", segment_latents=segs, lora=lora_key,
                                **kw)[0]
    m = 1 + (plan.cond_frames - 1) // VAE_TIME_STRIDE
    notes.append(f"long video the official way: {len(segs)} segments, each decoded to uint8 frames and its last "
                 f"{plan.cond_frames} frames re-encoded for the next")
    return torch.cat([segs[0]] + [s[:, :, m:] for s in segs[1:]], dim=2), frames


def run_generate(plan: GeneratePlan) -> GenerateResult:
    """Run a plan: text encoding (before the DiT is loaded), loading, VAE encoding, denoising,
    decoding and writing ``plan.out``, each a measured stage. Under context parallelism every
    rank runs it (the DiT splits each forward); only rank 0 decodes and writes.

    The draws the official pipeline takes from torch's global generator (refinement's stage-1
    posterior and t_thresh noise) come from it here too, seeded with ``seed`` for the run; the
    global generator's state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.request.seed)
        return _run(plan)


def _run(plan: GeneratePlan) -> GenerateResult:
    from safetensors.torch import save_file

    from ..runtime.dit import resolve_dtype
    from .pipeline import LongCatVideoPipeline, encode_prompts

    r, task, guidance = plan.request, plan.request.task, plan.guidance
    notes: List[str] = []
    device = _device(r)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = resolve_dtype(r.dtype, device)
    distributed = parallel_world(r) > 1
    lead = int(os.environ.get("RANK", "0")) == 0 if distributed else True
    own_group = False
    if distributed:
        import torch.distributed as dist

        own_group = not (dist.is_available() and dist.is_initialized())  # the model creates it: we end it
    mem = StageMemory(device)

    mplan = memory_plan(plan, dtype) if r.max_memory is not None else None
    if mplan is not None:
        notes.extend(f"memory plan ({r.max_memory}): {n}" for n in mplan.notes)
    text_note = None
    if plan.text_source == "encoder":
        # Before the DiT is loaded: the encoder never shares the GPU with the DiT's weights.
        from .components import TextEncoder

        with mem.stage("text_encode"):
            te = TextEncoder.from_pretrained(plan.root, dtype=dtype, device=device)
            te.layer_by_layer = bool(mplan and mplan.text_encoder_layer_by_layer)
            pe, pm, ne, nm = encode_prompts(te, r.prompt, r.negative_prompt if guidance > 1 else None,
                                            guidance, dtype=dtype, device=device, offload=True)
            del te
        text_note = (f"umT5 text encoder ({plan.root}/text_encoder), {pe.shape[2]} tokens; "
                     "moved off the device after encoding")

    t_load = time.perf_counter()
    dit, vae, source = _load(plan, mem, device, notes, mplan)
    load_s = time.perf_counter() - t_load
    cfg = dit.config
    pipe = LongCatVideoPipeline(dit, None, vae)
    if mplan is not None:
        pipe.apply_memory_plan(mplan)

    if plan.text_source == "file":
        pe, pm, ne, nm = plan.text
        text_note = f"prompt embeddings from {r.prompt_embeds}"
    elif plan.text_source == "random":
        prompts = [r.prompt] if isinstance(r.prompt, str) else list(r.prompt)
        pe, pm = (torch.cat(t) for t in zip(*(_random_text(p, TINY_TEXT_TOKENS, cfg.caption_channels)
                                               for p in prompts)))
        ne, nm = _random_text(r.negative_prompt, TINY_TEXT_TOKENS, cfg.caption_channels)
        text_note = "RANDOM text embeddings derived from the prompt strings (no text encoder)"
    if guidance <= 1:
        ne = nm = None
        if r.negative_prompt:
            notes.append(f"--negative-prompt ignored: guidance {guidance} <= 1 runs no negative branch (as officially)")

    pe, pm, ne, nm = _videos(pe, pm, ne, nm, r.num_videos)
    g = torch.Generator(device="cpu").manual_seed(r.seed)
    cond, refine_cond, pad, noise = _conditioning(plan, pipe, cfg, mem, notes, g, pe.shape[0])

    step_times: List[float] = []
    clock = {"last": time.perf_counter()}

    def on_step(i, t, latents):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        step_times.append(now - clock["last"])
        clock["last"] = now

    lora_kwargs = {k: v for k, v in (("lora_network_dim", r.lora_network_dim),
                                     ("lora_network_alpha", r.lora_network_alpha)) if v is not None}
    sampling = dict(num_steps=plan.steps, generator=g, progress=lead, callback=on_step, lora_kwargs=lora_kwargs,
                    **(plan.scheduler or {}))
    guided = dict(sampling, guidance_scale=guidance, distill=r.distill)
    lora_key = None
    if r.distill and not plan.random_weights:
        if hasattr(dit, "enable_loras") and find_lora_file(dit, "cfg_step_lora"):
            lora_key = "cfg_step_lora"
            notes.append("distilled schedule with the cfg_step LoRA")
        else:
            notes.append("distilled schedule WITHOUT the cfg_step LoRA (not found or not supported)")
    cache = request_step_cache(r)
    if cache is not None:
        sampling["cache"] = cache
        guided["cache"] = cache
    g_state = g.get_state()
    t0 = time.perf_counter()
    clock["last"] = t0
    with torch.inference_mode():
        if task == "refine" and cond is None:
            with mem.stage("denoise_stage1"):
                notes.append(f"stage 1: t2v ({plan.steps} steps) on the random-weights model")
                cond = generate(dit, "t2v", pe, pm, ne, nm, latent=plan.latent, **guided)
        with mem.stage("denoise" if task != "refine" else "denoise_refine"):
            if task == "refine":  # no guidance, the base 50-step schedule truncated at t_thresh
                out = generate(dit, "refine", pe, pm, **_refine_arguments(plan, dit, cond, refine_cond, pad, notes),
                               **dict(sampling, num_steps=50))
            elif task == "long" and plan.chain == "pixels":
                out, long_frames = _long_pixels(plan, dit, vae, (pe, pm, ne, nm), lora_key, guided, notes)
            else:
                out = generate(dit, task, pe, pm, ne, nm, **_task_arguments(plan, cond, lora_key, guided, noise))
    total = time.perf_counter() - t0
    finite = bool(torch.isfinite(out).all())
    check = None
    if cache is not None and r.cache_check:
        # The same run without the cache: same generator state, same conditioning.
        g.set_state(g_state)
        plain_s = dict({k: v for k, v in sampling.items() if k != "cache"}, callback=None)
        plain_g = dict({k: v for k, v in guided.items() if k != "cache"}, callback=None)
        t1 = time.perf_counter()
        with torch.inference_mode():
            if task == "refine":
                ref = generate(dit, "refine", pe, pm, **_refine_arguments(plan, dit, cond, refine_cond, pad, []),
                               **dict(plain_s, num_steps=50))
            elif task == "long" and plan.chain == "pixels":
                ref = None
                notes.append("--cache-check: not available for the long pixel chain")
            else:
                ref = generate(dit, task, pe, pm, ne, nm, **_task_arguments(plan, cond, lora_key, plain_g, noise))
        if ref is not None:
            check = {"uncached_total_s": time.perf_counter() - t1,
                     "latents_rel_l2": float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)),
                     "psnr_db": None, "_ref": ref}
    par = dit.parallel
    items = out.shape[0]
    per_item = (par is not None and par.size("dp") > 1) or (plan.to_video and items > 1)
    lo, hi = par.items(items) if par is not None else (0, items)
    writer = par is None or par.is_replica_lead
    if par is not None:
        notes.append(f"parallel layout {parallel_layout(r)}: {items} video(s), this replica {lo}..{hi - 1}; each "
                     "replica's first rank writes its videos, rank 0 reports")
    if dit.cp is not None:
        cp = dit.cp
        # A ring cuts each frame's tokens into equal chunks; only Ulysses alone tiles the grid.
        how = (f"ring {cp.ring_size} x Ulysses {cp.ulysses_size}, each latent frame's tokens in {cp.size} chunks"
               if cp.ring_size > 1 else f"Ulysses {cp.ulysses_size}, token grid split {cp.split_h} x {cp.split_w}")
        rest = [f"{d} {par.size(d)}" for d in ("cfg", "dp") if par is not None and par.size(d) > 1]
        rest += ["weights sharded"] if r.shard_weights else []
        notes.append(f"context parallelism: {cp.size} ranks, {how}" + (f" ({', '.join(rest)})" if rest else ""))
    outputs = [_item_path(plan.out, i) for i in range(items)] if per_item else [plan.out]
    video_shape = None
    if not finite:  # denoise checks its own result; this guards the other paths to the file
        raise ValueError(f"the {task} result holds non-finite values; {plan.out} was not written")
    if writer:
        meta = _metadata(plan, dit, cache, out, len(step_times), source, text_note)
        mine = range(lo, hi) if per_item else [None]
        if plan.to_video:
            video_shape = _write_videos(plan, pipe, mem, out, mine, pad, check, notes, meta,
                                        long_frames if task == "long" and plan.chain == "pixels" else None)
        else:
            for i in mine:
                lat = out if i is None else out[i: i + 1]
                m_i = meta if i is None else dict(meta, item=str(i), items=str(items))
                with atomic_output(plan.out if i is None else _item_path(plan.out, i)) as tmp:
                    # a failed or interrupted write leaves the previous file
                    save_file({"latents": lat.detach().float().cpu().contiguous()}, tmp, metadata=m_i)
    if not lead:
        _finish_parallel(dit, own_group)
        return GenerateResult(summary=None, finite=finite, config=cfg)
    n = len(step_times)
    memory = mem.summary()
    summary = {
        "task": task, "source": source, "random_weights": plan.random_weights, "text": text_note, "notes": notes,
        "device": str(device), "dtype": str(dit.dtype).replace("torch.", ""),
        "kernels": dit.resolved_kernels(), "attention": dit.resolved_attention(),
        "latent_shape": list(out.shape), "video_shape": video_shape, "steps": n, "guidance": guidance,
        "distill": bool(r.distill), "seed": r.seed, "load_s": load_s, "total_s": total,
        "step_times_s": step_times, "mean_step_s": (sum(step_times) / n) if n else None,
        "peak_memory_bytes": memory["peak_bytes"], "peak_memory_kind": memory["kind"], "memory": memory,
        "output": outputs[0], "outputs": outputs, "output_finite": finite, "quantize": dit.quantization,
        "cache": r.cache,
    }
    if par is not None:
        summary["parallel"] = {"layout": parallel_layout(r), "world": parallel_world(r), "coords": dict(par.coords),
                               "items_rank0": [lo, hi], "comm_bytes_rank0": dict(par.comm_bytes)}
    if plan.to_video:
        summary["metadata_file"] = outputs[0] + ".json"
    if mplan is not None:
        summary["memory_plan"] = mplan.to_dict()
    if cache is not None:
        summary["step_cache"] = cache.report()
        if check is not None:
            check.pop("_ref", None)
            summary["cache_check"] = check
    _finish_parallel(dit, own_group)
    return GenerateResult(summary=summary, finite=finite, config=cfg)


def _videos(pe, pm, ne, nm, n: int):
    """The text of every video: a batch-1 negative shared by several prompts expanded to them,
    then each prompt's rows repeated ``n`` times, consecutively (the official
    ``num_videos_per_prompt`` layout: prompt 0's videos, then prompt 1's)."""
    P = pe.shape[0]
    out = []
    for t in (pe, pm, ne, nm):
        if t is not None and t.shape[0] == 1 and P > 1:
            t = t.expand(P, *t.shape[1:]).contiguous()
        out.append(t if t is None or n == 1 else t.repeat_interleave(n, dim=0))
    return tuple(out)


def _write_videos(plan: GeneratePlan, pipe, mem: StageMemory, out, mine, pad, check, notes: List[str], meta: dict,
                  long_frames=None):
    """Decode and write this rank's videos (``mine``: item indices, or [None]: item 0 to
    ``plan.out``), each with its metadata sidecar; -> the first one's [F, H, W, 3] shape."""
    from .media import write_video

    r, task = plan.request, plan.request.task
    fps = r.fps if r.fps is not None else (30.0 if task == "refine" else 15.0)
    crop = (pad["cond_added"], pad["cond_added"] + pad["frames"]) if pad is not None else None
    shape = None
    for i in mine:
        k = 0 if i is None else i
        path = plan.out if i is None else _item_path(plan.out, i)
        with mem.stage("vae_decode"):
            frames_u8 = long_frames if long_frames is not None else pipe.decode(out[k: k + 1], "video", frames=crop)[0]
            if check is not None and k == 0:
                ref_u8 = pipe.decode(check["_ref"][:1], "video", frames=crop)[0]
                mse = float(((frames_u8.float() - ref_u8.float()) ** 2).mean())
                check["psnr_db"] = float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
                del ref_u8
        write_video(path, frames_u8, fps=fps, crf=10 if task == "refine" else 18)
        with atomic_output(path + ".json") as tmp:  # the .mp4 cannot hold them: a sidecar
            m_i = meta if i is None else dict(meta, item=str(i), items=str(out.shape[0]))
            Path(tmp).write_text(json.dumps(m_i, indent=1) + "\n")
        shape = shape or list(frames_u8.shape)
    if shape is not None:
        tiled = plan.vae_tile is not None and max(shape[1:3]) > plan.vae_tile
        notes.append(f"decoded by the VAE ({f'in {plan.vae_tile}-pixel tiles' if tiled else 'whole frames'}), "
                     f"{shape[0]} frames {shape[1]}x{shape[2]} written at {fps:g} fps")
    return shape


def _metadata(plan: GeneratePlan, dit, cache, out, steps_run: int, source: str, text_note) -> dict:
    """What the output file records (strings: safetensors metadata; the .mp4's sidecar JSON holds
    the same): what ran, not what was asked. The denoising steps of every stage (--steps is the
    base schedule's length; vc/long add the enhance_hf tail, refine truncates its own schedule);
    the quantized mode of the DiT ("none": float weights) and the step cache (--cache's spec and
    the StepCache's policy; "none"), which change the result as much as the seed does."""
    r = plan.request
    meta = {"task": r.task, "seed": str(r.seed), "steps": str(steps_run), "steps_requested": str(plan.steps),
            "guidance": str(plan.guidance), "distill": str(bool(r.distill)), "random_weights": str(plan.random_weights),
            "source": source, "text": str(text_note), "shape": json.dumps(list(out.shape)),
            "quantize": dit.quantization or "none", "cache": r.cache or "none"}
    if cache is not None:
        meta["cache_policy"] = json.dumps(cache.params(), sort_keys=True)
    return meta
