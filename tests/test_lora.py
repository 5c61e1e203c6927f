"""LoRA (runtime/lora.py): the official LoRA files, merged and unmerged, exact switching.

- the golden ``lora_cfg_step`` / ``lora_both`` cases in both modes on both kernel paths, and
  ``t2v_mask`` again after ``disable_all_loras()``;
- random LoRAs over every official target (fused qkv / kv with parallel up blocks, w1 | w3 in
  the stacked w13, adaLN_modulation.1, embedders, final layer) against the independent oracle
  tests/official_math.py run on the official state dict with the deltas merged in float64;
- merged vs unmerged equivalence; enable A, B, A+B, mode switches, disable: every parameter
  bit-exactly the original (float32 and bfloat16); A -> B gives exactly what B alone gives;
- bad files (unknown module, wrong shape or rank, pickle, malformed keys) and bad keys in
  ``enable_loras`` fail with one clear error and change nothing.
"""

import json

import pytest
import torch
from cases import FIXTURE_ROOT, load_case
from helpers import MODEL_RTOL, assert_close_rel, max_rel_err
from official_math import official_forward
from safetensors.torch import load_file, save_file

import longcat_native as lcn
from longcat_native.runtime import lora as lora_mod

PREFIX, HYPHEN = "lora___lorahyphen___", "___lorahyphen___"
# Parallel up blocks of the official cfg_step LoRA; "ffn.w1": 2 exercises a split of a w13 half.
OFFICIAL_BLOCKS = {"attn.qkv": 3, "cross_attn.kv_linear": 2}


# ---------------------------------------------------------------------------------------------
# Helpers (written independently of runtime/lora.py: official names and shapes from the config)
# ---------------------------------------------------------------------------------------------


def _official_linears(cfg):
    """{official Linear name: (out_features, in_features)} of the official model."""
    C, Ct, Fh = cfg.hidden_size, cfg.adaln_tembed_dim, cfg.ffn_hidden_size
    shapes = {
        "t_embedder.mlp.0": (Ct, cfg.frequency_embedding_size), "t_embedder.mlp.2": (Ct, Ct),
        "y_embedder.y_proj.0": (C, cfg.caption_channels), "y_embedder.y_proj.2": (C, C),
        "final_layer.adaLN_modulation.1": (2 * C, Ct), "final_layer.linear": (4 * cfg.out_channels, C),
    }
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        shapes.update({
            p + "adaLN_modulation.1": (6 * C, Ct), p + "attn.qkv": (3 * C, C), p + "attn.proj": (C, C),
            p + "cross_attn.q_linear": (C, C), p + "cross_attn.kv_linear": (2 * C, C), p + "cross_attn.proj": (C, C),
            p + "ffn.w1": (Fh, C), p + "ffn.w3": (Fh, C), p + "ffn.w2": (C, Fh),
        })
    return shapes


def _make_lora(shapes, rank=4, seed=0, blocks=OFFICIAL_BLOCKS, alpha_scale=0.5, amp=1.0, dtype=torch.float32,
               select=None):
    """A random LoRA state dict in the official format over ``shapes`` (optionally a subset)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, fin) in shapes.items():
        if select is not None and not select(name):
            continue
        n = next((v for k, v in blocks.items() if name.endswith(k)), 1)
        stem = PREFIX + name.replace(".", HYPHEN)
        sd[stem + ".lora_down.weight"] = (torch.randn(n * rank, fin, generator=g) / fin**0.5).to(dtype)
        ups = [(torch.randn(out // n, rank, generator=g) * amp / rank**0.5).to(dtype) for _ in range(n)]
        if n == 1:
            sd[stem + ".lora_up.weight"] = ups[0]
        else:
            for i, u in enumerate(ups):
                sd[stem + f".lora_up.blocks.{i}.weight"] = u
        sd[stem + ".alpha_scale"] = torch.tensor(alpha_scale, dtype=torch.float32)
    return sd


def _write(tmp_path, name, sd):
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


def _merge_official(sd, loras):
    """The official state dict with every LoRA delta added, in float64: W + m * a * up @ down
    (parallel up blocks stacked over the rows, each fed by its slice of the down output)."""
    out = {k: v.double().clone() for k, v in sd.items()}
    for lsd, mult in loras:
        for k in lsd:
            if not k.endswith(".lora_down.weight"):
                continue
            stem = k[: -len(".lora_down.weight")]
            name = stem[len(PREFIX):].replace(HYPHEN, ".")
            down = lsd[k].double()
            n_blocks = sum(1 for x in lsd if x.startswith(stem + ".lora_up.blocks."))
            ups = ([lsd[stem + ".lora_up.weight"]] if n_blocks == 0 else
                   [lsd[f"{stem}.lora_up.blocks.{i}.weight"] for i in range(n_blocks)])
            r = ups[0].shape[1]
            delta = torch.cat([u.double() @ down[i * r : (i + 1) * r] for i, u in enumerate(ups)], 0)
            out[name + ".weight"] += mult * float(lsd[stem + ".alpha_scale"]) * delta
    return out


def _load_fixture_loras(dit, meta):
    for e in meta["lora"]:
        dit.load_lora(FIXTURE_ROOT / e["file"], e["key"], multiplier=e["multiplier"],
                      lora_network_dim=e["lora_network_dim"], lora_network_alpha=e["lora_network_alpha"])


def _snapshot(dit):
    return {n: p.detach().clone() for n, p in dit.named_parameters()}


def _assert_params_equal(dit, snap, what):
    bad = [n for n, p in dit.named_parameters() if not torch.equal(p, snap[n])]
    assert not bad, f"{what}: parameters differ bit-wise: {bad[:5]}{' ...' if len(bad) > 5 else ''}"


def _inputs(cfg, seed=0, B=2, T=2, H=4, W=6, L=5):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(B, cfg.in_channels, T, H, W, generator=g),
                timestep=torch.rand(B, generator=g) * 1000,
                encoder_hidden_states=torch.randn(B, 1, L, cfg.caption_channels, generator=g),
                encoder_attention_mask=torch.tensor([[1] * L, [1] * (L - 2) + [0, 0]][:B]))


def _run(dit, inputs):
    with torch.inference_mode():
        return dit(**inputs)


# ---------------------------------------------------------------------------------------------
# Golden data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["merged", "unmerged"])
@pytest.mark.parametrize("case", ["lora_cfg_step", "lora_both"])
def test_fixture_lora_case(case, mode, kernels):
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, dtype=torch.float32, device="cpu", kernels=kernels)
    snap = _snapshot(dit)
    inputs, _, expected, meta = load_case(case)
    _load_fixture_loras(dit, meta)
    _assert_params_equal(dit, snap, "load_lora must not touch the weights")
    dit.lora_mode = mode
    dit.enable_loras(meta["enable"])
    assert dit.active_loras == meta["enable"]
    assert_close_rel(_run(dit, dict(inputs, **meta.get("kwargs", {}))), expected["output"], MODEL_RTOL,
                     f"{case} {mode} {kernels}")

    dit.disable_all_loras()
    assert dit.active_loras == []
    _assert_params_equal(dit, snap, "after disable_all_loras")
    assert not any(getattr(m, "lora_branches", None) for m in dit.modules())
    base_inputs, _, base_expected, _ = load_case("t2v_mask")
    assert_close_rel(_run(dit, base_inputs), base_expected["output"], MODEL_RTOL, f"t2v_mask after {case} {mode}")


def test_fixture_lora_files_map_onto_internal_layout():
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT)
    _, _, _, meta = load_case("lora_both")
    _load_fixture_loras(dit, meta)
    cfg_step = dit.lora_dict["cfg_step"]
    assert isinstance(cfg_step, lora_mod.LoRA) and cfg_step.multiplier == 1.0
    assert dit.lora_dict["refinement"].multiplier == 0.7
    by_name = {m.module_name: m for m in cfg_step.loras}
    assert len(by_name) == 2 * 8
    qkv, w3 = by_name["blocks.1.attn.qkv"], by_name["blocks.1.ffn.w3"]
    assert qkv.internal_name == "blocks.1.attn.qkv" and len(qkv.ups) == 3 and qkv.rank == 4
    assert [row for row, _, _ in qkv.targets()] == [0, 128, 256]
    assert w3.internal_name == "blocks.1.ffn.w13" and w3.row_offset == dit.config.ffn_hidden_size
    assert by_name["blocks.0.ffn.w1"].row_offset == 0
    assert by_name["blocks.0.cross_attn.kv_linear"].internal_name == "blocks.0.cross_attn.kv_linear"
    ada = {m.module_name: m for m in dit.lora_dict["refinement"].loras}["blocks.0.adaLN_modulation.1"]
    assert ada.internal_name == "blocks.0.adaLN_modulation"
    assert all(m.alpha_scale == 0.5 for m in cfg_step.loras)
    assert cfg_step.to("cuda") is cfg_step  # official code moves lora networks around; ours stay on the host
    assert cfg_step.loras[0].lora_name.startswith(PREFIX)


# ---------------------------------------------------------------------------------------------
# Random LoRAs over every target vs the independent oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_all_targets_match_official_math(tmp_path, mode):
    """Two LoRAs over every official Linear (w1 with 2 parallel up blocks in B), multipliers 0.8
    and -1.3, against official_math on the official state dict with the deltas merged in float64."""
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    shapes = _official_linears(dit.config)
    a = _make_lora(shapes, rank=4, seed=1, alpha_scale=0.5, amp=0.5)
    b = _make_lora(shapes, rank=3, seed=2, alpha_scale=0.25, amp=0.5, blocks=dict(OFFICIAL_BLOCKS, **{"ffn.w1": 2}),
                   select=lambda n: "attn" in n or "ffn" in n or "final_layer" in n)
    dit.load_lora(_write(tmp_path, "a", a), "a", multiplier=0.8, lora_network_dim=4)
    dit.load_lora(_write(tmp_path, "b", b), "b", multiplier=-1.3, lora_network_dim=3)
    dit.lora_mode = mode
    dit.enable_loras(["a", "b"])
    inputs, _, _, _ = load_case("t2v_mask")
    out = _run(dit, inputs)

    sd = load_file(str(FIXTURE_ROOT / "dit" / "diffusion_pytorch_model.safetensors"))
    cfg = json.loads((FIXTURE_ROOT / "dit" / "config.json").read_text())
    merged = _merge_official(sd, [(a, 0.8), (b, -1.3)])
    expected = official_forward(merged, cfg, inputs["hidden_states"], inputs["timestep"],
                                inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])
    base = official_forward(sd, cfg, inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"],
                            inputs["encoder_attention_mask"])
    assert max_rel_err(expected, base) > 0.05, "the random LoRAs must change the output noticeably"
    assert_close_rel(out, expected, MODEL_RTOL, f"all targets, {mode}")


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)], ids=str)
def test_merged_matches_unmerged(tmp_path, dtype, rtol):
    cfg_kw = dict(hidden_size=64, num_heads=2, depth=2, caption_channels=24, adaln_tembed_dim=32)
    dit = lcn.LongCatDiT.from_config("tiny", seed=5, dtype=dtype, kernels="reference", **cfg_kw)
    shapes = _official_linears(dit.config)
    dit.load_lora(_write(tmp_path, "a", _make_lora(shapes, rank=8, seed=3, amp=0.5)), "a", multiplier=0.9,
                  lora_network_dim=8)
    dit.load_lora(_write(tmp_path, "b", _make_lora(shapes, rank=8, seed=4, amp=0.5, dtype=torch.bfloat16,
                                                   select=lambda n: "blocks.1" in n)), "b", lora_network_dim=8)
    inputs = _inputs(dit.config)
    base = _run(dit, inputs)
    dit.enable_loras(["a", "b"])
    merged = _run(dit, inputs)
    dit.lora_mode = "unmerged"  # re-applies the active set as branches
    assert dit.active_loras == ["a", "b"]
    assert any(hasattr(m, "lora_branches") for m in dit.modules())
    unmerged = _run(dit, inputs)
    assert max_rel_err(merged, base) > 0.05
    assert_close_rel(unmerged, merged, rtol, f"merged vs unmerged {dtype}")


# ---------------------------------------------------------------------------------------------
# Exact switching
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_switching_restores_weights_bit_exactly(tmp_path, dtype):
    cfg_kw = dict(hidden_size=64, num_heads=2, depth=2, caption_channels=24, adaln_tembed_dim=32)
    dit = lcn.LongCatDiT.from_config("tiny", seed=7, dtype=dtype, **cfg_kw)
    fresh = lcn.LongCatDiT.from_config("tiny", seed=7, dtype=dtype, **cfg_kw)
    snap = _snapshot(dit)
    shapes = _official_linears(dit.config)
    # Large deltas: in bfloat16 subtracting a delta again would not give the original back.
    pa = _write(tmp_path, "a", _make_lora(shapes, rank=4, seed=1, amp=3.0))
    pb = _write(tmp_path, "b", _make_lora(shapes, rank=4, seed=2, amp=3.0, select=lambda n: "attn" in n))
    for m in (dit, fresh):
        m.load_lora(pa, "A", lora_network_dim=4)
        m.load_lora(pb, "B", multiplier=0.5, lora_network_dim=4)

    dit.enable_loras(["A"])
    qkv = dit.blocks[0].attn.qkv.weight
    assert not torch.equal(qkv, snap["blocks.0.attn.qkv.weight"])
    dit.enable_loras(["B"])  # A -> B: from the original weights, nothing of A left
    fresh.enable_loras(["B"])
    _assert_params_equal(dit, _snapshot(fresh), "A then B vs B alone")
    assert torch.equal(dit.blocks[0].ffn.w13.weight, snap["blocks.0.ffn.w13.weight"])  # only A touched it
    dit.enable_loras(["A", "B"])
    dit.enable_loras(["B", "A"])
    dit.lora_mode = "unmerged"
    _assert_params_equal(dit, snap, "unmerged mode leaves the weights alone")
    dit.enable_loras(["A"])
    dit.lora_mode = "merged"
    dit.enable_loras([])  # an empty set is disable
    _assert_params_equal(dit, snap, "after enable_loras([])")
    dit.enable_loras(["A", "B"])
    dit.disable_all_loras()
    dit.disable_all_loras()  # idempotent
    _assert_params_equal(dit, snap, "after disable_all_loras")
    for p in dit.parameters():
        assert p.dtype == dtype and not p.requires_grad


def test_base_copies_are_reused_and_refreshed(tmp_path):
    dit = lcn.LongCatDiT.from_config("tiny", seed=1, hidden_size=64, num_heads=2, caption_channels=24)
    shapes = _official_linears(dit.config)
    dit.load_lora(_write(tmp_path, "a", _make_lora(shapes, rank=2, select=lambda n: n.endswith("attn.proj"))), "a",
                  lora_network_dim=2)
    assert lora_mod.base_copy_bytes(dit) == 0
    dit.enable_loras(["a"])
    held = lora_mod.base_copy_bytes(dit)
    proj = dit.blocks[0].attn.proj.weight
    assert held == dit.config.depth * 2 * proj.numel() * proj.element_size()  # attn.proj + cross_attn.proj
    dit.disable_all_loras()
    assert lora_mod.base_copy_bytes(dit) == held  # kept for the next enable
    with torch.no_grad():
        proj.mul_(2.0)  # the user changes a weight while no LoRA is merged: the copy is stale
    changed = _snapshot(dit)
    dit.enable_loras(["a"])
    dit.disable_all_loras()
    _assert_params_equal(dit, changed, "restore after an in-place weight change")
    lora_mod.release_base_copies(dit)
    assert lora_mod.base_copy_bytes(dit) == 0
    dit.enable_loras(["a"])
    dit.disable_all_loras()
    _assert_params_equal(dit, changed, "restore after release_base_copies")


def test_reloading_a_key_replaces_it_and_reapplies(tmp_path):
    cfg_kw = dict(hidden_size=64, num_heads=2, depth=1, caption_channels=24)
    dit = lcn.LongCatDiT.from_config("tiny", seed=2, **cfg_kw)
    other = lcn.LongCatDiT.from_config("tiny", seed=2, **cfg_kw)
    shapes = _official_linears(dit.config)
    pa, pb = (_write(tmp_path, n, _make_lora(shapes, rank=2, seed=s)) for n, s in (("a", 1), ("b", 2)))
    dit.load_lora(pa, "x", lora_network_dim=2)
    dit.enable_loras(["x"])
    dit.load_lora(pb, "x", multiplier=0.3, lora_network_dim=2)  # replaces; "x" is active, so re-applied
    assert dit.active_loras == ["x"] and dit.lora_dict["x"].multiplier == 0.3
    other.load_lora(pb, "x", multiplier=0.3, lora_network_dim=2)
    other.enable_loras(["x"])
    _assert_params_equal(dit, _snapshot(other), "reloaded key")
    # set_multiplier takes effect at the next enable_loras
    dit.lora_dict["x"].set_multiplier(1.0)
    other.lora_dict["x"].set_multiplier(1.0)
    dit.enable_loras(["x"])
    other.enable_loras(["x"])
    _assert_params_equal(dit, _snapshot(other), "after set_multiplier")


def test_compiled_model_follows_lora_switches():
    """Merged weights change in place; unmerged branches live in a ``__dict__`` entry that the
    compiled code must guard on (present from the first load_lora on)."""
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    inputs, _, expected, meta = load_case("lora_cfg_step")
    base_inputs, _, base_expected, _ = load_case("t2v_mask")
    _load_fixture_loras(dit, meta)
    compiled = torch.compile(dit)
    assert_close_rel(_run(compiled, base_inputs), base_expected["output"], MODEL_RTOL, "compiled, no LoRA")
    dit.lora_mode = "unmerged"
    dit.enable_loras(["cfg_step"])
    assert_close_rel(_run(compiled, inputs), expected["output"], MODEL_RTOL, "compiled, unmerged")
    dit.lora_mode = "merged"
    assert_close_rel(_run(compiled, inputs), expected["output"], MODEL_RTOL, "compiled, merged")
    dit.disable_all_loras()
    assert_close_rel(_run(compiled, base_inputs), base_expected["output"], MODEL_RTOL, "compiled, disabled")


def test_bsa_model_with_lora(tmp_path):
    if not hasattr(lcn.LongCatDiT, "enable_bsa"):
        pytest.skip("block-sparse attention is not in this version of the runtime")
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    _, _, _, meta = load_case("lora_both")
    _load_fixture_loras(dit, meta)
    dit.enable_bsa()
    inputs, _, _, _ = load_case("bsa_t2v")
    base = _run(dit, inputs)
    dit.enable_loras(meta["enable"])
    merged = _run(dit, inputs)
    dit.lora_mode = "unmerged"
    unmerged = _run(dit, inputs)
    assert max_rel_err(merged, base) > 1e-3
    assert_close_rel(unmerged, merged, 1e-5, "BSA: merged vs unmerged")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dit():
    return lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT)


def _lora_error(dit, tmp_path, sd, **kw):
    snap = _snapshot(dit)
    keys = dict(dit.lora_dict)
    with pytest.raises(ValueError) as e:
        dit.load_lora(_write(tmp_path, "bad", sd), "bad", **kw)
    assert dict(dit.lora_dict) == keys, "a failed load must not change lora_dict"
    _assert_params_equal(dit, snap, "a failed load must not touch the weights")
    return str(e.value)


def test_unknown_modules_and_wrong_shapes_name_every_key(tiny_dit, tmp_path):
    shapes = _official_linears(tiny_dit.config)
    sd = _make_lora(shapes, rank=4, select=lambda n: n == "blocks.0.attn.proj")
    sd.update(_make_lora({"blocks.7.attn.proj": (128, 128), "blocks.0.attn.nope": (128, 128),
                          "x_embedder.proj": (128, 64), "blocks.0.ffn.w13": (1024, 128),
                          "blocks.0.adaLN_modulation": (768, 32)}, rank=4))
    stem = PREFIX + "blocks" + HYPHEN + "1" + HYPHEN + "attn" + HYPHEN + "qkv"
    qkv = _make_lora({"blocks.1.attn.qkv": (384, 128)}, rank=4)
    qkv[stem + ".lora_up.blocks.1.weight"] = torch.randn(127, 4)  # wrong rows
    sd.update(qkv)
    sd.update(_make_lora({"blocks.1.ffn.w2": (128, 500)}, rank=4))  # wrong in_features
    msg = _lora_error(tiny_dit, tmp_path, sd, lora_network_dim=4)
    for name in ("blocks.7.attn.proj", "blocks.0.attn.nope", "x_embedder.proj", "blocks.0.ffn.w13",
                 "blocks.0.adaLN_modulation"):
        assert f"module '{name}'" in msg, (name, msg)
    assert stem + ".lora_up.blocks.1.weight: shape [127, 4], expected [128, 4]" in msg
    assert PREFIX + "blocks" + HYPHEN + "1" + HYPHEN + "ffn" + HYPHEN + "w2.lora_down.weight: shape [4, 500]" in msg
    assert "Conv3d" in msg
    assert "blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___proj" not in msg  # the good one
    assert msg.count("\n  ") == 7


def test_rank_must_match_lora_network_dim(tiny_dit, tmp_path):
    sd = _make_lora(_official_linears(tiny_dit.config), rank=4, select=lambda n: n.endswith("attn.qkv"))
    msg = _lora_error(tiny_dit, tmp_path, sd)  # default lora_network_dim=128, as the official loader
    assert msg.count("rank 4 in the file but lora_network_dim=128") == 2 and "pass lora_network_dim=4" in msg
    assert PREFIX + "blocks" + HYPHEN + "1" + HYPHEN + "attn" + HYPHEN + "qkv" in msg


def test_malformed_lora_entries(tiny_dit, tmp_path):
    shapes = _official_linears(tiny_dit.config)
    sd = _make_lora(shapes, rank=2, select=lambda n: n.startswith("blocks.0.") and "attn." in n)
    stems = sorted({k.split(".")[0] for k in sd})
    del sd[stems[0] + ".alpha_scale"]
    del sd[stems[1] + ".lora_down.weight"]
    sd[stems[2] + ".lora_up.weight"] = torch.randn(128, 2)  # kv_linear has up blocks already (both forms)
    sd[stems[3] + ".alpha_scale"] = torch.ones(2)
    sd["something_else.weight"] = torch.zeros(1)
    int_key = PREFIX + "blocks" + HYPHEN + "1" + HYPHEN + "attn" + HYPHEN + "proj.lora_down.weight"
    sd[int_key] = torch.zeros(2, 128, dtype=torch.int32)
    msg = _lora_error(tiny_dit, tmp_path, sd, lora_network_dim=2)
    assert "alpha_scale is missing" in msg and "lora_down.weight is missing" in msg
    assert "both lora_up.weight and lora_up.blocks" in msg and "alpha_scale must be a scalar" in msg
    assert "something_else.weight: not a LoRA key" in msg and "not floating point" in msg


def test_pickle_and_unreadable_files_are_refused(tiny_dit, tmp_path):
    sd = _make_lora(_official_linears(tiny_dit.config), rank=2, select=lambda n: n.endswith("attn.proj"))
    for name in ("lora.pt", "lora_pickle_inside.safetensors"):
        torch.save(sd, tmp_path / name)
        with pytest.raises(ValueError, match="pickle"):
            tiny_dit.load_lora(tmp_path / name, "p", lora_network_dim=2)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        tiny_dit.load_lora(tmp_path / "junk.safetensors", "j")
    with pytest.raises(FileNotFoundError):
        tiny_dit.load_lora(tmp_path / "missing.safetensors", "m")
    assert "p" not in tiny_dit.lora_dict and "j" not in tiny_dit.lora_dict


def test_enable_loras_rejects_unknown_and_repeated_keys(tiny_dit, tmp_path):
    _, _, _, meta = load_case("lora_cfg_step")
    _load_fixture_loras(tiny_dit, meta)
    tiny_dit.enable_loras(["cfg_step"])
    merged = _snapshot(tiny_dit)
    with pytest.raises(ValueError, match=r"unknown LoRA key\(s\) \['nope'\].*cfg_step"):
        tiny_dit.enable_loras(["cfg_step", "nope"])
    with pytest.raises(ValueError, match="more than once"):
        tiny_dit.enable_loras(["cfg_step", "cfg_step"])
    assert tiny_dit.active_loras == ["cfg_step"]  # nothing changed
    _assert_params_equal(tiny_dit, merged, "a rejected enable_loras")
    with pytest.raises(ValueError, match="lora_mode must be one of"):
        tiny_dit.lora_mode = "fused"
    with pytest.raises(ValueError, match="multiplier"):
        tiny_dit.load_lora(FIXTURE_ROOT / meta["lora"][0]["file"], "m", multiplier=float("nan"), lora_network_dim=4)
    tiny_dit.disable_all_loras()
    assert tiny_dit.lora_mode == "merged"
