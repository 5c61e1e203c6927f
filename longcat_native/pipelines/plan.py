"""The ``longcat-native generate`` request and its plan: :class:`GenerateRequest` (one field per
flag, each declared once with its flag's help: ``cli.py`` builds the command's options from these
fields), and :func:`plan_generate`, every check that needs no model (errors name the command's
flags) with the small input files read, before :func:`~.run.run_generate` loads anything. Also
the run's memory plan (``--max-memory``: pipelines/budget.py) and :func:`refine_memory_estimate`.

Imports no torch until a plan is made: the command line's ``--help`` reads the fields."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple

from ..runtime.files import check_output_path
from ..runtime.names import (ATTENTION_CHOICES, KERNEL_CHOICES, MAX_STEPS, OFFLOAD_CHOICES, QUANTIZE_CHOICES,
                             parse_bytes)
from .shapes import (RESOLUTIONS, VAE_SPACE_STRIDE, VAE_TIME_STRIDE, bucket_scale_factor, bucket_size,
                     frames_to_latents, latent_size, refine_frame_padding)

if TYPE_CHECKING:
    import torch

__all__ = ["TINY_DEFAULT_LATENT", "TASK_CHOICES", "GenerateRequest", "GeneratePlan", "plan_generate", "memory_plan",
           "request_step_cache", "refine_memory_estimate", "int_in", "finite_number", "parse_resolution", "parallel_world",
           "parallel_layout"]

# The embedded default (no checkpoint): the tiny preset with random weights, on a latent small
# enough for any CPU: 4 latent frames (13 video frames) of 8 x 12 (64 x 96 pixels).
TINY_DEFAULT_LATENT = (4, 8, 12)
TINY_TEXT_TOKENS = 16
TASK_CHOICES = ("t2v", "i2v", "vc", "refine", "long")


# -- flag values: checked before anything loads (a ValueError; the command line names the flag) -------

def int_in(low: int, high: int, what: str):
    """A parser of an integer in [low, high]."""

    def parse(text) -> int:
        try:
            v = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
        if not low <= v <= high:
            raise ValueError(f"{text}: {what} must be in [{low}, {high}]")
        return v

    parse.__name__ = what
    return parse


def finite_number(text) -> float:
    """A finite number (an infinite or NaN guidance would turn every latent non-finite)."""
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{text}: must be a finite number")
    return v


def parse_resolution(text: str):
    """``--resolution``: a bucket name (480p, 720p: kept as the name, so image-to-video,
    continuation and refinement take the official bucket of the input's aspect ratio) or ``HxW``
    in pixels -> (H, W)."""
    key = text.strip().lower()
    if key in RESOLUTIONS:
        return key
    parts = key.split("x")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    raise ValueError(f"{text!r}: use {', '.join(sorted(RESOLUTIONS))} or HxW in pixels (e.g. 480x832)")


SEED = int_in(0, 2**64 - 1, "a seed")  # what a torch.Generator takes
STEPS = int_in(1, MAX_STEPS, "steps")


def _flag(default=None, help: str = "", group: str = "", **argparse):
    """A field of :class:`GenerateRequest` and its flag ``--field-name``, declared once: the help,
    the group its flag is listed under, and argparse's keywords (``type``, ``choices``, ``nargs``,
    ``metavar``; a False default is a switch)."""
    return field(default=default, metadata={"help": help, "group": group, **argparse})


INPUT, SIZE, SAMPLING, OUTPUT, MODEL, PARALLEL, MEMORY = ("what to generate", "size", "sampling", "output", "model",
                                                          "multi-GPU (torchrun)", "memory and speed")


@dataclass
class GenerateRequest:
    """What ``longcat-native generate`` is asked: one field per flag (``--cond-frames`` ->
    ``cond_frames``), with the command's defaults; ``resolution`` is (height, width) in pixels or
    a bucket name ("480p", "720p": image-to-video / continuation / refinement then take the
    official bucket of the input's aspect ratio), ``prompt_embeds``/``cond_latents``/``image``/
    ``video``/``out`` are file paths. ``vae_tile`` (pixels) or ``vae_tiling`` (256-pixel tiles)
    tile the VAE, which otherwise decodes whole frames as officially. Each field's metadata holds
    its flag's help."""

    checkpoint: Optional[str] = _flag(help="checkpoint root or dit/ folder (default: tiny random weights)", group=INPUT)
    task: str = _flag("t2v", choices=TASK_CHOICES, group=INPUT)
    prompt: Any = _flag("a cat walking on grass", "prompt string(s), encoded by the checkpoint's text encoder; "
                        "several (--prompt A B ...) make one video each (x --num-videos)", INPUT, nargs="+")
    negative_prompt: str = _flag("", "negative prompt string, used when guidance > 1 (default empty, as the official "
                                     "pipeline)", INPUT)
    prompt_embeds: Optional[str] = _flag(help="a .safetensors file with prompt_embeds [B, 1, L, C], prompt_mask, "
                                              "negative_embeds, negative_mask (instead of prompt strings)", group=INPUT)
    image: Optional[str] = _flag(help="conditioning image file for i2v (encoded by the checkpoint's VAE)", group=INPUT)
    video: Optional[str] = _flag(help="video file: conditioning for vc (its last --cond-frames frames), the stage-1 "
                                      "video for refine (encoded by the checkpoint's VAE)", group=INPUT)
    cond_latents: Optional[str] = _flag(help="a .safetensors file with conditioning latents 'latents' [B, 16, T, H, "
                                             "W]: the image latent (i2v), the video latents (vc) or the stage-1 "
                                             "latents (refine)", group=INPUT)
    resolution: Optional[Any] = _flag(
        help="480p, 720p or HxW pixels (multiples of 16). A bucket name: t2v/long at 480x832 / 704x1280; "
             "i2v/vc/refine at the official bucket closest to the input's aspect ratio (default 480p; refine: the "
             "720p table with spatial factor 64, as officially). HxW: that size", group=SIZE, type=parse_resolution)
    resize: str = _flag("stretch", "how --image/--video frames are fitted to the size: stretch (default, official) "
                                   "or cover and crop the centre (keeps the aspect ratio, not the official pixels)",
                        SIZE, choices=("stretch", "crop"))
    spatial_refine_only: bool = _flag(False, "refine: keep the frame count (default doubles it, as officially)", SIZE)
    latent: Optional[Tuple[int, int, int]] = _flag(
        help="latent frames, height, width (for small runs; replaces --resolution/--frames)", group=SIZE, type=int,
        nargs=3, metavar=("T", "H", "W"))
    frames: Optional[int] = _flag(help="video frames, 4k + 1 (default 93; 13 for the tiny default)", group=SIZE,
                                  type=int)
    cond_frames: Optional[int] = _flag(help="conditioning video frames of vc/long (default 13; 5 tiny)", group=SIZE,
                                       type=int)
    segments: int = _flag(1, "continuation segments of task long (default 1)", SIZE, type=int)
    num_videos: int = _flag(1, "videos per prompt (official num_videos_per_prompt; default 1): each prompt's "
                               "videos are consecutive items of the batch, with their own noise", SIZE, type=int)
    steps: Optional[int] = _flag(
        help="length of the base schedule (default 50; 16 with --distill). What runs: t2v/i2v that many steps; vc "
             "adds the 10-step enhance_hf tail (not with --distill); long runs a t2v segment plus each vc segment; "
             "refine runs the 50-step schedule cut at --t-thresh (5 steps) and ignores --steps, except for the stage "
             "1 the random-weights default generates first. The output records the steps run",
        group=SAMPLING, type=STEPS)
    guidance: Optional[float] = _flag(help="CFG scale (default 4.0; 1.0 with --distill); <= 1: no CFG", group=SAMPLING,
                                      type=finite_number)
    distill: bool = _flag(False, "the distilled 16-step schedule (cfg_step LoRA)", SAMPLING)
    t_thresh: float = _flag(0.5, "refinement noise level (default 0.5)", SAMPLING, type=float)
    lora_network_dim: Optional[int] = _flag(help="rank passed to load_lora (default: the loader's, 128)",
                                            group=SAMPLING, type=int)
    lora_network_alpha: Optional[float] = _flag(help="alpha passed to load_lora (default: the loader's)",
                                                group=SAMPLING, type=float)
    no_kv_cache: bool = _flag(False, "vc/long: run conditioning frames every step", SAMPLING)
    chain: Optional[str] = _flag(
        help="long: pixels = the official demo (each segment decoded to uint8 frames, the next one continuing its "
             "last --cond-frames frames re-encoded; needs --out .mp4 and a checkpoint), latent = the last latents "
             "condition the next segment directly (faster, not the official numbers). Default: pixels for .mp4 "
             "output with a checkpoint, else latent", group=SAMPLING, choices=("pixels", "latent"))
    seed: int = _flag(0, "seed of the noise, the VAE posterior and random weights (default 0)", SAMPLING, type=SEED)
    out: Optional[str] = _flag(help="output: .mp4 (decoded video; needs the VAE; its metadata in OUT.json) or "
                                    ".safetensors (latents); default longcat_<task>_seed<seed>.safetensors",
                               group=OUTPUT)
    fps: Optional[float] = _flag(help="frame rate of the .mp4 (default 15; 30 for refine, as the official demos)",
                                 group=OUTPUT, type=float)
    vae_tile: Optional[int] = _flag(help="tile the VAE with N-pixel square tiles, overlapping by a quarter (implies "
                                         "--vae-tiling)", group=OUTPUT, type=int, metavar="N")
    vae_tiling: bool = _flag(False, "encode/decode in 256-pixel VAE tiles: less memory, but other pixels at the tile "
                                    "seams (default: whole frames, as officially)", OUTPUT)
    no_vae_tiling: bool = _flag(False, "whole frames (the default; kept for old scripts)", OUTPUT)
    vae_mean: bool = _flag(False, "encode --image/--video to the VAE posterior mean instead of sampling it with the "
                                  "seed's generator (deterministic per input, not the official numbers)", OUTPUT)
    device: Optional[str] = _flag(help="default: cuda if available (this rank's GPU under torchrun), else cpu",
                                  group=MODEL)
    dtype: Optional[str] = _flag(help="default: bfloat16 on cuda, float32 on cpu", group=MODEL)
    kernels: str = _flag("auto", group=MODEL, choices=tuple(sorted(KERNEL_CHOICES)))
    attention: str = _flag("auto", group=MODEL, choices=ATTENTION_CHOICES)
    cp_size: int = _flag(1, "Ulysses context parallelism: each forward's tokens split over N ranks (N divides the "
                            "attention heads). Every parallel flag runs under `torchrun --nproc-per-node W -m "
                            "longcat_native generate ...` with W = cp x ring x (2 with --cfg-parallel) x dp; rank 0 "
                            "prints", PARALLEL, type=int, aliases=("--cp",))
    ring_size: int = _flag(1, "ring attention: the tokens in N segments whose keys/values travel a ring (beyond the "
                              "head count, across nodes); composes with --cp", PARALLEL, type=int, aliases=("--ring",))
    cfg_parallel: bool = _flag(False, "CFG-parallel: a guided step's negative and positive halves on two ranks, one "
                                      "all-gather of the prediction per step (needs --guidance > 1)", PARALLEL)
    dp_size: int = _flag(1, "data parallel: the videos (prompts x --num-videos) split over N replicas, contiguous "
                            "slices; each replica's first rank writes its videos as OUT-<index>.<ext>",
                         PARALLEL, type=int, aliases=("--dp",))
    shard_weights: bool = _flag(False, "FSDP2: the DiT's weights sharded over every rank, each block gathered "
                                       "before use (less memory per GPU)", PARALLEL)
    cache: Optional[str] = _flag(
        help="step caching (docs/design/step_cache.md): dbcache or taylorseer, optionally ':key=value,...' with fn, "
             "bn, threshold, warmup, interval, max_cached, max_continuous, order (or the StepCache names), e.g. "
             "taylorseer:fn=1,bn=0,threshold=0.12,warmup=8,interval=2,max_continuous=2; lossy: check quality with "
             "--cache-check. With --max-memory its buffers are planned too", group=MEMORY, metavar="SPEC")
    cache_check: bool = _flag(False, "with --cache: run again without the cache and report the deviation (relative "
                                     "L2 of the latents, PSNR of the decoded frames for .mp4 output)", MEMORY)
    quantize: Optional[str] = _flag(
        help="DiT block GEMM weights quantized at load (docs/design/quantization.md): fp8 (FP8 GEMMs on FP8 GPUs), "
             "fp8-weight-only, int8-weight-only; about 13.3 GiB instead of 25.3 for the 13.6B model", group=MEMORY,
        choices=QUANTIZE_CHOICES)
    offload: Optional[str] = _flag(help="blocks: keep as many DiT blocks on the device as fit, stream the others from "
                                        "host memory (docs/design/streaming.md; --max-memory picks the count itself)",
                                   group=MEMORY, choices=OFFLOAD_CHOICES)
    max_memory: Optional[str] = _flag(
        help="a device memory budget, e.g. 24GiB: every stage traced at its real shape and the settings that fit "
             "chosen (forward chunking, streamed blocks, model offload, VAE tiling; docs/design/memory.md); an error "
             "(exit 1 for info) with the stage table when nothing fits", group=MEMORY, metavar="BYTES")


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


# -- input files -----------------------------------------------------------------------------------

def _read_safetensors(path: str, flag: str) -> dict:
    from safetensors.torch import load_file

    if not path.endswith(".safetensors") or not os.path.isfile(path):
        raise ValueError(f"{flag} must name an existing .safetensors file, got {path}")
    try:
        return load_file(path)
    except Exception as e:  # a corrupt or foreign file: say which flag it came from
        raise ValueError(f"{flag} {path}: not a readable safetensors file ({e})") from None


def _load_latents_file(path: str, flag: str) -> "torch.Tensor":
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


# -- plan --------------------------------------------------------------------------------------------

def parallel_world(r: GenerateRequest) -> int:
    """The processes the request's layout takes: cp x ring x cfg x dp."""
    return r.cp_size * r.ring_size * (2 if r.cfg_parallel else 1) * r.dp_size


def parallel_layout(r: GenerateRequest) -> str:
    """The layout in words, e.g. ``dp=2 x cfg=2 x ulysses=2 (8 ranks)``."""
    parts = [f"{k}={v}" for k, v in (("dp", r.dp_size), ("cfg", 2 if r.cfg_parallel else 1), ("ring", r.ring_size),
                                     ("ulysses", r.cp_size)) if v > 1]
    text = " x ".join(parts) if parts else "single process"
    return text + (", weights sharded" if r.shard_weights else "") + f" ({parallel_world(r)} ranks)"


def _check_parallel(r: GenerateRequest, guidance: float, num_heads: Optional[int],
                    latents: Sequence[Tuple[int, int, int]] = ()) -> None:
    """The layout against the launch and the request, the same on every rank (each sees the same
    flags and environment, so every rank fails alike, before any process group exists).
    ``latents``: the (T, H, W) latent sizes the run denoises (a ring needs their tokens per frame
    to divide by ring x cp: the model's check_grid, here before loading)."""
    for flag, v in (("--cp-size", r.cp_size), ("--ring-size", r.ring_size), ("--dp-size", r.dp_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{flag} must be an integer >= 1, got {v!r}")
    world = parallel_world(r)
    env = os.environ.get("WORLD_SIZE")
    launched = int(env) if env else None
    if world > 1 and launched is None:
        raise ValueError(f"the layout {parallel_layout(r)} runs one process per rank: launch it as `torchrun "
                         f"--nproc-per-node {world} -m longcat_native.cli generate ...` (or -m longcat_native) with "
                         "the same flags")
    if launched is not None and launched != world:
        raise ValueError(f"torchrun started {launched} processes but the layout {parallel_layout(r)} needs {world}: "
                         "--nproc-per-node must equal --cp-size x --ring-size x (2 with --cfg-parallel) x --dp-size "
                         "(times the nodes)")
    if r.cfg_parallel and guidance <= 1:
        raise ValueError(f"--cfg-parallel splits a guided step's negative and positive halves, but guidance "
                         f"{guidance:g} <= 1 runs no negative half{' (refinement runs unguided)' if r.task == 'refine' else ''}"
                         ": drop --cfg-parallel (use --dp for more videos at once) or give --guidance > 1")
    if num_heads is not None and num_heads % r.cp_size:
        raise ValueError(f"--cp-size {r.cp_size} must divide the model's {num_heads} attention heads (Ulysses splits "
                         "heads over ranks); --ring-size splits further")
    if r.ring_size > 1:
        ranks = r.ring_size * r.cp_size
        for _, h, w in latents:
            tokens = (h // 2) * (w // 2)  # the DiT's 2 x 2 spatial patches
            if tokens % ranks:
                raise ValueError(f"--ring {r.ring_size} x --cp {r.cp_size} = {ranks} ranks split each latent frame's "
                                 f"{h // 2} x {w // 2} = {tokens} tokens (latent {h} x {w}, halved) into equal "
                                 f"chunks: {tokens} is not divisible by {ranks}; pick a size whose tokens per frame "
                                 "divide, or fewer ranks")


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
    if isinstance(r.num_videos, bool) or not isinstance(r.num_videos, int) or r.num_videos < 1:
        raise ValueError(f"--num-videos must be an integer >= 1, got {r.num_videos!r}")
    prompts = [r.prompt] if isinstance(r.prompt, str) else list(r.prompt) if isinstance(r.prompt, (list, tuple)) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"--prompt must be one or more strings, got {r.prompt!r}")
    request_step_cache(r)  # a bad --cache spec is an error before anything loads
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
        from ..runtime.checkpoints import checkpoint_config

        dit_folder, dit_layout, dit_cfg = checkpoint_config(r.checkpoint, quantize=r.quantize)  # any layout
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
    if random_weights:
        from ..runtime.config import resolve_config

        num_heads = resolve_config("tiny").num_heads
    else:
        num_heads = dit_cfg.num_heads
    denoised = [latent] + ([(1, refine_size[0] // VAE_SPACE_STRIDE, refine_size[1] // VAE_SPACE_STRIDE)]
                           if refine_size is not None else [])
    _check_parallel(r, guidance, num_heads, denoised)
    chain = r.chain if r.chain is not None else ("pixels" if to_video and not random_weights else "latent")
    if chain not in ("pixels", "latent"):
        raise ValueError(f"--chain must be pixels or latent, got {chain!r}")
    if task == "long" and chain == "pixels" and not to_video:
        raise ValueError("--chain pixels (the official long video: each segment decoded, the next one continuing its "
                         "uint8 frames) writes decoded video: --out F.mp4, or --chain latent for latents")
    if task == "long" and chain == "pixels" and (r.num_videos > 1 or not isinstance(r.prompt, str) and len(r.prompt) > 1):
        raise ValueError("--chain pixels (the official long video) makes one video: one --prompt and --num-videos 1, "
                         "or --chain latent")
    if task == "long" and chain == "pixels" and r.dp_size > 1:
        raise ValueError("--dp-size splits several videos over replicas, but --chain pixels makes one video: use "
                         "--chain latent, or --cp / --cfg-parallel to speed one video up")
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
        from ..runtime.quantized_checkpoints import weight_files
        from .components import SchedulerConfig, check_components

        weight_files(dit_folder, dit_layout)
        root = check_components(r.checkpoint, text_encoder=need_text, vae=need_vae,
                                caption_channels=dit_cfg.caption_channels, latent_channels=dit_cfg.in_channels)
        sched = SchedulerConfig.from_pretrained(root)
        scheduler = sched.sampling_kwargs() if sched is not None else None
    modules = (["transformers", "ftfy"] if need_text else []) + (["diffusers"] if need_vae else []) \
        + (["PIL"] if pixels_in else []) + (["imageio", "imageio_ffmpeg"] if r.video is not None else []) \
        + (["imageio_ffmpeg"] if to_video else [])
    from .media import PIPELINES_EXTRA, MissingExtraError, missing_modules

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


# -- memory and speed ---------------------------------------------------------------------------------

def _check_memory_flags(r: GenerateRequest) -> None:
    if r.quantize is not None and r.quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize must be one of {list(QUANTIZE_CHOICES)}, got {r.quantize!r}")
    if r.offload is not None and r.offload not in OFFLOAD_CHOICES:
        raise ValueError(f"--offload must be one of {list(OFFLOAD_CHOICES)}, got {r.offload!r}")
    if r.max_memory is not None:
        parse_bytes(r.max_memory)
        if r.offload not in (None, "none"):
            raise ValueError("--max-memory plans the streaming itself: drop --offload")
        if r.cp_size > 1 or r.ring_size > 1:
            raise ValueError("--max-memory plans one device running a whole forward; with --cp-size / --ring the "
                             "ranks split each forward, which the plan does not model: drop --max-memory")


def memory_plan(plan: GeneratePlan, dtype):
    """The run's own stages (text encoding, each denoising pass, VAE encode/decode) planned to fit
    ``--max-memory`` (pipelines/budget.py), or a ValueError with the stage table."""
    from .budget import Stage, format_plan, plan_memory
    from .components import TEXT_ENCODER_DIR, VAE_DIR, component_config
    from ..runtime.config import resolve_config
    from ..runtime.checkpoints import checkpoint_config

    r = plan.request
    cfg = resolve_config("tiny") if plan.random_weights else checkpoint_config(r.checkpoint, quantize=r.quantize)[2]
    prompts = plan.text[0].shape[0] if plan.text is not None else (1 if isinstance(r.prompt, str) else len(r.prompt))
    videos = -(-prompts * r.num_videos // r.dp_size)  # this rank's replica's share at most
    # CFG-parallel: one half of the guided batch per rank
    cfg_batch = videos * (2 if plan.guidance > 1 and not r.cfg_parallel else 1)
    stages = []
    if plan.text_source == "encoder":
        stages.append(Stage("text_encode", "text_encode", batch=prompts * (2 if plan.guidance > 1 else 1)))
    lat = tuple(plan.latent)
    if r.task == "refine" and plan.refine_size is not None:  # the doubled, padded stage-1 video
        pad = refine_frame_padding((lat[0] - 1) * VAE_TIME_STRIDE + 1)
        lat = (pad["noise_latents"] + pad["cond_latents"], plan.refine_size[0] // VAE_SPACE_STRIDE,
               plan.refine_size[1] // VAE_SPACE_STRIDE)
    if plan.need_vae and plan.pixels is not None:
        stages.append(Stage("vae_encode", "vae_encode", latent=lat))
    stages.append(Stage("denoise", "denoise", batch=videos if r.task == "refine" else cfg_batch, latent=lat,
                        bsa=r.task == "refine"))
    if plan.to_video:
        stages.append(Stage("vae_decode", "vae_decode", latent=lat))
    root = plan.root
    mplan = plan_memory(r.max_memory, dit_config=cfg, quantize=r.quantize, dtype=dtype, stages=stages,
                        text_encoder_config=component_config(root, TEXT_ENCODER_DIR)
                        if plan.text_source == "encoder" else None,
                        vae_config=component_config(root, VAE_DIR) if plan.need_vae and root else None,
                        step_cache=request_step_cache(r),
                        shard_ranks=parallel_world(r) if r.shard_weights else 1)
    if not mplan.fits:
        raise ValueError(f"the run does not fit --max-memory {r.max_memory}:\n" + format_plan(mplan))
    return mplan


def request_step_cache(r: GenerateRequest):
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
    from ..runtime.memory import run_memory_estimate

    est = run_memory_estimate(cfg, parameters, latent, pad["decoded_frames"], size, dtype_bytes=dtype_bytes, bsa=True,
                              **assumptions)
    return {"estimate": True, "stage1_frames": stage1_frames, "frames": pad["frames"], **est}

