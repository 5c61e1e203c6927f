"""Issue 19: hostile or careless inputs get a clear error before any heavy work, outputs are
written atomically, and nothing silently wrong comes out.

Each test names its item of the issue: 1 atomic outputs and non-finite results, 2 KV caches carry
their grid, 4 config values typed, 5 headers checked before allocation, 6 non-finite or non-float
data rejected (and masked text tokens ignored whatever they hold), 7 Python errors from deep
inside turned into messages. Every bad call is followed by a good one: the model stays usable.
"""

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from cases import FIXTURE_ROOT, load_case
from helpers import MODEL_RTOL, assert_close_rel
from safetensors.torch import load_file, save_file

import longcat_native as lcn
from longcat_native import CheckpointError

FIXTURE_DIT = FIXTURE_ROOT / "dit"
CONFIG = json.loads((FIXTURE_DIT / "config.json").read_text())


@pytest.fixture(scope="module")
def dit():
    return lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")


@pytest.fixture(scope="module")
def t2v():
    inputs, _, expected, _ = load_case("t2v_mask")
    return inputs, expected["output"]


@pytest.fixture
def official_sd():
    return load_file(str(FIXTURE_DIT / "diffusion_pytorch_model.safetensors"))


def _still_usable(dit, t2v):
    inputs, expected = t2v
    assert_close_rel(dit(**inputs), expected, MODEL_RTOL, "after the error")


def _dit_dir(tmp_path, sd=None, config=None, name="ckpt"):
    d = tmp_path / name / "dit"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    if sd is None:
        shutil.copy(FIXTURE_DIT / "diffusion_pytorch_model.safetensors", d / "diffusion_pytorch_model.safetensors")
    else:
        save_file(sd, str(d / "diffusion_pytorch_model.safetensors"))
    return d


# -- 1: atomic outputs ---------------------------------------------------------------------------

def _leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".tmp-"))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_leaves_the_previous_file_on_any_error(tmp_path, exc):
    from longcat_native.runtime.files import atomic_output

    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous")
    with pytest.raises(exc):
        with atomic_output(out) as tmp:
            Path(tmp).write_bytes(b"half")
            raise exc("interrupted")
    assert out.read_bytes() == b"previous" and _leftovers(tmp_path) == []
    # An empty or rejected result is an error too, and leaves the previous file.
    with pytest.raises(OSError, match="empty"):
        with atomic_output(out):
            pass
    with pytest.raises(ValueError, match="bad"):
        with atomic_output(out, validate=lambda p: (_ for _ in ()).throw(ValueError("bad"))) as tmp:
            Path(tmp).write_bytes(b"new")
    assert out.read_bytes() == b"previous" and _leftovers(tmp_path) == []
    with atomic_output(out) as tmp:
        Path(tmp).write_bytes(b"new")
    assert out.read_bytes() == b"new" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_output_has_the_usual_permissions(tmp_path, umask):
    from longcat_native.runtime.files import write_json_atomic

    old = os.umask(umask)
    try:
        path = write_json_atomic(tmp_path / "r.json", {"a": 1})
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode) == 0o666 & ~umask


def test_safetensors_written_through_the_helper_keeps_the_previous_on_failure(tmp_path):
    """How pipelines/run.py writes latents: ``with atomic_output(out) as tmp: save_file(..., tmp)``."""
    from longcat_native.runtime.files import atomic_output

    out = tmp_path / "lat.safetensors"
    save_file({"latents": torch.ones(2)}, str(out))
    before = out.read_bytes()
    with pytest.raises(Exception):
        with atomic_output(out) as tmp:
            save_file({"latents": "not a tensor"}, tmp)
    assert out.read_bytes() == before and _leftovers(tmp_path) == []
    with atomic_output(out) as tmp:
        save_file({"latents": torch.zeros(3)}, tmp)
    assert torch.equal(load_file(str(out))["latents"], torch.zeros(3))


def test_check_output_path(tmp_path):
    from longcat_native.runtime.files import check_output_path

    with pytest.raises(ValueError, match="is a folder"):
        check_output_path(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "x.safetensors")
    with pytest.raises(ValueError, match="must end in"):
        check_output_path(tmp_path / "x.txt", suffixes=(".safetensors", ".mp4"))
    p = check_output_path(tmp_path / "new" / "x.mp4", make_parent=True)
    assert p.parent.is_dir()


def test_bench_results_are_never_half_written(tmp_path):
    from longcat_native.benchmarking.model import save_results

    class Unprintable:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_results({"device": "cpu", "big": list(range(1000)), "bad": Unprintable()}, str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # no truncated JSON, no temporary file


def test_bench_suite_merge_keeps_the_previous_file_on_failure(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "bench"))
    import suite

    first = {"date": "2024-01-01", "device": "cpu", "torch": "x", "triton": "y", "commit": "c",
             "benches": {"kernels": {"argv": [], "returncode": 0, "seconds": 1.0, "record": {"a": 1},
                                     "stderr_tail": "", "stdout_tail": ""}}}
    stem = suite._write(first, str(tmp_path))
    before = Path(stem + ".json").read_bytes()
    bad = dict(first, benches={"model": {"argv": [], "returncode": 0, "seconds": 1.0, "record": {"x": object()},
                                         "stderr_tail": "", "stdout_tail": ""}})
    with pytest.raises(TypeError):
        suite._write(bad, str(tmp_path))
    assert Path(stem + ".json").read_bytes() == before and _leftovers(tmp_path) == []


def test_profiler_trace_is_written_atomically(tmp_path, monkeypatch):
    from torch.profiler import profile

    from longcat_native.runtime.profiling import profile_forward

    trace = tmp_path / "trace.json"
    trace.write_text('{"previous": true}')

    def failing_export(self, path):
        with open(path, "w") as f:
            f.write('{"traceEvents": [')  # half a trace, then the writer dies
        raise OSError("disk full")

    monkeypatch.setattr(profile, "export_chrome_trace", failing_export)
    with pytest.raises(OSError, match="disk full"):
        profile_forward(lambda: torch.ones(4).sum(), steps=1, warmup=0, trace_path=str(trace), device="cpu")
    assert trace.read_text() == '{"previous": true}' and _leftovers(tmp_path) == []


class _PoisonAt:
    """A stand-in DiT whose output turns NaN from the call ``bad_call`` on (0-based)."""

    def __init__(self, dit, bad_call):
        self.inner, self.bad_call, self.calls = dit, bad_call, 0
        self.config, self.dtype, self.device = dit.config, dit.dtype, dit.device

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.calls += 1
        return out * float("nan") if self.calls - 1 >= self.bad_call else out


def test_non_finite_result_is_an_error_naming_the_step(dit):
    from longcat_native.pipelines.sampler import NonFiniteLatentsError, denoise

    inputs, _, _, _ = load_case("sample_t2v_cfg")
    with pytest.raises(NonFiniteLatentsError, match=r"non-finite \(NaN or Inf\) at step 3 of 4") as e:
        denoise(_PoisonAt(dit, 2), inputs["noise"], inputs["prompt_embeds"], inputs["prompt_mask"],
                num_steps=4, guidance_scale=1.0, progress=False)
    assert isinstance(e.value, ValueError)
    out = denoise(dit, inputs["noise"], inputs["prompt_embeds"], inputs["prompt_mask"], num_steps=2,
                  guidance_scale=1.0, progress=False)
    assert torch.isfinite(out).all()


def test_non_finite_inputs_are_rejected_before_the_loop(dit):
    from longcat_native.pipelines.sampler import denoise

    inputs, _, _, _ = load_case("sample_t2v_cfg")
    noise = inputs["noise"].clone()
    noise[0, 0, 0, 0, 0] = float("inf")
    spy = _PoisonAt(dit, 10**6)
    with pytest.raises(ValueError, match="noise holds NaN or Inf"):
        denoise(spy, noise, inputs["prompt_embeds"], inputs["prompt_mask"], num_steps=2, guidance_scale=1.0,
                progress=False)
    assert spy.calls == 0


# -- 2: KV caches carry their grid ---------------------------------------------------------------

def _cache(dit, T, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, 16, T, H, W, generator=g)
    _, kv = dit(cond, torch.zeros(1), None, return_kv=True, skip_crs_attn=True)
    return kv


def _noisy(H, W, T=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, T, H, W, generator=g), torch.tensor([700.0]), torch.randn(1, 1, 5, 64, generator=g)


def test_kv_cache_records_its_grid_and_maker(dit):
    kv = _cache(dit, 2, 4, 8)
    assert isinstance(kv, dict) and sorted(kv) == [0, 1] and kv.grid == (2, 4, 8)
    assert kv.made_by["hidden_size"] == 128 and kv.made_by["checkpoint"] == dit.checkpoint_path
    k, v = kv[0]
    assert k.shape == v.shape == (1, 4, 2 * 2 * 4, 32)


@pytest.mark.parametrize("cache_grid,call_hw", [((1, 4, 8), (8, 4)),   # H and W swapped
                                                ((2, 4, 4), (4, 8))])  # 2 x (4x4) vs 1 x (4x8)
def test_kv_cache_from_another_grid_is_a_value_error(dit, t2v, cache_grid, call_hw):
    kv = _cache(dit, *cache_grid)
    x, t, text = _noisy(*call_hw)
    with pytest.raises(ValueError, match="kv cache was made from a latent of"):
        dit(x, t, text, kv_cache_dict=kv)
    # A plain dict (an official-format cache from elsewhere) carries no grid: shape checks only.
    out = dit(x, t, text, kv_cache_dict=dict(kv))
    assert out.shape == x.shape
    # The cache at its own grid works, and the model is still usable.
    x2, t2, text2 = _noisy(*cache_grid[1:])
    ref = dit(x2, t2, text2, kv_cache_dict=dict(kv))
    assert torch.equal(dit(x2, t2, text2, kv_cache_dict=kv), ref)
    _still_usable(dit, t2v)


def test_kv_cache_from_another_model_is_a_value_error(dit, tmp_path):
    other = lcn.LongCatDiT.from_pretrained(_dit_dir(tmp_path), kernels="reference")
    kv = _cache(other, 1, 4, 4)
    x, t, text = _noisy(4, 4)
    with pytest.raises(ValueError, match="made by a different model: checkpoint"):
        dit(x, t, text, kv_cache_dict=kv)


@pytest.fixture(scope="module")
def fp8_dit():
    return lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference", quantize="fp8")


def test_kv_cache_records_the_quantization_and_is_refused_by_the_float_model(dit, fp8_dit, t2v):
    """Issue 27 item 8: a cache of the fp8 model holds other keys and values than the float
    model's; each model refuses the other's cache, naming the quantization."""
    kv_q, kv_f = _cache(fp8_dit, 1, 4, 4), _cache(dit, 1, 4, 4)
    assert kv_q.made_by["quantization"] == "fp8" and kv_f.made_by["quantization"] is None
    assert not torch.equal(kv_q[0][0], kv_f[0][0])  # why it matters: the cached keys differ
    x, t, text = _noisy(4, 4)
    with pytest.raises(ValueError, match=r"made by a different model: quantization 'fp8' "
                                         r"\(this model: none \(float weights\)\)"):
        dit(x, t, text, kv_cache_dict=kv_q)
    with pytest.raises(ValueError, match=r"quantization none \(float weights\) \(this model: 'fp8'\)"):
        fp8_dit(x, t, text, kv_cache_dict=kv_f)
    assert fp8_dit(x, t, text, kv_cache_dict=kv_q).shape == x.shape  # its own cache is fine
    _still_usable(dit, t2v)


def test_kv_cache_records_the_active_loras_with_their_scales(tmp_path, t2v):
    """The active LoRAs and the multiplier each was applied with are part of the identity: a
    cache made with a LoRA on is refused without it, or at another scale (a later
    set_multiplier only counts once enable_loras applies it), and accepted in the same state."""
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    path = FIXTURE_ROOT / "lora" / "cfg_step_lora.safetensors"
    dit.load_lora(path, "cfg_step", multiplier=0.5, lora_network_dim=4)
    dit.enable_loras(["cfg_step"])
    kv = _cache(dit, 1, 4, 4)
    assert kv.made_by["loras"] == [["cfg_step", 0.5, str(path)]]
    x, t, text = _noisy(4, 4)
    assert dit(x, t, text, kv_cache_dict=kv).shape == x.shape  # same LoRA state
    dit.lora_dict["cfg_step"].set_multiplier(1.0)  # not applied yet: the model is unchanged
    assert dit(x, t, text, kv_cache_dict=kv).shape == x.shape
    dit.enable_loras(["cfg_step"])  # now at 1.0
    with pytest.raises(ValueError, match=r"active LoRAs 'cfg_step' x0.5 \(.*\) \(this model: 'cfg_step' x1 "):
        dit(x, t, text, kv_cache_dict=kv)
    dit.disable_all_loras()
    with pytest.raises(ValueError, match=r"active LoRAs 'cfg_step' x0.5 .*\(this model: none\)"):
        dit(x, t, text, kv_cache_dict=kv)
    base = _cache(dit, 1, 4, 4)
    dit.lora_dict["cfg_step"].set_multiplier(0.5)
    dit.enable_loras(["cfg_step"])
    with pytest.raises(ValueError, match=r"active LoRAs none \(this model: 'cfg_step' x0.5"):
        dit(x, t, text, kv_cache_dict=base)
    dit.disable_all_loras()
    _still_usable(dit, t2v)


def test_kv_cache_identity_without_the_new_keys_reads_as_a_plain_model(dit):
    """A cache pickled before the identity recorded quantization and LoRAs (no such keys) is a
    float model's without LoRAs: accepted by that model."""
    kv = _cache(dit, 1, 4, 4)
    for k in ("quantization", "loras"):
        del kv.made_by[k]
    x, t, text = _noisy(4, 4)
    assert dit(x, t, text, kv_cache_dict=kv).shape == x.shape


def test_denoise_checks_the_cache_before_any_step(dit):
    from longcat_native.pipelines.sampler import denoise

    kv = _cache(dit, 1, 4, 8)
    spy = _PoisonAt(dit, 10**6)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 3, 8, 4, generator=g)
    with pytest.raises(ValueError, match="kv cache was made from a latent of"):
        denoise(spy, noise, torch.randn(1, 1, 5, 64), None, num_steps=2, guidance_scale=1.0, progress=False,
                cond_latents=noise[:, :, :1], kv_cache=kv)
    assert spy.calls == 0


# -- 4: config values typed ----------------------------------------------------------------------

@pytest.mark.parametrize("key,value,message", [
    ("text_tokens_zero_pad", "false", "text_tokens_zero_pad must be true or false, got 'false'"),
    ("enable_bsa", "false", "enable_bsa must be true or false"),
    ("enable_flashattn3", 1, "enable_flashattn3 must be true or false"),
    ("patch_size", 2, "patch_size must be a list of 3 integers, got 2"),
    ("patch_size", [1, 2], "patch_size must be a list of 3 integers"),
    ("cp_split_hw", 1, "cp_split_hw must be a list of 2 integers, got 1"),
    ("cp_split_hw", [1, "1"], "cp_split_hw must be a list of 2 integers"),
    ("hidden_size", 128.0, "hidden_size must be a positive integer"),
    ("hidden_size", 10**9, "hidden_size must be a positive integer .at most 65536., got 1000000000"),
    ("depth", 2000, "depth must be a positive integer .at most 1024."),
    ("num_heads", "4", "num_heads must be a positive integer"),
    ("bsa_params", {"sparsity": 2.0}, r"bsa_params.sparsity must be a number in \[0, 1\)"),
    ("bsa_params", {"sparsity": float("nan")}, r"bsa_params.sparsity must be a number in \[0, 1\)"),
    ("bsa_params", {"cdf_threshold": 0.0}, r"bsa_params.cdf_threshold must be a number in \(0, 1\]"),
    ("bsa_params", {"chunk_3d_shape_q": [0, 2, 2]}, r"bsa_params.chunk_3d_shape_q must be a list of 3 integers in \[1"),
    ("bsa_params", {"chunk_3d_shape_k": 4}, "bsa_params.chunk_3d_shape_k must be a list of 3 integers"),
    ("bsa_params", {"sparsity": None, "cdf_threshold": None}, "cannot both be null"),
    ("bsa_params", [0.5], "bsa_params must be an object"),
])
def test_config_values_are_checked_at_load_with_the_key_named(tmp_path, key, value, message):
    cfg = dict(CONFIG)
    cfg[key] = dict(CONFIG["bsa_params"], **value) if key == "bsa_params" and isinstance(value, dict) else value
    d = _dit_dir(tmp_path, config=cfg)
    with pytest.raises(ValueError, match=message) as e:
        lcn.LongCatDiT.from_pretrained(d)
    assert "config.json" in str(e.value)  # the file is named
    with pytest.raises(ValueError, match=message):
        lcn.LongCatDiT.from_config(cfg)


def test_config_integer_likes_are_normalized():
    cfg = lcn.LongCatDiT.from_config("tiny", depth=np.int64(1), patch_size=(1, np.int64(2), 2), device="meta").config
    assert type(cfg.depth) is int and cfg.patch_size == (1, 2, 2) and all(type(p) is int for p in cfg.patch_size)


# -- 5: nothing allocated before the checkpoint is checked ---------------------------------------

@pytest.fixture
def no_allocation(monkeypatch):
    """Giving a model storage (``to_empty``) raises: the checks must come first."""
    def refuse(self, *a, **k):
        raise AssertionError("the model was allocated before the checkpoint was checked")

    monkeypatch.setattr(torch.nn.Module, "to_empty", refuse)


def test_config_missing_model_keys_fails_before_allocating(tmp_path, no_allocation):
    cfg = {k: v for k, v in CONFIG.items() if k in ("_class_name", "text_tokens_zero_pad")}
    d = _dit_dir(tmp_path, config=cfg)
    with pytest.raises(CheckpointError) as e:
        lcn.LongCatDiT.from_pretrained(d)  # the 13.6B defaults over the tiny checkpoint
    msg = str(e.value)
    assert "config.json does not set in_channels, out_channels, hidden_size, depth" in msg
    assert "more" in msg and len(msg) < 8000, len(msg)  # capped: the first keys, then a count


def test_error_messages_are_capped(tmp_path, no_allocation):
    d = _dit_dir(tmp_path, config=dict(CONFIG, depth=1000))
    with pytest.raises(CheckpointError, match=r"missing \(\d+\): .*, \.\.\. and \d+ more") as e:
        lcn.LongCatDiT.from_pretrained(d)
    assert len(str(e.value)) < 8000, len(str(e.value))


def test_weights_larger_than_free_memory_are_a_clear_error(monkeypatch, t2v):
    from longcat_native.runtime import device as device_mod  # where free_memory_bytes is defined (runtime/device.py)

    monkeypatch.setattr(device_mod, "free_memory_bytes", lambda device: 10_000)
    with pytest.raises(ValueError, match=r"weights need .* GiB .* but only .* GiB are free on cpu"):
        lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT)
    with pytest.raises(ValueError, match="are free on cpu"):
        lcn.LongCatDiT.from_config("tiny")
    monkeypatch.undo()
    _still_usable(lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference"), t2v)


def test_free_memory_is_known_on_the_cpu():
    from longcat_native.runtime.dit import free_memory_bytes

    free = free_memory_bytes("cpu")
    assert free is None or free > 0
    assert free_memory_bytes("meta") is None


# -- 6: non-finite or non-float data -------------------------------------------------------------

@pytest.mark.parametrize("poison,message", [
    (lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), r"NaN or Inf \(1\): blocks.0.attn.qkv.weight"),
    (lambda t: t.index_fill(0, torch.tensor([1]), float("inf")), r"NaN or Inf \(1\): blocks.0.attn.qkv.weight"),
    (lambda t: t.to(torch.int8), r"not floating point .*\(1\): blocks.0.attn.qkv.weight: I8"),
    (lambda t: t > 0, r"not floating point .*\(1\): blocks.0.attn.qkv.weight: BOOL"),
])
def test_non_finite_or_non_float_weights_are_rejected_by_name(tmp_path, official_sd, poison, message):
    sd = dict(official_sd)
    sd["blocks.0.attn.qkv.weight"] = poison(sd["blocks.0.attn.qkv.weight"])
    with pytest.raises(CheckpointError, match=message):
        lcn.LongCatDiT.from_pretrained(_dit_dir(tmp_path, sd))


def test_weights_beyond_the_dtype_range_are_rejected(tmp_path, official_sd):
    sd = dict(official_sd)
    sd["final_layer.linear.bias"] = sd["final_layer.linear.bias"].clone().fill_(1e6)
    d = _dit_dir(tmp_path, sd)
    with pytest.raises(CheckpointError, match=r"beyond the range of float16 \(1\): final_layer.linear.bias"):
        lcn.LongCatDiT.from_pretrained(d, dtype=torch.float16)
    assert lcn.LongCatDiT.from_pretrained(d, dtype=torch.float32) is not None  # fine in float32


def _lora_file(tmp_path, dit, poison):
    from longcat_native.runtime.lora import encode_lora_name

    stem = encode_lora_name("blocks.0.attn.proj")
    g = torch.Generator().manual_seed(0)
    sd = {f"{stem}.lora_down.weight": torch.randn(4, 128, generator=g) * 0.01,
          f"{stem}.lora_up.weight": torch.randn(128, 4, generator=g) * 0.01,
          f"{stem}.alpha_scale": torch.tensor(0.5)}
    poison(sd, stem)
    path = tmp_path / "l.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("poison,message", [
    (lambda sd, s: sd[f"{s}.lora_down.weight"].__setitem__((0, 0), float("nan")), "lora_down.weight: holds NaN or Inf"),
    (lambda sd, s: sd[f"{s}.lora_up.weight"].__setitem__((0, 0), float("-inf")), "lora_up.weight: holds NaN or Inf"),
    (lambda sd, s: sd.__setitem__(f"{s}.alpha_scale", torch.tensor(float("inf"))), "alpha_scale: holds NaN or Inf"),
    (lambda sd, s: sd.__setitem__(f"{s}.alpha_scale", torch.tensor(1, dtype=torch.int32)), "alpha_scale: dtype torch.int32"),
])
def test_non_finite_lora_data_is_rejected_by_name(tmp_path, dit, t2v, poison, message):
    path = _lora_file(tmp_path, dit, poison)
    with pytest.raises(ValueError, match=message):
        dit.load_lora(str(path), "bad", lora_network_dim=4)
    assert "bad" not in dit.lora_dict
    with pytest.raises(ValueError, match="lora_network_alpha must be a finite number"):
        dit.load_lora(str(_lora_file(tmp_path, dit, lambda sd, s: None)), "ok", lora_network_dim=4,
                      lora_network_alpha=float("nan"))
    _still_usable(dit, t2v)


@pytest.mark.parametrize("zero_pad,case", [(True, "t2v_mask"), (False, "t2v_mask_varlen")])
@pytest.mark.parametrize("junk", [float("nan"), float("inf"), 1e30])
def test_masked_text_tokens_do_not_contribute_whatever_they_hold(zero_pad, case, junk):
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference", text_tokens_zero_pad=zero_pad)
    inputs, _, expected, _ = load_case(case)
    mask = inputs["encoder_attention_mask"]
    assert (mask == 0).any()
    text = inputs["encoder_hidden_states"].clone()
    text[(mask == 0)[:, None, :, None].expand_as(text)] = junk
    out = dit(**dict(inputs, encoder_hidden_states=text))
    assert_close_rel(out, expected["output"], MODEL_RTOL, f"junk {junk} in masked tokens")


# -- 7: errors from deep inside become messages --------------------------------------------------

def _sharded(tmp_path, official_sd, weight_map_of):
    d = _dit_dir(tmp_path, official_sd)
    (d / "diffusion_pytorch_model.safetensors").rename(d / "shard.safetensors")
    wm = weight_map_of(sorted(official_sd))
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return d


@pytest.mark.parametrize("weight_map_of,message", [
    (lambda keys: list(keys), "weight_map.* must map tensor names to shard files, got a list"),
    (lambda keys: {k: 1 for k in keys}, r"must map tensor names to shard file names \(strings\); 56 entries"),
    (lambda keys: {k: ["shard.safetensors"] for k in keys}, "are not"),
    (lambda keys: "shard.safetensors", "got a str"),
    (lambda keys: {}, "is empty"),
])
def test_index_weight_map_must_map_strings_to_strings(tmp_path, official_sd, weight_map_of, message):
    with pytest.raises(CheckpointError, match=message):
        lcn.LongCatDiT.from_pretrained(_sharded(tmp_path, official_sd, weight_map_of))


def test_index_that_is_not_an_object(tmp_path, official_sd):
    d = _sharded(tmp_path, official_sd, lambda keys: {k: "shard.safetensors" for k in keys})
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        lcn.LongCatDiT.from_pretrained(d)


@pytest.mark.parametrize("where", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_shards_outside_the_checkpoint_folder_are_refused(tmp_path, official_sd, where):
    d = _sharded(tmp_path, official_sd, lambda keys: {k: "shard.safetensors" for k in keys})
    outside = d.parent / "outside.safetensors"
    shutil.copy(d / "shard.safetensors", outside)  # a real file there: only the path is wrong
    name = str(outside) if where == "ABSOLUTE" else where
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: name for k in official_sd}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        lcn.LongCatDiT.from_pretrained(d)


def test_shard_symlinks_inside_the_folder_still_load(tmp_path, official_sd, t2v):
    """The Hugging Face cache links shards to blobs elsewhere: a link is not a path that leaves."""
    d = _sharded(tmp_path, official_sd, lambda keys: {k: "shard.safetensors" for k in keys})
    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    (d / "shard.safetensors").rename(blob)
    (d / "shard.safetensors").symlink_to(blob)
    _still_usable(lcn.LongCatDiT.from_pretrained(d, kernels="reference"), t2v)


META_INPUTS = ["hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask"]


@pytest.mark.parametrize("name", META_INPUTS)
def test_inputs_on_the_meta_device_are_value_errors(dit, t2v, name):
    inputs, _ = t2v
    with pytest.raises(ValueError, match=f"{name} is on the meta device"):
        dit(**dict(inputs, **{name: inputs[name].to("meta")}))
    _still_usable(dit, t2v)


def test_kv_cache_entries_must_be_real_tensors(dit, t2v):
    inputs, kv, _, m = load_case("kv_continue")
    x, t, text = inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"]
    bad = [
        ({0: ("k", "v"), 1: kv[1]}, r"kv_cache_dict\[0\]: k and v must be tensors"),
        ({0: (kv[0][0].to("meta"), kv[0][1]), 1: kv[1]}, r"kv_cache_dict\[0\] is on the meta device"),
        ({0: (kv[0][0].long(), kv[0][1].long()), 1: kv[1]}, "must be floating point"),
        ([kv[0], kv[1]], "kv_cache_dict must be a mapping"),
        ({i: kv[0] for i in range(5000)}, r"one \(k, v\) per block 0..1, got keys .*\.\.\. and 4980 more"),
    ]
    for cache, message in bad:
        with pytest.raises(ValueError, match=message):
            dit(x, t, text, inputs.get("encoder_attention_mask"), kv_cache_dict=cache)
    _still_usable(dit, t2v)


def test_enable_loras_none_is_a_value_error(dit, t2v):
    with pytest.raises(ValueError, match="enable_loras takes a list of loaded LoRA keys"):
        dit.enable_loras(None)
    with pytest.raises(ValueError, match="enable_loras takes a list"):
        dit.enable_loras(3)
    dit.enable_loras([])
    _still_usable(dit, t2v)


@pytest.mark.parametrize("nc", [np.int64(1), np.int32(1), torch.tensor(1)])
def test_num_cond_latents_accepts_integer_likes(dit, nc):
    inputs, _, expected, meta = load_case("i2v_cond1")
    assert meta["kwargs"]["num_cond_latents"] == 1
    out = dit(**dict(inputs, num_cond_latents=nc))
    assert_close_rel(out, expected["output"], MODEL_RTOL, f"num_cond_latents={nc!r}")
    for bad in (np.bool_(True), 1.0, torch.tensor(1.5), "1"):
        with pytest.raises(ValueError, match="num_cond_latents must be an int"):
            dit(**dict(inputs, num_cond_latents=bad))


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_steps=10**9), r"num_steps must be in \[1, 1000\], got 1000000000"),
    (dict(num_steps=0), r"num_steps must be in \[1, 1000\]"),
    (dict(num_steps=2.5), "num_steps must be a positive int"),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number, got inf"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
    (dict(guidance_scale="4"), "guidance_scale must be a finite number"),
    (dict(shift=float("inf")), "shift must be a finite number"),
])
def test_denoise_arguments_are_bounded_and_finite(dit, kwargs, message):
    from longcat_native.pipelines.sampler import denoise

    inputs, _, _, _ = load_case("sample_t2v_cfg")
    spy = _PoisonAt(dit, 10**6)
    args = dict(num_steps=2, guidance_scale=4.0, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        denoise(spy, inputs["noise"], inputs["prompt_embeds"], inputs["prompt_mask"], inputs["negative_embeds"],
                inputs["negative_mask"], **args)
    assert spy.calls == 0  # before any heavy work


def test_denoise_accepts_integer_like_steps(dit):
    from longcat_native.pipelines.sampler import denoise

    inputs, _, _, _ = load_case("sample_t2v_cfg")
    a = denoise(dit, inputs["noise"], inputs["prompt_embeds"], inputs["prompt_mask"], num_steps=np.int64(2),
                guidance_scale=1.0, progress=False)
    b = denoise(dit, inputs["noise"], inputs["prompt_embeds"], inputs["prompt_mask"], num_steps=2,
                guidance_scale=1.0, progress=False)
    assert torch.equal(a, b)


def test_denoise_meta_noise_is_a_value_error(dit):
    from longcat_native.pipelines.sampler import denoise

    inputs, _, _, _ = load_case("sample_t2v_cfg")
    with pytest.raises(ValueError, match="noise is on the meta device"):
        denoise(dit, inputs["noise"].to("meta"), inputs["prompt_embeds"], inputs["prompt_mask"], num_steps=2,
                guidance_scale=1.0, progress=False)
