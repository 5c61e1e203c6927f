"""Block-sparse attention: the official fixtures, and the Triton kernels against the plain-PyTorch
oracle (dense float32 attention with an explicit chunk mask), on CPU with the triton interpreter.

The interpreter is slow (~1 ms per tl.dot), so shapes are small. Selections are compared in
float32 only: fp16 rounding of pooled scores legitimately flips near-tie selections, so the fp16
runs are fed the float32 selection.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from cases import load_case
from helpers import DEVICE, KERNEL_RTOL, MODEL_RTOL, assert_close_rel, randn, requires_cuda
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_native.kernels import _common
from longcat_native.kernels import block_sparse_attention as bsa_mod, bsa_select as bsa_select_mod
from longcat_native.kernels.block_sparse_attention import (
    _bsa_attention_launch,
    _geometry,
    block_sparse_attention,
    block_sparse_attention_reference,
    bsa_from_chunk_order,
    bsa_grid_tiles,
    bsa_mask_to_indices,
    bsa_masked_attention_reference,
    bsa_select,
    bsa_select_reference,
    bsa_selection_mask,
    bsa_sparse_attention,
    bsa_to_chunk_order,
)

BSA_CASES = ["bsa_op_topk", "bsa_op_cdf", "bsa_op_cdf_topk", "bsa_op_tq_lt_tk"]


def _case(name):
    inputs, _, expected, meta = load_case(name)
    kw = meta["kwargs"]
    q, k, v = (inputs[n].to(DEVICE) for n in ("q", "k", "v"))
    return q, k, v, kw, expected["output"].to(DEVICE), expected["selected"].to(DEVICE).bool()


def _sel_args(kw):
    return (kw["latent_shape_q"], kw["latent_shape_k"], kw["sparsity"], kw["cdf_threshold"],
            kw["chunk_3d_shape_q"], kw["chunk_3d_shape_k"])


def _n_chunks(grid, chunk):
    return math.prod(g // c for g, c in zip(grid, chunk))


def _rand(shape, dtype=torch.float32, seed=0, scale=1.0):
    return randn(*shape, seed=seed, dtype=dtype, mul=scale)


def _expected_masked(q, k, v, grid_q, grid_k, chunk_q, chunk_k, block_mask):
    """Oracle in float32 (raster in, raster out) for an explicit chunk mask."""
    qc = bsa_to_chunk_order(q.float(), grid_q, chunk_q)
    kc, vc = (bsa_to_chunk_order(x.float(), grid_k, chunk_k) for x in (k, v))
    o = bsa_masked_attention_reference(qc, kc, vc, block_mask, math.prod(chunk_q), math.prod(chunk_k))
    return bsa_from_chunk_order(o, grid_q, chunk_q)


def _random_mask(B, H, n_q, n_k, seed, p=0.4, empty_rows=True):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, H, n_q, n_k, generator=g) < p
    if empty_rows and n_q > 1:
        m[0, 0, 1] = False  # a query chunk that attends nothing: zero output
    return m.to(DEVICE)


# --- the official fixtures ---------------------------------------------------------------------


@pytest.mark.parametrize("case", BSA_CASES)
def test_fixture_fp32(case):
    q, k, v, kw, expected, selected = _case(case)
    idx, counts = bsa_select(q, k, *_sel_args(kw))
    n_k = selected.shape[-1]
    assert torch.equal(bsa_selection_mask(idx, counts, n_k), selected), "selection differs from the official"
    out = block_sparse_attention(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert_close_rel(out, expected, MODEL_RTOL, f"{case} triton fp32")


@pytest.mark.parametrize("case", BSA_CASES)
def test_fixture_reference(case):
    q, k, v, kw, expected, selected = _case(case)
    out, mask = block_sparse_attention_reference(q, k, v, **kw, return_mask=True)
    assert torch.equal(mask, selected)
    assert_close_rel(out, expected, MODEL_RTOL, f"{case} reference")
    assert_close_rel(block_sparse_attention(q, k, v, **kw, impl="reference"), expected, MODEL_RTOL, "impl=reference")
    idx, counts = bsa_select_reference(q, k, *_sel_args(kw))
    assert torch.equal(bsa_selection_mask(idx, counts, mask.shape[-1]), selected)


@pytest.mark.parametrize("case", ["bsa_op_cdf", "bsa_op_tq_lt_tk"])
def test_fixture_fp16_with_fp32_selection(case):
    q, k, v, kw, expected, selected = _case(case)
    idx, counts = bsa_mask_to_indices(selected)
    half = [x.half() for x in (q, k, v)]
    out = bsa_sparse_attention(*half, idx, counts, kw["latent_shape_q"], kw["latent_shape_k"],
                               kw["chunk_3d_shape_q"], kw["chunk_3d_shape_k"])
    assert out.dtype == torch.float16
    assert_close_rel(out, expected, KERNEL_RTOL[torch.float16], f"{case} fp16")


# --- the kernel against the oracle with an explicit chunk mask ---------------------------------

# (B, H, D, grid_q, grid_k, chunk_q, chunk_k, dtype)
KERNEL_CONFIGS = [
    (1, 2, 32, (2, 4, 4), (2, 4, 4), (2, 2, 2), (2, 2, 2), torch.float32),
    (2, 1, 64, (2, 4, 4), (4, 4, 4), (1, 2, 4), (2, 2, 2), torch.float32),  # Tq < Tk, chunk shapes differ
    (1, 2, 48, (2, 4, 6), (2, 4, 6), (1, 4, 3), (2, 2, 3), torch.float32),  # head_dim 48 (padded), 12-token chunks
    (1, 1, 16, (2, 8, 16), (2, 8, 16), (2, 8, 8), (2, 4, 8), torch.float32),  # 128/64-token chunks: several tiles each
    (1, 2, 32, (2, 4, 4), (4, 4, 4), (2, 2, 2), (2, 2, 4), torch.float16),
    (1, 1, 128, (1, 4, 4), (1, 4, 4), (1, 2, 4), (1, 2, 2), torch.float16),  # head_dim 128
]


@pytest.mark.parametrize("i", range(len(KERNEL_CONFIGS)),
                         ids=[f"B{c[0]}H{c[1]}D{c[2]}q{c[3]}k{c[4]}cq{c[5]}ck{c[6]}{str(c[7])[6:]}" for c in KERNEL_CONFIGS])
def test_kernel_vs_masked_reference(i):
    cfg = KERNEL_CONFIGS[i]
    B, H, D, grid_q, grid_k, chunk_q, chunk_k, dtype = cfg
    seed = 1000 + 10 * i
    q = _rand((B, H, math.prod(grid_q), D), dtype, seed)
    k = _rand((B, H, math.prod(grid_k), D), dtype, seed + 1)
    v = _rand((B, H, math.prod(grid_k), D), dtype, seed + 2)
    mask = _random_mask(B, H, _n_chunks(grid_q, chunk_q), _n_chunks(grid_k, chunk_k), seed)
    idx, counts = bsa_mask_to_indices(mask)
    out = bsa_sparse_attention(q, k, v, idx, counts, grid_q, grid_k, chunk_q, chunk_k)
    assert out.dtype == dtype
    assert_close_rel(out, _expected_masked(q, k, v, grid_q, grid_k, chunk_q, chunk_k, mask), KERNEL_RTOL[dtype], str(cfg))
    # the query chunk with no selected key chunk is exactly zero
    empty = ~mask.any(-1)
    rows = bsa_to_chunk_order(out, grid_q, chunk_q).unflatten(2, (-1, math.prod(chunk_q)))[empty]
    assert rows.numel() > 0 and torch.all(rows == 0)


@settings(max_examples=6, deadline=None)
@given(
    grid_q=st.tuples(st.sampled_from([1, 2]), st.sampled_from([2, 4]), st.sampled_from([2, 4, 6])),
    extra_t=st.sampled_from([0, 2]),
    chunk_q=st.tuples(st.just(1), st.sampled_from([1, 2]), st.sampled_from([1, 2])),
    chunk_k=st.tuples(st.just(1), st.sampled_from([1, 2]), st.sampled_from([2])),
    D=st.sampled_from([16, 32, 40]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    p=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_kernel(grid_q, extra_t, chunk_q, chunk_k, D, dtype, p, seed):
    grid_k = (grid_q[0] + extra_t, grid_q[1], grid_q[2])
    q = _rand((1, 2, math.prod(grid_q), D), dtype, seed)
    k = _rand((1, 2, math.prod(grid_k), D), dtype, seed + 1)
    v = _rand((1, 2, math.prod(grid_k), D), dtype, seed + 2)
    mask = _random_mask(1, 2, _n_chunks(grid_q, chunk_q), _n_chunks(grid_k, chunk_k), seed, p=p, empty_rows=False)
    idx, counts = bsa_mask_to_indices(mask)
    out = bsa_sparse_attention(q, k, v, idx, counts, grid_q, grid_k, chunk_q, chunk_k)
    assert_close_rel(out, _expected_masked(q, k, v, grid_q, grid_k, chunk_q, chunk_k, mask), KERNEL_RTOL[dtype],
                     f"{grid_q} {grid_k} {chunk_q} {chunk_k} D={D} {dtype} p={p}")


def test_outputs_poisoned_before_launch_and_int64_path():
    grid, chunk = (2, 4, 4), (2, 2, 2)
    q, k, v = (_rand((2, 2, 32, 32), torch.float32, s) for s in (40, 41, 42))
    mask = _random_mask(2, 2, 4, 4, 43)
    idx, counts = bsa_mask_to_indices(mask)
    geom = _geometry(grid, chunk)
    expected = _expected_masked(q, k, v, grid, grid, chunk, chunk, mask)
    for force in (False, True):
        out = torch.full_like(q, float("nan"))
        _bsa_attention_launch(q, k, v, idx, counts, geom, geom, out, 32 ** -0.5, _force_int64=force)
        assert_close_rel(out, expected, KERNEL_RTOL[torch.float32], f"int64={force}")


def test_strided_inputs_and_output_layout():
    """q, k, v as [B, H, N, D] views of a [B, N, 3, H, D] qkv buffer; the output comes back
    [B, N, H, D]-contiguous so ``o.transpose(1, 2)`` flattens without a copy."""
    grid, chunk, H, D = (2, 4, 4), (2, 2, 2), 2, 32
    qkv = _rand((1, 32, 3, H, D), torch.float32, 50)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    out = block_sparse_attention(q, k, v, grid, grid, 0.5, None, chunk, chunk)
    assert out.transpose(1, 2).is_contiguous()
    ref = block_sparse_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), grid, grid, 0.5, None,
                                           chunk, chunk)
    assert_close_rel(out, ref, KERNEL_RTOL[torch.float32], "strided")


# --- selection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity,cdf", [(0.75, None), (None, 0.5), (0.75, 0.9), (0.0, None)])
def test_selection_matches_reference(sparsity, cdf):
    grid_q, grid_k, chunk_q, chunk_k = (2, 4, 4), (4, 4, 4), (1, 2, 2), (2, 2, 2)
    q = _rand((2, 2, 32, 16), torch.float32, 60)
    k = _rand((2, 2, 64, 16), torch.float32, 61)
    args = (grid_q, grid_k, sparsity, cdf, chunk_q, chunk_k)
    idx, counts = bsa_select(q, k, *args)
    ridx, rcounts = bsa_select_reference(q, k, *args)
    assert idx.dtype == counts.dtype == torch.int32 and idx.device == q.device
    assert torch.equal(counts, rcounts)
    assert torch.equal(bsa_selection_mask(idx, counts, 8), bsa_selection_mask(ridx, rcounts, 8))
    if sparsity is not None:
        assert int(counts.min()) >= int((1 - sparsity) * 8)


def _official_select_mask(q_pool, k_pool, sparsity, cdf_threshold):
    """The official get_select_indices with its full sort (as written upstream), as a mask."""
    score = q_pool @ k_pool.transpose(-1, -2)
    n_k = score.shape[-1]
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if cdf_threshold is None:
        return mask.scatter(-1, torch.topk(score, int((1 - sparsity) * n_k))[1], True)
    weights = torch.softmax(score * q_pool.shape[-1] ** -0.5, dim=-1)
    w_sorted = torch.sort(weights, dim=-1, descending=True)
    cdf = torch.cumsum(w_sorted.values, dim=-1)
    thr = torch.full(score.shape[:-1] + (1,), cdf_threshold, device=score.device)
    num = torch.searchsorted(cdf, thr, right=True)
    if sparsity is not None:
        num[num < int((1 - sparsity) * n_k)] = int((1 - sparsity) * n_k)
    return mask.scatter(-1, w_sorted.indices, torch.arange(n_k, device=score.device) < num)


@pytest.mark.parametrize("sparsity,cdf", [(0.5, None), (None, 0.3), (None, 0.9), (None, 1.0), (0.75, 0.6)])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_selection_rule_matches_official_full_sort(sparsity, cdf, temperature):
    """The bounded top-k of the cdf rule selects what the official full sort selects, from
    flat to peaked chunk-weight distributions (the score temperature)."""
    q_pool = _rand((2, 3, 7, 16), torch.float32, 65, scale=temperature)
    k_pool = _rand((2, 3, 40, 16), torch.float32, 66)
    idx, counts = bsa_mod.bsa_select_from_pooled(q_pool, k_pool, sparsity, cdf, 16 ** -0.5)
    assert torch.equal(bsa_selection_mask(idx, counts, 40), _official_select_mask(q_pool, k_pool, sparsity, cdf))


def test_selection_head_groups(monkeypatch):
    """Large grids select heads in groups (bounded score memory); same result."""
    grid, chunk = (2, 4, 4), (1, 2, 2)
    q, k = _rand((1, 4, 32, 16), torch.float32, 67), _rand((1, 4, 32, 16), torch.float32, 68)
    for sparsity, cdf in ((0.5, None), (None, 0.5)):
        whole = bsa_select(q, k, grid, grid, sparsity, cdf, chunk, chunk)
        monkeypatch.setattr(bsa_select_mod, "_SELECT_SCORE_ELEMS", 2 * 8 * 8 + 1)  # 2 heads per group
        grouped = bsa_select(q, k, grid, grid, sparsity, cdf, chunk, chunk)
        monkeypatch.undo()
        assert torch.equal(whole[0], grouped[0]) and torch.equal(whole[1], grouped[1])


def test_reference_attention_query_slices(monkeypatch):
    """The oracle processes query rows in slices (bounded score memory at 720p): slices that
    cut through chunks give the one-shot masked softmax, including empty chunks' zero rows."""
    B, H, n_q, n_k, cs_q, cs_k, D = 2, 3, 5, 4, 6, 4, 16
    q = _rand((B, H, n_q * cs_q, D), torch.float32, 80)
    k, v = _rand((B, H, n_k * cs_k, D), torch.float32, 81), _rand((B, H, n_k * cs_k, D), torch.float32, 82)
    mask = _random_mask(B, H, n_q, n_k, 83)
    tok = mask.repeat_interleave(cs_q, dim=2).repeat_interleave(cs_k, dim=3)
    s = (q @ k.transpose(-1, -2) * D ** -0.5).masked_fill(~tok, float("-inf"))
    expected = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0) @ v
    for rows in (1, 4, 7, n_q * cs_q):  # 4 and 7 rows per slice cut through chunks of 6
        monkeypatch.setattr(_common, "REFERENCE_SCORE_BYTES", B * H * n_k * cs_k * 4 * rows)
        out = bsa_masked_attention_reference(q, k, v, mask, cs_q, cs_k)
        assert_close_rel(out, expected, KERNEL_RTOL[torch.float32], f"{rows} rows per slice")
        assert torch.equal(out[0, 0, cs_q : 2 * cs_q], torch.zeros_like(out[0, 0, :cs_q]))  # the empty chunk


def test_chunk_order_rearrange():
    """The official rearrange the oracle uses: grid (1, 2, 4), chunks (1, 2, 2): raster 0 1 2 3 /
    4 5 6 7 -> chunk 0 = 0 1 4 5, chunk 1 = 2 3 6 7; and back."""
    x = torch.arange(8.0).view(1, 1, 8, 1)
    assert bsa_to_chunk_order(x, (1, 2, 4), (1, 2, 2)).flatten().tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    y = _rand((2, 3, 96, 4), torch.float32, 71)
    assert torch.equal(bsa_from_chunk_order(bsa_to_chunk_order(y, (4, 6, 4), (2, 3, 2)), (4, 6, 4), (2, 3, 2)), y)


def test_mask_indices_roundtrip():
    mask = _random_mask(2, 3, 5, 7, 70)
    idx, counts = bsa_mask_to_indices(mask)
    assert torch.equal(bsa_selection_mask(idx, counts, 7), mask)


# --- operator-level properties -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sparsity_zero_is_dense(dtype):
    grid_q, grid_k, chunk_q, chunk_k = (2, 4, 4), (4, 4, 4), (2, 2, 2), (2, 2, 4)
    q = _rand((1, 2, 32, 32), dtype, 80)
    k = _rand((1, 2, 64, 32), dtype, 81)
    v = _rand((1, 2, 64, 32), dtype, 82)
    out = block_sparse_attention(q, k, v, grid_q, grid_k, 0.0, None, chunk_q, chunk_k)
    dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert_close_rel(out, dense, KERNEL_RTOL[dtype], f"sparsity 0 {dtype}")


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    grid_q, grid_k, chunk = (2, 4, 4), (4, 4, 4), (2, 2, 2)

    def fn(q, k, v):
        o = block_sparse_attention(q * 1.5, k, v, grid_q, grid_k, 0.5, None, chunk, chunk)
        return o.transpose(1, 2).flatten(2) + 1.0

    q = _rand((1, 2, 32, 16), torch.float32, 100)
    k = _rand((1, 2, 64, 16), torch.float32, 101)
    v = _rand((1, 2, 64, 16), torch.float32, 102)
    got = torch.compile(fn, fullgraph=True)(q, k, v)
    assert_close_rel(got, fn(q, k, v), KERNEL_RTOL[torch.float32], "compiled vs eager")


def test_errors():
    q = _rand((1, 1, 32, 16), torch.float32, 110)
    with pytest.raises(ValueError, match="tile"):
        block_sparse_attention(q, q, q, (2, 4, 4), (2, 4, 4), 0.5, None, (2, 3, 2), (2, 2, 2))
    with pytest.raises(ValueError, match="tile"):
        block_sparse_attention(q, q, q, (2, 4, 4), (2, 4, 4), 0.5, None, (2, 2, 2), (4, 2, 2), impl="reference")
    assert not bsa_grid_tiles((3, 4, 4), (2, 2, 2)) and bsa_grid_tiles((4, 4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="sparsity or cdf_threshold"):
        block_sparse_attention(q, q, q, (2, 4, 4), (2, 4, 4), None, None, (2, 2, 2), (2, 2, 2))
    with pytest.raises(ValueError, match="selects no chunk"):
        block_sparse_attention(q, q, q, (2, 4, 4), (2, 4, 4), 0.9, None, (2, 2, 2), (2, 2, 2))
    with pytest.raises(ValueError, match="tokens"):
        block_sparse_attention(q, q, q, (2, 4, 2), (2, 4, 4), 0.5, None, (2, 2, 2), (2, 2, 2))
    big = _rand((1, 1, 8, 272), torch.float32, 111)
    with pytest.raises(ValueError, match="head_dim"):
        block_sparse_attention(big, big, big, (1, 2, 4), (1, 2, 4), 0.0, None, (1, 2, 2), (1, 2, 2))


def test_registered_ops():
    assert hasattr(torch.ops.longcat_native, "bsa_select") and hasattr(torch.ops.longcat_native, "bsa_attention")
    assert bsa_mod.block_sparse_attention.__module__ == "longcat_native.kernels.block_sparse_attention"


# --- CUDA ------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("chunks", [((4, 4, 4), (4, 4, 4)), ((4, 4, 8), (4, 4, 8)), ((2, 4, 8), (4, 4, 8))], ids=str)
def test_bf16_cuda(D, chunks):
    chunk_q, chunk_k = chunks
    grid_q, grid_k = (4, 8, 16), (8, 8, 16)
    q, k, v = (_rand((2, 4, math.prod(g), D), torch.bfloat16, s) for g, s in ((grid_q, 120), (grid_k, 121), (grid_k, 122)))
    idx, counts = bsa_select(q.float(), k.float(), grid_q, grid_k, 0.75, None, chunk_q, chunk_k)
    out = bsa_sparse_attention(q, k, v, idx, counts, grid_q, grid_k, chunk_q, chunk_k)
    mask = bsa_selection_mask(idx, counts, _n_chunks(grid_k, chunk_k))
    assert_close_rel(out, _expected_masked(q, k, v, grid_q, grid_k, chunk_q, chunk_k, mask), KERNEL_RTOL[torch.bfloat16], "bf16")
    full = block_sparse_attention(q, k, v, grid_q, grid_k, 0.75, None, chunk_q, chunk_k)
    assert full.dtype == torch.bfloat16 and torch.isfinite(full).all()


@requires_cuda
def test_fixtures_cuda_fp16():
    for case in BSA_CASES:
        q, k, v, kw, expected, selected = _case(case)
        idx, counts = bsa_select(q, k, *_sel_args(kw))
        assert torch.equal(bsa_selection_mask(idx, counts, selected.shape[-1]), selected)
        assert_close_rel(block_sparse_attention(q, k, v, **kw), expected, MODEL_RTOL, case)
