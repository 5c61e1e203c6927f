"""Profiling: NVTX ranges (zero cost when off) and a ``torch.profiler`` run of a few forwards.

Design notes: docs/design/profiling.md.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = ["nvtx_range", "enable_nvtx", "nvtx_enabled", "profile_forward", "nsys_command", "format_profile_table"]

_NULL = contextlib.nullcontext()


class _NvtxSettings:
    """Whether ranges are marked (process-wide: ``LONGCAT_NVTX=1`` or :func:`enable_nvtx`) and
    the push/pop functions, resolved on first use (the ``nvtx`` package, else torch.cuda.nvtx)."""

    def __init__(self):
        self.enabled = os.environ.get("LONGCAT_NVTX", "0").strip().lower() in ("1", "true", "yes", "on")
        self._backend = None

    def backend(self):
        if self._backend is None:
            push = pop = None
            if torch.cuda.is_available():
                try:
                    import nvtx  # type: ignore

                    push, pop = (lambda name: nvtx.push_range(name, domain="longcat")), (lambda: nvtx.pop_range(domain="longcat"))
                except ImportError:
                    push, pop = torch.cuda.nvtx.range_push, (lambda: torch.cuda.nvtx.range_pop())
            self._backend = (push, pop)
        return self._backend


_NVTX = _NvtxSettings()


def enable_nvtx(enabled: bool = True) -> bool:
    """Turn NVTX/record_function ranges on or off; returns the previous setting."""
    previous, _NVTX.enabled = _NVTX.enabled, bool(enabled)
    return previous


def nvtx_enabled() -> bool:
    return _NVTX.enabled


class _Range:
    __slots__ = ("name", "rf")

    def __init__(self, name: str):
        self.name = name
        self.rf = None

    def __enter__(self):
        push, _ = _NVTX.backend()
        if push is not None:
            push(self.name)
        self.rf = torch.profiler.record_function(self.name)
        self.rf.__enter__()
        return self

    def __exit__(self, *exc):
        self.rf.__exit__(*exc)
        _, pop = _NVTX.backend()
        if pop is not None:
            pop()
        return False


def nvtx_range(name: str, index: Optional[int] = None, *, force: bool = False):
    """A context manager marking ``name`` (``f"{name}.{index}"`` with an index) as an NVTX range
    and a ``torch.profiler.record_function`` range; the shared null context when ranges are off
    (``force=True`` marks it even then: the benchmarks' timed regions) or while torch.compile
    traces."""
    if not (_NVTX.enabled or force) or torch.compiler.is_compiling():
        return _NULL
    return _Range(name if index is None else f"{name}.{index}")


# ---------------------------------------------------------------------------------------------
# torch.profiler run
# ---------------------------------------------------------------------------------------------


def nsys_command(argv: List[str], output: str = "longcat_profile") -> str:
    """The Nsight Systems command line that records ``argv`` with the NVTX ranges on."""
    import shlex

    cmd = " ".join(shlex.quote(a) for a in argv)
    return (f"LONGCAT_NVTX=1 nsys profile --trace=cuda,nvtx,osrt --cuda-memory-usage=true "
            f"--capture-range=none --force-overwrite=true -o {shlex.quote(output)} {cmd}")


_OURS = ("block.", "op.", "embed.", "final.", "forward")


def _range_of(evt) -> str:
    """Innermost enclosing range of ours (a ``record_function``) of a profiler event."""
    p = evt.cpu_parent
    while p is not None:
        if p.name.startswith(_OURS):
            return p.name
        p = p.cpu_parent
    return "-"


def profile_forward(
    fn: Callable[[], Any],
    steps: int = 3,
    trace_path: Optional[str] = None,
    warmup: int = 1,
    top: int = 20,
    device: Optional[torch.device] = None,
) -> Dict[str, Any]:
    """Run ``fn()`` ``warmup`` times untimed, then ``steps`` times under ``torch.profiler``
    (CPU activity; CUDA too when ``device`` is CUDA) with NVTX/record_function ranges on.

    Writes the Chrome/Perfetto trace to ``trace_path`` (when given) and returns
    ``{"rows": [...], "ranges": [...], "kernels": [...], "total_self_us", "device_time", "trace_path",
    "steps", "wall_s"}``:
    rows are the top ``top`` (op, range) pairs by self time summed over the steps: ``op``, ``range``
    (the innermost enclosing ``block.*``/``op.*``/``forward`` range, "-" if none), ``calls``,
    ``self_us`` (per step), ``share`` (of the total self time of all ops). On CUDA the time is
    device (kernel) time, elsewhere CPU self time. ``ranges``: the same time summed per range
    (``block.<i>`` ranges merged as ``block.*``). ``kernels`` (CUDA only): GPU kernels by name with
    their device time per step and share, ungrouped.
    """
    from torch.profiler import ProfilerActivity, profile

    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    previous = enable_nvtx(True)
    try:
        for _ in range(max(0, warmup)):
            fn()
        if on_cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with profile(activities=activities, record_shapes=False) as prof:
            for _ in range(max(1, steps)):
                with nvtx_range("forward"):
                    fn()
            if on_cuda:
                torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    finally:
        enable_nvtx(previous)
    if trace_path:
        from .files import atomic_output

        # Written next to trace_path and renamed into place when complete (runtime/files.py).
        with atomic_output(trace_path, make_parent=True) as tmp:
            prof.export_chrome_trace(tmp)

    # Rows: profiler ops (aten ops, custom ops) by self time. On CUDA the time is the device
    # time of the kernels each op launched (its self_device_time_total), so kernels are grouped
    # under the op and range that launched them; elsewhere CPU self time.
    totals: Dict[tuple, List[float]] = {}
    grand = 0.0
    for evt in prof.events():
        if evt.name.startswith(_OURS) or evt.device_type != torch.autograd.DeviceType.CPU:
            continue  # the ranges themselves; device-side records are counted via their CPU op
        if on_cuda:
            t = getattr(evt, "self_device_time_total", None)
            if t is None:  # older torch
                t = getattr(evt, "self_cuda_time_total", 0.0)
        else:
            t = evt.self_cpu_time_total
        if not t:
            continue
        key = (evt.name, _range_of(evt))
        entry = totals.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += t
        grand += t
    n = max(1, steps)
    rows = [
        {"op": k[0], "range": k[1], "calls": round(v[0] / n), "self_us": v[1] / n,
         "share": (v[1] / grand) if grand else 0.0}
        for k, v in totals.items()
    ]
    rows.sort(key=lambda r: -r["self_us"])
    # On CUDA also the GPU kernels themselves (device-side records), by kernel name: what nsys
    # would show, ungrouped (device records carry no CPU range).
    kernels: Dict[str, List[float]] = {}
    if on_cuda:
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CPU:
                continue
            t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
            entry = kernels.setdefault(evt.name, [0, 0.0])
            entry[0] += 1
            entry[1] += t
    ktotal = sum(v[1] for v in kernels.values())
    kernel_rows = sorted(({"kernel": k, "calls": round(v[0] / n), "us": v[1] / n,
                           "share": v[1] / ktotal if ktotal else 0.0} for k, v in kernels.items()),
                         key=lambda r: -r["us"])[:top]
    by_range: Dict[str, float] = {}
    for (_, rng), v in totals.items():
        grp = "block.*" if rng.startswith("block.") and rng[6:].isdigit() else rng
        by_range[grp] = by_range.get(grp, 0.0) + v[1] / n
    return {
        "rows": rows[:top],
        "ranges": sorted(({"range": k, "self_us": v, "share": v / (grand / n) if grand else 0.0}
                          for k, v in by_range.items()), key=lambda r: -r["self_us"]),
        "kernels": kernel_rows,
        "total_self_us": grand / n,
        "device_time": on_cuda,
        "trace_path": trace_path,
        "steps": n,
        "wall_s": wall,
    }


def format_profile_table(result: Dict[str, Any]) -> str:
    """The top ops table and the per-range totals as text."""
    unit = "device" if result["device_time"] else "cpu"
    lines = [f"top ops by {unit} self time per forward (total {result['total_self_us'] / 1e3:.3f} ms, "
             f"{result['steps']} steps)"]
    w = max([len(r["op"]) for r in result["rows"]] + [2])
    wr = max([len(r["range"]) for r in result["rows"]] + [5])
    lines.append(f"{'op'.ljust(w)}  {'range'.ljust(wr)}  {'calls':>6}  {'self ms':>10}  {'share':>7}")
    lines.append("-" * (w + wr + 31))
    for r in result["rows"]:
        lines.append(f"{r['op'].ljust(w)}  {r['range'].ljust(wr)}  {r['calls']:>6}  "
                     f"{r['self_us'] / 1e3:>10.3f}  {100 * r['share']:>6.1f}%")
    if result.get("kernels"):
        lines.append("")
        lines.append("top GPU kernels by device time per forward")
        wk = max(len(r["kernel"][:80]) for r in result["kernels"])
        for r in result["kernels"]:
            lines.append(f"{r['kernel'][:80].ljust(wk)}  {r['calls']:>6}  {r['us'] / 1e3:>10.3f}  {100 * r['share']:>6.1f}%")
    lines.append("")
    lines.append("by range (innermost)")
    for r in result["ranges"]:
        lines.append(f"{r['range'].ljust(w)}  {r['self_us'] / 1e3:>10.3f} ms  {100 * r['share']:>6.1f}%")
    return "\n".join(lines)
