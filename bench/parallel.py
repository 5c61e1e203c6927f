"""Context parallelism: communication per block and rank (computed), and measured scaling.

    python bench/parallel.py                                   # computed figures + the single-rank time
    torchrun --nproc-per-node 4 bench/parallel.py --depth 8    # multi-GPU: measured scaling too

Computed, for the real config at docs/workloads.md's shapes (480p: CFG batch 2, N = 37,440; 720p
refinement: batch 1, N = 168,960, BSA) and each ``cp_size``: the bytes each rank sends per block
(the qkv all-to-all and the attention output's way back: ``(P-1)/P`` of ``4 * B * N/P * C`` bf16
elements, ``runtime/parallel.comm_bytes_per_block``), the model FLOPs each rank computes per block,
their ratio (FLOP per byte sent: the arithmetic intensity the interconnect must sustain), and the
time the exchange needs at ``--link-gbps`` (an assumed per-rank send bandwidth, 450 GB/s for H100
NVLink 4 by default; a stated assumption, not a measurement) beside the compute time at the
matmul peak measured in this run (on CUDA) — the fraction of a block the exchange would cost if
not overlapped.

Weight sharding (``shard_weights=True``): per-rank weight bytes (shards, replicated, the two
gathered blocks) and the all-gather bytes each rank receives per forward for 1, 2, 4, 8 ranks in
bf16 and int8, computed from the meta model; with ``--shard-trace`` the per-rank device peak of
the official run's denoising stages traced (runtime/sharding.py, pipelines/budget.py
``plan_memory(shard_ranks=)``).

Measured: one forward on a single rank (CUDA: the real config at ``--size``, ``--depth`` blocks;
CPU: the tiny preset at a small latent). Under ``torchrun`` with more than one process, the same
forward with ``cp_size = WORLD_SIZE`` and the scaling efficiency ``t1 / (P * tP)``, with the
single-rank time taken on rank 0 in the same run. The output is checked against the single-rank
result. Ends with one JSON line ``{"bench": "parallel", ...}``.
"""

from __future__ import annotations

import os
import sys

from longcat_native.benchmarking.harness import (
    device_name, emit_json, fmt_num, print_table, setup_triton_env, sync, time_fn,
)

setup_triton_env()  # before longcat_native imports triton

import torch  # noqa: E402

from longcat_native.benchmarking.model import SIZES, matmul_peak_tflops, model_flops  # noqa: E402
from longcat_native.runtime.config import resolve_config  # noqa: E402
from longcat_native.runtime.parallel import comm_bytes_per_block  # noqa: E402


def computed_rows(size: str, cp_sizes, link_gbps: float, peak_tflops):
    spec = SIZES[size]
    cfg = resolve_config(spec["preset"], spec["overrides"])
    T, H, W = spec["latent"]
    pt, ph, pw = cfg.patch_size
    N = (T // pt) * (H // ph) * (W // pw)
    depth = cfg.depth
    block_flops = (model_flops(cfg, spec["batch"], spec["latent"], spec["text"], spec["bsa"])) / depth  # ~ per block
    rows, records = [], {}
    for P in cp_sizes:
        if cfg.num_heads % P:
            continue
        b = comm_bytes_per_block(P, spec["batch"], N, cfg.hidden_size, 2)
        flops_rank = block_flops / P
        comm_s = b["total"] / (link_gbps * 1e9)
        compute_s = flops_rank / (peak_tflops * 1e12) if peak_tflops else None
        rec = {
            "tokens_per_rank": N // P,
            "comm_mb_per_block_per_rank": b["total"] / 1e6,
            "qkv_all_to_all_mb": b["qkv_all_to_all"] / 1e6,
            "out_all_to_all_mb": b["out_all_to_all"] / 1e6,
            "tflop_per_block_per_rank": flops_rank / 1e12,
            "flop_per_comm_byte": (flops_rank / b["total"]) if b["total"] else None,
            "comm_ms_per_block_at_link": comm_s * 1e3,
            "compute_ms_per_block_at_peak": None if compute_s is None else compute_s * 1e3,
            "comm_fraction_if_not_overlapped": (comm_s / (comm_s + compute_s)) if compute_s else None,
        }
        records[P] = rec
        rows.append([P, rec["tokens_per_rank"], rec["qkv_all_to_all_mb"], rec["out_all_to_all_mb"],
                     rec["comm_mb_per_block_per_rank"], rec["tflop_per_block_per_rank"], rec["flop_per_comm_byte"],
                     rec["comm_ms_per_block_at_link"], rec["compute_ms_per_block_at_peak"],
                     rec["comm_fraction_if_not_overlapped"]])
    return N, rows, records


def sharding_rows(ranks, quantizes, trace: bool):
    """Weight sharding (shard_weights, runtime/sharding.py) at the real config: per-rank weight bytes
    (computed from the meta model: the shards, the replicated root and block buffers, the two
    gathered blocks), the all-gather bytes each rank receives per forward (every block's other
    (N-1)/N, counted from the same sizes), and with ``trace`` the traced per-rank device peak of the
    official run's denoising stages (plan_memory: weights + traced activations + inputs + latents
    + 1 GiB overhead; no chunking, no streaming)."""
    from longcat_native.pipelines.budget import _dit_shard_sizes, dit_device_bytes, official_t2v_stages, plan_memory

    cfg = resolve_config("longcat-video", {})
    import json

    stages = [s for s in official_t2v_stages() if s.kind == "denoise"]
    rows, records = [], {}
    for q in quantizes:
        sizes = _dit_shard_sizes(json.dumps(cfg.to_dict(), sort_keys=True), torch.bfloat16, q)
        block_params = sum(rows_ * row for block in sizes[1] for rows_, row in block)
        for n in ranks:
            b = (dit_device_bytes(cfg, torch.bfloat16, q, shard_ranks=n) if n > 1 else
                 {"shards": block_params, "replicated": sizes[0] + sum(sizes[2]), "gathered": 0,
                  "total": dit_device_bytes(cfg, torch.bfloat16, q)["total"]})
            gathered_in = block_params - sum(-(-rows_ // n) * row for block in sizes[1] for rows_, row in block)
            rec = {"weights_gib": b["total"] / 2**30, "shards_gib": b["shards"] / 2**30,
                   "replicated_gib": b["replicated"] / 2**30, "gathered_gib": b["gathered"] / 2**30,
                   "all_gather_gib_per_forward": (gathered_in if n > 1 else 0) / 2**30}
            if trace:
                plan = plan_memory(10**15, dit_config=cfg, quantize=q, stages=stages, allow_chunking=False,
                                   shard_ranks=n)
                for st in plan.stages:
                    rec[f"{st.name}_peak_gib"] = st.device_bytes / 2**30
            label = q or "bf16"
            records[f"{label}_shard{n}"] = rec
            rows.append([label, n, rec["shards_gib"], rec["replicated_gib"], rec["gathered_gib"], rec["weights_gib"],
                         rec["all_gather_gib_per_forward"]]
                        + ([rec.get(f"{s.name}_peak_gib") for s in stages] if trace else []))
    headers = (["weights", "ranks", "shards GiB", "replicated GiB", "gathered GiB", "weights/rank GiB",
                "all-gather GiB/forward/rank"] + ([f"{s.name} peak/rank GiB (traced)" for s in stages] if trace else []))
    return headers, rows, records


def measure(size, depth, device, dtype, repeats, warmup, world):
    """Single-rank forward time, and with ``world > 1`` (torchrun) the CP forward time."""
    import longcat_native as lcn

    spec = dict(SIZES[size])
    over = dict(spec["overrides"])
    if depth is not None:
        over["depth"] = depth
    g = torch.Generator(device="cpu").manual_seed(0)
    cfg = resolve_config(spec["preset"], over)
    B, (T, H, W), L = spec["batch"], spec["latent"], spec["text"]
    x = torch.randn(B, cfg.in_channels, T, H, W, generator=g).to(device=device, dtype=dtype)
    t = (torch.rand(B, generator=g) * 1000).to(device)
    text = torch.randn(B, 1, L, cfg.caption_channels, generator=g).to(device=device, dtype=dtype)
    out = {"size": size, "depth": cfg.depth, "batch": B, "latent": [T, H, W]}
    rank = 0
    single = None
    if world > 1:
        import torch.distributed as dist

        dit_cp = lcn.LongCatDiT.from_config(spec["preset"], dtype=dtype, device=device, cp_size=world, **over)
        rank = dist.get_rank()
        if spec["bsa"]:
            dit_cp.enable_bsa()
        with torch.inference_mode():
            cp_out = dit_cp(x, t, text)
            out["cp_forward_s"] = time_fn(lambda: dit_cp(x, t, text), device, repeats=repeats, warmup=warmup,
                                          name="cp_forward")
        out["cp_size"] = world
        del dit_cp
        if device.type == "cuda":
            torch.cuda.empty_cache()
        dist.barrier()
    if rank == 0:
        dit = lcn.LongCatDiT.from_config(spec["preset"], dtype=dtype, device=device, **over)
        if spec["bsa"]:
            dit.enable_bsa()
        with torch.inference_mode():
            single = dit(x, t, text)
            out["single_rank_forward_s"] = time_fn(lambda: dit(x, t, text), device, repeats=repeats, warmup=warmup,
                                                   name="single_forward")
        out["kernels"], out["attention"] = dit.resolved_kernels(), dit.resolved_attention()
        if world > 1:
            scale = single.float().abs().max().clamp_min(1e-12)
            out["cp_vs_single_max_rel_err"] = float((cp_out.float() - single.float()).abs().max() / scale)
            out["cp_speedup"] = out["single_rank_forward_s"] / out["cp_forward_s"]
            out["scaling_efficiency"] = out["cp_speedup"] / world
        del dit
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    sync(device)
    return out, rank


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp-sizes", default="1,2,4,8", help="cp sizes of the computed table")
    p.add_argument("--sizes", default="480p,720p", help="shapes of the computed table (docs/workloads.md)")
    p.add_argument("--link-gbps", type=float, default=450.0,
                   help="assumed per-rank send bandwidth in GB/s for the comm-time estimate (H100 NVLink 4: 450)")
    p.add_argument("--size", default=None, help="shape of the measured forward (CUDA default 480p, CPU small)")
    p.add_argument("--depth", type=int, default=None, help="blocks in the measured forward (CUDA default 4)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-measure", action="store_true", help="computed figures only")
    p.add_argument("--shard-ranks", default="1,2,4,8", help="rank counts of the weight-sharding table")
    p.add_argument("--shard-trace", action="store_true",
                   help="weight-sharding table with the traced per-rank denoising peaks (tracing 720p takes ~a minute on CPU)")
    args = p.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dtype = torch.bfloat16
    else:
        device, dtype = torch.device("cpu"), torch.float32
    cp_sizes = [int(v) for v in args.cp_sizes.split(",")]
    peak = matmul_peak_tflops(device, dtype) if on_cuda else None

    measured, rank = {}, 0
    if not args.no_measure:
        size = args.size or ("480p" if on_cuda else "small")
        depth = args.depth if args.depth is not None else (4 if on_cuda else None)
        repeats = args.repeats or (5 if on_cuda else 3)
        measured, rank = measure(size, depth, device, dtype, repeats, args.warmup, world)
    if rank != 0:
        return 0

    record = {"bench": "parallel", "device": device_name(device), "world_size": world,
              "link_gbps_assumed": args.link_gbps, "matmul_peak_tflops": peak}
    headers = ["cp", "tokens/rank", "qkv a2a MB", "out a2a MB", "comm MB/block/rank", "TFLOP/block/rank",
               "FLOP/comm byte", f"comm ms @{args.link_gbps:g} GB/s", "compute ms @peak", "comm share (no overlap)"]
    for size in args.sizes.split(","):
        N, rows, recs = computed_rows(size, cp_sizes, args.link_gbps, peak)
        print_table(headers, [[fmt_num(v) for v in r] for r in rows],
                    title=f"{size}: batch {SIZES[size]['batch']}, N = {N:,} tokens, real config, bf16 (computed)")
        for P, rec in recs.items():
            if P > 1:
                record[f"{size}_cp{P}_comm_mb_per_block_per_rank"] = rec["comm_mb_per_block_per_rank"]
                record[f"{size}_cp{P}_flop_per_comm_byte"] = rec["flop_per_comm_byte"]
                if rec["comm_fraction_if_not_overlapped"] is not None:
                    record[f"{size}_cp{P}_comm_fraction_if_not_overlapped"] = rec["comm_fraction_if_not_overlapped"]
    shard_headers, shard_rows_, shard_recs = sharding_rows([int(v) for v in args.shard_ranks.split(",")],
                                                           (None, "int8-weight-only"), args.shard_trace)
    print_table(shard_headers, [[fmt_num(v) for v in r] for r in shard_rows_],
                title="weight sharding (shard_weights=True), real config, per rank: computed bytes"
                      + ("; peaks traced (1 GiB overhead, no chunking, no streaming)" if args.shard_trace else ""))
    for k, rec in shard_recs.items():
        for f, v in rec.items():
            record[f"{k}_{f}"] = v
    if measured:
        print(f"\nmeasured on {record['device']}: {measured['size']}, depth {measured['depth']}, "
              f"kernels {measured.get('kernels')}, attention {measured.get('attention')}")
        print(f"  single rank: {measured['single_rank_forward_s'] * 1e3:.3f} ms per forward")
        if "cp_forward_s" in measured:
            print(f"  cp_size {world}: {measured['cp_forward_s'] * 1e3:.3f} ms per forward, speedup "
                  f"{measured['cp_speedup']:.2f}x, scaling efficiency {measured['scaling_efficiency']:.0%}, "
                  f"max error vs single rank {measured['cp_vs_single_max_rel_err']:.2g} of the output scale")
        else:
            print("  (one process: run under torchrun --nproc-per-node N for measured scaling)")
        record["measured_size"] = measured["size"]
        record["measured_depth"] = measured["depth"]
        record["single_rank_forward_ms"] = measured["single_rank_forward_s"] * 1e3
        if "cp_forward_s" in measured:
            record["cp_forward_ms"] = measured["cp_forward_s"] * 1e3
            for k in ("cp_speedup", "scaling_efficiency", "cp_vs_single_max_rel_err"):
                record[k] = measured[k]
    emit_json(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
