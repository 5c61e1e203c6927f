"""One full DiT block: reference ops vs fused ops (and torch.compile of the reference).

    python bench/block.py                        # GPU: real width (C 4096, 32 heads), 480p tokens
    python bench/block.py --size 720p --repeats 5
    python bench/block.py --per-op               # also print the per-op launch/byte breakdown

What is timed is one iteration of ``LongCatTransformer.run``'s block loop, i.e. the steady-state
cost of a block::

    x, ffn_out, gate_mlp, _ = block([x, h], mod, ctx, ops)     # self-attn, cross-attn, FFN
    mod = block.modulation(t)                                   # the next block's adaLN
    x, h = ops.residual_layernorm_modulate(x, ffn_out, gate_mlp, mod[0], mod[1])

with the same block weights and inputs for every path: ``reference`` (eager plain-PyTorch ops),
``compile`` (``torch.compile`` of the reference iteration) and ``fused`` (the Triton ops).
Attention is SDPA in every path (the kernels under test are the ones around the GEMMs).

Columns: median time per block; TFLOP/s = analytic GEMM + attention FLOPs / time (see
:func:`block_flops`); launches and bytes moved outside GEMMs/attention per block, from the
dispatch counters of ``longcat_native.benchmarking.harness.DispatchCounter`` (an eager count;
torch.compile'd code is not counted by the dispatcher, on CUDA its real kernels are counted with
torch.profiler).
Targets: fused bytes <= 40% of the reference's, <= 12 launches per block.
The last printed line is one JSON object (``{"bench": "block", ...}``).
"""

from __future__ import annotations

import argparse
import sys


SIZES = {
    # preset + overrides, batch, latent grid after patchify, text tokens
    "small": dict(preset="tiny", overrides=dict(hidden_size=256, num_heads=4, depth=1), batch=1,
                  grid=(2, 4, 4), text=16),
    "480p": dict(preset="longcat-video", overrides=dict(depth=1), batch=1, grid=(24, 30, 52), text=512),
    "720p": dict(preset="longcat-video", overrides=dict(depth=1), batch=1, grid=(48, 44, 80), text=512),
}

BYTES_TARGET_RATIO = 0.40
LAUNCH_TARGET = 12

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}


def block_flops(B: int, N: int, L: int, C: int, F: int, C_t: int, T: int, Nk: int = None) -> int:
    """GEMM + attention FLOPs of one block iteration (multiply-add = 2 FLOPs).

    N tokens (all take part in cross-attention: no conditioning tokens), Nk self-attention keys
    (N, plus cached tokens with a KV cache), L text tokens, C hidden, F FFN hidden, C_t adaLN
    input width, T latent frames:

      self-attn   qkv 2*N*C*3C + QK^T and PV 4*N*Nk*C + proj 2*N*C*C
      cross-attn  q 2*N*C*C + kv (text) 2*L*C*2C + QK^T and PV 4*N*L*C + proj 2*N*C*C
      FFN         w1|w3 2*N*C*2F + w2 2*N*F*C
      adaLN       2*T*C_t*6C (the next block's modulation, part of the timed iteration)

    all times B. Per token this is docs/workloads.md's 2*(4C^2 + 2C^2 + 3*C*F) + 4*N*C (+ the text
    terms). Element-wise work (norms, RoPE, SwiGLU, residuals) is not counted.
    """
    Nk = N if Nk is None else Nk
    self_attn = 2 * N * C * 3 * C + 4 * N * Nk * C + 2 * N * C * C
    cross = 2 * N * C * C + 2 * L * C * 2 * C + 4 * N * L * C + 2 * N * C * C
    ffn = 2 * N * C * 2 * F + 2 * N * F * C
    adaln = 2 * T * C_t * 6 * C
    return B * (self_attn + cross + ffn + adaln)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 480p on CUDA, small on CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=None, help="override the width C")
    p.add_argument("--num-heads", type=int, default=None, help="override the head count")
    p.add_argument("--text-tokens", type=int, default=None, help="text length L (default 512, small: 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warmup iterations (default 3 GPU, 1 CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--count-only", action="store_true",
                   help="only count launches and bytes, with fake tensors (any size on any machine, no timing)")
    p.add_argument("--per-op", action="store_true", help="print the per-op launch/byte breakdown of each path")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from longcat_native.benchmarking.harness import (
        count_cuda_kernels,
        count_ops,
        default_device,
        device_name,
        emit_json,
        fmt_num,
        load_ops,
        print_table,
        setup_triton_env,
        time_fn,
        try_compile,
    )

    has_cuda = setup_triton_env()  # before longcat_native imports triton
    import contextlib

    import torch

    stack = contextlib.ExitStack()

    from longcat_native.runtime.config import resolve_config
    from longcat_native.runtime.model import ForwardContext, LongCatBlock

    device = default_device()
    size = args.size or ("480p" if has_cuda else "small")
    spec = SIZES[size]
    overrides = dict(spec["overrides"])
    if args.hidden_size is not None:
        overrides["hidden_size"] = args.hidden_size
    if args.num_heads is not None:
        overrides["num_heads"] = args.num_heads
    cfg = resolve_config(spec["preset"], overrides)
    dtype = getattr(torch, DTYPES[args.dtype])
    B = args.batch if args.batch is not None else spec["batch"]
    T, Hp, Wp = spec["grid"]
    N = T * Hp * Wp
    L = args.text_tokens if args.text_tokens is not None else spec["text"]
    C, Fh, Ct = cfg.hidden_size, cfg.ffn_hidden_size, cfg.adaln_tembed_dim
    repeats = args.repeats if args.repeats is not None else (10 if has_cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if has_cuda else 1)

    ref_ops, fused_ops, ops_source = load_ops()
    dev_name = device_name(device)
    print(f"device: {dev_name}" + ("" if has_cuda else "  (fused kernels run under the triton interpreter)"))
    print(f"block {size}: batch {B}, grid {T}x{Hp}x{Wp} = {N:,} tokens, text {L}, C {C}, heads {cfg.num_heads} "
          f"x {cfg.head_dim}, FFN {Fh}, adaLN in {Ct}, dtype {DTYPES[args.dtype]}, repeats {repeats}")
    print(f"fused ops from: {ops_source}", flush=True)

    count_only = args.count_only
    if count_only:
        # Fake tensors (shapes, dtypes, no data): fused custom ops run their register_fake
        # implementations, so real-size counts need neither a GPU nor the memory.
        from torch._subclasses.fake_tensor import FakeTensorMode

        print("count only: fake tensors, nothing is executed or timed", flush=True)
        stack.enter_context(FakeTensorMode())
    flops = block_flops(B, N, L, C, Fh, Ct, T)
    results = {}
    compile_error = None
    max_diff = ref_scale = None

    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the weights directly in the model dtype
    try:
        with torch.device(device):
            block = LongCatBlock(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    block = block.eval().requires_grad_(False)

    def rnd(*s, dt=dtype):
        if count_only:
            return torch.empty(*s, dtype=dt, device=device)
        return torch.randn(*s, generator=gen, dtype=dt, device=device)

    gen = None if count_only else torch.Generator(device=device).manual_seed(1)
    x0 = rnd(B, N, C)
    t = rnd(B, T, Ct, dt=torch.float32)  # timestep embedding per frame, float32
    text = rnd(B, L, C)
    ctx = ForwardContext(grid=(T, Hp, Wp), cache_grid=(0, Hp, Wp), cache_frames=0, num_cond_tokens=0, text=text,
                         text_valid=None, skip_crs_attn=False, return_kv=False, attention="sdpa")

    with torch.no_grad():
        mod0 = block.modulation(t)
        h0 = ref_ops.layernorm_modulate(x0, mod0[0], mod0[1])

    # One iteration of the runtime's block loop; ``mod`` is this block's adaLN (the caller computed
    # it in the previous iteration), the next block's is computed inside.
    def make_iter(ops):
        def it(x, h, mod):
            x, ffn_out, gate_mlp, _ = block([x, h], mod, ctx, ops)  # the block frees x and h as it goes
            nxt = block.modulation(t)
            return ops.residual_layernorm_modulate(x, ffn_out, gate_mlp, nxt[0], nxt[1])

        return it

    ref_iter, fused_iter = make_iter(ref_ops), make_iter(fused_ops)

    with torch.no_grad():
        if not count_only:
            out_ref = ref_iter(x0, h0, mod0)
            out_fused = fused_iter(x0, h0, mod0)
            max_diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(out_ref, out_fused))
            ref_scale = max(float(a.float().abs().max()) for a in out_ref)
            del out_ref, out_fused

        for name, fn in (("reference", ref_iter), ("fused", fused_iter)):
            c = count_ops(lambda: fn(x0, h0, mod0))
            r = results[name] = dict(seconds=None, counter=c, cuda_kernels=None)
            if not count_only:
                r["seconds"] = time_fn(lambda: fn(x0, h0, mod0), device, repeats, warmup, name=f"block/{name}")
                r["cuda_kernels"] = count_cuda_kernels(lambda: fn(x0, h0, mod0))
            print(f"  {name}: " + ("" if count_only else f"{r['seconds'] * 1e3:,.3f} ms, ")
                  + f"{c.launches} launches, {c.bytes / 1e6:,.3f} MB outside GEMM/attn", flush=True)

        if count_only:
            compile_error = "skipped (--count-only)"
        elif args.no_compile:
            compile_error = "skipped (--no-compile)"
        else:
            compiled, compile_error, compile_s = try_compile(ref_iter, lambda f: f(x0, h0, mod0), dynamic=False)
            if compiled is not None:
                sec = time_fn(lambda: compiled(x0, h0, mod0), device, repeats, warmup, name="block/compile")
                results["compile"] = dict(seconds=sec, counter=None, compile_s=compile_s,
                                          cuda_kernels=count_cuda_kernels(lambda: compiled(x0, h0, mod0)))
                print(f"  compile: {sec * 1e3:,.3f} ms (compiled in {compile_s:.1f} s)", flush=True)
        if compile_error:
            print(f"  compile: n/a ({compile_error})", flush=True)
    stack.close()

    ref_c, fused_c = results["reference"]["counter"], results["fused"]["counter"]
    t_ref, t_fused = results["reference"]["seconds"], results["fused"]["seconds"]
    t_comp = results.get("compile", {}).get("seconds")

    def ratio(a, b):
        return None if a is None or b is None else a / b
    bytes_ratio = fused_c.bytes / ref_c.bytes if ref_c.bytes else float("nan")

    def outside(c):
        return c.launches - c.launches_by_category.get("gemm", 0) - c.launches_by_category.get("attention", 0)

    rows = []
    for name, label in (("reference", "reference (eager)"), ("compile", "reference (torch.compile)"),
                        ("fused", "fused (triton)")):
        r = results.get(name)
        if r is None:
            rows.append([label] + ["n/a"] * 8)
            continue
        c = r["counter"]
        sec = r["seconds"]
        rows.append([
            label, None if sec is None else sec * 1e3, ratio(flops / 1e12, sec),
            "n/a" if c is None else c.launches,
            "n/a" if c is None else outside(c),
            "n/a" if r["cuda_kernels"] is None else r["cuda_kernels"],
            "n/a" if c is None else c.bytes / 1e6,
            "n/a" if c is None else c.bytes / ref_c.bytes,
            ratio(t_ref, sec),
        ])
    print()
    print_table(
        ["path", "ms/block", "TFLOP/s", "launches", "non-GEMM/attn", "CUDA kernels", "MB moved*", "bytes vs ref",
         "speedup"],
        rows,
        title=f"one DiT block, {size}, {DTYPES[args.dtype]}, {flops / 1e12:,.4g} TFLOP per block "
              f"(speedup = reference eager time / path time)",
    )
    print("* bytes read + written by ops outside GEMMs and attention (dispatch counter model, bench/README.md)")
    by_cat = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.launches_by_category.items()))  # noqa: E731
    print(f"launches by category: reference [{by_cat(ref_c)}]; fused [{by_cat(fused_c)}]")
    bytes_met = bytes_ratio <= BYTES_TARGET_RATIO
    launches_met = fused_c.launches <= LAUNCH_TARGET
    outside_met = outside(fused_c) <= LAUNCH_TARGET
    print(f"target fused bytes <= {BYTES_TARGET_RATIO:.0%} of reference: {bytes_ratio:.1%} -> "
          f"{'met' if bytes_met else 'NOT met'}")
    print(f"target fused launches <= {LAUNCH_TARGET} per block: all dispatched ops (GEMMs and attention included) "
          f"{fused_c.launches} -> {'met' if launches_met else 'NOT met'}; outside GEMMs/attention "
          f"{outside(fused_c)} -> {'met' if outside_met else 'NOT met'}")
    if max_diff is not None:
        print(f"fused vs reference block outputs: max |diff| {fmt_num(max_diff)} (max |ref| {fmt_num(ref_scale)})")

    if args.per_op:
        for name in ("reference", "fused"):
            c = results[name]["counter"]
            print()
            print_table(["op", "count", "MB moved"], [[op, n, b / 1e6] for op, n, b in c.op_rows()],
                        title=f"{name}: dispatched ops per block (views and allocations not listed)")

    record = {
        "bench": "block",
        "device": dev_name,
        "size": size,
        "dtype": DTYPES[args.dtype],
        "batch": B,
        "tokens": N,
        "text_tokens": L,
        "hidden_size": C,
        "num_heads": cfg.num_heads,
        "ffn_hidden_size": Fh,
        "triton_interpreter": not has_cuda,
        "repeats": repeats,
        "flops_per_block": flops,
        "count_only": count_only,
        "reference_ms": ratio(t_ref, 1e-3),
        "fused_ms": ratio(t_fused, 1e-3),
        "compile_ms": ratio(t_comp, 1e-3),
        "reference_tflops": ratio(flops / 1e12, t_ref),
        "fused_tflops": ratio(flops / 1e12, t_fused),
        "compile_tflops": ratio(flops / 1e12, t_comp),
        "reference_bytes_per_block": ref_c.bytes,
        "fused_bytes_per_block": fused_c.bytes,
        "fused_vs_reference_bytes_ratio": bytes_ratio,
        "bytes_target_ratio": BYTES_TARGET_RATIO,
        "bytes_target_met": bytes_met,
        "launches_per_block_reference": ref_c.launches,
        "launches_per_block_fused": fused_c.launches,
        "launches_outside_gemm_attention_reference": outside(ref_c),
        "launches_outside_gemm_attention_fused": outside(fused_c),
        "launch_target": LAUNCH_TARGET,
        "launches_target_met": launches_met,
        "launches_outside_gemm_attention_target_met": outside_met,
        "cuda_kernels_per_block_reference": results["reference"]["cuda_kernels"],
        "cuda_kernels_per_block_fused": results["fused"]["cuda_kernels"],
        "cuda_kernels_per_block_compile": results.get("compile", {}).get("cuda_kernels"),
        "fused_vs_eager_speedup": ratio(t_ref, t_fused),
        "fused_vs_compile_speedup": ratio(t_comp, t_fused),
        "fused_vs_reference_max_abs_diff": max_diff,
    }
    if compile_error:
        record["compile_error"] = compile_error
    emit_json(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
