"""residual_layernorm_modulate: the fused Triton kernel against the reference (interpreter on CPU)."""

import pytest
import torch
from helpers import (CPU_DTYPES, DEVICE, KERNEL_RTOL, NAN, assert_close_rel, layernorm_affine, modulation, randn,
                     requires_cuda)
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_native.kernels.layernorm_modulate import layernorm_modulate_launch_config, layernorm_modulate_reference
from longcat_native.kernels.residual_layernorm_modulate import (
    _residual_layernorm_modulate_launch,
    gated_residual_reference,
    residual_layernorm_modulate,
    residual_layernorm_modulate_reference,
)


def _mod(B, frames, C, seed):
    """gate, shift, scale as the model has them (helpers.modulation)."""
    shift, scale, gate = modulation(B, frames, C, seed)[:3]
    return gate, shift, scale


def _check(x_new, h, x, y, gate=None, shift=None, scale=None, weight=None, bias=None, eps=1e-6, what=""):
    """x_new bitwise equal to the reference's; h against the float32 reference of that x_new."""
    assert x_new.dtype == h.dtype == x.dtype, what
    expected_x = gated_residual_reference(x, y, gate)
    assert torch.isfinite(x_new).all(), f"{what}: non-finite x_new (unwritten output?)"
    assert torch.equal(x_new, expected_x), f"{what}: x_new differs from the reference residual"
    f = lambda t: None if t is None else t.float()  # noqa: E731
    expected_h = layernorm_modulate_reference(expected_x.float(), f(shift), f(scale), f(weight), f(bias), eps)
    assert_close_rel(h, expected_h, KERNEL_RTOL[x.dtype], what)


def _launch(x, y, *args, eps=1e-6, **kw):
    x_out = torch.full_like(x, NAN)
    h_out = torch.full_like(x, NAN)
    res = _residual_layernorm_modulate_launch(x, y, *args, eps, x_out, h_out, **kw)
    assert res[0] is x_out and res[1] is h_out
    return x_out, h_out


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("C", [8, 24, 100, 128, 257])
def test_shapes(C, frames, dtype):
    B, N = 2, 5 * frames  # odd token counts
    x = randn(B, N, C, seed=C, dtype=dtype)
    y = randn(B, N, C, seed=C + 1, dtype=dtype)
    gate, shift, scale = _mod(B, frames, C, seed=C + 2)
    weight, bias = layernorm_affine(C, seed=C + 3)
    cases = {
        "self_attn": (gate, shift, scale, None, None),  # x + gate * attn, then the FFN's norm
        "cross_norm": (gate, None, None, weight, bias),  # x + gate * attn, then the affine norm
        "cross_residual": (None, shift, scale, None, None),  # x + cross_attn, then the FFN's norm
        "everything": (gate, shift, scale, weight, bias),
        "plain_norm": (None, None, None, None, None),
    }
    for name, args in cases.items():
        x_new, h = residual_layernorm_modulate(x, y, *args)
        assert x_new.shape == h.shape == x.shape and x_new.is_contiguous() and h.is_contiguous()
        _check(x_new, h, x, y, *args, what=f"{name} C={C} frames={frames} {dtype}")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_model_width(dtype):
    x = randn(1, 3, 4096, seed=1, dtype=dtype)
    y = randn(1, 3, 4096, seed=2, dtype=dtype)
    gate, shift, scale = _mod(1, 3, 4096, seed=3)
    _check(*residual_layernorm_modulate(x, y, gate, shift, scale), x, y, gate, shift, scale, what=f"C=4096 {dtype}")


def test_wide_rows_are_chunked():
    C = 8200
    assert not layernorm_modulate_launch_config(C)[2]
    x = randn(1, 2, C, seed=4)
    y = randn(1, 2, C, seed=5)
    gate, shift, scale = _mod(1, 2, C, seed=6)
    weight, bias = layernorm_affine(C, seed=7)
    args = (gate, shift, scale, weight, bias)
    _check(*residual_layernorm_modulate(x, y, *args), x, y, *args, what="C=8200")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("C", [33, 257])
def test_chunked_path_small_c(C, dtype):
    x = randn(2, 9, C, seed=C, dtype=dtype)
    y = randn(2, 9, C, seed=C + 1, dtype=dtype)
    gate, shift, scale = _mod(2, 3, C, seed=C + 2)
    weight, bias = layernorm_affine(C, seed=C + 3)
    cases = ((gate, shift, scale, None, None), (None, None, None, weight, bias), (gate, shift, scale, weight, bias))
    for args in cases:
        _check(*_launch(x, y, *args, _max_tile_c=32), x, y, *args, what=f"chunked C={C} {dtype}")


def test_gate_and_modulation_frame_counts_differ():
    x = randn(2, 12, 24, seed=8)
    y = randn(2, 12, 24, seed=9)
    gate = _mod(2, 4, 24, seed=10)[0]
    _, shift, scale = _mod(2, 3, 24, seed=11)
    _check(*residual_layernorm_modulate(x, y, gate, shift, scale), x, y, gate, shift, scale, what="4 vs 3 frames")


def test_mixed_dtypes():
    # fp16 activations, a float32 branch output and half-precision gate/params: float32 math.
    x = randn(2, 6, 40, seed=12, dtype=torch.float16)
    y = randn(2, 6, 40, seed=13)
    gate, shift, scale = (t.half() for t in _mod(2, 2, 40, seed=14))
    _check(*residual_layernorm_modulate(x, y, gate, shift, scale), x, y, gate, shift, scale, what="mixed")


def test_large_mean_is_stable():
    x = randn(2, 6, 257, seed=15, add=1000.0)
    y = randn(2, 6, 257, seed=16)
    expected_h = layernorm_modulate_reference((x + y).double()).float()
    for max_tile_c in (8192, 32):
        x_new, h = _launch(x, y, None, None, None, None, None, _max_tile_c=max_tile_c)
        assert torch.equal(x_new, x + y)
        assert_close_rel(h, expected_h, 1e-4, f"mean 1000, {max_tile_c}")


@pytest.mark.parametrize("max_tile_c", [8192, 32], ids=["one_tile", "chunked"])
def test_h_normalizes_the_rounded_residual(max_tile_c):
    # fp16 x ~ 100 with small updates: x + gate * y rounds visibly, and h must be the norm of the
    # rounded x_new (what the unfused path reads back), not of the float32 sum.
    from longcat_native.kernels.layernorm_modulate import _layernorm_modulate_launch

    x = randn(2, 6, 100, seed=45, dtype=torch.float16, mul=100.0)
    y = randn(2, 6, 100, seed=46, dtype=torch.float16, mul=0.1)
    args = _mod(2, 2, 100, seed=47) + (None, None)
    x_new, h = _launch(x, y, *args, _max_tile_c=max_tile_c)
    h_of_rounded = torch.full_like(x, NAN)
    _layernorm_modulate_launch(x_new, *args[1:], 1e-6, h_of_rounded, _max_tile_c=max_tile_c)
    unrounded = x.float() + args[0].float().repeat_interleave(3, dim=1) * y.float()
    h_of_unrounded = layernorm_modulate_reference(unrounded, *args[1:]).half()
    if DEVICE == "cpu":  # same float32 operations in the same order under the interpreter
        assert torch.equal(h, h_of_rounded)
    else:
        assert_close_rel(h, h_of_rounded, KERNEL_RTOL[torch.float16], "h vs norm of x_new")
    # the input is one where the rounding shows in h
    assert not torch.equal(layernorm_modulate_reference(x_new, *args[1:]), h_of_unrounded)


def _views(seed):
    """(name, view) pairs of non-contiguous [B, N, C] tensors, C = 40."""
    base = randn(4, 14, 48, seed=seed)  # every view is [2, 9, 40]
    return [
        ("token_slice", base[:2, 2:11, 4:44]),
        ("batch_stride", base[::2, 1:10, 8:]),
        ("channel_stride", randn(2, 9, 80, seed=seed + 1)[..., ::2]),
        ("transposed", randn(2, 40, 9, seed=seed + 2).transpose(1, 2)),
    ]


VIEWS = [n for n, _ in _views(0)]


@pytest.mark.parametrize("name", VIEWS)
def test_non_contiguous_inputs(name):
    x = dict(_views(17))[name]
    y = dict(_views(18))[VIEWS[(VIEWS.index(name) + 1) % len(VIEWS)]]
    assert not x.is_contiguous() and not y.is_contiguous() and x.shape == y.shape
    B, N, C = x.shape
    gate, shift, scale = _mod(B, 3 if N % 3 == 0 else 1, C, seed=19)
    weight, bias = layernorm_affine(C, seed=20)
    for args in ((gate, shift, scale, None, None), (None, shift, scale, weight, bias)):
        _check(*residual_layernorm_modulate(x, y, *args), x, y, *args, what=name)
    # strided, expanded gate/shift/scale
    g, sh, sc = (randn(1, 1, 2 * C, seed=21 + i, mul=0.5)[..., ::2].expand(B, 1, C) for i in range(3))
    _check(*residual_layernorm_modulate(x, y, g, sh, sc), x, y, g, sh, sc, what=f"{name} expanded params")


@pytest.mark.parametrize("force_int64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("max_tile_c", [8192, 32], ids=["one_tile", "chunked"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_poisoned_output(gated, dtype, max_tile_c, force_int64):
    """Every element of both outputs is written, also into strided output views."""
    x = dict(_views(24))["transposed"].to(dtype)
    y = dict(_views(25))["token_slice"].to(dtype)
    B, N, C = x.shape
    gate, shift, scale = _mod(B, 3, C, seed=26)
    args = (gate if gated else None, shift, scale, None, None)
    kw = dict(_force_int64=force_int64, _max_tile_c=max_tile_c)
    _check(*_launch(x, y, *args, **kw), x, y, *args, what="poisoned")
    big = torch.full((B, N, C + 5), NAN, dtype=dtype, device=DEVICE)
    x_out = big[..., 1 : C + 1]  # row stride C + 5
    h_big = torch.full((N, B, 2 * C), NAN, dtype=dtype, device=DEVICE)
    h_out = h_big[..., ::2].transpose(0, 1)  # [B, N, C], channel stride 2
    _residual_layernorm_modulate_launch(x, y, *args, 1e-6, x_out, h_out, **kw)
    _check(x_out, h_out, x, y, *args, what="strided outputs")
    x_out.fill_(NAN)
    h_out.fill_(NAN)
    assert torch.isnan(big).all() and torch.isnan(h_big).all(), "wrote outside the output views"


@pytest.mark.parametrize("max_tile_c", [8192, 32], ids=["one_tile", "chunked"])
def test_int64_offsets_match_int32(max_tile_c):
    x = randn(2, 9, 100, seed=27, dtype=torch.float16)
    y = randn(2, 9, 100, seed=28, dtype=torch.float16)
    args = _mod(2, 3, 100, seed=29) + (None, None)
    a = _launch(x, y, *args, _max_tile_c=max_tile_c)
    b = _launch(x, y, *args, _max_tile_c=max_tile_c, _force_int64=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("max_tile_c", [8192, 32], ids=["one_tile", "chunked"])
@pytest.mark.parametrize("alias", ["x", "y"])
def test_in_place_residual(alias, max_tile_c):
    # x_out may be x (the residual stream updated in place) or y.
    x = randn(2, 6, 100, seed=30, dtype=torch.float16)
    y = randn(2, 6, 100, seed=31, dtype=torch.float16)
    args = _mod(2, 2, 100, seed=32) + (None, None)
    x_buf, y_buf = x.clone(), y.clone()
    h = torch.full_like(x, NAN)
    _residual_layernorm_modulate_launch(
        x_buf, y_buf, *args, 1e-6, x_buf if alias == "x" else y_buf, h, _max_tile_c=max_tile_c
    )
    _check(x_buf if alias == "x" else y_buf, h, x, y, *args, what=f"in place into {alias}")


def _bad_args():
    x = torch.randn(2, 6, 8, device=DEVICE)
    g = torch.randn(2, 3, 8, device=DEVICE)
    return {
        "y_shape": ((x, x[:, :3], g, None, None, None, None), "differ in shape"),
        "y_dtype_without_gate": ((x, x.half(), None, None, None, None, None), "without a gate"),
        "gate_batch": ((x, x, g[:1], None, None, None, None), "gate must be"),
        "gate_channels": ((x, x, g[..., :4], None, None, None, None), "gate must be"),
        "gate_frames": ((x, x, torch.randn(2, 4, 8, device=DEVICE), None, None, None, None), "frames dividing"),
        "gate_2d": ((x, x, g[0], None, None, None, None), "gate must be"),
        "gate_dtype": ((x, x, g.to(torch.int32), None, None, None, None), "gate must be float32"),
        "y_dtype": ((x, x.to(torch.int32), g, None, None, None, None), "y must be float32"),
        "shift_without_scale": ((x, x, g, g, None, None, None), "together"),
        "mod_frames": ((x, x, g, g[:, :2].repeat(1, 2, 1), g[:, :2].repeat(1, 2, 1), None, None), "do not split"),
        "weight_shape": ((x, x, g, None, None, x[0, 0, :4], None), "weight must be"),
        "x_2d": ((x[0], x[0], None, None, None, None, None), "x must be"),
    }


@pytest.mark.parametrize("case", list(_bad_args()))
def test_bad_args_are_clear_errors(case):
    args, match = _bad_args()[case]
    with pytest.raises(ValueError, match=match):
        residual_layernorm_modulate(*args)
    with pytest.raises(ValueError, match=match):
        out = torch.empty(args[0].shape, device=DEVICE)
        _residual_layernorm_modulate_launch(*args, 1e-6, out, out.clone())


def test_bad_outputs_are_clear_errors():
    x = torch.randn(2, 6, 8, device=DEVICE)
    ok = torch.empty_like(x)
    args = (x, x, None, None, None, None, None, 1e-6)
    with pytest.raises(ValueError, match="x_out must be shape"):
        _residual_layernorm_modulate_launch(*args, torch.empty(2, 6, 9, device=DEVICE), ok)
    with pytest.raises(ValueError, match="h_out must be .*dtype"):
        _residual_layernorm_modulate_launch(*args, ok, torch.empty_like(x, dtype=torch.float16))
    with pytest.raises(ValueError, match="h_out has overlapping"):
        _residual_layernorm_modulate_launch(*args, ok, torch.empty(2, 1, 8, device=DEVICE).expand(2, 6, 8))


def test_empty_input():
    x = torch.randn(0, 6, 8, device=DEVICE)
    g = torch.randn(0, 3, 8, device=DEVICE)
    x_new, h = residual_layernorm_modulate(x, x, g, g, g)
    assert x_new.shape == h.shape == (0, 6, 8)


def test_matches_reference_function():
    x = randn(2, 6, 24, seed=33, dtype=torch.float16)
    y = randn(2, 6, 24, seed=34, dtype=torch.float16)
    args = _mod(2, 3, 24, seed=35) + layernorm_affine(24, seed=36)
    x_ref, h_ref = residual_layernorm_modulate_reference(x, y, *args)
    x_new, h = torch.ops.longcat_native.residual_layernorm_modulate(x, y, *args, 1e-6)
    assert torch.equal(x_new, x_ref)
    assert_close_rel(h, h_ref, KERNEL_RTOL[torch.float16], "registered op vs reference")


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def block_tail(x, y, t, w_mod):
        gate, shift, scale = (t @ w_mod).chunk(3, dim=-1)  # float32 [B, frames, C] views
        x, h = residual_layernorm_modulate(x, y * 0.5, gate, shift, scale)
        x2, h2 = residual_layernorm_modulate(x, h, None, shift, scale)
        return x2, h2 * 2.0

    B, frames, C = 2, 3, 16
    x = randn(B, 3 * frames, C, seed=37)
    y = randn(B, 3 * frames, C, seed=38)
    t = randn(B, frames, 8, seed=39)
    w_mod = randn(8, 3 * C, seed=40, mul=0.2)
    compiled = torch.compile(block_tail, fullgraph=True)
    for got, want, what in zip(compiled(x, y, t, w_mod), block_tail(x, y, t, w_mod), ("x", "h")):
        assert_close_rel(got, want, KERNEL_RTOL[torch.float32], f"compiled {what}")


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    frames=st.integers(1, 3),
    tokens_per_frame=st.integers(1, 4),
    C=st.integers(1, 300),
    dtype=st.sampled_from(CPU_DTYPES),
    gated=st.booleans(),
    mod=st.booleans(),
    affine=st.booleans(),
    chunked=st.booleans(),
    x_scale=st.sampled_from([0.1, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis(B, frames, tokens_per_frame, C, dtype, gated, mod, affine, chunked, x_scale, seed):
    N = frames * tokens_per_frame
    x = randn(B, N, C, seed=seed, dtype=dtype, mul=x_scale)
    y = randn(B, N, C, seed=seed + 1, dtype=dtype)
    gate, shift, scale = _mod(B, frames, C, seed=seed + 2)
    args = (gate if gated else None,) + ((shift, scale) if mod else (None, None))
    args += layernorm_affine(C, seed=seed + 3) if affine else (None, None)
    x_new, h = _launch(x, y, *args, _max_tile_c=32 if chunked else 8192)
    _check(x_new, h, x, y, *args, what=f"B={B} frames={frames} tpf={tokens_per_frame} C={C} {dtype}")


@requires_cuda
@pytest.mark.parametrize("C", [257, 4096, 8200])
def test_bf16_cuda(C):
    x = randn(2, 33, C, seed=41, dtype=torch.bfloat16)
    y = randn(2, 33, C, seed=42, dtype=torch.bfloat16)
    gate, shift, scale = _mod(2, 3, C, seed=43)
    weight, bias = layernorm_affine(C, seed=44)
    for args in ((gate, shift, scale, None, None), (None, shift, scale, None, None), (gate, None, None, weight, bias)):
        _check(*residual_layernorm_modulate(x, y, *args), x, y, *args, what=f"bf16 C={C}")
