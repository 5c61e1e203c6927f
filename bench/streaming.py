"""Weight streaming cost (offload="blocks", docs/design/streaming.md): one forward with every block
resident against the same model with N blocks streamed from host memory.

    python bench/streaming.py                      # GPU: the real width (C 4096), 8 blocks, 480p latent, bf16
    python bench/streaming.py --size small         # the CPU default: C 512, depth 4 (seconds)
    python bench/streaming.py --streamed 4 --latent 24 60 104 --repeats 3

Reported: the forward time resident and streamed (medians, device synchronized), the bytes copied
host -> device per forward (streamed blocks x packed block bytes), the measured host -> device
bandwidth (CUDA: a 256 MiB copy from pinned memory; CPU: a plain memcpy of ``--copy-mib`` MiB, a
stand-in, labelled so: the CPU has no PCIe copy), the estimated overhead (copy time not hidden
behind one block of compute, the overlap the one-block-ahead prefetch gives) and the measured one.
Also the traffic of the 13.6B model (48 blocks) in bf16 and fp8 at the measured bandwidth and at
PCIe 4.0 / 5.0 x16 (~25 / ~50 GB/s, ESTIMATES). Outputs are checked bit-identical. The last
printed line is one JSON object (``{"bench": "streaming", ...}``).
"""

from __future__ import annotations

import argparse
import sys

SIZES = {
    # preset + overrides; latent (T, H, W) before the 1x2x2 patch; text tokens
    "real": dict(preset="longcat-video", overrides=dict(depth=8), latent=(24, 60, 104), text=512),
    "small": dict(preset="tiny", overrides=dict(hidden_size=512, num_heads=4, depth=4), latent=(2, 8, 8), text=16),
    "tiny": dict(preset="tiny", overrides=dict(depth=4), latent=(2, 4, 4), text=8),
}
PCIE_GBPS = {"pcie4_x16": 25.0, "pcie5_x16": 50.0}  # typical achieved host->device rates: estimates


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: real on CUDA, small on CPU")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--streamed", type=int, default=None, help="blocks streamed (default: all)")
    p.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    p.add_argument("--latent", type=int, nargs=3, default=None, metavar=("T", "H", "W"))
    p.add_argument("--text", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kernels", default=None, help="default: auto on CUDA, reference on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards (default 5 GPU, 3 CPU)")
    p.add_argument("--copy-mib", type=int, default=None, help="bandwidth probe size (default 256 CUDA, 64 CPU)")
    return p.parse_args(argv)


def measure_h2d_gbps(device, mib: int, repeats: int = 5) -> float:
    """GB/s (1e9 B/s, bytes moved once) of a host -> device copy from pinned memory; on the CPU a
    plain memcpy between two host buffers (a stand-in)."""
    import torch

    from longcat_native.benchmarking.harness import time_fn

    n = mib * 2**20
    cuda = device.type == "cuda"
    src = torch.empty(n, dtype=torch.uint8, pin_memory=cuda).fill_(1)
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    seconds = time_fn(lambda: dst.copy_(src, non_blocking=True), device, repeats=repeats, warmup=2, number=1,
                      name="h2d_bandwidth")
    return n / seconds / 1e9


def real_model_traffic():
    """Bytes per block of the 13.6B model (shapes from the meta model): bf16, and fp8 weights (block
    Linear weights 1 byte + a float32 scale per output row; biases and norms bf16)."""
    import torch

    from longcat_native.runtime import streaming
    from longcat_native.runtime.dit import LongCatDiT

    meta = LongCatDiT.from_config("longcat-video", device="meta", dtype=torch.bfloat16)
    block = meta.blocks[0]
    entries, packed = streaming.block_layout(block)
    fp8 = 0
    for e in entries:
        n = 1
        for s in e.shape:
            n *= s
        if e.name == "weight" and len(e.shape) == 2:
            fp8 += n + 4 * e.shape[0]
        else:
            fp8 += n * 2
    kept = sum(p.numel() * 2 for p in block.adaLN_modulation.parameters())
    return {"depth": len(meta.blocks), "block_bf16_bytes": packed, "block_fp8_bytes": fp8, "block_kept_bytes": kept}


def main(argv=None) -> int:
    args = parse_args(argv)
    from longcat_native.benchmarking.harness import (default_device, device_name, emit_json, print_table, setup_triton_env,
                                              time_fn)

    has_cuda = setup_triton_env()
    import torch

    from longcat_native.runtime.dit import LongCatDiT

    device = default_device()
    size = args.size or ("real" if has_cuda else "small")
    spec = SIZES[size]
    dtype = getattr(torch, args.dtype or ("bfloat16" if has_cuda else "float32"))
    kernels = args.kernels or ("auto" if has_cuda else "reference")
    repeats = args.repeats if args.repeats is not None else (5 if has_cuda else 3)
    T, H, W = args.latent or spec["latent"]
    L = args.text if args.text is not None else spec["text"]
    overrides = dict(spec["overrides"])
    if args.depth is not None:
        overrides["depth"] = args.depth
    dit = LongCatDiT.from_config(spec["preset"], device=device, dtype=dtype, kernels=kernels, **overrides)
    cfg = dit.config
    depth = cfg.depth
    streamed = depth if args.streamed is None else args.streamed
    if not 0 < streamed <= depth:
        raise SystemExit(f"--streamed must be in [1, {depth}]")
    dev_name = device_name(device)
    print(f"device: {dev_name}")
    print(f"model {size}: C {cfg.hidden_size}, depth {depth}, FFN {cfg.ffn_hidden_size}, {dtype}, kernels "
          f"{dit.resolved_kernels()}; {streamed} of {depth} blocks streamed", flush=True)

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, cfg.in_channels, T, H, W, generator=g).to(device=device, dtype=dtype)
    t = torch.full((args.batch,), 500.0, device=device)
    text = torch.randn(args.batch, 1, L, cfg.caption_channels, generator=g).to(device=device, dtype=dtype)
    tokens = T * (H // cfg.patch_size[1]) * (W // cfg.patch_size[2])

    def step():
        return dit(x, t, text)

    with torch.no_grad():
        resident_s = time_fn(step, device, repeats, warmup=1, number=1, name="streaming/resident")
        ref = step()
        st = dit.enable_weight_streaming(depth - streamed)
        streamed_s = time_fn(step, device, repeats, warmup=1, number=1, name="streaming/streamed")
        out = step()
        stats = st.memory_stats()
        identical = bool(torch.equal(out, ref))
        dit.disable_weight_streaming()
    mib = args.copy_mib if args.copy_mib is not None else (256 if has_cuda else 64)
    bw = measure_h2d_gbps(device, mib)
    bw_label = "pinned host->device copy" if has_cuda else "CPU memcpy (stand-in: no PCIe on the CPU)"
    block_bytes = stats["bytes_per_forward"] / streamed
    block_s = resident_s / depth
    copy_block_s = block_bytes / (bw * 1e9)
    # One block ahead: a copy hides behind the previous block's compute; block 0 (when streamed) is not hidden.
    first = copy_block_s if streamed == depth else max(0.0, copy_block_s - block_s)
    exposed_s = first + (streamed - 1) * max(0.0, copy_block_s - block_s)
    est_overhead = exposed_s / resident_s
    measured_overhead = streamed_s / resident_s - 1.0

    print()
    print_table(["what", "value"], [
        ["forward, all blocks resident (ms)", resident_s * 1e3],
        [f"forward, {streamed} blocks streamed (ms)", streamed_s * 1e3],
        ["measured overhead", f"{measured_overhead:+.1%}"],
        ["bytes host->device per forward (MB)", stats["bytes_per_forward"] / 1e6],
        ["bytes per streamed block (MB)", block_bytes / 1e6],
        [f"bandwidth, {bw_label} (GB/s)", bw],
        ["copy time per block at that bandwidth (ms)", copy_block_s * 1e3],
        ["compute time per block, resident (ms)", block_s * 1e3],
        ["estimated overhead (copy not hidden by one block of compute)", f"{est_overhead:+.1%}"],
        ["device bytes: resident + staging (MB)", stats["device_bytes"] / 1e6],
        ["outputs bit-identical", identical],
    ], title=f"weight streaming, {size}, batch {args.batch}, latent {T}x{H}x{W} ({tokens:,} tokens), text {L}")

    real = real_model_traffic()
    rows = []
    for label, key in (("bf16", "block_bf16_bytes"), ("fp8 (estimate)", "block_fp8_bytes")):
        per_forward = real[key] * real["depth"]
        row = [label, real[key] / 1e6, per_forward / 1e9]
        for gbps in (bw, *PCIE_GBPS.values()):
            row.append(per_forward / (gbps * 1e9) * 1e3)
        rows.append(row)
    print()
    print_table(["13.6B model, 48 blocks streamed", "MB/block", "GB/forward", "ms @ measured",
                 "ms @ PCIe4 ~25 GB/s (est.)", "ms @ PCIe5 ~50 GB/s (est.)"], rows,
                title="host->device traffic per forward (every block streamed)")

    emit_json({
        "bench": "streaming",
        "device": dev_name,
        "size": size,
        "dtype": str(dtype).replace("torch.", ""),
        "kernels": kernels,
        "hidden_size": cfg.hidden_size,
        "depth": depth,
        "streamed_blocks": streamed,
        "batch": args.batch,
        "tokens": tokens,
        "text_tokens": L,
        "repeats": repeats,
        "resident_forward_ms": resident_s * 1e3,
        "streamed_forward_ms": streamed_s * 1e3,
        "measured_overhead_fraction": measured_overhead,
        "bytes_per_forward": stats["bytes_per_forward"],
        "bytes_per_block": block_bytes,
        "h2d_bandwidth_gbps": bw,
        "h2d_bandwidth_kind": "pinned_h2d" if has_cuda else "cpu_memcpy_stand_in",
        "copy_per_block_ms": copy_block_s * 1e3,
        "compute_per_block_ms": block_s * 1e3,
        "estimated_overhead_fraction": est_overhead,
        "device_bytes": stats["device_bytes"],
        "staging_bytes": stats["staging_bytes"],
        "host_bytes": stats["host_bytes"],
        "outputs_bit_identical": identical,
        "real_block_bf16_bytes": real["block_bf16_bytes"],
        "real_block_fp8_bytes": real["block_fp8_bytes"],
        "real_block_kept_resident_bytes": real["block_kept_bytes"],
        "real_bf16_forward_bytes": real["block_bf16_bytes"] * real["depth"],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
