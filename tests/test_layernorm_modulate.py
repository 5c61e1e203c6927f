"""layernorm_modulate: the fused Triton kernel against the float32 reference (interpreter on CPU)."""

import pytest
import torch
from helpers import (CPU_DTYPES, DEVICE, KERNEL_RTOL, NAN, assert_close_rel, layernorm_affine, modulation, randn,
                     requires_cuda)
from hypothesis import given, settings
from hypothesis import strategies as st

from longcat_native.kernels.layernorm_modulate import (
    _layernorm_modulate_launch,
    layernorm_modulate,
    layernorm_modulate_launch_config,
    layernorm_modulate_reference,
)


def _mod(B, frames, C, seed):
    """shift, scale as the model has them (helpers.modulation)."""
    return modulation(B, frames, C, seed)[:2]


def _expected(x, shift=None, scale=None, weight=None, bias=None, eps=1e-6):
    """Reference in float32 from the same (already rounded) inputs."""
    f = lambda t: None if t is None else t.float()  # noqa: E731
    return layernorm_modulate_reference(x.float(), f(shift), f(scale), f(weight), f(bias), eps)


def _check(out, x, shift=None, scale=None, weight=None, bias=None, eps=1e-6, what=""):
    assert out.dtype == x.dtype, what
    assert_close_rel(out, _expected(x, shift, scale, weight, bias, eps), KERNEL_RTOL[x.dtype], what)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("C", [8, 24, 100, 128, 257])
def test_shapes(C, frames, dtype):
    B, N = 2, 5 * frames  # odd token counts
    x = randn(B, N, C, seed=C, dtype=dtype)
    shift, scale = _mod(B, frames, C, seed=C + 1)
    weight, bias = layernorm_affine(C, seed=C + 2)
    for mod in (False, True):
        for affine in (False, True):
            args = (shift, scale) if mod else (None, None)
            args += (weight, bias) if affine else (None, None)
            out = layernorm_modulate(x, *args)
            assert out.shape == x.shape and out.is_contiguous()
            _check(out, x, *args, what=f"C={C} frames={frames} {dtype} mod={mod} affine={affine}")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_model_width(dtype):
    # C = 4096 (the model), whole row in one tile; few tokens to keep the interpreter fast.
    assert layernorm_modulate_launch_config(4096)[:3] == (1, 4096, True)
    x = randn(1, 3, 4096, seed=1, dtype=dtype)
    shift, scale = _mod(1, 3, 4096, seed=2)
    _check(layernorm_modulate(x, shift, scale), x, shift, scale, what=f"C=4096 {dtype}")


def test_wide_rows_are_chunked():
    C = 8200  # > 8192: streamed in 4096-wide chunks, the last one partial
    block_r, block_c, one_tile, _ = layernorm_modulate_launch_config(C)
    assert (block_r, block_c, one_tile) == (1, 4096, False)
    x = randn(1, 2, C, seed=3)
    shift, scale = _mod(1, 2, C, seed=4)
    weight, bias = layernorm_affine(C, seed=5)
    _check(layernorm_modulate(x, shift, scale, weight, bias), x, shift, scale, weight, bias, what="C=8200")


def test_launch_config_small_c():
    assert layernorm_modulate_launch_config(8) == (16, 16, True, 2)
    assert layernorm_modulate_launch_config(257) == (8, 512, True, 8)
    assert layernorm_modulate_launch_config(100, max_tile_c=32)[:3] == (16, 32, False)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("C", [33, 100, 257])
def test_chunked_path_small_c(C, dtype):
    # The wide-row path forced on small rows: several 32-wide chunks, the last partial, 16 rows.
    x = randn(2, 9, C, seed=C, dtype=dtype)
    shift, scale = _mod(2, 3, C, seed=C + 1)
    weight, bias = layernorm_affine(C, seed=C + 2)
    for args in ((shift, scale, None, None), (None, None, weight, bias), (shift, scale, weight, bias)):
        out = torch.full_like(x, NAN)
        _layernorm_modulate_launch(x, *args, 1e-6, out, _max_tile_c=32)
        _check(out, x, *args, what=f"chunked C={C} {dtype}")


@pytest.mark.parametrize("max_tile_c", [8192, 32], ids=["one_tile", "chunked"])
def test_large_mean_is_stable(max_tile_c):
    # |mean| >> std: a running sum of squares would cancel catastrophically in float32.
    x = randn(2, 6, 257, seed=6, add=1000.0)
    out = torch.full_like(x, NAN)
    _layernorm_modulate_launch(x, None, None, None, None, 1e-6, out, _max_tile_c=max_tile_c)
    expected = layernorm_modulate_reference(x.double()).float()
    assert_close_rel(out, expected, 1e-4, f"mean 1000, {max_tile_c}")


def test_eps_is_used():
    x = randn(2, 3, 24, seed=7, mul=0.05)
    for eps in (1e-6, 1e-2):
        _check(layernorm_modulate(x, eps=eps), x, eps=eps, what=f"eps={eps}")
    assert not torch.allclose(layernorm_modulate(x, eps=1e-6), layernorm_modulate(x, eps=1e-2))


def _x_views():
    """(name, x) pairs of non-contiguous [B, N, C] inputs, C = 40."""
    base = randn(3, 14, 48, seed=8)
    return [
        ("token_slice", base[:, 2:11, 4:44]),
        ("token_stride", base[:, ::2, :40]),  # N = 7
        ("batch_stride", base[::2, 1:10, 8:]),
        ("channel_stride", randn(2, 9, 80, seed=9)[..., ::2]),
        ("transposed", randn(2, 40, 9, seed=10).transpose(1, 2)),  # channel stride 9
    ]


X_VIEWS = [n for n, _ in _x_views()]


@pytest.mark.parametrize("name", X_VIEWS)
def test_non_contiguous_x(name):
    x = dict(_x_views())[name]
    assert not x.is_contiguous()
    B, N, C = x.shape
    shift, scale = _mod(B, N // 3 if N % 3 == 0 else 1, C, seed=11)
    weight, bias = layernorm_affine(C, seed=12)
    _check(layernorm_modulate(x, shift, scale, weight, bias), x, shift, scale, weight, bias, what=name)


def test_strided_and_expanded_params():
    B, N, C = 2, 6, 24
    x = randn(B, N, C, seed=13)
    mod = randn(B, 2, 2 * C, seed=14, mul=0.5)
    shift, scale = mod[..., ::2], mod[..., 1::2]  # channel stride 2
    shift_b = randn(1, 3, C, seed=15, mul=0.5).expand(B, 3, C)  # batch stride 0
    scale_b = randn(1, 3, C, seed=16, mul=0.5).expand(B, 3, C)
    w2, b2 = randn(2 * C, seed=17, add=1.0), randn(2 * C, seed=18)
    weight, bias = w2[::2], b2[1::2]
    _check(layernorm_modulate(x, shift, scale), x, shift, scale, what="channel-strided mod")
    _check(layernorm_modulate(x, shift_b, scale_b), x, shift_b, scale_b, what="expanded mod")
    _check(layernorm_modulate(x, None, None, weight, bias), x, None, None, weight, bias, what="strided affine")
    # half-precision parameters are upcast the same way
    _check(
        layernorm_modulate(x, shift.half(), scale.half(), weight.half(), bias.half()),
        x, shift.half(), scale.half(), weight.half(), bias.half(), what="fp16 params",
    )


@pytest.mark.parametrize("force_int64", [False, True], ids=["int32", "int64"])
@pytest.mark.parametrize("max_tile_c", [8192, 32], ids=["one_tile", "chunked"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_poisoned_output(dtype, max_tile_c, force_int64):
    """Every output element is written, into a NaN-filled output and a strided output view."""
    x = dict(_x_views())["transposed"].to(dtype)
    B, N, C = x.shape
    shift, scale = _mod(B, 3, C, seed=19)
    weight, bias = layernorm_affine(C, seed=20)
    args = (x, shift, scale, weight, bias, 1e-6)
    kw = dict(_force_int64=force_int64, _max_tile_c=max_tile_c)
    out = torch.full_like(x, NAN)
    assert _layernorm_modulate_launch(*args, out, **kw) is out
    _check(out, *args, what="poisoned")
    big = torch.full((B, N, 2, C + 3), NAN, dtype=dtype, device=DEVICE)
    out_view = big[:, :, 1, 2 : 2 + C]
    _layernorm_modulate_launch(*args, out_view, **kw)
    _check(out_view, *args, what="strided out")
    out_view.fill_(NAN)
    assert torch.isnan(big).all(), "wrote outside the output view"


@pytest.mark.parametrize("max_tile_c", [8192, 32], ids=["one_tile", "chunked"])
def test_int64_offsets_match_int32(max_tile_c):
    x = randn(2, 9, 100, seed=21, dtype=torch.float16)
    shift, scale = _mod(2, 3, 100, seed=22)
    outs = []
    for force in (False, True):
        out = torch.full_like(x, NAN)
        _layernorm_modulate_launch(x, shift, scale, None, None, 1e-6, out, _force_int64=force, _max_tile_c=max_tile_c)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("max_tile_c", [8192, 32], ids=["one_tile", "chunked"])
def test_in_place(max_tile_c):
    x = randn(2, 6, 100, seed=23)
    shift, scale = _mod(2, 2, 100, seed=24)
    expected = _expected(x, shift, scale)
    buf = x.clone()
    _layernorm_modulate_launch(buf, shift, scale, None, None, 1e-6, buf, _max_tile_c=max_tile_c)
    assert_close_rel(buf, expected, KERNEL_RTOL[torch.float32], "in place")


def _bad_args():
    x = torch.randn(2, 6, 8, device=DEVICE)
    s = torch.randn(2, 3, 8, device=DEVICE)
    s4 = torch.randn(2, 4, 8, device=DEVICE)  # 6 tokens do not split into 4 frames
    w = torch.randn(8, device=DEVICE)
    return {
        "x_2d": ((x[0], None, None, None, None), "x must be"),
        "shift_without_scale": ((x, s, None, None, None), "together"),
        "mod_batch": ((x, s[:1], s[:1], None, None), "shift/scale must be"),
        "mod_channels": ((x, s[..., :4], s[..., :4], None, None), "shift/scale must be"),
        "mod_shapes_differ": ((x, s, s[:, :2], None, None), "shift/scale must be"),
        "frames_not_dividing": ((x, s4, s4, None, None), "do not split evenly"),
        "weight_shape": ((x, None, None, w[:4], None), "weight must be"),
        "bias_shape": ((x, None, None, None, w[None]), "bias must be"),
        "int_x": ((x.to(torch.int32), None, None, None, None), "float32, float16 or bfloat16"),
        "int_shift": ((x, s.to(torch.int64), s, None, None), "shift must be float32"),
    }


@pytest.mark.parametrize("case", list(_bad_args()))
def test_bad_args_are_clear_errors(case):
    args, match = _bad_args()[case]
    with pytest.raises(ValueError, match=match):
        layernorm_modulate(*args)
    with pytest.raises(ValueError, match=match):
        _layernorm_modulate_launch(*args, 1e-6, torch.empty(args[0].shape, device=DEVICE))


def test_bad_output_is_clear_error():
    x = torch.randn(2, 6, 8, device=DEVICE)
    with pytest.raises(ValueError, match="shape"):
        _layernorm_modulate_launch(x, None, None, None, None, 1e-6, torch.empty(2, 6, 9, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        _layernorm_modulate_launch(x, None, None, None, None, 1e-6, torch.empty_like(x, dtype=torch.float16))
    with pytest.raises(ValueError, match="overlapping"):
        _layernorm_modulate_launch(x, None, None, None, None, 1e-6, torch.empty(1, 1, 8, device=DEVICE).expand(2, 6, 8))


def test_empty_input():
    x = torch.randn(2, 0, 8, device=DEVICE)
    s = torch.randn(2, 1, 8, device=DEVICE)
    assert layernorm_modulate(x, s, s).shape == (2, 0, 8)


def test_registered_op():
    x = randn(2, 3, 24, seed=25)
    shift, scale = _mod(2, 3, 24, seed=26)
    out = torch.ops.longcat_native.layernorm_modulate(x, shift, scale, None, None, 1e-6)
    _check(out, x, shift, scale, what="torch.ops.longcat_native.layernorm_modulate")


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def adaln(x, t, w_mod, weight, bias):
        mod = (t @ w_mod).unflatten(-1, (6, -1)).unbind(-2)  # float32 [B, frames, C] views
        h = layernorm_modulate(x[:, 1:], mod[0], mod[1])
        return h * mod[2].mean(1, keepdim=True) + layernorm_modulate(x[:, 1:], None, None, weight, bias)

    B, frames, C = 2, 3, 16
    x = randn(B, 3 * frames + 1, C, seed=27)
    t = randn(B, frames, 8, seed=28)
    w_mod = randn(8, 6 * C, seed=29, mul=0.2)
    weight, bias = layernorm_affine(C, seed=30)
    compiled = torch.compile(adaln, fullgraph=True)
    assert_close_rel(
        compiled(x, t, w_mod, weight, bias), adaln(x, t, w_mod, weight, bias), KERNEL_RTOL[torch.float32], "compiled"
    )


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2),
    frames=st.integers(1, 3),
    tokens_per_frame=st.integers(1, 4),
    C=st.integers(1, 300),
    dtype=st.sampled_from(CPU_DTYPES),
    mod=st.booleans(),
    affine=st.booleans(),
    chunked=st.booleans(),
    x_scale=st.sampled_from([0.1, 1.0, 30.0]),
    x_offset=st.sampled_from([0.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis(B, frames, tokens_per_frame, C, dtype, mod, affine, chunked, x_scale, x_offset, seed):
    x = randn(B, frames * tokens_per_frame, C, seed=seed, dtype=dtype, mul=x_scale, add=x_offset)
    args = _mod(B, frames, C, seed=seed + 1) if mod else (None, None)
    args += layernorm_affine(C, seed=seed + 2) if affine else (None, None)
    out = torch.full_like(x, NAN)
    _layernorm_modulate_launch(x, *args, 1e-6, out, _max_tile_c=32 if chunked else 8192)
    _check(out, x, *args, what=f"B={B} frames={frames} tpf={tokens_per_frame} C={C} {dtype}")


@requires_cuda
@pytest.mark.parametrize("C", [257, 4096, 8200])
def test_bf16_cuda(C):
    x = randn(2, 33, C, seed=31, dtype=torch.bfloat16)
    shift, scale = _mod(2, 3, C, seed=32)
    weight, bias = layernorm_affine(C, seed=33)
    _check(layernorm_modulate(x, shift, scale), x, shift, scale, what=f"bf16 C={C}")
    _check(layernorm_modulate(x, None, None, weight, bias), x, None, None, weight, bias, what=f"bf16 affine C={C}")
    xv = x[:, 1::2]
    _check(layernorm_modulate(xv, shift[:, :1], scale[:, :1]), xv, shift[:, :1], scale[:, :1], what="bf16 strided")
