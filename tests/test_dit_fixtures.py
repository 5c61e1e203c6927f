"""Every forward case of the official golden data through the public API, float32, CPU.

Bound: max abs error <= 1e-4 of the expected output's largest magnitude (the fixture README's
tolerance; the official outputs used float64 attention, we use float32 throughout).
"""

import pytest
import torch
from cases import FIXTURE_ROOT, FORWARD_CASES, load_case
from helpers import MODEL_RTOL, assert_close_rel, max_rel_err
from official_math import official_forward
from safetensors.torch import load_file

import longcat_native as lcn
from longcat_native.runtime.model import timestep_features


def _run_case(dit, name):
    inputs, kv, expected, meta = load_case(name)
    kwargs = dict(meta.get("kwargs", {}))
    if kv is not None:
        kwargs["kv_cache_dict"] = kv
    with torch.inference_mode():
        result = dit(**inputs, **kwargs)
    return result, expected, kwargs


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
@pytest.mark.parametrize("name", FORWARD_CASES)
def test_forward_case_matches_official(name, attention):
    _, _, _, meta = load_case(name)
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, dtype=torch.float32, device="cpu", kernels="reference",
                                         attention=attention, **meta.get("config_overrides", {}))
    result, expected, kwargs = _run_case(dit, name)
    if kwargs.get("return_kv"):
        out, kv = result
        assert sorted(kv) == sorted(expected["kv"])
        for b, (k, v) in kv.items():
            ek, ev = expected["kv"][b]
            assert_close_rel(k, ek, MODEL_RTOL, f"{name} block {b} k")
            assert_close_rel(v, ev, MODEL_RTOL, f"{name} block {b} v")
    else:
        out = result
    assert out.dtype == torch.float32
    assert_close_rel(out, expected["output"], MODEL_RTOL, name)


@pytest.mark.parametrize("name", FORWARD_CASES)
def test_test_oracle_matches_official(name):
    """tests/official_math.py reproduces the official outputs too, so it can stand in for the
    official model on configurations the golden data does not cover."""
    inputs, kv, expected, meta = load_case(name)
    import json

    cfg = json.loads((FIXTURE_ROOT / "dit" / "config.json").read_text())
    cfg.update(meta.get("config_overrides", {}))
    sd = load_file(str(FIXTURE_ROOT / "dit" / "diffusion_pytorch_model.safetensors"))
    kw = meta.get("kwargs", {})
    result = official_forward(
        sd, cfg, inputs["hidden_states"], inputs["timestep"], inputs.get("encoder_hidden_states"),
        inputs.get("encoder_attention_mask"), num_cond_latents=kw.get("num_cond_latents", 0),
        skip_crs_attn=kw.get("skip_crs_attn", False), kv_cache=kv, return_kv=kw.get("return_kv", False))
    out = result[0] if isinstance(result, tuple) else result
    assert max_rel_err(out, expected["output"]) <= 1e-5, name


def test_timestep_features_match_official():
    _, _, expected, _ = load_case("op_timestep_features")
    inputs, _, _, _ = load_case("op_timestep_features")
    # 2.9e-5 here: at t = 999 the float32 angle itself is only good to ~6e-5 rad, and the
    # official file differs from the float64 truth by 3.1e-5, so the fixture bound applies.
    assert_close_rel(timestep_features(inputs["t"]), expected["features"], MODEL_RTOL, "timestep features")


def test_default_kernels_on_cpu_is_reference_and_matches():
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT)  # all defaults: cpu, float32, auto, auto
    assert dit.device.type == "cpu" and dit.dtype == torch.float32
    assert dit.resolved_kernels() == "reference"
    out, expected, _ = _run_case(dit, "t2v_mask")
    assert_close_rel(out, expected["output"], MODEL_RTOL, "defaults")
