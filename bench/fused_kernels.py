"""Per-kernel benchmark of the fused ops against their eager and torch.compile'd references.

    python bench/fused_kernels.py                      # GPU: 480p shapes; CPU: tiny shapes, triton interpreter
    python bench/fused_kernels.py --size 720p --dtype bfloat16 --repeats 50
    python bench/fused_kernels.py --size small --repeats 1 --no-compile

For each kernel: median time of the fused op, its effective bandwidth (minimal bytes: every input
read once + every output written once, divided by the time), that bandwidth as a percentage of
the measured device copy bandwidth, and its speedup over (a) the eager plain-PyTorch reference
and (b) ``torch.compile`` of that reference, all measured in the same run. The last line printed
is one JSON object (``{"bench": "fused_kernels", ...}``).

Shapes (docs/workloads.md): ``480p`` is 93 frames at 480x832 -> latent grid 24 x 30 x 52 after the
1x2x2 patch = 37,440 tokens; ``720p`` is 48 x 44 x 80 = 168,960 tokens; both C = 4096, 32 heads
of 128, FFN hidden 11008. ``small`` is a 2 x 4 x 4 grid, C = 256, 4 heads, FFN 768 (CPU sized: the
triton interpreter is very slow). On CPU the fused numbers time the triton *interpreter*: they
check that the pipeline runs, not kernel performance.
"""

from __future__ import annotations

import argparse
import sys


SIZES = {
    # batch, latent grid after patchify (T, H, W), hidden C, heads, FFN hidden
    "small": dict(batch=1, grid=(2, 4, 4), hidden=256, heads=4, ffn=768),
    "480p": dict(batch=1, grid=(24, 30, 52), hidden=4096, heads=32, ffn=11008),
    "720p": dict(batch=1, grid=(48, 44, 80), hidden=4096, heads=32, ffn=11008),
}

# The rows, one per (op, call) pair: --ops selects a subset.
OPS = (
    "layernorm_modulate",
    "layernorm_affine",
    "residual_layernorm_modulate",
    "residual_layernorm_affine",
    "qk_rmsnorm_rope3d",
    "swiglu",
)

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="shape set (default: 480p on CUDA, small on CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="activation dtype (default bfloat16)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 1; CFG runs batch 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 20 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warmup calls (default 5 GPU, 1 CPU)")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of the rows: " + ", ".join(OPS))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    return p.parse_args(argv)


def build_cases(torch, ref, fused, shape, dtype, device):
    """{name: (fused_fn, reference_fn, args tuple, kwargs dict)} with fresh random inputs."""
    B = shape["batch"]
    T, Hh, Ww = shape["grid"]
    N, C, H, Fh = T * Hh * Ww, shape["hidden"], shape["heads"], shape["ffn"]
    D = C // H
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*s, dt=dtype, scale=1.0):
        # Generated on the device in the target dtype: 720p tensors are GBs.
        t = torch.randn(*s, generator=g, dtype=dt, device=device)
        return t.mul_(scale) if scale != 1.0 else t

    x = rnd(B, N, C)
    y = rnd(B, N, C)
    # adaLN: six per-frame [B, T, C] float32 views of one [B, T, 6C] tensor, as block.modulation returns.
    mod = rnd(B, T, 6 * C, dt=torch.float32, scale=0.1).chunk(6, dim=-1)
    shift, scale, gate = mod[0], mod[1], mod[2]
    w_ln, b_ln = rnd(C, scale=0.1) + 1, rnd(C, scale=0.1)
    # q, k: strided views of the fused qkv GEMM output, as the block passes them.
    qkv = rnd(B, N, 3 * C)
    q, k, _ = qkv.view(B, N, 3, H, D).unbind(2)
    q_w, k_w = rnd(D, scale=0.1) + 1, rnd(D, scale=0.1) + 1
    ab = rnd(B, N, 2 * Fh)
    grid = (T, Hh, Ww)
    return {
        "layernorm_modulate": (fused.layernorm_modulate, ref.layernorm_modulate, (x, shift, scale), {}),
        "layernorm_affine": (fused.layernorm_modulate, ref.layernorm_modulate, (x,),
                             dict(weight=w_ln, bias=b_ln)),
        "residual_layernorm_modulate": (fused.residual_layernorm_modulate, ref.residual_layernorm_modulate,
                                        (x, y, gate, shift, scale), {}),
        "residual_layernorm_affine": (fused.residual_layernorm_modulate, ref.residual_layernorm_modulate,
                                      (x, y, gate), dict(weight=w_ln, bias=b_ln)),
        "qk_rmsnorm_rope3d": (fused.qk_rmsnorm_rope3d, ref.qk_rmsnorm_rope3d, (q, k, q_w, k_w, grid), {}),
        "swiglu": (fused.swiglu, ref.swiglu, (ab,), {}),
    }


def _flat_tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flat_tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _flat_tensors(o)]
    return []


def minimal_bytes(args, kwargs, outputs) -> int:
    """Inputs read once (distinct elements of each tensor argument) + outputs written once."""
    from longcat_native.benchmarking.harness import tensor_bytes

    read = sum(tensor_bytes(t) for t in _flat_tensors(args) + _flat_tensors(kwargs))
    written = sum(tensor_bytes(t, distinct=False) for t in _flat_tensors(outputs))
    return read + written


def max_abs_diff(a, b) -> float:
    ta, tb = _flat_tensors(a), _flat_tensors(b)
    if len(ta) != len(tb):
        return float("nan")
    return max((float((x.float() - y.float()).abs().max()) for x, y in zip(ta, tb) if x.numel()), default=0.0)


def main(argv=None) -> int:
    args = parse_args(argv)
    from longcat_native.benchmarking.harness import (
        copy_bandwidth_gbps,
        default_device,
        device_name,
        emit_json,
        load_ops,
        print_table,
        setup_triton_env,
        time_fn,
        try_compile,
    )

    has_cuda = setup_triton_env()  # before longcat_native imports triton
    import torch

    device = default_device()
    size = args.size or ("480p" if has_cuda else "small")
    shape = dict(SIZES[size])
    if args.batch is not None:
        shape["batch"] = args.batch
    dtype = getattr(torch, DTYPES[args.dtype])
    repeats = args.repeats if args.repeats is not None else (20 if has_cuda else 5)
    warmup = args.warmup if args.warmup is not None else (5 if has_cuda else 1)
    names = [n.strip() for n in args.ops.split(",") if n.strip()]
    unknown = sorted(set(names) - set(OPS))
    if unknown:
        raise SystemExit(f"unknown ops {unknown}; choose from {', '.join(OPS)}")

    ref, fused, ops_source = load_ops()
    T, Hh, Ww = shape["grid"]
    N = T * Hh * Ww
    dev_name = device_name(device)
    print(f"device: {dev_name}" + ("" if has_cuda else "  (fused kernels run under the triton interpreter)"))
    print(f"size {size}: batch {shape['batch']}, grid {T}x{Hh}x{Ww} = {N:,} tokens, C {shape['hidden']}, "
          f"heads {shape['heads']}, FFN {shape['ffn']}, dtype {DTYPES[args.dtype]}, repeats {repeats}")
    print(f"fused ops from: {ops_source}", flush=True)

    copy_bw = copy_bandwidth_gbps(device)
    print(f"measured copy bandwidth: {copy_bw:,.1f} GB/s (read + write)", flush=True)

    with torch.no_grad():
        cases = build_cases(torch, ref, fused, shape, dtype, device)
        rows, record, compile_errors = [], {}, {}
        for name in names:
            fused_fn, ref_fn, a, kw = cases[name]
            out_fused = fused_fn(*a, **kw)
            out_ref = ref_fn(*a, **kw)
            err = max_abs_diff(out_fused, out_ref)
            nbytes = minimal_bytes(a, kw, out_fused)
            del out_fused, out_ref
            t_fused = time_fn(lambda: fused_fn(*a, **kw), device, repeats, warmup, name=f"{name}/fused")
            t_eager = time_fn(lambda: ref_fn(*a, **kw), device, repeats, warmup, name=f"{name}/eager")
            t_comp = None
            if not args.no_compile:
                compiled, reason, _ = try_compile(ref_fn, lambda f: f(*a, **kw), dynamic=False)
                if compiled is None:
                    compile_errors[name] = reason
                    print(f"  torch.compile({name} reference): n/a ({reason})", flush=True)
                else:
                    t_comp = time_fn(lambda: compiled(*a, **kw), device, repeats, warmup, name=f"{name}/compiled")
            else:
                compile_errors[name] = "skipped (--no-compile)"
            gbps = nbytes / t_fused / 1e9
            vs_eager = t_eager / t_fused
            vs_comp = None if t_comp is None else t_comp / t_fused
            rows.append([
                name, nbytes / 1e6, t_fused * 1e6, gbps, 100 * gbps / copy_bw,
                t_eager * 1e6, None if t_comp is None else t_comp * 1e6, vs_eager, vs_comp, err,
            ])
            record.update({
                f"{name}_us": t_fused * 1e6,
                f"{name}_gbps": gbps,
                f"{name}_pct_of_copy_bw": 100 * gbps / copy_bw,
                f"{name}_min_bytes": nbytes,
                f"{name}_eager_us": t_eager * 1e6,
                f"{name}_compile_us": None if t_comp is None else t_comp * 1e6,
                f"{name}_vs_eager_speedup": vs_eager,
                f"{name}_vs_compile_speedup": vs_comp,
                f"{name}_max_abs_diff": err,
            })
            print(f"  {name}: fused {t_fused * 1e6:,.1f} us, eager {t_eager * 1e6:,.1f} us"
                  + ("" if t_comp is None else f", compiled {t_comp * 1e6:,.1f} us"), flush=True)

    print()
    print_table(
        ["kernel", "min MB", "fused us", "GB/s", "% copy BW", "eager us", "compile us", "vs eager", "vs compile",
         "max|diff|"],
        rows,
        title=f"fused kernels, {size}, {DTYPES[args.dtype]} (speedup = reference time / fused time)",
    )
    if compile_errors:
        for name, reason in compile_errors.items():
            print(f"compile n/a for {name}: {reason}")
    out = {
        "bench": "fused_kernels",
        "device": dev_name,
        "size": size,
        "dtype": DTYPES[args.dtype],
        "batch": shape["batch"],
        "tokens": N,
        "hidden_size": shape["hidden"],
        "triton_interpreter": not has_cuda,
        "repeats": repeats,
        "copy_bandwidth_gbps": copy_bw,
    }
    out.update(record)
    if compile_errors:
        out["compile_error"] = "; ".join(f"{k}: {v}" for k, v in compile_errors.items())
    emit_json(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
