"""The ``longcat-native`` command: ``info``, ``forward``, ``generate``, ``profile``, ``bench`` and ``convert``."""

# Parsing and printing only. The work is imported inside each command: --help imports no torch.

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

from .pipelines.plan import GenerateRequest


def _fmt_count(n: int) -> str:
    """768000 -> "768,000 (768 K)", 13.6e9 -> "13,600,000,000 (13.60 B)"."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n:,} ({n / div:.2f} {unit})" if unit == "B" else f"{n:,} ({n / div:.3g} {unit})"
    return f"{n:,}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def cmd_info(args) -> int:
    """Config, parameter count, weight bytes, and the peak activation memory of one forward of the
    fused path (what runs on CUDA) at the given video size, traced op by op on fake tensors
    (runtime.memory.activation_bytes: the model's own code at the real shapes, nothing allocated):
    the largest set of live tensors the forward allocates, custom-op scratch included, weights and
    inputs not; --kv-frames adds a batch-1 KV cache of that many frames as an input. Not counted:
    the CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation. Also the ESTIMATED peak
    GPU memory of the official 480p -> 720p refinement (pipelines.plan.refine_memory_estimate): by
    default only for a model of the official size (it assumes the official umT5-XXL text encoder
    and Wan VAE beside the DiT); --refine-estimate prints it for any config. --quantize adds the
    quantized weight bytes; --max-memory traces every stage of the official 3-stage run
    (pipelines.budget.plan_memory) and prints each stage's device peak and the settings that fit
    (--cache: with a step cache in every denoising stage)."""
    import torch

    from .pipelines.plan import refine_memory_estimate
    from .pipelines.shapes import latent_size
    from .runtime.config import resolve_config
    from .runtime.dit import LongCatDiT, resolve_dtype
    from .runtime.memory import activation_bytes
    from .runtime.checkpoints import checkpoint_config
    from .runtime.quantized_checkpoints import weight_files

    if args.cache is not None and args.max_memory is None:
        raise ValueError("info --cache traces a step cache in the --max-memory plan: it needs --max-memory")
    weight_bytes = None
    if args.path:
        dit_dir, layout, cfg = checkpoint_config(args.path)  # any layout (runtime/checkpoints.py)
        weight_bytes = sum(f.stat().st_size for f in weight_files(dit_dir, layout))
        source = str(dit_dir)
    else:
        cfg = resolve_config(args.config)
        source = f"preset {args.config!r}" if isinstance(args.config, str) else "config"
    dtype = resolve_dtype(args.dtype, torch.device("cuda"))  # default: the GPU's bf16
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    meta = LongCatDiT.from_config(cfg, device="meta", dtype=dtype, kernels="reference")
    params = meta.num_parameters()
    latent = latent_size(args.frames, args.height, args.width)
    act = activation_bytes(cfg, latent, args.batch, dtype, args.kv_frames, quantize=args.quantize)
    # The estimate assumes the official components (umT5-XXL, Wan VAE) beside the DiT: meaningful
    # for a model of the official size, not for a tiny test config.
    official_size = cfg.hidden_size >= 4096 and cfg.depth >= 48
    refine = refine_memory_estimate(cfg, params, dtype_bytes) if official_size or args.refine_estimate else None
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
    }
    if refine is not None:
        info["refine_720p_estimate"] = refine
    layout = info["parallel"] = _layout(args, cfg, act)
    plan = None
    if args.max_memory is not None:
        from .pipelines.budget import format_plan, plan_memory
        from .pipelines.components import TEXT_ENCODER_DIR, VAE_DIR, component_config

        root_cfg = {}
        if args.path:
            from .pipelines.components import checkpoint_root

            root = checkpoint_root(args.path)
            root_cfg = {k: component_config(root, d) for k, d in (("text_encoder_config", TEXT_ENCODER_DIR),
                                                                   ("vae_config", VAE_DIR)) if (root / d).is_dir()}
        step_cache = None
        if args.cache is not None:
            from .runtime.step_cache import StepCache, parse_cache_spec

            step_cache = StepCache(**parse_cache_spec(args.cache))
        # --shard-weights: one rank's shards plus the gathered blocks (FSDP2 over every rank)
        plan = plan_memory(args.max_memory, dit_config=cfg, quantize=args.quantize, dtype=dtype,
                           step_cache=step_cache, shard_ranks=layout["world"] if args.shard_weights else 1, **root_cfg)
        info["memory_plan"] = plan.to_dict()
    if args.quantize is not None:
        qmeta = LongCatDiT.from_config(cfg, device="meta", dtype=dtype, kernels="reference", quantize=args.quantize)
        info["quantized_weight_bytes"] = qmeta.weight_bytes()
    # A budget nothing fits is a failure (exit 1) after the whole report, its stage table included.
    status = 0 if plan is None or plan.fits else 1
    if args.json:
        print(json.dumps(info))
        return status
    print(f"LongCat-Video DiT  ({source})")
    for k, v in cfg.to_dict().items():
        print(f"  {k:26s} {v}")
    print(f"  {'head_dim':26s} {cfg.head_dim}")
    print(f"  {'ffn_hidden_size':26s} {cfg.ffn_hidden_size}")
    print(f"parameters        {_fmt_count(params)}")
    print(f"weights in {info['dtype']:9s}{_fmt_bytes(params * dtype_bytes)}")
    if args.quantize is not None:
        print(f"weights {args.quantize:10s}{_fmt_bytes(info['quantized_weight_bytes'])} (block GEMMs quantized, "
              "the rest in the model dtype)")
    if plan is not None:
        print("official 3-stage run (480p base with CFG, stage-1 decode, 720p refinement), traced per stage:")
        print(format_plan(plan))
    if weight_bytes is not None:
        print(f"weight files      {_fmt_bytes(weight_bytes)}")
    print(f"video {args.frames} x {args.height} x {args.width}, batch {args.batch} -> latent {latent}, "
          f"{act['tokens']:,} tokens per item")
    print(f"peak activations  {_fmt_bytes(act['peak_activation_bytes'])} (fused path, traced on fake tensors, at "
          f"{act['peak_op']}; see --help)")
    if layout["world"] > 1:
        print(f"parallel          {layout['layout']}: per rank {layout['tokens_per_rank']:,} tokens x "
              f"{layout['heads_per_rank']} heads, up to {layout['videos_per_replica']} of the "
              f"--batch videos per replica, a guided step's batch {layout['guided_batch_per_rank']} per rank")
    if args.kv_frames:
        print(f"kv cache          {_fmt_bytes(act['kv_cache_bytes'])} for {args.kv_frames} frames")
    print(f"forward peak      {_fmt_bytes(act['peak_forward_bytes'])} (weights + inputs + activations, traced; "
          "plus the CUDA context and library workspaces)")
    if refine is None:
        print("refinement 480p -> 720p: estimated for models of the official size only (--refine-estimate "
              "prints it for this config)")
        return status
    r = refine
    print(f"refinement 480p -> 720p of {r['stage1_frames']} frames, ESTIMATED peak GPU memory (not measured; "
          f"denoising activations traced, the rest assumed: refine_memory_estimate's docstring):")
    print(f"  {r['frames']} frames at {r['size'][0]}x{r['size'][1]}, latent {tuple(r['latent_thw'])}, "
          f"{r['tokens']:,} tokens, BSA on, no CFG, text encoder off the GPU, VAE decode in 256-pixel tiles "
          "(--vae-tiling; whole frames, the default, take more)")
    print(f"  denoise: DiT weights {_fmt_bytes(r['dit_weight_bytes'])} + activations {_fmt_bytes(r['activation_bytes'])}"
          f" + latents {_fmt_bytes(r['latent_bytes'])}"
          f" + overhead {_fmt_bytes(r['overhead_bytes'])}")
    print("  stages: " + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in r["stages"].items()))
    print(f"  peak {_fmt_bytes(r['peak_bytes'])}: {'fits' if r['fits'] else 'does NOT fit'} in "
          f"{_fmt_bytes(r['budget_bytes'])}")
    return status


def _dit_and_inputs(args):
    """forward/profile: the DiT of --path (or random weights of --config) and seeded random
    inputs at --latent, --batch and --text-len -> (dit, x, t, text)."""
    import torch

    from .runtime.dit import LongCatDiT

    if args.path:
        dit = LongCatDiT.from_pretrained(args.path, dtype=args.dtype, device=args.device,
                                         kernels=args.kernels, attention=args.attention)
    else:
        dit = LongCatDiT.from_config(args.config, dtype=args.dtype, device=args.device, seed=args.seed,
                                     kernels=args.kernels, attention=args.attention)
    if getattr(args, "bsa", False):
        dit.enable_bsa()
    cfg, device = dit.config, dit.device
    T, H, W = args.latent
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(args.batch, cfg.in_channels, T, H, W, generator=g).to(device)
    t = torch.rand(args.batch, generator=g).mul(1000).to(device)
    text = torch.randn(args.batch, 1, args.text_len, cfg.caption_channels, generator=g).to(device)
    return dit, x, t, text


def cmd_forward(args) -> int:
    import torch

    dit, x, t, text = _dit_and_inputs(args)
    cfg, device = dit.config, dit.device
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


def cmd_generate(args) -> int:
    """Generate with a LongCat-Video pipeline; write latents (.safetensors) or decoded video (.mp4)."""
    import dataclasses

    from .pipelines.run import plan_generate, run_generate

    fields = {f.name for f in dataclasses.fields(GenerateRequest)}
    result = run_generate(plan_generate(GenerateRequest(**{k: v for k, v in vars(args).items() if k in fields})))
    s = result.summary
    if s is None:  # a rank other than 0 under context parallelism: rank 0 prints
        return 0 if result.finite else 1
    if args.json:
        print(json.dumps(s))
        return 0 if s["output_finite"] else 1
    cfg, n, video_shape = result.config, s["steps"], s["video_shape"]
    print(f"LongCatDiT {cfg.hidden_size}x{cfg.depth} from {s['source']} on {s['device']}, {s['dtype']}, "
          f"kernels={s['kernels']}, attention={s['attention']}")
    print(f"text     {s['text']}")
    for note in s["notes"]:
        print(f"note     {note}")
    print(f"task     {s['task']}: latents {tuple(s['latent_shape'])}, {n} denoising steps, guidance {s['guidance']}"
          f"{', distilled schedule' if args.distill else ''}, seed {args.seed}")
    if n:
        print(f"time     {s['mean_step_s']:.3f} s/step (mean of {n}), {s['total_s']:.2f} s in all, "
              f"model load {s['load_s']:.2f} s")
    print(f"memory   {s['memory']['label']}:")
    for row in s["memory"]["stages"]:
        print(f"           {row['stage']:16s} {_fmt_bytes(row['peak_bytes']):>12s}  ({row['seconds']:.2f} s)")
    sc = s.get("step_cache")
    if sc:
        print(f"cache    {sc['cached_steps']}/{sc['steps']} steps cached, {sc['full_steps']} full, "
              f"{sc['block_forwards_saved']}/{sc['block_forwards_total']} block forwards saved "
              f"({100 * sc['saved_fraction']:.1f}%)")
        chk = s.get("cache_check")
        if chk:
            psnr = chk.get("psnr_db")
            print(f"check    without the cache: latents rel. L2 {chk['latents_rel_l2']:.3g}"
                  + (f", decoded PSNR {psnr:.2f} dB" if psnr is not None else "")
                  + f"; {chk['uncached_total_s']:.2f} s uncached vs {s['total_s']:.2f} s cached")
    par = s.get("parallel")
    if par:
        print(f"parallel {par['layout']}; bytes rank 0 sent in the pipeline's gathers: {par['comm_bytes_rank0']}")
    if len(s["outputs"]) > 1:
        print(f"outputs  {len(s['outputs'])} files, one per video: {', '.join(s['outputs'])}")
    print(f"output   {s['output']}" + (f" ({video_shape[0]} frames, {video_shape[1]}x{video_shape[2]}; metadata in "
                                        f"{s['metadata_file']})" if video_shape else ""))
    if s["random_weights"]:
        print("next     that was a smoke test on random weights; for a real video, with an official checkpoint "
              "(pip install 'longcat-native[pipelines]'): longcat-native generate --checkpoint weights/LongCat-Video "
              "--prompt \"a cat walking on grass\" --out cat.mp4")
    return 0 if s["output_finite"] else 1


def cmd_profile(args) -> int:
    """A few forwards under torch.profiler with NVTX/record_function ranges: writes a Chrome trace,
    prints the top ops by self time grouped by range, and the nsys command line."""
    import torch

    from .runtime.profiling import format_profile_table, nsys_command, profile_forward

    dit, x, t, text = _dit_and_inputs(args)
    cfg, device = dit.config, dit.device
    T, H, W = args.latent
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
    fused + compile + CUDA graphs. Without CUDA the fused columns run only with TRITON_INTERPRET=1
    in the environment (the slow CPU interpreter, so this command does not set it; bench/model.py
    does); without it they print n/a with the reason."""
    import os

    from .benchmarking import model

    return model.run_from_args(args, default_out_dir=os.path.join(os.getcwd(), "bench", "results"))


def cmd_convert(args) -> int:
    """Convert a LongCat-Video DiT checkpoint to another layout: --to official (the official dit/
    layout: config.json + diffusion_pytorch_model[-0000i-of-0000n].safetensors + its index), diffusers
    (FastVideo's transformer/ layout: split q/k/v, FastVideo's names and config keys), fp8 / int8
    (longcat-native's quantized save, loaded back as quantize="fp8-weight-only" / "int8-weight-only";
    quantize="fp8" reads the fp8 one too). SRC: an official dit/ folder or root, a FastVideo Diffusers
    transformer/ folder or root (model_index.json + transformer/), a longcat-native quantized save, an
    official INT8 folder (base_model_int8/; dequantized for a float target) or a ComfyUI single file
    (fp8 bytes kept by --to fp8, fp8 * scale_weight otherwise). Only the DiT is converted:
    DST is the folder a loader is pointed at (a root's dit/ or transformer/). Every source tensor is
    checked against the config (names, shapes, dtypes) before anything is written; tensors are
    streamed one at a time (peak memory about the largest tensor group, not the model); DST appears
    complete or not at all (written beside it, renamed into place)."""
    from .runtime.convert import convert_checkpoint

    result = convert_checkpoint(args.src, args.dst, args.to, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                overwrite=args.overwrite, quiet=args.quiet or args.json)
    print(json.dumps(result.to_dict()) if args.json else result.summary())
    return 0


def _add_dit_source(p) -> None:
    """forward/profile: the model (--path or --config) and the random inputs' sizes."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--path", help="checkpoint root or dit/ folder (default: random weights of --config)")
    src.add_argument("--config", default="tiny", help="preset or config.json for random weights (default tiny)")
    p.add_argument("--latent", type=int, nargs=3, default=(3, 8, 12), metavar=("T", "H", "W"),
                   help="latent frames, height, width (default 3 8 12)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-len", type=int, default=8)


def _argparse_type(parse):
    """A flag parser of pipelines/plan.py (a ValueError on a bad value) as an argparse type: the
    message is printed with the flag named, exit 2, before anything loads."""

    def typed(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    typed.__name__ = getattr(parse, "__name__", "value")
    return typed


_MODEL_FLAGS = ("device", "dtype", "kernels", "attention", "seed")  # every command that builds the model
_PARALLEL_FLAGS = ("cp_size", "ring_size", "cfg_parallel", "dp_size", "shard_weights")


def _layout(args, cfg, act) -> dict:
    """info's parallel layout: what one rank of it computes per forward (no process is started;
    the checks are generate's, but the launch's)."""
    from .pipelines.plan import parallel_layout, parallel_world

    r = GenerateRequest(**{k: getattr(args, k) for k in _PARALLEL_FLAGS})
    for flag, v in (("--cp-size", r.cp_size), ("--ring-size", r.ring_size), ("--dp-size", r.dp_size)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    if cfg.num_heads % r.cp_size:
        raise ValueError(f"--cp-size {r.cp_size} must divide the model's {cfg.num_heads} attention heads")
    cp = r.cp_size * r.ring_size
    videos = -(-args.batch // r.dp_size)  # the largest replica's share (contiguous slices)
    return {"layout": parallel_layout(r), "world": parallel_world(r),
            "guided_batch_per_rank": videos if r.cfg_parallel else 2 * videos,
            "tokens_per_rank": -(-act["tokens"] // cp), "heads_per_rank": cfg.num_heads // r.cp_size,
            "videos_per_replica": videos}


def add_request_flags(p, names=None) -> None:
    """The flags of :class:`GenerateRequest`'s fields (``names``: those; None: all, in their
    argument groups), each declared once in pipelines/plan.py: default, help, choices, type."""
    import dataclasses

    groups = {}
    for f in dataclasses.fields(GenerateRequest):
        if names is not None and f.name not in names:
            continue
        kw = {k: v for k, v in f.metadata.items() if k not in ("group", "aliases")}
        if f.default is False:
            kw["action"] = "store_true"
        if "type" in kw and kw["type"] not in (int, float):
            kw["type"] = _argparse_type(kw["type"])
        target = p
        if names is None:  # the whole request: its groups, in the order of the fields
            title = f.metadata["group"]
            if title not in groups:
                groups[title] = p.add_argument_group(title)
            target = groups[title]
        target.add_argument("--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ()), default=f.default, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longcat-native", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="config, parameter count, weight bytes and activation memory estimate",
                          description=cmd_info.__doc__)
    src = info.add_mutually_exclusive_group(required=True)
    src.add_argument("path", nargs="?", help="checkpoint root or dit/ folder")
    src.add_argument("--config", help="a preset (tiny, longcat-video) or a config.json instead of a checkpoint")
    info.add_argument("--frames", type=int, default=93, help="video frames (default 93)")
    info.add_argument("--height", type=int, default=480, help="video height in pixels (default 480)")
    info.add_argument("--width", type=int, default=832, help="video width in pixels (default 832)")
    info.add_argument("--batch", type=int, default=1)
    info.add_argument("--kv-frames", type=int, default=0, help="latent frames held in a KV cache (continuation)")
    info.add_argument("--dtype", default=None, help="weights/activations dtype (default bfloat16)")
    info.add_argument("--refine-estimate", action="store_true",
                      help="also estimate the 480p -> 720p refinement's peak GPU memory for a config smaller than "
                           "the official one (printed by default for the official size)")
    add_request_flags(info, ("quantize", "max_memory", "cache"))  # --cache: with --max-memory only
    add_request_flags(info, _PARALLEL_FLAGS)  # the layout's per-rank shares (no launch needed)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    fwd = sub.add_parser("forward", help="one forward pass on random inputs; prints shapes, time, output stats")
    _add_dit_source(fwd)
    add_request_flags(fwd, _MODEL_FLAGS)
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
                    "Peak memory is reported per stage (GPU memory on CUDA, host RSS elsewhere). The flags are "
                    "the fields of longcat_native.pipelines.plan.GenerateRequest (the same run from Python).")
    add_request_flags(gen)
    gen.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    gen.set_defaults(func=cmd_generate)

    prof = sub.add_parser("profile", help="a few forwards under torch.profiler: trace, top ops by range, nsys command",
                          description=cmd_profile.__doc__)
    _add_dit_source(prof)
    prof.add_argument("--steps", type=int, default=3, help="profiled forwards (after one warm-up)")
    prof.add_argument("--top", type=int, default=20, help="rows of the table")
    prof.add_argument("--trace", default="longcat_trace.json", help="Chrome/Perfetto trace output")
    prof.add_argument("--bsa", action="store_true", help="enable block-sparse attention")
    prof.add_argument("--compile", action="store_true", help="profile the compiled model (compile_model)")
    add_request_flags(prof, _MODEL_FLAGS)
    prof.add_argument("--json", action="store_true", help="also print a JSON summary line")
    prof.set_defaults(func=cmd_profile)

    from .benchmarking.model import add_arguments as _bench_arguments

    bench = sub.add_parser("bench", help="full-model benchmark: eager/compiled reference, fused, fused+compile+graphs",
                           description=cmd_bench.__doc__)
    _bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    from .runtime.names import CONVERT_TARGETS, DTYPE_CHOICES

    conv = sub.add_parser("convert", help="convert a DiT checkpoint: official, diffusers (FastVideo), fp8, int8",
                          description=cmd_convert.__doc__)
    conv.add_argument("src", metavar="SRC", help="source checkpoint: official dit/ or root, Diffusers transformer/ or "
                                                 "root, longcat-native quantized save, official INT8 folder, ComfyUI "
                                                 ".safetensors file")
    conv.add_argument("dst", metavar="DST", help="output folder (new or empty; see --overwrite)")
    conv.add_argument("--to", required=True, choices=CONVERT_TARGETS, help="the output layout")
    conv.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                      help="dtype of the float tensors (default: as stored; for fp8/int8 the model dtype of the "
                           "unquantized tensors, default the source's one float dtype)")
    conv.add_argument("--max-shard-size", default="5GB",
                      help="largest weight file, e.g. 5GB (10**9 B, the default, as Hugging Face), 2GiB, 500MB; "
                           "a checkpoint that fits is one file, otherwise shards + an index")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace an existing non-empty DST (swapped for the new folder only once complete)")
    conv.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a tty)")
    conv.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    conv.set_defaults(func=cmd_convert)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .pipelines.media import MissingExtraError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError, MissingExtraError) as e:
        print(f"longcat-native {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's convention for SIGINT (128 + 2)
        print(f"longcat-native {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
