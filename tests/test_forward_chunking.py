"""Forward chunking (``LongCatDiT.enable_forward_chunking``: the FFN in token slices, the qkv
projection + norm in whole-frame slices): the same outputs on both kernel paths, with
conditioning frames, KV caches and BSA, and under torch.compile; less activation memory at the
real shapes (traced); a clear error for a bad chunk size; a CUDA-graph key that tells chunked
from whole."""

import pytest
import torch
from helpers import KERNEL_RTOL, assert_close_rel

import longcat_native as lcn
from longcat_native.runtime.compiled import CUDAGraphRunner
from longcat_native.runtime.memory import trace_forward_memory


def _inputs(B=2, T=3, H=4, W=6, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, T, H, W, generator=g)
    t = torch.rand(B, generator=g) * 1000
    text = torch.randn(B, 1, L, 64, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 3:] = 0
    return x, t, text, mask


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("chunk", [1, 7, 18, 35, 36, 10**6])  # one row, ragged, one item, all, more
def test_chunked_ffn_matches_the_whole(kernels, chunk):
    """B * N = 2 * 18 token rows, sliced across the batch boundary and with a ragged last slice."""
    dit = lcn.LongCatDiT.from_config("tiny", kernels=kernels, seed=1)
    args = _inputs()
    with torch.no_grad():
        whole = dit(*args)
        dit.enable_forward_chunking(chunk)
        sliced = dit(*args)
        dit.disable_forward_chunking()
        again = dit(*args)
    assert_close_rel(sliced, whole, KERNEL_RTOL[torch.float32], f"chunk {chunk}")
    assert torch.equal(again, whole)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("chunk", [1, 13, 40])  # under a frame of the batch, two frames, all but one
def test_chunked_attention_with_conditioning_and_kv_caches(kernels, chunk):
    """The qkv slices are whole frames at their own RoPE offsets: conditioning frames (num_cond),
    a KV cache of earlier frames (t_offset = cache frames) and return_kv's un-rotated keys all match
    the unchunked forward."""
    dit = lcn.LongCatDiT.from_config("tiny", kernels=kernels, seed=3)
    x, t, text, mask = _inputs(T=4, seed=5)
    cond = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(9))
    results = []
    with torch.no_grad():
        for chunking in (False, True):
            if chunking:
                dit.enable_forward_chunking(chunk)
            out_nc = dit(x, t, text, mask, num_cond_latents=1)
            _, kv = dit(cond, torch.zeros(1), text[:1], mask[:1], return_kv=True, skip_crs_attn=True)
            out_kv = dit(x, t, text, mask, kv_cache_dict=kv)
            results.append((out_nc, kv, out_kv))
            dit.disable_forward_chunking()
    (a_nc, a_kv, a_out), (b_nc, b_kv, b_out) = results
    tol = KERNEL_RTOL[torch.float32]
    assert_close_rel(b_nc, a_nc, tol, "num_cond_latents")
    assert_close_rel(b_out, a_out, tol, "kv cache call")
    for i in a_kv:
        for name, p, q in zip("kv", a_kv[i], b_kv[i]):
            assert_close_rel(q, p, tol, f"return_kv block {i} {name}")


def test_chunked_attention_with_bsa_matches_the_whole():
    dit = lcn.LongCatDiT.from_config("tiny", kernels="reference", seed=2)
    dit.enable_bsa()
    x, t, text, mask = _inputs(B=1, T=8, H=16, W=16, seed=4)  # grid 8 x 8 x 8: tiles into the 2^3 chunks
    with torch.no_grad():
        whole = dit(x, t, text, mask)
        dit.enable_forward_chunking(100)
        sliced = dit(x, t, text, mask)
    assert_close_rel(sliced, whole, KERNEL_RTOL[torch.float32], "bsa")


def test_chunked_ffn_compiles_without_graph_breaks():
    dit = lcn.LongCatDiT.from_config("tiny", kernels="reference", seed=1)
    dit.enable_forward_chunking(50)
    args = _inputs()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(dit)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    with torch.no_grad():
        assert_close_rel(torch.compile(dit, fullgraph=True)(*args), dit(*args), 1e-5, "compiled chunked FFN")
    torch._dynamo.reset()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "16384", None])
def test_bad_chunk_size_is_a_value_error(bad):
    dit = lcn.LongCatDiT.from_config("tiny", kernels="reference")
    with pytest.raises(ValueError, match="chunk_size"):
        dit.enable_forward_chunking(bad)
    assert dit.ffn_chunk_tokens is None


def test_chunking_lowers_the_traced_peak_at_the_real_shapes():
    """The 13.6B model on fake tensors: the FFN's [N, 3F] live set goes and the whole [N, 3C] qkv
    with it, so the peak moves to the self-attention (x, q, k, v and its output) and drops from
    11.69 to 6.51 GiB at 720p (BSA) and from 5.19 to 3.02 GiB at 480p (batch 2)."""
    for latent, batch, bsa, whole_gib, sliced_gib in (((48, 88, 160), 1, True, 11.69, 6.51),
                                                       ((24, 60, 104), 2, False, 5.19, 3.02)):
        whole = trace_forward_memory("longcat-video", batch=batch, latent=latent, bsa=bsa)
        sliced = trace_forward_memory("longcat-video", batch=batch, latent=latent, bsa=bsa, ffn_chunk_tokens=16384)
        assert whole["activation_peak"] / 2**30 == pytest.approx(whole_gib, abs=0.01)
        assert sliced["activation_peak"] / 2**30 == pytest.approx(sliced_gib, abs=0.01)
        assert whole["trace"].peak_op == "longcat_native.swiglu"
        assert sliced["trace"].peak_op != "longcat_native.swiglu"


def test_graph_key_tells_chunked_from_whole():
    dit = lcn.LongCatDiT.from_config("tiny", kernels="reference")
    runner = CUDAGraphRunner(dit)
    x, t, text, mask = _inputs()
    inputs = {"hidden_states": x, "timestep": t, "encoder_hidden_states": text, "encoder_attention_mask": mask}
    whole = runner.key(inputs, 0, False)
    dit.enable_forward_chunking(64)
    assert runner.key(inputs, 0, False) != whole
