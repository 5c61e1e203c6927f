"""Quantized block GEMMs: time and TFLOP/s per mode, weight bytes of the 13.6B model, deviation.

    python bench/quantize.py                  # CPU: small GEMMs (C 512), deviation at C 4096, 1 block
    python bench/quantize.py --real           # GPU: the real block GEMMs (C 4096, F 11008, 8192 tokens)
    python bench/quantize.py --tokens 1024 --repeats 5 --no-compile

Per block GEMM (attn.qkv, attn.proj, cross_attn.kv_linear over text tokens, ffn.w13, ffn.w2) and
per mode: ``dense`` (``F.linear`` in the model dtype: bf16 on CUDA, float32 on CPU; the eager
reference), ``dense_compile`` (torch.compile of it), ``fp8`` (per-token float8 activations +
``torch._scaled_mm`` with row-wise scales, the activation quantization included), and the
weight-only modes (dequantize to the model dtype, then the dense GEMM). The ratio columns are
speedups: eager dense time / mode time, and compiled dense time / mode time.

Also: the weight bytes of the 13.6B config per mode (built on the meta device, bf16), and the
relative L2 deviation of each mode's forward from the unquantized float32 forward at
``--deviation-hidden`` (default 4096, the real width) with ``--deviation-depth`` blocks of random
weights. The last printed line is one JSON object (``{"bench": "quantize", ...}``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

MODES = ("fp8", "fp8-weight-only", "int8-weight-only")
SIZES = {
    "small": dict(C=512, F=1408, tokens=256, text=64),
    "real": dict(C=4096, F=11008, tokens=8192, text=512),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", action="store_true", help="the real GEMM sizes (default on CUDA)")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="GEMM sizes (overrides --real)")
    p.add_argument("--tokens", type=int, default=None, help="GEMM rows (tokens); default real 8192, small 256")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10 GPU, 3 CPU)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--deviation-hidden", type=int, default=4096, help="hidden size of the deviation model")
    p.add_argument("--deviation-depth", type=int, default=None, help="blocks of the deviation model (GPU 2, CPU 1)")
    p.add_argument("--no-deviation", action="store_true", help="skip the deviation measurement")
    return p.parse_args(argv)


def key(mode: str) -> str:
    return mode.replace("-", "_")


def main(argv=None) -> int:
    args = parse_args(argv)
    from longcat_native.benchmarking.harness import (default_device, device_name, emit_json, print_table, setup_triton_env,
                                              time_fn, try_compile)

    has_cuda = setup_triton_env()
    import torch
    import torch.nn.functional as F

    import longcat_native as lcn
    from longcat_native.runtime import quantize as qz

    device = default_device()
    size = args.size or ("real" if (args.real or has_cuda) else "small")
    spec = SIZES[size]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    M = args.tokens or spec["tokens"]
    repeats = args.repeats if args.repeats is not None else (10 if has_cuda else 3)
    C, Fh = spec["C"], spec["F"]
    gemms = {"attn.qkv": (M, 3 * C, C), "attn.proj": (M, C, C), "cross_attn.kv_linear": (spec["text"], 2 * C, C),
             "ffn.w13": (M, 2 * Fh, C), "ffn.w2": (M, C, Fh)}
    dev_name = device_name(device)
    print(f"device: {dev_name}; GEMMs {size} (C {C}, F {Fh}, {M} tokens), model dtype {dtype}", flush=True)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        print(f"compute capability {cap[0]}.{cap[1]}: fp8 runs as "
              f"{qz.resolve_mode_for_device('fp8', device, cap)!r}", flush=True)

    record = {"bench": "quantize", "device": dev_name, "size": size, "dtype": str(dtype).replace("torch.", ""),
              "tokens": M, "hidden_size": C, "ffn_hidden_size": Fh}
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, (m, n, k) in gemms.items():
        w = (torch.randn(n, k, generator=g) / k**0.5).to(device=device, dtype=dtype)
        bias = None if name.startswith("ffn") else torch.randn(n, generator=g).to(device=device, dtype=dtype)
        x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
        flops = 2.0 * m * n * k
        timed = {}
        with torch.no_grad():
            timed["dense"] = time_fn(lambda: F.linear(x, w, bias), device, repeats, name=f"quantize/{name}/dense")
            compiled_s, compile_err = None, None
            if not args.no_compile:
                fn, compile_err, _ = try_compile(lambda a, b, c: F.linear(a, b, c), lambda f: f(x, w, bias))
                if fn is not None:
                    compiled_s = time_fn(lambda: fn(x, w, bias), device, repeats, name=f"quantize/{name}/compile")
            timed["dense_compile"] = compiled_s
            for mode in MODES:
                q, s = qz.quantize_weight(w, qz.storage_dtype(mode))
                run = qz.resolve_mode_for_device(mode, device) if device.type == "cuda" else mode
                timed[mode] = time_fn(lambda: qz.quantized_linear(x, q, s, bias, run), device, repeats,
                                      name=f"quantize/{name}/{mode}")
        for col, t in timed.items():
            ratio_eager = timed["dense"] / t if t else None
            ratio_compile = compiled_s / t if (t and compiled_s) else None
            rows.append([name, col, None if t is None else t * 1e3, None if t is None else flops / t / 1e12,
                         ratio_eager, ratio_compile])
            prefix = f"{name.replace('.', '_')}_{key(col)}"
            record[f"{prefix}_ms"] = None if t is None else t * 1e3
            record[f"{prefix}_tflops"] = None if t is None else flops / t / 1e12
            record[f"{prefix}_vs_eager_speedup"] = ratio_eager
            record[f"{prefix}_vs_compile_speedup"] = ratio_compile
        if compile_err:
            record["compile_error"] = compile_err
        del w, x, bias
    print()
    print_table(["GEMM", "mode", "ms", "TFLOP/s", "vs eager dense", "vs compiled dense"], rows,
                title=f"block GEMMs, {M} tokens (kv_linear: {spec['text']} text tokens), {dtype}, {dev_name}")

    # Weight bytes of the 13.6B model per mode (meta device: shapes only).
    sizes = {}
    for mode in (None, *MODES):
        sizes[mode] = lcn.LongCatDiT.from_config("longcat-video", device="meta", dtype=torch.bfloat16,
                                                 quantize=mode).weight_bytes()
        record[f"weight_bytes_{key(mode or 'bf16')}"] = sizes[mode]
        record[f"weight_gib_{key(mode or 'bf16')}"] = sizes[mode] / 2**30
    print()
    print_table(["mode", "GiB", "vs bf16"], [[m or "bf16 (unquantized)", b / 2**30, b / sizes[None]]
                                            for m, b in sizes.items()],
                title="13.6B model (longcat-video, 48 blocks): weight bytes on the device")
    record["fp8_weight_target_met"] = sizes["fp8"] <= 14.5 * 2**30

    # Deviation from the unquantized float32 forward, random weights.
    if not args.no_deviation:
        depth = args.deviation_depth or (2 if has_cuda else 1)
        t0 = time.perf_counter()
        base = lcn.LongCatDiT.from_config("longcat-video", seed=3, dtype=torch.float32, device=device, depth=depth,
                                          hidden_size=args.deviation_hidden, num_heads=max(1, args.deviation_hidden // 128),
                                          caption_channels=512, kernels="reference")
        gi = torch.Generator(device="cpu").manual_seed(0)
        cfg = base.config
        xin = torch.randn(1, cfg.in_channels, 2, 4, 8, generator=gi).to(device)
        tin = torch.full((1,), 500.0, device=device)
        text = torch.randn(1, 1, 8, cfg.caption_channels, generator=gi).to(device)
        with torch.no_grad():
            ref = base(xin, tin, text).double()
            devs = []
            for mode in MODES:
                dit = qz.quantize_model(copy.deepcopy(base), mode)
                out = dit(xin, tin, text).double()
                d = float((out - ref).norm() / ref.norm())
                record[f"deviation_{key(mode)}_rel_l2"] = d
                devs.append([mode, d])
                del dit
        print()
        print_table(["mode", "relative L2"], devs,
                    title=f"deviation from the unquantized float32 forward: C {cfg.hidden_size}, {depth} block(s), "
                          f"random weights, 64 tokens ({time.perf_counter() - t0:.0f} s)")
        record["deviation_hidden_size"], record["deviation_depth"] = cfg.hidden_size, depth
    emit_json(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
