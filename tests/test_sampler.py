"""The sampler: official schedules (schedules.json), the golden sampling cases through denoise,
CFG-zero, conditioning frames, the KV-cache path, no host syncs in the loop, input errors."""

import json

import pytest
import torch
from cases import CASES_DIR, FIXTURE_ROOT, load_case
from helpers import MODEL_RTOL, assert_close_rel, max_rel_err

from longcat_native.runtime.dit import LongCatDiT
from longcat_native.pipelines.sampler import (
    Schedule, base_sigmas, cfg_zero, denoise, distill_sigmas, enhance_hf_schedule, flow_schedule,
    get_schedule, shift_sigmas, truncate_schedule,
)

SAMPLE_CASES = ["sample_t2v_cfg", "sample_t2v_distill", "sample_i2v_cfg"]


@pytest.fixture(scope="module")
def fixture_dit():
    return LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")


class Spy:
    """Wraps a DiT, records every call's arguments, forwards everything else."""

    def __init__(self, dit):
        self.dit, self.calls = dit, []

    def __getattr__(self, name):
        return getattr(self.dit, name)

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.dit(*args, **kwargs)


def _run_case(dit, name, **extra):
    inputs, _, expected, meta = load_case(name)
    out = denoise(dit, inputs["noise"], inputs["prompt_embeds"], inputs["prompt_mask"],
                  inputs["negative_embeds"], inputs["negative_mask"], cond_latents=inputs.get("cond_latents"),
                  progress=False, **meta["kwargs"], **extra)
    return inputs, expected, out


# -- schedules -----------------------------------------------------------------------------------

def _schedules():
    return json.loads((CASES_DIR / "schedules.json").read_text())


@pytest.mark.parametrize("name,steps,distill", [("base_50", 50, False), ("base_4", 4, False),
                                                ("distill_16", 16, True), ("distill_4", 4, True)])
def test_schedules_match_official(name, steps, distill):
    data = _schedules()
    assert data["scheduler_config"]["shift"] == 12.0 and not data["scheduler_config"]["use_dynamic_shifting"]
    ref = data["schedules"][name]
    raw = distill_sigmas(steps) if distill else base_sigmas(steps)
    assert torch.equal(raw, torch.tensor(ref["sigmas_in"], dtype=torch.float32))
    sched = flow_schedule(steps, distill=distill, shift=12.0)
    assert torch.equal(sched.timesteps, torch.tensor(ref["timesteps"], dtype=torch.float32))
    assert torch.equal(sched.sigmas, torch.tensor(ref["sigmas"], dtype=torch.float32))
    assert torch.equal(shift_sigmas(raw, 12.0), sched.sigmas[:-1])


def test_refine_schedule_matches_official():
    ref = _schedules()["schedules"]["refine_t_thresh_0.5"]
    sched = get_schedule(50, t_thresh=0.5)
    assert len(sched) == 5
    assert torch.equal(sched.timesteps, torch.tensor(ref["timesteps"], dtype=torch.float32))
    assert torch.equal(sched.sigmas, torch.tensor(ref["sigmas"], dtype=torch.float32))


def test_enhance_hf_schedule():
    base = flow_schedule(50)
    sched = get_schedule(50, enhance_hf=True)
    head = base.timesteps[base.timesteps > 500]
    assert len(head) == 46 and len(sched) == 46 + 10
    assert torch.equal(sched.timesteps[:46], head)
    assert sched.timesteps[46:].tolist() == [500.0 - 50.0 * i for i in range(10)]
    assert torch.equal(sched.sigmas, torch.cat([sched.timesteps / 1000, torch.zeros(1)]))
    assert torch.equal(enhance_hf_schedule(base).timesteps, sched.timesteps)


def test_schedule_errors():
    with pytest.raises(ValueError, match="num_steps"):
        flow_schedule(0)
    with pytest.raises(ValueError, match="at most 50"):
        distill_sigmas(51)
    with pytest.raises(ValueError, match="enhance_hf and distill"):
        get_schedule(16, distill=True, enhance_hf=True)
    with pytest.raises(ValueError, match="t_thresh"):
        truncate_schedule(flow_schedule(50), 0.0)
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(base_sigmas(4), 0.0)
    with pytest.raises(ValueError, match="timesteps"):
        Schedule(torch.zeros(3), torch.zeros(3))


# -- golden sampling cases -----------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLE_CASES)
def test_sample_cases(fixture_dit, name):
    inputs, expected, out = _run_case(fixture_dit, name)
    assert out.dtype == torch.float32
    assert_close_rel(out, expected["latents"], MODEL_RTOL, name)
    if "cond_latents" in inputs:  # conditioning frames come back bit-exact
        m = inputs["cond_latents"].shape[2]
        assert torch.equal(out[:, :, :m], inputs["cond_latents"])


def test_i2v_cfg_zero_includes_cond_frames(fixture_dit):
    """The official i2v takes CFG-zero's scale over the whole output, conditioning frame included:
    leaving it out is measurably different from the golden data."""
    _, expected, out = _run_case(fixture_dit, "sample_i2v_cfg", cfg_zero_cond_frames=False)
    assert max_rel_err(out, expected["latents"]) > 2 * MODEL_RTOL  # vs ~2e-6 with it included


def test_i2v_timesteps_and_batch_order(fixture_dit):
    spy = Spy(fixture_dit)
    inputs, expected, out = _run_case(spy, "sample_i2v_cfg")
    assert len(spy.calls) == 3
    for args, kwargs in spy.calls:
        x, t, text, mask = args
        assert x.shape[0] == 2 and t.shape == (2, 3)
        assert torch.all(t[:, 0] == 0) and torch.all(t[:, 1:] > 0)
        assert kwargs == {"num_cond_latents": 1}
        # negative prompt first, as the official pipeline
        assert torch.equal(text[:1].cpu(), inputs["negative_embeds"])
        assert torch.equal(text[1:].cpu(), inputs["prompt_embeds"])
        assert torch.equal(mask[:1].cpu(), inputs["negative_mask"])
        assert torch.equal(mask[1:].cpu(), inputs["prompt_mask"])
    assert [float(c[0][1][0, 1]) for c in spy.calls] == pytest.approx(flow_schedule(3).timesteps.tolist())


def test_no_guidance_runs_no_negative_branch(fixture_dit):
    spy = Spy(fixture_dit)
    inputs, _, _, _ = load_case("sample_t2v_distill")
    out = denoise(spy, inputs["noise"], inputs["prompt_embeds"], inputs["prompt_mask"], None, None,
                  num_steps=4, guidance_scale=1.0, distill=True, progress=False)
    assert len(spy.calls) == 4 and all(a[0].shape[0] == 1 and a[2].shape[0] == 1 for a, _ in spy.calls)
    # negative embeddings, if given, are ignored at guidance <= 1
    out2 = denoise(fixture_dit, inputs["noise"], inputs["prompt_embeds"], inputs["prompt_mask"],
                   inputs["negative_embeds"], inputs["negative_mask"], num_steps=4, guidance_scale=0.5,
                   distill=True, progress=False)
    assert torch.equal(out, out2)


def test_cfg_zero_formula():
    g = torch.Generator().manual_seed(0)
    vu = torch.randn(2, 16, 3, 4, 6, generator=g)
    vc = torch.randn(2, 16, 3, 4, 6, generator=g) + 0.5 * vu
    out = cfg_zero(vu, vc, 4.0)
    for b in range(2):  # per sample, over all elements, in float64
        u, c = vu[b].double(), vc[b].double()
        s = (u * c).sum() / ((u * u).sum() + 1e-8)
        ref = u * s + 4.0 * (c - u * s)
        assert torch.allclose(out[b].double(), ref, rtol=1e-5, atol=1e-5)
    # guidance 1 with the optimized scale gives back v_cond
    assert torch.allclose(cfg_zero(vu, vc, 1.0), vc, atol=1e-5)


def test_no_host_sync_in_the_loop(fixture_dit, monkeypatch):
    """Everything the loop does outside the DiT call (CFG-zero, Euler step, conditioning frames,
    timesteps) runs with host-reading tensor methods made to raise."""
    armed = {"on": False}

    def trap(name, orig):
        def f(self, *a, **k):
            if armed["on"]:
                raise AssertionError(f"host sync: Tensor.{name} called inside the sampling loop")
            return orig(self, *a, **k)
        return f

    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, trap(name, getattr(torch.Tensor, name)))

    class Arming:
        config = fixture_dit.config
        dtype = fixture_dit.dtype
        device = fixture_dit.device

        def __call__(self, *args, **kwargs):
            armed["on"] = False
            try:
                return fixture_dit(*args, **kwargs)
            finally:
                armed["on"] = True

    inputs, _, expected, meta = load_case("sample_i2v_cfg")
    try:
        out = denoise(Arming(), inputs["noise"], inputs["prompt_embeds"], inputs["prompt_mask"],
                      inputs["negative_embeds"], inputs["negative_mask"], cond_latents=inputs["cond_latents"],
                      progress=False, callback=lambda i, t, x: None, **meta["kwargs"])
    finally:
        armed["on"] = False
    assert_close_rel(out, expected["latents"], MODEL_RTOL, "i2v under the sync trap")


def test_kv_cache_path_equals_full_path(fixture_dit):
    inputs, _, _, _ = load_case("sample_t2v_cfg")
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(1, 16, 2, 8, 12, generator=g)
    spy = Spy(fixture_dit)
    kw = dict(num_steps=3, guidance_scale=4.0, cond_latents=cond, progress=False)
    args = (inputs["noise"], inputs["prompt_embeds"], inputs["prompt_mask"], inputs["negative_embeds"],
            inputs["negative_mask"])
    cached = denoise(spy, *args, use_kv_cache=True, **kw)
    full = denoise(fixture_dit, *args, cfg_zero_cond_frames=False, **kw)
    assert_close_rel(cached, full, 1e-5, "kv cache vs full")
    assert torch.equal(cached[:, :, :2], cond) and torch.equal(full[:, :, :2], cond)
    # one prefill on the clean frames (t = 0, no cross-attention), then noisy frames only
    (pre_args, pre_kw), steps = spy.calls[0], spy.calls[1:]
    assert pre_kw["return_kv"] and pre_kw["skip_crs_attn"] and pre_args[0].shape[2] == 2
    assert torch.all(pre_args[1] == 0)
    assert len(steps) == 3
    cache = steps[0][1]["kv_cache_dict"]
    for a, k in steps:
        assert a[0].shape[2] == 1 and k["num_cond_latents"] == 2 and k["kv_cache_dict"] is cache


def test_determinism(fixture_dit):
    _, _, a = _run_case(fixture_dit, "sample_t2v_cfg")
    _, _, b = _run_case(fixture_dit, "sample_t2v_cfg")
    assert torch.equal(a, b)


def test_progress_lines(fixture_dit, capsys):
    inputs, _, _, _ = load_case("sample_t2v_distill")
    seen = []
    denoise(fixture_dit, inputs["noise"], inputs["prompt_embeds"], num_steps=2, guidance_scale=1.0,
            progress=True, callback=lambda i, t, x: seen.append((i, t)))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("s/step" in line for line in err) and "1/2" in err[0]
    assert [i for i, _ in seen] == [0, 1] and seen[0][1] == 1000.0


def test_bad_inputs(fixture_dit):
    spy = Spy(fixture_dit)
    inputs, _, _, _ = load_case("sample_t2v_cfg")
    noise, pe, pm, ne, nm = (inputs[k] for k in ("noise", "prompt_embeds", "prompt_mask", "negative_embeds",
                                                 "negative_mask"))
    with pytest.raises(ValueError, match="cond_latents"):
        denoise(spy, noise, pe, cond_latents=torch.zeros(1, 16, 1, 8, 10), guidance_scale=1.0)
    with pytest.raises(ValueError, match="fewer than"):
        denoise(spy, noise, pe, cond_latents=torch.zeros(1, 16, 3, 8, 12), guidance_scale=1.0)
    with pytest.raises(ValueError, match="negative_embeds"):
        denoise(spy, noise, pe, pm, guidance_scale=4.0)
    with pytest.raises(ValueError, match="same length"):
        denoise(spy, noise, pe, pm, ne[:, :, :5], nm[:, :5], guidance_scale=4.0)
    with pytest.raises(ValueError, match="channels"):
        denoise(spy, noise[:, :8], pe, guidance_scale=1.0)
    with pytest.raises(ValueError, match="patch"):
        denoise(spy, noise[..., :7], pe, guidance_scale=1.0)
    with pytest.raises(ValueError, match="prompt_mask"):
        denoise(spy, noise, pe, pm[:, :3], guidance_scale=1.0)
    with pytest.raises(ValueError, match="need cond_latents"):
        denoise(spy, noise, pe, use_kv_cache=True, guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"LongCatVideoPipeline.encode_prompt"):
        denoise(spy, noise, "a prompt string", guidance_scale=1.0)
    assert spy.calls == []  # every error came before any model work
