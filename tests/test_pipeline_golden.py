"""End-to-end fidelity to the official LongCatVideoPipeline (tests/fixtures/longcat_pipeline_tiny,
its README): the same checkpoint, seed and inputs give the official latents and decoded video
within 1e-4 relative in float32 on the CPU, with every random draw in the official order (the
generator's and torch's global RNG's states after each call equal a replay of the case's
``meta.draws``) and every block-sparse chunk selection the official one. Single calls through
LongCatVideoPipeline and, for the latents, the tensor-level functions; the long-video and
interactive demo loops segment by segment from the official previous segment's frames
("teacher-forced"), and free-running. Also the official bucket tables against buckets.json."""

import json
import pathlib

import numpy as np
import pytest
import torch
from helpers import MODEL_RTOL, assert_close_rel, max_rel_err
from safetensors import safe_open
from safetensors.torch import load_file

from longcat_native import pipelines as P
from longcat_native.pipelines import shapes as S

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "longcat_pipeline_tiny"
ROOT = GOLDEN / "root"
REFINE_CASES = ("refine", "refine_image", "refine_video", "refine_spatial", "refine_128x256", "refine_128x256_image",
                "refine_192x128_video")
CASES = ("t2v_base", "t2v_distill", "i2v", "i2v_64x320", "vc_kv_cache", "vc_no_kv_cache", "vc_distill") + REFINE_CASES
TASK_OF = {"generate_t2v": "t2v", "generate_i2v": "i2v", "generate_vc": "vc", "generate_refine": "refine"}


def load(name):
    path = GOLDEN / "cases" / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return load_file(str(path)), meta


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    p = P.LongCatVideoPipeline.from_pretrained(ROOT, kernels="reference", device="cpu", dtype=torch.float32)
    # As the official side: both LoRAs loaded once, before any case (rank 4 files, alpha in the file).
    for key in ("cfg_step_lora", "refinement_lora"):
        p.dit.load_lora(str(ROOT / "lora" / f"{key}.safetensors"), key, 1.0, 4, 2.0)
    return p


class Recorder:
    """Records what the VAE decodes (normalized latents) and every BSA chunk selection."""

    def __init__(self, pipe, monkeypatch):
        import longcat_native.kernels.block_sparse_attention as bsa

        self.decoded, self.selections = [], []
        decode = pipe.vae.decode
        monkeypatch.setattr(pipe.vae, "decode", lambda z: self.decoded.append(z.clone()) or decode(z))
        ref = bsa.block_sparse_attention_reference

        def selecting(*a, **k):
            out, mask = ref(*a, **dict(k, return_mask=True))
            self.selections.append(mask)
            return out

        monkeypatch.setattr(bsa, "block_sparse_attention_reference", selecting)


@pytest.fixture
def rec(pipe, monkeypatch):
    return Recorder(pipe, monkeypatch)


def official_lora_init_draws(path) -> int:
    """How many float32 uniforms the official ``load_lora`` draws from torch's global RNG: it
    builds each module's lora_down / lora_up as initialized nn.Linear and re-initializes
    lora_down (kaiming_uniform_) before loading the file into them."""
    t = load_file(str(path))
    return sum(2 * v.numel() for k, v in t.items() if k.endswith("lora_down.weight")) + \
        sum(v.numel() for k, v in t.items() if ".lora_up." in k)


def _official_lora_load(meta) -> None:
    """The global-RNG side of the official ``dit.load_lora`` of the case's LoRA."""
    torch.empty(official_lora_init_draws(ROOT / meta["lora"]["file"])).uniform_()


class Draws:
    """The case's random draws replayed from fresh RNGs (meta.draws): the states a correct
    implementation leaves the generator and torch's global generator in, and the values."""

    def __init__(self, meta, seed: int = 42):
        self.gen = torch.Generator("cpu").manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if meta.get("lora_loaded_after_seed"):
                _official_lora_load(meta)
            self.values = {}
            for d in meta["draws"]:
                g = self.gen if d["rng"] == "generator" else None
                self.values[d["key"]] = torch.randn(d["shape"], generator=g)
            self.global_state = torch.get_rng_state()
        self.gen_state = self.gen.get_state()


def _seeded(seed: int = 42, meta=None, pipe=None) -> torch.Generator:
    torch.manual_seed(seed)  # the global RNG, as the official side seeds it right before the call
    if meta is not None and meta.get("lora_loaded_after_seed"):
        # the demos' order: seed, then load the LoRA (it draws from the global RNG), then the call
        lo = meta["lora"]
        pipe.dit.load_lora(str(ROOT / lo["file"]), lo["key"], **lo["load_lora"])
    return torch.Generator("cpu").manual_seed(seed)


def _check_draws(meta, t, gen):
    """Every stored draw replays bit for bit, and the call drew exactly those, in that order."""
    d = Draws(meta)
    for key, value in d.values.items():
        assert torch.equal(value, t[key]), f"replayed draw {key} differs from the stored one"
    assert torch.equal(gen.get_state(), d.gen_state), "the generator's draws differ from the official ones"
    assert torch.equal(torch.get_rng_state(), d.global_state), "the global RNG's draws differ from the official ones"


def _check_selections(t, rec, what=""):
    keys = sorted((k for k in t if k.startswith("mid.bsa_selected.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    assert len(rec.selections) == len(keys), f"{what}: {len(rec.selections)} BSA selections, official {len(keys)}"
    for i, key in enumerate(keys):
        assert torch.equal(rec.selections[i], t[key].bool()), f"{what}: BSA selection {i} differs from the official"


def _pil(frames):
    from PIL import Image

    arr = frames.numpy()
    return Image.fromarray(arr) if arr.ndim == 3 else [Image.fromarray(f) for f in arr]


def _call(pipe, meta, t, gen, **extra):
    """The official call of a single case through LongCatVideoPipeline, with its keyword arguments
    under their official names; the tiny buckets given as height / width."""
    kw = dict(meta["kwargs"], generator=gen, progress=False, **extra)
    for arg, key in meta["inputs"].items():
        kw[arg] = _pil(t[key])
    if meta.get("bucket"):
        kw.pop("resolution", None)
        kw["height"], kw["width"] = meta["bucket"]
    if meta["lora"]:
        kw["lora"] = meta["lora"]["key"]
    if meta["bsa"]:
        kw["enable_bsa"] = True
    method = meta["call"].split(".")[-1]
    return getattr(pipe, method)(**kw)


# -- single calls ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_single_call_matches_the_official_pipeline(pipe, rec, name):
    t, meta = load(name)
    gen = _seeded(meta=meta, pipe=pipe)
    video = _call(pipe, meta, t, gen)
    _check_draws(meta, t, gen)
    assert len(rec.decoded) == 1
    lat = rec.decoded[0]
    assert_close_rel(lat, t["out.latents"], MODEL_RTOL, f"{name} latents")
    assert_close_rel(pipe.vae.denormalize(lat), t["out.decoder_input"], MODEL_RTOL, f"{name} decoder input")
    assert isinstance(video, np.ndarray) and video.dtype == np.float32 and video.shape[0] == 1
    if "out.video" in t:
        assert_close_rel(torch.from_numpy(video[0]), t["out.video"], MODEL_RTOL, f"{name} video")
    else:  # the larger cases keep only the decoded video's shape and sum (README)
        assert list(video[0].shape) == meta["out_video_shape"]
        total = float(video[0].astype(np.float64).sum())
        assert abs(total - meta["out_video_sum"]) <= MODEL_RTOL * meta["out_video_sum"], (name, total)
    _check_selections(t, rec, name)
    # the schedule the official scheduler stepped through
    s = P.tasks.SamplingOptions(num_steps=meta["kwargs"]["num_inference_steps"],
                                distill=meta["kwargs"].get("use_distill", False))
    task = TASK_OF[meta["call"].split(".")[-1]]
    sched = s.schedule(t_thresh=0.5 if task == "refine" else None,
                       enhance_hf=bool(meta["kwargs"].get("enhance_hf", False)), distill=None if task != "refine"
                       else False)
    assert sched.timesteps.tolist() == meta["timesteps"] and sched.sigmas.tolist() == meta["sigmas"]


@pytest.mark.parametrize("key", ["refinement_lora", "cfg_step_lora"])
def test_load_lora_draws_what_the_official_load_lora_draws(pipe, key):
    """The official load_lora initializes its LoRA modules from torch's global RNG (float32
    uniforms, one per element) before loading the file; dit.load_lora leaves that RNG where the
    official leaves it, so a seed set before loading the refinement LoRA (the demos' order) gives
    the official refinement draws (refine_128x256_image)."""
    path = ROOT / "lora" / f"{key}.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        pipe.dit.load_lora(str(path), key, 1.0, 4, 2.0)
        ours = torch.get_rng_state()
        torch.manual_seed(7)
        torch.empty(official_lora_init_draws(path)).uniform_()
        assert torch.equal(ours, torch.get_rng_state())


def test_prompt_embeddings_match(pipe):
    t, meta = load("t2v_base")
    k = meta["kwargs"]
    pe, pm, ne, nm = pipe.encode_prompt(k["prompt"], k["negative_prompt"], k["guidance_scale"], offload=False)
    assert_close_rel(pe, t["mid.prompt_embeds"], 1e-5, "prompt_embeds")
    assert_close_rel(ne, t["mid.negative_prompt_embeds"], 1e-5, "negative_prompt_embeds")
    assert torch.equal(pm, t["mid.prompt_attention_mask"]) and torch.equal(nm, t["mid.negative_prompt_attention_mask"])


@pytest.mark.parametrize("name", ["t2v_base", "t2v_distill", "i2v", "i2v_64x320", "vc_kv_cache", "vc_no_kv_cache",
                                  "vc_distill"])
def test_tensor_level_latents(pipe, rec, name):
    """The tensor-level functions on the official intermediate tensors (embeddings, conditioning
    latents) with the same generator: the official latents, the official draws."""
    t, meta = load(name)
    k = meta["kwargs"]
    g = k["guidance_scale"]
    text = pipe.encode_prompt(k["prompt"], k.get("negative_prompt"), g, offload=False)
    gen = _seeded()
    kw = dict(num_inference_steps=k["num_inference_steps"], use_distill=k.get("use_distill", False),
              guidance_scale=g, generator=gen, progress=False, lora=meta["lora"] and meta["lora"]["key"])
    task = TASK_OF[meta["call"].split(".")[-1]]
    if task == "t2v":
        lat = P.generate_t2v(pipe.dit, *text, num_frames=k["num_frames"], height=k["height"], width=k["width"], **kw)
    elif task == "i2v":
        noise = P.make_noise(t["in.noise"].shape, generator=gen)
        torch.randn(t["rng.posterior_cond"].shape, generator=gen)  # the posterior draw, taken by the VAE
        lat = P.generate_i2v(pipe.dit, t["mid.cond_latents"], *text, num_frames=k["num_frames"], latents=noise, **kw)
    else:
        noise = P.make_noise(t["in.noise"].shape, generator=gen)
        torch.randn(t["rng.posterior_cond"].shape, generator=gen)
        lat = P.generate_vc(pipe.dit, t["mid.cond_latents"], *text, num_frames=k["num_frames"],
                            num_cond_frames=k["num_cond_frames"], use_kv_cache=k["use_kv_cache"],
                            enhance_hf=k["enhance_hf"], latents=noise, **kw)
    assert_close_rel(lat, t["out.latents"], MODEL_RTOL, f"{name} tensor-level latents")
    _check_draws(meta, t, gen)


# (the other new sizes run through the pipeline only: the tensor level adds no path at them)
@pytest.mark.parametrize("name", ["refine", "refine_image", "refine_video", "refine_spatial", "refine_128x256"])
def test_tensor_level_refine(pipe, rec, name):
    t, meta = load(name)
    pe, pm, _, _ = pipe.encode_prompt(meta["kwargs"]["prompt"], guidance_scale=1.0, offload=False)
    gen = _seeded(meta=meta, pipe=pipe)
    torch.randn(t["rng.posterior_stage1"].shape)  # the stage-1 posterior (global), taken by the VAE
    if "rng.posterior_cond" in t:
        torch.randn(t["rng.posterior_cond"].shape, generator=gen)
    stage1 = t["mid.stage1_latents"]
    lat = P.generate_refine(pipe.dit, stage1, pe, pm, cond_latents=t.get("mid.cond_latents"), size=stage1.shape[3:],
                            pad_frames=False, num_inference_steps=50, generator=gen, lora="refinement_lora",
                            enable_bsa=True, progress=False)
    assert_close_rel(lat, t["out.latents"], MODEL_RTOL, f"{name} tensor-level latents")
    _check_draws(meta, t, gen)
    _check_selections(t, rec, name)


def test_refine_inputs_match(pipe):
    """The official refinement preprocessing: upsampled, padded and encoded stage-1 latents, and the
    conditioning latents, drawn as officially."""
    t, meta = load("refine_video")
    gen = _seeded()
    lat, cond, pad = pipe.encode_refine_input(_pil(t["in.stage1_video"]), tuple(meta["bucket"]),
                                              video=_pil(t["in.video"]),
                                              num_cond_frames=meta["kwargs"]["num_cond_frames"], generator=gen)
    assert_close_rel(lat, t["mid.stage1_latents"], MODEL_RTOL, "stage-1 latents")
    assert_close_rel(cond, t["mid.cond_latents"], MODEL_RTOL, "conditioning latents")
    assert (pad["cond_latents"], pad["cond_added"]) == (4, 8)


# -- the demo loops --------------------------------------------------------------------------------

def _loop_kwargs(meta):
    s = meta["settings"]
    h, w = s["t2v"]["height"], s["t2v"]["width"]
    return dict(num_frames=s["num_frames"], num_cond_frames=s["num_cond_frames"],
                num_inference_steps=s["num_inference_steps"], guidance_scale=s["guidance_scale"],
                negative_prompt=s["negative_prompt"], height=h, width=w, progress=False)


def _check_loop_segments(pipe, rec, name):
    """The demo's segments, each from the official previous segment's uint8 frames, one generator
    carried through: t2v, then generate_long continuing the stored frames one segment at a time."""
    t, meta = load(name)
    kw = _loop_kwargs(meta)
    gen = _seeded()
    seg0 = meta["segments"][0]
    video = pipe.generate_t2v(seg0["prompt"], kw["negative_prompt"], num_frames=kw["num_frames"], height=kw["height"],
                              width=kw["width"], num_inference_steps=kw["num_inference_steps"],
                              guidance_scale=kw["guidance_scale"], generator=gen, progress=False, output_type="video")
    assert_close_rel(rec.decoded[-1], t["out.seg0.latents"], MODEL_RTOL, f"{name} segment 0 latents")
    assert int(np.abs(video[0].astype(int) - t["out.seg0.frames"].numpy().astype(int)).max()) <= 1
    errors = []
    for seg in meta["segments"][1:]:
        i = seg["segment"]
        segs = []
        lat = pipe.generate_long([seg["prompt"]], first_frames=_pil(t[f"out.seg{i - 1}.frames"]), generator=gen,
                                 output_type="latent", segment_latents=segs, **kw)
        assert len(segs) == 1 and torch.equal(lat, segs[0])  # one continuation: the chain is that segment
        assert_close_rel(lat, t[f"out.seg{i}.latents"], MODEL_RTOL, f"{name} segment {i} latents")
        errors.append(max_rel_err(lat, t[f"out.seg{i}.latents"]))
    # the draws of the whole loop, in order (refinement draws excluded: the generator part of it)
    d = Draws({"draws": [x for x in meta["draws"] if x["call"] != "generate_refine"]})
    assert torch.equal(gen.get_state(), d.gen_state)
    return t, meta, gen, errors


def test_interactive_video_segment_by_segment(pipe, rec):
    _check_loop_segments(pipe, rec, "interactive_video")


def test_generate_long_np_is_the_decoded_floats(pipe):
    """output_type="np": the continuation's frames are its decoded floats, as the official
    generate_vc returns them (not the demo's uint8 truncation / 255, which differs by up to
    1/255); the given first frames are theirs / 255."""
    t, meta = load("interactive_video")
    kw = _loop_kwargs(meta)
    seg = meta["segments"][1]
    first = t["out.seg0.frames"].numpy()
    def after_segment0():  # the generator as the official demo's after its text-to-video draw
        gen = _seeded()
        assert meta["draws"][0]["call"] == "generate_t2v"
        torch.randn(meta["draws"][0]["shape"], generator=gen)
        return gen

    segs = []
    video = pipe.generate_long([seg["prompt"]], first_frames=_pil(t["out.seg0.frames"]), generator=after_segment0(),
                               output_type="np", segment_latents=segs, **kw)
    n, c = kw["num_frames"], kw["num_cond_frames"]
    assert video.dtype == np.float32 and video.shape == (1, n + n - c) + first.shape[1:]
    assert np.array_equal(video[0, :n], first.astype(np.float32) / 255)
    # the official segment's latents, decoded: its float frames
    official = torch.from_numpy(pipe.decode(t["out.seg1.latents"], "np")[0])
    assert_close_rel(torch.from_numpy(video[0, n:]), official[c:], MODEL_RTOL, "segment 1 decoded frames")
    ours = pipe.decode(segs[0], "np")[0]
    assert np.array_equal(video[0, n:], ours[c:])
    assert np.abs(video[0, n:] * 255 - np.floor(video[0, n:] * 255)).max() > 0.01  # not uint8 levels
    pt = pipe.generate_long([seg["prompt"]], first_frames=_pil(t["out.seg0.frames"]),
                            generator=after_segment0(), output_type="pt", **kw)
    assert torch.equal(pt, torch.from_numpy(video).permute(0, 1, 4, 2, 3))


def test_long_video_segment_by_segment_then_refinement_windows(pipe, rec):
    t, meta, gen, _ = _check_loop_segments(pipe, rec, "long_video")
    s = meta["settings"]
    n_frames, n_cond = s["num_frames"], s["num_cond_frames"]
    start = len(rec.selections)
    kw = dict(prompt=s["refine"]["prompt"], num_frames=n_frames, num_cond_frames=n_cond, num_inference_steps=50,
              generator=gen, num_windows=1, height=64, width=128, output_type="latent", progress=False)
    for seg in meta["refine_segments"]:
        i = seg["segment"]
        step = n_frames - n_cond
        cond = None if i == 0 else _pil(t[f"out.refine{i - 1}.frames"])
        lats = pipe.refine_long_video(_pil(t["out.frames"][step * i:]), cond_video=cond, **kw)
        assert_close_rel(lats[0], t[f"out.refine{i}.latents"], MODEL_RTOL, f"long_video refinement window {i}")
    _check_draws(meta, t, gen)  # every draw of the demo, generator and global, in the official order
    sel = {k: v for k, v in t.items() if k.startswith("mid.bsa_selected.")}
    rec.selections = rec.selections[start:]
    _check_selections(sel, rec, "long_video refinement")


@pytest.mark.parametrize("name", ["interactive_video", "long_video"])
def test_demo_loop_free_running(pipe, name):
    """The whole demo loop in one generate_long call (then refine_long_video): segment 0 exact,
    later segments drift only through uint8 rounding flips (README: a few one-level flips move
    the next segment by ~1e-4 .. 1e-3)."""
    t, meta = load(name)
    kw = _loop_kwargs(meta)
    prompts = [seg["prompt"] for seg in meta["segments"]]
    gen = _seeded()
    segs = []
    frames = pipe.generate_long(prompts, generator=gen, output_type="video", segment_latents=segs, **kw)
    if name == "interactive_video":
        # output_type="latent": the whole chain, the first segment then each continuation's new latents
        m = S.cond_latent_count(kw["num_cond_frames"])
        chain = pipe.generate_long(prompts, generator=_seeded(), output_type="latent", **kw)
        T = S.frames_to_latents(kw["num_frames"])
        assert chain.shape[2] == T + (len(prompts) - 1) * (T - m) == 10
        assert torch.equal(chain, torch.cat([segs[0]] + [x[:, :, m:] for x in segs[1:]], dim=2))
        assert_close_rel(chain[:, :, :T], t["out.seg0.latents"], MODEL_RTOL, "chain segment 0")
    assert frames.shape == (1,) + tuple(t["out.frames"].shape) and frames.dtype == np.uint8
    diff = np.abs(frames[0].astype(int) - t["out.frames"].numpy().astype(int))
    n0 = meta["settings"]["num_frames"]
    assert diff[:n0].max() <= 1 and diff.mean() < 0.5 and diff.max() <= 32
    if name == "long_video":
        s = meta["settings"]
        refined = pipe.refine_long_video(frames[0], s["refine"]["prompt"], num_frames=n0,
                                         num_cond_frames=s["num_cond_frames"], num_inference_steps=50, generator=gen,
                                         height=64, width=128, output_type="video", progress=False)
        expected = np.concatenate([t["out.refine0.frames"].numpy()] + [
            t[f"out.refine{i}.frames"].numpy()[2 * s["num_cond_frames"]:] for i in (1, 2)])
        assert refined.shape == (1,) + expected.shape
        rdiff = np.abs(refined[0].astype(int) - expected.astype(int))
        assert rdiff.mean() < 1.0 and rdiff.max() <= 64


# -- buckets -------------------------------------------------------------------------------------------

def test_official_bucket_tables_and_lookups():
    ref = json.loads((GOLDEN / "buckets.json").read_text())
    for name, table in ref["tables"].items():
        assert list(S.BUCKET_TABLES[name].items()) == [(k, tuple(v["hw"])) for k, v in table.items()], name
    for key, name in ref["get_bucket_config"].items():
        res, factor = key.split("/")
        assert S.get_bucket_config(res, int(factor)) is S.BUCKET_TABLES[name]
    n = 0
    for row in ref["lookups"]:
        h, w = row["input_hw"]
        for what, chosen in row["chosen"].items():
            assert S.bucket_size(h, w, chosen["resolution"], chosen["scale_factor_spatial"]) == tuple(chosen["hw"]), \
                (row["input_hw"], what)
            n += 1
    assert n >= 32 * 6
    # which factor each call uses: 16 (i2v / vc) and 64 (refinement), times the largest cp split
    assert S.bucket_scale_factor() == 16 and S.bucket_scale_factor(refine=True) == 64
    assert S.bucket_scale_factor(False, [1, 2]) == 32 and S.bucket_scale_factor(True, [1, 2]) == 128
    with pytest.raises(ValueError, match="resolution"):
        S.get_bucket_config("1080p")
    with pytest.raises(ValueError, match="spatial factors"):
        S.get_bucket_config("480p", 48)


def test_tiny_bucket_tables_pick_the_cases_sizes(pipe, rec, monkeypatch):
    """With the cases' tiny tables, the official rule picks each case's bucket from its input."""
    ref = json.loads((GOLDEN / "buckets.json").read_text())
    tiny = {res: {k: tuple(v) for k, v in table.items()} for res, table in ref["tiny_tables_used_by_the_cases"].items()}
    for name in ("i2v", "vc_distill", "refine"):
        t, meta = load(name)
        key = meta["inputs"].get("image") or meta["inputs"].get("video") or meta["inputs"]["stage1_video"]
        h, w = t[key].shape[-3:-1]
        res = "720p" if name.startswith("refine") else "480p"
        assert S.bucket_size(h, w, res, buckets=tiny) == tuple(meta["bucket"])
    # and the pipeline with those tables runs the i2v case as the official one
    monkeypatch.setattr(pipe, "buckets", tiny)
    t, meta = load("i2v")
    gen = _seeded()
    kw = dict(meta["kwargs"], generator=gen, progress=False, output_type="latent")
    lat = pipe.generate_i2v(_pil(t["in.image"]), **kw)
    assert_close_rel(lat, t["out.latents"], MODEL_RTOL, "i2v with the tiny bucket tables")
