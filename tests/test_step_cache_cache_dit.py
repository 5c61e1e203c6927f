"""The step cache against cache-dit itself (its oracle; docs/design/step_cache.md).

cache-dit 1.5.3 (``pip install cache-dit==1.5.3 --no-deps``; skipped when absent) drives the tiny
LongCatDiT's own blocks through its ``BlockAdapter`` with ``ForwardPattern.Pattern_3`` (each
block takes and returns the residual stream only) and DBCache, with and without its TaylorSeer
calibrator; :class:`StepCache` runs the same blocks with the same parameters, on the same inputs
and schedule. Every step must take the same decision (cache-dit's ``cached_steps``) and the
latents agree to float32 noise (1e-5 relative; on the reference kernels they come out equal:
the view's norm, block and gated residual are the ops the fused forward runs).

cache-dit sees the model as a diffusers transformer would be: :class:`CacheDitView` holds a
``ModuleList`` of :class:`Pattern3Block` (one of our blocks each: its norm, the block, the gated
residual) and its forward loops over it; cache-dit replaces that list by its cached blocks during
the forward. The DiT's ``run`` is pointed at the view for the test, so ``denoise`` (the same
sampler, CFG as one batch: ``enable_separate_cfg=False``) drives both.
"""

import logging

import pytest
import torch

cache_dit = pytest.importorskip("cache_dit")

from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig  # noqa: E402

import longcat_native as lcn  # noqa: E402
from longcat_native.kernels.residual_layernorm_modulate import gated_residual_reference  # noqa: E402
from longcat_native.pipelines.sampler import denoise  # noqa: E402
from longcat_native.runtime.step_cache import StepCache  # noqa: E402

STEPS = 8
logging.getLogger("cache_dit").setLevel(logging.ERROR)  # its per-call info lines


class Pattern3Block(torch.nn.Module):
    """One LongCatBlock on the residual stream alone (cache-dit's Pattern_3: ``hidden_states`` in,
    ``hidden_states`` out): the block's modulated norm, the block, its gated FFN residual. The
    per-call facts (timestep embedding, context, kernel path) ride along in ``stream``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner  # not "block": cache-dit's pattern check would look through that name

    def forward(self, hidden_states: torch.Tensor, stream) -> torch.Tensor:
        mod = self.inner.modulation(stream.t)
        h = stream.ops.layernorm_modulate(hidden_states, mod[0], mod[1])
        x, ffn_out, gate, _ = self.inner([hidden_states, h], mod, stream.ctx, stream.ops, None)
        return gated_residual_reference(x, ffn_out, gate)


class CacheDitView(torch.nn.Module):
    """The DiT as cache-dit adapts a transformer: ``blocks`` (Pattern_3) and a forward looping
    over them; ``dit.run`` goes through it (an instance attribute, this test's only)."""

    def __init__(self, dit):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Pattern3Block(b) for b in dit.blocks])
        object.__setattr__(self, "dit", dit)  # not a submodule: the blocks are registered above
        dit.run = lambda **kw: self(**kw)

    def forward(self, **kw):
        dit = self.dit
        s = dit.begin(**kw)
        x = s.x
        for block in self.blocks:  # cache-dit's cached blocks while its forward is patched in
            x = block(x, s)
        shift, scale = dit.final_layer.modulation(s.t)
        s.h = s.ops.layernorm_modulate(x, shift, scale)
        return dit.finish(s)


def _dit():
    return lcn.LongCatDiT.from_config("tiny", seed=0, depth=5, kernels="reference")


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 16, 2, 8, 8, generator=g)
    pe = torch.randn(1, 1, 8, 64, generator=g)
    ne = torch.randn(1, 1, 8, 64, generator=g)
    return noise, pe, ne


def _denoise(dit, inputs, cache=None):
    noise, pe, ne = inputs
    return denoise(dit, noise, pe, None, ne, None, num_steps=STEPS, progress=False, graphs=False, cache=cache)


class _Pipe:
    """A pipeline for cache-dit to wrap: its call is one ``denoise`` run (cache-dit renews the
    cache context at every pipeline call, as for a diffusers pipeline). cache-dit patches the
    pipeline's class, so each run of the test makes a class of its own (:func:`_cache_dit_run`)."""

    def __init__(self, dit):
        self.dit = dit
        self.transformer = CacheDitView(dit)

    def __call__(self, inputs):
        return _denoise(self.dit, inputs)


def _cache_dit_run(policy, inputs, runs=1):
    """cache-dit on a fresh copy of the tiny DiT: the latents, cached steps and signals of each run."""
    pipe = type("_Pipe", (_Pipe,), {})(_dit())
    view = pipe.transformer
    taylor = policy.get("enable_taylorseer", False)
    db = {k: v for k, v in policy.items() if k not in ("enable_taylorseer", "taylorseer_order")}
    cache_dit.enable_cache(
        BlockAdapter(pipe=pipe, transformer=view, blocks=view.blocks, forward_pattern=ForwardPattern.Pattern_3,
                     check_forward_pattern=True),
        cache_config=DBCacheConfig(enable_separate_cfg=False, **db),
        calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=policy["taylorseer_order"]) if taylor else None)
    out = []
    for _ in range(runs):
        latents = pipe(inputs)
        ctx = view._context_manager.get_context(view._context_names[0])
        out.append((latents, list(ctx.get_cached_steps()), dict(ctx.get_residual_diffs())))
    return out


POLICIES = [
    dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.45, max_warmup_steps=2),
    dict(Fn_compute_blocks=2, Bn_compute_blocks=1, residual_diff_threshold=0.45, max_warmup_steps=3, warmup_interval=2),
    dict(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.9, max_warmup_steps=1, max_cached_steps=3),
    # cached, full (above the threshold), cached, cached, full (the limit): the in-a-row counter
    # starts again at every full step, as cache-dit's
    dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.3, max_warmup_steps=1,
         max_continuous_cached_steps=2),
    # TaylorSeer: cached steps before cache-dit's first difference (a full step of index >= 3) and
    # after it; full steps forced in between (max_continuous_cached_steps) move the differences.
    dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.9, max_warmup_steps=2,
         max_continuous_cached_steps=1, enable_taylorseer=True, taylorseer_order=1),
    dict(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.9, max_warmup_steps=3,
         max_continuous_cached_steps=2, enable_taylorseer=True, taylorseer_order=1),
    dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.9, max_warmup_steps=4,
         max_continuous_cached_steps=1, enable_taylorseer=True, taylorseer_order=2),
    dict(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.9, max_warmup_steps=1,
         max_continuous_cached_steps=1, enable_taylorseer=True, taylorseer_order=2),
]


def _id(p):
    short = {"Fn_compute_blocks": "F", "Bn_compute_blocks": "B", "residual_diff_threshold": "thr",
             "max_warmup_steps": "w", "warmup_interval": "i", "max_cached_steps": "mc",
             "max_continuous_cached_steps": "mcc", "taylorseer_order": "ts"}
    return "-".join(f"{short[k]}{v}" for k, v in p.items() if k in short and (k != "taylorseer_order"
                                                                              or p.get("enable_taylorseer")))


# Two runs on one object where the counting restarts (DBCache's counters, TaylorSeer's steps).
TWO_RUNS = (0, 6)


@pytest.mark.parametrize("i", range(len(POLICIES)), ids=[_id(p) for p in POLICIES])
def test_step_cache_equals_cache_dit(i):
    policy = POLICIES[i]
    inputs = _inputs()
    theirs = _cache_dit_run(policy, inputs, runs=2 if i in TWO_RUNS else 1)
    dit = _dit()
    cache = StepCache(**policy)
    for run, (expected, cached_steps, diffs) in enumerate(theirs):
        out = _denoise(dit, inputs, cache)
        st = cache.stats
        assert st["cached_step_indices"] == cached_steps, (run, st["decisions"], st["signal"], diffs)
        # The test means something: some steps cached, some computed after the warmup.
        assert 2 <= len(cached_steps) <= STEPS - policy["max_warmup_steps"] - 1, (cached_steps, diffs)
        # The same signal (cache-dit's ratio of means; ours the ratio of sums, in float32).
        for step, d in diffs.items():
            ours = st["signal"][int(step)]
            assert ours is not None and abs(ours - d) <= 1e-5 * abs(d), (step, ours, d)
        err = ((out - expected).abs().max() / expected.abs().max()).item()
        assert err <= 1e-5, (run, err)
    if len(theirs) == 2:
        assert theirs[0][1] == theirs[1][1]  # cache-dit's second run starts empty too
        assert torch.equal(theirs[0][0], theirs[1][0])
