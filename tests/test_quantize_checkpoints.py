"""Quantized checkpoints and LoRA on quantized models (runtime/quantize.py, runtime/lora.py):
the official INT8 folder read as stored, our own save format round-tripped bit-exactly, merged and
unmerged LoRA against the float64 emulation, exact restore. The emulation is test_quantize.py's."""

import json
import shutil

import pytest
import torch
from cases import FIXTURE_ROOT, load_case
from safetensors.torch import load_file, save_file
from test_quantize import (MODES, TARGETS, _assert_forward_matches_twin, _bits, _forward, _inputs, _tiny, _twin,
                           assert_same_bits, emu_dequantize, emu_quantize)

import longcat_native as lcn
from longcat_native.runtime import quantize as qz
from longcat_native.runtime import quantized_checkpoints as qc
from longcat_native.runtime.weights import CheckpointError

SRC = FIXTURE_ROOT / "dit" / "diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------------------------------------
# The official INT8 format, written by a plain re-implementation of the official quantizer
# ---------------------------------------------------------------------------------------------


def official_int8_state_dict(skip_patterns=("final_layer.linear",)):
    """As ``longcat_video/modules/quantization.py``: every nn.Linear (2-D ``.weight``; the Conv3d
    x_embedder.proj stays a plain weight) not matching a skip pattern becomes ``weight_int8`` (round
    and clamp to [-128, 127]) + ``weight_scale`` (float32, amax(|w|, dim=1).clamp(1e-8) / 127) with
    its bias in bfloat16; everything else is kept as it is."""
    sd = load_file(str(SRC))
    out = {}
    for k, v in sd.items():
        base = k[: -len(".weight")] if k.endswith(".weight") else k[: -len(".bias")] if k.endswith(".bias") else None
        linear = base is not None and sd.get(base + ".weight", torch.empty(0)).dim() == 2
        if not linear or any(p in base for p in skip_patterns):
            out[k] = v
        elif k.endswith(".weight"):
            w = v.float()
            scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
            out[base + ".weight_int8"] = (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
            out[base + ".weight_scale"] = scale
        else:
            out[k] = v.to(torch.bfloat16)
    return out


def write_int8_folder(folder, sd=None, shards=2, method="int8_per_channel_symmetric", qconfig=True):
    sd = official_int8_state_dict() if sd is None else sd
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURE_ROOT / "dit" / "config.json", folder / "config.json")
    keys = sorted(sd)
    names = [f"quantized_model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {k: names[i % shards] for i, k in enumerate(keys)}
    for n in names:
        save_file({k: sd[k].contiguous() for k in keys if weight_map[k] == n}, str(folder / n))
    (folder / "quantized_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if qconfig:
        (folder / "quantization_config.json").write_text(json.dumps(
            {"quantization_method": method, "skip_patterns": ["final_layer.linear"]}))
    return folder


def test_official_int8_folder_loads_as_stored(tmp_path, monkeypatch):
    sd = official_int8_state_dict()
    root = tmp_path / "avatar"
    write_int8_folder(root / "base_model_int8", sd)
    dit = lcn.LongCatDiT.from_pretrained(root, dtype=torch.float32, kernels="reference")  # found under the root
    assert dit.quantization == "int8-weight-only"
    assert dit.checkpoint_path.endswith("base_model_int8")
    for i in range(2):
        for t in TARGETS:
            layer = dit.get_submodule(f"blocks.{i}.{t}")
            parts = ["ffn.w1", "ffn.w3"] if t == "ffn.w13" else [t]
            assert_same_bits(layer.weight, torch.cat([sd[f"blocks.{i}.{p}.weight_int8"] for p in parts]), f"{i}.{t}")
            assert_same_bits(layer.weight_scale, torch.cat([sd[f"blocks.{i}.{p}.weight_scale"] for p in parts]), t)
            if layer.bias is not None:
                assert torch.equal(layer.bias, sd[f"blocks.{i}.{t}.bias"].float())
    # the non-block linears the official format also quantized: dequantized to the model dtype
    for ours, off in [("blocks.0.adaLN_modulation", "blocks.0.adaLN_modulation.1"), ("t_embedder.mlp.0", None),
                      ("y_embedder.y_proj.2", None), ("final_layer.adaLN_modulation", "final_layer.adaLN_modulation.1")]:
        off = off or ours
        layer = dit.get_submodule(ours)
        assert layer.quant is None and layer.weight.dtype == torch.float32
        assert torch.equal(layer.weight, sd[off + ".weight_int8"].float() * sd[off + ".weight_scale"][:, None])
    plain = load_file(str(SRC))
    assert torch.equal(dit.final_layer.linear.weight, plain["final_layer.linear.weight"])  # skipped: as stored
    assert torch.equal(dit.x_embedder.proj.weight, plain["x_embedder.proj.weight"].reshape(128, -1))  # Conv3d
    args = _inputs(dit.config)
    _assert_forward_matches_twin(_forward(dit, args), _forward(_twin(dit, "int8-weight-only"), args),
                                 "int8-weight-only", "official INT8 folder vs emulation")
    # the folder itself, quantize="int8-weight-only", and a requantization to fp8 of its values
    same = lcn.LongCatDiT.from_pretrained(root / "base_model_int8", dtype=torch.float32,
                                          quantize="int8-weight-only")
    assert torch.equal(same.blocks[1].ffn.w13.weight, dit.blocks[1].ffn.w13.weight)
    fp8 = lcn.LongCatDiT.from_pretrained(root, dtype=torch.float32, quantize="fp8-weight-only")
    w = emu_dequantize(dit.blocks[0].attn.qkv.weight, dit.blocks[0].attn.qkv.weight_scale)
    eq, es = emu_quantize(w.float(), "fp8-weight-only")
    assert_same_bits(fp8.blocks[0].attn.qkv.weight, eq, "int8 -> fp8 requantized")
    assert_same_bits(fp8.blocks[0].attn.qkv.weight_scale, es, "int8 -> fp8 scales")


def test_root_with_dit_and_int8_folders_prefers_float_unless_int8_asked(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(FIXTURE_ROOT / "dit", root / "dit")
    write_int8_folder(root / "base_model_int8", shards=1)
    assert lcn.LongCatDiT.from_pretrained(root, dtype=torch.float32).quantization is None
    dit = lcn.LongCatDiT.from_pretrained(root, dtype=torch.float32, quantize="int8-weight-only")
    assert dit.checkpoint_path.endswith("base_model_int8") and dit.quantization == "int8-weight-only"


def test_official_int8_hostile_folders(tmp_path):
    with pytest.raises(CheckpointError, match="quantization_method 'int4_awq' is not supported"):
        lcn.LongCatDiT.from_pretrained(write_int8_folder(tmp_path / "a", method="int4_awq"))
    with pytest.raises(CheckpointError, match="no quantization_config.json"):
        lcn.LongCatDiT.from_pretrained(write_int8_folder(tmp_path / "b", qconfig=False))
    sd = official_int8_state_dict()
    del sd["blocks.0.attn.qkv.weight_scale"]
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.weight_scale \(the scales of blocks\.0\.attn\.qkv"):
        lcn.LongCatDiT.from_pretrained(write_int8_folder(tmp_path / "c", sd))
    sd = official_int8_state_dict()
    sd["blocks.1.ffn.w3.weight_scale"] = sd["blocks.1.ffn.w3.weight_scale"][:-1].clone()
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.w3\.weight_scale: shape \[511\], expected \[512\]"):
        lcn.LongCatDiT.from_pretrained(write_int8_folder(tmp_path / "d", sd))
    sd = official_int8_state_dict()
    sd["blocks.0.ffn.w2.weight_int8"] = sd["blocks.0.ffn.w2.weight_int8"].to(torch.int16)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.w2\.weight_int8: dtype I16"):
        lcn.LongCatDiT.from_pretrained(write_int8_folder(tmp_path / "e", sd))
    sd = official_int8_state_dict()
    sd["blocks.0.attn.proj.weight_scale"][3] = -1.0
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.proj\.weight_scale \(scales must be finite and > 0\)"):
        lcn.LongCatDiT.from_pretrained(write_int8_folder(tmp_path / "f", sd))
    sd = official_int8_state_dict()
    sd["blocks.0.attn.extra.weight_scale"] = torch.ones(4)
    del sd["blocks.1.ffn.w1.weight_int8"]
    with pytest.raises(CheckpointError, match=r"(?s)missing \(1\): blocks\.1\.ffn\.w1\.weight.*unexpected \(2\): blocks\.0\.attn\.extra"):
        lcn.LongCatDiT.from_pretrained(write_int8_folder(tmp_path / "g", sd))


# ---------------------------------------------------------------------------------------------
# Our own save format
# ---------------------------------------------------------------------------------------------


def _state(dit):
    out = {n: p.detach().clone() for n, p in dit.named_parameters()}
    out.update({n: b.clone() for n, b in dit.named_buffers()})
    return out


def _assert_state_equal(dit, state, what):
    now = _state(dit)
    assert sorted(now) == sorted(state), what
    for n, t in state.items():
        assert_same_bits(now[n], t, f"{what}: {n}")


@pytest.mark.parametrize("mode", MODES + [None])
def test_save_and_load_round_trip_bit_exact_without_requantizing(tmp_path, mode, monkeypatch):
    dit = _tiny(mode, dtype=torch.float16)
    folder = tmp_path / "saved"
    assert dit.save_quantized(folder) == str(folder)
    meta = json.loads((folder / "longcat_quantized.json").read_text())
    assert meta["format"] == "longcat-native-quantized" and meta["quantization"] == mode and meta["dtype"] == "float16"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "longcat_quantized.json", "model.safetensors"]

    def no_requantize(*a, **k):
        raise AssertionError("loading a saved quantized model must not re-quantize")

    monkeypatch.setattr(qz, "quantize_weight", no_requantize)
    back = lcn.LongCatDiT.from_pretrained(folder)  # dtype None: the saved one
    monkeypatch.undo()
    assert back.dtype == torch.float16 and back.quantization == mode
    _assert_state_equal(back, _state(dit), "round trip")
    args = _inputs(dit.config)
    assert torch.equal(_forward(back, args), _forward(dit, args))
    if mode == "fp8":  # a mode of the same storage: no requantization either
        monkeypatch.setattr(qz, "quantize_weight", no_requantize)
        other = lcn.LongCatDiT.from_pretrained(folder, quantize="fp8-weight-only")
        assert other.quantization == "fp8-weight-only"
        assert_same_bits(other.blocks[0].ffn.w2.weight, dit.blocks[0].ffn.w2.weight, "mode switch")


def test_saved_folder_hostile(tmp_path):
    dit = _tiny("int8-weight-only")
    dit.save_quantized(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "longcat_quantized.json").read_text())
    (tmp_path / "s" / "longcat_quantized.json").write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(CheckpointError, match="version 99"):
        lcn.LongCatDiT.from_pretrained(tmp_path / "s")
    dit.save_quantized(tmp_path / "t")
    sd = load_file(str(tmp_path / "t" / "model.safetensors"))
    del sd["blocks.1.attn.proj.weight_scale"]
    save_file(sd, str(tmp_path / "t" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.proj\.weight_scale \(the scales of"):
        lcn.LongCatDiT.from_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="meta device"):
        lcn.LongCatDiT.from_config("tiny", device="meta", quantize="fp8").save_quantized(tmp_path / "u")


@pytest.mark.parametrize("mode", [None, "int8-weight-only"])
def test_save_of_a_streaming_model_saves_its_weights(tmp_path, mode):
    """A model with offload="blocks" saves its real weights (the host copies), not the staging
    buffers: depth 4 with one resident block, so three streamed blocks share two staging sets."""
    cfg = dict(depth=4)
    ref = _tiny(mode, dtype=torch.float16, cfg=cfg)
    dit = _tiny(mode, dtype=torch.float16, cfg=cfg, offload="blocks", resident_blocks=1)
    assert dit.weight_streamer is not None and len(dit.weight_streamer.streamed) == 3
    args = _inputs(dit.config)
    _forward(dit, args)  # the staging sets hold the last blocks copied
    dit.save_quantized(tmp_path / "s")
    back = lcn.LongCatDiT.from_pretrained(tmp_path / "s")
    _assert_state_equal(back, _state(ref), "saved from a streaming model")
    streamed_back = lcn.LongCatDiT.from_pretrained(tmp_path / "s", offload="blocks", resident_blocks=0)
    assert torch.equal(_forward(streamed_back, args), _forward(ref, args))


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_an_interrupted_save_leaves_the_previous_save_whole(tmp_path, monkeypatch, failure):
    """Interrupted after the weights file and before the config and description, a save over an
    earlier one leaves the earlier one, loading as it was (not its description over the new
    weights), and no temporary folder behind."""
    first, second = _tiny("int8-weight-only", seed=1), _tiny("int8-weight-only", seed=2)
    folder = tmp_path / "saved"
    first.save_quantized(folder)
    real = qc.write_safetensors

    def write_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise failure("interrupted between the files of a save")

    monkeypatch.setattr(qc, "write_safetensors", write_then_fail)
    with pytest.raises(failure, match="interrupted between"):
        second.save_quantized(folder)
    monkeypatch.undo()
    assert _listing(tmp_path) == ["saved"]
    _assert_state_equal(lcn.LongCatDiT.from_pretrained(folder), _state(first), "after the interrupted save")
    second.save_quantized(folder)  # a previous save is replaced as a whole
    _assert_state_equal(lcn.LongCatDiT.from_pretrained(folder), _state(second), "after the second save")
    assert _listing(tmp_path) == ["saved"] and _listing(folder) == sorted(qc.NATIVE_FILES)


def test_a_save_that_fails_while_swapping_folders_puts_the_previous_back(tmp_path, monkeypatch):
    """The replacement is two renames (the previous save aside, the new one in): when the second
    fails the previous save goes back to its place, and the new folder is removed."""
    import os

    first = _tiny("int8-weight-only", seed=1)
    folder = tmp_path / "saved"
    first.save_quantized(folder)
    real, calls = os.rename, []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="disk gone"):
        _tiny("int8-weight-only", seed=2).save_quantized(folder)
    monkeypatch.undo()
    assert len(calls) == 3 and _listing(tmp_path) == ["saved"]  # aside, in (failed), back
    _assert_state_equal(lcn.LongCatDiT.from_pretrained(folder), _state(first), "after the failed swap")


def test_save_refuses_a_folder_it_did_not_write(tmp_path):
    """Saving into a copy of the official dit/ folder is refused before anything is written (its
    config.json and weights untouched); so is a previous save holding other files. A new or
    empty folder is written."""
    official = tmp_path / "dit"
    shutil.copytree(FIXTURE_ROOT / "dit", official)
    before = {p.name: p.read_bytes() for p in official.iterdir()}
    dit = _tiny("int8-weight-only")
    with pytest.raises(ValueError, match=r"is not empty \(config\.json, diffusion_pytorch_model\.safetensors\) and is "
                                         r"not a folder written by save_quantized"):
        dit.save_quantized(official)
    assert {p.name: p.read_bytes() for p in official.iterdir()} == before
    assert _listing(tmp_path) == ["dit"]
    saved = tmp_path / "saved"
    dit.save_quantized(saved)
    (saved / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"also holds files save_quantized did not write \(notes\.txt\)"):
        dit.save_quantized(saved)
    assert (saved / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    dit.save_quantized(tmp_path / "empty")
    _assert_state_equal(lcn.LongCatDiT.from_pretrained(tmp_path / "empty"), _state(dit), "saved into an empty folder")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        dit.save_quantized(tmp_path / "file")


# ---------------------------------------------------------------------------------------------
# Files that lie: stored dtypes checked against the description, dequantized range against the dtype
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("saved,lie,quantize,match", [
    ("int8-weight-only", dict(quantization="fp8"), None,
     r'disagree with longcat_quantized\.json, which says quantization "fp8", dtype float16 \(14\): '
     r"blocks\.0\.attn\.proj\.weight: stored I8, expected F8_E4M3"),
    ("int8-weight-only", dict(quantization=None), None,
     r"says quantization null, dtype float16 \(14\): blocks\.0\.attn\.proj\.weight: stored quantized \(I8\), "
     r"expected F16"),
    ("int8-weight-only", dict(quantization=None), "int8-weight-only", r"stored quantized \(I8\)"),
    ("fp8", dict(quantization="int8-weight-only"), None, r"blocks\.0\.ffn\.w2\.weight: stored F8_E4M3, expected I8"),
    (None, dict(quantization="int8-weight-only"), None, r"blocks\.0\.ffn\.w13\.weight: stored F16, expected I8"),
    ("int8-weight-only", dict(dtype="float32"), None,
     r'says quantization "int8-weight-only", dtype float32 \(40\): blocks\.0\.adaLN_modulation\.bias: stored F16, '
     r"expected F32"),
    ("int8-weight-only", dict(dtype="float64"), None, r"unknown dtype 'float64'"),
])
def test_a_description_that_disagrees_with_its_tensors_is_refused(tmp_path, saved, lie, quantize, match):
    dit = _tiny(saved, dtype=torch.float16)
    folder = tmp_path / "s"
    dit.save_quantized(folder)
    meta = json.loads((folder / "longcat_quantized.json").read_text())
    (folder / "longcat_quantized.json").write_text(json.dumps(dict(meta, **lie)))
    with pytest.raises(CheckpointError, match=match):
        lcn.LongCatDiT.from_pretrained(folder, quantize=quantize)


def test_saved_scales_that_overflow_the_load_dtype_are_refused(tmp_path):
    """Scales whose dequantized weights overflow float16 (127 x 1e4 > 65504): refused at load in
    float16, naming the tensor; the same folder loads in float32, where the values fit."""
    dit = _tiny("int8-weight-only", dtype=torch.float16)
    folder = tmp_path / "s"
    dit.save_quantized(folder)
    sd = load_file(str(folder / "model.safetensors"))
    sd["blocks.1.ffn.w2.weight_scale"][5] = 1e4
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"\(1\): blocks\.1\.ffn\.w2\.weight \(dequantized with its scales it "
                                              r"overflows float16\)"):
        lcn.LongCatDiT.from_pretrained(folder)
    back = lcn.LongCatDiT.from_pretrained(folder, dtype=torch.float32)
    w = back.blocks[1].ffn.w2
    assert torch.isfinite(qz.dequantize(w.weight, w.weight_scale, torch.float32)).all()


def test_official_int8_scales_that_overflow_the_load_dtype_are_refused(tmp_path):
    sd = official_int8_state_dict()
    sd["blocks.0.attn.proj.weight_scale"][0] = 1e4
    folder = write_int8_folder(tmp_path / "int8", sd)
    with pytest.raises(CheckpointError, match=r"\(1\): blocks\.0\.attn\.proj\.weight_int8 \(dequantized with its "
                                              r"scales it overflows float16\)"):
        lcn.LongCatDiT.from_pretrained(folder, dtype=torch.float16)
    assert lcn.LongCatDiT.from_pretrained(folder, dtype=torch.float32).quantization == "int8-weight-only"


@pytest.mark.parametrize("mode", MODES)
def test_float_checkpoint_beyond_float16_quantized_is_refused(tmp_path, mode):
    """A float32 checkpoint with a weight beyond the float16 range, loaded in float16 with
    quantize=: the quantized values are fine but dequantized in float16 they are Inf; refused,
    naming the official tensor. In float32 it loads."""
    folder = tmp_path / "dit"
    shutil.copytree(FIXTURE_ROOT / "dit", folder)
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    sd["blocks.1.ffn.w3.weight"][7, 3] = 1e5
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"\(1\): blocks\.1\.ffn\.w3\.weight \(dequantized with its scales it "
                                              r"overflows float16\)"):
        lcn.LongCatDiT.from_pretrained(folder, dtype=torch.float16, quantize=mode)
    assert lcn.LongCatDiT.from_pretrained(folder, dtype=torch.float32, quantize=mode).quantization == mode


# ---------------------------------------------------------------------------------------------
# LoRA on a quantized model
# ---------------------------------------------------------------------------------------------


def _load_fixture_lora(dit):
    _, _, _, meta = load_case("lora_cfg_step")
    for e in meta["lora"]:
        dit.load_lora(str(FIXTURE_ROOT / e["file"]), e["key"], multiplier=e.get("multiplier", 1.0),
                      lora_network_dim=e["lora_network_dim"], lora_network_alpha=e["lora_network_alpha"])
    return meta["enable"]


def _deltas64(dit, keys):
    deltas = {}
    for k in keys:
        lora = dit.lora_dict[k]
        for m in lora.loras:
            for row0, down, up in m.targets():
                w = dit.get_parameter(m.internal_name + ".weight")
                d = deltas.setdefault(m.internal_name + ".weight", torch.zeros(w.shape, dtype=torch.float64))
                d[row0: row0 + up.shape[0]] += lora.multiplier * m.alpha_scale * (up.double() @ down.double())
    return deltas


@pytest.mark.parametrize("mode", MODES)
def test_lora_merged_and_unmerged_on_quantized_model(mode, monkeypatch):
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, dtype=torch.float32, kernels="reference", quantize=mode)
    before = _state(dit)
    keys = _load_fixture_lora(dit)
    deltas = _deltas64(dit, keys)
    assert any(n.endswith("ffn.w13.weight") for n in deltas)
    args = _inputs(dit.config)

    # merged: dequantize, add the delta in float32, requantize per row (new scales)
    dit.enable_loras(keys)
    merged = {}
    for name, d in deltas.items():
        layer = dit.get_submodule(name.rsplit(".", 1)[0])
        if layer.quant is None:  # adaLN etc. (not in this LoRA's target set, but allowed)
            continue
        b = name.rsplit(".", 1)[0]
        w = emu_dequantize(before[name], before[b + ".weight_scale"]) + d
        eq, es = emu_quantize(w.float(), mode)
        # the code sums the delta in float32: the odd value sits on the other side of a rounding
        same = (_bits(layer.weight) == _bits(eq)).float().mean()
        assert same > 0.999, f"{name}: {same}"
        assert torch.allclose(layer.weight_scale, es, rtol=1e-6, atol=0)
        merged[name] = emu_dequantize(layer.weight, layer.weight_scale)
    out_merged = _forward(dit, args)
    _assert_forward_matches_twin(out_merged, _forward(_twin(dit, mode, monkeypatch=monkeypatch), args), mode,
                                 f"{mode} merged LoRA vs emulation")
    monkeypatch.undo()

    # disable: the quantized weights and scales back bit-exactly
    dit.disable_all_loras()
    _assert_state_equal(dit, before, f"{mode} after disable (merged)")

    # unmerged: model-dtype branches on top of the quantized GEMM
    dit.lora_mode = "unmerged"
    dit.enable_loras(keys)
    _assert_state_equal(dit, before, f"{mode} unmerged leaves the weights")
    out = _forward(dit, args)
    twin = _twin(dit, mode, monkeypatch=monkeypatch)
    for name, mod in dit.named_modules():
        if getattr(mod, "lora_branches", None):
            twin.get_submodule(name).lora_branches = [(d.double(), u.double(), s, r) for d, u, s, r in mod.lora_branches]
    _assert_forward_matches_twin(out, _forward(twin, args), mode, f"{mode} unmerged LoRA vs emulation")
    monkeypatch.undo()
    dit.disable_all_loras()
    _assert_state_equal(dit, before, f"{mode} after disable (unmerged)")
    # switching merged -> merged again restores from the exact copies
    dit.lora_mode = "merged"
    dit.enable_loras(keys)
    dit.enable_loras(keys)
    dit.disable_all_loras()
    _assert_state_equal(dit, before, f"{mode} after a re-merge")


def test_save_refuses_active_loras(tmp_path):
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, dtype=torch.float32, quantize="int8-weight-only")
    dit.enable_loras(_load_fixture_lora(dit))
    with pytest.raises(ValueError, match="disable_all_loras"):
        dit.save_quantized(tmp_path / "x")
