"""Step caching (DBCache / TaylorSeer, docs/design/step_cache.md): wall time with and without the
cache in one run, block forwards saved, and the deviation of the final latents, for a sweep of
thresholds.

    python bench/step_cache.py                 # CPU: tiny preset widened (C 256, depth 10), 12 steps
    python bench/step_cache.py --real          # GPU: the real config (C 4096, depth 48), bf16, 480p-like latent
    python bench/step_cache.py --thresholds 0.1 0.3 0.6 --taylorseer --steps 20

Each row denoises the same noise and text with CFG (batch 2), ``--repeats`` times (best kept),
the uncached run interleaved; on CUDA both replay CUDA graphs (``denoise``'s default). Columns: threshold, cached steps, block forwards saved (fraction),
seconds (cached / uncached), measured time saved, speed-up, relative L2 of the final latents to
the uncached run. Then the device memory the cache costs, traced on fake tensors at the same
shape. Random weights: the signal of a trained model differs (check per model and
prompt). The last printed line is one JSON object (``{"bench": "step_cache", ...}``).
"""

from __future__ import annotations

import argparse
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="the real config on the GPU (default: CPU-sized)")
    p.add_argument("--thresholds", type=float, nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--fn", type=int, default=1)
    p.add_argument("--bn", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--taylorseer", action="store_true")
    p.add_argument("--order", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--latent", type=int, nargs=3, default=None, metavar=("T", "H", "W"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from longcat_native.benchmarking.harness import default_device, device_name, emit_json, print_table, setup_triton_env, sync

    has_cuda = setup_triton_env()
    import torch

    import longcat_native as lcn

    device = default_device()
    if args.real:
        preset, over, dtype, latent, text = "longcat-video", {}, torch.bfloat16, (8, 60, 104), 256
        steps, thresholds, repeats = 20, [0.05, 0.08, 0.12, 0.2], 1
    else:
        preset, over, dtype, latent, text = "tiny", dict(hidden_size=256, num_heads=4, depth=10), torch.float32, (4, 16, 16), 8
        steps, thresholds, repeats = 12, [0.3, 0.45, 0.6], 2
    if args.depth is not None:
        over["depth"] = args.depth
    latent = tuple(args.latent or latent)
    steps = args.steps or steps
    thresholds = args.thresholds or thresholds
    repeats = args.repeats or repeats
    dit = lcn.LongCatDiT.from_config(preset, device=device, dtype=dtype, seed=0, **over)
    cfg = dit.config
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, cfg.in_channels, *latent, generator=g)
    pe = torch.randn(1, 1, text, cfg.caption_channels, generator=g).to(dtype)
    ne = torch.randn(1, 1, text, cfg.caption_channels, generator=g).to(dtype)

    def run(cache=None):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = lcn.denoise(dit, noise, pe, None, ne, None, num_steps=steps, progress=False, cache=cache)
        sync(device)
        return out, time.perf_counter() - t0

    run()  # warm-up
    rows, records = [], []
    for thr in thresholds:
        best_full = best_cached = float("inf")
        for _ in range(repeats):
            base, t_full = run()
            cache = lcn.StepCache(Fn_compute_blocks=args.fn, Bn_compute_blocks=args.bn, residual_diff_threshold=thr,
                                  max_warmup_steps=args.warmup, enable_taylorseer=args.taylorseer,
                                  taylorseer_order=args.order)
            out, t_cached = run(cache)
            best_full, best_cached = min(best_full, t_full), min(best_cached, t_cached)
        st = cache.stats
        rel = float((out - base).norm() / base.norm())
        saved_t = 1 - best_cached / best_full
        rows.append([thr, f"{st['cached_steps']}/{st['steps']}", f"{st['block_forwards_saved']} ({st['saved_fraction']:.1%})",
                     f"{best_cached:.3f} / {best_full:.3f}", f"{saved_t:.1%}", f"{best_full / best_cached:.2f}x", f"{rel:.3g}"])
        records.append(dict(threshold=thr, cached_steps=st["cached_steps"], saved_fraction=st["saved_fraction"],
                            time_saved_fraction=saved_t, speedup_x=best_full / best_cached, latents_rel_l2=rel,
                            cached_s=best_cached, uncached_s=best_full))
    print_table(["threshold", "cached", "block fwd saved", "s cached / uncached", "time saved", "speed-up",
                 "latents rel L2"], rows,
                title=f"step cache F{args.fn}B{args.bn}{' + TaylorSeer' if args.taylorseer else ''}, "
                      f"{preset} C{cfg.hidden_size} depth {cfg.depth}, latent {latent}, {steps} steps, {device_name(device)}")
    # Device memory, traced on fake tensors at this shape (device-independent): the plain forward's
    # activation peak, the cached run's, and the cache's buffers within it.
    from longcat_native.runtime.memory import trace_forward_memory

    mem_kw = dict(batch=2, latent=latent, text_len=text, dtype=dtype, config_overrides=over)
    plain_mem = trace_forward_memory(preset, **mem_kw)
    cache_mem = trace_forward_memory(preset, step_cache=cache, **mem_kw)
    print(f"traced device memory (CFG batch 2): activation peak {plain_mem['activation_peak'] / 2**20:.2f} MiB "
          f"without the cache, {cache_mem['activation_peak'] / 2**20:.2f} MiB with it, of which "
          f"{cache_mem['step_cache_bytes'] / 2**20:.2f} MiB its buffers")
    best = max(records, key=lambda r: r["speedup_x"])
    # On CUDA denoise replays CUDA graphs (a cached step in parts: docs/design/step_cache.md).
    runner = getattr(dit, "graph_runner", None)
    graphs = runner.stats() if runner is not None else None
    emit_json({"bench": "step_cache", "device": device_name(device), "config": f"{preset}-C{cfg.hidden_size}-D{cfg.depth}",
               "cuda_graphs": graphs is not None, "graph_captures": graphs["captures"] if graphs else 0,
               "steps": steps, "best_threshold": best["threshold"], "best_speedup_x": best["speedup_x"],
               "best_saved_fraction": best["saved_fraction"], "best_time_saved_fraction": best["time_saved_fraction"],
               "best_latents_rel_l2": best["latents_rel_l2"], "uncached_s": best["uncached_s"],
               "cached_s": best["cached_s"], "activation_peak_bytes": plain_mem["activation_peak"],
               "cached_activation_peak_bytes": cache_mem["activation_peak"],
               "step_cache_buffer_bytes": cache_mem["step_cache_bytes"], "rows": records})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
