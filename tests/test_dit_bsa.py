"""Block-sparse self-attention inside the model: the official golden cases on both kernel paths,
the switch, the dense fallback for grids that do not tile, and the KV-cache path."""

import warnings

import pytest
import torch
from cases import FIXTURE_ROOT, load_case
from helpers import MODEL_RTOL, assert_close_rel

import longcat_native as lcn


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("name", ["bsa_t2v", "bsa_cond"])
def test_bsa_cases_match_official(name, kernels):
    inputs, _, expected, meta = load_case(name)
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels=kernels)
    dit.enable_bsa()
    with torch.inference_mode():
        out = dit(**inputs, **meta["kwargs"])
    assert_close_rel(out, expected["output"], MODEL_RTOL, f"{name} {kernels}")


def test_enable_disable_and_config_key():
    inputs, _, expected, meta = load_case("bsa_t2v")
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    dense = dit(**inputs)
    dit.enable_bsa()
    assert dit.config.enable_bsa
    sparse = dit(**inputs)
    # The fixture's sparsity 0.5 changes the output by ~1e-3 of its scale: enough to tell apart.
    assert (sparse - dense).abs().max() > 10 * MODEL_RTOL * expected["output"].abs().max()
    dit.disable_bsa()
    assert torch.equal(dit(**inputs), dense)
    from_config = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference", enable_bsa=True)
    assert_close_rel(from_config(**inputs), expected["output"], MODEL_RTOL, "enable_bsa=True in config")


def test_single_frame_latent_stays_dense():
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    x, t, text = torch.randn(1, 16, 1, 8, 8), torch.tensor([700.0]), torch.randn(1, 1, 4, 64)
    dense = dit(x, t, text)
    dit.enable_bsa()
    assert torch.equal(dit(x, t, text), dense)  # the official rule: BSA only when T > 1


def test_grid_that_does_not_tile_falls_back_to_dense_with_a_warning():
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    x, t, text = torch.randn(1, 16, 3, 8, 12), torch.tensor([700.0]), torch.randn(1, 1, 4, 64)
    dense = dit(x, t, text)  # T = 3 frames: the 2x2x2 chunks do not tile it
    dit.enable_bsa()
    with pytest.warns(UserWarning, match="do not tile"):
        out = dit(x, t, text)
    assert torch.equal(out, dense)


def test_kv_cache_continuation_with_bsa_equals_single_forward():
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    dit.enable_bsa()
    m, T = 2, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, m + T, 8, 8, generator=g)
    text = torch.randn(1, 1, 5, 64, generator=g)
    t_noisy = torch.rand(1, T, generator=g) * 1000
    full = dit(x, torch.cat([torch.zeros(1, m), t_noisy], 1), text, num_cond_latents=m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every grid here tiles: no dense fallback
        _, cache = dit(x[:, :, :m], torch.zeros(1), None, return_kv=True, skip_crs_attn=True)
        cont = dit(x[:, :, m:], t_noisy, text, num_cond_latents=m, kv_cache_dict=cache)
    assert_close_rel(cont, full[:, :, m:], MODEL_RTOL, "BSA continuation")


def test_bsa_model_compiles_without_graph_breaks():
    inputs, _, expected, _ = load_case("bsa_t2v")
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels="reference")
    dit.enable_bsa()
    explanation = torch._dynamo.explain(dit)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert_close_rel(torch.compile(dit, fullgraph=True)(**inputs), expected["output"], MODEL_RTOL, "compiled BSA")


def test_bsa_implementation_follows_the_attention_backend(monkeypatch):
    """BSA is an attention backend: the Triton kernel with the fused kernels, and on CUDA also
    for the reference kernel path (the dense masked oracle needs ~470 TFLOP per block at 720p),
    unless attention='reference' asks for the oracle."""
    from longcat_native.runtime.dit import bsa_kernel_path

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert bsa_kernel_path("triton", cpu, "sdpa") == "triton"
    assert bsa_kernel_path("triton", cuda, "reference") == "triton"
    assert bsa_kernel_path("reference", cuda, "flash3") == "triton"
    assert bsa_kernel_path("reference", cuda, "sdpa") == "triton"
    assert bsa_kernel_path("reference", cuda, "reference") == "reference"
    assert bsa_kernel_path("reference", cpu, "sdpa") == "reference"

    inputs, _, _, meta = load_case("bsa_t2v")
    for kernels in ("reference", "triton"):
        dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, kernels=kernels)
        dit.enable_bsa()
        ops = dit.resolved_ops()
        assert ops.bsa == kernels and ops.block_sparse_attention.keywords == {"impl": kernels}, (kernels, ops.bsa)
        seen = []
        spy = ops._replace(block_sparse_attention=lambda *a, _f=ops.block_sparse_attention, **kw: seen.append(1) or _f(*a, **kw))
        monkeypatch.setattr(dit, "resolved_ops", lambda: spy)
        dit(**inputs, **meta["kwargs"])
        assert seen, f"kernels={kernels}: the forward did not run block-sparse attention"
