"""The ``longcat-native`` command: ``info``, ``forward``, ``generate``, ``profile`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

# Video -> latent compression of the LongCat-Video VAE: 4x in time (first frame kept), 8x in space.
VAE_TIME_STRIDE = 4
VAE_SPACE_STRIDE = 8


def latent_shape(frames: int, height: int, width: int):
    if frames < 1 or (frames - 1) % VAE_TIME_STRIDE:
        raise ValueError(f"frames must be 1 + {VAE_TIME_STRIDE}k (e.g. 93), got {frames}")
    if height % (2 * VAE_SPACE_STRIDE) or width % (2 * VAE_SPACE_STRIDE):
        raise ValueError(f"height and width must be multiples of {2 * VAE_SPACE_STRIDE}, got {height}x{width}")
    return (frames - 1) // VAE_TIME_STRIDE + 1, height // VAE_SPACE_STRIDE, width // VAE_SPACE_STRIDE


def activation_bytes(cfg, latent, batch: int, dtype, kv_frames: int = 0, bsa: bool = False,
                     text_len: int = 512) -> dict:
    """Peak activation memory of one forward of the fused path (what runs on CUDA), TRACED op by
    op on fake tensors (``runtime.memory.trace_forward_memory``: the model's own code at the real
    shapes, nothing allocated): the largest set of live tensors the forward allocates, custom-op
    scratch included, weights and inputs not. ``kv_frames`` > 0: a batch-1 KV cache of that many
    frames (continuation) is an input, reported as ``kv_cache_bytes``. Not counted: the CUDA
    context, cuBLAS/cuDNN workspaces and allocator fragmentation.
    """
    import torch

    from .runtime.memory import trace_forward_memory

    r = trace_forward_memory(cfg, batch=batch, latent=tuple(latent), text_len=text_len, bsa=bsa, dtype=dtype,
                             kv_frames=kv_frames)
    T, H, W = latent
    es = torch.empty((), dtype=dtype).element_size()
    kv_cache = 2 * cfg.depth * kv_frames * (H // cfg.patch_size[1]) * (W // cfg.patch_size[2]) * cfg.hidden_size * es
    return {"tokens": r["tokens"], "peak_activation_bytes": r["activation_peak"], "kv_cache_bytes": kv_cache,
            "peak_forward_bytes": r["peak"], "peak_op": r["trace"].peak_op, "peak_site": r["trace"].peak_site}


# Sizes of the official components the refinement estimate assumes (not read from any file).
UMT5_XXL_ENCODER_PARAMS = 5.68e9  # umT5-XXL encoder: d_model 4096, 24 layers, d_ff 10240, 256k vocabulary
WAN_VAE_PARAMS = 127e6            # Wan2.1 VAE (encoder + decoder)
GPU_BUDGET_BYTES = 48 * 1024 ** 3  # the 48 GB cards users report running out of memory on


def refine_memory_estimate(cfg, parameters: int, dtype_bytes: int = 2, stage1_frames: int = 93,
                           size=(704, 1280), vae_tile: int = 256, vae_tile_stride: int = 192,
                           text_encoder_params: float = UMT5_XXL_ENCODER_PARAMS, vae_params: float = WAN_VAE_PARAMS,
                           vae_tile_workspace_bytes: int = 512 * 1024 ** 2, overhead_bytes: int = 1024 ** 3,
                           budget_bytes: int = GPU_BUDGET_BYTES) -> dict:
    """An ESTIMATE of the peak GPU memory of the official 480p -> 720p refinement of a
    ``stage1_frames``-frame video with ``longcat-native generate --task refine``: the video is
    doubled in time and upsampled to ``size``, padded to BSA-friendly latent counts (93 frames
    -> 186 -> 48 x 88 x 160 latents, 168,960 tokens), denoised in 5 steps without guidance, with
    the refinement LoRA and BSA on, then decoded.

    Assumptions:
    - The stages run one after the other and the peak is the largest: text encoding (the umT5
      encoder alone on the GPU: ``generate`` encodes before loading the DiT, then moves the
      encoder off), denoising, VAE decoding. The DiT's weights (``parameters`` x ``dtype_bytes``)
      stay resident from loading to the end; the LoRA is merged into them (its exact-restore copies
      live in host memory), so it adds nothing on the GPU.
    - Denoising activations are not assumed but traced: :func:`activation_bytes` at the refined
      latent (batch 1: no CFG, BSA on, its selection scratch included), the fused path's live set;
      latents: four float32 copies of the refined latent.
    - VAE decoding in tiles of ``vae_tile`` pixels every ``vae_tile_stride``: the tiles' outputs
      (the decoded video x (tile / stride)^2 for the overlaps) plus the blended video, in the
      DiT's dtype, plus ``vae_tile_workspace_bytes`` for one tile's decoder activations.
    - ``overhead_bytes`` for the CUDA context and the caching allocator's slack.
    """
    from .pipelines import refine_frame_padding

    pad = refine_frame_padding(stage1_frames)
    T = pad["noise_latents"] + pad["cond_latents"]
    H, W = size[0] // VAE_SPACE_STRIDE, size[1] // VAE_SPACE_STRIDE
    import torch

    dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]  # bf16 and fp16 hold the same
    act = activation_bytes(cfg, (T, H, W), 1, dtype, bsa=True)
    weights = int(parameters * dtype_bytes)
    latents = 4 * cfg.in_channels * T * H * W * 4
    denoise = weights + act["peak_activation_bytes"] + latents + overhead_bytes
    decoded = 3 * pad["decoded_frames"] * size[0] * size[1] * dtype_bytes
    overlap = (vae_tile / vae_tile_stride) ** 2 if max(size) > vae_tile else 1.0
    vae_decode = weights + int(vae_params * dtype_bytes) + int(decoded * (1 + overlap)) + vae_tile_workspace_bytes         + overhead_bytes
    text = int(text_encoder_params * dtype_bytes) + overhead_bytes
    stages = {"text_encode": text, "denoise": denoise, "vae_decode": vae_decode}
    peak = max(stages.values())
    return {
        "estimate": True, "stage1_frames": stage1_frames, "frames": pad["frames"], "size": list(size),
        "latent_thw": [T, H, W], "tokens": act["tokens"], "dit_weight_bytes": weights,
        "activation_bytes": act["peak_activation_bytes"], "activation_peak_op": act["peak_op"], "latent_bytes": latents,
        "vae_decode_bytes": vae_decode - weights - overhead_bytes, "overhead_bytes": overhead_bytes,
        "stages": stages, "peak_bytes": peak, "budget_bytes": budget_bytes, "fits": peak <= budget_bytes,
        "text_encode_with_dit_resident_bytes": text + weights,
    }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def cmd_info(args) -> int:
    import torch

    from .runtime.config import LongCatConfig, resolve_config
    from .runtime.dit import LongCatDiT, resolve_dtype
    from .runtime.weights import find_dit_dir, list_weight_files

    weight_bytes = None
    if args.path:
        dit_dir = find_dit_dir(args.path)
        cfg = LongCatConfig.from_json_file(str(dit_dir / "config.json"))
        weight_bytes = sum(f.stat().st_size for f in list_weight_files(dit_dir))
        source = str(dit_dir)
    else:
        cfg = resolve_config(args.config)
        source = f"preset {args.config!r}" if isinstance(args.config, str) else "config"
    dtype = resolve_dtype(args.dtype, torch.device("cuda"))  # default: the GPU's bf16
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    meta = LongCatDiT.from_config(cfg, device="meta", dtype=dtype, kernels="reference")
    params = meta.num_parameters()
    latent = latent_shape(args.frames, args.height, args.width)
    act = activation_bytes(cfg, latent, args.batch, dtype, args.kv_frames)
    refine = refine_memory_estimate(cfg, params, dtype_bytes)
    info = {
        "source": source,
        "config": cfg.to_dict(),
        "parameters": params,
        "weight_bytes_in_dtype": params * dtype_bytes,
        "weight_file_bytes": weight_bytes,
        "dtype": str(dtype).replace("torch.", ""),
        "video": {"frames": args.frames, "height": args.height, "width": args.width, "batch": args.batch},
        "latent_thw": list(latent),
        **act,
        "refine_720p_estimate": refine,
    }
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"LongCat-Video DiT  ({source})")
    for k, v in cfg.to_dict().items():
        print(f"  {k:26s} {v}")
    print(f"  {'head_dim':26s} {cfg.head_dim}")
    print(f"  {'ffn_hidden_size':26s} {cfg.ffn_hidden_size}")
    print(f"parameters        {params:,} ({params / 1e9:.2f} B)")
    print(f"weights in {info['dtype']:9s}{_fmt_bytes(params * dtype_bytes)}")
    if weight_bytes is not None:
        print(f"weight files      {_fmt_bytes(weight_bytes)}")
    print(f"video {args.frames} x {args.height} x {args.width}, batch {args.batch} -> latent {latent}, "
          f"{act['tokens']:,} tokens per item")
    print(f"peak activations  {_fmt_bytes(act['peak_activation_bytes'])} (fused path, traced on fake tensors, at "
          f"{act['peak_op']}; see --help)")
    if args.kv_frames:
        print(f"kv cache          {_fmt_bytes(act['kv_cache_bytes'])} for {args.kv_frames} frames")
    print(f"forward peak      {_fmt_bytes(act['peak_forward_bytes'])} (weights + inputs + activations, traced; "
          "plus the CUDA context and library workspaces)")
    r = refine
    print(f"refinement 480p -> 720p of {r['stage1_frames']} frames, ESTIMATED peak GPU memory (not measured; "
          f"denoising activations traced, the rest assumed: refine_memory_estimate's docstring):")
    print(f"  {r['frames']} frames at {r['size'][0]}x{r['size'][1]}, latent {tuple(r['latent_thw'])}, "
          f"{r['tokens']:,} tokens, BSA on, no CFG, text encoder off the GPU, tiled VAE decode")
    print(f"  denoise: DiT weights {_fmt_bytes(r['dit_weight_bytes'])} + activations {_fmt_bytes(r['activation_bytes'])}"
          f" + latents {_fmt_bytes(r['latent_bytes'])}"
          f" + overhead {_fmt_bytes(r['overhead_bytes'])}")
    print("  stages: " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in r["stages"].items()))
    print(f"  peak {_fmt_bytes(r['peak_bytes'])}: {'fits' if r['fits'] else 'does NOT fit'} in "
          f"{_fmt_bytes(r['budget_bytes'])}")
    return 0


def cmd_forward(args) -> int:
    import torch

    from .runtime.dit import LongCatDiT

    if args.path:
        dit = LongCatDiT.from_pretrained(args.path, dtype=args.dtype, device=args.device,
                                         kernels=args.kernels, attention=args.attention)
    else:
        dit = LongCatDiT.from_config(args.config, dtype=args.dtype, device=args.device, seed=args.seed,
                                     kernels=args.kernels, attention=args.attention)
    cfg, device = dit.config, dit.device
    T, H, W = args.latent
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(args.batch, cfg.in_channels, T, H, W, generator=g).to(device)
    t = torch.rand(args.batch, generator=g).mul(1000).to(device)
    text = torch.randn(args.batch, 1, args.text_len, cfg.caption_channels, generator=g).to(device)
    mask = torch.ones(args.batch, args.text_len, dtype=torch.long, device=device)
    with torch.inference_mode():
        out = dit(x, t, text, mask)  # warm-up (first call pays for lazy init / compilation)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = dit(x, t, text, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    stats = {
        "device": str(device), "dtype": str(dit.dtype).replace("torch.", ""),
        "kernels": dit.resolved_kernels(), "attention": dit.resolved_attention(),
        "input_shape": list(x.shape), "output_shape": list(out.shape), "output_dtype": str(out.dtype).replace("torch.", ""),
        "forward_ms": elapsed * 1e3,
        "output_mean": float(out.mean()), "output_std": float(out.std()),
        "output_min": float(out.min()), "output_max": float(out.max()),
        "output_finite": bool(torch.isfinite(out).all()),
    }
    if args.json:
        print(json.dumps(stats))
    else:
        print(f"LongCatDiT {cfg.hidden_size}x{cfg.depth} ({dit.num_parameters():,} params) on {device}, "
              f"{stats['dtype']}, kernels={stats['kernels']}, attention={stats['attention']}")
        print(f"input  {tuple(x.shape)}  timestep {tuple(t.shape)}  text {tuple(text.shape)}")
        print(f"output {tuple(out.shape)} {stats['output_dtype']}")
        print(f"time   {stats['forward_ms']:.2f} ms (second call)")
        print(f"stats  mean {stats['output_mean']:+.4f}  std {stats['output_std']:.4f}  "
              f"min {stats['output_min']:+.4f}  max {stats['output_max']:+.4f}  finite {stats['output_finite']}")
    return 0 if stats["output_finite"] else 1


# -- generate ------------------------------------------------------------------------------------

# The embedded default of `generate` (no --checkpoint): the tiny preset with random weights, on a
# latent small enough for any CPU: 4 latent frames (13 video frames) of 8 x 12 (64 x 96 pixels).
TINY_DEFAULT_LATENT = (4, 8, 12)
TINY_TEXT_TOKENS = 16
REAL_TEXT_TOKENS = 512
PIPELINES_EXTRA = "pip install 'longcat-native[pipelines]'"


def _random_text(prompt: str, tokens: int, channels: int):
    """Deterministic stand-in embeddings for a prompt string when no text encoder exists (only for
    the random-weights default): normal values seeded by the prompt's SHA-256; the mask marks one
    token per word plus one (an end token), like a padded tokenizer output."""
    import hashlib

    import torch

    seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")
    g = torch.Generator(device="cpu").manual_seed(seed)
    embeds = torch.randn(1, 1, tokens, channels, generator=g)
    valid = min(tokens, 1 + len(prompt.split()))
    mask = torch.zeros(1, tokens, dtype=torch.long)
    mask[:, :valid] = 1
    return embeds, mask


def _read_safetensors(path: str, flag: str) -> dict:
    import os

    from safetensors.torch import load_file

    if not path.endswith(".safetensors") or not os.path.isfile(path):
        raise ValueError(f"{flag} must name an existing .safetensors file, got {path}")
    try:
        return load_file(path)
    except Exception as e:  # a corrupt or foreign file: say which flag it came from
        raise ValueError(f"{flag} {path}: not a readable safetensors file ({e})") from None


def _load_latents_file(path: str, flag: str):
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


def _load_prompt_embeds(path: str):
    t = _read_safetensors(path, "--prompt-embeds")
    if "prompt_embeds" not in t:
        raise ValueError(f"--prompt-embeds {path} must hold 'prompt_embeds' (and optionally 'prompt_mask', "
                         "'negative_embeds', 'negative_mask')")
    return t["prompt_embeds"], t.get("prompt_mask"), t.get("negative_embeds"), t.get("negative_mask")


def parse_resolution(text: str):
    """``--resolution``: a bucket name (480p, 720p) or ``HxW`` in pixels -> (name, (H, W))."""
    from .pipelines import RESOLUTIONS

    key = text.strip().lower()
    if key in RESOLUTIONS:
        return key, RESOLUTIONS[key]
    parts = key.split("x")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return key, (int(parts[0]), int(parts[1]))
    raise argparse.ArgumentTypeError(f"{text!r}: use {', '.join(sorted(RESOLUTIONS))} or HxW in pixels (e.g. 480x832)")


def _vae_tile(n: int):
    """A square VAE tile of ``n`` pixels, overlapping its neighbours by a quarter (diffusers'
    default proportion: 256 every 192)."""
    stride = max(8, (3 * n // 4) // 8 * 8)
    return (n, n), (stride, stride)


class StageMemory:
    """Peak memory and time per pipeline stage. On CUDA: ``torch.cuda.max_memory_allocated``,
    reset at the start of each stage (tensors allocated by PyTorch on that GPU; the CUDA context
    and the caching allocator's slack come on top). Elsewhere: the process's peak resident set
    size (``resource.getrusage``) at the end of each stage: HOST memory, a high-water mark over
    the whole process so far that cannot be reset, so it never decreases from stage to stage."""

    def __init__(self, device):
        self.device, self.rows = device, []
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "host_peak_rss"
        self.label = (f"peak GPU memory allocated by PyTorch on {device}, per stage" if self.kind == "cuda_max_allocated"
                      else "HOST memory: peak resident set size of the process so far (not GPU memory; "
                           "a process-wide high-water mark, not resettable per stage)")

    def _peak(self) -> int:
        import torch

        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux

    def stage(self, name: str):
        import contextlib

        import torch

        @contextlib.contextmanager
        def run():
            if self.kind == "cuda_max_allocated":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            start = time.perf_counter()
            yield
            self.rows.append({"stage": name, "peak_bytes": self._peak(), "seconds": time.perf_counter() - start})

        return run()

    def summary(self) -> dict:
        return {"kind": self.kind, "label": self.label, "stages": self.rows,
                "peak_bytes": max((r["peak_bytes"] for r in self.rows), default=None)}


def _check_cp_launch(cp_size: int) -> None:
    """--cp-size N must run under torchrun with N processes (checked before any loading; every
    rank sees the same environment, so every rank fails the same way)."""
    import os

    if cp_size < 1:
        raise ValueError(f"--cp-size must be >= 1, got {cp_size}")
    world = os.environ.get("WORLD_SIZE")
    if cp_size > 1 and world is None:
        raise ValueError(f"--cp-size {cp_size} runs one process per rank: launch it as `torchrun --nproc-per-node "
                         f"{cp_size} -m longcat_native.cli generate ... --cp-size {cp_size}`")
    if cp_size > 1 and int(world) != cp_size:
        raise ValueError(f"--cp-size {cp_size} but torchrun started {world} processes (--nproc-per-node must equal "
                         "--cp-size)")


def _generate_device(args):
    """--device, else CUDA (this rank's GPU, LOCAL_RANK, under torchrun), else the CPU."""
    import os

    import torch

    if args.device:
        return torch.device(args.device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if args.cp_size > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda")


def _generate_plan(args) -> dict:
    """Every check that needs no model: flags, sizes, files, checkpoint parts, installed extras.
    Errors here come before any loading. Reads the (small) conditioning image/video files."""
    import os

    from . import pipelines as P
    from .pipelines.media import MissingExtraError, missing_modules

    random_weights = args.checkpoint is None
    task = args.task
    _check_cp_launch(args.cp_size)
    out = args.out or f"longcat_{task}_seed{args.seed}.safetensors"
    ext = os.path.splitext(out)[1].lower()
    if ext not in (".safetensors", ".mp4"):
        raise ValueError(f"--out must end in .safetensors (latents) or .mp4 (decoded video), got {out}")
    to_video = ext == ".mp4"
    if args.image is not None and task != "i2v":
        raise ValueError(f"--image is for task i2v; task {task!r} takes no image")
    if args.video is not None and task not in ("vc", "refine"):
        raise ValueError(f"--video is for tasks vc and refine; task {task!r} takes no video")
    if args.cond_latents is not None and task in ("t2v", "long"):
        raise ValueError(f"--cond-latents is for tasks i2v, vc and refine; task {task!r} takes none")
    if args.cond_latents is not None and (args.image is not None or args.video is not None):
        raise ValueError("--cond-latents replaces --image/--video; give one or the other")
    pixels_in = args.image is not None or args.video is not None
    if random_weights and (pixels_in or to_video):
        what = "--out .mp4 (decoding latents into frames)" if to_video else "--image/--video (encoding pixels)"
        raise ValueError(f"{what} needs the Wan VAE; the embedded tiny default (no --checkpoint) has none: give "
                         f"--checkpoint DIR with a vae/ folder, or write latents to a .safetensors file")
    if args.latent is not None and (args.resolution is not None or args.frames is not None):
        raise ValueError("--latent T H W replaces --resolution and --frames; give one or the other")
    stage1_fixed = task == "refine" and (args.video is not None or args.cond_latents is not None)
    if stage1_fixed and (args.frames is not None or args.latent is not None):
        raise ValueError("task refine: the stage-1 input (--video / --cond-latents) fixes the frame count and size; "
                         "--frames/--latent are not used (--resolution sets the refined size)")
    if args.latent is not None:
        latent = tuple(args.latent)
        if min(latent) <= 0 or latent[1] % 2 or latent[2] % 2:
            raise ValueError(f"--latent T H W needs positive sizes with even H and W, got {latent}")
    elif random_weights and args.resolution is None:
        T = TINY_DEFAULT_LATENT[0] if args.frames is None else P.frames_to_latents(args.frames)
        latent = (T,) + TINY_DEFAULT_LATENT[1:]
    else:
        height, width = args.resolution[1] if args.resolution is not None else P.RESOLUTIONS["480p"]
        latent = P.latent_size(93 if args.frames is None else args.frames, height, width)
    # The refined size (pixels): the --resolution bucket (default 720p, as officially) with a
    # checkpoint; the random-weights default refines its own stage 1 at 2x.
    refine_size = None
    if task == "refine" and not random_weights:
        refine_size = args.resolution[1] if args.resolution is not None else P.RESOLUTIONS["720p"]
        P.latent_size(1, *refine_size)
    frames = (latent[0] - 1) * P.VAE_TIME_STRIDE + 1
    cond_frames = args.cond_frames if args.cond_frames is not None else (13 if not random_weights else 5)
    m = 1 + (cond_frames - 1) // P.VAE_TIME_STRIDE
    if task in ("vc", "long") and latent[0] <= m:
        raise ValueError(f"task {task}: {latent[0]} latent frames leave nothing to generate after the {m} "
                         f"conditioning latents of --cond-frames {cond_frames}")
    if task == "vc" and args.video is not None:
        P.frames_to_latents(cond_frames)  # the VAE encodes 4k + 1 conditioning frames
    if task == "i2v" and latent[0] < 2:
        raise ValueError("task i2v needs at least 2 latent frames (5 video frames)")
    steps = args.steps if args.steps is not None else (16 if args.distill else 50)
    guidance = args.guidance if args.guidance is not None else (1.0 if args.distill else 4.0)
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if args.vae_tile < 16 or args.vae_tile % P.VAE_SPACE_STRIDE:
        raise ValueError(f"--vae-tile must be a multiple of {P.VAE_SPACE_STRIDE} pixels >= 16, got {args.vae_tile}")
    if args.fps is not None and args.fps <= 0:
        raise ValueError(f"--fps must be positive, got {args.fps}")
    if stage1_fixed:  # refinement runs without guidance (official)
        if args.guidance is not None and args.guidance > 1:
            raise ValueError(f"--guidance {args.guidance}: refinement runs without guidance (give no --guidance)")
        guidance = 1.0
    if guidance <= 1 and args.negative_prompt and args.prompt_embeds is None:
        raise ValueError(f"--negative-prompt has no effect with guidance {guidance} <= 1 (no negative branch runs)")
    text_source = "file" if args.prompt_embeds is not None else ("random" if random_weights else "encoder")
    need_text, need_vae = text_source == "encoder", pixels_in or to_video
    if task in ("i2v", "vc") and args.cond_latents is None and not pixels_in and not random_weights:
        flag = "--image FILE" if task == "i2v" else "--video FILE"
        raise ValueError(f"task {task} needs its conditioning: {flag}, or its latents with --cond-latents FILE.safetensors")
    if task == "refine" and not stage1_fixed and not random_weights:
        raise ValueError("task refine needs the stage-1 video --video FILE, or its latents --cond-latents FILE.safetensors")

    root = dit_cfg = None
    if not random_weights:
        from .pipelines.components import check_components
        from .runtime.config import LongCatConfig
        from .runtime.weights import find_dit_dir, list_weight_files

        dit_dir = find_dit_dir(args.checkpoint)
        list_weight_files(dit_dir)
        dit_cfg = LongCatConfig.from_json_file(str(dit_dir / "config.json"))
        root = check_components(args.checkpoint, text_encoder=need_text, vae=need_vae,
                                caption_channels=dit_cfg.caption_channels, latent_channels=dit_cfg.in_channels)
    modules = (["transformers", "ftfy"] if need_text else []) + (["diffusers"] if need_vae else []) \
        + (["PIL"] if pixels_in else []) + (["imageio", "imageio_ffmpeg"] if args.video is not None else []) \
        + (["imageio_ffmpeg"] if to_video else [])
    missing = missing_modules(dict.fromkeys(modules))
    if missing:
        raise MissingExtraError(f"missing Python packages {', '.join(missing)} (text encoder, VAE, image/video "
                                f"files): {P.PIPELINES_EXTRA}")

    text = _load_prompt_embeds(args.prompt_embeds) if args.prompt_embeds is not None else None
    if text is not None and guidance > 1 and text[2] is None:
        raise ValueError(f"--guidance {guidance} > 1 needs 'negative_embeds' in --prompt-embeds {args.prompt_embeds} "
                         "(or --guidance 1 for no guidance)")
    cond = _load_latents_file(args.cond_latents, "--cond-latents") if args.cond_latents is not None else None
    pixels = None
    if pixels_in:
        from .pipelines.media import load_image, load_video

        size = (latent[1] * P.VAE_SPACE_STRIDE, latent[2] * P.VAE_SPACE_STRIDE)
        if args.image is not None:
            pixels = load_image(args.image, size, args.resize)
        elif task == "vc":
            pixels = load_video(args.video, size, args.resize, last_frames=cond_frames)
        else:  # refine: the stage-1 video at its own size
            pixels = load_video(args.video)
            P.refine_frame_padding(pixels.shape[2], 0, args.spatial_refine_only)
    return dict(random_weights=random_weights, out=out, to_video=to_video, latent=latent, frames=frames, steps=steps,
                guidance=guidance, cond_frames=cond_frames, text_source=text_source, text=text, cond=cond,
                pixels=pixels, root=root, need_vae=need_vae, refine_size=refine_size)


def cmd_generate(args) -> int:
    """Generate with a LongCat-Video pipeline; write latents (.safetensors) or decoded video (.mp4)."""
    import torch
    from safetensors.torch import save_file

    from . import pipelines as P
    from .runtime.dit import LongCatDiT, resolve_dtype

    plan = _generate_plan(args)
    random_weights, latent = plan["random_weights"], plan["latent"]
    task, steps, guidance = args.task, plan["steps"], plan["guidance"]
    notes = []
    device = _generate_device(args)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = resolve_dtype(args.dtype, device)
    # Under context parallelism every rank runs the whole command (the DiT splits each forward;
    # denoise uses rank 0's inputs); only rank 0 decodes, writes and prints.
    lead = int(os.environ.get("RANK", "0")) == 0 if args.cp_size > 1 else True
    mem = StageMemory(device)

    text_note = None
    if plan["text_source"] == "encoder":
        # Before the DiT is loaded: the encoder never shares the GPU with the DiT's weights.
        from .pipelines.components import TextEncoder

        with mem.stage("text_encode"):
            te = TextEncoder.from_pretrained(plan["root"], dtype=dtype, device=device)
            pe, pm, ne, nm = P.encode_prompts(te, args.prompt, args.negative_prompt if guidance > 1 else None,
                                              guidance, dtype=dtype, device=device, offload=True)
            del te
        text_note = (f"umT5 text encoder ({plan['root']}/text_encoder), {pe.shape[2]} tokens; "
                     "moved off the device after encoding")

    t_load = time.perf_counter()
    with mem.stage("load"):
        if random_weights:
            dit = LongCatDiT.from_config("tiny", dtype=args.dtype, device=device, seed=0,
                                         kernels=args.kernels, attention=args.attention, cp_size=args.cp_size)
            source = "embedded tiny preset, RANDOM WEIGHTS"
            notes.insert(0, "RANDOM WEIGHTS: the tiny preset with seed-0 random parameters, not a trained model; "
                            "the latents are a smoke test, not a video")
        else:
            dit = LongCatDiT.from_pretrained(args.checkpoint, dtype=args.dtype, device=device,
                                             kernels=args.kernels, attention=args.attention, cp_size=args.cp_size)
            source = str(dit.checkpoint_path or args.checkpoint)
        vae = None
        if plan["need_vae"]:
            from .pipelines.components import VideoVAE

            tile, stride = _vae_tile(args.vae_tile)
            vae = VideoVAE.from_pretrained(plan["root"], dtype=dit.dtype, device=device,
                                           tiling=not args.no_vae_tiling, tile=tile, tile_stride=stride)
    load_s = time.perf_counter() - t_load
    cfg = dit.config
    pipe = P.LongCatVideoPipeline(dit, None, vae)

    if plan["text_source"] == "file":
        pe, pm, ne, nm = plan["text"]
        text_note = f"prompt embeddings from {args.prompt_embeds}"
    elif plan["text_source"] == "random":
        pe, pm = _random_text(args.prompt, TINY_TEXT_TOKENS, cfg.caption_channels)
        ne, nm = _random_text(args.negative_prompt, TINY_TEXT_TOKENS, cfg.caption_channels)
        text_note = "RANDOM text embeddings derived from the prompt strings (no text encoder)"
    if guidance <= 1:
        ne = nm = None

    g = torch.Generator(device="cpu").manual_seed(args.seed)
    cond, pixels, pad = plan["cond"], plan["pixels"], None
    if cond is None and random_weights and task in ("i2v", "vc"):
        frames = 1 if task == "i2v" else 1 + (plan["cond_frames"] - 1) // P.VAE_TIME_STRIDE
        cond = torch.randn(1, cfg.in_channels, frames, latent[1], latent[2],
                           generator=torch.Generator(device="cpu").manual_seed(args.seed + 1))
        notes.append(f"conditioning latents: RANDOM ({frames} frame(s), no VAE)")
    refine_cond = None
    if pixels is not None:
        with mem.stage("vae_encode"):
            if task == "i2v":
                cond = pipe.encode_image(pixels, tuple(pixels.shape[2:]))
                notes.append(f"image {args.image} -> {pixels.shape[2]}x{pixels.shape[3]}, encoded by the VAE")
            elif task == "vc":
                cond = pipe.encode_video(pixels, tuple(pixels.shape[3:]))
                notes.append(f"last {pixels.shape[2]} frames of {args.video}, encoded by the VAE")
            else:  # refine from a stage-1 video, the official pixel path
                cond, refine_cond, pad = pipe.encode_refine_input(pixels, plan["refine_size"],
                                                                  spatial_refine_only=args.spatial_refine_only)
                notes.append(f"stage-1 video {args.video} ({pixels.shape[2]} frames) upsampled to "
                             f"{pad['frames']} frames at {plan['refine_size'][0]}x{plan['refine_size'][1]}, "
                             "encoded by the VAE")
            del pixels

    step_times: List[float] = []
    clock = {"last": time.perf_counter()}

    def on_step(i, t, latents):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        step_times.append(now - clock["last"])
        clock["last"] = now

    lora_kwargs = {k: v for k, v in (("lora_network_dim", args.lora_network_dim),
                                     ("lora_network_alpha", args.lora_network_alpha)) if v is not None}
    common = dict(num_steps=steps, generator=g, progress=lead, callback=on_step, lora_kwargs=lora_kwargs)
    guided = dict(common, guidance_scale=guidance, distill=args.distill)
    lora_key = None
    if args.distill and not random_weights:
        if hasattr(dit, "enable_loras") and P.tasks.find_lora_file(dit, "cfg_step_lora"):
            lora_key = "cfg_step_lora"
            notes.append("distilled schedule with the cfg_step LoRA")
        else:
            notes.append("distilled schedule WITHOUT the cfg_step LoRA (not found or not supported)")
    t0 = time.perf_counter()
    clock["last"] = t0
    with torch.inference_mode():
        if task == "refine" and cond is None:
            with mem.stage("denoise_stage1"):
                notes.append(f"stage 1: t2v ({steps} steps) on the random-weights model")
                cond = P.generate_t2v(dit, pe, pm, ne, nm, latent=latent, **guided)
        with mem.stage("denoise" if task != "refine" else "denoise_refine"):
            if task == "t2v":
                out = P.generate_t2v(dit, pe, pm, ne, nm, latent=latent, lora=lora_key, **guided)
            elif task == "i2v":
                out = P.generate_i2v(dit, cond, pe, pm, ne, nm, num_frames=plan["frames"], lora=lora_key, **guided)
            elif task == "vc":
                out = P.generate_vc(dit, cond, pe, pm, ne, nm, num_frames=plan["frames"], lora=lora_key,
                                    num_cond_frames=plan["cond_frames"], use_kv_cache=not args.no_kv_cache, **guided)
            elif task == "long":
                out = P.generate_long(dit, pe, pm, ne, nm, latent=latent, num_segments=args.segments, lora=lora_key,
                                      num_cond_frames=plan["cond_frames"], use_kv_cache=not args.no_kv_cache, **guided)
            else:  # refine
                kw = {}
                if not random_weights:
                    if hasattr(dit, "enable_loras") and P.tasks.find_lora_file(dit, "refinement_lora"):
                        kw["lora"] = "refinement_lora"
                    if hasattr(dit, "enable_bsa"):
                        kw["enable_bsa"] = True
                    notes.append(f"refinement LoRA {'on' if 'lora' in kw else 'OFF (not found or not supported)'}, "
                                 f"BSA {'on' if kw.get('enable_bsa') else 'OFF (not supported)'}")
                if pad is not None:  # already upsampled and padded by encode_refine_input
                    kw.update(cond_latents=refine_cond, size=tuple(cond.shape[3:]), temporal_upsample=False,
                              pad_frames=False)
                else:
                    kw.update(temporal_upsample=not args.spatial_refine_only)
                    if plan["refine_size"] is not None:
                        kw["size"] = tuple(v // P.VAE_SPACE_STRIDE for v in plan["refine_size"])
                out = P.generate_refine(dit, cond, pe, pm, t_thresh=args.t_thresh,
                                        **dict(common, num_steps=50), **kw)
    total = time.perf_counter() - t0
    if dit.cp is not None:
        notes.append(f"context parallelism: {dit.cp.size} ranks, token grid split {dit.cp.split_h} x "
                     f"{dit.cp.split_w}; rank 0 writes the output")
        if not lead:
            _finish_cp(dit)
            return 0 if bool(torch.isfinite(out).all()) else 1

    video_shape = None
    if plan["to_video"]:
        fps = args.fps if args.fps is not None else (30.0 if task == "refine" else 15.0)
        crop = (pad["cond_added"], pad["cond_added"] + pad["frames"]) if pad is not None else None
        with mem.stage("vae_decode"):
            frames_u8 = pipe.decode(out, "video", frames=crop)[0]
        from .pipelines.media import write_video

        write_video(plan["out"], frames_u8, fps=fps, crf=10 if task == "refine" else 18)
        video_shape = list(frames_u8.shape)
        tiled = not args.no_vae_tiling and max(video_shape[1:3]) > args.vae_tile
        notes.append(f"decoded by the VAE ({f'in {args.vae_tile}-pixel tiles' if tiled else 'whole frames'}), "
                     f"{video_shape[0]} frames {video_shape[1]}x{video_shape[2]} written at {fps:g} fps")
    else:
        meta = {"task": task, "seed": str(args.seed), "steps": str(steps), "guidance": str(guidance),
                "distill": str(bool(args.distill)), "random_weights": str(random_weights), "source": source,
                "text": text_note, "shape": json.dumps(list(out.shape))}
        save_file({"latents": out.detach().float().cpu().contiguous()}, plan["out"], metadata=meta)
    n = len(step_times)
    memory = mem.summary()
    summary = {
        "task": task, "source": source, "random_weights": random_weights, "text": text_note, "notes": notes,
        "device": str(device), "dtype": str(dit.dtype).replace("torch.", ""),
        "kernels": dit.resolved_kernels(), "attention": dit.resolved_attention(),
        "latent_shape": list(out.shape), "video_shape": video_shape, "steps": n, "guidance": guidance,
        "distill": bool(args.distill), "seed": args.seed, "load_s": load_s, "total_s": total,
        "step_times_s": step_times, "mean_step_s": (sum(step_times) / n) if n else None,
        "peak_memory_bytes": memory["peak_bytes"], "peak_memory_kind": memory["kind"], "memory": memory,
        "output": plan["out"], "output_finite": bool(torch.isfinite(out).all()),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"LongCatDiT {cfg.hidden_size}x{cfg.depth} from {source} on {device}, {summary['dtype']}, "
              f"kernels={summary['kernels']}, attention={summary['attention']}")
        print(f"text     {text_note}")
        for note in notes:
            print(f"note     {note}")
        print(f"task     {task}: latents {tuple(out.shape)}, {n} denoising steps, guidance {guidance}"
              f"{', distilled schedule' if args.distill else ''}, seed {args.seed}")
        if n:
            print(f"time     {summary['mean_step_s']:.3f} s/step (mean of {n}), {total:.2f} s in all, "
                  f"model load {load_s:.2f} s")
        print(f"memory   {memory['label']}:")
        for row in memory["stages"]:
            print(f"           {row['stage']:16s} {_fmt_bytes(row['peak_bytes']):>12s}  ({row['seconds']:.2f} s)")
        print(f"output   {plan['out']}" + (f" ({video_shape[0]} frames, {video_shape[1]}x{video_shape[2]})"
                                            if video_shape else ""))
    _finish_cp(dit)
    return 0 if summary["output_finite"] else 1


def _finish_cp(dit) -> None:
    """Under context parallelism: wait for every rank (rank 0 decodes and writes after the others
    are done denoising), then tear the process group down."""
    if getattr(dit, "cp", None) is None:
        return
    import torch.distributed as dist

    dist.barrier(group=dit.cp.group)
    dist.destroy_process_group()


# -- profile / bench -----------------------------------------------------------------------------


def cmd_profile(args) -> int:
    """A few forwards under torch.profiler with NVTX/record_function ranges: writes a Chrome trace,
    prints the top ops by self time grouped by range, and the nsys command line."""
    import torch

    from .runtime.dit import LongCatDiT
    from .runtime.profiling import format_profile_table, nsys_command, profile_forward

    if args.path:
        dit = LongCatDiT.from_pretrained(args.path, dtype=args.dtype, device=args.device,
                                         kernels=args.kernels, attention=args.attention)
    else:
        dit = LongCatDiT.from_config(args.config, dtype=args.dtype, device=args.device, seed=args.seed,
                                     kernels=args.kernels, attention=args.attention)
    if args.bsa:
        dit.enable_bsa()
    cfg, device = dit.config, dit.device
    T, H, W = args.latent
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(args.batch, cfg.in_channels, T, H, W, generator=g).to(device)
    t = torch.rand(args.batch, generator=g).mul(1000).to(device)
    text = torch.randn(args.batch, 1, args.text_len, cfg.caption_channels, generator=g).to(device)
    fn = dit
    if args.compile:
        from .runtime.compiled import compile_model

        fn = compile_model(dit)

    def step():
        with torch.inference_mode():
            return fn(x, t, text)

    result = profile_forward(step, steps=args.steps, trace_path=args.trace, warmup=1, top=args.top, device=device)
    print(f"LongCatDiT {cfg.hidden_size}x{cfg.depth} on {device}, kernels={dit.resolved_kernels()}, "
          f"attention={dit.resolved_attention()}, latent {T}x{H}x{W}, batch {args.batch}, text {args.text_len}"
          + (", compiled" if args.compile else ""))
    print(format_profile_table(result))
    print(f"\ntrace: {args.trace}  (open in https://ui.perfetto.dev or chrome://tracing)")
    argv = ["longcat-native", "forward"] + (["--path", args.path] if args.path else ["--config", args.config]) + [
        "--latent", str(T), str(H), str(W), "--batch", str(args.batch), "--text-len", str(args.text_len),
        "--kernels", args.kernels, "--attention", args.attention]
    print("nsys:  " + nsys_command(argv))
    if args.json:
        print(json.dumps({"trace": args.trace, "total_self_us": result["total_self_us"], "steps": result["steps"],
                          "top": result["rows"][:10]}))
    return 0


def cmd_bench(args) -> int:
    """The full-model benchmark (bench/model.py): eager reference, compiled reference, fused, and
    fused + compile + CUDA graphs. Without CUDA the fused columns need TRITON_INTERPRET=1 in the
    environment (triton is imported with the package, too late to set it here); without it they
    print n/a with the reason."""
    import os

    from .runtime import benchmark

    return benchmark.run_from_args(args, default_out_dir=os.path.join(os.getcwd(), "bench", "results"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longcat-native", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="config, parameter count, weight bytes and activation memory estimate",
                          description=cmd_info.__doc__ or activation_bytes.__doc__)
    src = info.add_mutually_exclusive_group(required=True)
    src.add_argument("path", nargs="?", help="checkpoint root or dit/ folder")
    src.add_argument("--config", help="a preset (tiny, longcat-video) or a config.json instead of a checkpoint")
    info.add_argument("--frames", type=int, default=93, help="video frames (default 93)")
    info.add_argument("--height", type=int, default=480, help="video height in pixels (default 480)")
    info.add_argument("--width", type=int, default=832, help="video width in pixels (default 832)")
    info.add_argument("--batch", type=int, default=1)
    info.add_argument("--kv-frames", type=int, default=0, help="latent frames held in a KV cache (continuation)")
    info.add_argument("--dtype", default=None, help="weights/activations dtype (default bfloat16)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    fwd = sub.add_parser("forward", help="one forward pass on random inputs; prints shapes, time, output stats")
    fsrc = fwd.add_mutually_exclusive_group()
    fsrc.add_argument("--path", help="checkpoint root or dit/ folder (default: random weights of --config)")
    fsrc.add_argument("--config", default="tiny", help="preset or config.json for random weights (default tiny)")
    fwd.add_argument("--latent", type=int, nargs=3, default=(3, 8, 12), metavar=("T", "H", "W"),
                     help="latent frames, height, width (default 3 8 12)")
    fwd.add_argument("--batch", type=int, default=1)
    fwd.add_argument("--text-len", type=int, default=8)
    fwd.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    fwd.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    fwd.add_argument("--kernels", default="auto", choices=["auto", "reference", "triton"])
    fwd.add_argument("--attention", default="auto")
    fwd.add_argument("--seed", type=int, default=0)
    fwd.add_argument("--json", action="store_true", help="print one JSON object")
    fwd.set_defaults(func=cmd_forward)

    gen = sub.add_parser(
        "generate", help="run a pipeline (t2v, i2v, vc, refine, long); write latents or an .mp4",
        description="Run a LongCat-Video pipeline. With --checkpoint DIR (an official root) prompt strings are "
                    "encoded by its umT5 text encoder (tokenizer/, text_encoder/), --image/--video are encoded "
                    "and --out x.mp4 decoded by its Wan VAE (vae/); these need the pipelines extra: "
                    "pip install 'longcat-native[pipelines]'. --out x.safetensors writes latents. Without "
                    "--checkpoint it runs the embedded tiny preset with RANDOM WEIGHTS (a smoke test, not a "
                    "model) on a small latent, with random stand-in text embeddings, and writes latents. "
                    "Peak memory is reported per stage (GPU memory on CUDA, host RSS elsewhere).")
    gen.add_argument("--checkpoint", help="checkpoint root or dit/ folder (default: tiny random weights)")
    gen.add_argument("--task", default="t2v", choices=["t2v", "i2v", "vc", "refine", "long"])
    gen.add_argument("--prompt", default="a cat walking on grass",
                     help="prompt string, encoded by the checkpoint's text encoder")
    gen.add_argument("--negative-prompt", default="",
                     help="negative prompt string, used when guidance > 1 (default empty, as the official pipeline)")
    gen.add_argument("--prompt-embeds", help="a .safetensors file with prompt_embeds [B, 1, L, C], prompt_mask, "
                                             "negative_embeds, negative_mask (instead of prompt strings)")
    gen.add_argument("--image", help="conditioning image file for i2v (encoded by the checkpoint's VAE)")
    gen.add_argument("--video", help="video file: conditioning for vc (its last --cond-frames frames), the stage-1 "
                                     "video for refine (encoded by the checkpoint's VAE)")
    gen.add_argument("--cond-latents", help="a .safetensors file with conditioning latents 'latents' "
                                            "[B, 16, T, H, W]: the image latent (i2v), the video latents (vc) "
                                            "or the stage-1 latents (refine)")
    gen.add_argument("--resolution", type=parse_resolution, default=None,
                     help="480p = 480x832, 720p = 704x1280, or HxW pixels (multiples of 16); default 480p with a "
                          "checkpoint; for refine the refined size (default 720p)")
    gen.add_argument("--resize", choices=["crop", "stretch"], default="crop",
                     help="how --image/--video frames are fitted to the size: cover and crop the centre (default) "
                          "or stretch")
    gen.add_argument("--spatial-refine-only", action="store_true",
                     help="refine: keep the frame count (default doubles it, as officially)")
    gen.add_argument("--latent", type=int, nargs=3, metavar=("T", "H", "W"),
                     help="latent frames, height, width (for small runs; replaces --resolution/--frames)")
    gen.add_argument("--frames", type=int, help="video frames, 4k + 1 (default 93; 13 for the tiny default)")
    gen.add_argument("--cond-frames", type=int, help="conditioning video frames of vc/long (default 13; 5 tiny)")
    gen.add_argument("--segments", type=int, default=1, help="continuation segments of task long (default 1)")
    gen.add_argument("--steps", type=int, help="denoising steps (default 50; 16 with --distill)")
    gen.add_argument("--guidance", type=float, help="CFG scale (default 4.0; 1.0 with --distill); <= 1: no CFG")
    gen.add_argument("--distill", action="store_true", help="the distilled 16-step schedule (cfg_step LoRA)")
    gen.add_argument("--t-thresh", type=float, default=0.5, help="refinement noise level (default 0.5)")
    gen.add_argument("--lora-network-dim", type=int, help="rank passed to load_lora (default: the loader's, 128)")
    gen.add_argument("--lora-network-alpha", type=float, help="alpha passed to load_lora (default: the loader's)")
    gen.add_argument("--no-kv-cache", action="store_true", help="vc/long: run conditioning frames every step")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", help="output: .mp4 (decoded video; needs the VAE) or .safetensors (latents); "
                                   "default longcat_<task>_seed<seed>.safetensors")
    gen.add_argument("--fps", type=float, help="frame rate of the .mp4 (default 15; 30 for refine, as the official "
                                               "demos)")
    gen.add_argument("--vae-tile", type=int, default=256,
                     help="VAE tile size in pixels (square, overlapping by a quarter; default 256)")
    gen.add_argument("--no-vae-tiling", action="store_true", help="decode whole frames (more memory)")
    gen.add_argument("--device", default=None, help="default: cuda if available (this rank's GPU under torchrun), "
                                                    "else cpu")
    gen.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    gen.add_argument("--kernels", default="auto", choices=["auto", "reference", "triton"])
    gen.add_argument("--attention", default="auto")
    gen.add_argument("--cp-size", type=int, default=1,
                     help="context parallelism over N processes: run as `torchrun --nproc-per-node N -m "
                          "longcat_native.cli generate ... --cp-size N`; rank 0 writes the output and prints")
    gen.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    gen.set_defaults(func=cmd_generate)

    prof = sub.add_parser("profile", help="a few forwards under torch.profiler: trace, top ops by range, nsys command",
                          description=cmd_profile.__doc__)
    psrc = prof.add_mutually_exclusive_group()
    psrc.add_argument("--path", help="checkpoint root or dit/ folder (default: random weights of --config)")
    psrc.add_argument("--config", default="tiny", help="preset or config.json for random weights (default tiny)")
    prof.add_argument("--latent", type=int, nargs=3, default=(3, 8, 12), metavar=("T", "H", "W"),
                      help="latent frames, height, width (default 3 8 12)")
    prof.add_argument("--batch", type=int, default=1)
    prof.add_argument("--text-len", type=int, default=8)
    prof.add_argument("--steps", type=int, default=3, help="profiled forwards (after one warm-up)")
    prof.add_argument("--top", type=int, default=20, help="rows of the table")
    prof.add_argument("--trace", default="longcat_trace.json", help="Chrome/Perfetto trace output")
    prof.add_argument("--bsa", action="store_true", help="enable block-sparse attention")
    prof.add_argument("--compile", action="store_true", help="profile the compiled model (compile_model)")
    prof.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    prof.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    prof.add_argument("--kernels", default="auto", choices=["auto", "reference", "triton"])
    prof.add_argument("--attention", default="auto")
    prof.add_argument("--seed", type=int, default=0)
    prof.add_argument("--json", action="store_true", help="also print a JSON summary line")
    prof.set_defaults(func=cmd_profile)

    from .runtime.benchmark import add_arguments as _bench_arguments

    bench = sub.add_parser("bench", help="full-model benchmark: eager/compiled reference, fused, fused+compile+graphs",
                           description=cmd_bench.__doc__)
    _bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from .pipelines.media import MissingExtraError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError, MissingExtraError) as e:
        print(f"longcat-native {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
