"""swiglu: the fused Triton kernel against the float32 reference (interpreter on CPU)."""

import pytest
import torch
from helpers import CPU_DTYPES, DEVICE, KERNEL_RTOL, assert_close_rel, max_rel_err, requires_cuda
from hypothesis import example, given, settings
from hypothesis import strategies as st

from longcat_native.kernels.swiglu import _collapse_leading, _swiglu_launch, swiglu, swiglu_reference

def _ab(lead, n_feat, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, 2 * n_feat, generator=g).to(device=DEVICE, dtype=dtype)


def _expected(ab):
    """Reference in float32 from the same (already rounded) inputs."""
    return swiglu_reference(ab.float())


def _check(out, ab, what):
    """The kernel's error within the dtype's bound, or within twice what rounding the exact result
    to the output dtype costs: an output whose every value is below float16's smallest subnormal
    (6e-8; e.g. one feature with a ~ -30, silu(a) * b ~ -4e-11) has no representable bits left,
    so even the correctly rounded answer is 100% off relative to its own scale."""
    assert out.dtype == ab.dtype, what
    expected = _expected(ab)
    rounding = max_rel_err(expected.to(ab.dtype), expected)
    assert_close_rel(out, expected, max(KERNEL_RTOL[ab.dtype], 2 * rounding), what)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(1,), (3, 5), (2, 17)], ids=str)
@pytest.mark.parametrize("n_feat", [1, 7, 64, 100, 257])
def test_shapes(n_feat, lead, dtype):
    ab = _ab(lead, n_feat, dtype, seed=n_feat)
    out = swiglu(ab)
    assert out.shape == (*lead, n_feat)
    _check(out, ab, f"F={n_feat} lead={lead} {dtype}")


def test_matches_official_reference_dtype_semantics():
    # The official op works in the activation dtype; in float32 both must agree to rounding.
    ab = _ab((4, 9), 33, torch.float32, seed=1)
    assert_close_rel(swiglu(ab), swiglu_reference(ab), KERNEL_RTOL[torch.float32], "fp32 vs official")


@settings(max_examples=15, deadline=None)
@given(
    lead=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    n_feat=st.integers(1, 300),
    dtype=st.sampled_from(CPU_DTYPES),
    # not much smaller: fp16 outputs of inputs ~1e-3 are subnormal (~1e-6) and lose their bits
    scale=st.sampled_from([0.05, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
@example(lead=[], n_feat=1, dtype=torch.float16, scale=30.0, seed=983)  # an all-underflow output (CI, 2026-12-08)
def test_hypothesis(lead, n_feat, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    ab = (torch.randn(*lead, 2 * n_feat, generator=g) * scale).to(device=DEVICE, dtype=dtype)
    _check(swiglu(ab), ab, f"lead={lead} F={n_feat} {dtype} scale={scale}")


def _views():
    """(name, view) pairs of non-contiguous inputs whose last dim is contiguous."""
    base = _ab((4, 12), 2 * 40, torch.float32, seed=3)  # [4, 12, 160]
    big = _ab((2, 3, 4, 5), 2 * 6, torch.float32, seed=4)  # [2, 3, 4, 5, 24]
    return [
        ("token_slice", base[:, 2:9]),
        ("token_stride", base[:, ::3]),
        ("batch_and_token_stride", base[::2, 1::2]),
        ("column_window", base[..., 10:10 + 2 * 37]),  # row stride 160 for a 2F = 74 row
        ("transposed_leading", base.transpose(0, 1)),
        ("expanded", _ab((1, 5), 9, torch.float32, seed=5).expand(3, 5, 18)),
        ("five_dims_strided", big[:, ::2, 1:, ::2]),  # > 3 leading dims after collapsing
    ]


VIEW_NAMES = [n for n, _ in _views()]


def _view(name):
    return dict(_views())[name]


@pytest.mark.parametrize("name", VIEW_NAMES)
def test_non_contiguous_input(name):
    ab = _view(name)
    assert not ab.is_contiguous() and ab.stride(-1) == 1
    _check(swiglu(ab), ab, name)


def test_more_leading_dims_than_kernel_handles():
    ab = _view("five_dims_strided")
    sizes, _ = _collapse_leading(ab.shape[:-1], ab.stride()[:-1])
    assert len(sizes) > 3, sizes  # the launcher's slice-by-slice path is exercised


@pytest.mark.parametrize("force_int64", [False, True])
@pytest.mark.parametrize("name", ["token_slice", "batch_and_token_stride", "expanded", "five_dims_strided"])
def test_poisoned_output(name, force_int64):
    """Every output element is written, including into a strided, NaN-filled output view."""
    ab = _view(name)
    n_feat = ab.shape[-1] // 2
    out = torch.full(ab.shape[:-1] + (n_feat,), float("nan"), dtype=ab.dtype, device=ab.device)
    assert _swiglu_launch(ab, out, _force_int64=force_int64) is out
    _check(out, ab, f"{name} int64={force_int64}")
    # strided output: every other row of a bigger NaN buffer; the skipped rows stay NaN
    big = torch.full((*ab.shape[:-1], 2, n_feat), float("nan"), dtype=ab.dtype, device=ab.device)
    out_view = big[..., 0, :]
    _swiglu_launch(ab, out_view, _force_int64=force_int64)
    _check(out_view, ab, f"{name} strided out")
    assert torch.isnan(big[..., 1, :]).all(), "wrote outside the output view"


def test_poisoned_output_fp16_odd_feature():
    ab = _ab((3, 5), 257, torch.float16, seed=6)
    out = torch.full((3, 5, 257), float("nan"), dtype=torch.float16, device=ab.device)
    _swiglu_launch(ab, out)
    _check(out, ab, "fp16 F=257")


def test_odd_last_dim_is_clear_error():
    ab = torch.randn(2, 3, 9, device=DEVICE)
    with pytest.raises(ValueError, match="even"):
        swiglu(ab)
    with pytest.raises(ValueError, match="even"):
        _swiglu_launch(ab, torch.empty(2, 3, 4, device=DEVICE))


def test_non_contiguous_last_dim_is_clear_error():
    ab = torch.randn(2, 12, 3, device=DEVICE).transpose(1, 2)  # [2, 3, 12], last-dim stride 3
    with pytest.raises(ValueError, match="contiguous"):
        swiglu(ab)


def test_bad_output_is_clear_error():
    ab = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="shape"):
        _swiglu_launch(ab, torch.empty(2, 3, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        _swiglu_launch(ab, torch.empty(2, 4, device=DEVICE, dtype=torch.float16))


def test_empty_input():
    ab = torch.randn(0, 3, 8, device=DEVICE)
    assert swiglu(ab).shape == (0, 3, 4)


def test_registered_op():
    ab = _ab((2, 3), 5, torch.float32, seed=7)
    out = torch.ops.longcat_native.swiglu(ab)
    _check(out, ab, "torch.ops.longcat_native.swiglu")


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def ffn_act(ab, w):
        return swiglu(ab[:, 1:] * 2.0) @ w + swiglu(ab[:, ::2]).sum()

    ab = _ab((2, 6), 16, torch.float32, seed=8)
    w = torch.randn(16, 8, device=DEVICE)
    compiled = torch.compile(ffn_act, fullgraph=True)
    assert_close_rel(compiled(ab, w), ffn_act(ab, w), KERNEL_RTOL[torch.float32], "compiled vs eager")
    # a non-contiguous view through the compiled graph
    view = ab[:, ::2]
    assert_close_rel(compiled(view, w), ffn_act(view, w), KERNEL_RTOL[torch.float32], "compiled view")


@requires_cuda
@pytest.mark.parametrize("n_feat", [64, 257, 11008])
def test_bf16_cuda(n_feat):
    ab = _ab((2, 33), n_feat, torch.bfloat16, seed=9)
    _check(swiglu(ab), ab, f"bf16 F={n_feat}")
    _check(swiglu(ab[:, 1::2]), ab[:, 1::2], f"bf16 F={n_feat} strided")
