"""The pipelines end to end on the tiny config (random weights, reference path, CPU): shapes,
determinism, conditioning frames untouched, video continuation with and without the KV cache,
refinement's schedule and padding, LoRA/BSA switching, errors before any model work; and
LongCatVideoPipeline on the tiny checkpoint root (text encoder + VAE): prompt strings, pixel
images/videos, decoded output."""

import numpy as np
import pytest
import torch
from helpers import assert_close_rel

from longcat_native import pipelines as P
from longcat_native.runtime.dit import LongCatDiT
from longcat_native.pipelines.sampler import get_schedule

pytest_plugins = ("tiny_components",)  # the session-wide tiny_root fixture


class Spy:
    def __init__(self, dit):
        self.dit, self.calls = dit, []

    def __getattr__(self, name):
        return getattr(self.dit, name)

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.dit(*args, **kwargs)


class ExtrasSpy(Spy):
    """A model that offers the LoRA / BSA switches (recording them)."""

    def __init__(self, dit):
        super().__init__(dit)
        self.events, self.lora_dict = [], {}

    def load_lora(self, path, key, **kw):
        self.events.append(("load", key))
        self.lora_dict[key] = path

    def enable_loras(self, keys):
        self.events.append(("enable", tuple(keys)))

    def disable_all_loras(self):
        self.events.append(("disable_loras",))

    def enable_bsa(self):
        self.events.append(("bsa", True))

    def disable_bsa(self):
        self.events.append(("bsa", False))


class Bare:
    """A model with no LoRA / BSA methods at all."""

    def __init__(self, dit):
        self.dit = dit
        self.config, self.device, self.dtype = dit.config, dit.device, dit.dtype

    def __call__(self, *a, **k):
        return self.dit(*a, **k)


@pytest.fixture(scope="module")
def dit():
    return LongCatDiT.from_config("tiny", kernels="reference", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def text():
    g = torch.Generator().manual_seed(0)
    pe, ne = torch.randn(1, 1, 8, 64, generator=g), torch.randn(1, 1, 8, 64, generator=g)
    pm = torch.ones(1, 8, dtype=torch.long)
    pm[:, 5:] = 0
    nm = torch.ones(1, 8, dtype=torch.long)
    nm[:, 2:] = 0
    return pe, pm, ne, nm


def _lat(*shape, seed=5):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


SMALL = dict(num_steps=3, progress=False)


def test_t2v(dit, text):
    a = P.generate_t2v(dit, *text, num_frames=9, height=64, width=96, seed=1, **SMALL)
    assert a.shape == (1, 16, 3, 8, 12) and a.dtype == torch.float32 and torch.isfinite(a).all()
    b = P.generate_t2v(dit, *text, latent=(3, 8, 12), seed=1, **SMALL)
    c = P.generate_t2v(dit, *text, latent=(3, 8, 12), seed=2, **SMALL)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # seed -> noise -> denoise, nothing else random
    noise = P.make_noise((1, 16, 3, 8, 12), seed=1)
    d = P.generate_t2v(dit, *text, latent=(3, 8, 12), noise=noise, **SMALL)
    assert torch.equal(a, d)


def test_t2v_distill_no_cfg(dit, text):
    spy = Spy(dit)
    pe, pm, _, _ = text
    out = P.generate_t2v(spy, pe, pm, latent=(2, 8, 12), distill=True, guidance_scale=1.0, num_steps=4,
                         progress=False)
    assert out.shape == (1, 16, 2, 8, 12) and len(spy.calls) == 4
    assert all(a[0].shape[0] == 1 for a, _ in spy.calls)
    assert [float(a[1][0, 0]) for a, _ in spy.calls] == pytest.approx(get_schedule(4, distill=True).timesteps.tolist())


def test_i2v(dit, text):
    img = _lat(1, 16, 1, 8, 12)
    a = P.generate_i2v(dit, img, *text, num_frames=9, seed=3, **SMALL)
    b = P.generate_i2v(dit, img[:, :, 0], *text, num_frames=9, seed=3, **SMALL)  # [B, C, H, W] accepted
    assert a.shape == (1, 16, 3, 8, 12) and torch.equal(a, b)
    assert torch.equal(a[:, :, :1], img)  # the image latent is untouched


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_vc_kv_cache_matches_no_cache(dit, text, guidance):
    video = _lat(1, 16, 5, 8, 12)
    kw = dict(num_frames=13, num_cond_frames=5, num_steps=4, guidance_scale=guidance, seed=7, progress=False)
    spy = Spy(dit)
    cached = P.generate_vc(spy, video, *text, use_kv_cache=True, **kw)
    # without the cache, leaving the conditioning frames out of CFG-zero's scale (not the official default)
    full = P.generate_vc(dit, video, *text, use_kv_cache=False, cfg_zero_cond_frames=False, **kw)
    assert cached.shape == (1, 16, 4, 8, 12)
    assert torch.equal(cached[:, :, :2], video[:, :, -2:]) and torch.equal(full[:, :, :2], video[:, :, -2:])
    assert_close_rel(cached, full, 1e-5, "vc cached vs not")
    # one prefill, then every step reuses the same cache over the 2 noisy frames (enhance_hf schedule)
    n = len(get_schedule(4, enhance_hf=True))
    assert len(spy.calls) == 1 + n and spy.calls[0][1]["return_kv"]
    caches = {id(k["kv_cache_dict"]) for _, k in spy.calls[1:]}
    assert len(caches) == 1 and all(a[0].shape[2] == 2 for a, _ in spy.calls[1:])


def test_vc_official_no_cache_scale_differs(dit, text):
    """Without the KV cache the official scale includes the conditioning frames (the default);
    cfg_zero_cond_frames=False leaves them out, another result."""
    video = _lat(1, 16, 5, 8, 12)
    kw = dict(num_frames=13, num_cond_frames=5, num_steps=4, seed=7, progress=False, use_kv_cache=False)
    a = P.generate_vc(dit, video, *text, cfg_zero_cond_frames=False, **kw)
    b = P.generate_vc(dit, video, *text, **kw)
    assert torch.equal(b, P.generate_vc(dit, video, *text, cfg_zero_cond_frames=True, **kw))
    assert not torch.equal(a, b) and torch.equal(b[:, :, :2], video[:, :, -2:])


def test_long_video(dit, text):
    kw = dict(latent=(3, 8, 12), num_cond_frames=5, num_steps=2, seed=11, progress=False)
    out = P.generate_long(dit, *text, num_segments=2, **kw)
    assert out.shape == (1, 16, 3 + 2 * 1, 8, 12) and torch.isfinite(out).all()
    again = P.generate_long(dit, *text, num_segments=2, **kw)
    assert torch.equal(out, again)
    # the first segment is the text-to-video of the same seed
    first = P.generate_t2v(dit, *text, latent=(3, 8, 12), num_steps=2, seed=11, progress=False)
    assert torch.equal(out[:, :, :3], first)
    # continuing given latents keeps them untouched
    cont = P.generate_long(dit, *text, num_segments=1, first_latents=first, **kw)
    assert cont.shape == (1, 16, 4, 8, 12) and torch.equal(cont[:, :, :3], first)


def test_refine(dit, text):
    pe, pm, _, _ = text
    stage1 = _lat(1, 16, 3, 8, 12)
    spy = Spy(dit)
    torch.manual_seed(0)  # refinement's noise comes from the global RNG, as officially
    out = P.generate_refine(spy, stage1, pe, pm, seed=1, progress=False)
    assert out.shape == (1, 16, 3, 16, 24) and torch.isfinite(out).all()
    # official: t = 500 then the 50-step schedule below it (5 steps), no guidance, padded to 4 frames
    ts = [float(a[1][0, 0]) for a, _ in spy.calls]
    assert ts == pytest.approx(get_schedule(50, t_thresh=0.5).timesteps.tolist())
    assert all(a[0].shape == (1, 16, 4, 16, 24) for a, _ in spy.calls)
    torch.manual_seed(0)
    assert torch.equal(out, P.generate_refine(dit, stage1, pe, pm, seed=1, progress=False))
    assert not torch.equal(out, P.generate_refine(dit, stage1, pe, pm, seed=1, progress=False))  # state moved on
    # refine_rng="generator": the call's seed instead (deterministic without seeding torch)
    g1 = P.generate_refine(dit, stage1, pe, pm, seed=1, refine_rng="generator", progress=False)
    assert torch.equal(g1, P.generate_refine(dit, stage1, pe, pm, seed=1, refine_rng="generator", progress=False))
    assert not torch.equal(g1, P.generate_refine(dit, stage1, pe, pm, seed=2, refine_rng="generator", progress=False))
    with pytest.raises(ValueError, match="refine_rng"):
        P.generate_refine(dit, stage1, pe, pm, refine_rng="cuda", progress=False)
    # with refined conditioning latents and temporal doubling
    cond = _lat(1, 16, 2, 16, 24, seed=9)
    spy = Spy(dit)
    out2 = P.generate_refine(spy, stage1, pe, pm, cond_latents=cond, temporal_upsample=True, seed=1, progress=False)
    assert out2.shape == (1, 16, 5, 16, 24) and torch.equal(out2[:, :, :2], cond)
    a, k = spy.calls[0]
    assert a[0].shape[2] == 4 + 4 and k["num_cond_latents"] == 4 and torch.all(a[1][:, :4] == 0)


def test_refine_lora_and_bsa_switching(dit, text, tmp_path):
    pe, pm, _, _ = text
    stage1 = _lat(1, 16, 2, 8, 12)
    lora_file = tmp_path / "refinement_lora.safetensors"
    lora_file.write_bytes(b"")
    m = ExtrasSpy(dit)
    P.generate_refine(m, stage1, pe, pm, lora="refinement_lora", lora_path=str(lora_file), enable_bsa=True,
                      num_steps=50, progress=False)
    assert m.events == [("load", "refinement_lora"), ("enable", ("refinement_lora",)), ("bsa", True),
                        ("bsa", False), ("disable_loras",)]
    m.events.clear()
    P.generate_refine(m, stage1, pe, pm, progress=False)  # not asked: nothing switched
    assert m.events == []
    with pytest.raises(NotImplementedError, match="enable_bsa"):
        P.generate_refine(Bare(dit), stage1, pe, pm, enable_bsa=True, progress=False)
    with pytest.raises(NotImplementedError, match="enable_loras"):
        P.generate_refine(Bare(dit), stage1, pe, pm, lora="refinement_lora", progress=False)
    with pytest.raises(ValueError, match="not loaded"):
        P.generate_refine(ExtrasSpy(dit), stage1, pe, pm, lora="refinement_lora", progress=False)


def test_generate_dispatch(dit, text):
    img = _lat(1, 16, 1, 8, 12)
    a = P.generate(dit, "i2v", *text, image_latents=img, num_frames=5, seed=0, **SMALL)
    b = P.generate_i2v(dit, img, *text, num_frames=5, seed=0, **SMALL)
    assert torch.equal(a, b)


def test_bad_inputs_fail_before_model_work(dit, text):
    spy = Spy(dit)
    pe, pm, ne, nm = text
    img = _lat(1, 16, 1, 8, 12)
    with pytest.raises(ValueError, match="unknown task"):
        P.generate(spy, "v2v", pe, pm)
    with pytest.raises(ValueError, match="takes no image_latents"):
        P.generate(spy, "t2v", pe, pm, ne, nm, image_latents=img)
    with pytest.raises(ValueError, match="needs image_latents"):
        P.generate(spy, "i2v", pe, pm, ne, nm)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        P.generate_t2v(spy, pe, pm, ne, nm, num_frames=10, height=64, width=96)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        P.generate_i2v(spy, img, pe, pm, ne, nm, num_frames=8)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        P.generate_vc(spy, _lat(1, 16, 3, 8, 12), pe, pm, ne, nm, num_frames=12)
    with pytest.raises(ValueError, match="multiples of 16"):
        P.generate_t2v(spy, pe, pm, ne, nm, num_frames=9, height=64, width=100)
    with pytest.raises(ValueError, match="1 latent frame"):
        P.generate_i2v(spy, _lat(1, 16, 2, 8, 12), pe, pm, ne, nm, num_frames=9)
    with pytest.raises(ValueError, match="channels"):
        P.generate_i2v(spy, _lat(1, 8, 1, 8, 12), pe, pm, ne, nm, num_frames=9)
    with pytest.raises(ValueError, match="needs the last"):
        P.generate_vc(spy, _lat(1, 16, 1, 8, 12), pe, pm, ne, nm, num_frames=13, num_cond_frames=5)
    with pytest.raises(ValueError, match="nothing to generate"):
        P.generate_vc(spy, _lat(1, 16, 3, 8, 12), pe, pm, ne, nm, num_frames=5, num_cond_frames=5)
    with pytest.raises(ValueError, match="refined size"):
        P.generate_refine(spy, _lat(1, 16, 2, 8, 12), pe, pm, cond_latents=_lat(1, 16, 1, 8, 12))
    with pytest.raises(ValueError, match="negative_embeds"):
        P.generate_t2v(spy, pe, pm, latent=(2, 8, 12), guidance_scale=4.0)
    with pytest.raises(ValueError, match="enhance_hf and distill"):
        P.generate_vc(spy, _lat(1, 16, 3, 8, 12), pe, pm, num_frames=13, num_cond_frames=5, distill=True,
                      enhance_hf=True, guidance_scale=1.0)
    # strings, pixels and decoded output belong to LongCatVideoPipeline, which says so
    with pytest.raises(ValueError, match=r"LongCatVideoPipeline.*longcat-native\[pipelines\]"):
        P.generate_t2v(spy, "a cat", latent=(2, 8, 12), guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"output_type='latent'.*LongCatVideoPipeline"):
        P.generate_t2v(spy, pe, pm, ne, nm, latent=(2, 8, 12), output_type="np")
    with pytest.raises(ValueError, match=r"pixels.*LongCatVideoPipeline"):
        P.generate_i2v(spy, img, pe, pm, ne, nm, num_frames=9, image=object())
    assert spy.calls == []


def test_unknown_keywords_are_type_errors_naming_them(dit, text):
    """Every task states its own arguments and takes the shared SamplingOptions: anything else is a
    TypeError naming it, as Python's own, before any model work."""
    spy = Spy(dit)
    pe, pm, ne, nm = text
    with pytest.raises(TypeError, match=r"^generate_t2v\(\) got an unexpected keyword argument 'num_step'$"):
        P.generate_t2v(spy, pe, pm, ne, nm, latent=(2, 8, 12), num_step=3)
    with pytest.raises(TypeError, match=r"generate_vc\(\) got an unexpected keyword argument 'first_latents'"):
        P.generate(spy, "vc", pe, pm, ne, nm, video_latents=_lat(1, 16, 3, 8, 12), first_latents=None)
    for shared_elsewhere in ("guidance_scale", "distill"):  # refinement runs without guidance
        with pytest.raises(TypeError, match=f"generate_refine\\(\\) got an unexpected keyword argument "
                                            f"'{shared_elsewhere}'"):
            P.generate_refine(spy, _lat(1, 16, 2, 4, 6), pe, pm, **{shared_elsewhere: 1.0})
    with pytest.raises(TypeError, match="unexpected keyword argument 'height'"):
        P.generate_i2v(spy, _lat(1, 16, 1, 8, 12), pe, pm, ne, nm, height=64)
    assert spy.calls == []
    opts = P.SamplingOptions(num_steps=3, progress=False)
    a = P.generate_t2v(dit, pe, pm, ne, nm, latent=(2, 8, 12), **opts.as_kwargs(seed=2))
    b = P.generate_t2v(dit, pe, pm, ne, nm, latent=(2, 8, 12), seed=2, **SMALL)
    assert torch.equal(a, b)


@pytest.mark.skipif(not hasattr(LongCatDiT, "enable_loras"), reason="the model has no LoRA support yet")
def test_refine_with_the_checkpoint_lora(text):
    from cases import FIXTURE_ROOT

    ckpt = LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    pe, pm, _, _ = text
    stage1 = _lat(1, 16, 2, 8, 12)
    kw = dict(seed=0, refine_rng="generator", progress=False)
    plain = P.generate_refine(ckpt, stage1, pe, pm, **kw)
    lora = P.generate_refine(ckpt, stage1, pe, pm, lora="refinement_lora",
                             lora_kwargs=dict(lora_network_dim=4, lora_network_alpha=2.0), **kw)
    assert "refinement_lora" in ckpt.lora_dict and not torch.equal(plain, lora)
    # switched off again after the call
    assert torch.equal(plain, P.generate_refine(ckpt, stage1, pe, pm, **kw))


# -- LongCatVideoPipeline: the text encoder and the VAE of the tiny checkpoint root ----------------

@pytest.fixture(scope="module")
def pipe(tiny_root):
    return P.LongCatVideoPipeline.from_pretrained(tiny_root, kernels="reference", device="cpu", dtype=torch.float32)


def _frames(n, h=40, w=70, seed=0):
    """uint8 frames [n, h, w, 3] (an image, a video) of another size than the model's."""
    g = np.random.default_rng(seed)
    return (g.random((n, h, w, 3)) * 255).astype(np.uint8)


PIX = dict(height=64, width=96, progress=False)


def test_pipeline_t2v_from_prompt_strings(pipe, monkeypatch):
    offloads = []
    real = pipe.text_encoder.offload
    monkeypatch.setattr(pipe.text_encoder, "offload", lambda: offloads.append(1) or real())
    kw = dict(num_frames=9, num_steps=2, **PIX)
    video = pipe.generate_t2v("a cat walking", seed=1, **kw)
    assert isinstance(video, np.ndarray) and video.shape == (1, 9, 64, 96, 3) and video.dtype == np.float32
    assert 0 <= video.min() <= video.max() <= 1
    assert offloads == [1]  # the encoder left the device once both prompts were encoded
    # the same as the pipeline function on the encoded prompt, decoded
    text = pipe.encode_prompt("a cat walking", guidance_scale=4.0)
    assert text[0].shape == (1, 1, 512, 64) and text[1].shape == (1, 512) and text[2] is not None
    lat = P.generate_t2v(pipe.dit, *text, seed=1, **kw)
    assert np.array_equal(pipe.decode(lat), video)
    assert torch.equal(pipe.generate_t2v("a cat walking", seed=1, output_type="latent", **kw), lat)
    assert not torch.equal(pipe.generate_t2v("a dog running", seed=1, output_type="latent", **kw), lat)
    assert not torch.equal(pipe.generate_t2v("a cat walking", "blurred static", seed=1, output_type="latent", **kw),
                           lat)
    pt = pipe.decode(lat, "pt")
    u8 = pipe.decode(lat, "video")
    assert pt.shape == (1, 9, 3, 64, 96) and np.array_equal(pt.permute(0, 1, 3, 4, 2).numpy(), video)
    assert u8.shape == (1, 9, 64, 96, 3) and u8.dtype == np.uint8
    assert np.array_equal(u8, (video * 255).astype(np.uint8))  # the official demos' truncation
    # no guidance: no negative prompt encoded, a given one ignored (as officially)
    assert pipe.encode_prompt(["a cat", "a dog"], guidance_scale=1.0)[2] is None
    assert pipe.encode_prompt(["a cat", "a dog"], "blurred", guidance_scale=1.0)[2] is None
    unguided = dict(kw, guidance_scale=1.0, seed=1, output_type="latent")
    assert torch.equal(pipe.generate_t2v("a cat walking", "blurred", **unguided),
                       pipe.generate_t2v("a cat walking", **unguided))
    # num_videos_per_prompt: each prompt's videos consecutively, from one noise draw
    two = pipe.generate_t2v(["a cat walking", "a dog running"], num_videos_per_prompt=2, seed=1,
                            output_type="latent", **kw)
    pe, pm, ne, nm = pipe.encode_prompt(["a cat walking", "a dog running"], num_videos_per_prompt=2)
    assert two.shape == (4, 16, 3, 8, 12) and pe.shape[0] == pm.shape[0] == ne.shape[0] == 4
    assert torch.equal(pe[0], pe[1]) and torch.equal(pe[2], pe[3]) and not torch.equal(pe[1], pe[2])
    assert torch.allclose(two, P.generate_t2v(pipe.dit, pe, pm, ne, nm, seed=1, **kw), atol=1e-6)
    # latents= (official): the initial noise
    noise = P.make_noise((1, 16, 3, 8, 12), seed=5)
    assert torch.equal(pipe.generate_t2v("a cat walking", latents=noise, output_type="latent", **kw),
                       pipe.generate_t2v("a cat walking", seed=5, output_type="latent", **kw))


def test_pipeline_i2v_from_an_image(pipe):
    img = _frames(1)[0]
    kw = dict(num_frames=9, num_steps=2, output_type="latent", **PIX)
    lat = pipe.generate_i2v(img, "a cat", seed=2, **kw)
    assert lat.shape == (1, 16, 3, 8, 12)
    # official: the noise first, then the posterior sampled with the same generator
    g = torch.Generator().manual_seed(2)
    P.make_noise((1, 16, 3, 8, 12), generator=g)
    assert torch.equal(lat[:, :, :1], pipe.encode_image(img, (64, 96), generator=g, sample=True))
    # vae_sample=False: the posterior mean (not the official numbers); the image latent untouched
    mean = pipe.generate_i2v(img, "a cat", seed=2, vae_sample=False, **kw)
    assert torch.equal(mean[:, :, :1], pipe.encode_image(img, (64, 96))) and not torch.equal(mean, lat)
    # num_videos_per_prompt: one noise draw for all videos, then one posterior sample per video
    two = pipe.generate_i2v(img, "a cat", seed=2, num_videos_per_prompt=2, **kw)
    g = torch.Generator().manual_seed(2)
    P.make_noise((2, 16, 3, 8, 12), generator=g)
    assert two.shape == (2, 16, 3, 8, 12) and not torch.equal(two[0], two[1])
    assert torch.equal(two[:, :, :1], pipe.encode_image(img, (64, 96), generator=g, sample=True, repeat=2))
    video = pipe.generate_i2v(img, "a cat", num_frames=9, num_steps=2, seed=2, output_type="video", **PIX)
    assert video.shape == (1, 9, 64, 96, 3) and video.dtype == np.uint8


def test_pipeline_vc_from_a_video(pipe):
    vid = _frames(9)
    kw = dict(num_frames=13, num_cond_frames=5, num_steps=2, seed=3, **PIX)
    lat = pipe.generate_vc(vid, "a cat", output_type="latent", vae_sample=False, **kw)
    cond = pipe.encode_video(vid, (64, 96), last_frames=5)
    assert lat.shape == (1, 16, 4, 8, 12) and cond.shape == (1, 16, 2, 8, 12)
    assert torch.equal(lat[:, :, :2], cond)
    sampled = pipe.generate_vc(vid, "a cat", output_type="latent", **kw)
    g = torch.Generator().manual_seed(3)
    P.make_noise((1, 16, 4, 8, 12), generator=g)
    assert torch.equal(sampled[:, :, :2], pipe.encode_video(vid, (64, 96), last_frames=5, generator=g, sample=True))
    assert pipe.generate_vc(vid, "a cat", output_type="np", **kw).shape == (1, 13, 64, 96, 3)


def test_pipeline_long(pipe):
    out = pipe.generate_long("a cat", latent=(3, 8, 12), num_cond_frames=5, num_segments=1, num_steps=2,
                             guidance_scale=1.0, output_type="video", progress=False)
    assert out.shape == (1, 13, 64, 96, 3)


def test_refine_frame_padding():
    p = P.refine_frame_padding(93)  # the official 480p -> 720p case
    assert (p["frames"], p["cond_latents"], p["noise_latents"], p["noise_added"]) == (186, 0, 48, 6)
    assert p["encoded_frames"] == p["decoded_frames"] == 189
    p = P.refine_frame_padding(93, 13)
    assert (p["cond_latents"], p["cond_added"], p["noise_latents"], p["noise_added"]) == (4, 0, 44, 3)
    p = P.refine_frame_padding(5, 1, spatial_refine_only=True)
    assert (p["frames"], p["cond_latents"], p["cond_added"], p["cond_frames"]) == (5, 4, 12, 13)
    assert (p["noise_latents"], p["noise_added"], p["decoded_frames"]) == (4, 12, 29)
    with pytest.raises(ValueError, match="nothing to refine"):
        P.refine_frame_padding(5, 10)


def test_pipeline_refine_from_a_stage1_video(pipe):
    stage1 = _frames(5, 32, 48)
    spy = Spy(pipe.dit)
    sp = P.LongCatVideoPipeline(spy, pipe.text_encoder, pipe.vae)
    out = sp.generate_refine(stage1, "a cat", num_steps=50, **PIX)
    assert out.shape == (1, 10, 64, 96, 3)  # frames doubled, at the target size
    # 10 frames padded to 4 latents; t = 500 then the 50-step schedule below it, no guidance
    assert all(a[0].shape == (1, 16, 4, 8, 12) for a, _ in spy.calls)
    assert [float(a[1][0, 0]) for a, _ in spy.calls] == pytest.approx(get_schedule(50, t_thresh=0.5).timesteps.tolist())
    # an image as conditioning: one frame padded in front to 13 frames -> 4 clean latents
    spy.calls.clear()
    img = _frames(1, 32, 48, seed=4)[0]
    lat = sp.generate_refine(stage1, "a cat", image=img, output_type="latent", vae_sample=False, **PIX)
    assert lat.shape == (1, 16, 8, 8, 12) and spy.calls[0][1]["num_cond_latents"] == 4
    from longcat_native.pipelines.media import load_image

    padded = load_image(img, (64, 96)).unsqueeze(2).expand(-1, -1, 13, -1, -1)
    assert torch.equal(lat[:, :, :4], pipe.vae.encode(padded))
    # by default the conditioning posterior is sampled with the generator
    g = torch.Generator().manual_seed(0)
    sampled = sp.generate_refine(stage1, "a cat", image=img, output_type="latent", generator=g, **PIX)
    assert torch.equal(sampled[:, :, :4], pipe.vae.encode(padded, generator=torch.Generator().manual_seed(0),
                                                          sample=True))
    # the target size: the 720p bucket closest to the stage-1 aspect ratio, unless given (here small
    # tables of the official shape; the official ones are tested against buckets.json)
    spy.calls.clear()
    sp.buckets = {"720p": {"0.50": (64, 128), "1.00": (64, 64), "2.00": (128, 64)}}
    sp.generate_refine(stage1[:, :14, :32], "a cat", output_type="latent", progress=False)
    assert spy.calls[0][0][0].shape[3:] == (8, 16)


def test_pipeline_errors_before_any_work(pipe, monkeypatch):
    from types import SimpleNamespace

    spy = Spy(pipe.dit)
    encoded = []
    monkeypatch.setattr(pipe.text_encoder, "encode", lambda *a, **k: encoded.append(a))
    sp = P.LongCatVideoPipeline(spy, pipe.text_encoder, pipe.vae)
    img, vid = _frames(1)[0], _frames(9)
    with pytest.raises(ValueError, match="output_type must be one of"):
        sp.generate_t2v("a cat", output_type="gif")
    with pytest.raises(ValueError, match="4k \\+ 1"):
        sp.generate_t2v("a cat", num_frames=10, **PIX)
    with pytest.raises(ValueError, match="multiples of 16"):
        sp.generate_i2v(img, "a cat", num_frames=9, height=64, width=100)
    with pytest.raises(ValueError, match="single latent frame"):
        sp.generate_i2v(img, "a cat", num_frames=1, **PIX)
    with pytest.raises(ValueError, match="nothing to generate"):
        sp.generate_vc(vid, "a cat", num_frames=5, num_cond_frames=5, **PIX)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        sp.generate_vc(vid, "a cat", num_frames=13, num_cond_frames=6, **PIX)
    with pytest.raises(ValueError, match="resolution"):
        sp.generate_i2v(img, "a cat", resolution="1080p")
    with pytest.raises(ValueError, match="not both"):
        sp.generate_refine(vid, "a cat", image=img, video=vid, **PIX)
    with pytest.raises(ValueError, match="without an image or video"):
        sp.generate_refine(vid, "a cat", num_cond_frames=5, **PIX)
    with pytest.raises(ValueError, match="set by the pixel path"):
        sp.generate_refine(vid, "a cat", pad_frames=True, **PIX)
    with pytest.raises(ValueError, match="needs the VAE"):
        P.LongCatVideoPipeline(spy, pipe.text_encoder, None).generate_t2v("a cat", num_frames=9, **PIX)
    with pytest.raises(ValueError, match="needs the VAE"):
        P.LongCatVideoPipeline(spy, pipe.text_encoder, None).generate_i2v(img, "a cat", output_type="latent")
    with pytest.raises(ValueError, match="needs the text encoder"):
        P.LongCatVideoPipeline(spy, None, pipe.vae).generate_t2v("a cat", num_frames=9, **PIX)
    with pytest.raises(ValueError, match="not loaded"):
        sp.generate_t2v("a cat", num_frames=9, lora="no_such_lora", **PIX)
    with pytest.raises(TypeError, match=r"generate_t2v\(\) got an unexpected keyword argument 'num_step'"):
        sp.generate_t2v("a cat", num_frames=9, num_step=3, **PIX)
    with pytest.raises(TypeError, match=r"generate_refine\(\) got an unexpected keyword argument 'guidance_scale'"):
        sp.generate_refine(vid, "a cat", guidance_scale=4.0, **PIX)
    assert spy.calls == [] and encoded == []
    with pytest.raises(ValueError, match="caption_channels 32"):
        P.LongCatVideoPipeline(SimpleNamespace(config=SimpleNamespace(caption_channels=32, in_channels=16)),
                               pipe.text_encoder)
    with pytest.raises(ValueError, match="in_channels 8"):
        P.LongCatVideoPipeline(SimpleNamespace(config=SimpleNamespace(caption_channels=64, in_channels=8)),
                               None, pipe.vae)


def test_pipeline_from_pretrained_checks_before_loading(tiny_root, tmp_path, monkeypatch):
    import sys

    from longcat_native.pipelines.media import MissingExtraError
    from tiny_components import partial_root

    def no_loading(*a, **k):
        raise AssertionError("the DiT was loaded before the checks")

    monkeypatch.setattr(LongCatDiT, "from_pretrained", classmethod(no_loading))
    no_vae = partial_root(tiny_root, tmp_path / "root", without=("vae",))
    with pytest.raises(FileNotFoundError, match="vae/"):
        P.LongCatVideoPipeline.from_pretrained(no_vae)
    with pytest.raises(AssertionError, match="loaded before"):  # without the VAE, the checks pass
        P.LongCatVideoPipeline.from_pretrained(no_vae, vae=False)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(MissingExtraError, match=r"diffusers.*longcat-native\[pipelines\]"):
        P.LongCatVideoPipeline.from_pretrained(tiny_root)


def test_a_call_puts_the_loras_and_bsa_back_as_they_were(text):
    """A model switched on the official way (dit.enable_loras / dit.enable_bsa once, as the demos
    do before their loops) stays so through a call naming a LoRA / BSA; one switched off stays off."""
    from cases import FIXTURE_ROOT

    ckpt = LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    pe, pm, _, _ = text
    stage1 = _lat(1, 16, 2, 8, 12)
    lk = dict(lora_network_dim=4, lora_network_alpha=2.0)
    for key in ("cfg_step_lora", "refinement_lora"):
        ckpt.load_lora(str(FIXTURE_ROOT / "lora" / f"{key}.safetensors"), key, 1.0, **lk)
    kw = dict(seed=0, refine_rng="generator", progress=False)
    ckpt.enable_loras(["cfg_step_lora"])
    ckpt.enable_bsa()
    P.generate_refine(ckpt, stage1, pe, pm, lora="refinement_lora", enable_bsa=True, **kw)
    assert ckpt.active_loras == ["cfg_step_lora"] and ckpt.cfg.enable_bsa
    ckpt.disable_all_loras()
    ckpt.disable_bsa()
    P.generate_refine(ckpt, stage1, pe, pm, lora="refinement_lora", enable_bsa=True, **kw)
    assert ckpt.active_loras == [] and not ckpt.cfg.enable_bsa
