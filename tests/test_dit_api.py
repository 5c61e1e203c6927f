"""The public API around the forward: construction choices, bad inputs (each a clear
ValueError), and the drop-in contract the official pipeline relies on."""

import pytest
import torch
from cases import FIXTURE_ROOT, load_case
from helpers import MODEL_RTOL, assert_close_rel

import longcat_native as lcn


@pytest.fixture(scope="module")
def dit():
    return lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")


@pytest.fixture(scope="module")
def case():
    inputs, _, expected, _ = load_case("t2v_mask")
    return inputs, expected["output"]


def _call(dit, inputs, **overrides):
    args = dict(inputs)
    args.update(overrides)
    return dit(**args)


# -- bad inputs --------------------------------------------------------------------------------
BAD_INPUTS = [
    ("hidden_states", lambda x: x[0], "5-D tensor"),
    ("hidden_states", lambda x: x[:, :8], "8 channels, the model takes 16"),
    ("hidden_states", lambda x: x[..., :7], "odd H or W"),
    ("hidden_states", lambda x: x[:, :, :, :5], "odd H or W"),
    ("hidden_states", lambda x: x.long(), "floating point"),
    ("timestep", lambda t: t[:1], r"timestep must be \[B\]=\[2\] or \[B, T\]=\[2, 3\]"),
    ("timestep", lambda t: t[:, None].expand(2, 4), r"\[B, T\]=\[2, 3\]"),
    ("timestep", lambda t: t[0], "timestep must be"),
    ("encoder_hidden_states", lambda y: y[:1], "batch 1, hidden_states has batch 2"),
    ("encoder_hidden_states", lambda y: y[..., :32], r"\[B, 1, L, 64\]"),
    ("encoder_hidden_states", lambda y: y[:, 0, None, None], r"\[B, 1, L, 64\]"),
    ("encoder_attention_mask", lambda m: m[:, :5], r"\[B, L\]=\[2, 8\]"),
    ("encoder_attention_mask", lambda m: m[:1], r"\[B, L\]=\[2, 8\]"),
    ("encoder_attention_mask", lambda m: m[:, None], r"\[B, L\]"),
]


@pytest.mark.parametrize("name,mutate,message", BAD_INPUTS, ids=[f"{n}-{m}" for n, _, m in BAD_INPUTS])
def test_bad_inputs_are_clear_value_errors(dit, case, name, mutate, message):
    inputs, _ = case
    with pytest.raises(ValueError, match=message):
        _call(dit, inputs, **{name: mutate(inputs[name])})


def test_text_required_unless_cross_attention_skipped(dit, case):
    inputs, _ = case
    with pytest.raises(ValueError, match="encoder_hidden_states is required"):
        _call(dit, inputs, encoder_hidden_states=None)
    out = _call(dit, inputs, encoder_hidden_states=None, encoder_attention_mask=None, skip_crs_attn=True)
    assert out.shape == inputs["hidden_states"].shape


@pytest.mark.parametrize("nc", [-1, 4, 1.5, "1"])
def test_num_cond_latents_out_of_range(dit, case, nc):
    inputs, _ = case
    with pytest.raises(ValueError, match="num_cond_latents"):
        _call(dit, inputs, num_cond_latents=nc)


def test_all_frames_conditioning_is_allowed(dit, case):
    inputs, _ = case
    out = _call(dit, inputs, num_cond_latents=3)
    assert torch.isfinite(out).all()


def test_mask_spellings_agree(dit, case):
    inputs, expected = case
    m = inputs["encoder_attention_mask"]
    for spelled in (m.bool(), m.float(), m[:, None, None, :]):
        assert_close_rel(_call(dit, inputs, encoder_attention_mask=spelled), expected, MODEL_RTOL, "mask spelling")
    # [B, L, C] text without the singleton axis
    y = inputs["encoder_hidden_states"][:, 0]
    assert_close_rel(_call(dit, inputs, encoder_hidden_states=y), expected, MODEL_RTOL, "3-D text")


@pytest.fixture(scope="module")
def kv_case():
    inputs, kv, expected, meta = load_case("kv_continue")
    return inputs, kv, expected["output"], meta["kwargs"]["num_cond_latents"]


def test_kv_cache_errors(dit, kv_case):
    inputs, kv, _, m = kv_case
    cases = [
        ({0: kv[0]}, "one \\(k, v\\) per block 0..1"),
        ({0: kv[0], 1: kv[1][0]}, "must be a \\(k, v\\) pair"),
        ({0: kv[0], 1: (kv[1][0], kv[1][1][:, :, :-4])}, "k and v must both be"),
        ({0: kv[0], 1: (kv[1][0][:, :, :24], kv[1][1][:, :, :24])}, "block 0 has"),
        ({b: (k[:, :2], v[:, :2]) for b, (k, v) in kv.items()}, "2 heads of dim 32; the model has 4 of dim 32"),
        ({b: (k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1)) for b, (k, v) in kv.items()}, "batch 3 must be 1"),
        ({b: (k[:, :, :30], v[:, :, :30]) for b, (k, v) in kv.items()}, "different resolution"),
    ]
    for cache, message in cases:
        with pytest.raises(ValueError, match=message):
            _call(dit, inputs, kv_cache_dict=cache, num_cond_latents=m)
    with pytest.raises(ValueError, match="num_cond_latents=1 but the kv cache holds 2 frames"):
        _call(dit, inputs, kv_cache_dict=kv, num_cond_latents=1)
    # The same cache on a call at another resolution: its token count is not whole frames there.
    x = inputs["hidden_states"][..., :10]
    with pytest.raises(ValueError, match="different resolution"):
        _call(dit, inputs, hidden_states=x, kv_cache_dict=kv, num_cond_latents=m)


def test_kv_cache_num_cond_inferred_and_empty_dict_means_none(dit, kv_case):
    inputs, kv, expected, _ = kv_case
    assert_close_rel(_call(dit, inputs, kv_cache_dict=kv), expected, MODEL_RTOL, "inferred m")
    out = _call(dit, inputs, kv_cache_dict={})
    assert out.shape == expected.shape


# -- construction choices ------------------------------------------------------------------------
def test_construction_choices_errors():
    with pytest.raises(ValueError, match="kernels must be one of"):
        lcn.LongCatDiT.from_config("tiny", kernels="fast")
    with pytest.raises(ValueError, match="unknown attention backend"):
        lcn.LongCatDiT.from_config("tiny", attention="magic")
    with pytest.raises(ValueError, match="cp_size must be a positive int"):
        lcn.LongCatDiT.from_config("tiny", cp_size=0)
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        lcn.LongCatDiT.from_config("huge")
    with pytest.raises(ValueError, match="unknown dtype"):
        lcn.LongCatDiT.from_config("tiny", dtype="float8")
    with pytest.raises(ValueError, match="head_dim 12 must be a multiple of 8"):
        lcn.LongCatDiT.from_config("tiny", hidden_size=48)


def test_from_config_presets_dicts_and_seeds():
    a = lcn.LongCatDiT.from_config("tiny", seed=1)
    b = lcn.LongCatDiT.from_config("tiny", seed=1)
    c = lcn.LongCatDiT.from_config("tiny", seed=2)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert torch.isfinite(pa).all() and pa.std() > 0
    d = lcn.LongCatDiT.from_config(dict(a.config.to_dict(), depth=3), dtype="bf16")
    assert d.config.depth == 3 and d.dtype == torch.bfloat16
    e = lcn.LongCatDiT.from_config(str(FIXTURE_ROOT / "dit" / "config.json"), depth=1)
    assert e.config.depth == 1 and len(e.blocks) == 1
    # Random weights produce a non-trivial output (adaLN is not zero-initialized).
    x = torch.randn(1, 16, 2, 4, 4)
    out = a(x, torch.tensor([500.0]), torch.randn(1, 1, 3, 64))
    assert out.std() > 0.1


def test_real_config_on_meta_has_13_6b_parameters():
    m = lcn.LongCatDiT.from_config("longcat-video", device="meta", dtype=torch.bfloat16)
    n = m.num_parameters()
    assert abs(n - 13.6e9) / 13.6e9 < 0.01, n
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.config.head_dim == 128 and m.config.ffn_hidden_size == 11008


def test_random_init_makes_no_float32_copies():
    """Random init of the real width never materializes float32 weights: every tensor created on
    a real device during construction is in the target dtype (a 1-block slice keeps it small)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOutputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fp32_elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and not t.is_meta and t.dtype == torch.float32:
                    self.fp32_elements += t.numel()
            return out

    with RecordOutputs() as rec:
        m = lcn.LongCatDiT.from_config("longcat-video", depth=1, dtype=torch.bfloat16, device="cpu")
    assert rec.fp32_elements < 1e4, rec.fp32_elements  # a few scalars at most, never a weight
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    w = m.blocks[0].attn.qkv.weight
    assert torch.isfinite(w[:4].float()).all() and w[:4].float().std() > 0


# -- drop-in for the official module -------------------------------------------------------------
class OfficialLikePipeline:
    """Uses the DiT only through what the official LongCat-Video pipeline touches."""

    def __init__(self, dit):
        self.dit = dit

    def prepare(self, device):
        self.dit.to(device)
        return self.dit.config.in_channels, self.dit.dtype, self.dit.cp_split_hw, self.dit.lora_dict

    def step(self, latents, t, prompt_embeds, prompt_mask):
        latents = latents.to(self.dit.dtype)
        timestep = t.to(self.dit.dtype)
        return self.dit(hidden_states=latents, timestep=timestep, encoder_hidden_states=prompt_embeds,
                        encoder_attention_mask=prompt_mask, num_cond_latents=0)


def test_drop_in_harness(case):
    inputs, expected = case
    dit = lcn.LongCatDiT.from_pretrained(str(FIXTURE_ROOT), subfolder="dit", cp_split_hw=[1, 1],
                                         torch_dtype=torch.float32)
    pipe = OfficialLikePipeline(dit)
    in_ch, dtype, cp, loras = pipe.prepare("cpu")
    assert (in_ch, dtype, cp, loras) == (16, torch.float32, [1, 1], {})
    assert dit.config["in_channels"] == 16 and "patch_size" in dit.config
    assert dit.config.get("text_tokens_zero_pad") is True
    out = pipe.step(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
                    inputs["encoder_attention_mask"])
    assert_close_rel(out, expected, MODEL_RTOL, "drop-in")
    dit.to(torch.bfloat16)
    assert dit.dtype == torch.bfloat16
    assert torch.isfinite(pipe.step(inputs["hidden_states"], inputs["timestep"],
                                    inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])).all()


def test_torch_compile_matches_eager(case):
    inputs, expected = case
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    compiled = torch.compile(dit)
    out = compiled(**inputs)
    assert_close_rel(out, expected, MODEL_RTOL, "torch.compile(dit)")


def test_repr_names_choices():
    r = repr(lcn.LongCatDiT.from_config("tiny", kernels="reference", attention="sdpa"))
    assert "kernels='reference'" in r and "attention='sdpa'" in r
