"""qk_rmsnorm_rope3d: the fused Triton kernel against the float32 reference (interpreter on CPU)."""

import json

import pytest
import torch
from helpers import CPU_DTYPES, DEVICE, KERNEL_RTOL, NAN, assert_close_rel, requires_cuda
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from longcat_native.kernels.qk_rmsnorm_rope3d import (
    _qk_rmsnorm_rope3d_launch,
    qk_rmsnorm_rope3d,
    qk_rmsnorm_rope3d_reference,
    rope3d_split,
)

HEAD_DIMS = [8, 16, 24, 32, 40, 64, 72, 128]


def _qkv(B, N, heads, D, dtype, seed=0, scale=1.0):
    """Strided q, k views of a fused qkv GEMM output, as the model passes them (row stride 3C)."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, N, 3 * heads * D, generator=g) * scale).to(device=DEVICE, dtype=dtype)
    q, k, _ = qkv.view(B, N, 3, heads, D).unbind(2)
    return q, k


def _weights(D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 1000)
    qw = (1.0 + 0.5 * torch.randn(D, generator=g)).to(device=DEVICE, dtype=dtype)
    kw = (1.0 + 0.5 * torch.randn(D, generator=g)).to(device=DEVICE, dtype=dtype)
    return qw, kw


def _f32(x):
    return None if x is None else x.float()


def _expected(q, k, qw, kw, grid, t_offset=0, return_k_unroped=True):
    """Reference in float32 from the same (already rounded) inputs."""
    return qk_rmsnorm_rope3d_reference(_f32(q), _f32(k), _f32(qw), _f32(kw), grid, t_offset,
                                       return_k_unroped=return_k_unroped)


def _check(outs, exps, dtype, what):
    assert len(outs) == len(exps), what
    for name, out, exp in zip(("q_out", "k_out", "k_unroped"), outs, exps):
        if exp is None:
            assert out is None, f"{what} {name}"
            continue
        assert out.dtype == dtype, f"{what} {name}: {out.dtype}"
        assert out.is_contiguous(), f"{what} {name}"
        assert_close_rel(out, exp, KERNEL_RTOL[dtype], f"{what} {name}")


def _run_and_check(q, k, qw, kw, grid, t_offset=0, what=""):
    dtype = (q if q is not None else k).dtype
    outs = qk_rmsnorm_rope3d(q, k, qw, kw, grid, t_offset, return_k_unroped=True)
    _check(outs, _expected(q, k, qw, kw, grid, t_offset), dtype, what)
    return outs


def _n(grid):
    return grid[0] * grid[1] * grid[2]


# --- shapes, dtypes, positions -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims(D, dtype):
    grid = (3, 2, 4)
    q, k = _qkv(2, _n(grid), 3, D, dtype, seed=D)
    qw, kw = _weights(D, dtype, seed=D)
    assert not q.is_contiguous() and q.stride(1) == 3 * 3 * D
    _run_and_check(q, k, qw, kw, grid, t_offset=2, what=f"D={D} {dtype}")


@pytest.mark.parametrize("t_offset", [0, 2])
@pytest.mark.parametrize("grid", [(1, 2, 2), (3, 2, 4), (2, 6, 4)], ids=str)
@pytest.mark.parametrize("heads", [1, 3, 4])
def test_heads_grids_offsets(heads, grid, t_offset):
    D = 24
    q, k = _qkv(2, _n(grid), heads, D, torch.float32, seed=heads + 7 * t_offset)
    qw, kw = _weights(D, torch.float32, seed=heads)
    _run_and_check(q, k, qw, kw, grid, t_offset, what=f"heads={heads} grid={grid} t0={t_offset}")


def test_t_offset_is_the_tail_of_a_longer_grid():
    """KV-cache path: q over the last T frames of an (m + T)-frame grid at t_offset=m gets the same
    rotation as those tokens get when the whole grid is processed."""
    m, T, Hh, Ww, D = 2, 3, 2, 4, 40
    q, k = _qkv(1, (m + T) * Hh * Ww, 2, D, torch.float32, seed=11)
    qw, kw = _weights(D, torch.float32, seed=11)
    full_q, full_k = qk_rmsnorm_rope3d(q, k, qw, kw, (m + T, Hh, Ww))
    tail = slice(m * Hh * Ww, None)
    tail_q, tail_k = qk_rmsnorm_rope3d(q[:, tail], k[:, tail], qw, kw, (T, Hh, Ww), t_offset=m)
    assert_close_rel(tail_q, full_q[:, tail], 1e-6, "q tail")
    assert_close_rel(tail_k, full_k[:, tail], 1e-6, "k tail")


def test_matches_same_dtype_reference_fp16():
    """The kernel reproduces the reference's roundings in the activation dtype too."""
    grid, D = (2, 2, 4), 64
    q, k = _qkv(2, _n(grid), 2, D, torch.float16, seed=12)
    qw, kw = _weights(D, torch.float16, seed=12)
    outs = qk_rmsnorm_rope3d(q, k, qw, kw, grid, 1, return_k_unroped=True)
    exps = qk_rmsnorm_rope3d_reference(q, k, qw, kw, grid, 1, return_k_unroped=True)
    for out, exp, name in zip(outs, exps, ("q", "k", "k_unroped")):
        assert exp.dtype == torch.float16
        # at most one fp16 rounding step apart (rsqrt / fma differences flip a last bit)
        assert_close_rel(out, exp, 1e-3, name)


def test_fp16_input_fp32_weight_promotes_like_reference():
    grid, D = (1, 2, 4), 32
    q, k = _qkv(1, _n(grid), 2, D, torch.float16, seed=13)
    qw, kw = _weights(D, torch.float32, seed=13)
    outs = qk_rmsnorm_rope3d(q, k, qw, kw, grid, return_k_unroped=True)
    exps = qk_rmsnorm_rope3d_reference(q, k, qw, kw, grid, return_k_unroped=True)
    for out, exp in zip(outs, exps):
        assert out.dtype == exp.dtype == torch.float32
        assert_close_rel(out, exp, KERNEL_RTOL[torch.float32], "promoted")


# --- layouts and modes -------------------------------------------------------------------------


def test_any_input_strides():
    grid, D, heads = (2, 2, 3), 16, 3
    g = torch.Generator().manual_seed(14)
    # [B, heads, N, D] storage seen as [B, N, heads, D]; tokens every other row of a bigger buffer
    q = torch.randn(2, heads, _n(grid), D, generator=g).to(DEVICE).transpose(1, 2)
    k = torch.randn(2, 2 * _n(grid), heads, D, generator=g).to(DEVICE)[:, ::2]
    # weights as strided views too
    qw = (1 + torch.randn(2 * D, generator=g)).to(DEVICE)[::2]
    kw = (1 + torch.randn(D, 2, generator=g)).to(DEVICE)[:, 1]
    assert not (q.is_contiguous() or k.is_contiguous() or qw.is_contiguous() or kw.is_contiguous())
    _run_and_check(q, k, qw, kw, grid, 1, what="strided")
    # a non-contiguous head dim (stride 2) is fine as well
    qd = torch.randn(1, _n(grid), heads, 2 * D, generator=g).to(DEVICE)[..., ::2]
    _run_and_check(qd, None, qw, None, grid, what="strided head dim")


@pytest.mark.parametrize("force_int64", [False, True])
def test_poisoned_outputs(force_int64):
    """Every output element is written by the launcher (NaN-filled preallocated outputs)."""
    grid, D, heads = (2, 4, 2), 40, 3  # D = 40: padded to 64 channels, masked lanes
    q, k = _qkv(2, _n(grid), heads, D, torch.float32, seed=15)
    qw, kw = _weights(D, torch.float32, seed=15)
    outs = [torch.full(q.shape, NAN, device=DEVICE) for _ in range(3)]
    _qk_rmsnorm_rope3d_launch(q, k, qw, kw, grid, 2, 1e-6, *outs, _force_int64=force_int64)
    _check(outs, _expected(q, k, qw, kw, grid, 2), torch.float32, "poisoned")


def test_poisoned_outputs_cross_attention_fp16():
    q, _ = _qkv(2, 37, 2, 24, torch.float16, seed=16)  # 37 tokens: a ragged last block
    _, k = _qkv(2, 5, 2, 24, torch.float16, seed=17)
    qw, kw = _weights(24, torch.float16, seed=16)
    q_out = torch.full(q.shape, NAN, dtype=torch.float16, device=DEVICE)
    k_out = torch.full(k.shape, NAN, dtype=torch.float16, device=DEVICE)
    _qk_rmsnorm_rope3d_launch(q, k, qw, kw, None, 0, 1e-6, q_out, k_out)
    _check((q_out, k_out), _expected(q, k, qw, kw, None, return_k_unroped=False), torch.float16, "cross")


@pytest.mark.parametrize("force_int64", [False, True])
def test_int64_offsets_path(force_int64):
    grid, D = (3, 2, 4), 24
    q, k = _qkv(2, _n(grid), 2, D, torch.float16, seed=18)
    qw, kw = _weights(D, torch.float16, seed=18)
    outs = [torch.empty(q.shape, dtype=torch.float16, device=DEVICE) for _ in range(3)]
    _qk_rmsnorm_rope3d_launch(q, k, qw, kw, grid, 2, 1e-6, *outs, _force_int64=force_int64)
    _check(outs, _expected(q, k, qw, kw, grid, 2), torch.float16, f"int64={force_int64}")
    # cross-attention (no RoPE) through the 64-bit path as well
    kc = k[:, :5]
    outs = [torch.empty(q.shape, dtype=torch.float16, device=DEVICE), torch.empty_like(kc)]
    _qk_rmsnorm_rope3d_launch(q, kc, qw, kw, None, 0, 1e-6, *outs, _force_int64=force_int64)
    _check(outs, _expected(q, kc, qw, kw, None, return_k_unroped=False), torch.float16, "int64 cross")


@pytest.mark.parametrize("grid", [None, (2, 2, 4)], ids=str)
def test_q_only_and_k_only(grid):
    D = 32
    q, k = _qkv(2, 16, 2, D, torch.float32, seed=19)
    qw, kw = _weights(D, torch.float32, seed=19)
    q_out, k_out = qk_rmsnorm_rope3d(q, None, qw, None, grid)
    assert k_out is None
    _check((q_out,), _expected(q, None, qw, None, grid, return_k_unroped=False)[:1], torch.float32, "q only")
    q_out, k_out, k_un = qk_rmsnorm_rope3d(None, k, None, kw, grid, return_k_unroped=True)
    assert q_out is None
    _check((q_out, k_out, k_un), _expected(None, k, None, kw, grid), torch.float32, "k only")
    # q only with return_k_unroped: the third output is None
    assert qk_rmsnorm_rope3d(q, None, qw, None, grid, return_k_unroped=True)[2] is None
    assert qk_rmsnorm_rope3d(None, None, None, None, grid) == (None, None)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_weight_none(dtype):
    """No norm: RoPE only (the KV cache's keys are normalized already); returns fresh copies."""
    grid, D = (2, 3, 2), 24
    q, k = _qkv(1, _n(grid), 2, D, dtype, seed=20, scale=3.0)
    outs = _run_and_check(q, k, None, None, grid, 3, what="no weights")
    assert outs[2].data_ptr() != k.data_ptr()
    _run_and_check(q, k, None, k.new_ones(D) * 1.5, grid, what="q unnormed, k normed")
    # neither norm nor RoPE: plain contiguous copies
    q_out, k_out = qk_rmsnorm_rope3d(q, k, None, None)
    assert torch.equal(q_out, q) and torch.equal(k_out, k) and q_out.is_contiguous()


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("n_q,n_k", [(24, 7), (5, 40), (16, 16)])
def test_cross_attention_different_lengths(n_q, n_k, dtype):
    """grid None: q over video tokens, k over text tokens of another length, one launch."""
    D, heads = 32, 3
    q, _ = _qkv(2, n_q, heads, D, dtype, seed=n_q)
    _, k = _qkv(2, n_k, heads, D, dtype, seed=100 + n_k)
    qw, kw = _weights(D, dtype, seed=21)
    outs = qk_rmsnorm_rope3d(q, k, qw, kw, None, return_k_unroped=True)
    assert outs[0].shape == q.shape and outs[1].shape == k.shape
    _check(outs, _expected(q, k, qw, kw, None), dtype, f"cross {n_q}/{n_k}")
    # the KV cache's keys (normalized, un-rotated) equal the keys when there is no RoPE
    assert torch.equal(outs[1], outs[2])


# --- official fixture --------------------------------------------------------------------------


def _fixture(fixtures_dir):
    with safe_open(str(fixtures_dir / "cases" / "op_rope3d.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return meta["kwargs"]["grid"], tensors


def test_official_fixture_reference(fixtures_dir):
    grid, t = _fixture(fixtures_dir)
    # fixture layout [B, heads, N, D]; ours [B, N, heads, D]
    q, k = (t[f"in.{n}"].transpose(1, 2) for n in "qk")
    q_out, k_out = qk_rmsnorm_rope3d_reference(q, k, None, None, grid)
    assert_close_rel(q_out.transpose(1, 2), t["out.q"], 1e-5, "reference q")
    assert_close_rel(k_out.transpose(1, 2), t["out.k"], 1e-5, "reference k")


def test_official_fixture_kernel(fixtures_dir):
    grid, t = _fixture(fixtures_dir)
    q, k = (t[f"in.{n}"].to(DEVICE).transpose(1, 2) for n in "qk")  # strided views
    q_out, k_out = qk_rmsnorm_rope3d(q, k, None, None, grid)
    assert_close_rel(q_out.transpose(1, 2).cpu(), t["out.q"], 1e-5, "kernel q")
    assert_close_rel(k_out.transpose(1, 2).cpu(), t["out.k"], 1e-5, "kernel k")


# --- validation --------------------------------------------------------------------------------


def test_validation_errors():
    q, k = _qkv(1, 8, 2, 16, torch.float32, seed=24)
    with pytest.raises(ValueError, match="multiple of 8"):
        rope3d_split(20)
    bad_d = torch.randn(1, 8, 2, 20, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of 8"):
        qk_rmsnorm_rope3d(bad_d, None, None, None, (1, 2, 4))
    with pytest.raises(ValueError, match="multiple of 8"):
        qk_rmsnorm_rope3d_reference(bad_d, None, None, None, (1, 2, 4))
    with pytest.raises(ValueError, match="tokens"):
        qk_rmsnorm_rope3d(q, k, None, None, (1, 3, 3))
    with pytest.raises(ValueError, match="tokens"):
        qk_rmsnorm_rope3d_reference(q, k, None, None, (1, 3, 3))
    with pytest.raises(ValueError, match="share batch size, head count and head_dim"):
        qk_rmsnorm_rope3d(q, torch.randn(1, 8, 3, 16, device=DEVICE), None, None)
    with pytest.raises(ValueError, match="q_weight"):
        qk_rmsnorm_rope3d(q, k, torch.ones(8, device=DEVICE), None)
    with pytest.raises(ValueError, match="B, N, heads"):
        qk_rmsnorm_rope3d(q[0], None, None, None)


def test_launcher_output_errors():
    q, k = _qkv(1, 8, 2, 16, torch.float32, seed=25)
    good = torch.empty(q.shape, device=DEVICE)
    with pytest.raises(ValueError, match="k_out is required"):
        _qk_rmsnorm_rope3d_launch(q, k, None, None, (1, 2, 4), 0, 1e-6, good, None)
    with pytest.raises(ValueError, match="contiguous"):
        _qk_rmsnorm_rope3d_launch(q, k, None, None, (1, 2, 4), 0, 1e-6, good, good.transpose(1, 2))
    with pytest.raises(ValueError, match="dtype"):
        _qk_rmsnorm_rope3d_launch(q, k, None, None, (1, 2, 4), 0, 1e-6, good, good.half())


def test_empty_batch():
    q = torch.randn(0, 8, 2, 16, device=DEVICE)
    q_out, k_out = qk_rmsnorm_rope3d(q, q, None, None, (1, 2, 4))
    assert q_out.shape == (0, 8, 2, 16) and k_out.shape == (0, 8, 2, 16)


# --- properties, registration, compile ---------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    grid=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)),
    heads=st.integers(1, 4),
    D=st.sampled_from(HEAD_DIMS),
    dtype=st.sampled_from(CPU_DTYPES),
    t_offset=st.sampled_from([0, 1, 37]),
    use_weights=st.booleans(),
    # not much smaller: without a norm, fp16 outputs of tiny inputs are subnormal and lose bits
    scale=st.sampled_from([0.1, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis(grid, heads, D, dtype, t_offset, use_weights, scale, seed):
    q, k = _qkv(2, _n(grid), heads, D, dtype, seed=seed, scale=scale)
    qw, kw = _weights(D, dtype, seed=seed) if use_weights else (None, None)
    _run_and_check(q, k, qw, kw, grid, t_offset, what=f"grid={grid} heads={heads} D={D} {dtype}")


def test_registered_op():
    grid = (1, 2, 4)
    q, k = _qkv(1, 8, 2, 16, torch.float32, seed=26)
    qw, kw = _weights(16, torch.float32, seed=26)
    q_out, k_out, k_un = torch.ops.longcat_native.qk_rmsnorm_rope3d(q, k, qw, kw, list(grid), 0, 1e-6, True)
    _check((q_out, k_out, k_un), _expected(q, k, qw, kw, grid), torch.float32, "torch.ops")


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    grid, heads, D = (2, 2, 2), 2, 16

    def attn_prologue(qkv, qw, kw, text_kv):
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, 3, heads, D).unbind(2)
        q, k, k_un = qk_rmsnorm_rope3d(q, k, qw, kw, grid, 1, return_k_unroped=True)
        tk = text_kv.view(B, -1, 2, heads, D)[:, :, 0]
        cq, ck = qk_rmsnorm_rope3d(q * 2.0, tk, qw, kw)  # cross-attention: different lengths
        return q.sum(1) + k_un.sum(1) + v.sum(1), k, cq, ck

    g = torch.Generator().manual_seed(27)
    qkv = torch.randn(2, _n(grid), 3 * heads * D, generator=g).to(DEVICE)
    text_kv = torch.randn(2, 5, 2 * heads * D, generator=g).to(DEVICE)
    qw, kw = _weights(D, torch.float32, seed=27)
    compiled = torch.compile(attn_prologue, fullgraph=True)
    for got, exp in zip(compiled(qkv, qw, kw, text_kv), attn_prologue(qkv, qw, kw, text_kv)):
        assert_close_rel(got, exp, KERNEL_RTOL[torch.float32], "compiled vs eager")


@requires_cuda
@pytest.mark.parametrize("D", [64, 128])
def test_bf16_cuda(D):
    grid = (4, 6, 8)
    q, k = _qkv(2, _n(grid), 4, D, torch.bfloat16, seed=28)
    qw, kw = _weights(D, torch.bfloat16, seed=28)
    _run_and_check(q, k, qw, kw, grid, 5, what=f"bf16 D={D}")


@requires_cuda
def test_large_positions_cuda():
    """Angles up to ~200 rad (long videos, KV-cache offsets): the trig must stay accurate."""
    grid, D = (2, 60, 104), 128
    q, k = _qkv(1, _n(grid), 2, D, torch.float32, seed=29)
    _run_and_check(q, k, None, None, grid, 190, what="large positions")
