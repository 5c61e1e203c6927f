"""The ``longcat-native`` command: ``info`` and ``forward`` (later: generate, bench, profile)."""

from __future__ import annotations

import argparse
import json
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


def activation_bytes(cfg, latent, batch: int, dtype_bytes: int, kv_frames: int = 0) -> dict:
    """Peak activation memory of one forward, by the largest live set inside a block.

    Live at the FFN (the peak): the residual x and normalized h ([N, C] each), the w1|w3 GEMM
    output [N, 2F] and the SwiGLU output [N, F]; attention (flash/SDPA) adds q, k, v, out
    ([N, C] each) plus the qkv GEMM output [N, 3C], smaller than the FFN set for the real config.
    float32 pieces: the final projection output [N, 4*C_out] and the model output.
    """
    T, H, W = latent
    pt, ph, pw = cfg.patch_size
    N = (T // pt) * (H // ph) * (W // pw)
    C, F = cfg.hidden_size, cfg.ffn_hidden_size
    ffn_set = (2 * C + 3 * F) * N * batch * dtype_bytes
    attn_set = (2 * C + 3 * C + 4 * C) * N * batch * dtype_bytes
    out_fp32 = 2 * N * cfg.patch_volume * cfg.out_channels * batch * 4
    kv_cache = 2 * cfg.depth * kv_frames * (H // ph) * (W // pw) * C * dtype_bytes
    peak = max(ffn_set, attn_set) + out_fp32 + kv_cache
    return {"tokens": N, "peak_activation_bytes": peak, "kv_cache_bytes": kv_cache}


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
    act = activation_bytes(cfg, latent, args.batch, dtype_bytes, args.kv_frames)
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
    print(f"peak activations  {_fmt_bytes(act['peak_activation_bytes'])} (estimate; see --help)")
    if args.kv_frames:
        print(f"kv cache          {_fmt_bytes(act['kv_cache_bytes'])} for {args.kv_frames} frames")
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
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"longcat-native {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
