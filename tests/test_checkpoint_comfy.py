"""ComfyUI single-file checkpoints (runtime/comfy_checkpoints.py): a file written here, in the
naming of ComfyUI-WanVideoWrapper's LongCat model and ComfyUI's scaled-fp8 convention, from the
public tiny model (or a random model of other sizes), loaded by ``from_pretrained(file)``.

The writer below is this test's own statement of the layout (docs/design/checkpoints.md, "ComfyUI
fp8 files"): official name -> WanVideoWrapper name, the fused qkv / kv split in row order, per
tensor scale = amax / 448 stored as a 0-d float32 ``scale_weight``, a ``scale_input`` placeholder
1.0 and the ``scaled_fp8`` marker, as ComfyUI's scaled files carry them."""

import json
import re
import warnings

import pytest
import torch
from cases import FIXTURE_ROOT, load_case
from safetensors.torch import load_file, save_file
from test_quantize import TARGETS, assert_same_bits, emu_quantize, rel_l2

import longcat_native as lcn
from longcat_native.runtime import quantize as qz
from longcat_native.runtime.weights import CheckpointError

SRC = FIXTURE_ROOT / "dit" / "diffusion_pytorch_model.safetensors"
FP8 = torch.float8_e4m3fn

# official module -> ComfyUI (WanVideoWrapper is_longcat=True) module(s); rows split in this order
BLOCK_MAP = {"attn.qkv": ["self_attn.q", "self_attn.k", "self_attn.v"], "attn.q_norm": ["self_attn.norm_q"],
             "attn.k_norm": ["self_attn.norm_k"], "attn.proj": ["self_attn.o"], "cross_attn.q_linear": ["cross_attn.q"],
             "cross_attn.kv_linear": ["cross_attn.k", "cross_attn.v"], "cross_attn.q_norm": ["cross_attn.norm_q"],
             "cross_attn.k_norm": ["cross_attn.norm_k"], "cross_attn.proj": ["cross_attn.o"],
             "pre_crs_attn_norm": ["norm3"], "ffn.w1": ["ffn.w1"], "ffn.w2": ["ffn.w2"], "ffn.w3": ["ffn.w3"],
             "adaLN_modulation.1": ["modulation.1"]}
TOP_MAP = {"x_embedder.proj": "patch_embedding", "t_embedder.mlp.0": "time_embedding.mlp.0",
           "t_embedder.mlp.2": "time_embedding.mlp.2", "y_embedder.y_proj.0": "text_embedding.0",
           "y_embedder.y_proj.2": "text_embedding.2", "final_layer.adaLN_modulation.1": "head.modulation.1",
           "final_layer.linear": "head.head"}
# the block Linears the file stores in fp8 (official names), and one embedder Linear: non-target tensors
# may be fp8-scaled too (Comfy-Org's Wan files scale every Linear) and must load into the model dtype
FP8_MODULES = re.compile(r"^blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj)|ffn\.w[123])$"
                         r"|^(y_embedder\.y_proj\.0|t_embedder\.mlp\.2|final_layer\.linear)$")


def to_comfy_names(official):
    """Official state dict -> ComfyUI names (fused tensors split by rows), values unchanged."""
    out = {}
    for k, v in official.items():
        module, leaf = k.rsplit(".", 1)
        m = re.match(r"^blocks\.(\d+)\.(.+)$", module)
        parts = [f"blocks.{m.group(1)}.{p}" for p in BLOCK_MAP[m.group(2)]] if m else [TOP_MAP[module]]
        for part, chunk in zip(parts, v.chunk(len(parts), dim=0)):
            out[f"{part}.{leaf}"] = chunk.contiguous()
    return out


def comfy_fp8_state_dict(official=None, float_dtype=torch.bfloat16, scaled=True):
    """The scaled-fp8 file's tensors: FP8_MODULES' weights as float8_e4m3fn with a 0-d float32
    scale_weight (amax / 448) and a scale_input of 1.0; the rest in ``float_dtype``; the marker."""
    official = load_file(str(SRC)) if official is None else official
    quantized = {m for m in {k.rsplit(".", 1)[0] for k in official} if FP8_MODULES.match(m)}
    names = to_comfy_names(official)
    fp8_keys = {k for k in names if k.endswith(".weight") and any(
        k.startswith(c + ".") for o in quantized for c in _comfy_modules(o))}
    sd = {}
    for k, v in names.items():
        if k in fp8_keys:
            w = v.float()
            s = w.abs().amax().clamp(min=1e-12) / 448.0
            sd[k] = (w / s).clamp(-448, 448).to(FP8)
            if scaled:
                base = k[: -len(".weight")]
                sd[base + ".scale_weight"] = s.reshape(())
                sd[base + ".scale_input"] = torch.ones((), dtype=torch.float32)
        else:
            sd[k] = v.to(float_dtype)
    if scaled:
        sd["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return sd


def _comfy_modules(official_module):
    m = re.match(r"^blocks\.(\d+)\.(.+)$", official_module)
    return [f"blocks.{m.group(1)}.{p}" for p in BLOCK_MAP[m.group(2)]] if m else [TOP_MAP[official_module]]


def write(path, sd, prefix="", metadata=None):
    save_file({prefix + k: v for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def to_comfy_quant(sd):
    """The same file in ComfyUI's newer per-layer format (comfy/quant_ops.py): a uint8 JSON
    ``comfy_quant`` per fp8 layer, ``weight_scale`` for ``scale_weight``, no placeholder input scale."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".scale_weight"):
            layer = k[: -len(".scale_weight")]
            out[layer + ".weight_scale"] = v
            out[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        elif not k.endswith(".scale_input") and k != "scaled_fp8":
            out[k] = v
    return out


def load(path, **kw):
    kw.setdefault("dtype", torch.float32)
    kw.setdefault("kernels", "reference")
    return lcn.LongCatDiT.from_pretrained(path, **kw)


def _dequant(sd, key):
    """What the file means: fp8 * scale_weight, in float32."""
    base = key[: -len(".weight")]
    return sd[key].float() * sd[base + ".scale_weight"]


def _float_twin(dit):
    """A plain float32 model holding ``dit``'s dequantized weights (qz.dequantize is the storage's
    own definition: q * scale, float32)."""
    twin = lcn.LongCatDiT.from_config(dit.config.to_dict(), device="meta", dtype=torch.float32, kernels="reference")
    twin = twin.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in twin.named_parameters():
            layer = dit.get_submodule(name.rsplit(".", 1)[0])
            src = dict(dit.named_parameters())[name]
            p.copy_(qz.dequantize(src, layer.weight_scale) if getattr(layer, "quant", None) and name.endswith("weight")
                    else src)
    return twin.eval()


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_scaled_fp8_file_loads_as_stored(tmp_path, prefix, monkeypatch):
    sd = comfy_fp8_state_dict()
    path = write(tmp_path / "LongCat_TI2V_comfy_fp8_e4m3fn_scaled_KJ.safetensors", sd, prefix)

    def no_requantize(*a, **k):
        raise AssertionError("the fp8 weights were requantized")

    with monkeypatch.context() as m:
        m.setattr(qz, "quantize_weight", no_requantize)
        dit = load(path, quantize="fp8-weight-only")
    assert dit.quantization == "fp8-weight-only" and dit.checkpoint_path == str(path)
    official = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, dtype=torch.float32, kernels="reference")
    for k in ("hidden_size", "depth", "num_heads", "caption_channels", "adaln_tembed_dim", "in_channels",
              "out_channels", "frequency_embedding_size", "patch_size", "ffn_hidden_size", "text_tokens_zero_pad"):
        assert getattr(dit.config, k) == getattr(official.config, k), k
    for i in range(2):
        for t in TARGETS:
            layer = dit.get_submodule(f"blocks.{i}.{t}")
            parts = [f"blocks.{i}.{p}.weight" for p in {"attn.qkv": ["self_attn.q", "self_attn.k", "self_attn.v"],
                     "attn.proj": ["self_attn.o"], "cross_attn.q_linear": ["cross_attn.q"],
                     "cross_attn.kv_linear": ["cross_attn.k", "cross_attn.v"], "cross_attn.proj": ["cross_attn.o"],
                     "ffn.w13": ["ffn.w1", "ffn.w3"], "ffn.w2": ["ffn.w2"]}[t]]
            assert_same_bits(layer.weight, torch.cat([sd[k] for k in parts]), f"{i}.{t} bytes")
            assert_same_bits(layer.weight_scale, torch.cat([sd[k[:-7] + ".scale_weight"].expand(sd[k].shape[0])
                                                            for k in parts]), f"{i}.{t} scales")
            assert_same_bits(qz.dequantize(layer.weight, layer.weight_scale), torch.cat([_dequant(sd, k) for k in parts]),
                             f"{i}.{t} dequantized == fp8 * scale_weight")
    # non-target tensors in the model dtype: the fp8-scaled embedder dequantized, bf16 ones cast
    for ours, theirs in [("y_embedder.y_proj.0", "text_embedding.0"), ("t_embedder.mlp.2", "time_embedding.mlp.2"),
                         ("final_layer.linear", "head.head")]:
        emb = dit.get_submodule(ours)
        assert emb.quant is None and torch.equal(emb.weight, _dequant(sd, theirs + ".weight")), ours
    assert torch.equal(dit.get_submodule("blocks.1.adaLN_modulation").weight, sd["blocks.1.modulation.1.weight"].float())
    assert torch.equal(dit.x_embedder.proj.weight, sd["patch_embedding.weight"].float().reshape(128, -1))
    assert torch.equal(dit.blocks[0].pre_crs_attn_norm.bias, sd["blocks.0.norm3.bias"].float())
    # the model computes its defined math: a plain float model holding those dequantized weights
    inputs, _, expected, meta = load_case("t2v_mask")
    with torch.no_grad():
        out = dit(**inputs, **meta.get("kwargs", {}))
        twin = _float_twin(dit)(**inputs, **meta.get("kwargs", {}))
    err = (out - twin).abs().max() / twin.abs().max()
    assert err < 1e-5, err
    dev = rel_l2(out, expected["output"])
    print(f"\n[comfy] scaled fp8 file (block GEMMs, 3 embedder/final Linears fp8; rest bf16), t2v_mask: max rel err vs float twin {err:.1e}; "
          f"relative L2 vs the official golden output {dev:.3e}")
    assert dev < 0.1


def test_quantize_none_fp8_and_int8_on_an_fp8_file(tmp_path):
    sd = comfy_fp8_state_dict()
    path = write(tmp_path / "f.safetensors", sd)
    with pytest.warns(UserWarning, match="fp8-weight-only"):
        default = load(path)
    assert default.quantization == "fp8-weight-only"
    fp8 = load(path, quantize="fp8")
    assert fp8.quantization == "fp8"
    assert_same_bits(fp8.blocks[1].ffn.w13.weight, default.blocks[1].ffn.w13.weight, "fp8 storage as stored")
    int8 = load(path, quantize="int8-weight-only")  # fp8 * scale in float32, requantized per row
    eq, es = emu_quantize(torch.cat([_dequant(sd, "blocks.0.ffn.w1.weight"), _dequant(sd, "blocks.0.ffn.w3.weight")]),
                          "int8-weight-only")
    assert_same_bits(int8.blocks[0].ffn.w13.weight, eq, "fp8 -> int8 values")
    assert_same_bits(int8.blocks[0].ffn.w13.weight_scale, es, "fp8 -> int8 scales")


def test_float_comfy_file_equals_the_official_checkpoint(tmp_path):
    """A float32 ComfyUI export (no fp8): every parameter equals the official checkpoint's, so the
    name map and the row splits are right, and the output is the golden one."""
    path = write(tmp_path / "LongCat_comfy_fp32.safetensors", to_comfy_names(load_file(str(SRC))), "diffusion_model.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dit = load(path)
    assert dit.quantization is None
    official = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, dtype=torch.float32, kernels="reference")
    theirs = dict(official.named_parameters())
    for name, p in dit.named_parameters():
        assert torch.equal(p, theirs[name]), name
    inputs, _, expected, meta = load_case("t2v_mask")
    with torch.no_grad():
        out = dit(**inputs, **meta.get("kwargs", {}))
    assert (out - expected["output"]).abs().max() / expected["output"].abs().max() < 1e-4


def _official_state_of(dit):
    """A model's state dict in the official layout (x_embedder 5-D, w13 -> w1/w3, adaLN .1)."""
    out = {}
    c = dit.config
    for name, p in dit.named_parameters():
        p = p.detach().clone()
        if name == "x_embedder.proj.weight":
            out[name] = p.reshape(c.hidden_size, c.in_channels, *c.patch_size)
        elif name.endswith("ffn.w13.weight"):
            w1, w3 = p.chunk(2)
            out[name.replace("w13", "w1")], out[name.replace("w13", "w3")] = w1, w3
        else:
            out[re.sub(r"adaLN_modulation\.", "adaLN_modulation.1.", name)] = p
    return out


def test_config_inferred_at_other_sizes_and_overrides(tmp_path):
    cfg = dict(hidden_size=96, num_heads=3, depth=3, caption_channels=40, adaln_tembed_dim=24, mlp_ratio=3,
               in_channels=8, out_channels=12, frequency_embedding_size=64)
    src = lcn.LongCatDiT.from_config("tiny", seed=5, dtype=torch.float32, **cfg)
    sd = comfy_fp8_state_dict(_official_state_of(src), float_dtype=torch.float32)
    path = write(tmp_path / "other.safetensors", sd)
    dit = load(path, quantize="fp8-weight-only", text_tokens_zero_pad=False, enable_bsa=True)
    for k, v in cfg.items():
        if k != "mlp_ratio":
            assert getattr(dit.config, k) == v, k
    assert dit.config.ffn_hidden_size == src.config.ffn_hidden_size  # mlp_ratio 3 and 4 give one width here
    assert dit.config.head_dim == 32 and dit.config.text_tokens_zero_pad is False and dit.config.enable_bsa is True
    assert_same_bits(dit.blocks[2].attn.qkv.weight, torch.cat([sd[f"blocks.2.self_attn.{p}.weight"] for p in "qkv"]), "qkv")
    with pytest.raises(TypeError, match="unknown config override"):
        load(path, quantize="fp8-weight-only", hiden_size=3)


@pytest.mark.parametrize("variant,edit,match", [
    ("e5m2", lambda sd: sd.update({"blocks.0.self_attn.q.weight": sd["blocks.0.self_attn.q.weight"].float().to(
        torch.float8_e5m2)}), "F8_E5M2.*fp8_e5m2"),
    ("per-channel", lambda sd: sd.update({"blocks.0.ffn.w2.scale_weight": torch.full((128,), 0.01)}), "per-channel"),
    ("block", lambda sd: sd.update({"blocks.0.ffn.w2.scale_weight": torch.full((4, 8), 0.01)}), "block scales"),
    ("scale_input", lambda sd: sd.update({"blocks.1.cross_attn.o.scale_input": torch.tensor(0.37)}),
     "calibrated input scales.*blocks.1.cross_attn.o.scale_input = 0.37"),
    ("comfy_quant", lambda sd: sd.update({"blocks.0.ffn.w2.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'),
                                                                                        dtype=torch.uint8)}),
     "mixed-precision format with layers of format nvfp4.*blocks.0.ffn.w2"),
    ("int8", lambda sd: sd.update({"blocks.0.ffn.w2.weight": torch.ones(128, 512, dtype=torch.int8)}),
     "integer-quantized.*I8"),
    ("wan", lambda sd: sd.update({"time_projection.1.weight": torch.ones(768, 128),
                                  "head.modulation": torch.ones(1, 2, 128)}), "Wan 2.x"),
    ("zero scale", lambda sd: sd.update({"blocks.0.self_attn.v.scale_weight": torch.tensor(0.0)}),
     "finite and > 0.*blocks.0.self_attn.v.scale_weight"),
])
def test_unreadable_variants_are_refused_by_name(tmp_path, variant, edit, match):
    sd = comfy_fp8_state_dict()
    edit(sd)
    path = write(tmp_path / f"{variant}.safetensors", sd)
    with pytest.raises(CheckpointError, match=match):
        load(path, quantize="fp8-weight-only")


def test_other_files_are_refused_by_name(tmp_path):
    gguf = tmp_path / "LongCat_TI2V_comfy-Q8_0.gguf"
    gguf.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="GGUF"):
        load(gguf)
    with pytest.raises(CheckpointError, match="official LongCat-Video layout.*dit/ folder"):
        load(SRC)  # the official weights file itself, without its folder's config.json
    meta = write(tmp_path / "meta.safetensors", comfy_fp8_state_dict(), metadata={"_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": {"blocks.0.ffn.w2": {"format": "float8_e4m3fn_blockwise"}}})})
    with pytest.raises(CheckpointError, match="format float8_e4m3fn_blockwise.*blocks.0.ffn.w2"):
        load(meta)
    not_st = tmp_path / "notes.safetensors"
    not_st.write_text("hello, this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load(not_st)


def test_missing_extra_misnamed_misshapen_tensors_are_named(tmp_path):
    sd = comfy_fp8_state_dict()
    del sd["blocks.1.cross_attn.v.weight"]  # missing (its scales stay: unexpected then)
    sd["blocks.0.self_attn.out.weight"] = sd.pop("blocks.0.self_attn.o.weight")  # misnamed
    sd["blocks.0.extra.weight"] = torch.ones(3)  # extra
    sd["blocks.1.ffn.w2.weight"] = sd["blocks.1.ffn.w2.weight"][:, :500].contiguous()  # misshapen
    del sd["blocks.0.cross_attn.q.scale_weight"]  # an fp8 weight of a scaled file without its scale
    path = write(tmp_path / "broken.safetensors", sd)
    with pytest.raises(CheckpointError) as e:
        load(path, quantize="fp8-weight-only")
    msg = str(e.value)
    for needle in ["missing", "blocks.1.cross_attn.v.weight", "blocks.0.self_attn.o.weight",
                   "blocks.0.self_attn.out.weight (misnamed? blocks.0.self_attn.o.weight",
                   "blocks.0.extra.weight", "blocks.1.ffn.w2.weight: file [128, 500], model expects [128, 512]",
                   "blocks.0.cross_attn.q.scale_weight (the scale of the float8 weight blocks.0.cross_attn.q.weight)",
                   "hidden_size=128", "blocks.1.cross_attn.v.scale_weight (a scale of no weight)"]:
        assert needle in msg, (needle, msg)


def test_nan_weights_are_refused_after_the_copy(tmp_path):
    sd = comfy_fp8_state_dict()
    w = sd["blocks.1.self_attn.k.weight"].view(torch.uint8).clone()
    w[3, 5] = 0x7F  # a float8_e4m3fn NaN
    sd["blocks.1.self_attn.k.weight"] = w.view(FP8)
    path = write(tmp_path / "nan.safetensors", sd)
    with pytest.raises(CheckpointError, match="blocks.1.self_attn.k.weight"):
        load(path, quantize="fp8-weight-only")


def test_streamed_load_equals_the_resident_load(tmp_path):
    """offload="blocks": the streamed blocks are filled in host memory by the same copy."""
    path = write(tmp_path / "f.safetensors", comfy_fp8_state_dict())
    resident = load(path, quantize="fp8-weight-only", device="cpu")
    dit = load(path, quantize="fp8-weight-only", device="cpu", offload="blocks", resident_blocks=0)
    assert dit.weight_streamer is not None and dit.weight_streamer.streamed == (0, 1)
    inputs, _, _, meta = load_case("t2v_mask")
    with torch.no_grad():
        assert torch.equal(dit(**inputs, **meta.get("kwargs", {})), resident(**inputs, **meta.get("kwargs", {})))
    dit.disable_weight_streaming()
    ours = dict(resident.state_dict())
    for k, v in dit.state_dict().items():
        assert_same_bits(v, ours[k], k)


def test_the_newer_comfy_quant_format_reads_as_the_scaled_one(tmp_path):
    """ComfyUI's per-layer format with float8_e4m3fn layers (per-tensor ``weight_scale``) is the same
    math: the same model as the scaled-fp8 file, bit for bit (prefixed keys, marker included)."""
    sd = comfy_fp8_state_dict()
    legacy = load(write(tmp_path / "legacy.safetensors", sd, "model.diffusion_model."), quantize="fp8-weight-only")
    new = load(write(tmp_path / "new.safetensors", to_comfy_quant(sd)), quantize="fp8-weight-only")
    ours = dict(legacy.state_dict())
    for k, v in new.state_dict().items():
        assert_same_bits(v, ours[k], k)
