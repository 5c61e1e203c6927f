"""The full-model benchmark (``bench/model.py`` and ``longcat-native bench``): one forward of the
whole DiT per column (eager_ref, compile_ref, fused, fused_compile_graphs), model FLOPs and MFU.
Importing this module imports no torch (the CLI's ``--help`` stays light).

Design notes: docs/design/benchmarks.md.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

from ..runtime.files import write_json_atomic

__all__ = ["SIZES", "COLUMNS", "model_flops", "matmul_peak_tflops", "run_benchmark", "format_results", "headline"]

SIZES: Dict[str, Dict[str, Any]] = {
    "480p": dict(preset="longcat-video", overrides={}, batch=2, latent=(24, 60, 104), text=512, bsa=False),
    "720p": dict(preset="longcat-video", overrides={}, batch=1, latent=(48, 88, 160), text=512, bsa=True),
    "small": dict(preset="tiny", overrides={}, batch=2, latent=(2, 8, 8), text=16, bsa=False),
    # compile_ref is left out of small_bsa's default columns: a second cold inductor C++ build of the
    # reference path costs ~18 s on 2 cores and would push the CPU run past a minute (--columns adds it).
    "small_bsa": dict(preset="tiny", overrides=dict(depth=1), batch=1, latent=(2, 8, 8), text=16, bsa=True,
                      default_columns=("eager_ref", "fused", "fused_compile_graphs")),
}
COLUMNS = ("eager_ref", "compile_ref", "fused", "fused_compile_graphs")


def model_flops(cfg, batch: int, latent, text_len: int, bsa: bool = False) -> int:
    """Model FLOPs of one forward (module doc)."""
    T, H, W = latent
    pt, ph, pw = cfg.patch_size
    grid = (T // pt, H // ph, W // pw)
    N = grid[0] * grid[1] * grid[2]
    C, F, Ct, L = cfg.hidden_size, cfg.ffn_hidden_size, cfg.adaln_tembed_dim, text_len
    keep = 1.0
    if bsa and grid[0] > 1:
        keep = 1.0 - float(cfg.bsa["sparsity"])
    self_attn = 2 * N * C * 3 * C + 2 * N * C * C + 4 * N * N * C * keep
    cross = 2 * N * C * C + 2 * L * C * 2 * C + 4 * N * L * C + 2 * N * C * C
    ffn = 2 * N * C * 2 * F + 2 * N * F * C
    adaln = 2 * grid[0] * Ct * 6 * C
    blocks = cfg.depth * (self_attn + cross + ffn + adaln)
    embed = 2 * N * cfg.in_channels * cfg.patch_volume * C + 2 * L * (cfg.caption_channels * C + C * C)
    final = 2 * N * C * cfg.patch_volume * cfg.out_channels
    return int(batch * (blocks + embed + final))


def time_forward(fn: Callable[[], Any], device, repeats: int, warmup: int) -> float:
    """Median seconds per call of single calls (CUDA events on CUDA, perf_counter elsewhere)."""
    from .harness import time_fn

    return time_fn(fn, device, repeats=repeats, warmup=warmup, number=1, name="forward")


def matmul_peak_tflops(device, dtype, timer=None) -> float:
    """Measured dense GEMM throughput (TFLOP/s) of a square matmul in ``dtype``."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    if device.type != "cuda":
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timer = timer or (lambda f: time_forward(f, device, repeats=10 if device.type == "cuda" else 5, warmup=2))
    seconds = timer(lambda: torch.mm(a, b))
    return 2 * n ** 3 / seconds / 1e12


def _inputs(cfg, spec, device, dtype, seed=0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    B, (T, H, W), L = spec["batch"], spec["latent"], spec["text"]
    x = torch.randn(B, cfg.in_channels, T, H, W, generator=g).to(device=device, dtype=dtype)
    t = (torch.rand(B, generator=g) * 1000).to(device)
    text = torch.randn(B, 1, L, cfg.caption_channels, generator=g).to(device=device, dtype=dtype)
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    return x, t, text, mask


def run_size(size: str, device, dtype, columns=None, repeats: int = 3,
             warmup: int = 1, depth: Optional[int] = None, peak_tflops: Optional[float] = None,
             timer=None, log=print, regional: bool = False, attention: str = "auto",
             quantize: Optional[str] = None) -> Dict[str, Any]:
    """Benchmark one size; returns its result record (per-column seconds, MFU, peak memory).
    ``quantize``: also the best column (compile + CUDA graphs) on the model quantized that way."""
    import torch

    from ..runtime.compiled import CUDAGraphRunner, compile_model
    from ..runtime.dit import LongCatDiT
    from .harness import error_text, sync

    spec = SIZES[size]
    columns = columns or spec.get("default_columns", COLUMNS)
    overrides = dict(spec["overrides"])
    if depth is not None:
        overrides["depth"] = depth
    dit = LongCatDiT.from_config(spec["preset"], dtype=dtype, device=device, kernels="reference", attention=attention,
                                 **overrides)
    if spec["bsa"]:
        dit.enable_bsa()
    cfg = dit.config
    T, H, W = spec["latent"]
    pt, ph, pw = cfg.patch_size
    N = (T // pt) * (H // ph) * (W // pw)
    flops = model_flops(cfg, spec["batch"], spec["latent"], spec["text"], spec["bsa"])
    args = _inputs(cfg, spec, device, dtype)
    timer = timer or (lambda f: time_forward(f, device, repeats, warmup))
    rec: Dict[str, Any] = {
        "size": size, "batch": spec["batch"], "latent": list(spec["latent"]), "tokens": N, "text_tokens": spec["text"],
        "bsa": spec["bsa"], "depth": cfg.depth, "hidden_size": cfg.hidden_size, "parameters": dit.num_parameters(),
        "model_tflop": flops / 1e12, "attention": dit.resolved_attention(), "regional_compile": bool(regional),
        "columns": {},
    }
    # The fused path's peak traced on fake tensors (runtime/memory.py), beside the measured ones.
    try:
        from ..runtime.memory import trace_forward_memory

        traced = trace_forward_memory(cfg, batch=spec["batch"], latent=spec["latent"], text_len=spec["text"],
                                      bsa=spec["bsa"], dtype=dtype)
        rec["traced_peak_bytes"], rec["traced_peak_op"] = traced["peak"], traced["trace"].peak_op
    except Exception as e:  # noqa: BLE001 - a trace failure is reported, the timing goes on
        rec["traced_peak_bytes"], rec["traced_peak_error"] = None, error_text(e)

    def time_column(col, model, name):
        dit = model
        r: Dict[str, Any] = {"seconds": None, "mfu": None, "tflops": None, "peak_mem_bytes": None, "error": None}
        rec["columns"][name] = r
        try:
            dit.kernels = "reference" if col.endswith("_ref") else "triton"
            dit.resolved_kernels()  # a clear error when the fused path cannot run here
            extra: Dict[str, Any] = {}
            if col == "eager_ref" or col == "fused":
                fn = dit
            elif col == "compile_ref":
                torch._dynamo.reset()
                fn = compile_model(dit, fullgraph=False, warn_on_recompile=False)
            else:
                torch._dynamo.reset()
                compiled = compile_model(dit, warn_on_recompile=False, regional=regional)
                fn = CUDAGraphRunner(dit, fallback=compiled, max_graphs=1)
                extra["runner"] = fn
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the runner's CPU fallback message, BSA notes
                out = fn(*args)  # first call: compilation / capture
                sync(device)
                r["first_call_s"] = time.perf_counter() - t0
                seconds = timer(lambda: fn(*args))
            r["seconds"] = seconds
            r["tflops"] = flops / seconds / 1e12
            if peak_tflops:
                r["mfu"] = r["tflops"] / peak_tflops
            if device.type == "cuda":
                r["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
            r["output_finite"] = bool(torch.isfinite(out).all())
            if "runner" in extra:
                st = extra["runner"].stats()
                r["cuda_graphs"] = st["captures"] > 0
                r["graph_replays"] = st["replays"]
            del out
        except Exception as e:  # noqa: BLE001 - a failing column (OOM, no compiler...) is reported, the run goes on
            r["error"] = error_text(e)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        log(f"  {size} {name}: " + (f"{r['seconds']:.4g} s" if r["seconds"] is not None else f"n/a ({r['error']})"))
    for col in columns:
        time_column(col, dit, col)
    if quantize is not None:
        # The same seed's weights, quantized as they are drawn, timed as the best column: the
        # quantized GEMMs vs the model dtype in one run (the unquantized model freed first).
        del dit
        if device.type == "cuda":
            torch.cuda.empty_cache()
        qdit = LongCatDiT.from_config(spec["preset"], dtype=dtype, device=device, kernels="reference",
                                      attention=attention, quantize=quantize, **overrides)
        if spec["bsa"]:
            qdit.enable_bsa()
        rec["quantize"] = quantize
        rec["quantized_weight_bytes"] = qdit.weight_bytes()
        time_column("fused_compile_graphs", qdit, f"fused_compile_graphs_{quantize}")
        dit = qdit
    torch._dynamo.reset()
    ref, best = rec["columns"].get("eager_ref", {}), rec["columns"].get("fused_compile_graphs", {})
    if ref.get("seconds") and best.get("seconds"):
        rec["speedup_vs_eager_ref"] = ref["seconds"] / best["seconds"]
    del dit
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def run_benchmark(sizes: List[str], device=None, dtype=None, columns=None, repeats=None, warmup=None,
                  depth=None, timer=None, log=print, regional: bool = False, attention: str = "auto",
                  quantize: Optional[str] = None) -> Dict[str, Any]:
    import torch

    from .harness import device_name

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
    repeats = repeats if repeats is not None else (3 if on_cuda else 2)
    warmup = warmup if warmup is not None else (1 if on_cuda else 0)  # the first (untimed) call warms up too
    peak = matmul_peak_tflops(device, dtype)
    log(f"matmul peak ({'8192^3 ' + str(dtype).replace('torch.', '') if on_cuda else '1024^3 float32'}): {peak:.4g} TFLOP/s")
    results = {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
               "matmul_peak_tflops": peak, "repeats": repeats, "sizes": {}}
    for size in sizes:
        results["sizes"][size] = run_size(size, device, dtype, columns, repeats, warmup, depth, peak, timer, log,
                                          regional=regional, attention=attention, quantize=quantize)
    return results


def format_results(results: Dict[str, Any]) -> str:
    from .harness import fmt_num

    lines = [f"device: {results['device']}  dtype {results['dtype']}  matmul peak {results['matmul_peak_tflops']:.4g} TFLOP/s"]
    for size, rec in results["sizes"].items():
        lines.append("")
        lines.append(f"{size}: batch {rec['batch']}, latent {'x'.join(map(str, rec['latent']))} -> N {rec['tokens']:,}, "
                     f"text {rec['text_tokens']}, depth {rec['depth']}, C {rec['hidden_size']}, BSA {'on' if rec['bsa'] else 'off'}, "
                     f"attention {rec['attention']}, {rec['model_tflop']:.4g} TFLOP per forward"
                     + (", regional compile" if rec.get("regional_compile") else ""))
        head = f"{'column':<30} {'s/forward':>10} {'TFLOP/s':>9} {'MFU':>7} {'peak mem GB':>12} {'vs eager':>9}  note"
        lines.append(head)
        lines.append("-" * len(head))
        ref = rec["columns"].get("eager_ref", {}).get("seconds")
        for col, r in rec["columns"].items():
            sec = r["seconds"]
            note = r["error"] or ""
            if col == "fused_compile_graphs" and r.get("cuda_graphs") is False:
                note = note or "no CUDA graphs here (fallback: compiled)"
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            mem = f"{r['peak_mem_bytes'] / 1e9:.2f}" if r["peak_mem_bytes"] else "n/a"
            vs = f"{ref / sec:.2f}x" if ref and sec else "n/a"
            lines.append(f"{col:<30} {fmt_num(sec):>10} {fmt_num(r['tflops']):>9} {mfu:>7} {mem:>12} {vs:>9}  {note}")
        if rec.get("traced_peak_bytes"):
            lines.append(f"fused path peak memory traced on fake tensors: {rec['traced_peak_bytes'] / 1e9:.4g} GB "
                         f"(at {rec['traced_peak_op']}; weights + inputs + live activations)")
    return "\n".join(lines)


def headline(results: Dict[str, Any]) -> Dict[str, Any]:
    """The one-line JSON record: ``{"bench": "model", ...}`` with unit-suffixed keys."""
    rec: Dict[str, Any] = {"bench": "model", "device": results["device"], "dtype": results["dtype"],
                           "matmul_peak_tflops": results["matmul_peak_tflops"]}
    for size, s in results["sizes"].items():
        for col, r in s["columns"].items():
            rec[f"{size}_{col}_s"] = r["seconds"]
            rec[f"{size}_{col}_mfu"] = r["mfu"]
            if r["peak_mem_bytes"] is not None:
                rec[f"{size}_{col}_peak_mem_bytes"] = r["peak_mem_bytes"]
        rec[f"{size}_speedup_vs_eager_ref"] = s.get("speedup_vs_eager_ref")
        rec[f"{size}_attention"] = s.get("attention")
        rec[f"{size}_traced_peak_bytes"] = s.get("traced_peak_bytes")
        if s.get("regional_compile"):
            rec[f"{size}_regional_compile"] = True
    return rec


def save_results(results: Dict[str, Any], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kind = "cuda" if not results["device"].startswith("cpu") else "cpu"
    path = os.path.join(out_dir, f"model_{kind}_{stamp}.json")
    write_json_atomic(path, results, indent=2, default=str)  # complete or not there at all
    return path


def default_sizes(on_cuda: bool) -> List[str]:
    return ["480p", "720p"] if on_cuda else ["small", "small_bsa"]


def main(argv=None, default_out_dir: Optional[str] = None, prog: Optional[str] = "longcat-native bench",
         description: Optional[str] = __doc__) -> int:
    """``longcat-native bench`` / ``python bench/model.py`` (same options)."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    return run_from_args(args, default_out_dir=default_out_dir)


def add_arguments(p) -> None:
    p.add_argument("--size", action="append", choices=sorted(SIZES),
                   help="repeatable; default 480p and 720p on CUDA, small and small_bsa on CPU")
    p.add_argument("--columns", nargs="+", choices=COLUMNS, default=None,
                   help="default: all four (small_bsa: all but compile_ref)")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per column (default 3 CUDA, 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed forwards after the first call (default 1 CUDA, 0 CPU)")
    p.add_argument("--depth", type=int, default=None, help="override the number of blocks (quick runs)")
    p.add_argument("--attention", default="auto",
                   help="attention backend of every column (default auto; e.g. cudnn, sdpa, flash3)")
    p.add_argument("--regional", action="store_true",
                   help="fused_compile_graphs compiles one block shared by all (compile_model(regional=True))")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--quantize", default=None, choices=("fp8", "fp8-weight-only", "int8-weight-only"),
                   help="also time the best column on the block GEMM weights quantized (docs/design/quantization.md)")
    p.add_argument("--save", action="store_true", help="write the full results JSON (always on CUDA)")
    p.add_argument("--out-dir", default=None, help="where results go (default bench/results)")


def run_from_args(args, default_out_dir: Optional[str] = None) -> int:
    """Run the options :func:`add_arguments` declares; prints the tables, saves the full results
    (on CUDA or with ``--save``) and ends with the one-line JSON record."""
    import torch

    from ..runtime.dit import resolve_dtype
    from .harness import emit_json

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    sizes = args.size or default_sizes(device.type == "cuda")
    columns = tuple(args.columns) if args.columns else None
    results = run_benchmark(sizes, device, dtype, columns, args.repeats, args.warmup, args.depth,
                            regional=args.regional, attention=args.attention, quantize=args.quantize)
    print(format_results(results), flush=True)
    out_dir = args.out_dir or default_out_dir or os.path.join(os.getcwd(), "bench", "results")
    if args.save or device.type == "cuda":
        path = save_results(results, out_dir)
        print(f"results: {path}", flush=True)
    emit_json(headline(results))
    return 0
