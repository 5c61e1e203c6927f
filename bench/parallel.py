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



# -- per mode: weights, communication per step, traced peak, per rank ------------------------------

# name, ulysses, ring, cfg, dp, shard_weights. "shard N" shards over every rank of the layout.
MODE_LAYOUTS = (
    ("single GPU", 1, 1, 1, 1, False),
    ("ulysses 2", 2, 1, 1, 1, False),
    ("ulysses 4", 4, 1, 1, 1, False),
    ("ulysses 8", 8, 1, 1, 1, False),
    ("ring 2", 1, 2, 1, 1, False),
    ("ring 2 x ulysses 4", 4, 2, 1, 1, False),
    ("ring 4 x ulysses 8", 8, 4, 1, 1, False),
    ("cfg 2", 1, 1, 2, 1, False),
    ("cfg 2 x ulysses 4", 4, 1, 2, 1, False),
    ("dp 2", 1, 1, 1, 2, False),
    ("shard 4 (dp 4)", 1, 1, 1, 4, True),
    ("shard 4 x ulysses 4", 4, 1, 1, 1, True),
    ("shard 8 x cfg 2 x ulysses 4", 4, 1, 2, 1, True),
)
# The layouts the --count launch checks, by world size (tiny model, gloo).
COUNT_LAYOUTS = {
    2: (("ulysses 2", 2, 1, 1, 1, False), ("ring 2", 1, 2, 1, 1, False), ("cfg 2", 1, 1, 2, 1, False),
        ("dp 2", 1, 1, 1, 2, False), ("shard 2 (dp 2)", 1, 1, 1, 2, True)),
    4: (("ring 2 x ulysses 2", 2, 2, 1, 1, False), ("cfg 2 x ulysses 2", 2, 1, 2, 1, False),
        ("shard 4 x ulysses 4", 4, 1, 1, 1, True), ("shard 4 x cfg 2 x ring 2", 1, 2, 2, 1, True)),
}
COMM_KINDS = ("ulysses", "ring_kv", "cp_output_gather", "cfg", "fsdp")
MODE_STEPS = {"480p": 50, "720p": 5}  # the official run: 50-step CFG base, 5-step refinement (budget.py)


def layout_problem(cfg, ulysses, ring, grid, bsa):
    """Why the model refuses this layout at this token grid (the same checks as ParallelConfig
    .check_model and ContextParallel.check_grid, without a process group), or None."""
    from longcat_native.runtime.parallel import optimal_split_hw

    _, nh, nw = grid
    if cfg.num_heads % ulysses:
        return f"num_heads {cfg.num_heads} not divisible by ulysses {ulysses}"
    if ring > 1:
        if bsa:
            return "BSA is refused under a ring"
        if (nh * nw) % (ring * ulysses):
            return f"{nh * nw} tokens per frame not divisible by {ring * ulysses} ranks"
        return None
    sh, sw = optimal_split_hw(ulysses)
    if nh % sh or nw % sw:
        return f"token grid {nh} x {nw} not divisible into {sh} x {sw} tiles"
    return None


def step_comm_bytes(cfg, ulysses, ring, cfg_par, shard_world, batch, latent, guided, dtype, quantize=None):
    """Bytes rank 0 receives (= sends, for these collectives) per denoising step, by kind, computed:
    Ulysses all-to-alls and ring k/v (``comm_bytes_per_block`` x depth), the context-parallel
    output all-gather (the final layer's float32 ``[B, N/P, pt*ph*pw*C_out]`` from each of P-1
    peers), the CFG all-gather of the float32 prediction (what ``Parallel.all_gather`` counts: the
    rank's half, which its one peer receives), and FSDP's block all-gathers (every block's rows
    but rank 0's, runtime/sharding.py's chunking; one forward per step). ``batch`` is the step's
    whole batch (2 with CFG); CFG-parallel gives each rank half of it."""
    import json

    from longcat_native.pipelines.budget import _dit_shard_sizes
    from longcat_native.runtime.sharding import sharded_device_bytes

    T, H, W = latent
    pt, ph, pw = cfg.patch_size
    N = (T // pt) * (H // ph) * (W // pw)
    b = batch // cfg_par if (guided and cfg_par > 1) else batch
    P = ulysses * ring
    e = torch.empty((), dtype=dtype).element_size() if not isinstance(dtype, int) else dtype
    blk = comm_bytes_per_block(ulysses, b, N, cfg.hidden_size, e, ring_size=ring)
    out = dict.fromkeys(COMM_KINDS, 0)
    out["ulysses"] = cfg.depth * (blk["qkv_all_to_all"] + blk["out_all_to_all"])
    out["ring_kv"] = cfg.depth * blk.get("ring_kv", 0)
    out["cp_output_gather"] = (P - 1) * b * (N // P) * pt * ph * pw * cfg.out_channels * 4 if P > 1 else 0
    out["cfg"] = b * cfg.out_channels * T * H * W * 4 if (guided and cfg_par > 1) else 0
    if shard_world > 1:
        d = dict(cfg.to_dict(), cp_split_hw=[1, 1])  # a parallel model's split: the meta model is one rank
        sizes = _dit_shard_sizes(json.dumps(d, sort_keys=True), dtype, quantize)
        whole = sum(rows * row for block in sizes[1] for rows, row in block)
        out["fsdp"] = whole - sharded_device_bytes(sizes, shard_world)["shards"]
    out = {k: int(v) for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def mode_rows(size, trace: bool, dtype=torch.bfloat16, quantize=None):
    """One row per layout of MODE_LAYOUTS at ``size``'s real shapes: world size, per-rank weight
    bytes (budget.dit_device_bytes, sharded: runtime/sharding.sharded_device_bytes), per-step
    communication per rank by kind, its total per step and per run, and with ``trace`` the traced
    per-rank peak of one denoising forward (plan_memory of the rank's stage: its batch under
    CFG-parallel, its weights under sharding; under ring/Ulysses the tracer runs the whole
    forward, so that figure is an upper bound of what one rank holds with N/P tokens)."""
    from longcat_native.pipelines.budget import Stage, dit_device_bytes, plan_memory

    spec = SIZES[size]
    cfg = resolve_config(spec["preset"], spec["overrides"])
    latent, batch, bsa = spec["latent"], spec["batch"], spec["bsa"]
    guided = batch == 2  # the 480p base runs CFG (batch 2); the refinement does not
    pt, ph, pw = cfg.patch_size
    grid = (latent[0] // pt, latent[1] // ph, latent[2] // pw)
    steps = MODE_STEPS.get(size, 50)
    rows, records = [], {}
    for name, u, r, c, d, shard in MODE_LAYOUTS:
        world = u * r * c * d
        why = layout_problem(cfg, u, r, grid, bsa)
        if why is None and c > 1 and not guided:
            why = "no CFG in this stage (batch 1): the cfg rank has nothing to do"
        key = name.replace(" x ", "_").replace(" ", "").replace("(", "_").replace(")", "").replace("GPU", "")
        if why:
            rows.append([name, world, f"refused: {why}"] + [None] * (len(COMM_KINDS) + 3 + int(trace)))
            records[key] = {"refused": why}
            continue
        wb = dit_device_bytes(cfg, dtype, quantize, shard_ranks=world if shard else 1)["total"]
        comm = step_comm_bytes(cfg, u, r, c, world if shard else 1, batch, latent, guided, dtype, quantize)
        rec = {"world_size": world, "weights_gib_per_rank": wb / 2**30,
               **{f"{k}_mib_per_step_per_rank": comm[k] / 2**20 for k in COMM_KINDS},
               "comm_gib_per_step_per_rank": comm["total"] / 2**30,
               "comm_gib_per_run_per_rank": comm["total"] * steps / 2**30}
        row = [name, world, wb / 2**30] + [comm[k] / 2**20 for k in COMM_KINDS] + [comm["total"] / 2**30,
                                                                                   comm["total"] * steps / 2**30]
        if trace:
            b_rank = batch // c if guided else batch
            stage = Stage(f"denoise_{size}", "denoise", batch=b_rank, latent=latent, bsa=bsa)
            plan = plan_memory(10**15, dit_config=cfg, quantize=quantize, dtype=dtype, stages=[stage],
                               allow_chunking=False, shard_ranks=world if shard else 1)
            peak = plan.stages[0].device_bytes / 2**30
            rec["peak_gib_per_rank_traced"] = peak
            rec["peak_is_upper_bound"] = u * r > 1
            row.append(f"{peak:.2f}" + (" (<=, whole forward)" if u * r > 1 else ""))
        rows.append(row)
        records[key] = rec
    headers = (["layout", "world", "weights/rank GiB"] + [f"{k} MiB/step" for k in COMM_KINDS]
               + ["comm GiB/step/rank", f"comm GiB/{steps} steps/rank"] + (["peak/rank GiB (traced)"] if trace else []))
    return headers, rows, records, steps


class _CollectiveCounter:
    """Counts the bytes rank's collectives move, by kind, from the ops themselves (a
    TorchDispatchMode sees every functional and c10d collective): an all-to-all sends its input
    but the rank's own chunk (the ring's permute is an all-to-all with one destination); an
    all-gather receives its input from every peer; FSDP2's c10d all-gathers receive the output
    but the rank's own input. The kind is the op's and the process group's: ``kinds[op]`` maps group names
    ("all_to_all", "all_gather"); anything else counts as "other"."""

    def __init__(self, kinds):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.kinds, self.bytes = kinds, {}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter._see(func, args)
                return func(*args, **(kwargs or {}))

        self.mode = _Mode()

    def _add(self, kind, n):
        self.bytes[kind] = self.bytes.get(kind, 0) + int(n)

    def _see(self, func, args):
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group

        name = func.name()
        if name.startswith("_c10d_functional::"):
            op = name.split("::")[1]
            if op == "all_to_all_single":
                x, _, splits, group = args[:4]
                pg = _resolve_process_group(group)
                nb, me = x.numel() * x.element_size(), dist.get_rank(pg)
                if splits is None:
                    own = nb // dist.get_world_size(pg)
                else:
                    own = splits[me] * (nb // max(x.shape[0], 1))
                self._add(self.kinds["all_to_all"].get(group, "other"), nb - own)
            elif op == "all_gather_into_tensor":
                x, n, group = args[:3]
                self._add(self.kinds["all_gather"].get(group, "other"), x.numel() * x.element_size() * (n - 1))
            elif op not in ("wait_tensor", "_wrap_tensor_autograd"):
                self._add("other", sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor)))
        elif name.startswith("c10d::") and "allgather" in name:
            out, inp = args[0], args[1]
            flat = lambda t: sum(v.numel() * v.element_size() for v in t) if isinstance(t, (list, tuple)) else (  # noqa
                t.numel() * t.element_size())
            self._add("fsdp", flat(out) - flat(inp))

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def count_run(world: int):
    """Under torchrun (gloo on CPU): for each layout of COUNT_LAYOUTS[world], the tiny model's
    bytes per denoising step per rank, counted (collectives seen by _CollectiveCounter, and
    ``Parallel.comm_bytes["cfg"]``), beside step_comm_bytes for the same shapes. A step is the
    difference of a 3-step and a 2-step run (so the once-per-run exchanges, such as the input
    broadcast and DP's final gather, drop out). Every rank checks its own count against rank 0's
    formula (FSDP's rows: rank 0 holds the most, so ranks compare their own share)."""
    import torch.distributed as dist

    import longcat_native as lcn
    from longcat_native.pipelines.sampler import denoise

    layouts = COUNT_LAYOUTS.get(world)
    if layouts is None:
        raise SystemExit(f"--count has layouts for {sorted(COUNT_LAYOUTS)} ranks, not {world}")
    latent, L = (2, 8, 8), 8
    results = {}
    for name, u, r, c, d, shard in layouts:
        dit = lcn.LongCatDiT.from_config("tiny", seed=0, kernels="reference", attention="sdpa", cp_size=u,
                                         ring_size=r, cfg_parallel=c > 1, dp_size=d, shard_weights=shard)
        par, cfgm = dit.parallel, dit.config
        kinds = {"all_to_all": {}, "all_gather": {}}
        for op, dim, kind in (("all_to_all", "ulysses", "ulysses"), ("all_to_all", "ring", "ring_kv"),
                              ("all_gather", "cfg", "cfg"), ("all_gather", "dp", "dp")):
            if par.size(dim) > 1:
                kinds[op][par.group(dim).group_name] = kind
        if dit.cp is not None:  # the output gather runs over every ring x Ulysses rank
            kinds["all_gather"][dit.cp.group.group_name] = "cp_output_gather"
        g = torch.Generator().manual_seed(2)
        noise = torch.randn(d, cfgm.in_channels, *latent, generator=g)
        pe, ne = (torch.randn(d, 1, L, cfgm.caption_channels, generator=g) for _ in range(2))
        mask = torch.ones(d, L, dtype=torch.long)
        counted = []
        for steps in (2, 3):
            par.comm_bytes.clear()
            with torch.inference_mode(), _CollectiveCounter(kinds) as cc:
                denoise(dit, noise, pe, mask, ne, mask, num_steps=steps, guidance_scale=4.0, progress=False)
            cc.bytes.pop("cfg", None)  # the CFG gather is Parallel.all_gather's: its own counter
            cc.bytes.pop("dp", None)
            counted.append({**cc.bytes, "cfg": par.comm_bytes.get("cfg", 0)})
        step = {k: counted[1].get(k, 0) - counted[0].get(k, 0) for k in set(counted[0]) | set(counted[1])}
        comp = step_comm_bytes(cfgm, u, r, c, world if shard else 1, 2, latent, True, dit.dtype)
        step = {k: step.get(k, 0) for k in COMM_KINDS + ("other",)}
        results[name] = {"counted": step, "computed": {k: comp[k] for k in COMM_KINDS},
                         "match": all(step[k] == comp[k] for k in COMM_KINDS) and not step["other"]}
        del dit
        dist.barrier()
    return results


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


def _count_main(world: int) -> int:
    import torch.distributed as dist

    if world < 2:
        raise SystemExit("--count needs torchrun --nproc-per-node 2 (or 4): it counts the collectives of parallel runs")
    results = count_run(world)
    ok = all(r["match"] for r in results.values())
    if dist.get_rank() == 0:
        rows = [[name, k, r["counted"][k], r["computed"][k], "yes" if r["counted"][k] == r["computed"][k] else "NO"]
                for name, r in results.items() for k in COMM_KINDS if r["counted"][k] or r["computed"][k]]
        rows += [[name, "other", r["counted"]["other"], 0, "NO"] for name, r in results.items() if r["counted"]["other"]]
        print_table(["layout", "kind", "counted B/step", "computed B/step", "equal"], rows,
                    title=f"tiny model, {world} gloo ranks: bytes rank 0 exchanges per denoising step")
        record = {"bench": "parallel", "mode": "count", "world_size": world, "count_matches_formula": ok}
        for name, r in results.items():
            key = name.replace(" x ", "_").replace(" ", "").replace("(", "_").replace(")", "")
            record[f"count_{key}_counted_bytes_per_step"] = sum(r["counted"][k] for k in COMM_KINDS)
            record[f"count_{key}_computed_bytes_per_step"] = sum(r["computed"].values())
        emit_json(record)
    return 0 if ok else 1


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
    p.add_argument("--mode-sizes", default="480p,720p", help="shapes of the per-mode table")
    p.add_argument("--mode-trace", action="store_true",
                   help="per-mode table with each layout's traced per-rank denoising peak (~a minute or two on CPU)")
    p.add_argument("--count", action="store_true",
                   help="under torchrun (2 or 4 CPU/gloo ranks): count the tiny model's collectives per denoising "
                        "step for each layout and compare with the per-mode formula; nothing else runs")
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

    if args.count:
        return _count_main(world)
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
    for size in args.mode_sizes.split(","):
        headers_m, rows_m, recs_m, steps = mode_rows(size, args.mode_trace)
        spec = SIZES[size]
        print_table(headers_m, [[fmt_num(v) if not isinstance(v, str) else v for v in r] for r in rows_m],
                    title=f"per mode, {size} (batch {spec['batch']}{', CFG' if spec['batch'] == 2 else ', no CFG'}"
                          f"{', BSA' if spec['bsa'] else ''}, {steps} steps), real config, bf16, per rank: computed "
                          "bytes (counted == computed on the tiny model: --count)"
                          + ("; peak traced (1 GiB overhead; '<=' = the whole forward, an upper bound of a "
                             "context-parallel rank's)" if args.mode_trace else ""))
        for k, rec in recs_m.items():
            for f, v in rec.items():
                if f != "refused":
                    record[f"{size}_{k}_{f}"] = v
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
