"""Issue 19's fuzz test: hypothesis drives the forward and ``denoise`` of a tiny random-weights
model (reference path, CPU, small shapes) with random shapes, dtypes, masks, caches and flags.
Each call either returns finite output of the right shape or raises ValueError (CheckpointError
is one) with a message; never another exception. The model is checked to still give its first
answer after every example (no call leaves it changed).

Each example is drawn in one of three modes: "valid" (every argument valid: the call must
return), "fault" (exactly one argument wrong: the call must raise ValueError), "chaos" (every
argument drawn freely: either outcome). Tensor values are finite where they matter (a NaN in a
valid input is the caller's to avoid; the forward makes no host sync to look), but masked-out text
tokens hold junk (NaN, Inf, 1e30): they must not contribute.
"""

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import longcat_native as lcn
from longcat_native.pipelines.sampler import denoise
from longcat_native.runtime.kv_cache import KVCache

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink], print_blob=True)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and it keeps the run time steady on a shared
    machine (contended OpenMP threads spin)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.lru_cache(maxsize=None)
def model(zero_pad: bool):
    return lcn.LongCatDiT.from_config("tiny", kernels="reference", seed=0, text_tokens_zero_pad=zero_pad)


@functools.lru_cache(maxsize=None)
def reference_output(zero_pad: bool):
    g = torch.Generator().manual_seed(123)
    x, text = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 1, 3, 64, generator=g)
    return x, text, model(zero_pad)(x, torch.tensor([500.0]), text)


def still_the_same(zero_pad: bool):
    x, text, ref = reference_output(zero_pad)
    assert torch.equal(model(zero_pad)(x, torch.tensor([500.0]), text), ref), "a call changed the model"


def outcome(fn):
    """("ok", result) or ("error", message); any exception but ValueError fails the test."""
    try:
        result = fn()
        event("returned")
        return "ok", result
    except ValueError as e:  # CheckpointError and NonFiniteLatentsError are ValueErrors
        event("ValueError")
        msg = str(e)
        assert msg.strip(), f"{type(e).__name__} without a message"
        assert len(msg) < 5000, f"a {len(msg)}-character message"
        return "error", msg


FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
JUNK = [float("nan"), float("inf"), -float("inf"), 1e30, 0.0]
MODES = ["valid"] * 10 + ["fault"] * 7 + ["chaos"] * 3


class Draw:
    """Draws arguments in one mode; ``pick(name, valid, invalid)`` draws from ``valid`` unless this
    argument is the one fault (or, in chaos mode, by a coin)."""

    def __init__(self, data, faults):
        self.data = data
        self.mode = data.draw(st.sampled_from(MODES), label="mode")
        self.fault = data.draw(st.sampled_from(faults), label="fault") if self.mode == "fault" else None
        self.chaos = {}

    def __call__(self, strategy, label):
        return self.data.draw(strategy, label=label)

    def wrong(self, name) -> bool:
        if self.mode != "chaos":
            return self.fault == name
        if name not in self.chaos:  # asked once per argument
            self.chaos[name] = self(st.integers(0, 3), f"{name} wrong?") == 0
        return self.chaos[name]

    def pick(self, name, valid, invalid):
        return self(st.sampled_from(invalid if self.wrong(name) else valid), name)


def draw_tensor(d, shape, dtypes, name, scale=1.0, positive=False):
    dtype = d(st.sampled_from(dtypes), f"{name}.dtype")
    seed = d(st.integers(0, 2**16), f"{name}.seed")
    t = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)) * scale
    t = t.abs() if positive else t
    if dtype == torch.bool:
        return t > 0
    return t.to(dtype) if dtype.is_floating_point else (t * 10).to(dtype)


TEXT_FAULTS = ["text.L", "text.C", "text.batch", "text.dtype", "text.type", "mask.shape", "mask.type", "mask.meta"]


def draw_text(d, B, batches=None, prefix="text", L=None, mask_4d=True):
    """(encoder_hidden_states, encoder_attention_mask), junk in the masked-out tokens."""
    w = lambda f: d.wrong(f if prefix == "text" else f.replace("text", prefix))  # noqa: E731
    if L is None:
        L = d(st.integers(1, 5), f"{prefix}.L")
    L = 0 if w("text.L") else L
    Bt = d(st.sampled_from(batches or [B]), f"{prefix}.batch") if not w("text.batch") else B + 1
    C = 32 if w("text.C") else 64
    four_d = d(st.booleans(), f"{prefix}.4-D")
    shape = (Bt, 1, L, C) if four_d else (Bt, L, C)
    text = draw_tensor(d, shape, [torch.int64] if w("text.dtype") else FLOAT_DTYPES, prefix)
    if w("text.type"):
        text = text.tolist()
    kind = d(st.sampled_from(["none", "bool", "long", "float", "4d"]), f"{prefix}.mask")
    if kind == "none" and not (w("mask.shape") or w("mask.type") or w("mask.meta")):
        return text, None
    Lm = L + 1 if w("mask.shape") else L
    seed = d(st.integers(0, 2**16), f"{prefix}.mask.seed")
    mask = torch.rand(Bt, Lm, generator=torch.Generator().manual_seed(seed)) > 0.4
    if isinstance(text, torch.Tensor) and text.is_floating_point() and Lm == L:
        junk = d(st.sampled_from(JUNK), f"{prefix}.junk")
        invalid = ~mask[:, None, :, None] if four_d else ~mask[:, :, None]
        text = text.masked_fill(invalid.expand_as(text), torch.tensor(junk).to(text.dtype))  # 1e30: inf in fp16
    if kind == "long":
        mask = mask.long()
    elif kind == "float":
        mask = mask.float()
    elif kind == "4d" and mask_4d:  # the forward takes [B, 1, 1, L] too; denoise [B, L] only
        mask = mask[:, None, None, :]
    if w("mask.type"):
        mask = mask.tolist()
    elif w("mask.meta"):
        mask = mask.to("meta")
    return text, mask


CACHE_FAULTS = ["cache.grid", "cache.missing block", "cache.not a tensor", "cache.meta", "cache.short v",
                "cache.int", "cache.not a pair", "cache.batch", "cache.type"]


def draw_cache(d, dit, B, T, H, W):
    """(kv_cache_dict or None, frames it holds)."""
    broken = [f for f in CACHE_FAULTS if d.wrong(f)]
    kind = d(st.sampled_from(["none", "none", "empty", "own", "own", "plain"]), "cache")
    if not broken and kind in ("none", "empty"):
        return (None if kind == "none" else {}), 0
    m = d(st.integers(1, 2), "cache frames")
    if "cache.grid" in broken:
        H, W = d(st.sampled_from([(g, h) for g, h in [(W, H), (2, 8), (4, 4), (8, 2), (2, 2)] if (g, h) != (H, W)]),
                 "cache grid")
    Bc = d(st.sampled_from([1, B]), "cache batch") if "cache.batch" not in broken else B + 1
    H, W = max(2, H // 2 * 2), max(2, W // 2 * 2)  # a valid grid to make it from (chaos: H may be odd)
    cond = torch.randn(Bc, 16, m, H, W, generator=torch.Generator().manual_seed(m))
    _, kv = dit(cond, torch.zeros(Bc), None, return_kv=True, skip_crs_attn=True)
    assert isinstance(kv, KVCache) and kv.grid == (m, H, W)
    if kind == "plain" and "cache.grid" not in broken:
        kv = dict(kv)
    for how in broken:
        if how == "cache.type":
            return list(kv.values()), m
        if how != "cache.grid":
            kv = dict(kv)
        good = kv[0] if isinstance(kv[0], tuple) and isinstance(kv[0][0], torch.Tensor) else (cond, cond)
        if how == "cache.missing block":
            kv.pop(1, None)
        elif how == "cache.not a tensor":
            kv[0] = (good[0].tolist(), good[1])
        elif how == "cache.meta":
            kv[0] = tuple(t.to("meta") for t in good)
        elif how == "cache.short v":
            kv[0] = (good[0], good[1][:, :, :-1])
        elif how == "cache.int":
            kv[0] = tuple(t.long() for t in good)
        elif how == "cache.not a pair":
            kv[0] = good[0]
    return kv, m


FORWARD_FAULTS = (["x.channels", "x.odd", "x.dtype", "x.meta", "x.empty", "x.rank", "t.shape", "t.dtype", "t.type",
                   "t.meta", "text.none", "num_cond_latents"] + TEXT_FAULTS + CACHE_FAULTS)


@settings(max_examples=400, **SETTINGS)
@given(st.data())
def test_forward_fuzz(data):
    d = Draw(data, FORWARD_FAULTS)
    zero_pad = d(st.booleans(), "text_tokens_zero_pad")
    dit = model(zero_pad)
    B, T = d(st.integers(1, 2), "B"), d(st.integers(1, 3), "T")
    H, W = d(st.sampled_from([2, 4, 6]), "H"), d(st.sampled_from([2, 4, 6]), "W")
    if d.wrong("x.odd"):
        W = d(st.sampled_from([1, 3, 5]), "odd W")
    Cin = 8 if d.wrong("x.channels") else 16
    shape = (B, Cin, 0 if d.wrong("x.empty") else T, H, W)
    x = draw_tensor(d, shape, [torch.int64, torch.bool] if d.wrong("x.dtype") else FLOAT_DTYPES, "x")
    if d.wrong("x.meta"):
        x = x.to("meta")
    if d.wrong("x.rank"):
        x = x[0]
    t_shape = d.pick("t.shape", [(B,), (B, T)], [(B, T + 1), (), (B + 1,), (B, T, 1)])
    t = draw_tensor(d, t_shape, [torch.bool] if d.wrong("t.dtype") else [torch.float32, torch.bfloat16, torch.int64],
                    "t", scale=300, positive=True)
    if d.wrong("t.type"):
        t = [500.0] * B
    elif d.wrong("t.meta"):
        t = t.to("meta")
    skip = d(st.booleans(), "skip_crs_attn")
    text, mask = draw_text(d, B)
    if skip and not d.wrong("text.none"):
        text = d(st.sampled_from([None, text]), "text under skip")
    elif d.wrong("text.none"):
        text, skip = None, False
    if skip and d.mode == "fault" and d.fault in TEXT_FAULTS:
        skip = False  # the fault must be seen
    cache, m = draw_cache(d, dit, B, T, H, W)
    nc_valid = [0, m] if cache else [0, 1, T, np.int64(1), np.int32(0), torch.tensor(1)]
    nc_valid = [v for v in nc_valid if int(v) <= T]
    nc = d.pick("num_cond_latents", nc_valid, [T + 1 + m, -1, 1.5, "1", True, None])
    return_kv = d(st.booleans(), "return_kv")
    offload = d(st.booleans(), "offload_kv_cache")

    kind, result = outcome(lambda: dit(x, t, text, mask, num_cond_latents=nc, return_kv=return_kv,
                                       kv_cache_dict=cache, skip_crs_attn=skip, offload_kv_cache=offload))
    if d.mode != "chaos":
        assert kind == ("ok" if d.mode == "valid" else "error"), (d.mode, d.fault, result)
    if kind == "ok":
        out = result[0] if return_kv else result
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert tuple(out.shape) == (B, 16, T, H, W), (tuple(out.shape), (B, 16, T, H, W))
        assert torch.isfinite(out).all(), "non-finite output from valid inputs"
        if return_kv:
            kv = result[1]
            assert isinstance(kv, KVCache) and sorted(kv) == list(range(dit.config.depth))
            assert kv.grid == (T, H, W)
            for k, v in kv.values():
                assert k.shape == v.shape == (B, 4, T * (H // 2) * (W // 2), 32)
                assert torch.isfinite(k).all() and torch.isfinite(v).all()
    still_the_same(zero_pad)


DENOISE_FAULTS = (["noise.dtype", "noise.odd", "noise.rank", "noise.meta", "noise.nan", "guidance", "steps",
                   "cond.frames", "cond.shape", "kv without cond", "extra", "negative missing"]
                  + TEXT_FAULTS + [f.replace("text", "negative") for f in TEXT_FAULTS[:4]])


@settings(max_examples=250, **SETTINGS)
@given(st.data())
def test_denoise_fuzz(data):
    d = Draw(data, DENOISE_FAULTS)
    zero_pad = d(st.booleans(), "text_tokens_zero_pad")
    dit = model(zero_pad)
    B, T = d(st.integers(1, 2), "B"), d(st.integers(1, 3), "T")
    H, W = d(st.sampled_from([2, 4]), "H"), d(st.sampled_from([2, 4]), "W")
    if d.wrong("noise.odd"):
        H = 3
    noise = draw_tensor(d, (B, 16, T, H, W), [torch.int64] if d.wrong("noise.dtype") else
                        [torch.float32, torch.bfloat16], "noise")
    if d.wrong("noise.nan") and noise.is_floating_point():
        noise = noise.clone()
        noise.view(-1)[0] = float("nan")
    if d.wrong("noise.rank"):
        noise = noise[0]
    elif d.wrong("noise.meta"):
        noise = noise.to("meta")
    L = d(st.integers(1, 5), "L")  # negative and positive run as one batch: the same length
    text, mask = draw_text(d, B, batches=[1, B], L=L, mask_4d=False)
    guided = d.pick("guidance", [1.0, 0.5, 3.0, np.float32(2.0)], [float("inf"), float("nan"), "4", None])
    if d.mode == "fault" and (d.fault == "negative missing" or d.fault.startswith("negative.")):
        guided = 3.0  # guidance, so the negative embeddings are needed and used
    negative = neg_mask = None
    needs_negative = isinstance(guided, (float, np.floating)) and guided > 1
    if (needs_negative and not d.wrong("negative missing")) or (not needs_negative and d(st.booleans(), "neg")):
        negative, neg_mask = draw_text(d, B, batches=[1, B], prefix="negative", L=L, mask_4d=False)
    steps = d.pick("steps", [1, 2, np.int64(2)], [0, -3, 10**9, 2.5, "2"])
    m = 0
    if T > 1 and not d.wrong("kv without cond") and d(st.booleans(), "cond?"):
        m = d(st.integers(1, T - 1), "cond frames")
    if d.wrong("cond.frames"):
        m = T
    cond = None
    if m:
        ch = H + 2 if d.wrong("cond.shape") else H
        cond = draw_tensor(d, (d(st.sampled_from([1, B]), "cond batch"), 16, m, ch, W),
                           [torch.float32, torch.float16], "cond")
    elif d.wrong("cond.shape"):
        cond = torch.zeros(B, 16, 1, H + 2, W)
    use_kv = d(st.booleans(), "use_kv_cache") if cond is not None else d.wrong("kv without cond")
    distill = d(st.booleans(), "distill")
    valid_extra = [{}, {"shift": 3.0}, {"cfg_zero_cond_frames": False}] + (
        [] if distill else [{"t_thresh": 0.5}] + ([] if cond is not None else [{"enhance_hf": True}]))
    invalid_extra = [{"t_thresh": float("nan")}, {"shift": float("inf")}, {"shift": -1.0}] + (
        [{"enhance_hf": True}, {"t_thresh": 0.5}] if distill else [{"t_thresh": 2.0}])
    extra = d.pick("extra", valid_extra, invalid_extra)

    kind, result = outcome(lambda: denoise(dit, noise, text, mask, negative, neg_mask, num_steps=steps,
                                           guidance_scale=guided, distill=distill, cond_latents=cond,
                                           use_kv_cache=use_kv, progress=False, **extra))
    if d.mode != "chaos":
        assert kind == ("ok" if d.mode == "valid" else "error"), (d.mode, d.fault, result)
    if kind == "ok":
        assert isinstance(result, torch.Tensor) and result.dtype == torch.float32
        assert result.shape == noise.shape
        assert torch.isfinite(result).all()
        if cond is not None:  # the conditioning frames come back bit-exact
            assert torch.equal(result[:, :, :m], cond.float().expand(B, -1, -1, -1, -1))
    still_the_same(zero_pad)
