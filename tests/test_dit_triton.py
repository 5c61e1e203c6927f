"""The model's fused path (kernels="triton"; the triton interpreter on CPU): every forward case
of the golden data in float32, and fused vs reference path on configurations the data lacks."""

import pytest
import torch
from cases import FIXTURE_ROOT, FORWARD_CASES, load_case
from helpers import KERNEL_RTOL, MODEL_RTOL, assert_close_rel

import longcat_native as lcn


def _run(dit, name):
    inputs, kv, expected, meta = load_case(name)
    kwargs = dict(meta.get("kwargs", {}))
    if kv is not None:
        kwargs["kv_cache_dict"] = kv
    with torch.inference_mode():
        return dit(**inputs, **kwargs), expected


@pytest.mark.parametrize("name", FORWARD_CASES)
def test_forward_case_matches_official_fused(name):
    _, _, _, meta = load_case(name)
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="triton", **meta.get("config_overrides", {}))
    assert dit.resolved_kernels() == "triton"
    result, expected = _run(dit, name)
    if isinstance(result, tuple):
        result, kv = result
        for b, (k, v) in kv.items():
            assert_close_rel(k, expected["kv"][b][0], MODEL_RTOL, f"{name} k{b}")
            assert_close_rel(v, expected["kv"][b][1], MODEL_RTOL, f"{name} v{b}")
    assert_close_rel(result, expected["output"], MODEL_RTOL, name)


@pytest.mark.parametrize("cfg", [dict(hidden_size=48, num_heads=2, depth=2), dict(hidden_size=72, num_heads=3, depth=1),
                                 dict(hidden_size=128, num_heads=1, depth=1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_path_matches_reference_path(cfg, dtype):
    """Same weights, same inputs: the fused path stays within the kernel tolerance of the
    reference path run in the same dtype (bf16 needs a GPU: the interpreter gets bf16 wrong)."""
    ref = lcn.LongCatDiT.from_config("tiny", seed=3, dtype=dtype, kernels="reference", caption_channels=24, **cfg)
    fused = lcn.LongCatDiT.from_config("tiny", seed=3, dtype=dtype, kernels="triton", caption_channels=24, **cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 4, 6, generator=g)
    t = torch.rand(2, 3, generator=g) * 1000
    text = torch.randn(2, 1, 5, 24, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for kw in (dict(), dict(num_cond_latents=1), dict(skip_crs_attn=True)):
        a = ref(x, t, text, mask, **kw)
        b = fused(x, t, text, mask, **kw)
        # Both outputs are float32; the gap is dominated by dtype rounding of the activations,
        # so fp16 gets its activation tolerance, not the fp32 one.
        rtol = KERNEL_RTOL[dtype] * (10 if dtype == torch.float32 else 1)
        assert_close_rel(b, a, rtol, f"{cfg} {dtype} {kw}")


def test_compiled_fused_model_matches_eager():
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="triton")
    inputs, _, expected, _ = load_case("t2v_mask")
    out = torch.compile(dit, fullgraph=True)(**inputs)
    assert_close_rel(out, expected["output"], MODEL_RTOL, "compiled fused")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    dit = lcn.LongCatDiT.from_config("tiny", kernels="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="kernels='triton' needs the model on a CUDA device"):
        dit(torch.randn(1, 16, 1, 2, 2), torch.tensor([1.0]), torch.randn(1, 1, 2, 64))
