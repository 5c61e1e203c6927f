"""The checkpoint loader: official layouts (single file, shards + index), path forms, config
handling, and every way a checkpoint can be wrong (one clear error naming every problem)."""

import json
import shutil
import warnings

import pytest
import torch
from cases import FIXTURE_ROOT, load_case
from helpers import MODEL_RTOL, assert_close_rel
from safetensors.torch import load_file, save_file

import longcat_native as lcn
from longcat_native import CheckpointError

FIXTURE_DIT = FIXTURE_ROOT / "dit"


@pytest.fixture
def official_sd():
    return load_file(str(FIXTURE_DIT / "diffusion_pytorch_model.safetensors"))


def _make_dit_dir(tmp_path, sd, shards=1, config=None, with_index=True):
    d = tmp_path / "ckpt" / "dit"
    d.mkdir(parents=True)
    cfg = json.loads((FIXTURE_DIT / "config.json").read_text()) if config is None else config
    (d / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(sd, str(d / "diffusion_pytorch_model.safetensors"))
        return d
    names = sorted(sd)
    weight_map = {}
    for s in range(shards):
        fname = f"diffusion_pytorch_model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[s::shards]}
        save_file(part, str(d / fname))
        weight_map.update({n: fname for n in part})
    if with_index:
        (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def _output(dit, case="t2v_mask"):
    inputs, _, expected, _ = load_case(case)
    return dit(**inputs), expected["output"]


def test_path_forms_root_dit_and_subfolder():
    for kwargs in ({"path": FIXTURE_ROOT}, {"path": FIXTURE_DIT}, {"path": str(FIXTURE_ROOT), "subfolder": "dit"},
                   {"pretrained_model_name_or_path": FIXTURE_ROOT, "subfolder": "dit"}):
        dit = lcn.LongCatDiT.from_pretrained(**kwargs, kernels="reference")
        out, exp = _output(dit)
        assert_close_rel(out, exp, MODEL_RTOL, str(kwargs))
        assert dit.checkpoint_path.endswith("dit")


def test_sharded_with_index_matches_single(tmp_path, official_sd):
    d = _make_dit_dir(tmp_path, official_sd, shards=3)
    dit = lcn.LongCatDiT.from_pretrained(d.parent, kernels="reference")
    out, exp = _output(dit)
    assert_close_rel(out, exp, MODEL_RTOL, "sharded")


def test_shards_without_index_are_all_read(tmp_path, official_sd):
    d = _make_dit_dir(tmp_path, official_sd, shards=2, with_index=False)
    out, exp = _output(lcn.LongCatDiT.from_pretrained(d, kernels="reference"))
    assert_close_rel(out, exp, MODEL_RTOL, "sharded, no index")


def test_loaded_weights_are_the_checkpoint(official_sd):
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    p = dict(dit.named_parameters())
    assert torch.equal(p["blocks.1.ffn.w13.weight"][: dit.config.ffn_hidden_size], official_sd["blocks.1.ffn.w1.weight"])
    assert torch.equal(p["blocks.1.ffn.w13.weight"][dit.config.ffn_hidden_size:], official_sd["blocks.1.ffn.w3.weight"])
    assert torch.equal(p["blocks.0.adaLN_modulation.weight"], official_sd["blocks.0.adaLN_modulation.1.weight"])
    assert torch.equal(p["x_embedder.proj.weight"], official_sd["x_embedder.proj.weight"].flatten(1))
    assert not any(q.requires_grad for q in dit.parameters())


def test_dtype_cast_per_tensor(official_sd):
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, torch_dtype=torch.bfloat16, kernels="reference")
    assert {q.dtype for q in dit.parameters()} == {torch.bfloat16}
    p = dict(dit.named_parameters())
    assert torch.equal(p["blocks.0.attn.qkv.weight"], official_sd["blocks.0.attn.qkv.weight"].to(torch.bfloat16))


def test_mismatch_names_every_missing_unexpected_and_wrong_shape_key(tmp_path, official_sd):
    sd = dict(official_sd)
    del sd["blocks.0.attn.proj.weight"]
    del sd["blocks.1.ffn.w3.weight"]
    del sd["final_layer.adaLN_modulation.1.bias"]
    sd["blocks.0.attn.extra.weight"] = torch.randn(3)
    sd["blocks.1.attn.qkv.weight"] = torch.randn(10, 128)
    d = _make_dit_dir(tmp_path, sd, shards=2)
    with pytest.raises(CheckpointError) as e:
        lcn.LongCatDiT.from_pretrained(d)
    msg = str(e.value)
    for needle in ("missing (3)", "blocks.0.attn.proj.weight", "blocks.1.ffn.w3.weight",
                   "final_layer.adaLN_modulation.1.bias", "unexpected (1)", "blocks.0.attn.extra.weight",
                   "wrong shape (1)", "blocks.1.attn.qkv.weight: checkpoint [10, 128], model expects [384, 128]"):
        assert needle in msg, (needle, msg)


def test_config_from_other_model_size_is_a_shape_error(tmp_path, official_sd):
    cfg = json.loads((FIXTURE_DIT / "config.json").read_text())
    cfg["depth"] = 3
    d = _make_dit_dir(tmp_path, official_sd, config=cfg)
    with pytest.raises(CheckpointError, match=r"missing \(\d+\): blocks\.2\."):
        lcn.LongCatDiT.from_pretrained(d)


def test_duplicate_key_across_shards(tmp_path, official_sd):
    d = _make_dit_dir(tmp_path, official_sd, shards=1)
    save_file({"blocks.0.attn.proj.bias": official_sd["blocks.0.attn.proj.bias"]}, str(d / "extra.safetensors"))
    (d / "diffusion_pytorch_model.safetensors").rename(d / "part1.safetensors")
    with pytest.raises(CheckpointError, match="duplicated"):
        lcn.LongCatDiT.from_pretrained(d)


def test_pickle_checkpoints_are_refused(tmp_path):
    d = tmp_path / "dit"
    d.mkdir()
    shutil.copy(FIXTURE_DIT / "config.json", d / "config.json")
    torch.save({"x": torch.zeros(1)}, d / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        lcn.LongCatDiT.from_pretrained(d)


def test_corrupt_safetensors_file(tmp_path):
    d = tmp_path / "dit"
    d.mkdir()
    shutil.copy(FIXTURE_DIT / "config.json", d / "config.json")
    (d / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        lcn.LongCatDiT.from_pretrained(d)


def test_truncated_safetensors_file(tmp_path):
    d = tmp_path / "dit"
    d.mkdir()
    shutil.copy(FIXTURE_DIT / "config.json", d / "config.json")
    data = (FIXTURE_DIT / "diffusion_pytorch_model.safetensors").read_bytes()
    (d / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        lcn.LongCatDiT.from_pretrained(d)


def test_index_naming_missing_shard(tmp_path, official_sd):
    d = _make_dit_dir(tmp_path, official_sd, shards=2)
    next(d.glob("*-00002-of-00002.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="do not exist"):
        lcn.LongCatDiT.from_pretrained(d)


def test_bad_index_json(tmp_path, official_sd):
    d = _make_dit_dir(tmp_path, official_sd, shards=2)
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        lcn.LongCatDiT.from_pretrained(d)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lcn.LongCatDiT.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        lcn.LongCatDiT.from_pretrained(tmp_path)
    d = tmp_path / "dit"
    d.mkdir()
    shutil.copy(FIXTURE_DIT / "config.json", d / "config.json")
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model"):
        lcn.LongCatDiT.from_pretrained(tmp_path)


def test_invalid_config_json(tmp_path, official_sd):
    d = _make_dit_dir(tmp_path, official_sd)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        lcn.LongCatDiT.from_pretrained(d)
    (d / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        lcn.LongCatDiT.from_pretrained(d)
    cfg = json.loads((FIXTURE_DIT / "config.json").read_text())
    cfg["num_heads"] = 5
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        lcn.LongCatDiT.from_pretrained(d)


def test_unknown_config_keys_are_reported_and_defaults_fill_missing(tmp_path, official_sd):
    cfg = json.loads((FIXTURE_DIT / "config.json").read_text())
    cfg["some_future_key"] = 1
    del cfg["mlp_ratio"]  # official default 4, the fixture's value
    d = _make_dit_dir(tmp_path, official_sd, config=cfg)
    with pytest.warns(UserWarning, match="some_future_key"):
        dit = lcn.LongCatDiT.from_pretrained(d, kernels="reference")
    assert dit.config.mlp_ratio == 4 and dit.config.unknown_keys == {"some_future_key": 1}


def test_config_overrides_as_keywords():
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, text_tokens_zero_pad=False, cp_split_hw=[1, 1])
    assert dit.config.text_tokens_zero_pad is False and dit.cp_split_hw == [1, 1]
    out, exp = _output(dit, "t2v_mask_varlen")
    assert_close_rel(out, exp, MODEL_RTOL, "override")
    with pytest.raises(TypeError, match="unknown config override 'not_a_key'"):
        lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, not_a_key=1)
    with pytest.raises(ValueError, match="disagree"):
        lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, dtype=torch.float32, torch_dtype=torch.bfloat16)


def test_official_backend_switches_are_accepted_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT)  # its config has enable_flashattn3 etc.
    assert dit.config.enable_flashattn3 in (True, False)
