"""Block-sparse attention (BSA): chunk selection, the sparse Triton kernel, and dense attention.

    python bench/block_sparse_attention.py                    # GPU: 720p (latent 48 x 88 x 160, N = 168,960), bf16
    python bench/block_sparse_attention.py --chunk 4,4,8 --sparsities 0.875,0.9375
    python bench/block_sparse_attention.py --size small --repeats 1   # CPU (triton interpreter): small

At the 720p refinement shape (B = 1, 32 heads x 128, N = 168,960 tokens, the official checkpoint's
4x4x4 chunks unless ``--chunk`` says otherwise), for each sparsity, all in one run:

- ``select``: :func:`bsa_select` (Triton pooling of q and k per chunk, chunk scores, top-k / cdf);
- ``sparse``: :func:`bsa_sparse_attention` for that selection, q/k/v strided ``[B, H, N, D]`` views of
  one ``[B, N, 3, H, D]`` qkv tensor in (t, h, w) order, as the model passes them;
- ``dense``: full attention with the best backend here (``longcat_native.runtime.attention``, auto);
- ``flashinfer``: ``flashinfer.sparse.VariableBlockSparseAttentionWrapper`` with the same chunk mask
  (only when flashinfer imports; its ``plan`` is not timed).

FLOPs: dense ``4 * B * H * Nq * Nk * D``; sparse counts only the computed blocks,
``4 * D * cs_q * cs_k * (number of selected (query chunk, key chunk) pairs over B and H)``.
``TFLOP/s`` of the sparse kernel is on the computed blocks. The targets (CUDA, stated for
an H100): sparse TFLOP/s >= 70% of dense TFLOP/s, and selection <= 5% of the sparse kernel time.
The last line is one JSON object (``{"bench": "block_sparse_attention", ...}``).
"""

from __future__ import annotations

import argparse
import math
import sys


SIZES = {
    # latent grid (T, H, W) of the tokens, heads, head dim
    "small": dict(latent=(4, 8, 16), heads=2, head_dim=64, chunk=(2, 2, 4)),
    "480p": dict(latent=(24, 60, 104), heads=32, head_dim=128, chunk=(4, 4, 4)),
    "720p": dict(latent=(48, 88, 160), heads=32, head_dim=128, chunk=(4, 4, 4)),
}
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}
TFLOPS_RATIO_TARGET = 0.70
SELECT_SHARE_TARGET = 0.05


def _ints(text):
    return tuple(int(x) for x in text.split(","))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 720p on CUDA, small on CPU")
    p.add_argument("--latent", type=_ints, default=None, help="override the latent grid T,H,W")
    p.add_argument("--chunk", type=_ints, default=None, help="chunk shape t,h,w for q and k (720p default 4,4,4)")
    p.add_argument("--sparsities", default="0.875,0.9375")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10 GPU, 1 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warmup calls (default 2 GPU, 0 CPU)")
    return p.parse_args(argv)


def _key(sparsity: float) -> str:
    return "s" + f"{sparsity:g}".replace(".", "")


def _flashinfer_runner(q, k, v, mask, cs_q, cs_k):
    """A zero-argument callable running flashinfer's variable block-sparse wrapper on contiguous
    chunk-order ``[H, N, D]`` tensors (batch 1) with the chunk mask ``[H, n_q, n_k]``, or the reason
    it cannot."""
    try:
        from flashinfer.sparse import VariableBlockSparseAttentionWrapper
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"flashinfer not importable ({type(e).__name__})"
    import torch

    try:
        H, n_q, n_k = mask.shape
        ws = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=q.device)
        wrapper = VariableBlockSparseAttentionWrapper(ws, backend="auto")
        wrapper.plan(
            block_mask_map=mask,
            block_row_sz=torch.full((H, n_q), cs_q, dtype=torch.int32, device=q.device),
            block_col_sz=torch.full((H, n_k), cs_k, dtype=torch.int32, device=q.device),
            num_qo_heads=H, num_kv_heads=H, head_dim=q.shape[-1], q_data_type=q.dtype, kv_data_type=k.dtype,
        )
        wrapper.run(q, k, v)
    except Exception as e:  # noqa: BLE001
        return None, f"flashinfer failed: {type(e).__name__}: {str(e)[:200]}"
    return (lambda: wrapper.run(q, k, v)), None


def main(argv=None) -> int:
    args = parse_args(argv)
    from longcat_native.benchmarking.harness import (default_device, device_name, emit_json, print_table, setup_triton_env,
                                              time_fn)

    has_cuda = setup_triton_env()  # before longcat_native imports triton
    import torch

    from longcat_native.kernels.block_sparse_attention import (
        block_sparse_attention_reference,
        bsa_select,
        bsa_selection_mask,
        bsa_sparse_attention,
        bsa_to_chunk_order,
    )
    from longcat_native.runtime.attention import attention, resolve_attention_backend

    torch.set_grad_enabled(False)
    device = default_device()
    size = args.size or ("720p" if has_cuda else "small")
    spec = SIZES[size]
    grid = tuple(args.latent or spec["latent"])
    chunk = tuple(args.chunk or spec["chunk"])
    H = args.heads or spec["heads"]
    D = args.head_dim or spec["head_dim"]
    B = args.batch
    N = math.prod(grid)
    sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    dtype = getattr(torch, DTYPES[args.dtype or ("bfloat16" if has_cuda else "float32")])
    repeats = args.repeats if args.repeats is not None else (10 if has_cuda else 1)
    warmup = args.warmup if args.warmup is not None else (2 if has_cuda else 0)
    cs = math.prod(chunk)
    n_chunks = math.prod(g // c for g, c in zip(grid, chunk))
    dev_name = device_name(device)
    print(f"device: {dev_name}")
    print(f"block-sparse attention {size}: batch {B}, latent {grid} (N {N:,}), heads {H} x {D}, chunks {chunk} ({cs} tokens, "
          f"{n_chunks:,} per head), {dtype}".replace("torch.", ""))

    g = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(B, N, 3, H, D, generator=g, device=device, dtype=dtype)
    q_s, k_s, v_s = qkv.unbind(2)  # [B, N, H, D] strided views, as the model has them
    q, k, v = (x.transpose(1, 2) for x in (q_s, k_s, v_s))  # [B, H, N, D] views, raster order

    # -- dense ------------------------------------------------------------------------------------
    dense_backend = resolve_attention_backend("auto", device, dtype)
    dense_flops = 4 * B * H * N * N * D
    t_dense = time_fn(lambda: attention(q_s, k_s, v_s, dense_backend), device, repeats=repeats, warmup=warmup,
                      name="dense")
    dense_tflops = dense_flops / t_dense / 1e12
    rows = [["dense", dense_backend, "-", t_dense * 1e3, dense_tflops, 1.0]]
    record_items = {"dense_backend": dense_backend, "dense_ms": t_dense * 1e3, "dense_tflops": dense_tflops,
                    "dense_flops": dense_flops}
    skipped = {}
    targets = {}

    for s in sparsities:
        key = _key(s)
        sel_args = (grid, grid, s, None, chunk, chunk)
        idx, counts = bsa_select(q, k, *sel_args)
        pairs = int(counts.sum().item())
        sparse_flops = 4 * D * cs * cs * pairs
        t_sel = time_fn(lambda: bsa_select(q, k, *sel_args), device, repeats=repeats, warmup=warmup, name=f"select_{key}")
        run_sparse = lambda: bsa_sparse_attention(q, k, v, idx, counts, grid, grid, chunk, chunk)  # noqa: E731
        t_sp = time_fn(run_sparse, device, repeats=repeats, warmup=warmup, name=f"sparse_{key}")
        computed = pairs / (B * H * n_chunks * n_chunks)
        sp_tflops = sparse_flops / t_sp / 1e12
        total = t_sel + t_sp
        rows += [
            ["select", f"sparsity {s:g}", f"{computed:.4f}", t_sel * 1e3, None, None],
            ["sparse (raster, strided)", f"sparsity {s:g}", f"{computed:.4f}", t_sp * 1e3, sp_tflops, sp_tflops / dense_tflops],
        ]
        record_items.update({
            f"{key}_select_ms": t_sel * 1e3,
            f"{key}_sparse_ms": t_sp * 1e3,
            f"{key}_sparse_tflops": sp_tflops,
            f"{key}_computed_fraction": computed,
            f"{key}_flop_reduction": dense_flops / sparse_flops,
            f"{key}_sparse_vs_dense_tflops_ratio": sp_tflops / dense_tflops,
            f"{key}_select_share": t_sel / t_sp,
            f"{key}_speedup_vs_dense": t_dense / total,
            f"{key}_ideal_speedup": dense_flops / sparse_flops,
        })
        if has_cuda:
            targets[key] = (sp_tflops / dense_tflops >= TFLOPS_RATIO_TARGET, t_sel / t_sp <= SELECT_SHARE_TARGET)
        # correctness: against the float32 oracle where it fits (the small sizes)
        out = run_sparse()
        if B * H * N * N <= 2**26:
            ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), *sel_args)
            mask_ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), *sel_args, return_mask=True)[1]
            record_items[f"{key}_max_rel_err_vs_reference"] = float(
                (out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            record_items[f"{key}_selection_matches_fp32"] = bool(
                torch.equal(bsa_selection_mask(idx, counts, n_chunks), mask_ref))
        # flashinfer, same selection
        if B == 1 and has_cuda:
            mask = bsa_selection_mask(idx, counts, n_chunks)[0]
            fi, why = _flashinfer_runner(*(bsa_to_chunk_order(x, grid, chunk)[0] for x in (q, k, v)), mask, cs, cs)
            if fi is None:
                skipped["flashinfer"] = why
            else:
                t_fi = time_fn(fi, device, repeats=repeats, warmup=warmup, name=f"flashinfer_{key}")
                fi_tflops = sparse_flops / t_fi / 1e12
                rows.append(["flashinfer", f"sparsity {s:g}", f"{computed:.4f}", t_fi * 1e3, fi_tflops, fi_tflops / dense_tflops])
                record_items.update({f"{key}_flashinfer_ms": t_fi * 1e3, f"{key}_flashinfer_tflops": fi_tflops,
                                     f"{key}_ours_vs_flashinfer_speedup": t_fi / t_sp})
        elif has_cuda:
            skipped["flashinfer"] = "run with --batch 1"
        del out
        print(f"sparsity {s:g}: computes {computed:.4f} of the blocks, FLOP reduction "
              f"{dense_flops / sparse_flops:.2f}x; selection + sparse {total * 1e3:.4g} ms vs dense "
              f"{t_dense * 1e3:.4g} ms ({t_dense / total:.2f}x)")

    print_table(["what", "case", "computed", "ms", "TFLOP/s", "vs dense TFLOP/s"], rows,
                title=f"block-sparse attention ({size}, latent {grid}, chunks {chunk}; sparse TFLOP/s on computed blocks)")
    for name, why in skipped.items():
        print(f"skip {name}: {why}")
    if has_cuda:
        for key, (ratio_ok, sel_ok) in targets.items():
            print(f"target {key}: sparse TFLOP/s >= {TFLOPS_RATIO_TARGET:.0%} of dense: {'met' if ratio_ok else 'NOT met'}; "
                  f"selection <= {SELECT_SHARE_TARGET:.0%} of sparse time: {'met' if sel_ok else 'NOT met'}"
                  + ("" if "H100" in dev_name else f" (targets are stated for an H100; this is {dev_name})"))
    else:
        print("targets (sparse TFLOP/s >= 70% of dense, selection <= 5% of sparse time): n/a (no CUDA GPU; "
              "CPU timings run the triton interpreter)")

    record = {
        "bench": "block_sparse_attention",
        "device": dev_name,
        "size": size,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": B,
        "latent": list(grid),
        "tokens": N,
        "heads": H,
        "head_dim": D,
        "chunk": list(chunk),
        "chunk_tokens": cs,
        "chunks_per_head": n_chunks,
        "sparsities": sparsities,
        "repeats": repeats,
        **record_items,
        "targets_met": ({k: {"tflops_ratio": a, "select_share": b} for k, (a, b) in targets.items()} if has_cuda else None),
    }
    if skipped:
        record["skipped"] = skipped
    emit_json(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
