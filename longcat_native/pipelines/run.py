"""A whole ``longcat-native generate`` run as a library: :func:`plan_generate` makes every check
that needs no model (errors name the command's flags) and reads the small input files, then
:func:`run_generate` loads, encodes, denoises through :func:`~.tasks.generate`, decodes and
writes, measuring each stage. :func:`refine_memory_estimate` estimates the official refinement.

Why ~830 lines in one file: it is one command, read in order (request, plan with every check
before loading, the memory plan, the run's stages); splitting it would scatter the flags' meaning
over modules."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch

from ..runtime.files import atomic_output, check_output_path
from ..runtime.memory import StageMemory, run_memory_estimate
from .media import PIPELINES_EXTRA, MissingExtraError, missing_modules
from .shapes import (RESOLUTIONS, VAE_SPACE_STRIDE, VAE_TIME_STRIDE, bucket_scale_factor, bucket_size,
                     frames_to_latents, latent_size, refine_frame_padding, square_vae_tile)
from .options import find_lora_file, make_noise
from .tasks import generate

__all__ = ["TINY_DEFAULT_LATENT", "GenerateRequest", "GeneratePlan", "GenerateResult", "plan_generate",
           "run_generate", "refine_memory_estimate"]

# The embedded default (no checkpoint): the tiny preset with random weights, on a latent small
# enough for any CPU: 4 latent frames (13 video frames) of 8 x 12 (64 x 96 pixels).
TINY_DEFAULT_LATENT = (4, 8, 12)
TINY_TEXT_TOKENS = 16


@dataclass
class GenerateRequest:
    """What ``longcat-native generate`` is asked: one field per flag (``--cond-frames`` ->
    ``cond_frames``), with the command's defaults; ``resolution`` is (height, width) in pixels or
    a bucket name ("480p", "720p": image-to-video / continuation / refinement then take the
    official bucket of the input's aspect ratio), ``prompt_embeds``/``cond_latents``/``image``/
    ``video``/``out`` are file paths. ``vae_tile`` (pixels) or ``vae_tiling`` (256-pixel tiles)
    tile the VAE, which otherwise decodes whole frames as officially."""

    checkpoint: Optional[str] = None
    task: str = "t2v"
    prompt: str = "a cat walking on grass"
    negative_prompt: str = ""
    prompt_embeds: Optional[str] = None
    image: Optional[str] = None
    video: Optional[str] = None
    cond_latents: Optional[str] = None
    resolution: Optional[Any] = None
    resize: str = "stretch"
    spatial_refine_only: bool = False
    latent: Optional[Tuple[int, int, int]] = None
    frames: Optional[int] = None
    cond_frames: Optional[int] = None
    segments: int = 1
    steps: Optional[int] = None
    guidance: Optional[float] = None
    distill: bool = False
    t_thresh: float = 0.5
    lora_network_dim: Optional[int] = None
    lora_network_alpha: Optional[float] = None
    no_kv_cache: bool = False
    chain: Optional[str] = None
    seed: int = 0
    out: Optional[str] = None
    fps: Optional[float] = None
    vae_tile: Optional[int] = None
    vae_tiling: bool = False
    no_vae_tiling: bool = False
    vae_mean: bool = False
    device: Optional[str] = None
    dtype: Optional[str] = None
    kernels: str = "auto"
    attention: str = "auto"
    cp_size: int = 1
    cache: Optional[str] = None  # --cache SPEC (runtime/step_cache.py parse_cache_spec)
    cache_check: bool = False
    quantize: Optional[str] = None  # --quantize: runtime/quantize.py's modes
    offload: Optional[str] = None  # --offload blocks: weight streaming (runtime/streaming.py)
    max_memory: Optional[str] = None  # --max-memory 24GiB: the run's stages planned to fit (pipelines/budget.py)


@dataclass
class GeneratePlan:
    """A checked request with everything resolved that needs no model: sizes, steps, guidance, the
    text source ("encoder", "file" or "random") and the inputs already read."""

    request: GenerateRequest
    random_weights: bool
    out: str
    to_video: bool
    latent: Tuple[int, int, int]
    frames: int
    steps: int
    guidance: float
    cond_frames: int
    text_source: str
    text: Optional[tuple]  # (prompt_embeds, prompt_mask, negative_embeds, negative_mask) from the file
    cond: Optional[torch.Tensor]  # --cond-latents
    pixels: Optional[torch.Tensor]  # --image / --video, [1, 3, (F,) H, W] in [-1, 1]
    root: Optional[Path]  # the checkpoint root, when components are loaded from it
    need_vae: bool
    refine_size: Optional[Tuple[int, int]]  # refinement's target size in pixels (with a checkpoint)
    vae_tile: Optional[int] = None  # VAE tile size in pixels, None: whole frames (official)
    scheduler: Optional[dict] = None  # the checkpoint's scheduler settings (shift, num_train_timesteps)
    chain: str = "latent"  # task long: "pixels" (official demo, decoded .mp4 output) or "latent"


@dataclass
class GenerateResult:
    """``summary``: what the command prints (one JSON object with ``--json``); None on the ranks
    other than 0 under context parallelism. ``config``: the DiT's config."""

    summary: Optional[dict]
    finite: bool
    config: Any


# -- input files -----------------------------------------------------------------------------------

def _read_safetensors(path: str, flag: str) -> dict:
    from safetensors.torch import load_file

    if not path.endswith(".safetensors") or not os.path.isfile(path):
        raise ValueError(f"{flag} must name an existing .safetensors file, got {path}")
    try:
        return load_file(path)
    except Exception as e:  # a corrupt or foreign file: say which flag it came from
        raise ValueError(f"{flag} {path}: not a readable safetensors file ({e})") from None


def _load_latents_file(path: str, flag: str) -> torch.Tensor:
    tensors = _read_safetensors(path, flag)
    if "latents" in tensors:
        lat = tensors["latents"]
    elif len(tensors) == 1:
        lat = next(iter(tensors.values()))
    else:
        raise ValueError(f"{flag} {path} holds {sorted(tensors)}; name the latents tensor 'latents'")
    if lat.dim() == 4:
        lat = lat.unsqueeze(0)
    if lat.dim() != 5 or not lat.is_floating_point():
        raise ValueError(f"{flag} {path}: latents must be a float tensor [B, C, T, H, W], got "
                         f"{tuple(lat.shape)} {lat.dtype}")
    return lat


def _load_prompt_embeds(path: str) -> tuple:
    t = _read_safetensors(path, "--prompt-embeds")
    if "prompt_embeds" not in t:
        raise ValueError(f"--prompt-embeds {path} must hold 'prompt_embeds' (and optionally 'prompt_mask', "
                         "'negative_embeds', 'negative_mask')")
    return t["prompt_embeds"], t.get("prompt_mask"), t.get("negative_embeds"), t.get("negative_mask")


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


# -- plan --------------------------------------------------------------------------------------------

def _check_cp_launch(cp_size: int) -> None:
    """--cp-size N must run under torchrun with N processes (every rank sees the same
    environment, so every rank fails the same way)."""
    if cp_size < 1:
        raise ValueError(f"--cp-size must be >= 1, got {cp_size}")
    world = os.environ.get("WORLD_SIZE")
    if cp_size > 1 and world is None:
        raise ValueError(f"--cp-size {cp_size} runs one process per rank: launch it as `torchrun --nproc-per-node "
                         f"{cp_size} -m longcat_native.cli generate ... --cp-size {cp_size}`")
    if cp_size > 1 and int(world) != cp_size:
        raise ValueError(f"--cp-size {cp_size} but torchrun started {world} processes (--nproc-per-node must equal "
                         "--cp-size)")


def _check_inputs(r: GenerateRequest, random_weights: bool, to_video: bool) -> None:
    """Which flags go with which task, and what the random-weights default cannot do."""
    task = r.task
    if r.image is not None and task != "i2v":
        raise ValueError(f"--image is for task i2v; task {task!r} takes no image")
    if r.video is not None and task not in ("vc", "refine"):
        raise ValueError(f"--video is for tasks vc and refine; task {task!r} takes no video")
    if r.cond_latents is not None and task in ("t2v", "long"):
        raise ValueError(f"--cond-latents is for tasks i2v, vc and refine; task {task!r} takes none")
    if r.cond_latents is not None and (r.image is not None or r.video is not None):
        raise ValueError("--cond-latents replaces --image/--video; give one or the other")
    if random_weights and (r.image is not None or r.video is not None):
        raise ValueError("--image/--video (encoding pixels) needs the Wan VAE; the embedded tiny default (no "
                         "--checkpoint) has none: give --checkpoint DIR with a vae/ folder, or the conditioning "
                         "latents with --cond-latents FILE.safetensors")
    if random_weights and to_video:
        raise ValueError("--out .mp4 (decoding latents into frames) needs the Wan VAE; the embedded tiny default (no "
                         "--checkpoint) has none: give --checkpoint DIR with a vae/ folder, or write latents to a "
                         ".safetensors file")
    if r.latent is not None and (r.resolution is not None or r.frames is not None):
        raise ValueError("--latent T H W replaces --resolution and --frames; give one or the other")


def _resolution(r: GenerateRequest):
    """--resolution -> (bucket name or None, (height, width) or None)."""
    if r.resolution is None:
        return None, None
    if isinstance(r.resolution, str):
        if r.resolution not in RESOLUTIONS:
            raise ValueError(f"--resolution {r.resolution!r}: use {', '.join(sorted(RESOLUTIONS))} or HxW pixels")
        return r.resolution, None
    return None, tuple(r.resolution)


def _plan_latent(r: GenerateRequest, random_weights: bool, cond_size=None) -> Tuple[int, int, int]:
    if r.latent is not None:
        latent = tuple(r.latent)
        if min(latent) <= 0 or latent[1] % 2 or latent[2] % 2:
            raise ValueError(f"--latent T H W needs positive sizes with even H and W, got {latent}")
        return latent
    if random_weights and r.resolution is None:
        T = TINY_DEFAULT_LATENT[0] if r.frames is None else frames_to_latents(r.frames)
        return (T,) + TINY_DEFAULT_LATENT[1:]
    name, hw = _resolution(r)
    height, width = cond_size or hw or RESOLUTIONS[name or "480p"]
    return latent_size(93 if r.frames is None else r.frames, height, width)


def _read_frames(r: GenerateRequest):
    """The --image / --video file's uint8 frames, unresized (None without one)."""
    if r.image is None and r.video is None:
        return None
    from .media import load_frames

    return load_frames(r.image if r.image is not None else r.video)


def _cond_size(r: GenerateRequest, raw, cp_split, refine: bool) -> Optional[Tuple[int, int]]:
    """The size the --image / --video (i2v, vc) or the refined video (refine) is resized to: --latent
    or --resolution HxW when given, else the official bucket of the input's aspect ratio (480p
    for i2v / vc, 720p with spatial factor 64 for refinement, or the --resolution bucket)."""
    name, hw = _resolution(r)
    if r.latent is not None and not refine:
        return r.latent[1] * VAE_SPACE_STRIDE, r.latent[2] * VAE_SPACE_STRIDE
    if hw is not None:
        return hw
    if raw is None:
        return RESOLUTIONS[name or ("720p" if refine else "480p")]
    size = bucket_size(raw.shape[1], raw.shape[2], name or ("720p" if refine else "480p"),
                       bucket_scale_factor(refine, cp_split))
    latent_size(1, *size)
    return size


def _read_pixels(r: GenerateRequest, raw, size, cond_frames: int):
    if raw is None:
        return None
    from .media import load_image, load_video

    if r.image is not None:
        return load_image(raw[0], size, r.resize)
    if r.task == "vc":
        return load_video(raw, size, r.resize, last_frames=cond_frames)
    refine_frame_padding(raw.shape[0], 0, r.spatial_refine_only)
    return raw  # refine: the stage-1 video's uint8 frames at their own size


def plan_generate(r: GenerateRequest) -> GeneratePlan:
    """Every check that needs no model: flags, sizes, files, checkpoint parts, installed extras.
    Errors here come before any loading. Reads the (small) conditioning image/video files."""
    random_weights = r.checkpoint is None
    task = r.task
    _check_cp_launch(r.cp_size)
    _step_cache(r)  # a bad --cache spec is an error before anything loads
    _check_memory_flags(r)
    out = r.out or f"longcat_{task}_seed{r.seed}.safetensors"
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".safetensors", ".mp4"):
        raise ValueError(f"--out must end in .safetensors (latents) or .mp4 (decoded video), got {out}")
    # Before anything loads: a folder, an unwritable place or a missing folder that cannot be
    # created is an error now, not after the whole run.
    out = str(check_output_path(out, make_parent=True, what="--out"))
    to_video = ext == ".mp4"
    _check_inputs(r, random_weights, to_video)
    pixels_in = r.image is not None or r.video is not None
    stage1_fixed = task == "refine" and (r.video is not None or r.cond_latents is not None)
    if stage1_fixed and (r.frames is not None or r.latent is not None):
        raise ValueError("task refine: the stage-1 input (--video / --cond-latents) fixes the frame count and size; "
                         "--frames/--latent are not used (--resolution sets the refined size)")
    _resolution(r)
    dit_cfg = None
    if not random_weights:
        from ..runtime.config import LongCatConfig
        from ..runtime.weights import find_dit_dir

        dit_cfg = LongCatConfig.from_json_file(str(find_dit_dir(r.checkpoint) / "config.json"))
    cp_split = None
    if dit_cfg is not None:
        from ..runtime.parallel import resolve_split_hw

        cp_split = resolve_split_hw(r.cp_size, dit_cfg.cp_split_hw)
    raw = _read_frames(r)
    cond_size = _cond_size(r, raw, cp_split, False) if raw is not None and task in ("i2v", "vc") else None
    latent = _plan_latent(r, random_weights, cond_size)
    # The refined size (pixels): with a checkpoint, the official 720p bucket (spatial factor 64) of
    # the stage-1 video's aspect ratio, or --resolution; the random-weights default refines its
    # own stage 1 at 2x.
    refine_size = None
    if task == "refine" and not random_weights:
        refine_size = _cond_size(r, raw if r.video is not None else None, cp_split, True)
        latent_size(1, *refine_size)
    frames = (latent[0] - 1) * VAE_TIME_STRIDE + 1
    cond_frames = r.cond_frames if r.cond_frames is not None else (13 if not random_weights else 5)
    m = 1 + (cond_frames - 1) // VAE_TIME_STRIDE
    if task in ("vc", "long") and latent[0] <= m:
        raise ValueError(f"task {task}: {latent[0]} latent frames leave nothing to generate after the {m} "
                         f"conditioning latents of --cond-frames {cond_frames}")
    if task == "vc" and r.video is not None:
        frames_to_latents(cond_frames)  # the VAE encodes 4k + 1 conditioning frames
    if task == "i2v" and latent[0] < 2:
        raise ValueError("task i2v needs at least 2 latent frames (5 video frames)")
    steps = r.steps if r.steps is not None else (16 if r.distill else 50)
    guidance = r.guidance if r.guidance is not None else (1.0 if r.distill else 4.0)
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if r.vae_tile is not None and (r.vae_tile < 16 or r.vae_tile % VAE_SPACE_STRIDE):
        raise ValueError(f"--vae-tile must be a multiple of {VAE_SPACE_STRIDE} pixels >= 16, got {r.vae_tile}")
    if r.no_vae_tiling and (r.vae_tile is not None or r.vae_tiling):
        raise ValueError("--no-vae-tiling (whole frames, the default) contradicts --vae-tile / --vae-tiling")
    vae_tile = r.vae_tile if r.vae_tile is not None else (256 if r.vae_tiling else None)
    if r.fps is not None and r.fps <= 0:
        raise ValueError(f"--fps must be positive, got {r.fps}")
    if stage1_fixed:  # refinement runs without guidance (official)
        if r.guidance is not None and r.guidance > 1:
            raise ValueError(f"--guidance {r.guidance}: refinement runs without guidance (give no --guidance)")
        guidance = 1.0
    chain = r.chain if r.chain is not None else ("pixels" if to_video and not random_weights else "latent")
    if chain not in ("pixels", "latent"):
        raise ValueError(f"--chain must be pixels or latent, got {chain!r}")
    if task == "long" and chain == "pixels" and not to_video:
        raise ValueError("--chain pixels (the official long video: each segment decoded, the next one continuing its "
                         "uint8 frames) writes decoded video: --out F.mp4, or --chain latent for latents")
    if r.chain is not None and task != "long":
        raise ValueError(f"--chain is for task long; task {task!r} has one segment")
    text_source = "file" if r.prompt_embeds is not None else ("random" if random_weights else "encoder")
    need_text, need_vae = text_source == "encoder", pixels_in or to_video
    if task in ("i2v", "vc") and r.cond_latents is None and not pixels_in and not random_weights:
        flag = "--image FILE" if task == "i2v" else "--video FILE"
        raise ValueError(f"task {task} needs its conditioning: {flag}, or its latents with --cond-latents FILE.safetensors")
    if task == "refine" and not stage1_fixed and not random_weights:
        raise ValueError("task refine needs the stage-1 video --video FILE, or its latents --cond-latents FILE.safetensors")

    root = scheduler = None
    if not random_weights:
        from ..runtime.weights import find_dit_dir, list_weight_files
        from .components import SchedulerConfig, check_components

        list_weight_files(find_dit_dir(r.checkpoint))
        root = check_components(r.checkpoint, text_encoder=need_text, vae=need_vae,
                                caption_channels=dit_cfg.caption_channels, latent_channels=dit_cfg.in_channels)
        sched = SchedulerConfig.from_pretrained(root)
        scheduler = sched.sampling_kwargs() if sched is not None else None
    modules = (["transformers", "ftfy"] if need_text else []) + (["diffusers"] if need_vae else []) \
        + (["PIL"] if pixels_in else []) + (["imageio", "imageio_ffmpeg"] if r.video is not None else []) \
        + (["imageio_ffmpeg"] if to_video else [])
    missing = missing_modules(dict.fromkeys(modules))
    if missing:
        raise MissingExtraError(f"missing Python packages {', '.join(missing)} (text encoder, VAE, image/video "
                                f"files): {PIPELINES_EXTRA}")

    text = _load_prompt_embeds(r.prompt_embeds) if r.prompt_embeds is not None else None
    if text is not None and guidance > 1 and text[2] is None:
        raise ValueError(f"--guidance {guidance} > 1 needs 'negative_embeds' in --prompt-embeds {r.prompt_embeds} "
                         "(or --guidance 1 for no guidance)")
    cond = _load_latents_file(r.cond_latents, "--cond-latents") if r.cond_latents is not None else None
    pixels = _read_pixels(r, raw, cond_size, cond_frames)
    return GeneratePlan(request=r, random_weights=random_weights, out=out, to_video=to_video, latent=latent,
                        frames=frames, steps=steps, guidance=guidance, cond_frames=cond_frames,
                        text_source=text_source, text=text, cond=cond, pixels=pixels, root=root, need_vae=need_vae,
                        refine_size=refine_size, vae_tile=vae_tile, scheduler=scheduler, chain=chain)


# -- run ---------------------------------------------------------------------------------------------

def _device(r: GenerateRequest) -> torch.device:
    """``device``, else CUDA (this rank's GPU, LOCAL_RANK, under torchrun), else the CPU."""
    if r.device:
        return torch.device(r.device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if r.cp_size > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda")


def _finish_cp(dit) -> None:
    """Under context parallelism: wait for every rank (rank 0 decodes and writes after the others
    are done denoising), then tear the process group down."""
    if getattr(dit, "cp", None) is None:
        return
    import torch.distributed as dist

    dist.barrier(group=dit.cp.group)
    dist.destroy_process_group()


def _check_memory_flags(r: GenerateRequest) -> None:
    from ..runtime.names import OFFLOAD_CHOICES, QUANTIZE_CHOICES, parse_bytes

    if r.quantize is not None and r.quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize must be one of {list(QUANTIZE_CHOICES)}, got {r.quantize!r}")
    if r.offload is not None and r.offload not in OFFLOAD_CHOICES:
        raise ValueError(f"--offload must be one of {list(OFFLOAD_CHOICES)}, got {r.offload!r}")
    if r.max_memory is not None:
        parse_bytes(r.max_memory)
        if r.offload not in (None, "none"):
            raise ValueError("--max-memory plans the streaming itself: drop --offload")
        if r.cp_size > 1:
            raise ValueError("--max-memory plans one device; with --cp-size each rank holds the whole model")


def _memory_plan(plan: GeneratePlan, dtype):
    """The run's own stages (text encoding, each denoising pass, VAE encode/decode) planned to fit
    ``--max-memory`` (pipelines/budget.py), or a ValueError with the stage table."""
    from .budget import Stage, format_plan, plan_memory
    from .components import TEXT_ENCODER_DIR, VAE_DIR, component_config
    from ..runtime.config import resolve_config
    from ..runtime.weights import find_dit_dir

    r = plan.request
    cfg = resolve_config("tiny") if plan.random_weights else resolve_config(
        str(find_dit_dir(r.checkpoint) / "config.json"))
    cfg_batch = 2 if plan.guidance > 1 else 1
    stages = []
    if plan.text_source == "encoder":
        stages.append(Stage("text_encode", "text_encode", batch=cfg_batch))
    lat = tuple(plan.latent)
    if r.task == "refine" and plan.refine_size is not None:  # the doubled, padded stage-1 video
        pad = refine_frame_padding((lat[0] - 1) * VAE_TIME_STRIDE + 1)
        lat = (pad["noise_latents"] + pad["cond_latents"], plan.refine_size[0] // VAE_SPACE_STRIDE,
               plan.refine_size[1] // VAE_SPACE_STRIDE)
    if plan.need_vae and plan.pixels is not None:
        stages.append(Stage("vae_encode", "vae_encode", latent=lat))
    stages.append(Stage("denoise", "denoise", batch=1 if r.task == "refine" else cfg_batch, latent=lat,
                        bsa=r.task == "refine"))
    if plan.to_video:
        stages.append(Stage("vae_decode", "vae_decode", latent=lat))
    root = plan.root
    mplan = plan_memory(r.max_memory, dit_config=cfg, quantize=r.quantize, dtype=dtype, stages=stages,
                        text_encoder_config=component_config(root, TEXT_ENCODER_DIR)
                        if plan.text_source == "encoder" else None,
                        vae_config=component_config(root, VAE_DIR) if plan.need_vae and root else None,
                        step_cache=_step_cache(r))
    if not mplan.fits:
        raise ValueError(f"the run does not fit --max-memory {r.max_memory}:\n" + format_plan(mplan))
    return mplan


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
                                         kernels=r.kernels, attention=r.attention, cp_size=r.cp_size, **memory)
            source = "embedded tiny preset, RANDOM WEIGHTS"
            notes.insert(0, "RANDOM WEIGHTS: the tiny preset with seed-0 random parameters, not a trained model; "
                            "the latents are a smoke test, not a video")
        else:
            dit = LongCatDiT.from_pretrained(r.checkpoint, dtype=r.dtype, device=device,
                                             kernels=r.kernels, attention=r.attention, cp_size=r.cp_size, **memory)
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
    frames = pipe.generate_long(r.prompt, r.negative_prompt, num_segments=r.segments, num_frames=plan.frames,
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
    lead = int(os.environ.get("RANK", "0")) == 0 if r.cp_size > 1 else True
    mem = StageMemory(device)

    mplan = _memory_plan(plan, dtype) if r.max_memory is not None else None
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
        pe, pm = _random_text(r.prompt, TINY_TEXT_TOKENS, cfg.caption_channels)
        ne, nm = _random_text(r.negative_prompt, TINY_TEXT_TOKENS, cfg.caption_channels)
        text_note = "RANDOM text embeddings derived from the prompt strings (no text encoder)"
    if guidance <= 1:
        ne = nm = None
        if r.negative_prompt:
            notes.append(f"--negative-prompt ignored: guidance {guidance} <= 1 runs no negative branch (as officially)")

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
    cache = _step_cache(r)
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
    if dit.cp is not None:
        notes.append(f"context parallelism: {dit.cp.size} ranks, token grid split {dit.cp.split_h} x "
                     f"{dit.cp.split_w}; rank 0 writes the output")
        if not lead:
            _finish_cp(dit)
            return GenerateResult(summary=None, finite=finite, config=cfg)

    video_shape = None
    if plan.to_video:
        fps = r.fps if r.fps is not None else (30.0 if task == "refine" else 15.0)
        crop = (pad["cond_added"], pad["cond_added"] + pad["frames"]) if pad is not None else None
        with mem.stage("vae_decode"):
            frames_u8 = long_frames if task == "long" and plan.chain == "pixels" else \
                pipe.decode(out, "video", frames=crop)[0]
            if check is not None:
                ref_u8 = pipe.decode(check["_ref"], "video", frames=crop)[0]
                mse = float(((frames_u8.float() - ref_u8.float()) ** 2).mean())
                check["psnr_db"] = float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
                del ref_u8
        from .media import write_video

        write_video(plan.out, frames_u8, fps=fps, crf=10 if task == "refine" else 18)
        video_shape = list(frames_u8.shape)
        with atomic_output(plan.out + ".json") as tmp:  # the .mp4 cannot hold them: a sidecar
            Path(tmp).write_text(json.dumps(_metadata(plan, dit, cache, out, len(step_times), source, text_note),
                                            indent=1) + "\n")
        tiled = plan.vae_tile is not None and max(video_shape[1:3]) > plan.vae_tile
        notes.append(f"decoded by the VAE ({f'in {plan.vae_tile}-pixel tiles' if tiled else 'whole frames'}), "
                     f"{video_shape[0]} frames {video_shape[1]}x{video_shape[2]} written at {fps:g} fps")
    else:
        meta = _metadata(plan, dit, cache, out, len(step_times), source, text_note)
        if not finite:  # denoise checks its own result; this guards the other paths to the file
            raise ValueError(f"the {task} result holds non-finite values; {plan.out} was not written")
        latents = out.detach().float().cpu().contiguous()
        with atomic_output(plan.out) as tmp:  # a failed or interrupted write leaves the previous file
            save_file({"latents": latents}, tmp, metadata=meta)
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
        "output": plan.out, "output_finite": finite, "quantize": dit.quantization, "cache": r.cache,
    }
    if plan.to_video:
        summary["metadata_file"] = plan.out + ".json"
    if mplan is not None:
        summary["memory_plan"] = mplan.to_dict()
    if cache is not None:
        summary["step_cache"] = cache.report()
        if check is not None:
            check.pop("_ref", None)
            summary["cache_check"] = check
    _finish_cp(dit)
    return GenerateResult(summary=summary, finite=finite, config=cfg)


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


def _step_cache(r: GenerateRequest):
    """The StepCache of ``--cache`` (None without it); ``--cache-check`` needs ``--cache``."""
    if r.cache is None:
        if r.cache_check:
            raise ValueError("--cache-check compares a cached run with an uncached one: it needs --cache")
        return None
    from ..runtime.step_cache import StepCache, parse_cache_spec

    return StepCache(**parse_cache_spec(r.cache))


# -- memory estimate ---------------------------------------------------------------------------------

def refine_memory_estimate(cfg, parameters: int, dtype_bytes: int = 2, stage1_frames: int = 93,
                           size=(704, 1280), **assumptions) -> dict:
    """An ESTIMATE of the peak GPU memory of the official 480p -> 720p refinement of a
    ``stage1_frames``-frame video with ``longcat-native generate --task refine``: the video is
    doubled in time and upsampled to ``size``, padded to BSA-friendly latent counts (93 frames
    -> 186 -> 48 x 88 x 160 latents, 168,960 tokens), denoised in 5 steps without guidance, with
    the refinement LoRA and BSA on, then decoded. The arithmetic and its assumptions (tiles,
    overheads, budget: the keyword ``assumptions``) are :func:`~longcat_native.runtime.memory.run_memory_estimate`'s."""
    pad = refine_frame_padding(stage1_frames)
    latent = (pad["noise_latents"] + pad["cond_latents"], size[0] // VAE_SPACE_STRIDE, size[1] // VAE_SPACE_STRIDE)
    est = run_memory_estimate(cfg, parameters, latent, pad["decoded_frames"], size, dtype_bytes=dtype_bytes, bsa=True,
                              **assumptions)
    return {"estimate": True, "stage1_frames": stage1_frames, "frames": pad["frames"], **est}
