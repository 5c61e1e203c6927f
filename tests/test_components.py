"""The text encoder and the VAE loaded from a checkpoint root in the official layout (tiny random
models built by tiny_components.py, offline): prompt encoding, latent normalization, tiled and
sliced decoding, the errors for missing folders, mismatched components and missing packages."""

import sys

import pytest
import torch

from longcat_native.pipelines import components as C
from longcat_native.pipelines.media import MissingExtraError, missing_modules

pytest_plugins = ("tiny_components",)  # the session-wide tiny_root fixture
TEXT_TOKENS = 512  # the tiny tokenizer's model_max_length, as the official one


@pytest.fixture(scope="module")
def te(tiny_root):
    return C.TextEncoder.from_pretrained(tiny_root, device="cpu")


@pytest.fixture(scope="module")
def vae(tiny_root):
    return C.VideoVAE.from_pretrained(tiny_root, device="cpu")


def _pixels(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_prompt_encoding_shapes_masks_and_determinism(te):
    assert te.caption_channels == 64 and te.dtype == torch.float32 and te.max_length == TEXT_TOKENS
    embeds, mask = te.encode(["a cat walking on the grass", "a dog"])
    assert embeds.shape == (2, 1, TEXT_TOKENS, 64) and mask.shape == (2, TEXT_TOKENS)
    assert mask.dtype == torch.int64 and torch.isfinite(embeds).all()
    # words + the end-of-sequence token, then padding
    assert mask.sum(1).tolist() == [7, 3]
    assert torch.equal(mask[0, :7], torch.ones(7, dtype=torch.int64)) and not mask[0, 7:].any()
    again, _ = te.encode(["a cat walking on the grass", "a dog"])
    assert torch.equal(embeds, again)
    single, single_mask = te.encode("a dog")  # a string is a batch of one
    assert single.shape == (1, 1, TEXT_TOKENS, 64) and torch.equal(single_mask, mask[1:])
    assert torch.allclose(single, embeds[1:], atol=1e-5)
    assert not torch.allclose(embeds[0], embeds[1])
    half, _ = te.encode("a dog", dtype=torch.float16)
    assert half.dtype == torch.float16


def test_prompt_cleaning_and_truncation(te):
    assert C.clean_prompt("  a &amp;amp;  cat\n\t walking ") == "a & cat walking"
    assert C.clean_prompt("\u201ca cat\u201d") == '"a cat"'  # ftfy straightens curly quotes, as officially
    assert torch.equal(te.tokenize("a   cat\nwalking")[0], te.tokenize("a cat walking")[0])
    ids, mask = te.tokenize(" ".join(["cat"] * 600))
    assert ids.shape == (1, TEXT_TOKENS) and int(mask.sum()) == TEXT_TOKENS and int(ids[0, -1]) == 1  # ends in </s>
    with pytest.raises(ValueError, match="string"):
        te.encode([])
    with pytest.raises(ValueError, match="string"):
        te.encode(["a cat", 3])


def test_offload_moves_the_encoder_to_host(te):
    te.encode("a cat")
    assert next(te.model.parameters()).device == te.device
    te.offload()
    assert next(te.model.parameters()).device.type == "cpu"
    te.encode("a cat")  # moved back for the next encoding


def test_vae_encode_decode_and_normalization(vae):
    assert (vae.z_dim, vae.time_stride, vae.space_stride) == (16, 4, 8)
    x = _pixels(1, 3, 9, 32, 48)
    lat = vae.encode(x)
    assert lat.shape == (1, 16, 3, 4, 6) and lat.dtype == torch.float32
    raw = vae.vae.encode(x).latent_dist.mode()
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(lat, (raw - mean) / std, atol=1e-6)
    assert torch.allclose(vae.denormalize(lat), raw, atol=1e-5)
    assert torch.equal(vae.encode(x), lat)  # the posterior mean: deterministic
    sampled = vae.encode(x, generator=torch.Generator().manual_seed(0), sample=True)
    assert sampled.shape == lat.shape and not torch.equal(sampled, lat)
    out = vae.decode(lat)
    assert out.shape == (1, 3, 9, 32, 48) and out.dtype == torch.float32
    assert float(out.min()) >= -1 and float(out.max()) <= 1
    image = vae.encode(x[:, :, :1])  # a single frame is one latent frame
    assert image.shape == (1, 16, 1, 4, 6)


def test_vae_posterior_sampling_as_officially(vae):
    """sample=True: mean + std * eps, eps drawn on the CPU per item from the generator (or torch's
    global generator), as the official retrieve_latents; repeat: one encode, several samples."""
    x = _pixels(2, 3, 5, 32, 48, seed=3)
    dist = vae.vae.encode(x).latent_dist
    g = torch.Generator().manual_seed(7)
    got = vae.encode(x, generator=g, sample=True)
    g2 = torch.Generator().manual_seed(7)
    eps = torch.cat([torch.randn((1,) + tuple(dist.mean.shape[1:]), generator=g2) for _ in range(2)])
    assert torch.equal(got, vae.normalize(dist.mean + dist.std * eps))
    assert torch.equal(g.get_state(), g2.get_state())
    torch.manual_seed(1)
    a = vae.encode(x[:1], sample=True)  # no generator: the global RNG
    torch.manual_seed(1)
    assert torch.equal(a, vae.encode(x[:1], sample=True)) and not torch.equal(a, vae.encode(x[:1]))
    r = vae.encode(x[:1], generator=torch.Generator().manual_seed(0), sample=True, repeat=3)
    assert r.shape[0] == 3 and not torch.equal(r[0], r[1])
    assert torch.equal(vae.encode(x[:1], repeat=2), vae.encode(x[:1]).expand(2, -1, -1, -1, -1))
    # the official normalization arithmetic, and its inverse
    z = dist.mean
    inv = 1.0 / torch.tensor(vae.vae.config.latents_std).view(1, -1, 1, 1, 1)
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    assert torch.equal(vae.normalize(z), (z - mean) * inv)
    assert torch.equal(vae.denormalize(vae.normalize(z)), vae.normalize(z) / inv + mean)
    with pytest.raises(ValueError, match="generators"):
        vae.encode(x, generator=[g], sample=True)


def test_scheduler_config(tiny_root, tmp_path):
    import json

    assert C.SchedulerConfig.from_pretrained(tiny_root) is None  # no scheduler/ folder: the defaults apply
    assert C.SchedulerConfig() == C.SchedulerConfig(shift=12.0, num_train_timesteps=1000)
    (tmp_path / "scheduler").mkdir()
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 5.0,
           "use_dynamic_shifting": False}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    assert C.SchedulerConfig.from_pretrained(tmp_path).shift == 5.0
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(cfg, use_dynamic_shifting=True)))
    with pytest.raises(NotImplementedError, match="use_dynamic_shifting"):
        C.SchedulerConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="shift"):
        C.SchedulerConfig.from_dict({"shift": -1})


def test_vae_does_not_tile_by_default(tiny_root):
    v = C.VideoVAE.from_pretrained(tiny_root, device="cpu")
    assert v.tiling is False and not v.vae.use_tiling


def test_max_sequence_length(te):
    e, m = te.encode("a cat", max_length=16)
    assert e.shape == (1, 1, 16, 64) and m.shape == (1, 16) and int(m.sum()) == 3
    with pytest.raises(ValueError, match="max_sequence_length"):
        te.tokenize("a cat", max_length=0)


def test_vae_tiling_and_slicing(vae, monkeypatch):
    z = torch.randn(2, 16, 3, 8, 12, generator=torch.Generator().manual_seed(1))
    vae.set_tiling(False)
    whole = vae.decode(z)
    # tiles as large as the frame: nothing is tiled, bit-identical
    vae.set_tiling(True, (96, 96), (64, 64))
    assert torch.equal(vae.decode(z), whole)
    calls = []
    real = vae.vae.tiled_decode
    monkeypatch.setattr(vae.vae, "tiled_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    vae.set_tiling(True, (32, 32), (24, 24))
    tiled = vae.decode(z)
    # slicing: one tiled decode per batch item
    assert len(calls) == 2 and vae.vae.tile_sample_min_height == 32 and vae.vae.tile_sample_stride_width == 24
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
    # Random weights make the seams visible (the receptive field spans tiles); a trained VAE's
    # blend is smooth. The bound only catches a tiling that lost or misplaced tiles.
    assert float((tiled - whole).abs().mean()) < 0.2
    # slicing runs items one at a time: same values as decoding each alone
    vae.set_tiling(False)
    vae.set_slicing(True)
    assert torch.allclose(vae.decode(z)[1:], vae.decode(z[1:]), atol=1e-5)
    vae.set_slicing(False)
    assert torch.allclose(vae.decode(z), whole, atol=1e-5)
    vae.set_slicing(True)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.set_tiling(True, (30, 30), (16, 16))
    with pytest.raises(ValueError, match="stride <= tile"):
        vae.set_tiling(True, (32, 32), (40, 40))


def test_vae_bad_inputs(vae):
    with pytest.raises(ValueError, match="4k \\+ 1"):
        vae.encode(_pixels(1, 3, 8, 32, 48))
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(_pixels(1, 3, 5, 30, 48))
    with pytest.raises(ValueError, match="\\[B, 3, F, H, W\\]"):
        vae.encode(_pixels(1, 4, 5, 32, 48))
    with pytest.raises(ValueError, match="\\[B, 16, T, H, W\\]"):
        vae.decode(torch.zeros(1, 8, 2, 4, 6))


def test_missing_folders_are_named(tiny_root, tmp_path):
    from tiny_components import partial_root

    assert C.check_components(tiny_root, text_encoder=True, vae=True) == tiny_root
    assert C.checkpoint_root(tiny_root / "dit") == tiny_root  # a dit/ folder names its root
    no_tok = partial_root(tiny_root, tmp_path / "a", without=("tokenizer",))
    with pytest.raises(FileNotFoundError, match="tokenizer/"):
        C.TextEncoder.from_pretrained(no_tok)
    C.check_components(no_tok, vae=True)  # the VAE alone is fine
    no_te = partial_root(tiny_root, tmp_path / "b", without=("text_encoder",))
    with pytest.raises(FileNotFoundError, match="text_encoder/"):
        C.check_components(no_te, text_encoder=True)
    no_vae = partial_root(tiny_root, tmp_path / "c", without=("vae",))
    with pytest.raises(FileNotFoundError, match="vae/"):
        C.VideoVAE.from_pretrained(no_vae)
    empty_vae = tmp_path / "d"
    partial_root(tiny_root, empty_vae, without=("vae",))
    (empty_vae / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        C.check_components(empty_vae, vae=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.check_components(tmp_path / "nothing", vae=True)


def test_components_that_do_not_fit_the_dit(tiny_root):
    C.check_components(tiny_root, text_encoder=True, vae=True, caption_channels=64, latent_channels=16)
    with pytest.raises(ValueError, match="d_model 64 does not match the DiT's caption_channels 4096"):
        C.check_components(tiny_root, text_encoder=True, caption_channels=4096)
    with pytest.raises(ValueError, match="z_dim 16 does not match the DiT's in_channels 32"):
        C.check_components(tiny_root, vae=True, latent_channels=32)


@pytest.mark.parametrize("module,load", [
    ("transformers", lambda root: C.TextEncoder.from_pretrained(root)),
    ("diffusers", lambda root: C.VideoVAE.from_pretrained(root)),
    ("ftfy", lambda root: C.clean_prompt("a cat")),
])
def test_missing_packages_name_the_extra(tiny_root, monkeypatch, module, load):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    assert missing_modules([module, "torch"]) == [module]
    with pytest.raises(MissingExtraError, match=r"pip install 'longcat-native\[pipelines\]'") as e:
        load(tiny_root)
    assert module in str(e.value) and isinstance(e.value, ImportError)
