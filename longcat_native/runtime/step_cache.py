"""Step caching for the DiT's denoising loop (DBCache / TaylorSeer family, cache-dit's parameter
names): compute the first ``Fn_compute_blocks`` blocks, measure how much their output residual
changed since the last fully computed step, and when the change is below
``residual_diff_threshold`` reuse (or, with TaylorSeer, extrapolate) the middle blocks' cached
residual, then compute the last ``Bn_compute_blocks`` blocks.

:class:`StepCache` is the policy and its state; ``LongCatTransformer.run`` (runtime/model.py)
calls its two loop hooks (:meth:`StepCache.after_first_blocks`, :meth:`StepCache.store_middle`)
and the sampler (pipelines/sampler.py, ``denoise(..., cache=StepCache(...))``) drives the runs and
steps. Design notes, the exact policy and measured numbers: docs/design/step_cache.md.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any, Dict, List, Optional

# torch is imported where a tensor is made (the CLI parses --cache without importing torch).
if TYPE_CHECKING:
    import torch

__all__ = ["StepCache", "STEP_CACHE_DEFAULTS", "parse_cache_spec"]

# TaylorSeer takes its first finite difference at a full step this many steps after the cache's
# first store (step 0 of a run): cache-dit 1.5.3's TaylorSeerState counts steps from -1 at that
# store and differences only when its counter is above 1 (docs/design/step_cache.md).
TAYLORSEER_FIRST_DIFFERENCE = 3

# cache-dit's DBCacheConfig defaults (F8B0, 8 warmup steps, unlimited cached steps, 0.08).
STEP_CACHE_DEFAULTS: Dict[str, Any] = {
    "Fn_compute_blocks": 8,
    "Bn_compute_blocks": 0,
    "residual_diff_threshold": 0.08,
    "max_warmup_steps": 8,
    "warmup_interval": 1,
    "max_cached_steps": -1,
    "max_continuous_cached_steps": -1,
    "enable_taylorseer": False,
    "taylorseer_order": 1,
}


def _int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) and type(v).__name__ not in ("int64", "int32"):
        raise ValueError(f"StepCache: {name} must be an int >= {lo}, got {v!r}")
    v = int(v)
    if v < lo:
        raise ValueError(f"StepCache: {name} must be an int >= {lo}, got {v}")
    return v


class StepCache:
    """DBCache step caching with optional TaylorSeer extrapolation (docs/design/step_cache.md).

    Parameters (cache-dit's names and meaning):

    * ``Fn_compute_blocks`` (>= 1): the first blocks, always computed; their output residual
      (stream after block Fn-1 minus the stream entering block 0, noisy tokens only) is the
      decision signal.
    * ``Bn_compute_blocks`` (>= 0): the last blocks, always computed (on a cached step from the
      approximated stream).
    * ``residual_diff_threshold`` (>= 0): a step is cached when
      ``sum|r - r_prev| / sum|r_prev|`` (cache-dit's relative L1, r_prev the Fn residual of the
      last fully computed step) is below it; 0 never caches (bit-identical to no cache).
    * ``max_warmup_steps``, ``warmup_interval`` (>= 1): steps ``range(0, max_warmup_steps,
      warmup_interval)`` are always computed fully.
    * ``max_cached_steps`` (-1 = unlimited): at most this many cached steps per run.
    * ``max_continuous_cached_steps`` (-1 = unlimited): at most this many cached steps in a row.
    * ``enable_taylorseer``, ``taylorseer_order`` (1 or 2): extrapolate the middle residual from
      the last full steps' finite differences (in steps) instead of reusing it; counted as
      cache-dit's calibrator counts, the first difference at a full step of index >= 3 (the second
      at the next), cached steps before that reuse the residual.

    After a run, :attr:`stats` is its report and :meth:`report` the report of every run the
    object served (a pipeline's stages call ``denoise`` several times). One object may be reused
    by runs one after another: each ``denoise`` call starts from an empty cache (so switching
    LoRAs or the schedule between calls resets it), and within a call a change of the LoRA state
    or of the input shapes resets it too. It serves one run at a time: a run begun while another
    is in progress (another thread's, or one started during a step) is a RuntimeError and the
    first carries on; concurrent runs need their own ``StepCache(**cache.params())``.
    """

    def __init__(self, Fn_compute_blocks: int = 8, Bn_compute_blocks: int = 0, residual_diff_threshold: float = 0.08,
                 max_warmup_steps: int = 8, warmup_interval: int = 1, max_cached_steps: int = -1,
                 max_continuous_cached_steps: int = -1, enable_taylorseer: bool = False, taylorseer_order: int = 1):
        self.Fn_compute_blocks = _int("Fn_compute_blocks", Fn_compute_blocks, 1)
        self.Bn_compute_blocks = _int("Bn_compute_blocks", Bn_compute_blocks, 0)
        thr = residual_diff_threshold
        if isinstance(thr, (bool, str)) or not isinstance(thr, (int, float)):
            raise ValueError(f"StepCache: residual_diff_threshold must be a number >= 0, got {thr!r}")
        thr = float(thr)
        if not math.isfinite(thr) or thr < 0:
            raise ValueError(f"StepCache: residual_diff_threshold must be a finite number >= 0, got {thr}")
        self.residual_diff_threshold = thr
        self.max_warmup_steps = _int("max_warmup_steps", max_warmup_steps, 0)
        self.warmup_interval = _int("warmup_interval", warmup_interval, 1)
        self.max_cached_steps = _int("max_cached_steps", max_cached_steps, -1)
        self.max_continuous_cached_steps = _int("max_continuous_cached_steps", max_continuous_cached_steps, -1)
        if not isinstance(enable_taylorseer, bool):
            raise ValueError(f"StepCache: enable_taylorseer must be True or False, got {enable_taylorseer!r}")
        self.enable_taylorseer = enable_taylorseer
        if isinstance(taylorseer_order, bool) or taylorseer_order not in (1, 2):
            raise ValueError(f"StepCache: taylorseer_order must be 1 or 2, got {taylorseer_order!r}")
        self.taylorseer_order = int(taylorseer_order)
        self.runs: List[Dict[str, Any]] = []
        self._run: Optional[Dict[str, Any]] = None
        self._owner = None  # (token, thread id, thread name) of the run in progress
        self._group = None  # the run's signal reduction group (begin_run), None: the CP group's
        self._lock = threading.Lock()  # begin_run's check-and-claim is one step across threads
        self.buffers: Optional[_Buffers] = None  # the device state (see _Buffers)
        self._reset_state()

    # -- the parameters ---------------------------------------------------------------------------
    def params(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in STEP_CACHE_DEFAULTS}

    def __repr__(self) -> str:
        return "StepCache(" + ", ".join(f"{k}={v!r}" for k, v in self.params().items()) + ")"

    @property
    def active(self) -> bool:
        """False when the policy can never cache a step (threshold 0 or ``max_cached_steps=0``):
        ``denoise`` then runs the model exactly as without a cache, and only reports."""
        return self.residual_diff_threshold > 0 and self.max_cached_steps != 0

    def check_depth(self, depth: int) -> None:
        if self.Fn_compute_blocks + self.Bn_compute_blocks >= depth:
            raise ValueError(
                f"StepCache: Fn_compute_blocks + Bn_compute_blocks = {self.Fn_compute_blocks} + "
                f"{self.Bn_compute_blocks} leaves no middle block to cache in a model of depth {depth}; "
                f"use Fn + Bn < {depth}")

    def middle(self, depth: int):
        """The cached blocks: ``range(Fn, depth - Bn)``."""
        return range(self.Fn_compute_blocks, depth - self.Bn_compute_blocks)

    # -- runs and steps (driven by denoise) ----------------------------------------------------------
    def _reset_state(self) -> None:
        # Host state only: the device tensors live in self.buffers (_Buffers), fixed tensors a
        # captured CUDA graph reads and writes; which of them hold something is known here.
        self._forget()
        self._run_len = 0
        self._key = None

    def _forget(self) -> None:
        """The cache holds nothing (a new run, a reset, new buffers)."""
        self._last_full: Optional[int] = None  # the last fully computed step (None: nothing cached)
        self._first_full: Optional[int] = None  # the step that first stored into the empty cache
        self._n_derivs = 0  # TaylorSeer: finite differences stored so far (<= order + 1)

    # A StepCache holds one run's state (the reference residual, the cached residual or TaylorSeer's
    # differences, the step counters), so it serves one run at a time: a second run begun while
    # one is in progress (another thread's, or one interleaved in the same thread: a pipeline
    # call from a step callback, two loops stepping alternately, CFG branches run as separate
    # denoise calls) is refused before it touches that state, and the first carries on.
    def begin_run(self, depth: int, timesteps: List[float], group=None) -> object:
        """A new run (a ``denoise`` call): empty cache, new report. Returns the run's token, for
        :meth:`end_run` / :meth:`abort_run`. RuntimeError while another run is in progress.
        ``group``: the process group whose ranks together hold the step's whole batch and token
        set (CFG-parallel: the replica's ranks, each with one half of the guided batch); the
        signal's sums are all-reduced over it instead of over the CP group, so every rank takes
        the single-process decision."""
        self.check_depth(depth)
        token = object()
        with self._lock:
            if self._run is not None:
                raise RuntimeError(self._busy_message())
            self._reset_state()
            self._depth = depth
            self._run = {"steps": len(timesteps), "depth": depth, "middle_blocks": len(self.middle(depth)),
                         "per_step": [], "resets": 0, "_timesteps": list(timesteps)}
            self._step = -1
            self._group = group
            self._owner = (token, threading.get_ident(), threading.current_thread().name)
        return token

    def _busy_message(self) -> str:
        _, _, thread = self._owner
        run = self._run
        return (f"StepCache: this cache is serving another run (begun in thread {thread!r}, now at step "
                f"{self._step + 1} of {run['steps']}); a StepCache holds one run's state, so it serves one "
                "run at a time. Give each concurrent run (another thread's, a pipeline or denoise call made "
                "during a run, a CFG branch run separately) its own StepCache(**cache.params()); runs one after "
                "another may share one. A run left without end_run() is released by cache.abort_run().")

    def _check_thread(self, where: str) -> None:
        owner = self._owner  # read once: another thread may end the run meanwhile
        if owner is not None and threading.get_ident() != owner[1]:
            raise RuntimeError(
                f"StepCache.{where} from thread {threading.current_thread().name!r}, but the cache is serving a "
                f"run of thread {owner[2]!r}: a StepCache serves one run at a time, in the thread that "
                "began it; give the other thread's run its own StepCache(**cache.params())")

    def abort_run(self, token: Optional[object] = None) -> bool:
        """Release the run in progress without a report (``denoise`` calls it when a run raises),
        only the run of ``token`` when given. True if a run was released."""
        with self._lock:
            if self._run is None or (token is not None and token is not self._owner[0]):
                return False
            self._release()
            return True

    def _release(self) -> None:
        self._run = None
        self._group = None
        self._owner = None
        self._reset_state()
        self.buffers = None  # the tensors are not kept past the run (a graph runner keeps its own)

    def __getstate__(self):  # copy / pickle: the parameters and reports, never a run in progress
        state = dict(self.__dict__, _lock=None, _run=None, _owner=None, buffers=None, _group=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._reset_state()

    def begin_step(self, step: int, key=None) -> None:
        """Step ``step`` of the run starts; ``key`` names what the cached tensors depend on beyond
        the step (the LoRA state, the input shapes): a different key empties the cache."""
        if self._run is None:
            raise RuntimeError("StepCache.begin_step before begin_run")
        self._check_thread("begin_step")
        if key != self._key:
            if self._key is not None:
                self._forget()
                self._run_len = 0
                self._run["resets"] += 1
            self._key = key
        self._step = step
        self._decision: Optional[Dict[str, Any]] = None

    def end_step(self, full_without_hook: bool = False) -> None:
        """After the model call of the step (``full_without_hook``: the model ran without the hook,
        i.e. the cache is inactive: a full step with no signal)."""
        d = self._decision
        if d is None:
            d = {"cached": False, "signal": None, "reason": "inactive" if full_without_hook else "no_hook"}
        d = dict(d, step=self._step, timestep=float(self._run["_timesteps"][self._step]))
        self._run["per_step"].append(d)

    def end_run(self, token: Optional[object] = None) -> Dict[str, Any]:
        """The run is over: its report (appended to :attr:`runs`); the cache is free for the next
        run. ``token``: :meth:`begin_run`'s, checked when given."""
        with self._lock:
            if self._run is None:
                raise RuntimeError("StepCache.end_run without a run in progress (begin_run starts one)")
            if token is not None and token is not self._owner[0]:
                raise RuntimeError("StepCache.end_run: the token is not the run's this cache is serving")
            return self._finish_run()

    def _finish_run(self) -> Dict[str, Any]:
        run = self._run
        per = run["per_step"]
        depth, mid = run["depth"], run["middle_blocks"]
        cached = [d["step"] for d in per if d["cached"]]
        total = len(per) * depth
        saved = len(cached) * mid
        report = {
            "policy": self.params(),
            "steps": len(per),
            "full_steps": len(per) - len(cached),
            "cached_steps": len(cached),
            "cached_step_indices": cached,
            "block_forwards": total - saved,
            "block_forwards_total": total,
            "block_forwards_saved": saved,
            "saved_fraction": saved / total if total else 0.0,
            "signal": [d["signal"] for d in per],
            "decisions": [("cached" if d["cached"] else "full") + ":" + d["reason"] for d in per],
            "resets": run["resets"],
        }
        self.runs.append(report)
        self._release()
        return report

    @property
    def stats(self) -> Optional[Dict[str, Any]]:
        """The last finished run's report (None before any)."""
        return self.runs[-1] if self.runs else None

    def report(self) -> Dict[str, Any]:
        """Totals over every run this object served, and each run's report."""
        keys = ("steps", "full_steps", "cached_steps", "block_forwards", "block_forwards_total", "block_forwards_saved")
        tot = {k: sum(r[k] for r in self.runs) for k in keys}
        tot["saved_fraction"] = tot["block_forwards_saved"] / tot["block_forwards_total"] if tot["block_forwards_total"] else 0.0
        return {"policy": self.params(), **tot, "runs": [dict(r) for r in self.runs]}

    # -- the policy (host side) -----------------------------------------------------------------------
    def _forced_full(self) -> Optional[str]:
        s = self._step
        if s < self.max_warmup_steps and s % self.warmup_interval == 0:
            return "warmup"
        if self._last_full is None:
            return "no_cache_yet"
        n_cached = sum(1 for d in self._run["per_step"] if d["cached"])
        if self.max_cached_steps >= 0 and n_cached >= self.max_cached_steps:
            return "max_cached_steps"
        if self.max_continuous_cached_steps >= 0 and self._run_len >= self.max_continuous_cached_steps:
            return "max_continuous_cached_steps"
        return None

    @property
    def _order(self) -> int:
        return self.taylorseer_order if self.enable_taylorseer else 0

    def graph_key(self) -> tuple:
        """What a captured graph of a step bakes in from this policy (runtime/compiled.py)."""
        return (self.Fn_compute_blocks, self.Bn_compute_blocks, self._order)

    def needs_signal(self) -> bool:
        """Whether this step's decision reads the signal (there is a reference to compare with)."""
        return self._last_full is not None

    def decide(self, sums) -> bool:
        """The step's decision, on the host: ``sums`` is what :meth:`signal` returned (read here:
        the step's one device-to-host read; None when there is no reference yet). Sets the
        scalars the device side of the chosen branch reads (``fill_``: no host sync) and moves the
        host state. True: a cached step."""
        if self._run is None or self._step < 0:
            raise RuntimeError("StepCache: a model call with step_cache= outside a step; denoise(..., cache=) "
                               "drives it (or call begin_run, then begin_step before each call)")
        self._check_thread("decide")
        signal = None
        if sums is not None and self._last_full is not None:
            num, den = sums.tolist()  # the step's one host read
            signal = num / den if den > 0 else math.inf
        reason = self._forced_full()
        if reason is None:
            if signal is None:
                reason = "no_cache_yet"
            elif self.residual_diff_threshold >= 1.0 or signal < self.residual_diff_threshold:
                reason = "below_threshold"
            else:
                reason = "above_threshold"
        cached = reason == "below_threshold"
        self._decision = {"cached": cached, "signal": signal, "reason": reason}
        order, b = self._order, self.buffers
        if cached:
            self._run_len += 1
            dt = float(self._step - self._last_full)
            for k in range(1, order + 1):  # the Taylor coefficients dt^k / k!
                b.scalars[order + k].fill_(dt ** k / math.factorial(k))
            return True
        self._run_len = 0
        if self._first_full is None:
            self._first_full = self._step
        if order:
            # store(): D(k+1) = (Dk - Dk_prev) / dt where Dk_prev exists (k < stored so far), and
            # only from the third step after the cache's first store on (cache-dit's calibrator:
            # its step counter starts at -1 on that store and it differences only above 1); until
            # then a full step keeps D0 alone, so a cached step reuses it.
            differences = self._step - self._first_full >= TAYLORSEER_FIRST_DIFFERENCE
            n = self._n_derivs if differences else 0
            b.scalars[0].fill_(1.0 if self._last_full is None else float(self._step - self._last_full))
            for k in range(order):
                b.scalars[1 + k].fill_(1.0 if k < n else 0.0)
            self._n_derivs = min(n + 1, order + 1)
        self._last_full = self._step  # only full steps move the reference (cache-dit)
        return False

    # -- the device side (called by LongCatTransformer.run, or captured in CUDA graphs) --------------
    # No host reads and no host state here: what varies per step is in buffers.scalars, set by
    # decide(). The same code runs eagerly and inside a graph (runtime/compiled.py).
    def signal(self, x: "torch.Tensor", x_in: "torch.Tensor", num_cond_tokens: int, cp=None, always: bool = False):
        """At the stream after block Fn-1: ``(sums, r)``, ``r`` the Fn residual of the noisy tokens
        and ``sums`` ``[sum|r - r_prev|, sum|r_prev|]`` (float32, all-reduced over the CP group so
        every rank decides alike), or None when there is no reference and not ``always`` (a graph
        computes it every step; decide() ignores it then)."""
        import torch

        self._check_thread("signal")  # the first thing a step's model call does: before the buffers
        r = x[:, num_cond_tokens:] - x_in[:, num_cond_tokens:]
        b = self.buffers
        if b is None or not b.fits(r, x, self._order):
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("StepCache: the cache's buffers must exist before a CUDA graph capture "
                                   "(run the step once uncaptured first)")
            b = self.buffers = _Buffers(r, x, self._order)
            self._forget()  # new tensors hold nothing yet
        if not always and self._last_full is None:
            return None, r
        prev = b.prev.float()
        sums = torch.stack([(r.float() - prev).abs().sum(), prev.abs().sum()])
        group = self._group
        if group is None and cp is not None:
            group = cp.group
        if group is not None:  # every rank takes the same decision from the global sums
            import torch.distributed._functional_collectives as funcol

            sums = funcol.all_reduce(sums, "sum", group)
            wait = getattr(sums, "wait", None)
            sums = wait() if callable(wait) else sums
        return sums, r

    def approximation(self) -> "torch.Tensor":
        """On a cached step: the middle residual to add (reused, or TaylorSeer's extrapolation
        ``D0 + D1 dt + D2 dt^2 / 2`` with the coefficients decide() set), in the stream's dtype.
        Differences not stored yet are exact zeros (store()), so their terms add nothing."""
        b = self.buffers
        if not self._order:
            return b.mid
        out = b.derivs[0]
        for k in range(1, self._order + 1):
            out = out + b.derivs[k] * b.scalars[self._order + k]
        return out.to(b.mid_dtype)

    def start_full(self, r: "torch.Tensor", x: "torch.Tensor") -> Optional["torch.Tensor"]:
        """On a full step, before the middle blocks: ``r`` (the Fn residual) becomes the reference
        now, and without TaylorSeer ``x`` (the stream entering the middle blocks) is staged in the
        middle buffer, so neither is held through the blocks (each is 0.57 GiB in bf16 at 480p
        with CFG, 1.29 GiB at 720p). Returns what :meth:`store` needs back: ``x`` with TaylorSeer
        (its differences are float32; the bf16 input has no buffer to wait in), else None."""
        b = self.buffers
        b.prev.copy_(r)
        if self._order:
            return x
        b.mid.copy_(x)
        return None

    def store(self, x: "torch.Tensor", x_mid_in: Optional["torch.Tensor"] = None) -> None:
        """On a full step, after the middle blocks (``x`` the stream leaving them, ``x_mid_in``
        what :meth:`start_full` returned): the middle residual ``x - x_mid_in`` (all tokens) is
        stored over the staged input, or, with TaylorSeer, its finite differences are updated in
        place. The same values either way as ``x - x_mid_in`` computed in the stream's dtype."""
        import torch

        b = self.buffers
        if not self._order:
            torch.sub(x, b.mid, out=b.mid)
            return
        cur, dt = (x - x_mid_in).float(), b.scalars[0]
        for k in range(self._order):
            nxt = torch.where(b.scalars[1 + k] > 0, (cur - b.derivs[k]) / dt, 0.0)
            b.derivs[k].copy_(cur)
            cur = nxt
        b.derivs[self._order].copy_(cur)

    def adopt_buffers(self, buffers: Optional["_Buffers"]) -> None:
        """Use ``buffers`` (a graph runner's, whose graphs read them) from now on, with what this
        cache holds copied in when it holds something of the same shapes."""
        if buffers is None or buffers is self.buffers:
            return
        if self.buffers is not None and self._last_full is not None and self.buffers.same_shapes(buffers):
            buffers.copy_from(self.buffers)
        elif self._last_full is not None:
            self._forget()
        self.buffers = buffers


class _Buffers:
    """A step cache's device state: fixed tensors, so a CUDA graph captured once reads and writes
    the same storage every step. ``prev`` the reference Fn residual (noisy tokens), ``mid`` the
    middle residual (no TaylorSeer) or ``derivs`` its order + 1 float32 finite differences, and
    ``scalars`` float32 ``[dt, has_D0..has_D(order-1), c_1..c_order]`` (decide() fills them)."""

    __slots__ = ("prev", "mid", "derivs", "scalars", "mid_dtype")

    def __init__(self, r, x, order: int):
        import torch

        self.prev = torch.zeros_like(r)
        self.mid_dtype = x.dtype
        self.mid = None if order else torch.zeros_like(x)
        n = order + 1 if order else 0
        self.derivs = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for _ in range(n)]
        self.scalars = torch.zeros(1 + 2 * order, dtype=torch.float32, device=x.device)

    def tensors(self) -> list:
        return [self.prev] + ([self.mid] if self.mid is not None else []) + list(self.derivs) + [self.scalars]

    def fits(self, r, x, order: int) -> bool:
        full = self.mid if self.mid is not None else (self.derivs[0] if self.derivs else None)
        return (len(self.derivs) == (order + 1 if order else 0) and self.prev.shape == r.shape
                and self.prev.dtype == r.dtype and self.prev.device == r.device and full is not None
                and full.shape == x.shape and self.mid_dtype == x.dtype)

    def same_shapes(self, other: "_Buffers") -> bool:
        a, b = self.tensors(), other.tensors()
        return len(a) == len(b) and all(s.shape == o.shape and s.dtype == o.dtype for s, o in zip(a, b))

    def copy_from(self, other: "_Buffers") -> None:
        for dst, src in zip(self.tensors(), other.tensors()):
            dst.copy_(src)

    def snapshot(self) -> list:
        return [t.clone() for t in self.tensors()]

    def restore(self, saved: list) -> None:
        for dst, src in zip(self.tensors(), saved):
            dst.copy_(src)


def parse_cache_spec(spec: str) -> Dict[str, Any]:
    """The CLI's ``--cache`` value: ``dbcache`` (cache-dit's defaults), ``taylorseer`` (the same
    with TaylorSeer on), optionally followed by ``:key=value,...`` with StepCache parameter
    names (or the short forms fn, bn, threshold/rdt, warmup, interval, max_cached, max_continuous,
    order), e.g. ``dbcache:fn=1,bn=0,threshold=0.12,order=1``. Returns StepCache keyword arguments
    (not validated beyond their syntax; StepCache validates)."""
    short = {"fn": "Fn_compute_blocks", "bn": "Bn_compute_blocks", "threshold": "residual_diff_threshold",
             "rdt": "residual_diff_threshold", "warmup": "max_warmup_steps", "interval": "warmup_interval",
             "max_cached": "max_cached_steps", "max_continuous": "max_continuous_cached_steps",
             "mc": "max_continuous_cached_steps", "taylorseer": "enable_taylorseer", "order": "taylorseer_order"}
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("--cache needs a value: dbcache or taylorseer, optionally :key=value,...")
    head, _, rest = spec.strip().partition(":")
    head = head.strip().lower()
    if head not in ("dbcache", "taylorseer"):
        raise ValueError(f"--cache {spec!r}: the method must be dbcache or taylorseer, got {head!r}")
    out: Dict[str, Any] = {"enable_taylorseer": head == "taylorseer"}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        k, eq, v = item.partition("=")
        k, v = k.strip(), v.strip()
        name = short.get(k.lower(), k)
        if not eq or name not in STEP_CACHE_DEFAULTS:
            raise ValueError(f"--cache {spec!r}: {item!r} is not key=value with a known key "
                             f"({', '.join(sorted(STEP_CACHE_DEFAULTS))} or {', '.join(sorted(short))})")
        if name == "enable_taylorseer":
            if v.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(f"--cache {spec!r}: {k} must be true or false, got {v!r}")
            out[name] = v.lower() in ("1", "true", "yes", "on")
        elif name == "residual_diff_threshold":
            try:
                out[name] = float(v)
            except ValueError:
                raise ValueError(f"--cache {spec!r}: {k} must be a number, got {v!r}") from None
        else:
            try:
                out[name] = int(v)
            except ValueError:
                raise ValueError(f"--cache {spec!r}: {k} must be an int, got {v!r}") from None
    if "taylorseer_order" in out and head == "dbcache" and "enable_taylorseer" not in rest:
        out["enable_taylorseer"] = True  # an order asks for TaylorSeer
    return out
