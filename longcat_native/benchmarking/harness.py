"""Shared benchmark plumbing: timing, copy bandwidth, dispatch counters, tables, JSON. Importing
it imports no triton and touches no device; scripts call :func:`setup_triton_env` before the
kernels.

Design notes (the counting model of launches and bytes): docs/design/benchmarks.md.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

__all__ = [
    "cuda_available",
    "default_device",
    "device_name",
    "sync",
    "time_fn",
    "copy_bandwidth_gbps",
    "DispatchCounter",
    "count_ops",
    "count_cuda_kernels",
    "tensor_bytes",
    "try_compile",
    "format_table",
    "print_table",
    "fmt_num",
    "emit_json",
    "json_ready",
    "error_text",
    "load_ops",
    "setup_triton_env",
]


def setup_triton_env() -> bool:
    """Before longcat_native (hence triton) is imported: without CUDA, run triton kernels with the
    CPU interpreter (``TRITON_INTERPRET=1``). Returns whether CUDA is available."""
    import os
    import sys

    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set; CPU runs need it")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return has_cuda


def load_ops():
    """``(reference_ops, fused_ops, source)``: the two namespaces the model's call sites use."""
    from longcat_native.kernels import get_ops

    return get_ops("reference"), get_ops("triton"), "get_ops('triton')"


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


def cuda_available() -> bool:
    return torch.cuda.is_available()


def default_device() -> torch.device:
    return torch.device("cuda") if cuda_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    name = platform.processor() or platform.machine() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name} x{os.cpu_count()} threads={torch.get_num_threads()}"


def sync(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    repeats: int = 20,
    warmup: int = 3,
    min_repeat_s: Optional[float] = None,
    name: Optional[str] = None,
    number: Optional[int] = None,
) -> float:
    """Median seconds per call of ``fn()`` over ``repeats`` timed repeats.

    CUDA: CUDA events around each repeat after ``warmup`` untimed calls. CPU: ``perf_counter``.
    A repeat runs ``fn`` ``number`` times back to back; by default ``number`` is chosen from one
    probe call so a repeat lasts at least ``min_repeat_s`` (default 1 ms on CUDA, 5 ms on CPU),
    which keeps microsecond kernels above the timer's resolution; the result is divided by
    ``number``. ``number=1`` times single calls, with no probe (whole-model forwards). The whole
    measurement sits in an NVTX range ``name`` (:func:`longcat_native.runtime.profiling.nvtx_range`
    with ``force=True``: on CUDA whether or not the model's own ranges are on).
    """
    from longcat_native.runtime.profiling import nvtx_range

    device = torch.device(device)
    on_cuda = device.type == "cuda"
    repeats = max(1, int(repeats))
    if min_repeat_s is None:
        min_repeat_s = 1e-3 if on_cuda else 5e-3
    with nvtx_range(name or getattr(fn, "__name__", "bench"), force=True):
        for _ in range(max(0, int(warmup))):
            fn()
        sync(device)
        if number is None:
            # Probe one call to size the inner loop.
            t0 = time.perf_counter()
            fn()
            sync(device)
            probe = max(time.perf_counter() - t0, 1e-9)
            number = max(1, min(1000, math.ceil(min_repeat_s / probe)))
        number = max(1, int(number))
        samples: List[float] = []
        if on_cuda:
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(number):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) * 1e-3 / number)
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(number):
                    fn()
                samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples)


def copy_bandwidth_gbps(device: torch.device, nbytes: Optional[int] = None, repeats: int = 10) -> float:
    """Measured device copy bandwidth: ``dst.copy_(src)`` of one big buffer, in GB/s (1e9 B/s)
    counting the bytes read plus the bytes written (2 * nbytes), the same convention as the
    kernels' GB/s. Default buffer: 1 GiB on CUDA (far larger than L2), 64 MiB on CPU."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 64 * 2**20
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, repeats=repeats, warmup=2, name="copy_bandwidth")
    del src, dst
    return 2 * n * 4 / seconds / 1e9


# ---------------------------------------------------------------------------------------------
# Dispatch counters: launches and bytes outside GEMMs / attention
# ---------------------------------------------------------------------------------------------

_GEMM_OPS = {
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "linear", "matmul", "_addmm_activation",
    "_scaled_mm", "_int_mm", "addmv", "mv", "dot", "_weight_int8pack_mm",
}
_ATTENTION_MARKERS = ("scaled_dot_product", "_flash_attention", "_efficient_attention", "_cudnn_attention",
                      "flash_attn")
_VIEW_LIKE = {"_unsafe_view", "_reshape_alias", "lift_fresh", "alias", "detach"}
_METADATA_OPS = {"sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous", "is_same_size",
                 "is_nonzero"}
_ALLOC_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "empty_permuted"}
_OVERWRITE_ONLY = {"copy_", "fill_", "zero_", "uniform_", "normal_", "random_", "bernoulli_", "exponential_"}


def _op_names(func) -> tuple:
    """(namespace, base name, full name) of an OpOverload, e.g. ('aten', 'addmm', 'aten.addmm.default')."""
    full = str(func)
    try:
        ns = func.namespace
        base = func._schema.name.split("::", 1)[-1]
    except AttributeError:  # not an OpOverload
        parts = full.split(".")
        ns, base = parts[0], parts[1] if len(parts) > 1 else full
    return ns, base, full


def op_category(func) -> str:
    """'view' (views and metadata queries), 'alloc', 'gemm', 'attention', 'custom' (a non-aten
    namespace: fused kernels) or 'elementwise' (every other op that runs a kernel: pointwise,
    reductions, norms, copies...)."""
    ns, base, _ = _op_names(func)
    if ns == "prim" or base in _METADATA_OPS:  # metadata queries (seen e.g. under FakeTensorMode)
        return "view"
    if getattr(func, "is_view", False) or base in _VIEW_LIKE:
        return "view"
    if ns == "aten" and base in _ALLOC_OPS:
        return "alloc"
    if base in _GEMM_OPS:
        return "gemm"
    if any(m in base for m in _ATTENTION_MARKERS) or ns == "flash_attn":
        return "attention"
    if ns not in ("aten", "prims"):
        return "custom"
    return "elementwise"


def tensor_bytes(t: torch.Tensor, distinct: bool = True) -> int:
    """Bytes of ``t``; with ``distinct`` a dim of stride 0 (broadcast) counts once."""
    if distinct:
        n = 1
        for size, stride in zip(t.shape, t.stride()):
            if stride != 0:
                n *= size
        if t.numel() == 0:
            n = 0
    else:
        n = t.numel()
    return n * t.element_size()


def _tensors(obj) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class DispatchCounter:
    """``TorchDispatchMode`` that counts launches and bytes outside GEMMs/attention (module doc).

    Use as ``with DispatchCounter() as c: fn()``; then ``c.launches``, ``c.bytes``,
    ``c.launches_by_category``, ``c.by_op`` ({op: [count, bytes]}) and ``c.summary()``.
    """

    def __init__(self):
        self.launches = 0
        self.bytes = 0
        self.launches_by_category: Counter = Counter()
        self.by_op: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
        self._mode = None

    def _record(self, func, args, kwargs, out) -> None:
        cat = op_category(func)
        if cat in ("view", "alloc"):
            return
        self.launches += 1
        self.launches_by_category[cat] += 1
        _, base, full = _op_names(func)
        entry = self.by_op[full]
        entry[0] += 1
        if cat in ("gemm", "attention"):
            return
        nbytes = 0
        written_ids = set()
        schema = getattr(func, "_schema", None)
        arg_values: List[tuple] = []  # (value, schema arg or None)
        if schema is not None:
            for i, a in enumerate(schema.arguments):
                if a.kwarg_only or i >= len(args):
                    if a.name in kwargs:
                        arg_values.append((kwargs[a.name], a))
                else:
                    arg_values.append((args[i], a))
        else:
            arg_values = [(v, None) for v in list(args) + list(kwargs.values())]
        for value, a in arg_values:
            writes = a is not None and a.alias_info is not None and a.alias_info.is_write
            for t in _tensors(value):
                if writes:
                    nbytes += tensor_bytes(t, distinct=False)
                    written_ids.add(id(t))
                    if base not in _OVERWRITE_ONLY and a.name != "out":
                        nbytes += tensor_bytes(t)
                else:
                    nbytes += tensor_bytes(t)
        for t in _tensors(out):
            if id(t) not in written_ids:
                nbytes += tensor_bytes(t, distinct=False)
        entry[1] += nbytes
        self.bytes += nbytes

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                counter._record(func, args, kwargs, out)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        mode, self._mode = self._mode, None
        return mode.__exit__(*exc)

    def summary(self) -> Dict[str, Any]:
        return {
            "launches": self.launches,
            "bytes": self.bytes,
            "by_category": dict(self.launches_by_category),
        }

    def op_rows(self) -> List[List[Any]]:
        """[[op, count, bytes]] sorted by bytes then count, descending."""
        rows = [[op, c, b] for op, (c, b) in self.by_op.items()]
        rows.sort(key=lambda r: (-r[2], -r[1], r[0]))
        return rows


def count_ops(fn: Callable[[], Any]) -> DispatchCounter:
    """Run ``fn`` once under a :class:`DispatchCounter` (no grad) and return the counter."""
    with torch.no_grad(), DispatchCounter() as c:
        fn()
    return c


def count_cuda_kernels(fn: Callable[[], Any]) -> Optional[int]:
    """Real GPU kernels launched by one call of ``fn`` (torch.profiler CUDA activity); None when
    CUDA or the profiler's CUDA activity is unavailable. Memcpy/memset records are not counted."""
    if not cuda_available():
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()  # make sure nothing lazy (autotuning, compilation) lands in the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        n = 0
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                name = ev.name.lower()
                if "memcpy" in name or "memset" in name:
                    continue
                n += 1
        return n
    except Exception:  # profiler not usable here (e.g. CUPTI missing)
        return None


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def try_compile(fn: Callable, example: Callable[[Callable], Any], **compile_kwargs):
    """``(compiled_fn, None, compile_seconds)`` or ``(None, reason, None)``.

    ``example(f)`` calls ``f`` with representative arguments; it runs once to trigger compilation
    (on CPU inductor needs a C++ compiler: a missing one is reported, not raised)."""
    try:
        compiled = torch.compile(fn, **compile_kwargs)
        t0 = time.perf_counter()
        example(compiled)
        return compiled, None, time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - any compile failure is reported as n/a
        return None, error_text(e), None


def error_text(e: BaseException) -> str:
    """``"TypeName: first line of the message"``, at most 200 characters (a reported failure)."""
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"[:200]


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def fmt_num(v: Any, digits: int = 3) -> str:
    """Human formatting: None -> 'n/a', floats with ``digits`` significant digits."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        if v == 0:
            return "0"
        mag = abs(v)
        if mag >= 10 ** digits:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if mag >= 1e-3 else f"{v:.2e}"
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: Optional[str] = None) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt_num(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(cells[0], widths))))
    lines.append("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def print_table(headers, rows, title=None) -> None:
    print(format_table(headers, rows, title), flush=True)


def json_ready(v: Any) -> Any:
    """Non-finite floats become None (valid JSON ``null``); floats rounded to 6 significant digits."""
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        return float(f"{v:.6g}")
    if isinstance(v, dict):
        return {k: json_ready(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_ready(x) for x in v]
    return v


def emit_json(record: Dict[str, Any]) -> str:
    """Print ``record`` as the final single JSON line (snake_case keys carrying their units)."""
    line = json.dumps(json_ready(record), sort_keys=False, allow_nan=False)
    print(line, flush=True)
    return line
