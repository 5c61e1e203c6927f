"""``longcat-native convert`` (runtime/convert.py, runtime/convert_sources.py): official <-> Diffusers
bit-exact, fp8/int8 equal to quantizing at load, shards + index, errors naming the culprit before
anything is written, DST untouched by a failure mid-write, peak host memory well under the model."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from cases import FIXTURE_ROOT
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import longcat_native as lcn
from longcat_native.cli import main
from longcat_native.runtime import convert as cv
from longcat_native.runtime import quantized_checkpoints as qc
from longcat_native.runtime.convert_sources import DIFFUSERS_CLASS, official_shapes
from longcat_native.runtime.config import LongCatConfig
from longcat_native.runtime.layouts import diffusers_to_official, official_to_diffusers
from longcat_native.runtime.weights import CheckpointError

DIT = FIXTURE_ROOT / "dit"
CONFIG = json.loads((DIT / "config.json").read_text())
MODE = {"fp8": "fp8-weight-only", "int8": "int8-weight-only"}


def read_folder(folder):
    """Every tensor of a folder's safetensors files (each name once)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            assert k not in out, f"{k} in two files of {folder}"
            out[k] = v
    return out


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def assert_same_tensors(a, b):
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    bad = [k for k in a if not same_bits(a[k], b[k])]
    assert not bad, f"differ: {bad[:5]}"


def assert_same_models(a, b):
    assert a.quantization == b.quantization and a.dtype == b.dtype
    assert_same_tensors(a.state_dict(), b.state_dict())


def mixed_dtype_official(tmp_path):
    """The fixture with its tensors stored in three dtypes (the round trip keeps each as stored)."""
    sd = load_file(str(DIT / "diffusion_pytorch_model.safetensors"))
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    sd = {k: sd[k].to(dtypes[i % 3]) for i, k in enumerate(sorted(sd))}
    d = tmp_path / "mixed" / "dit"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(CONFIG))
    save_file(sd, str(d / "diffusion_pytorch_model.safetensors"))
    return d.parent, sd


def write_diffusers(folder, sd, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or dict(CONFIG, _class_name=DIFFUSERS_CLASS)))
    save_file(sd, str(folder / "model.safetensors"))
    return folder


def test_official_diffusers_official_is_bit_exact(tmp_path):
    root, sd = mixed_dtype_official(tmp_path)
    r1 = cv.convert_checkpoint(root, tmp_path / "diff", "diffusers", max_shard_size="200KB", quiet=True)
    assert r1.source_layout == "official" and r1.shards > 1
    r2 = cv.convert_checkpoint(tmp_path / "diff", tmp_path / "back", "official", quiet=True)
    assert r2.source_layout == "diffusers" and r2.shards == 1
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert_same_tensors(read_folder(tmp_path / "back"), sd)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == CONFIG
    # and it loads as the original does
    a = lcn.LongCatDiT.from_pretrained(tmp_path / "back", dtype=torch.float32, kernels="reference")
    b = lcn.LongCatDiT.from_pretrained(root, dtype=torch.float32, kernels="reference")
    assert_same_models(a, b)


def test_diffusers_output_has_fastvideo_names_and_shapes(tmp_path):
    """Every key is a FastVideo name (layouts.py), the split parts are the official tensor's row
    blocks in order, none missing or invented; the config uses FastVideo's keys."""
    cv.convert_checkpoint(FIXTURE_ROOT, tmp_path / "diff", "diffusers", quiet=True)
    out = read_folder(tmp_path / "diff")
    sd = load_file(str(DIT / "diffusion_pytorch_model.safetensors"))
    assert set(out) == {n for k in sd for n in official_to_diffusers(k)}
    assert any(".self_attn.to_v." in k for k in out) and not any(".attn.qkv." in k for k in out)
    parts = {}
    for k, v in out.items():
        off, part, n = diffusers_to_official(k)
        parts.setdefault(off, [None] * n)[part] = v
    for off, vs in parts.items():
        assert same_bits(torch.cat(vs), sd[off]), off
    cfg = json.loads((tmp_path / "diff" / "config.json").read_text())
    assert cfg["_class_name"] == "LongCatTransformer3DModel" and cfg["num_attention_heads"] == CONFIG["num_heads"]
    assert "num_heads" not in cfg and {k: v for k, v in cfg.items() if k not in ("_class_name", "num_attention_heads")} \
        == {k: v for k, v in CONFIG.items() if k not in ("_class_name", "num_heads")}


def test_a_diffusers_root_is_found_and_read(tmp_path):
    cv.convert_checkpoint(FIXTURE_ROOT, tmp_path / "root" / "transformer", "diffusers", quiet=True)
    (tmp_path / "root" / "model_index.json").write_text(json.dumps({"_class_name": "LongCatPipeline"}))
    r = cv.convert_checkpoint(tmp_path / "root", tmp_path / "off", "official", quiet=True)
    assert r.source_layout == "diffusers" and r.source.endswith("transformer")
    assert_same_tensors(read_folder(tmp_path / "off"), load_file(str(DIT / "diffusion_pytorch_model.safetensors")))


@pytest.mark.parametrize("to,dtype,src", [("int8", None, "official"), ("fp8", "bfloat16", "official"),
                                          ("int8", "float16", "diffusers")])
def test_quantized_target_equals_quantizing_at_load(tmp_path, monkeypatch, to, dtype, src):
    monkeypatch.setattr(cv, "_CHUNK_ELEMENTS", 3000)  # weights quantized in slices of rows: the same bits
    source = FIXTURE_ROOT
    if src == "diffusers":
        source = tmp_path / "diff"
        cv.convert_checkpoint(FIXTURE_ROOT, source, "diffusers", quiet=True)
    r = cv.convert_checkpoint(source, tmp_path / "q", to, dtype=dtype, max_shard_size="100KB", quiet=True)
    assert r.shards > 1 and (tmp_path / "q" / qc.NATIVE_INDEX).is_file()
    got = lcn.LongCatDiT.from_pretrained(tmp_path / "q", kernels="reference")
    want = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, quantize=MODE[to], dtype=dtype or torch.float32,
                                          kernels="reference")
    assert_same_models(got, want)
    desc = json.loads((tmp_path / "q" / qc.NATIVE_MARKER).read_text())
    assert desc["quantization"] == MODE[to] and desc["weights"] == qc.NATIVE_INDEX
    # fp8 weights serve quantize="fp8" (activations quantized too) without re-quantizing
    if to == "fp8":
        assert_same_tensors(lcn.LongCatDiT.from_pretrained(tmp_path / "q", quantize="fp8", kernels="reference")
                            .state_dict(), want.state_dict())


def test_shards_and_index(tmp_path):
    r = cv.convert_checkpoint(FIXTURE_ROOT, tmp_path / "o", "official", max_shard_size="300KB", quiet=True)
    index = json.loads((tmp_path / "o" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{r.shards:05d}.safetensors" for i in range(r.shards)]
    assert sorted(set(index["weight_map"].values())) == names
    sizes = {}
    for n in names:
        with safe_open(str(tmp_path / "o" / n), "pt") as f:
            keys = list(f.keys())
            assert all(index["weight_map"][k] == n for k in keys)
            sizes[n] = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
    assert index["metadata"]["total_size"] == sum(sizes.values()) == r.bytes
    assert max(sizes.values()) <= 300_000  # no single tensor of the fixture is larger than that
    assert_same_tensors(read_folder(tmp_path / "o"), load_file(str(DIT / "diffusion_pytorch_model.safetensors")))
    assert_same_models(lcn.LongCatDiT.from_pretrained(tmp_path / "o", kernels="reference"),
                       lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference"))


def test_quantized_sources(tmp_path):
    """A quantized save is copied as stored to its own mode, dequantized to a float target; an
    official INT8 folder likewise (its mixed float dtypes need --dtype for a float target)."""
    from test_quantize_checkpoints import write_int8_folder

    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, quantize="int8-weight-only", kernels="reference")
    dit.save_quantized(tmp_path / "saved")  # the single-file save
    cv.convert_checkpoint(tmp_path / "saved", tmp_path / "i8", "int8", max_shard_size="100KB", quiet=True)
    assert_same_tensors(read_folder(tmp_path / "i8"), load_file(str(tmp_path / "saved" / qc.NATIVE_WEIGHTS)))
    r = cv.convert_checkpoint(tmp_path / "i8", tmp_path / "f", "official", quiet=True)
    assert r.source_layout == "native"
    dit.save_quantized(tmp_path / "i8")  # a sharded save is a previous save, replaced as a whole
    assert sorted(p.name for p in (tmp_path / "i8").iterdir()) == sorted(qc.NATIVE_FILES)
    out, sd = read_folder(tmp_path / "f"), dit.state_dict()
    w13 = torch.cat([out["blocks.1.ffn.w1.weight"], out["blocks.1.ffn.w3.weight"]])
    assert same_bits(w13, sd["blocks.1.ffn.w13.weight"].float() * sd["blocks.1.ffn.w13.weight_scale"][:, None])
    assert same_bits(out["blocks.0.adaLN_modulation.1.bias"], sd["blocks.0.adaLN_modulation.bias"])

    int8 = write_int8_folder(tmp_path / "avatar" / "base_model_int8")
    cv.convert_checkpoint(tmp_path / "avatar", tmp_path / "i8b", "int8", dtype="float32", quiet=True)
    assert_same_models(lcn.LongCatDiT.from_pretrained(tmp_path / "i8b", kernels="reference"),
                       lcn.LongCatDiT.from_pretrained(int8, dtype=torch.float32, kernels="reference"))
    with pytest.raises(ValueError, match="pass --dtype"):
        cv.convert_checkpoint(int8, tmp_path / "x", "official", quiet=True)
    assert not (tmp_path / "x").exists()
    cv.convert_checkpoint(int8, tmp_path / "x", "official", dtype="float32", quiet=True)
    assert read_folder(tmp_path / "x")["blocks.0.attn.qkv.weight"].dtype == torch.float32


def test_one_more_reader_is_a_table_entry(tmp_path, monkeypatch):
    """A layout the converter does not know, added as a Reader: one file, official names, the
    self-attention qkv stored as three float8 parts with a per-tensor scale each (ComfyUI's
    convention), the last part's scale a constant. --to fp8 keeps the stored bytes (each part's scale
    repeated over its rows); --to official dequantizes them."""
    from longcat_native.runtime import convert_sources as cs

    sd = _official_sd()
    f = tmp_path / "model.toy.safetensors"
    stored = {}
    for k, w in list(sd.items()):
        if k.endswith(".attn.qkv.weight"):
            del sd[k]
            for j, part in enumerate(w.chunk(3)):
                scale = part.abs().amax() / 448 if j < 2 else torch.tensor(1.0)
                sd[f"{k}.part{j}"] = (part / scale).to(torch.float8_e4m3fn)
                if j < 2:
                    sd[f"{k}.scale{j}"] = scale.reshape(())
                stored[(k, j)] = (sd[f"{k}.part{j}"], float(scale))
    save_file(sd, str(f))
    cfg = LongCatConfig.from_dict(CONFIG)

    def open_toy(path):
        refs = {}
        for name, shape in official_shapes(cfg).items():
            if name.endswith(".attn.qkv.weight"):
                refs[name] = cs.Ref(name, shape, torch.float8_e4m3fn, tuple(cs.Part(path, f"{name}.part{j}") for j in range(3)),
                                    (cs.Part(path, f"{name}.scale0"), cs.Part(path, f"{name}.scale1"), 1.0))
            else:
                refs[name] = cs.Ref(name, shape, torch.float32, (cs.Part(path, name),))
        return cs.Source("toy", path, CONFIG, cfg, refs, torch.float32)

    toy = cs.Reader("toy", lambda p: p.name.endswith(".toy.safetensors"), open_toy)
    monkeypatch.setattr(cs, "READERS", [toy] + cs.READERS)
    cv.convert_checkpoint(f, tmp_path / "f8", "fp8", quiet=True)
    q = read_folder(tmp_path / "f8")
    k = "blocks.1.attn.qkv.weight"
    assert same_bits(q[k], torch.cat([stored[(k, j)][0] for j in range(3)]))
    rows = q[k].shape[0] // 3
    assert same_bits(q[k + "_scale"], torch.tensor([stored[(k, j)][1] for j in range(3)]).repeat_interleave(rows))
    r = cv.convert_checkpoint(f, tmp_path / "off", "official", quiet=True)
    assert r.source_layout == "toy"
    off = read_folder(tmp_path / "off")
    assert same_bits(off[k], torch.cat([v.float() * s for v, s in (stored[(k, j)] for j in range(3))]))
    assert same_bits(off["blocks.1.ffn.w2.weight"], _official_sd()["blocks.1.ffn.w2.weight"])


def _diffusers_sd():
    sd = load_file(str(DIT / "diffusion_pytorch_model.safetensors"))
    out = {}
    for k, v in sd.items():
        names = official_to_diffusers(k)
        for i, n in enumerate(names):
            out[n] = v.chunk(len(names))[i].contiguous()
    return out


def _official_sd():
    return load_file(str(DIT / "diffusion_pytorch_model.safetensors"))


BAD = {
    "missing": (lambda sd, q: sd.pop(q), "missing", None),
    "extra": (lambda sd, q: sd.__setitem__(q.replace("weight", "extra"), sd[q].clone()), "unexpected", "extra"),
    "misnamed": (lambda sd, q: sd.__setitem__(q.replace("blocks.1", "block.1"), sd.pop(q)), "unexpected", "block.1"),
    "misshapen": (lambda sd, q: sd.__setitem__(q, sd[q][:-1].clone()), "wrong shape", None),
    "not float": (lambda sd, q: sd.__setitem__(q, sd[q].to(torch.int32)), "not floating point", None),
}


@pytest.mark.parametrize("layout", ["diffusers", "official"])
@pytest.mark.parametrize("bad", list(BAD))
def test_a_bad_source_is_an_error_naming_the_tensor(tmp_path, layout, bad):
    change, title, named = BAD[bad]
    sd = _diffusers_sd() if layout == "diffusers" else _official_sd()
    key = "blocks.1.self_attn.to_v.weight" if layout == "diffusers" else "blocks.1.ffn.w3.weight"
    change(sd, key)
    src = tmp_path / "src"
    if layout == "diffusers":
        write_diffusers(src, sd)
    else:
        src.mkdir()
        (src / "config.json").write_text(json.dumps(CONFIG))
        save_file(sd, str(src / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        cv.convert_checkpoint(src, tmp_path / "dst", "official", quiet=True)
    msg = str(e.value)
    assert title in msg and (key if named is None else key.replace("weight", "extra") if named == "extra"
                             else key.replace("blocks.1", "block.1")) in msg, msg
    if bad == "misnamed":
        assert "missing" in msg
    assert not (tmp_path / "dst").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_other_refusals(tmp_path):
    with pytest.raises(FileNotFoundError):
        cv.convert_checkpoint(tmp_path / "nope", tmp_path / "dst", "official")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no LongCat-Video DiT checkpoint found"):
        cv.convert_checkpoint(tmp_path / "empty", tmp_path / "dst", "official")
    # split parts of one fused tensor in two dtypes: the loader casts each into the model dtype; "as
    # stored" names no dtype for the fused tensor, so --dtype is needed (and then it is the loader's)
    sd = _diffusers_sd()
    sd["blocks.0.self_attn.to_k.weight"] = sd["blocks.0.self_attn.to_k.weight"].half()
    write_diffusers(tmp_path / "mixed", sd)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight is stored .* several dtypes .*to_k\.weight "
                                         r"float16.*pass --dtype"):
        cv.convert_checkpoint(tmp_path / "mixed", tmp_path / "dst", "official")
    with pytest.raises(ValueError, match=r"several dtypes .*blocks\.0\.attn\.qkv\.weight.*pass --dtype"):
        cv.convert_checkpoint(tmp_path / "mixed", tmp_path / "dst", "int8")
    cv.convert_checkpoint(tmp_path / "mixed", tmp_path / "mixed32", "official", dtype="float32", quiet=True)
    assert_same_models(lcn.LongCatDiT.from_pretrained(tmp_path / "mixed32", kernels="reference"),
                       lcn.LongCatDiT.from_pretrained(tmp_path / "mixed", dtype=torch.float32, kernels="reference"))
    # a FastVideo config that contradicts itself: the loader's own refusal
    write_diffusers(tmp_path / "cfg", _diffusers_sd(), dict(CONFIG, _class_name=DIFFUSERS_CLASS, num_attention_heads=8))
    with pytest.raises(CheckpointError, match="num_heads 4 contradicts num_attention_heads 8"):
        cv.convert_checkpoint(tmp_path / "cfg", tmp_path / "dst", "official")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        cv.convert_checkpoint(FIXTURE_ROOT, tmp_path / "busy", "official")
    with pytest.raises(ValueError, match="overlaps the source"):
        cv.convert_checkpoint(FIXTURE_ROOT, DIT, "official", overwrite=True)
    with pytest.raises(ValueError, match="overlaps the source"):
        cv.convert_checkpoint(FIXTURE_ROOT, DIT / "sub", "official")
    shutil.copytree(DIT, tmp_path / "root" / "dit")  # beside the DiT in its root is fine; holding it is not
    cv.convert_checkpoint(tmp_path / "root", tmp_path / "root" / "dit-int8", "int8", quiet=True)
    assert (tmp_path / "root" / "dit-int8" / qc.NATIVE_MARKER).is_file()
    with pytest.raises(ValueError, match="overlaps the source"):
        cv.convert_checkpoint(tmp_path / "root" / "dit", tmp_path / "root", "official", overwrite=True)
    with pytest.raises(ValueError, match="--to must be one of"):
        cv.convert_checkpoint(FIXTURE_ROOT, tmp_path / "dst", "gguf")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine" and not (tmp_path / "dst").exists()
    assert not (DIT / "sub").exists()
    # a value the target dtype cannot hold: an error naming it, mid-write, nothing left behind
    sd = _official_sd()
    sd["blocks.0.attn.proj.bias"][3] = 1e6
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text(json.dumps(CONFIG))
    save_file(sd, str(tmp_path / "big" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.proj\.bias: NaN or Inf after the conversion to float16"):
        cv.convert_checkpoint(tmp_path / "big", tmp_path / "dst", "official", dtype="float16", quiet=True)
    assert not (tmp_path / "dst").exists() and not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["dit", "dit-int8"]
    sd = _official_sd()
    sd["blocks.1.attn.qkv.weight"][5, 7] = float("nan")
    save_file(sd, str(tmp_path / "big" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.weight: NaN or Inf in the source weight"):
        cv.convert_checkpoint(tmp_path / "big", tmp_path / "dst", "int8", quiet=True)
    assert not (tmp_path / "dst").exists() and not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_dst_untouched_by_a_failure_mid_write(tmp_path, monkeypatch, exc):
    dst = tmp_path / "dst"
    cv.convert_checkpoint(FIXTURE_ROOT, dst, "diffusers", quiet=True)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    real, calls = cv._write_tensor, []

    def failing(f, t):
        calls.append(1)
        if len(calls) == 40:  # the second shard is being written
            raise exc("injected")
        real(f, t)

    monkeypatch.setattr(cv, "_write_tensor", failing)
    with pytest.raises(exc, match="injected"):
        cv.convert_checkpoint(FIXTURE_ROOT, dst, "official", max_shard_size="300KB", overwrite=True, quiet=True)
    assert len(calls) == 40
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no temporary folder left
    with pytest.raises(exc, match="injected"):  # a new DST does not appear at all
        calls.clear()
        cv.convert_checkpoint(FIXTURE_ROOT, tmp_path / "new", "official", max_shard_size="300KB", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]
    monkeypatch.setattr(cv, "_write_tensor", real)
    cv.convert_checkpoint(FIXTURE_ROOT, dst, "official", overwrite=True, quiet=True)  # --overwrite swaps it
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_cli(tmp_path, capsys):
    assert main(["convert", str(FIXTURE_ROOT), str(tmp_path / "d"), "--to", "diffusers", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "diffusers" and out["tensors"] == 68 and out["shards"] == 1
    assert main(["convert", str(tmp_path / "d"), str(tmp_path / "q"), "--to", "int8", "--max-shard-size", "50KB"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("converted diffusers") and "shards" in line and "peak RSS" in line
    assert main(["convert", str(FIXTURE_ROOT), str(tmp_path / "d"), "--to", "official"]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    # python -m longcat_native convert --help: complete, and no torch imported for it
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "longcat_native", "convert", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(f in r.stdout for f in ("--to", "--dtype", "--max-shard-size", "--overwrite",
                                                              "--quiet", "--json", "SRC", "DST"))
    modules = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "longcat_native.cli" in modules and not [m for m in modules if m.split(".")[0] in ("torch", "triton")]


# ---------------------------------------------------------------------------------------------
# Peak host memory on a checkpoint much larger than the bound
# ---------------------------------------------------------------------------------------------

RAM_BOUND = 64 * 2**20
_MEASURE = textwrap.dedent("""
    import json, sys
    from longcat_native.runtime import convert as cv
    from longcat_native.runtime import dit  # everything the conversion imports, before measuring

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    src, out = sys.argv[1], sys.argv[2]
    peaks = {}
    for to in ("int8", "diffusers"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the kernel's exact peak of the resident set, to the current RSS
        start = status("VmRSS")
        cv.convert_checkpoint(src, f"{out}/{to}", to, max_shard_size="100MB", quiet=True)
        peaks[to] = status("VmHWM") - start
    print(json.dumps(peaks))
""")


def test_peak_ram_stays_far_below_the_checkpoint(tmp_path):
    """A random official checkpoint of ~290 MB in two shards, converted to int8 (float32 copies and
    the quantizer) and to diffusers in a subprocess: the resident set grows by less than 64 MiB (it
    holds one group of tensors at a time; source pages are unmapped after each group)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure the peak resident set")
    cfg = LongCatConfig.from_dict(dict(CONFIG, hidden_size=512, depth=16, num_heads=8, caption_channels=256,
                                       adaln_tembed_dim=64))
    src = tmp_path / "big"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(dict(cfg.to_dict(), _class_name="LongCatVideoTransformer3DModel")))
    shapes = list(official_shapes(cfg).items())
    half = len(shapes) // 2
    weight_map, total = {}, 0
    for i, chunk in enumerate((shapes[:half], shapes[half:])):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-00002.safetensors"
        # varied, non-zero values, cheaply (random draws of 75M values take ~10 s on 2 shared cores)
        tensors = {k: torch.linspace(-0.1 - j * 1e-3, 0.1, torch.Size(s).numel()).reshape(s) for j, (k, s) in enumerate(chunk)}
        total += sum(t.numel() * 4 for t in tensors.values())
        save_file(tensors, str(src / name))
        weight_map.update({k: name for k in tensors})
        del tensors
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    assert total > 4 * RAM_BOUND
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(tmp_path)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    peaks = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(0 <= p < RAM_BOUND for p in peaks.values()), f"checkpoint {total / 2**20:.0f} MiB, peaks {peaks}"
    assert (tmp_path / "int8" / qc.NATIVE_MARKER).is_file() and (tmp_path / "diffusers" / "config.json").is_file()
    assert len(list((tmp_path / "diffusers").glob("*.safetensors"))) == 4  # 100MB shards


# ---------------------------------------------------------------------------------------------
# ComfyUI single files, and the converter refusing what the loader refuses
# ---------------------------------------------------------------------------------------------


def _comfy_file(tmp_path, variant):
    """The ComfyUI file of tests/test_checkpoint_comfy.py's writer: scaled fp8 under ComfyUI's
    "model.diffusion_model." prefix, its newer per-layer comfy_quant spelling, or unscaled fp8."""
    from test_checkpoint_comfy import comfy_fp8_state_dict, to_comfy_quant, write

    sd = comfy_fp8_state_dict(scaled=variant != "unscaled")
    if variant == "comfy_quant":
        sd = to_comfy_quant(sd)
    return write(tmp_path / f"LongCat_{variant}.safetensors", sd,
                 prefix="model.diffusion_model." if variant == "scaled" else ""), sd


@pytest.mark.parametrize("variant", ["scaled", "comfy_quant", "unscaled"])
def test_comfy_file_converts_as_from_pretrained_loads_it(tmp_path, variant):
    """--to fp8 keeps the file's float8 bytes with its per-tensor scale repeated over the rows, and
    --to int8 requantizes fp8 * scale: both bit for bit what from_pretrained(file, quantize=...)
    holds (the model dtype, bf16, is the file's float dtype). --to official dequantizes fp8 * scale
    (float32, rounded once into --dtype): the dequantized fp8-weight-only model, bit for bit."""
    from test_checkpoint_comfy import _float_twin

    f, sd = _comfy_file(tmp_path, variant)
    for to in ("fp8", "int8") if variant != "comfy_quant" else ("fp8",):
        r = cv.convert_checkpoint(f, tmp_path / to, to, max_shard_size="100KB", quiet=True)
        assert r.source_layout == "comfy" and r.source == str(f)
        want = lcn.LongCatDiT.from_pretrained(f, quantize=MODE[to], dtype=torch.bfloat16, kernels="reference")
        assert_same_models(lcn.LongCatDiT.from_pretrained(tmp_path / to, kernels="reference"), want)
    q = read_folder(tmp_path / "fp8")
    k = "blocks.1.attn.qkv.weight"
    parts = [sd[f"blocks.1.self_attn.{p}.weight"] for p in "qkv"]
    assert same_bits(q[k], torch.cat(parts))  # the stored bytes
    scales = [sd[f"blocks.1.self_attn.{p}.{'weight_scale' if variant == 'comfy_quant' else 'scale_weight'}"]
              if variant != "unscaled" else torch.tensor(1.0) for p in "qkv"]
    assert same_bits(q[k + "_scale"], torch.stack(scales).float().repeat_interleave(parts[0].shape[0]))

    twin = _float_twin(lcn.LongCatDiT.from_pretrained(f, quantize="fp8-weight-only", dtype=torch.float32,
                                                      kernels="reference")).state_dict()
    for dtype in ("float32", "bfloat16"):
        cv.convert_checkpoint(f, tmp_path / f"off-{dtype}", "official", dtype=dtype, quiet=True)
        assert {t.dtype for t in read_folder(tmp_path / f"off-{dtype}").values()} == {getattr(torch, dtype)}
        got = lcn.LongCatDiT.from_pretrained(tmp_path / f"off-{dtype}", dtype=getattr(torch, dtype),
                                             kernels="reference")
        assert_same_tensors(got.state_dict(), {n: t.to(got.dtype) for n, t in twin.items()})
    # the same through the Diffusers layout, the dtype by default the file's float dtype (bf16)
    cv.convert_checkpoint(f, tmp_path / "diff", "diffusers", quiet=True)
    assert_same_models(lcn.LongCatDiT.from_pretrained(tmp_path / "diff", kernels="reference"),
                       lcn.LongCatDiT.from_pretrained(tmp_path / "off-bfloat16", kernels="reference"))


def test_float_comfy_file_converts_back_to_the_official_tensors(tmp_path):
    """A float ComfyUI export (no fp8): its split q/k/v, kv and w1/w3 are the official tensors' row
    blocks, so --to official gives the official checkpoint bit for bit."""
    from test_checkpoint_comfy import to_comfy_names, write

    f = write(tmp_path / "LongCat_bf16.safetensors", to_comfy_names(_official_sd()), prefix="diffusion_model.")
    cv.convert_checkpoint(f, tmp_path / "off", "official", quiet=True)
    assert_same_tensors(read_folder(tmp_path / "off"), _official_sd())


def _errors(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message and type are compared below
        return type(e), str(e)
    raise AssertionError("no error")


def test_convert_refuses_what_from_pretrained_refuses(tmp_path):
    """The readers are the loader's code: the same error, word for word, for a ComfyUI file with a
    missing tensor, a Wan file, a Diffusers config with a key the loader does not know, and a
    config.json of another model class."""
    from test_checkpoint_comfy import comfy_fp8_state_dict, write

    sd = comfy_fp8_state_dict()
    del sd["blocks.1.cross_attn.v.weight"]
    bad_comfy = write(tmp_path / "missing.safetensors", sd)
    wan = write(tmp_path / "wan.safetensors",
                dict(comfy_fp8_state_dict(), **{"time_projection.1.weight": torch.ones(2)}))
    write_diffusers(tmp_path / "unknown_key", _diffusers_sd(),
                    dict(CONFIG, _class_name=DIFFUSERS_CLASS, rope_theta=1e4))
    write_diffusers(tmp_path / "foreign", _diffusers_sd(), dict(CONFIG, _class_name="WanTransformer3DModel"))
    for src in (bad_comfy, wan, tmp_path / "unknown_key", tmp_path / "foreign", tmp_path):
        want = _errors(lambda: lcn.LongCatDiT.from_pretrained(src, quantize="fp8-weight-only", kernels="reference"))
        got = _errors(lambda: cv.convert_checkpoint(src, tmp_path / "dst", "official", quiet=True))
        if src == tmp_path:  # no checkpoint at all: the converter says so, with the loader's words
            assert got[0] is CheckpointError and want[1] in got[1], (got, want)
        else:
            assert got == want, (src, got, want)
        assert not (tmp_path / "dst").exists()
    assert "blocks.1.cross_attn.v.weight" in _errors(lambda: cv.convert_checkpoint(bad_comfy, tmp_path / "d", "fp8"))[1]
    assert "rope_theta" in _errors(lambda: cv.convert_checkpoint(tmp_path / "unknown_key", tmp_path / "d", "int8"))[1]


def test_diffusers_config_is_what_the_diffusers_loader_reads(tmp_path):
    """An official config.json with a key the model does not read (the official loader ignores it,
    warning) converts to Diffusers without it, with a warning naming it: the Diffusers loader
    refuses unknown keys, so DST must not carry it. Every key is written explicitly: an official
    config without text_tokens_zero_pad means False (the official default), a FastVideo one without
    it True, so the value is written, and DST loads as the source model."""
    config = {k: v for k, v in CONFIG.items() if k != "text_tokens_zero_pad"}
    config["my_training_note"] = "lr 1e-4"
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config))
    shutil.copy(DIT / "diffusion_pytorch_model.safetensors", src)
    with pytest.warns(UserWarning) as caught:  # the key ignored on reading (as the loader does), then not written
        cv.convert_checkpoint(src, tmp_path / "diff", "diffusers", quiet=True)
    said = [str(w.message) for w in caught]
    assert any("ignoring unknown config keys ['my_training_note']" in m for m in said), said
    assert any("['my_training_note'] are not written to the Diffusers config.json" in m for m in said), said
    written = json.loads((tmp_path / "diff" / "config.json").read_text())
    assert "my_training_note" not in written and written["text_tokens_zero_pad"] is False
    with pytest.warns(UserWarning, match="ignoring unknown config keys"):
        want = lcn.LongCatDiT.from_pretrained(src, dtype=torch.float32, kernels="reference")
    got = lcn.LongCatDiT.from_pretrained(tmp_path / "diff", dtype=torch.float32, kernels="reference")
    assert got.config == want.config and not got.config.text_tokens_zero_pad
    assert_same_models(got, want)
    # and back: the official config the loader reads, the unknown key gone with the Diffusers step
    cv.convert_checkpoint(tmp_path / "diff", tmp_path / "back", "official", quiet=True)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert LongCatConfig.from_dict(back) == want.config and "my_training_note" not in back
