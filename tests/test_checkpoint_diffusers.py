"""FastVideo's Diffusers layout (``model_index.json`` + ``transformer/``) read as stored
(runtime/diffusers_checkpoints.py, runtime/checkpoints.py): a tiny checkpoint written here from the
official tiny fixture in FastVideo's exact naming, as FastVideo's own converter
(scripts/checkpoint_conversion/longcat_to_fastvideo.py) writes it, loads to the official weights
and outputs; the header and config checks name the culprit; the layout is detected and said.

The converter below is this test's own (written from FastVideo's converter, not from
runtime/layouts.py), so a wrong name in layouts.py fails here."""

import json
import logging
import re
import shutil

import pytest
import torch
from cases import FIXTURE_ROOT, load_case
from helpers import MODEL_RTOL, assert_close_rel
from safetensors.torch import load_file, save_file

import longcat_native as lcn
from longcat_native.runtime.layouts import diffusers_to_official, official_to_diffusers
from longcat_native.runtime.weights import CheckpointError

OFFICIAL = FIXTURE_ROOT / "dit"
PIPELINE_ROOT = FIXTURE_ROOT.parent / "longcat_pipeline_tiny" / "root"

# FastVideo's converter, rule by rule: (official regex, FastVideo replacement); qkv / kv_linear split.
RENAMES = [
    (r"^x_embedder\.", "patch_embed."),
    (r"^t_embedder\.mlp\.0\.", "time_embedder.linear_1."),
    (r"^t_embedder\.mlp\.2\.", "time_embedder.linear_2."),
    (r"^y_embedder\.y_proj\.0\.", "caption_embedder.linear_1."),
    (r"^y_embedder\.y_proj\.2\.", "caption_embedder.linear_2."),
    (r"\.attn\.proj\.", ".self_attn.to_out."),
    (r"\.attn\.(q|k)_norm\.", r".self_attn.\1_norm."),
    (r"\.cross_attn\.q_linear\.", ".cross_attn.to_q."),
    (r"\.cross_attn\.proj\.", ".cross_attn.to_out."),
    (r"^final_layer\.adaLN_modulation\.1\.", "final_layer.adaln_linear."),
    (r"\.adaLN_modulation\.1\.", ".adaln_linear_1."),
    (r"\.pre_crs_attn_norm\.", ".norm_cross."),
    (r"^final_layer\.linear\.", "final_layer.proj."),
]


def fastvideo_tensors(sd):
    """The official state dict in FastVideo's names (its converter's output)."""
    out = {}
    for key, value in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(attn\.qkv|cross_attn\.kv_linear)\.(weight|bias)$", key)
        if m:
            block, fused, leaf = m.groups()
            parts = ["self_attn.to_q", "self_attn.to_k", "self_attn.to_v"] if fused == "attn.qkv" else \
                ["cross_attn.to_k", "cross_attn.to_v"]
            for name, chunk in zip(parts, torch.chunk(value, len(parts), dim=0)):
                out[f"blocks.{block}.{name}.{leaf}"] = chunk.clone()
            continue
        new = key
        for pattern, repl in RENAMES:
            if re.search(pattern, new):
                new = re.sub(pattern, repl, new)
                break
        out[new] = value
    return out


def fastvideo_config(**changes):
    """The official config.json as FastVideo's converter rewrites it (class name, num_heads ->
    num_attention_heads), with ``changes`` (a value None removes the key)."""
    cfg = json.loads((OFFICIAL / "config.json").read_text())
    cfg["_class_name"] = "LongCatTransformer3DModel"
    cfg["_diffusers_version"] = "0.32.0"
    cfg["num_attention_heads"] = cfg.pop("num_heads")
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


def write_transformer(folder, tensors=None, config=None, shards=1, index=True, name="model.safetensors"):
    """A FastVideo transformer/ folder: config.json and the tensors in one file or ``shards``
    files (with a diffusers-style index unless ``index=False``)."""
    tensors = fastvideo_tensors(load_file(str(OFFICIAL / "diffusion_pytorch_model.safetensors"))) \
        if tensors is None else tensors
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or fastvideo_config(), indent=2))
    if shards == 1:
        save_file(tensors, str(folder / name))
        return folder
    keys = sorted(tensors)
    files = [f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {k: files[i % shards] for i, k in enumerate(keys)}
    for f in files:
        save_file({k: tensors[k] for k in keys if weight_map[k] == f}, str(folder / f))
    if index:
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


MODEL_INDEX = {"_class_name": "LongCatPipeline", "_diffusers_version": "0.32.0", "workload_type": "video-generation",
               "tokenizer": ["transformers", "AutoTokenizer"], "text_encoder": ["transformers", "UMT5EncoderModel"],
               "vae": ["diffusers", "AutoencoderKLWan"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "transformer": ["diffusers", "LongCatTransformer3DModel"]}


def write_root(root, **kwargs):
    write_transformer(root / "transformer", **kwargs)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return root


def _official(**kw):
    return lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, dtype=torch.float32, device="cpu", kernels="reference", **kw)


def _load(path, **kw):
    return lcn.LongCatDiT.from_pretrained(path, dtype=torch.float32, device="cpu", kernels="reference", **kw)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _run(dit, name):
    inputs, kv, expected, meta = load_case(name)
    kwargs = dict(meta.get("kwargs", {}))
    if kv is not None:
        kwargs["kv_cache_dict"] = kv
    with torch.inference_mode():
        out = dit(**inputs, **kwargs)
    if kwargs.get("return_kv"):
        out, kv_out = out
        for b, (k, v) in kv_out.items():
            assert_close_rel(k, expected["kv"][b][0], MODEL_RTOL, f"{name} block {b} k")
            assert_close_rel(v, expected["kv"][b][1], MODEL_RTOL, f"{name} block {b} v")
    assert_close_rel(out, expected["output"], MODEL_RTOL, name)


# -- the name map ---------------------------------------------------------------------------------

def test_layouts_map_matches_fastvideos_converter():
    """runtime/layouts.py agrees with FastVideo's converter on every tensor of the model, both ways."""
    sd = load_file(str(OFFICIAL / "diffusion_pytorch_model.safetensors"))
    fv = fastvideo_tensors(sd)
    mapped = {}
    for key in sd:
        names = official_to_diffusers(key)
        assert names is not None, key
        for i, n in enumerate(names):
            assert n in fv, (key, n)
            assert diffusers_to_official(n) == (key, i, len(names)), n
            mapped[n] = key
        assert torch.equal(torch.cat([fv[n] for n in names]), sd[key]), key  # the row order too
    assert sorted(mapped) == sorted(fv)  # every FastVideo tensor comes from exactly one official one


# -- the DiT from a Diffusers folder ---------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_root(tmp_path_factory):
    return write_root(tmp_path_factory.mktemp("fv") / "LongCat-Video-T2V-Diffusers")


@pytest.mark.parametrize("name", ["t2v_mask", "per_frame_timestep", "i2v_cond1", "kv_prefill", "kv_continue"])
def test_diffusers_root_gives_the_official_outputs(diffusers_root, name):
    _run(_load(diffusers_root, attention="reference"), name)


def test_diffusers_folder_is_the_official_model(diffusers_root, caplog):
    """Root or transformer/ folder, the weights are the official ones bit for bit (q/k/v, k/v and
    w1/w3 fused back, the Conv3d patch embedding reshaped); the layout is said and kept."""
    official = _official()
    with caplog.at_level(logging.INFO, logger="longcat_native"):
        dit = _load(diffusers_root)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("FastVideo Diffusers" in m and str(diffusers_root / "transformer") in m for m in lines), lines
    assert dit.checkpoint_layout == "diffusers" and official.checkpoint_layout == "official"
    assert dit.checkpoint_path == str(diffusers_root / "transformer")
    assert "checkpoint_layout='diffusers'" in repr(dit)
    _assert_same_weights(dit, official)
    _assert_same_weights(_load(diffusers_root / "transformer"), official)
    _assert_same_weights(_load(diffusers_root, subfolder="transformer"), official)


def test_fastvideo_default_text_padding_and_overrides(tmp_path):
    """A FastVideo config without text_tokens_zero_pad means FastVideo's default, True (the
    official constructor's is False): t2v_mask, not t2v_mask_varlen. Overrides use official keys."""
    folder = write_transformer(tmp_path / "transformer", config=fastvideo_config(text_tokens_zero_pad=None))
    dit = _load(folder)
    assert dit.config.text_tokens_zero_pad is True
    _run(dit, "t2v_mask")
    _run(_load(folder, text_tokens_zero_pad=False), "t2v_mask_varlen")


@pytest.mark.parametrize("shards,index", [(3, True), (2, False)])
def test_sharded_diffusers_folder(tmp_path, shards, index):
    folder = write_transformer(tmp_path / "transformer", shards=shards, index=index)
    dit = _load(folder)
    _assert_same_weights(dit, _official())
    _run(dit, "t2v_nomask")


def test_bf16_diffusers_file_and_diffusers_file_name(tmp_path):
    """FastVideo stores bf16 as diffusion_pytorch_model.safetensors: cast at load, as official."""
    sd = {k: v.to(torch.bfloat16) for k, v in load_file(str(OFFICIAL / "diffusion_pytorch_model.safetensors")).items()}
    folder = write_transformer(tmp_path / "t", tensors=fastvideo_tensors(sd), name="diffusion_pytorch_model.safetensors")
    dit = _load(folder)
    want = _official()
    assert torch.equal(dit.blocks[1].attn.qkv.weight, want.blocks[1].attn.qkv.weight.bfloat16().float())


@pytest.mark.parametrize("quantize", ["int8-weight-only", "fp8-weight-only"])
def test_quantized_and_streamed_loads_equal_the_official_ones(diffusers_root, quantize):
    """quantize= quantizes the fused rows as the official load does (per row, so split or fused
    give the same bits), and offload="blocks" streams them: the same tensors, the same output."""
    dit = _load(diffusers_root, quantize=quantize)
    assert dit.quantization == quantize
    _assert_same_weights(dit, _official(quantize=quantize))
    streamed = _load(diffusers_root, quantize=quantize, offload="blocks", resident_blocks=1)
    inputs, _, _, meta = load_case("t2v_mask")
    with torch.inference_mode():
        assert torch.equal(streamed(**inputs, **meta.get("kwargs", {})), dit(**inputs, **meta.get("kwargs", {})))


# -- a file that does not fit: every culprit named --------------------------------------------------

def _tensors():
    return fastvideo_tensors(load_file(str(OFFICIAL / "diffusion_pytorch_model.safetensors")))


def _error(tmp_path, tensors=None, config=None, **kw):
    folder = write_transformer(tmp_path / "transformer", tensors=tensors, config=config, **kw)
    with pytest.raises(CheckpointError) as e:
        _load(folder)
    return str(e.value)


def test_missing_extra_misnamed_misshapen_tensors_are_named(tmp_path):
    t = _tensors()
    del t["blocks.1.self_attn.to_k.weight"]  # missing
    t["blocks.0.self_attn.to_qq.bias"] = t.pop("blocks.0.self_attn.to_q.bias")  # misnamed
    t["blocks.1.cross_attn.to_v.weight"] = t["blocks.1.cross_attn.to_v.weight"][:-1].clone()  # misshapen
    t["blocks.0.extra.weight"] = torch.ones(3)  # extra
    lines = {line.strip().split(" (")[0]: line for line in _error(tmp_path, t).splitlines()[1:]}
    assert "blocks.1.self_attn.to_k.weight" in lines["missing"] and "blocks.0.self_attn.to_q.bias" in lines["missing"]
    assert "missing (2)" in lines["missing"]
    assert "unexpected (2)" in lines["unexpected"] and "blocks.0.self_attn.to_qq.bias" in lines["unexpected"]
    assert "blocks.0.extra.weight" in lines["unexpected"]
    assert "blocks.1.cross_attn.to_v.weight: checkpoint [127, 128], model expects [128, 128]" in lines["wrong shape"]


def test_duplicated_non_float_and_patch_embed_shape(tmp_path):
    t = _tensors()
    t["patch_embed.proj.weight"] = t["patch_embed.proj.weight"].reshape(128, -1).contiguous()  # flattened: not Conv3d
    t["blocks.0.ffn.w2.weight"] = t["blocks.0.ffn.w2.weight"].to(torch.int32)
    msg = _error(tmp_path, t)
    assert "patch_embed.proj.weight: checkpoint [128, 64], model expects [128, 16, 1, 2, 2]" in msg
    assert "blocks.0.ffn.w2.weight: I32" in msg
    folder = write_transformer(tmp_path / "dup", shards=2, index=False)
    save_file({"blocks.0.ffn.w1.weight": _tensors()["blocks.0.ffn.w1.weight"]}, str(folder / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"duplicated across shards \(1\): blocks\.0\.ffn\.w1\.weight"):
        _load(folder)


def test_names_of_the_other_layout_are_explained(tmp_path):
    sd = load_file(str(OFFICIAL / "diffusion_pytorch_model.safetensors"))
    msg = _error(tmp_path, sd)
    assert "official-layout names" in msg and "blocks.0.attn.qkv.weight" in msg
    official_cfg = json.loads((OFFICIAL / "config.json").read_text())  # FastVideo tensors, official config
    msg = _error(tmp_path / "b", config=official_cfg)
    assert "FastVideo Diffusers names" in msg and "LongCatTransformer3DModel" in msg


@pytest.mark.parametrize("changes,match", [
    ({"some_new_key": 1}, r"unknown keys \['some_new_key'\]"),
    ({"num_heads": 8}, "num_heads 8 contradicts num_attention_heads 4"),
    ({"attention_head_dim": 64}, r"attention_head_dim 64 contradicts hidden_size / num_attention_heads \(32\)"),
    ({"num_channels_latents": 8}, r"num_channels_latents 8 contradicts in_channels \(16\)"),
    ({"hidden_size": None}, "hidden_size not set"),
    ({"num_attention_heads": None}, "num_attention_heads not set"),
    ({"boundary_ratio": 0.5}, "boundary_ratio 0.5"),
    ({"depth": 0}, "depth must be a positive integer"),
])
def test_config_keys_that_cannot_be_read_are_named(tmp_path, changes, match):
    with pytest.raises(CheckpointError, match=match):
        _load(write_transformer(tmp_path / "t", config=fastvideo_config(**changes)))


def test_fastvideo_config_extras_that_agree_are_read(tmp_path):
    cfg = fastvideo_config(attention_head_dim=32, num_channels_latents=16, num_heads=4, exclude_lora_layers=[])
    cfg["boundary_ratio"] = None  # FastVideo's no-op values are read
    _assert_same_weights(_load(write_transformer(tmp_path / "t", config=cfg)), _official())


# -- layout detection --------------------------------------------------------------------------------

def test_detection_errors_list_what_was_looked_for(tmp_path):
    both = tmp_path / "both"
    write_root(both)
    shutil.copytree(OFFICIAL, both / "dit")
    with pytest.raises(CheckpointError, match=r"two DiT folders, dit/ \(official layout\) and transformer/ "
                                              r"\(diffusers layout\)"):
        _load(both)
    _assert_same_weights(_load(both, subfolder="dit"), _official())  # the way out the message names
    wrapper = tmp_path / "phase1"  # FastVideo's wrapper layout: official names and class in transformer/
    shutil.copytree(OFFICIAL, wrapper / "transformer")
    dit = _load(wrapper)
    assert dit.checkpoint_layout == "official" and dit.checkpoint_path == str(wrapper / "transformer")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    with pytest.raises(FileNotFoundError, match=r"no config\.json in it, in its dit/ \(official layout\) or "
                                                r"transformer/ \(FastVideo Diffusers layout\)") as e:
        _load(empty)
    assert "model_index.json" in str(e.value)
    foreign = write_transformer(tmp_path / "wan" / "transformer", config={"_class_name": "WanTransformer3DModel"})
    with pytest.raises(CheckpointError, match="'WanTransformer3DModel' is not a LongCat-Video DiT"):
        _load(foreign.parent)
    single = tmp_path / "LongCat_TI2V_comfy_fp8.safetensors"
    save_file({"x": torch.ones(2)}, str(single))
    with pytest.raises(CheckpointError, match="is not a LongCat-Video ComfyUI checkpoint"):
        _load(single)  # a file is read as ComfyUI's (runtime/comfy_checkpoints.py), which names what it found


# -- the pipeline from a Diffusers root ---------------------------------------------------------------

def _pipeline_root(tmp_path, index=MODEL_INDEX):
    root = tmp_path / "pipe"
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(PIPELINE_ROOT / part, root / part)
    sd = load_file(str(PIPELINE_ROOT / "dit" / "diffusion_pytorch_model.safetensors"))
    cfg = json.loads((PIPELINE_ROOT / "dit" / "config.json").read_text())
    cfg["_class_name"] = "LongCatTransformer3DModel"
    cfg["num_attention_heads"] = cfg.pop("num_heads")
    write_transformer(root / "transformer", tensors=fastvideo_tensors(sd), config=cfg)
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_pipeline_from_a_diffusers_root_gives_the_official_video(tmp_path):
    from test_pipeline_golden import _call, _check_draws, _seeded, load

    from longcat_native import pipelines as P

    pipe = P.LongCatVideoPipeline.from_pretrained(_pipeline_root(tmp_path), kernels="reference", device="cpu",
                                                  dtype=torch.float32)
    assert pipe.dit.checkpoint_layout == "diffusers"
    t, meta = load("t2v_base")
    decoded = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z: decoded.append(z.clone()) or decode(z)
    gen = _seeded(meta=meta, pipe=pipe)
    video = _call(pipe, meta, t, gen)
    _check_draws(meta, t, gen)
    assert_close_rel(decoded[0], t["out.latents"], MODEL_RTOL, "t2v_base latents")
    assert_close_rel(torch.from_numpy(video[0]), t["out.video"], MODEL_RTOL, "t2v_base video")


@pytest.mark.parametrize("change,error,match", [
    ({"vae": ["diffusers", "AutoencoderKLHunyuanVideo"]}, ValueError,
     "component 'vae' is a 'AutoencoderKLHunyuanVideo'; longcat-native reads it as AutoencoderKLWan"),
    ({"_class_name": "WanPipeline"}, ValueError, "_class_name 'WanPipeline' is not a LongCat pipeline"),
    ({"transformer_2": ["diffusers", "LongCatTransformer3DModel"]}, ValueError, "component 'transformer_2'"),
    ({"vae": [None, None]}, ValueError, r"lists no vae \(pass vae=False"),
    ({"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "_drop": "scheduler"}, FileNotFoundError,
     r"lists the component scheduler .* does not exist"),
])
def test_model_index_is_checked_before_loading(tmp_path, change, error, match):
    from longcat_native import pipelines as P

    change = dict(change)
    drop = change.pop("_drop", None)
    root = _pipeline_root(tmp_path, dict(MODEL_INDEX, **change))
    if drop:
        shutil.rmtree(root / drop)
    with pytest.raises(error, match=match):
        P.LongCatVideoPipeline.from_pretrained(root, kernels="reference", device="cpu", dtype=torch.float32)


def test_model_index_needs_only_what_is_loaded(tmp_path):
    """A listed component that this load does not read may be absent (a partial download)."""
    from longcat_native import pipelines as P

    root = _pipeline_root(tmp_path)
    shutil.rmtree(root / "vae")
    with pytest.raises(FileNotFoundError, match=r"lists the component vae \(AutoencoderKLWan\)"):
        P.LongCatVideoPipeline.from_pretrained(root, kernels="reference", device="cpu", dtype=torch.float32)
    pipe = P.LongCatVideoPipeline.from_pretrained(root, kernels="reference", device="cpu", dtype=torch.float32,
                                                  vae=False, text_encoder=False)
    assert pipe.vae is None and pipe.dit.checkpoint_layout == "diffusers"


def test_info_and_generate_plan_read_a_diffusers_root(tmp_path, capsys):
    """``info`` and ``generate``'s plan read the DiT config of any layout (FastVideo's keys here)."""
    from longcat_native.cli import main
    from longcat_native.pipelines.run import GenerateRequest, plan_generate

    root = _pipeline_root(tmp_path)
    assert main(["info", str(root), "--dtype", "float32", "--frames", "5", "--height", "64", "--width", "64",
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["source"] == str(root / "transformer") and info["parameters"] == _official().num_parameters()
    assert info["weight_file_bytes"] == (root / "transformer" / "model.safetensors").stat().st_size
    plan = plan_generate(GenerateRequest(checkpoint=str(root), prompt="a cat", frames=5, resolution=(64, 64),
                                         out=str(tmp_path / "o.safetensors")))
    assert plan.root == root and plan.latent == (2, 8, 8)


def test_pipeline_finds_the_loras_in_fastvideos_folders(tmp_path):
    """A Diffusers root keeps each LoRA in its own folder (lora/distilled/, lora/refinement/)."""
    from types import SimpleNamespace

    from longcat_native.pipelines.options import find_lora_file

    root = write_root(tmp_path / "root")
    (root / "lora" / "distilled").mkdir(parents=True)
    (root / "lora" / "refinement").mkdir()
    shutil.copy(FIXTURE_ROOT / "lora" / "cfg_step_lora.safetensors", root / "lora" / "distilled" / "distilled.safetensors")
    shutil.copy(FIXTURE_ROOT / "lora" / "refinement_lora.safetensors", root / "lora" / "refinement")
    dit = SimpleNamespace(checkpoint_path=str(root / "transformer"))
    assert find_lora_file(dit, "cfg_step_lora") == root / "lora" / "distilled" / "distilled.safetensors"
    assert find_lora_file(dit, "refinement_lora") == root / "lora" / "refinement" / "refinement_lora.safetensors"
    shutil.copy(FIXTURE_ROOT / "lora" / "cfg_step_lora.safetensors", root / "lora" / "distilled" / "other.safetensors")
    assert find_lora_file(dit, "cfg_step_lora") is None  # two files: which one is not guessed
