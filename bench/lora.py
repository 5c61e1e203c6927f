"""LoRA cost: merge, restore and switch times, and the per-step overhead of unmerged vs merged.

    python bench/lora.py                      # GPU: the real config (C 4096, depth 48), bf16, rank 128
    python bench/lora.py --size small         # the CPU default: C 512, depth 2 (runs in seconds)
    python bench/lora.py --rank 64 --latent 8 60 104 --repeats 5

Two random LoRAs A and B of rank ``--rank`` over the official cfg_step target set (every block's
attn.qkv with 3 parallel up blocks, attn.proj, cross_attn.q_linear, cross_attn.kv_linear with 2,
cross_attn.proj, ffn.w1/w2/w3), stored in bfloat16 in the official file format, loaded with
``dit.load_lora``. Timed (wall clock, device synchronized; medians over ``--repeats``):

- ``load``: ``load_lora`` of one file (read + checks; nothing touches the model);
- ``first merge``: ``enable_loras(["A"])`` on a fresh model: includes the exact host copy of every
  touched weight (device -> host), taken once and kept;
- ``merge``: ``enable_loras(["A"])`` from the base model once the copies exist (steady state);
- ``restore``: ``disable_all_loras()`` after a merge (host -> device copy of the touched weights);
- ``switch A -> B``: ``enable_loras(["B"])`` with A merged; ``merge A+B``: both at once;
- ``unmerged enable / disable``: the same with ``dit.lora_mode = "unmerged"`` (branch weights to
  the device in the model dtype / dropped).

Per step: one forward at a small latent (``--latent T H W``, ``--text`` tokens, batch 1) with no
LoRA, with A merged and with A unmerged; ``unmerged_vs_merged_step_overhead`` is
``unmerged / merged - 1``. The last printed line is one JSON object (``{"bench": "lora", ...}``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


SIZES = {
    # preset + overrides; step latent (T, H, W) before the 1x2x2 patch; text tokens
    "real": dict(preset="longcat-video", overrides={}, latent=(4, 60, 104), text=256),
    "small": dict(preset="tiny", overrides=dict(hidden_size=512, num_heads=4, depth=2), latent=(2, 8, 8), text=16),
}
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}
TARGETS = {  # official module (under blocks.i.) -> parallel up blocks, as the cfg_step LoRA
    "attn.qkv": 3, "attn.proj": 1, "cross_attn.q_linear": 1, "cross_attn.kv_linear": 2, "cross_attn.proj": 1,
    "ffn.w1": 1, "ffn.w2": 1, "ffn.w3": 1,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: real on CUDA, small on CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--latent", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
                   help="step latent frames/height/width (default real 4 60 104, small 2 8 8)")
    p.add_argument("--text", type=int, default=None, help="text tokens of the step (default real 256, small 16)")
    p.add_argument("--depth", type=int, default=None, help="override the number of blocks")
    p.add_argument("--kernels", default=None, help="model kernel path (default: auto on CUDA, reference on CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5 GPU, 3 CPU)")
    return p.parse_args(argv)


def random_lora_state_dict(cfg, rank, seed, dtype):
    """The official LoRA layout over TARGETS in every block; small random values (bf16 like the
    released files). Built with a CPU generator: the values do not matter, the shapes do."""
    import torch

    from longcat_native.runtime.lora import encode_lora_name

    C, Fh = cfg.hidden_size, cfg.ffn_hidden_size
    shapes = {"attn.qkv": (3 * C, C), "attn.proj": (C, C), "cross_attn.q_linear": (C, C),
              "cross_attn.kv_linear": (2 * C, C), "cross_attn.proj": (C, C), "ffn.w1": (Fh, C), "ffn.w2": (C, Fh),
              "ffn.w3": (Fh, C)}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(cfg.depth):
        for name, n in TARGETS.items():
            out, fin = shapes[name]
            stem = encode_lora_name(f"blocks.{i}.{name}")
            sd[stem + ".lora_down.weight"] = (torch.randn(n * rank, fin, generator=g) * fin**-0.5).to(dtype)
            ups = [(torch.randn(out // n, rank, generator=g) * 0.1 * rank**-0.5).to(dtype) for _ in range(n)]
            if n == 1:
                sd[stem + ".lora_up.weight"] = ups[0]
            else:
                for j, u in enumerate(ups):
                    sd[stem + f".lora_up.blocks.{j}.weight"] = u
            sd[stem + ".alpha_scale"] = torch.tensor(0.5, dtype=torch.float32)
    return sd


def main(argv=None) -> int:
    args = parse_args(argv)
    from longcat_native.benchmarking.harness import (default_device, device_name, emit_json, print_table, setup_triton_env,
                                              sync, time_fn)

    has_cuda = setup_triton_env()  # before longcat_native imports triton
    import statistics

    import torch
    from safetensors.torch import save_file

    import longcat_native as lcn
    from longcat_native.runtime import lora as lora_mod

    device = default_device()
    size = args.size or ("real" if has_cuda else "small")
    spec = SIZES[size]
    dtype = getattr(torch, DTYPES[args.dtype])
    kernels = args.kernels or ("auto" if has_cuda else "reference")
    repeats = args.repeats if args.repeats is not None else (5 if has_cuda else 3)
    T, H, W = args.latent or spec["latent"]
    L = args.text if args.text is not None else spec["text"]
    dev_name = device_name(device)

    t0 = time.perf_counter()
    overrides = dict(spec["overrides"])
    if args.depth is not None:
        overrides["depth"] = args.depth
    dit = lcn.LongCatDiT.from_config(spec["preset"], device=device, dtype=dtype, kernels=kernels, **overrides)
    sync(device)
    cfg = dit.config
    print(f"device: {dev_name}")
    print(f"model {size}: C {cfg.hidden_size}, depth {cfg.depth}, FFN {cfg.ffn_hidden_size}, {dtype}, kernels "
          f"{dit.resolved_kernels()}, {dit.num_parameters() / 1e9:.3f} B params "
          f"(built in {time.perf_counter() - t0:.1f} s)",
          flush=True)

    def timed(fn):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t

    def median_ms(samples):
        return statistics.median(samples) * 1e3

    with tempfile.TemporaryDirectory(prefix="lcn_lora_bench_") as tmp:
        paths = {}
        for key, seed in (("A", 1), ("B", 2)):
            sd = random_lora_state_dict(cfg, args.rank, seed, torch.bfloat16)
            paths[key] = os.path.join(tmp, f"{key}.safetensors")
            save_file(sd, paths[key])
            del sd
        load_s = [timed(lambda: dit.load_lora(paths["A"], "A", lora_network_dim=args.rank))]
        load_s.append(timed(lambda: dit.load_lora(paths["B"], "B", lora_network_dim=args.rank)))
    lora_params = sum(t.numel() for m in dit.lora_dict["A"].loras for t in [m.down, *m.ups])
    lora_bytes = dit.lora_dict["A"].nbytes()
    print(f"LoRA rank {args.rank}: {len(dit.lora_dict['A'].loras)} modules, {lora_params / 1e6:,.1f} M params, "
          f"{lora_bytes / 1e9:.3f} GB per file (bf16)", flush=True)

    with torch.no_grad():
        first_merge_s = timed(lambda: dit.enable_loras(["A"]))
        touched = sum(p.numel() for n, p in dit.named_parameters() if n in dit.lora_state.merged)
        restore, merge, switch, both = [], [], [], []
        for _ in range(repeats):
            restore.append(timed(dit.disable_all_loras))
            merge.append(timed(lambda: dit.enable_loras(["A"])))
            switch.append(timed(lambda: dit.enable_loras(["B"])))
            both.append(timed(lambda: dit.enable_loras(["A", "B"])))
        dit.disable_all_loras()
        base_copy_bytes = lora_mod.base_copy_bytes(dit)

        dit.lora_mode = "unmerged"
        un_enable, un_disable = [], []
        for _ in range(repeats):
            un_enable.append(timed(lambda: dit.enable_loras(["A"])))
            un_disable.append(timed(dit.disable_all_loras))

        # Per-step cost at a small latent.
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(1, cfg.in_channels, T, H, W, generator=g).to(device)
        t = torch.full((1,), 500.0, device=device)
        text = torch.randn(1, 1, L, cfg.caption_channels, generator=g).to(device)
        step = lambda: dit(x, t, text)  # noqa: E731
        tokens = T * (H // cfg.patch_size[1]) * (W // cfg.patch_size[2])
        step_repeats = max(3, repeats)
        dit.lora_mode = "merged"
        base_step = time_fn(step, device, step_repeats, warmup=2, min_repeat_s=0, name="lora/base")
        dit.enable_loras(["A"])
        merged_step = time_fn(step, device, step_repeats, warmup=2, min_repeat_s=0, name="lora/merged")
        out_merged = step()
        dit.lora_mode = "unmerged"
        unmerged_step = time_fn(step, device, step_repeats, warmup=2, min_repeat_s=0, name="lora/unmerged")
        out_unmerged = step()
        dit.disable_all_loras()
        diff = float((out_merged - out_unmerged).abs().max() / out_merged.abs().max().clamp_min(1e-12))

    overhead = unmerged_step / merged_step - 1.0
    rows = [
        ["load_lora (one file: read + checks, host only)", median_ms(load_s)],
        ["first merge A (+ device->host copy of the touched weights)", first_merge_s * 1e3],
        ["merge A (host copies kept from before)", median_ms(merge)],
        ["restore: disable_all_loras (host->device copy)", median_ms(restore)],
        ["switch A -> B (restore A-only weights, merge B from the originals)", median_ms(switch)],
        ["merge A+B (from B merged)", median_ms(both)],
        ["unmerged enable A (branch weights to the device)", median_ms(un_enable)],
        ["unmerged disable", median_ms(un_disable)],
    ]
    print()
    print_table(["operation", "ms"], rows,
                title=f"LoRA switching, {size}, rank {args.rank}, {DTYPES[args.dtype]}: touched {touched / 1e9:.3f} B "
                      f"params, host copies {base_copy_bytes / 1e9:.3f} GB")
    print()
    print_table(["mode", "ms/step", "vs merged"],
                [["no LoRA", base_step * 1e3, base_step / merged_step], ["merged", merged_step * 1e3, 1.0],
                 ["unmerged", unmerged_step * 1e3, unmerged_step / merged_step]],
                title=f"one forward, batch 1, latent {T}x{H}x{W} ({tokens:,} tokens), text {L}")
    print(f"unmerged vs merged per-step overhead: {overhead:+.1%}; merged vs unmerged outputs: max |diff| "
          f"{diff:.3g} of max |out|")

    emit_json({
        "bench": "lora",
        "device": dev_name,
        "size": size,
        "dtype": DTYPES[args.dtype],
        "kernels": dit.resolved_kernels(),
        "hidden_size": cfg.hidden_size,
        "depth": cfg.depth,
        "rank": args.rank,
        "lora_modules": len(dit.lora_dict["A"].loras),
        "lora_params": lora_params,
        "lora_bytes": lora_bytes,
        "touched_params": touched,
        "base_copy_bytes": base_copy_bytes,
        "repeats": repeats,
        "load_ms": median_ms(load_s),
        "first_merge_ms": first_merge_s * 1e3,
        "merge_ms": median_ms(merge),
        "restore_ms": median_ms(restore),
        "switch_ms": median_ms(switch),
        "merge_two_ms": median_ms(both),
        "unmerged_enable_ms": median_ms(un_enable),
        "unmerged_disable_ms": median_ms(un_disable),
        "step_tokens": tokens,
        "step_text_tokens": L,
        "base_step_ms": base_step * 1e3,
        "merged_step_ms": merged_step * 1e3,
        "unmerged_step_ms": unmerged_step * 1e3,
        "unmerged_vs_merged_step_overhead": overhead,
        "merged_vs_base_step_ratio": merged_step / base_step,
        "merged_vs_unmerged_max_rel_diff": diff,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
