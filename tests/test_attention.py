"""The attention dispatch (longcat_native/runtime/attention.py): backend resolution, SDPA vs the
reference oracle on random inputs, and the flash-attn plumbing (dense and varlen, strided and
expanded inputs, empty text items, no device -> host sync) against FAKE ``flash_attn`` /
``flash_attn_interface`` modules computed in float64, so all of it runs on a CPU machine.

The model-level fixture cases with sdpa / reference live in test_dit_fixtures.py; here they run
once more with the (fake) flash2 backend, which exercises the varlen text path, conditioning
frames and the KV cache through the flash entry points.
"""

import contextlib
import subprocess
import sys
import types

import pytest
import torch
from cases import FIXTURE_ROOT, FORWARD_CASES, load_case
from helpers import KERNEL_RTOL, MODEL_RTOL, assert_close_rel, requires_cuda

import longcat_native as lcn
from longcat_native.runtime import attention as attn_mod
from longcat_native.runtime.attention import attention, resolve_attention_backend

# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _qkv(B, Nq, Nk, H, D, dtype, g, q_strided=True, kv_expanded=True):
    """q: a strided view of a [B, Nq, 3, H, D] qkv tensor (as the model's self-attention makes);
    k/v: batch-1 tensors expanded to B (stride 0 on the batch dim), as a shared cache would be."""
    if q_strided:
        q = torch.randn(B, Nq, 3, H, D, generator=g).to(dtype).unbind(2)[0]
        assert not q.is_contiguous() and q.stride(-1) == 1
    else:
        q = torch.randn(B, Nq, H, D, generator=g).to(dtype)
    if kv_expanded:
        k = torch.randn(1, Nk, H, D, generator=g).to(dtype).expand(B, -1, -1, -1)
        v = torch.randn(1, Nk, H, D, generator=g).to(dtype).expand(B, -1, -1, -1)
    else:
        k = torch.randn(B, Nk, H, D, generator=g).to(dtype)
        v = torch.randn(B, Nk, H, D, generator=g).to(dtype)
    return q, k, v


def _masks(kind, B, Nk, g):
    """bool [B, Nk]: 'prefix' (valid tokens first, varying lengths), 'nonprefix' (random holes),
    'empty_item' (prefixes, one item with no valid key), 'all' (every key valid)."""
    if kind == "all":
        return torch.ones(B, Nk, dtype=torch.bool)
    if kind == "nonprefix":
        m = torch.rand(B, Nk, generator=g) < 0.5
        m[:, 0] = False  # never a prefix
        m[:, 1] = True  # at least one valid key per item
        return m
    lengths = torch.randint(1, Nk + 1, (B,), generator=g)
    lengths[-1] = Nk
    if kind == "empty_item":
        lengths[min(1, B - 1)] = 0
    return torch.arange(Nk)[None, :] < lengths[:, None]


def _check_zero_items(out, key_valid):
    for b in range(out.shape[0]):
        if not key_valid[b].any():
            assert (out[b] == 0).all(), f"item {b} has no valid key: its output must be zero"


# ---------------------------------------------------------------------------------------------
# A guard that fails on any device -> host copy (CPU stand-in for torch.cuda.set_sync_debug_mode)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_host_sync():
    """Inside: Tensor.item/tolist/numpy and int()/bool()/float()/index conversions of a tensor raise.
    Those are the Python-level ways a device tensor reaches the host (each one syncs on CUDA)."""

    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"device -> host sync: Tensor.{name} called during attention")

        return raiser

    with pytest.MonkeyPatch.context() as mp:
        for name in ("item", "tolist", "numpy", "__int__", "__bool__", "__index__", "__float__"):
            mp.setattr(torch.Tensor, name, forbid(name))
        yield


def test_no_host_sync_guard_works():
    t = torch.tensor([3])
    with no_host_sync():
        with pytest.raises(AssertionError, match="sync"):
            t.item()
        with pytest.raises(AssertionError, match="sync"):
            max(torch.tensor([1, 2]))  # comparing two 0-d tensors goes through __bool__
        with pytest.raises(AssertionError, match="sync"):
            int(t)
    assert t.item() == 3


# ---------------------------------------------------------------------------------------------
# Fake flash-attn modules (exact float64 math; the same entry points and argument order)
# ---------------------------------------------------------------------------------------------


class FakeFlash:
    """Builds a fake ``flash_attn`` (FA2: returns out) or ``flash_attn_interface`` (FA3: returns
    (out, lse)) module. Records every call; checks what the real kernels require (last dim
    contiguous, int32 cumulative lengths, Python-int max lengths) without syncing."""

    def __init__(self, name, returns_tuple, empty_rows=0.0):
        self.name = name
        self.returns_tuple = returns_tuple
        self.empty_rows = empty_rows  # what rows with no key get (NaN: an old / hostile version)
        self.calls = []
        mod = types.ModuleType(name)
        mod.flash_attn_func = self.flash_attn_func
        mod.flash_attn_varlen_func = self.flash_attn_varlen_func
        mod.__fake__ = True
        self.module = mod

    def _wrap(self, out, lse):
        return (out, lse) if self.returns_tuple else out

    @staticmethod
    def _check_inputs(*ts):
        for t in ts:
            assert t.stride(-1) == 1, "flash-attn needs the last dim contiguous"

    def flash_attn_func(self, q, k, v, softmax_scale=None, causal=False, **kw):
        self._check_inputs(q, k, v)
        assert not causal
        self.calls.append(dict(kind="dense", q=q, k=k, v=v, softmax_scale=softmax_scale))
        D = q.shape[-1]
        scale = D**-0.5 if softmax_scale is None else softmax_scale
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
        out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.double())
        return self._wrap(out.to(q.dtype), torch.logsumexp(s, -1).float())

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False, **kw):
        self._check_inputs(q, k, v)
        assert not causal and dropout_p == 0.0
        assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "varlen takes packed [total, H, D]"
        for cu in (cu_seqlens_q, cu_seqlens_k):
            assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.device == q.device
        for m in (max_seqlen_q, max_seqlen_k):
            # A Python int: a tensor here would mean the caller computed it on the device and
            # the real kernel would read it on the host.
            assert type(m) is int
        self.calls.append(dict(kind="varlen", q=q, k=k, v=v, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k,
                               max_q=max_seqlen_q, max_k=max_seqlen_k, softmax_scale=softmax_scale))
        D = q.shape[-1]
        scale = D**-0.5 if softmax_scale is None else softmax_scale
        # Item of every packed row, on the device (rows past cu[-1] get item B: never matched).
        seg_q = torch.searchsorted(cu_seqlens_q[1:].long(), torch.arange(q.shape[0]), right=True)
        seg_k = torch.searchsorted(cu_seqlens_k[1:].long(), torch.arange(k.shape[0]), right=True)
        same = seg_q[:, None] == seg_k[None, :]  # [Tq, Tk]
        s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
        s = s.masked_fill(~same[None], float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
        out = torch.einsum("hqk,khd->qhd", p, v.double())
        has_key = same.any(dim=1)[:, None, None]
        out = torch.where(has_key, out, torch.full_like(out, self.empty_rows))
        return self._wrap(out.to(q.dtype), torch.logsumexp(s, -1).float())


_REAL_FLASH_MODULE = attn_mod._flash_module  # tests may monkeypatch the module attribute


@pytest.fixture
def fresh_flash_cache():
    """Importability is cached per process: forget it before and after a test that fakes it."""
    _REAL_FLASH_MODULE.cache_clear()
    yield
    _REAL_FLASH_MODULE.cache_clear()


@pytest.fixture
def fake_flash(monkeypatch, fresh_flash_cache):
    """Installs fake flash_attn (FA2) and flash_attn_interface (FA3) modules and lets the flash
    backends resolve on CPU (the CPU passes for a Hopper GPU). Yields {'flash2': FakeFlash,
    'flash3': FakeFlash}."""
    fakes = {"flash2": FakeFlash("flash_attn", returns_tuple=False),
             "flash3": FakeFlash("flash_attn_interface", returns_tuple=True)}
    monkeypatch.setitem(sys.modules, "flash_attn", fakes["flash2"].module)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fakes["flash3"].module)
    monkeypatch.setattr(attn_mod, "_device_capability", lambda device: (9, 0))
    yield fakes


@pytest.fixture
def no_flash(monkeypatch, fresh_flash_cache):
    """Both flash packages missing, whatever is installed (a None entry makes import fail)."""
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)


# ---------------------------------------------------------------------------------------------
# SDPA vs reference on random inputs
# ---------------------------------------------------------------------------------------------

SHAPES = [  # (B, Nq, Nk, heads, D)
    (2, 13, 29, 1, 8),
    (2, 40, 17, 3, 32),
    (3, 24, 64, 4, 64),
    (1, 9, 33, 3, 128),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["strided_q_expanded_kv", "contiguous"])
def test_sdpa_matches_reference_dense(shape, dtype, layout):
    B, Nq, Nk, H, D = shape
    g = _gen(1)
    strided = layout != "contiguous"
    q, k, v = _qkv(B, Nq, Nk, H, D, dtype, g, q_strided=strided, kv_expanded=strided)
    ref = attention(q, k, v, "reference")
    out = attention(q, k, v, "sdpa")
    assert out.dtype == dtype and out.shape == (B, Nq, H, D)
    assert_close_rel(out, ref, KERNEL_RTOL[dtype], f"sdpa {shape} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mask", ["prefix", "nonprefix", "empty_item", "all"])
@pytest.mark.parametrize("shape", [(3, 21, 16, 3, 32), (3, 10, 40, 4, 128), (2, 7, 12, 1, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_sdpa_matches_reference_masked(shape, mask, dtype):
    B, Nq, Nk, H, D = shape
    g = _gen(2)
    q, k, v = _qkv(B, Nq, Nk, H, D, dtype, g, q_strided=False, kv_expanded=False)
    key_valid = _masks(mask, B, Nk, g)
    ref = attention(q, k, v, "reference", key_valid=key_valid)
    out = attention(q, k, v, "sdpa", key_valid=key_valid)
    assert_close_rel(out, ref, KERNEL_RTOL[dtype], f"sdpa {shape} {mask} {dtype}")
    _check_zero_items(out, key_valid)
    _check_zero_items(ref, key_valid)


def test_reference_masked_equals_dense_on_valid_subset():
    """The oracle itself: masking = attending to the valid subset only."""
    g = _gen(3)
    B, Nq, Nk, H, D = 2, 5, 11, 2, 16
    q, k, v = _qkv(B, Nq, Nk, H, D, torch.float32, g, q_strided=False, kv_expanded=False)
    key_valid = _masks("nonprefix", B, Nk, g)
    out = attention(q, k, v, "reference", key_valid=key_valid)
    for b in range(B):
        m = key_valid[b]
        dense = attention(q[b : b + 1], k[b : b + 1, m], v[b : b + 1, m], "reference")
        assert_close_rel(out[b : b + 1], dense, 1e-6, f"item {b}")


def test_empty_query_sequence():
    q = torch.randn(2, 0, 2, 8)
    k = v = torch.randn(2, 5, 2, 8)
    for backend in ("sdpa", "reference"):
        assert attention(q, k, v, backend).shape == (2, 0, 2, 8)


# ---------------------------------------------------------------------------------------------
# Flash plumbing with fake modules
# ---------------------------------------------------------------------------------------------

FLASH = ["flash2", "flash3"]


@pytest.mark.parametrize("backend", FLASH)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_flash_dense_matches_reference(fake_flash, backend, dtype, shape):
    B, Nq, Nk, H, D = shape
    q, k, v = _qkv(B, Nq, Nk, H, D, dtype, _gen(4))
    assert resolve_attention_backend(backend, "cpu", dtype) == backend
    ref = attention(q, k, v, "reference")
    out = attention(q, k, v, backend)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (B, Nq, H, D)
    assert_close_rel(out, ref, KERNEL_RTOL[dtype], f"{backend} {shape}")
    (call,) = fake_flash[backend].calls
    assert call["kind"] == "dense"
    # [B, N, H, D] goes in as it is: the strided q view and the expanded k/v are not copied.
    assert call["q"].data_ptr() == q.data_ptr() and call["q"].stride() == q.stride()
    if B > 1:
        assert call["k"].stride(0) == 0 and call["v"].stride(0) == 0
    assert call["softmax_scale"] == pytest.approx(D**-0.5)


@pytest.mark.parametrize("backend", FLASH)
def test_flash_copies_only_a_strided_last_dim(fake_flash, backend):
    g = _gen(5)
    B, Nq, Nk, H, D = 2, 6, 9, 2, 16
    q = torch.randn(B, Nq, H, 2 * D, generator=g).half()[..., ::2]  # stride(-1) == 2
    k = torch.randn(B, Nk, H, D, generator=g).half()
    v = torch.randn(B, Nk, D, H, generator=g).half().transpose(-1, -2)  # stride(-1) == H
    out = attention(q, k, v, backend)
    call = fake_flash[backend].calls[-1]
    assert call["q"].stride(-1) == 1 and call["v"].stride(-1) == 1
    assert call["k"].data_ptr() == k.data_ptr()  # already fine: not copied
    assert_close_rel(out, attention(q, k, v, "reference"), KERNEL_RTOL[torch.float16], backend)


@pytest.mark.parametrize("backend", FLASH)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mask", ["prefix", "nonprefix", "empty_item", "all"])
@pytest.mark.parametrize("shape", [(3, 21, 16, 3, 32), (4, 10, 40, 4, 128), (2, 7, 12, 1, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_flash_varlen_matches_reference(fake_flash, backend, dtype, mask, shape):
    B, Nq, Nk, H, D = shape
    g = _gen(6)
    q, k, v = _qkv(B, Nq, Nk, H, D, dtype, g, q_strided=(mask != "all"), kv_expanded=(mask == "prefix"))
    key_valid = _masks(mask, B, Nk, g)
    ref = attention(q, k, v, "reference", key_valid=key_valid)
    out = attention(q, k, v, backend, key_valid=key_valid)
    assert out.dtype == dtype and out.shape == (B, Nq, H, D)
    assert_close_rel(out, ref, KERNEL_RTOL[dtype], f"{backend} {shape} {mask}")
    _check_zero_items(out, key_valid)
    (call,) = fake_flash[backend].calls
    assert call["kind"] == "varlen"
    counts = key_valid.sum(1)
    assert call["cu_q"].tolist() == [Nq * i for i in range(B + 1)]
    assert call["cu_k"].tolist() == [0] + torch.cumsum(counts, 0).tolist()
    assert call["max_q"] == Nq and call["max_k"] == Nk >= int(counts.max())
    assert call["q"].shape == (B * Nq, H, D) and call["k"].shape[0] == B * Nk  # fixed-size buffers
    # The packed keys: item b's valid keys, in order, at rows [cu[b], cu[b+1]).
    cu = call["cu_k"].tolist()
    for b in range(B):
        torch.testing.assert_close(call["k"][cu[b] : cu[b + 1]], k[b, key_valid[b]], rtol=0, atol=0)
        torch.testing.assert_close(call["v"][cu[b] : cu[b + 1]], v[b, key_valid[b]], rtol=0, atol=0)


@pytest.mark.parametrize("backend", FLASH)
def test_flash_varlen_zeroes_items_without_keys_whatever_the_kernel_writes(fake_flash, backend):
    """Older flash-attn versions may leave garbage (here NaN) in rows whose key range is empty."""
    fake_flash[backend].empty_rows = float("nan")
    g = _gen(7)
    B, Nq, Nk, H, D = 3, 5, 8, 2, 32
    q, k, v = _qkv(B, Nq, Nk, H, D, torch.bfloat16, g)
    key_valid = _masks("empty_item", B, Nk, g)
    key_valid[0] = False
    out = attention(q, k, v, backend, key_valid=key_valid)
    assert torch.isfinite(out).all()
    _check_zero_items(out, key_valid)
    assert_close_rel(out, attention(q, k, v, "reference", key_valid=key_valid), KERNEL_RTOL[torch.bfloat16], backend)


@pytest.mark.parametrize("backend", ["flash2", "flash3", "sdpa", "reference"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "varlen"])
def test_no_device_to_host_sync(fake_flash, backend, masked):
    g = _gen(8)
    B, Nq, Nk, H, D = 3, 12, 10, 2, 32
    q, k, v = _qkv(B, Nq, Nk, H, D, torch.float16, g)
    key_valid = _masks("empty_item", B, Nk, g) if masked else None
    resolved = resolve_attention_backend(backend, "cpu", torch.float16)  # resolution is sync-free too
    with no_host_sync():
        out = attention(q, k, v, resolved, key_valid=key_valid)
    assert_close_rel(out, attention(q, k, v, "reference", key_valid=key_valid), KERNEL_RTOL[torch.float16], backend)


def test_flash_internal_entry_points(fake_flash):
    q, k, v = _qkv(2, 4, 6, 2, 8, torch.float16, _gen(9))
    ref = attention(q, k, v, "reference")
    for fn in (attn_mod._attention_flash2, attn_mod._attention_flash3):
        assert_close_rel(fn(q, k, v), ref, KERNEL_RTOL[torch.float16], fn.__name__)


# ---------------------------------------------------------------------------------------------
# Every fixture forward case through the model with the (fake) flash2 backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORWARD_CASES)
def test_forward_case_through_fake_flash2(fake_flash, name, monkeypatch):
    """Conditioning frames, the KV cache, masked and zero-pad text on the flash entry points. The
    fixtures are float32 (the fake accepts it; real flash-attn would need bf16, so the dtype rule
    is relaxed for this test only)."""
    monkeypatch.setattr(attn_mod, "_FLASH_DTYPES", attn_mod._FLASH_DTYPES + (torch.float32,))
    inputs, kv, expected, meta = load_case(name)
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, dtype=torch.float32, device="cpu", kernels="reference",
                                         attention="flash2", **meta.get("config_overrides", {}))
    assert dit.resolved_attention() == "flash2"
    kwargs = dict(meta.get("kwargs", {}))
    if kv is not None:
        kwargs["kv_cache_dict"] = kv
    with torch.inference_mode():
        result = dit(**inputs, **kwargs)
    out = result[0] if kwargs.get("return_kv") else result
    assert_close_rel(out, expected["output"], MODEL_RTOL, name)
    calls = fake_flash["flash2"].calls
    assert calls, "the flash backend was not used"
    varlen = any(c["kind"] == "varlen" for c in calls)
    text_varlen = (not meta.get("kwargs", {}).get("skip_crs_attn")
                   and "encoder_attention_mask" in inputs
                   and not meta.get("config_overrides", {}).get("text_tokens_zero_pad", True))
    assert varlen == text_varlen, (name, varlen)


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------


def test_auto_on_cpu_is_sdpa_without_touching_flash(monkeypatch, fresh_flash_cache):
    def boom(*a):
        raise AssertionError("auto on CPU must not import flash-attn or query CUDA")

    monkeypatch.setattr(attn_mod, "_flash_module", boom)
    monkeypatch.setattr(attn_mod, "_cuda_capability", boom)
    for dtype in (None, torch.float32, torch.bfloat16):
        assert resolve_attention_backend("auto", torch.device("cpu"), dtype) == "sdpa"
    assert resolve_attention_backend("sdpa", "cpu") == "sdpa"
    assert resolve_attention_backend("reference", "cpu") == "reference"


@pytest.mark.parametrize("backend,package", [("flash2", "flash_attn"), ("flash3", "flash_attn_interface")])
def test_explicit_flash_on_cpu_or_missing_is_a_clear_error(no_flash, backend, package):
    with pytest.raises(ValueError, match="CUDA device") as e:
        resolve_attention_backend(backend, torch.device("cpu"), torch.bfloat16)
    assert package in str(e.value) and "attention='sdpa'" in str(e.value)
    if backend == "flash2":
        assert "pip install 'longcat-native[cuda]'" in str(e.value)
    else:
        assert "hopper" in str(e.value)


@pytest.mark.parametrize("backend", FLASH)
def test_explicit_flash_with_float32_is_an_error(fake_flash, backend):
    with pytest.raises(ValueError, match="float16/bfloat16"):
        resolve_attention_backend(backend, "cpu", torch.float32)
    assert resolve_attention_backend(backend, "cpu", torch.bfloat16) == backend


def test_dispatch_with_a_missing_package_is_a_clear_error(no_flash):
    q = torch.randn(1, 2, 1, 8).half()
    with pytest.raises(ValueError, match="flash_attn"):
        attention(q, q, q, "flash2")


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_attention_backend("magic", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn_mod.check_attention_name("flash4")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), "magic")
    for name in attn_mod.ATTENTION_CHOICES:
        attn_mod.check_attention_name(name)  # no device needed


@pytest.fixture
def simulated_cuda(monkeypatch, fresh_flash_cache):
    """Resolution on a pretend CUDA device: capability and importability are monkeypatched."""
    state = {"capability": (9, 0), "have": {"flash2": True, "flash3": True}}
    monkeypatch.setattr(attn_mod, "_device_capability",
                        lambda device: state["capability"] if device.type == "cuda" else None)
    monkeypatch.setattr(attn_mod, "_flash_module",
                        lambda b: (types.ModuleType(b), None) if state["have"][b] else (None, "ImportError: no"))
    return state


def test_auto_on_simulated_cuda(simulated_cuda):
    cuda = torch.device("cuda", 0)
    assert resolve_attention_backend("auto", cuda, torch.bfloat16) == "flash3"
    assert resolve_attention_backend("auto", cuda, torch.float16) == "flash3"
    assert resolve_attention_backend("auto", cuda, torch.float32) == "sdpa"  # flash-attn is fp16/bf16 only
    simulated_cuda["capability"] = (8, 0)  # Ampere: no FA3
    assert resolve_attention_backend("auto", cuda, torch.bfloat16) == "flash2"
    assert resolve_attention_backend("auto", cuda, torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="Hopper"):
        resolve_attention_backend("flash3", cuda, torch.bfloat16)
    simulated_cuda["capability"] = (9, 0)
    simulated_cuda["have"]["flash3"] = False
    assert resolve_attention_backend("auto", cuda, torch.bfloat16) == "flash2"
    with pytest.raises(ValueError, match="flash_attn_interface"):
        resolve_attention_backend("flash3", cuda, torch.bfloat16)
    simulated_cuda["have"]["flash2"] = False
    assert resolve_attention_backend("auto", cuda, torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match=r"pip install 'longcat-native\[cuda\]'"):
        resolve_attention_backend("flash2", cuda, torch.bfloat16)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        resolve_attention_backend("flash2", cuda, torch.float32)


def test_cudnn_resolution(simulated_cuda):
    """cudnn: CUDA and fp16/bf16, no package needed; never what auto picks (not measured yet)."""
    cuda = torch.device("cuda", 0)
    assert resolve_attention_backend("cudnn", cuda, torch.bfloat16) == "cudnn"
    assert resolve_attention_backend("cudnn", cuda, None) == "cudnn"
    with pytest.raises(ValueError, match="float16/bfloat16"):
        resolve_attention_backend("cudnn", cuda, torch.float32)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_attention_backend("cudnn", "cpu", torch.bfloat16)
    simulated_cuda["have"].update(flash2=False, flash3=False)
    assert resolve_attention_backend("auto", cuda, torch.bfloat16) == "sdpa"
    # A torch whose sdpa_kernel has no priorities: a clear error, not a TypeError mid-forward.
    import unittest.mock

    with unittest.mock.patch.object(attn_mod, "sdpa_kernel", lambda backends: contextlib.nullcontext()):
        with pytest.raises(ValueError, match="no SDPA kernel priorities"):
            resolve_attention_backend("cudnn", cuda, torch.bfloat16)


@pytest.mark.parametrize("masked", [False, True])
def test_cudnn_backend_runs_sdpa_under_its_kernel_order(monkeypatch, masked):
    """The cudnn backend is SDPA restricted to _CUDNN_SDPA_ORDER, in that priority (CPU stand-in:
    the math kernel, or a kernel the CPU lacks, which must then fail); it traces into one graph."""
    g = _gen(21)
    B, Nq, Nk, H, D = 2, 24, 17, 2, 32
    q, k, v = _qkv(B, Nq, Nk, H, D, torch.float32, g)
    key_valid = _masks("empty_item", B, Nk, g) if masked else None
    ref = attention(q, k, v, "reference", key_valid=key_valid)
    monkeypatch.setattr(attn_mod, "_CUDNN_SDPA_ORDER", ("MATH",))
    assert_close_rel(attention(q, k, v, "cudnn", key_valid=key_valid), ref, KERNEL_RTOL[torch.float32], "cudnn")
    explained = torch._dynamo.explain(lambda q, k, v: attention(q, k, v, "cudnn", key_valid=key_valid))(q, k, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    monkeypatch.setattr(attn_mod, "_CUDNN_SDPA_ORDER", ("CUDNN_ATTENTION",))  # not a CPU kernel
    with pytest.raises(RuntimeError):
        attention(q, k, v, "cudnn", key_valid=key_valid)


def test_importability_is_cached(monkeypatch, fresh_flash_cache):
    imports = []
    real_import = attn_mod.importlib.import_module

    def counting_import(name):
        imports.append(name)
        return real_import(name)

    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setattr(attn_mod.importlib, "import_module", counting_import)
    monkeypatch.setattr(attn_mod, "_device_capability", lambda device: (9, 0))  # a pretend Hopper
    for _ in range(5):
        assert resolve_attention_backend("auto", "cpu", torch.bfloat16) in ("sdpa", "flash3")
    assert imports.count("flash_attn") == 1


def test_import_touches_neither_flash_nor_cuda():
    code = ("import sys, torch; import longcat_native.runtime.attention as a; "
            "assert 'flash_attn' not in sys.modules and 'flash_attn_interface' not in sys.modules; "
            "assert not torch.cuda.is_initialized(); "
            "assert a.resolve_attention_backend('auto', 'cpu') == 'sdpa'; "
            "assert 'flash_attn' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "varlen"])
def test_cuda_backends_match_reference_without_sync(masked):
    attn_mod._flash_module.cache_clear()
    g = _gen(10)
    B, Nq, Nk, H, D = 2, 300, 77, 4, 128
    q, k, v = (t.cuda() for t in _qkv(B, Nq, Nk, H, D, torch.bfloat16, g))
    key_valid = _masks("empty_item", B, Nk, g).cuda() if masked else None
    ref = attention(q, k, v, "reference", key_valid=key_valid)
    backends = ["sdpa", "cudnn"] + [b for b in FLASH if not attn_mod._flash_problems(b, q.device, torch.bfloat16)]
    for backend in backends:
        attention(q, k, v, backend, key_valid=key_valid)  # warm up (lazy init may sync once)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = attention(q, k, v, backend, key_valid=key_valid)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert_close_rel(out, ref, KERNEL_RTOL[torch.bfloat16], backend)
