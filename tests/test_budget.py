"""The device memory budget (pipelines/budget.py): every decision of the plan against an
independent computation from the traced pieces, the VAE's linear trace against a full one, the
text encoder's layer-by-layer run and the parked streamer against the plain ones, the pipeline
set up from a plan, and the official targets of issue 20 at the real shapes (fake tensors)."""

import json

import pytest
import torch

from longcat_native.pipelines import budget as B
from longcat_native.pipelines.budget import Stage, plan_memory
from longcat_native.runtime.config import resolve_config
from longcat_native.runtime.dit import LongCatDiT
from longcat_native.runtime.memory import trace_forward_memory

pytest_plugins = ("tiny_components",)
GiB = 2 ** 30
DEEP = {"depth": 6}  # the tiny preset with enough blocks for streaming to save something


@pytest.fixture(scope="module")
def tiny_configs(tiny_root):
    te = json.loads((tiny_root / "text_encoder" / "config.json").read_text())
    vae = json.loads((tiny_root / "vae" / "config.json").read_text())
    return te, vae


def _stages(vae_latent=(3, 40, 40)):
    return [Stage("te", "text_encode", batch=2, tokens=16), Stage("enc", "vae_encode", latent=vae_latent),
            Stage("den", "denoise", batch=2, latent=(3, 40, 40)), Stage("dec", "vae_decode", latent=vae_latent)]


SMALL_VAE = (2, 8, 8)  # 64-pixel frames: the VAE stages smaller than the denoising pass


def _plan(budget, tiny_configs, vae_latent=(3, 40, 40), **kw):
    te, vae = tiny_configs
    return plan_memory(budget, dit_config=resolve_config("tiny", DEEP), dtype=torch.float32, stages=_stages(vae_latent),
                       text_encoder_config=te, vae_config=vae, overhead_bytes=0, **kw)


def _pieces(tiny_configs, chunk=None, tiling=False, vae_latent=(3, 40, 40)):
    """What each stage needs, computed from the traced pieces directly."""
    te, vae = tiny_configs
    t = B.trace_text_encoder(json.dumps(te, sort_keys=True), 2, 16, torch.float32)
    r = trace_forward_memory("tiny", batch=2, latent=(3, 40, 40), dtype=torch.float32, text_len=512,
                             ffn_chunk_tokens=chunk, config_overrides=DEEP)
    dec = B.trace_vae(json.dumps(vae, sort_keys=True), "decode", vae_latent, tiling, torch.float32)
    enc = B.trace_vae(json.dumps(vae, sort_keys=True), "encode", vae_latent, tiling, torch.float32)
    latents = 4 * 4 * 16 * 2 * 3 * 40 * 40
    denoise = r["inputs"] + r["activation_peak"] + latents
    side = lambda x: x["weights"] + x["inputs"] + x["activation_peak"]  # noqa: E731
    return {"te": side(t), "te_piece": t["largest_piece"] + t["inputs"] + t["activation_peak"],
            "enc": side(enc), "dec": side(dec), "denoise": denoise}


def test_a_large_budget_changes_nothing(tiny_configs):
    plan = _plan("1TiB", tiny_configs)
    p = _pieces(tiny_configs)
    w = LongCatDiT.from_config("tiny", device="meta", dtype=torch.float32, **DEEP).weight_bytes()
    assert plan.fits and not plan.streams and not plan.offload_dit and not plan.vae_tiling
    assert plan.ffn_chunk_tokens is None and not plan.text_encoder_layer_by_layer
    rows = {s.name: s for s in plan.stages}
    assert rows["den"].device_bytes == w + p["denoise"]
    assert rows["te"].device_bytes == w + p["te"]
    assert rows["dec"].device_bytes == w + p["dec"] and rows["enc"].device_bytes == w + p["enc"]
    assert all("dit" in s.on_device for s in plan.stages)
    assert plan.peak_bytes == max(s.device_bytes for s in plan.stages)


def test_each_switch_comes_on_exactly_when_needed(tiny_configs, monkeypatch):
    monkeypatch.setattr(B, "CHUNK_TOKENS", 64)  # so the tiny model's 3 x 20 x 20 x 2 rows are sliced
    p, pc = _pieces(tiny_configs, vae_latent=SMALL_VAE), _pieces(tiny_configs, chunk=64, vae_latent=SMALL_VAE)
    plan = lambda budget, **kw: _plan(budget, tiny_configs, vae_latent=SMALL_VAE, **kw)  # noqa: E731
    w = B.dit_device_bytes(resolve_config("tiny", DEEP), torch.float32)["total"]
    side = max(p["te"], p["enc"], p["dec"])
    assert pc["denoise"] < p["denoise"] and side < pc["denoise"], "the sizes no longer separate the switches"
    # Chunking: the unchunked pass is one byte over, the chunked one fits; the side stages fit beside.
    c = plan(w + p["denoise"] - 1)
    assert c.fits and c.ffn_chunk_tokens == 64 and not c.streams and not c.offload_dit
    assert plan(w + p["denoise"]).ffn_chunk_tokens is None
    # Streaming: the most resident blocks with which the chunked pass fits, computed independently;
    # the side stages then fit beside the resident part or make it wait in host memory.
    depth, tested = LongCatDiT.from_config("tiny", device="meta", **DEEP).cfg.depth, False
    for r_expected in range(depth - 1, -1, -1):
        on = B.dit_device_bytes(resolve_config("tiny", DEEP), torch.float32, resident_blocks=r_expected)["total"]
        if on >= w:  # the staging sets cost what the blocks they replace do: no reason to stream
            continue
        tested = True
        s_plan = plan(on + pc["denoise"])
        assert s_plan.resident_blocks == r_expected and s_plan.streams and s_plan.fits
        den = next(s for s in s_plan.stages if s.kind == "denoise")
        assert den.device_bytes == on + pc["denoise"]
        assert s_plan.offload_dit == (on + side > on + pc["denoise"])
    assert tested
    assert not plan(1).fits
    assert not plan(w + p["denoise"] - 1, allow_chunking=False, allow_streaming=False).fits


@pytest.fixture
def count_traces(monkeypatch):
    """How many traces (runtime.memory.trace_memory calls: every traced stage makes one) ran."""
    from longcat_native.runtime import memory

    calls, trace = [], memory.trace_memory

    def counted(*args, **kwargs):
        calls.append(1)
        return trace(*args, **kwargs)

    monkeypatch.setattr(memory, "trace_memory", counted)
    return calls


# Shapes no other test traces, so the traces cached by earlier tests cannot hide one.
FLOOR_VAE = (2, 6, 10)


def test_a_budget_under_the_floor_gives_up_before_tracing(tiny_configs, count_traces):
    """Issue 27 item 9: the floor (the least weights every allowed setting leaves, inputs, latents,
    overhead) is known without a trace; when the largest stage's floor is over the budget the
    plan gives up at once: nothing traced, every stage's floor in the table, not fitting."""
    plan = _plan("1KiB", tiny_configs, vae_latent=FLOOR_VAE)
    assert count_traces == [] and not plan.traced and not plan.fits
    assert plan.floor_bytes == plan.peak_bytes > 1024 and all(not s.fits for s in plan.stages)
    assert [s.name for s in plan.stages] == ["te", "enc", "den", "dec"]
    assert not (plan.streams or plan.ffn_chunk_tokens or plan.offload_dit or plan.vae_tiling
                or plan.text_encoder_layer_by_layer)  # nothing chosen: nothing can run
    text = B.format_plan(plan)
    assert "does NOT fit" in text and "not traced" in text and "gave up before tracing" in text
    assert "settings: none chosen" in text
    assert json.loads(json.dumps(plan.to_dict()))["traced"] is False


def test_the_floor_is_a_lower_bound_of_every_plan(tiny_configs, count_traces):
    """At a budget of exactly the floor the planner traces (it may fit or not); each stage's floor
    parts are at most the traced ones with every setting on, so a run the planner can fit is
    never refused by the floor."""
    floor = _plan("1KiB", tiny_configs, vae_latent=FLOOR_VAE)
    assert count_traces == []
    at = _plan(floor.floor_bytes, tiny_configs, vae_latent=FLOOR_VAE)
    assert at.traced and len(count_traces) > 0 and at.floor_bytes == floor.floor_bytes
    assert not _plan(floor.floor_bytes - 1, tiny_configs, vae_latent=FLOOR_VAE).traced
    traced = {s.name: s for s in at.stages}
    for s in floor.stages:  # at this budget every switch is on, so the traced stages are the least
        for part, n in s.parts.items():
            assert n <= traced[s.name].parts[part], (s.name, part)
        assert s.device_bytes <= traced[s.name].device_bytes


def test_a_step_cache_is_counted_in_every_denoising_stage(tiny_configs):
    """With a StepCache the denoising stage is its cached run's traced peak, its buffers a part of
    their own; a budget the plain pass fits exactly then needs forward chunking."""
    from longcat_native.runtime.step_cache import StepCache

    sc = StepCache(Fn_compute_blocks=1, Bn_compute_blocks=1, enable_taylorseer=True, taylorseer_order=2)
    p = _pieces(tiny_configs)
    kw = dict(batch=2, latent=(3, 40, 40), dtype=torch.float32, text_len=512, config_overrides=DEEP)
    r, plain = trace_forward_memory("tiny", step_cache=sc, **kw), trace_forward_memory("tiny", **kw)
    w = B.dit_device_bytes(resolve_config("tiny", DEEP), torch.float32)["total"]
    plan = _plan("1TiB", tiny_configs, step_cache=sc)
    den = next(s for s in plan.stages if s.kind == "denoise")
    assert den.parts["step_cache"] == r["step_cache_bytes"] > 0
    assert den.parts["activations"] + den.parts["step_cache"] == r["activation_peak"]
    assert den.device_bytes == w + p["denoise"] - plain["activation_peak"] + r["activation_peak"] > w + p["denoise"]
    assert plan.step_cache == sc.params() and "step cache F1B1 TaylorSeer order 2" in B.format_plan(plan)
    assert json.loads(json.dumps(plan.to_dict()))["step_cache"]["taylorseer_order"] == 2
    assert "step_cache" not in next(s for s in _plan("1TiB", tiny_configs).stages if s.kind == "denoise").parts
    assert _plan(w + p["denoise"], tiny_configs).ffn_chunk_tokens is None
    assert _plan(w + p["denoise"], tiny_configs, step_cache=sc).ffn_chunk_tokens is not None
    with pytest.raises(ValueError, match="StepCache"):
        _plan("1TiB", tiny_configs, step_cache={"Fn_compute_blocks": 1})


def test_model_offload_when_a_stage_does_not_fit_beside_the_dit(tiny_configs):
    p = _pieces(tiny_configs)
    w = B.dit_device_bytes(resolve_config("tiny", DEEP), torch.float32)["total"]
    side = max(p["te"], p["enc"], p["dec"])
    assert side > p["denoise"]  # 320-pixel VAE stages: the largest
    plan = _plan(w + side - 1, tiny_configs, allow_vae_tiling=False)
    assert plan.fits and plan.offload_dit and not plan.streams
    assert all("dit" not in s.on_device for s in plan.stages if s.kind != "denoise")
    assert not _plan(w + side, tiny_configs).offload_dit


def test_text_encoder_layer_by_layer_when_it_does_not_fit_alone(tiny_configs):
    p = _pieces(tiny_configs)
    assert p["te_piece"] < p["te"]
    te, vae = tiny_configs
    # The text encoder alone: a budget under the denoising pass's floor would give up before tracing.
    plan = lambda budget: plan_memory(budget, dit_config=resolve_config("tiny", DEEP), dtype=torch.float32,  # noqa: E731
                                      stages=_stages()[:1], text_encoder_config=te, vae_config=vae, overhead_bytes=0)
    layered = plan(p["te"] - 1)
    assert layered.text_encoder_layer_by_layer and layered.fits and layered.offload_dit
    te_row = layered.stages[0]
    assert te_row.parts["text_encoder_weights"] < p["te"] - p["te_piece"] + te_row.parts["text_encoder_weights"]
    assert not plan(p["te"]).text_encoder_layer_by_layer


def test_vae_tiling_only_when_whole_frames_do_not_fit(tiny_configs):
    p, pt = _pieces(tiny_configs), _pieces(tiny_configs, tiling=True)
    assert pt["dec"] < p["dec"]  # 320-pixel frames in 256-pixel tiles
    w = B.dit_device_bytes(resolve_config("tiny", DEEP), torch.float32)["total"]
    budget = max(pt["dec"], pt["enc"], p["te"], w + p["denoise"])
    if budget >= max(p["dec"], p["enc"]):
        pytest.skip("whole frames fit at this size")
    plan = _plan(budget, tiny_configs)
    assert plan.vae_tiling and any("tiling" in n for n in plan.notes)
    assert not _plan(budget, tiny_configs, allow_vae_tiling=False).fits


def test_vae_trace_line_matches_a_full_trace(tiny_configs):
    """The Wan VAE works one latent frame at a time: the peak traced at T = 3 and 4 and extended
    along the line equals the trace at T = 7."""
    _, vae = tiny_configs
    cfg = json.dumps(vae, sort_keys=True)
    for op in ("decode", "encode"):
        line = B.trace_vae(cfg, op, (7, 24, 32), False, torch.float32)
        full = B.trace_vae(cfg, op, (7, 24, 32), False, torch.float32, exact=True)
        assert line["activation_peak"] == full["activation_peak"], op
        assert line["inputs"] == full["inputs"], op


def test_text_encoder_layer_by_layer_is_the_same_encoding(tiny_root):
    from longcat_native.pipelines.components import TextEncoder, layer_pieces

    te = TextEncoder.from_pretrained(tiny_root, dtype=torch.float32, device="cpu")
    whole = te.encode(["a cat walking on the grass", "a dog"])
    te.layer_by_layer = True
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in layer_pieces(te.model)]
    sliced = te.encode(["a cat walking on the grass", "a dog"])
    assert torch.equal(whole[0], sliced[0]) and torch.equal(whole[1], sliced[1])
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in layer_pieces(te.model)] == hooks
    assert all(p.device.type == "cpu" for p in te.model.parameters())


def test_parked_streamer_holds_nothing_and_comes_back_bit_exact():
    dit = LongCatDiT.from_config("tiny", kernels="reference", seed=4, offload="blocks", resident_blocks=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    t = torch.rand(1, generator=g) * 1000
    text = torch.randn(1, 1, 5, dit.cfg.caption_channels, generator=g)
    with torch.no_grad():
        ref = dit(x, t, text)
        streamer = dit.weight_streamer
        streamer.park()
        assert streamer.parked and streamer.staging == []
        with pytest.raises(RuntimeError, match="parked"):
            dit(x, t, text)
        streamer.unpark()
        assert torch.equal(dit(x, t, text), ref)


def test_pipeline_applies_a_plan(tiny_root, tiny_configs, monkeypatch):
    from longcat_native.pipelines import LongCatVideoPipeline

    monkeypatch.setattr(B, "CHUNK_TOKENS", 64)
    pipe = LongCatVideoPipeline.from_pretrained(tiny_root, dtype=torch.float32, device="cpu")
    plan = B.MemoryPlan(budget_bytes=GiB, quantize=None, dtype="float32", ffn_chunk_tokens=64, resident_blocks=None,
                        depth=pipe.dit.cfg.depth, offload_dit=True, vae_tiling=True, text_encoder_layer_by_layer=True)
    with pytest.warns(UserWarning, match="tile seams"):
        pipe.apply_memory_plan(plan)
    assert pipe.dit.ffn_chunk_tokens == 64 and pipe.vae.tiling and pipe.text_encoder.layer_by_layer
    assert pipe.memory_plan is plan and pipe._home == torch.device("cpu")
    assert "resident blocks" in B.format_plan(plan)


def test_pipeline_plans_its_step_cache(tiny_root):
    """from_pretrained(max_memory=, step_cache=) plans the cache's buffers; a call with a cache the
    plan was not made with warns (it may not fit); step_cache without a budget is an error."""
    import warnings

    from longcat_native.pipelines import LongCatVideoPipeline
    from longcat_native.runtime.step_cache import StepCache

    sc = StepCache(Fn_compute_blocks=1, residual_diff_threshold=0.5, max_warmup_steps=1)
    load = dict(dtype=torch.float32, device="cpu", vae=False, max_memory="1TiB")
    pipe = LongCatVideoPipeline.from_pretrained(tiny_root, step_cache=sc, **load)
    assert pipe.memory_plan.step_cache == sc.params()
    assert all("step_cache" in s.parts for s in pipe.memory_plan.stages if s.kind == "denoise")
    kw = dict(num_frames=9, height=64, width=96, num_steps=2, progress=False, output_type="latent")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.generate_t2v("a cat walking", cache=sc, **kw)
    with pytest.warns(UserWarning, match="another step cache"):
        pipe.generate_t2v("a cat walking", cache=StepCache(Fn_compute_blocks=1, enable_taylorseer=True), **kw)
    plain = LongCatVideoPipeline.from_pretrained(tiny_root, **load)
    with pytest.warns(UserWarning, match="without a step cache"):
        plain.generate_t2v("a cat walking", cache=sc, **kw)
    with pytest.raises(ValueError, match="needs max_memory"):
        LongCatVideoPipeline.from_pretrained(tiny_root, step_cache=sc, **dict(load, max_memory=None))


def test_budget_strings_are_checked(tiny_configs):
    with pytest.raises(ValueError, match="byte count"):
        _plan("24 bananas", tiny_configs)


def test_official_targets_at_the_real_shapes():
    """Issue 20's targets, traced at the real shapes (umT5-XXL, the Wan 2.1 VAE, the 13.6B DiT):
    FP8 weights <= 14.5 GiB; the official 3-stage run fits 24 GiB in FP8 without streaming and
    12 GiB with it; bf16 fits 24 GiB with streaming and not without."""
    fp8 = B.dit_device_bytes("longcat-video", quantize="fp8")["total"]
    assert fp8 <= 14.5 * GiB
    p24 = plan_memory("24GiB", quantize="fp8")
    assert p24.fits and not p24.streams, B.format_plan(p24)
    p12 = plan_memory("12GiB", quantize="fp8")
    assert p12.fits and p12.streams, B.format_plan(p12)
    b24 = plan_memory("24GiB")
    assert b24.fits and b24.streams, B.format_plan(b24)
    assert not plan_memory("24GiB", allow_streaming=False).fits


def test_pipeline_from_pretrained_with_a_budget(tiny_root):
    """from_pretrained(max_memory=) plans the official run for this checkpoint's own components
    (only those it loads) and keeps the plan; a budget nothing fits is an error before loading."""
    from longcat_native.pipelines import LongCatVideoPipeline

    pipe = LongCatVideoPipeline.from_pretrained(tiny_root, dtype=torch.float32, device="cpu", vae=False,
                                                max_memory="1TiB")
    plan = pipe.memory_plan
    assert plan.fits and [s.name for s in plan.stages] == ["text_encode", "denoise_480p", "denoise_720p"]
    assert pipe.dit.ffn_chunk_tokens is None and pipe.dit.weight_streamer is None
    with pytest.raises(ValueError, match="does not fit max_memory"):
        LongCatVideoPipeline.from_pretrained(tiny_root, dtype=torch.float32, device="cpu", vae=False,
                                             max_memory="1MiB")
    with pytest.raises(ValueError, match="not both"):
        LongCatVideoPipeline.from_pretrained(tiny_root, dtype=torch.float32, device="cpu", vae=False,
                                             max_memory="1TiB", offload="blocks")
