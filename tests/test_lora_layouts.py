"""LoRA files in FastVideo's layout (runtime/lora_fastvideo.py; docs/design/checkpoints.md, "LoRA files").

FastVideo-format files are written here from the official fixture LoRAs by this file's own
converter, which follows FastVideo's ``scripts/checkpoint_conversion/longcat_to_fastvideo.py``
rule by rule (FastVideo is not imported), and the expected math is FastVideo's merge
(``W += strength * int(alpha) / rank * B @ A`` per layer) emulated here in float64:

- converted fixture LoRAs give the official golden ``lora_cfg_step`` / ``lora_both`` outputs,
  merged and unmerged, load as the very modules of the official file and draw the same RNG;
- where FastVideo's math is not the official one (non-integral alpha, no alpha, q/k/v parts of
  different ranks) the output is FastVideo's;
- bad files (unknown modules, rank or shape mismatches, the converter's broken split of a
  one-up-block fused LoRA, mixed formats) fail naming their keys and change nothing;
- the pipelines' ``lora_path=`` takes a FastVideo file.
"""

import json

import pytest
import torch
from cases import FIXTURE_ROOT, load_case
from helpers import MODEL_RTOL, assert_close_rel, max_rel_err
from official_math import official_forward
from safetensors.torch import load_file, save_file

import longcat_native as lcn

PREFIX, HYPHEN = "lora___lorahyphen___", "___lorahyphen___"

# ---------------------------------------------------------------------------------------------
# FastVideo's converter, rule by rule (written from its source, not imported)
# ---------------------------------------------------------------------------------------------

_BLOCK_MAP = {  # official module under blocks.N. -> FastVideo module(s), in row order
    "attn.qkv": ["self_attn.to_q", "self_attn.to_k", "self_attn.to_v"],
    "attn.proj": ["self_attn.to_out"],
    "cross_attn.q_linear": ["cross_attn.to_q"],
    "cross_attn.kv_linear": ["cross_attn.to_k", "cross_attn.to_v"],
    "cross_attn.proj": ["cross_attn.to_out"],
    "ffn.w1": ["ffn.w1"], "ffn.w2": ["ffn.w2"], "ffn.w3": ["ffn.w3"],
    "adaLN_modulation.1": ["adaln_linear_1"],
}
_TOP_MAP = {"final_layer.adaLN_modulation.1": ["final_layer.adaln_linear"], "final_layer.linear": ["final_layer.proj"]}


def _fv_targets(official):
    """FastVideo's map_lora_module; None where it raises (the converter then skips the module)."""
    if official in _TOP_MAP:
        return _TOP_MAP[official]
    parts = official.split(".", 2)
    if parts[0] == "blocks" and parts[2] in _BLOCK_MAP:
        return [f"blocks.{parts[1]}.{t}" for t in _BLOCK_MAP[parts[2]]]
    return None


def to_fastvideo(sd, suffix="", prefix=""):
    """FastVideo's convert_lora_weights on an official LoRA state dict."""
    mods = {}
    for k in sd:
        stem, kind = k.split(".", 1)
        mods.setdefault(stem[len(PREFIX):].replace(HYPHEN, "."), {})[kind] = sd[k]
    out = {}
    key = lambda path, kind: f"{prefix}{path}.{kind}{suffix if kind != 'lora_alpha' else ''}"  # noqa: E731
    for official, w in mods.items():
        targets = _fv_targets(official)
        if targets is None:
            continue
        a_s = float(w["alpha_scale"]) if "alpha_scale" in w else 1.0
        down, n = w["lora_down.weight"], len(targets)
        rank = down.shape[0] // n
        for i, t in enumerate(targets):
            out[key(t, "lora_A")] = down if n == 1 else down[i * rank:(i + 1) * rank]
            out[key(t, "lora_alpha")] = torch.tensor(a_s * (down.shape[0] if n == 1 else rank), dtype=torch.float32)
        blocks = [w[f"lora_up.blocks.{i}.weight"] for i in range(len(w)) if f"lora_up.blocks.{i}.weight" in w]
        if blocks and n == 1:  # one target, several up blocks: block-diagonal lora_B
            o, r = blocks[0].shape
            B = torch.zeros(o * len(blocks), r * len(blocks), dtype=blocks[0].dtype)
            for i, b in enumerate(blocks):
                B[i * o:(i + 1) * o, i * r:(i + 1) * r] = b
            out[key(targets[0], "lora_B")] = B
        elif blocks:
            for t, b in zip(targets, blocks):
                out[key(t, "lora_B")] = b
        else:
            up = w["lora_up.weight"]
            rows = up.shape[0] // n
            for i, t in enumerate(targets):
                out[key(t, "lora_B")] = up[i * rows:(i + 1) * rows]
    return {k: v.contiguous() for k, v in out.items()}


def _fv_to_official_rows(cfg):
    """{FastVideo module: (official weight name, first row)} for a model of config ``cfg``: a
    q/k/v part is its row block (hidden_size rows each) of the fused official weight."""
    C, out = cfg["hidden_size"], {}
    for i in range(cfg["depth"]):
        for off, fvs in _BLOCK_MAP.items():
            for j, fv in enumerate(fvs):
                out[f"blocks.{i}.{fv}"] = (f"blocks.{i}.{off}.weight", j * C)
    for off, (fv,) in _TOP_MAP.items():
        out[fv] = (off + ".weight", 0)
    return out


def fastvideo_merge(sd, cfg, files, as_fastvideo=True):
    """FastVideo's merge of (FastVideo file, strength) pairs into the official state dict, in
    float64: per layer W += strength * s * B @ A with s = int(alpha) / rank (alpha = rank when
    the file has none; s = 1 when int(alpha) is 0). ``as_fastvideo=False``: s = alpha / rank."""
    out = {k: v.double().clone() for k, v in sd.items()}
    where = _fv_to_official_rows(cfg)
    for fv, strength in files:
        for k in fv:
            if not k.endswith(".lora_A"):
                continue
            mod = k[: -len(".lora_A")]
            A, B = fv[k].double(), fv[mod + ".lora_B"].double()
            r = A.shape[0]
            alpha = fv[mod + ".lora_alpha"].item() if mod + ".lora_alpha" in fv else r
            if as_fastvideo:
                s = int(alpha) / r if int(alpha) else 1.0
            else:
                s = alpha / r
            name, row0 = where[mod]
            out[name][row0:row0 + B.shape[0]] += strength * s * (B @ A)
    return out


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _write(tmp_path, name, sd):
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


def _fixture_lora(name):
    return load_file(str(FIXTURE_ROOT / "lora" / f"{name}.safetensors"))


def _run(dit, inputs):
    with torch.inference_mode():
        return dit(**inputs)


def _snapshot(dit):
    return {n: p.detach().clone() for n, p in dit.named_parameters()}


def _official_out(sd_merged, inputs):
    cfg = json.loads((FIXTURE_ROOT / "dit" / "config.json").read_text())
    return official_forward(sd_merged, cfg, inputs["hidden_states"], inputs["timestep"],
                            inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])


# ---------------------------------------------------------------------------------------------
# Converted fixture LoRAs: the official goldens
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
@pytest.mark.parametrize("case", ["lora_cfg_step", "lora_both"])
def test_fastvideo_files_give_the_golden_lora_cases(tmp_path, case, mode):
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, dtype=torch.float32, device="cpu", kernels="reference")
    snap = _snapshot(dit)
    inputs, _, expected, meta = load_case(case)
    for e in meta["lora"]:
        stem = e["file"].split("/")[-1][: -len(".safetensors")]
        fv = to_fastvideo(load_file(str(FIXTURE_ROOT / e["file"])))
        assert not any(k.startswith(PREFIX) for k in fv) and any(k.endswith("self_attn.to_v.lora_B") for k in fv)
        # No lora_network_dim: FastVideo files carry their ranks (the default 128 is not the file's 4).
        lo = dit.load_lora(_write(tmp_path, stem, fv), e["key"], multiplier=e["multiplier"])
        assert lo.format == "fastvideo" and lo.lora_network_dim == 4
    dit.lora_mode = mode
    dit.enable_loras(meta["enable"])
    assert_close_rel(_run(dit, dict(inputs, **meta.get("kwargs", {}))), expected["output"], MODEL_RTOL,
                     f"FastVideo-format {case} {mode}")
    dit.disable_all_loras()
    assert all(torch.equal(p, snap[n]) for n, p in dit.named_parameters())
    base_inputs, _, base_expected, _ = load_case("t2v_mask")
    assert_close_rel(_run(dit, base_inputs), base_expected["output"], MODEL_RTOL, "t2v_mask after")


@pytest.mark.parametrize("suffix,prefix", [("", ""), (".weight", "diffusion_model.")])
def test_fastvideo_file_loads_as_the_official_file(tmp_path, suffix, prefix):
    """q/k/v (k/v) parts are re-assembled into the official fused module: the same down, up
    blocks and scale as the official file, and the same global-RNG draws as its official load."""
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    for name in ("cfg_step_lora", "refinement_lora"):
        torch.manual_seed(3)
        off = dit.load_lora(FIXTURE_ROOT / "lora" / f"{name}.safetensors", "off", lora_network_dim=4)
        rng_official = torch.get_rng_state()
        torch.manual_seed(3)
        fv = dit.load_lora(_write(tmp_path, name, to_fastvideo(_fixture_lora(name), suffix, prefix)), "fv")
        assert torch.equal(torch.get_rng_state(), rng_official), "the RNG draws of the official load"
        a = {(m.internal_name, m.row_offset): m for m in off.loras}
        b = {(m.internal_name, m.row_offset): m for m in fv.loras}
        assert a.keys() == b.keys()
        for k, m in a.items():
            o = b[k]
            assert o.module_name == m.module_name and o.alpha_scale == m.alpha_scale == 0.5, k
            assert torch.equal(o.down, m.down) and len(o.ups) == len(m.ups), k
            assert all(torch.equal(x, y) for x, y in zip(o.ups, m.ups)), k
        qkv = next(m for m in fv.loras if m.module_name == "blocks.1.attn.qkv")
        assert len(qkv.ups) == 3 and qkv.lora_name == PREFIX + "blocks.1.attn.qkv".replace(".", HYPHEN)


# ---------------------------------------------------------------------------------------------
# Where FastVideo's math is not the official one: FastVideo's
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_fastvideo_math_where_it_differs_from_official(tmp_path, mode):
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    cfg = json.loads((FIXTURE_ROOT / "dit" / "config.json").read_text())
    sd = load_file(str(FIXTURE_ROOT / "dit" / "diffusion_pytorch_model.safetensors"))
    g = torch.Generator().manual_seed(11)
    official = _fixture_lora("cfg_step_lora")
    # alpha_scale 0.3 at rank 4: alpha 1.2, FastVideo keeps int(1.2) = 1, scale 0.25, not 0.3.
    for k in official:
        if k.endswith(".alpha_scale"):
            official[k] = torch.tensor(0.3)
    fv = to_fastvideo(official)
    assert fv["blocks.0.self_attn.to_q.lora_alpha"].item() == pytest.approx(1.2)
    del fv["blocks.1.ffn.w2.lora_alpha"]  # no alpha: scale 1 (alpha = rank)
    fv["blocks.0.ffn.w2.lora_alpha"] = torch.tensor(0.4)  # int(0.4) = 0: FastVideo's merge scales by 1
    # q and k of block 1's self-attention with ranks 2 and 3, no v: kept as two modules over their rows
    for t in ("to_q", "to_k", "to_v"):
        for kind in ("lora_A", "lora_B", "lora_alpha"):
            del fv[f"blocks.1.self_attn.{t}.{kind}"]
    C = cfg["hidden_size"]
    for t, r in (("to_q", 2), ("to_k", 3)):
        fv[f"blocks.1.self_attn.{t}.lora_A"] = torch.randn(r, C, generator=g) / C**0.5
        fv[f"blocks.1.self_attn.{t}.lora_B"] = torch.randn(C, r, generator=g)
        fv[f"blocks.1.self_attn.{t}.lora_alpha"] = torch.tensor(float(r + 1))
    # a one-target module with 2 up blocks: the converter's block-diagonal lora_B (same math)
    stem = PREFIX + "blocks.0.ffn.w1".replace(".", HYPHEN)
    fixture = _fixture_lora("cfg_step_lora")
    down, up = fixture[stem + ".lora_down.weight"], fixture[stem + ".lora_up.weight"]
    w1 = {stem + ".lora_down.weight": torch.cat([down, torch.randn(4, C, generator=g) / C**0.5]),
          stem + ".lora_up.blocks.0.weight": up[:256], stem + ".lora_up.blocks.1.weight": up[256:],
          stem + ".alpha_scale": torch.tensor(0.5)}
    for k in [k for k in fv if k.startswith("blocks.0.ffn.w1.")]:
        del fv[k]
    fv.update(to_fastvideo(w1))
    assert fv["blocks.0.ffn.w1.lora_B"].shape == (512, 8)

    lo = dit.load_lora(_write(tmp_path, "fv", fv), "fv", multiplier=0.7)
    q = [m for m in lo.loras if m.module_name == "blocks.1.attn.qkv"]
    assert sorted((m.row_offset, m.rank) for m in q) == [(0, 2), (C, 3)]
    dit.lora_mode = mode
    dit.enable_loras(["fv"])
    inputs, _, _, _ = load_case("t2v_mask")
    out = _run(dit, inputs)
    expected = _official_out(fastvideo_merge(sd, cfg, [(fv, 0.7)]), inputs)
    assert_close_rel(out, expected, MODEL_RTOL, f"FastVideo math, {mode}")
    # ... which is not what exact alpha / rank scales would give (the test tells them apart)
    exact = _official_out(fastvideo_merge(sd, cfg, [(fv, 0.7)], as_fastvideo=False), inputs)
    assert max_rel_err(exact, expected) > 10 * MODEL_RTOL


# ---------------------------------------------------------------------------------------------
# Errors name their keys; nothing changes
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dit():
    return lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")


def _error(dit, tmp_path, sd, **kw):
    snap, keys = _snapshot(dit), dict(dit.lora_dict)
    with pytest.raises(ValueError) as e:
        dit.load_lora(_write(tmp_path, "bad", sd), "bad", **kw)
    assert dict(dit.lora_dict) == keys and all(torch.equal(p, snap[n]) for n, p in dit.named_parameters())
    return str(e.value)


def test_bad_fastvideo_files_name_their_keys(tiny_dit, tmp_path):
    good = to_fastvideo(_fixture_lora("refinement_lora"))
    sd = dict(good)
    sd["blocks.0.self_attn.qkv_fused.lora_A"] = torch.randn(4, 128)
    sd["blocks.0.self_attn.qkv_fused.lora_B"] = torch.randn(384, 4)
    sd["patch_embed.proj.lora_A"] = torch.randn(4, 64)
    sd["blocks.0.cross_attn.to_q.lora_A"] = torch.randn(4, 128)  # no lora_B
    sd["blocks.1.ffn.w2.lora_B"] = torch.randn(128, 5)  # rank 5 vs lora_A's 4
    sd["blocks.0.adaln_linear_1.lora_B"] = torch.randn(767, 4)  # wrong rows
    sd["blocks.1.adaln_linear_1.lora_alpha"] = torch.ones(2)
    sd["blocks.0.self_attn.to_out.lora_A.weight"] = torch.randn(4, 128)
    sd["blocks.0.self_attn.to_out.lora_A"] = torch.randn(4, 128)  # the same key to FastVideo
    sd["blocks.0.self_attn.to_out.lora_B"] = torch.randn(128, 4)
    sd["blocks.0.ffn.w1.lora_A"] = torch.randn(4, 100)  # wrong in_features
    sd["blocks.0.ffn.w1.lora_B"] = torch.randn(512, 4)
    sd["blocks.1.cross_attn.to_out.lora_A"] = torch.randn(0, 128)
    sd["blocks.1.cross_attn.to_out.lora_B"] = torch.randn(128, 0)
    msg = _error(tiny_dit, tmp_path, sd)
    assert "module 'blocks.0.self_attn.qkv_fused' is not a LoRA target" in msg
    assert "module 'patch_embed.proj'" in msg and "Conv3d" in msg
    assert "blocks.0.cross_attn.to_q.lora_B is missing" in msg
    assert "blocks.1.ffn.w2.lora_A, blocks.1.ffn.w2.lora_B: rank mismatch" in msg
    assert "blocks.0.adaln_linear_1.lora_B: shape [767, 4], expected [768, rank]" in msg
    assert "blocks.1.adaln_linear_1.lora_alpha: lora_alpha must be a scalar" in msg
    assert "blocks.0.self_attn.to_out.lora_A.weight: the same tensor as blocks.0.self_attn.to_out.lora_A" in msg
    assert "blocks.0.ffn.w1.lora_A: shape [4, 100], expected [rank, 128]" in msg
    assert "self_attn.to_v" not in msg and "blocks.0.ffn.w2" not in msg  # the good ones
    assert "blocks.1.cross_attn.to_out.lora_A, blocks.1.cross_attn.to_out.lora_B: rank 0" in msg
    assert msg.count("\n  ") == 9


def test_converted_one_up_block_qkv_lora_is_refused(tiny_dit, tmp_path):
    """An official qkv LoRA with one lora_up (rank 6): FastVideo's converter splits lora_down into
    three rank-2 pieces but gives each to_q/to_k/to_v a rank-6 lora_B, which FastVideo's merge
    cannot multiply; refused with the reason."""
    g = torch.Generator().manual_seed(0)
    stem = PREFIX + "blocks.0.attn.qkv".replace(".", HYPHEN)
    official = {stem + ".lora_down.weight": torch.randn(6, 128, generator=g),
                stem + ".lora_up.weight": torch.randn(384, 6, generator=g), stem + ".alpha_scale": torch.tensor(0.5)}
    fv = to_fastvideo(official)
    assert fv["blocks.0.self_attn.to_q.lora_A"].shape == (2, 128)
    assert fv["blocks.0.self_attn.to_q.lora_B"].shape == (128, 6)
    msg = _error(tiny_dit, tmp_path, fv)
    assert msg.count("rank mismatch") == 3 and "blocks.0.self_attn.to_k.lora_A, blocks.0.self_attn.to_k.lora_B" in msg
    assert "one lora_up" in msg and "load the official file instead" in msg
    tiny_dit.load_lora(_write(tmp_path, "official", official), "official", lora_network_dim=6)  # the original loads
    del tiny_dit.lora_dict["official"]


def test_mixed_format_file_is_refused(tiny_dit, tmp_path):
    sd = dict(_fixture_lora("refinement_lora"))
    sd.update({k: v for k, v in to_fastvideo(_fixture_lora("cfg_step_lora")).items() if ".self_attn.to_out." in k})
    msg = _error(tiny_dit, tmp_path, sd, lora_network_dim=4)
    assert "mixes two LoRA formats" in msg and "'blocks.0.self_attn.to_out.lora_A'" in msg
    assert PREFIX + "blocks" + HYPHEN + "0" + HYPHEN + "adaLN_modulation" in msg


def test_pipelines_load_fastvideo_files_by_path(tmp_path):
    """The pipelines' ``lora=``/``lora_path=`` switch (LoRAAndBSAEnabled) loads a FastVideo file."""
    from longcat_native.pipelines.options import LoRAAndBSAEnabled

    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    path = _write(tmp_path, "cfg_step_lora", to_fastvideo(_fixture_lora("cfg_step_lora")))
    inputs, _, expected, _ = load_case("lora_cfg_step")
    with LoRAAndBSAEnabled(dit, "cfg_step", lora_path=path):
        assert dit.active_loras == ["cfg_step"] and dit.lora_dict["cfg_step"].format == "fastvideo"
        assert_close_rel(_run(dit, inputs), expected["output"], MODEL_RTOL, "lora_path= a FastVideo file")
    assert dit.active_loras == []


def test_lora_files_are_found_in_fastvideo_folders(tmp_path):
    """A Diffusers root keeps lora/distilled/ and lora/refinement/ (FastVideo's converter);
    the official lora/<key>.safetensors wins where both exist; two candidate files in a folder
    is no answer (never a guess)."""
    from types import SimpleNamespace

    from longcat_native.pipelines.options import find_lora_file

    (tmp_path / "transformer").mkdir()
    dit = SimpleNamespace(checkpoint_path=str(tmp_path / "transformer"))
    distilled = tmp_path / "lora" / "distilled"
    distilled.mkdir(parents=True)
    (distilled / "cfg_step_lora.safetensors").write_bytes(b"x")
    (distilled / "other.safetensors").write_bytes(b"x")
    refinement = tmp_path / "lora" / "refinement"
    refinement.mkdir()
    (refinement / "adapter.safetensors").write_bytes(b"x")
    assert find_lora_file(dit, "cfg_step_lora") == distilled / "cfg_step_lora.safetensors"
    assert find_lora_file(dit, "refinement_lora") == refinement / "adapter.safetensors"
    (refinement / "second.safetensors").write_bytes(b"x")
    assert find_lora_file(dit, "refinement_lora") is None
    (tmp_path / "lora" / "refinement_lora.safetensors").write_bytes(b"x")
    assert find_lora_file(dit, "refinement_lora") == tmp_path / "lora" / "refinement_lora.safetensors"
