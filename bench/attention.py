"""Attention backends: dense self-attention, cross-attention and variable-length cross-attention.

    python bench/attention.py                          # GPU: 480p (N = 37,440, 32 x 128), bf16; CPU: small
    python bench/attention.py --size small --repeats 1
    python bench/attention.py --backends sdpa,flash2 --tokens 16384 --batch 2

Per backend that can run here (``flash3``, ``flash2``, ``cudnn``, ``sdpa``; ``reference`` only at small
sizes), through ``longcat_native.runtime.attention.attention`` exactly as the model calls it:

- ``self``: q, k, v are strided views of one ``[B, N, 3, H, D]`` qkv tensor, Nq = Nk = N;
- ``cross``: N queries against L = 512 text tokens, all valid (the official
  ``text_tokens_zero_pad`` setting attends every token); k, v views of a ``[B, L, 2, H, D]`` tensor;
- ``cross_varlen``: the same with ``key_valid`` (each item a prefix of about half the tokens),
  the ``text_tokens_zero_pad=False`` path (flash-attn varlen entry point, SDPA boolean mask).

On CUDA, ``sdpa`` is also timed with each of its kernels forced (``torch.nn.attention.sdpa_kernel``):
rows ``sdpa[flash]``, ``sdpa[cudnn]``, ``sdpa[efficient]`` (record keys ``sdpa_flash_self_ms``...;
a kernel that refuses a case is reported under ``skipped``). Attention is over half of a 480p
forward's FLOPs, and where no flash-attn package is installed ``auto`` is ``sdpa``, so which
kernel torch picks decides much of the MFU: these rows say what each gives at the real shape.

FLOPs: ``4 * Nq * Nk * D * H`` per batch item (QK^T and PV, 2 FLOPs per multiply-add); for
``cross_varlen`` only the valid keys are counted. ``% peak`` divides TFLOP/s by the dense matmul
peak measured in the same run (``torch.mm`` of two 8192 x 8192 matrices in the bench dtype on
CUDA; 2048 x 2048 float32 on CPU). The target: on an H100 the best backend's dense
self-attention reaches >= 60% of that peak (evaluated on CUDA; n/a on CPU). The last line is one
JSON object (``{"bench": "attention", ...}``).
"""

from __future__ import annotations

import argparse
import sys


SIZES = {
    # tokens N (self-attention), text tokens L, heads, head dim
    "small": dict(tokens=256, text=512, heads=32, head_dim=128),
    "480p": dict(tokens=37440, text=512, heads=32, head_dim=128),  # 24 x 30 x 52 latent grid
    "720p": dict(tokens=168960, text=512, heads=32, head_dim=128),  # dense upper bound (720p runs BSA)
}
BACKENDS = ("flash3", "flash2", "cudnn", "sdpa", "reference")
CASES = ("self", "cross", "cross_varlen")
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}
SELF_TARGET_PCT = 60.0
# The reference backend materializes float32 scores in query chunks: fine for checks, far too slow
# to time at real sizes. It runs when Nq * Nk * heads * batch is at most this.
REFERENCE_MAX_SCORES = 2**28


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 480p on CUDA, small on CPU")
    p.add_argument("--tokens", type=int, default=None, help="override N (self-attention length, cross queries)")
    p.add_argument("--text-tokens", type=int, default=None, help="override L (default 512)")
    p.add_argument("--valid-fraction", type=float, default=0.5, help="valid text share in cross_varlen (0.5)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of " + ", ".join(BACKENDS))
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warmup calls (default 3 GPU, 1 CPU)")
    p.add_argument("--mm-size", type=int, default=None, help="matmul peak size (default 8192 GPU, 1024 CPU)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from longcat_native.benchmarking.harness import (default_device, device_name, emit_json, print_table, setup_triton_env,
                                              time_fn)

    has_cuda = setup_triton_env()  # before longcat_native imports triton
    import torch

    from longcat_native.runtime.attention import attention, resolve_attention_backend

    torch.set_grad_enabled(False)
    device = default_device()
    size = args.size or ("480p" if has_cuda else "small")
    spec = SIZES[size]
    N = args.tokens or spec["tokens"]
    L = args.text_tokens or spec["text"]
    H = args.heads or spec["heads"]
    D = args.head_dim or spec["head_dim"]
    B = args.batch
    dtype = getattr(torch, DTYPES[args.dtype or ("bfloat16" if has_cuda else "float32")])
    repeats = args.repeats if args.repeats is not None else (10 if has_cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if has_cuda else 1)
    mm_n = args.mm_size or (8192 if has_cuda else 2048)
    dev_name = device_name(device)
    print(f"device: {dev_name}")
    print(f"attention {size}: batch {B}, N {N:,}, text {L}, heads {H} x {D}, {dtype}".replace("torch.", ""))

    # -- matmul peak, same run --------------------------------------------------------------------
    mm_dtype = dtype if has_cuda else torch.float32
    mats = [torch.randn(mm_n, mm_n, device=device, dtype=mm_dtype) for _ in range(2)]
    t_mm = time_fn(lambda: torch.mm(*mats), device, repeats=max(repeats, 5), warmup=warmup, name="matmul_peak")
    peak = 2 * mm_n**3 / t_mm / 1e12
    mats.clear()
    print(f"matmul peak: {peak:.4g} TFLOP/s ({mm_n}^3 {mm_dtype})".replace("torch.", ""))

    # -- inputs, laid out as the model passes them ------------------------------------------------
    g = torch.Generator(device=device).manual_seed(0)
    q_s, k_s, v_s = torch.randn(B, N, 3, H, D, generator=g, device=device, dtype=dtype).unbind(2)
    q_c = torch.randn(B, N, H, D, generator=g, device=device, dtype=dtype)
    k_c, v_c = torch.randn(B, L, 2, H, D, generator=g, device=device, dtype=dtype).unbind(2)
    # About `valid_fraction` of the text valid per item (prefixes, lengths spread +-25% over the batch).
    lengths = [max(1, min(L, round(L * args.valid_fraction * (1 + 0.5 * (i / max(1, B - 1) - 0.5) * (B > 1)))))
               for i in range(B)]
    key_valid = torch.arange(L, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    valid_keys = sum(lengths)  # host-side, computed before any timing
    cases = {
        "self": ((q_s, k_s, v_s), None, 4 * B * N * N * D * H),
        "cross": ((q_c, k_c, v_c), None, 4 * B * N * L * D * H),
        "cross_varlen": ((q_c, k_c, v_c), key_valid, 4 * N * valid_keys * D * H),
    }

    # -- backends ---------------------------------------------------------------------------------
    wanted = [s.strip() for s in args.backends.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backends {unknown}; choose from {BACKENDS}")
    backends, skipped = [], {}
    for name in BACKENDS:
        if name not in wanted:
            continue
        try:
            resolve_attention_backend(name, device, dtype)
        except ValueError as e:
            skipped[name] = str(e).split(". attention=")[0]
            continue
        if name == "reference" and B * N * N * H > REFERENCE_MAX_SCORES:
            skipped[name] = f"too slow at this size (reference runs when batch*N*N*heads <= {REFERENCE_MAX_SCORES})"
            continue
        backends.append(name)
    auto = resolve_attention_backend("auto", device, dtype)
    for name, why in skipped.items():
        print(f"skip {name}: {why}")
    print(f"auto -> {auto}")

    # -- time -------------------------------------------------------------------------------------
    # max|diff| against the most accurate backend that runs here (the float32 oracle when it does).
    base_name = "reference" if "reference" in backends else ("sdpa" if "sdpa" in backends else None)
    baseline = {}
    if base_name is not None:
        for case in CASES:
            (q, k, v), kv, _ = cases[case]
            baseline[case] = attention(q, k, v, base_name, key_valid=kv)
    rows, record_items = [], {}
    best_self = (None, None)
    runs = [(name, name, name, None) for name in backends]  # (row label, record key, backend, forced kernel)
    if has_cuda and "sdpa" in backends:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for label, kind in (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
                            ("efficient", "EFFICIENT_ATTENTION")):
            if hasattr(SDPBackend, kind):
                runs.append((f"sdpa[{label}]", f"sdpa_{label}", "sdpa", getattr(SDPBackend, kind)))
    for name, key, backend, forced in runs:
        for case in CASES:
            (q, k, v), kv, flops = cases[case]

            def fn(q=q, k=k, v=v, kv=kv, backend=backend, forced=forced):
                if forced is None:
                    return attention(q, k, v, backend, key_valid=kv)
                with sdpa_kernel([forced]):
                    return attention(q, k, v, backend, key_valid=kv)

            try:
                out = fn()
            except RuntimeError as e:  # a forced SDPA kernel that does not take this case
                skipped[f"{key}_{case}"] = str(e).strip().splitlines()[0][:160] if str(e).strip() else "RuntimeError"
                print(f"skip {name} {case}: {skipped[f'{key}_{case}']}")
                continue
            diff = None if case not in baseline else (out.float() - baseline[case].float()).abs().max().item()
            if diff is not None:
                record_items[f"{key}_{case}_max_abs_diff"] = diff
            seconds = time_fn(fn, device, repeats=repeats, warmup=warmup, name=f"{key}_{case}")
            tflops = flops / seconds / 1e12
            pct = 100 * tflops / peak
            rows.append([name, case, seconds * 1e3, tflops, pct, diff])
            record_items.update({f"{key}_{case}_ms": seconds * 1e3, f"{key}_{case}_tflops": tflops,
                                 f"{key}_{case}_pct_of_peak": pct})
            if case == "self" and name != "reference" and (best_self[1] is None or pct > best_self[1]):
                best_self = (key, pct)
            del out

    print_table(["backend", "case", "ms", "TFLOP/s", "% peak", "max|diff|"], rows,
                title=f"attention ({size}; % of the {peak:.4g} TFLOP/s matmul peak; max|diff| vs {base_name})")
    target_met = None
    if has_cuda and best_self[0] is not None:
        target_met = best_self[1] >= SELF_TARGET_PCT
        print(f"target: dense self-attention >= {SELF_TARGET_PCT:g}% of the matmul peak with the best backend "
              f"({best_self[0]}: {best_self[1]:.1f}%): {'met' if target_met else 'NOT met'}"
              + ("" if "H100" in dev_name else f" (the target is stated for an H100; this is {dev_name})"))
    else:
        print(f"target: dense self-attention >= {SELF_TARGET_PCT:g}% of the matmul peak: n/a (no CUDA GPU)")

    record = {
        "bench": "attention",
        "device": dev_name,
        "size": size,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": B,
        "tokens": N,
        "text_tokens": L,
        "valid_text_tokens": valid_keys,
        "heads": H,
        "head_dim": D,
        "repeats": repeats,
        "matmul_peak_tflops": peak,
        "matmul_size": mm_n,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "auto_backend": auto,
        "backends": backends,
        "diff_baseline": base_name,
        **record_items,
        "best_self_backend": best_self[0],
        "best_self_pct_of_peak": best_self[1],
        "self_target_pct": SELF_TARGET_PCT,
        "self_target_met": target_met,
    }
    if skipped:
        record["skipped"] = skipped
    emit_json(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
