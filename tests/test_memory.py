"""The memory tracer (runtime/memory.py): exact counts on known allocations, real tensors and
fake tensors agreeing on the model's forward, the declared BSA selection scratch against its
implementation, the fused forward's live set at the real shapes, and (GPU) the trace against
``torch.cuda.max_memory_allocated``."""

import pytest
import torch

import longcat_native.kernels.bsa_select as bsa_select_mod
from longcat_native.runtime.dit import LongCatDiT
from longcat_native.runtime.memory import MemoryTracer, allocator_bytes, trace_forward_memory, trace_memory

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_allocator_rounding():
    assert [allocator_bytes(n) for n in (1, 512, 513, 4000)] == [512, 512, 1024, 4096]


def test_tracer_counts_allocations_not_views_or_in_place_and_frees():
    x = torch.randn(1000)  # made before the trace: not counted

    def f(x):
        a = x * 2  # 4000 bytes -> 4096
        b = a.view(10, 100)  # a view: nothing
        b.add_(1)  # in place: nothing
        c = a + 1  # 4096 more: the peak, 8192
        del a, b
        d = c.sum()  # 512; a and b are freed by now
        e = c[:10].clone()  # 512
        return d, e

    (d, e), tr = trace_memory(f, x)
    assert tr.peak_bytes == 8192 and tr.peak_op == "aten.add"
    assert tr.end_bytes == 1024  # d and e: c died with the call
    assert sorted(t.nbytes for t in tr.live_at_peak) == [4096, 4096]
    assert tr.ops == 7  # mul, view, add_, add, sum, slice, clone: views are ops too
    del d, e


def test_tracer_adds_declared_workspace_while_the_op_runs():
    x = torch.randn(64)
    with MemoryTracer(workspace={"aten.exp": lambda t: 10_000}) as tracer:
        y = x.exp()  # 512 output + 10,000 scratch
        z = y + 1  # 512 + 512: below the exp's peak
    tr = tracer.result()
    assert tr.peak_bytes == 512 + 10_000 and tr.peak_workspace_bytes == 10_000 and tr.peak_op == "aten.exp"
    del z


def _tiny_inputs(cfg, batch, latent, text_len, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, *latent, generator=g).to(dtype)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, 1, text_len, cfg.caption_channels, generator=g).to(dtype)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    return x, t, text, mask


@pytest.mark.parametrize("bsa", [False, True], ids=["dense", "bsa"])
def test_fake_trace_equals_the_real_forward(bsa):
    """The same fused forward on real tensors (triton interpreter / GPU) and on fake ones allocates
    the same storages: every fake implementation matches its kernel's output sizes, and the fake
    trace's numbers are the real run's."""
    batch, latent, text_len = 2, (4, 8, 8), 7  # BSA: a 4x4x4 token grid in 2x2x2 chunks
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dit = LongCatDiT.from_config("tiny", device=device, dtype=torch.float32, kernels="triton", attention="sdpa")
    if bsa:
        dit.enable_bsa()
    args = [a.to(device) for a in _tiny_inputs(dit.config, batch, latent, text_len, torch.float32)]
    with torch.inference_mode():
        out, real = trace_memory(dit, *args, collect_cycles=True)  # the interpreter leaves cycles
    assert torch.isfinite(out).all()
    fake = trace_forward_memory("tiny", batch=batch, latent=latent, text_len=text_len, bsa=bsa, dtype=torch.float32)
    assert fake["trace"].peak_bytes == real.peak_bytes > 0
    assert fake["trace"].peak_op == real.peak_op and fake["trace"].ops == real.ops
    assert fake["weights"] == sum(allocator_bytes(p.numel() * 4) for p in dit.parameters())


@pytest.mark.parametrize(
    "sparsity,cdf,dtype,grouped",
    [(0.5, None, torch.float16, False), (0.75, None, torch.float32, False), (0.5, None, torch.float16, True),
     (None, 0.6, torch.float16, False), (0.25, 0.9, torch.float32, True)],
)
def test_bsa_select_workspace_bounds_its_implementation(monkeypatch, sparsity, cdf, dtype, grouped):
    """WORKSPACE_BYTES' figure for bsa_select, against the implementation's own allocations traced
    op by op (the tracer sees an op's inside only when the implementation is called directly)."""
    if grouped:
        monkeypatch.setattr(bsa_select_mod, "_SELECT_SCORE_ELEMS", 2 * 128 * 128)  # 2 of 3 heads per group
    # The pooling launch fills its output in place (allocating nothing on a GPU); the interpreter's
    # host copies of q and k would count, so a random in-place fill stands in for it here.
    monkeypatch.setattr(bsa_select_mod, "_bsa_pool_launch", lambda x, geom, out, **kw: out.normal_())
    B, H, D = 1, 3, 16
    grid, chunk = (8, 8, 16), (2, 2, 2)  # 128 chunks of 8 tokens
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, 1024, D, generator=g).to(device, dtype)
    k = torch.randn(B, H, 1024, D, generator=g).to(device, dtype)
    args = (q, k, list(grid), list(grid), sparsity, cdf, list(chunk), list(chunk))
    with MemoryTracer(workspace={}) as tracer:
        idx, counts = bsa_select_mod._bsa_select_impl(*args)
    tr = tracer.result()
    measured = tr.peak_bytes - tr.end_bytes  # the tracer adds the declared bytes to the outputs
    declared = bsa_select_mod._bsa_select_workspace(*args)
    assert tr.end_bytes == allocator_bytes(idx.numel() * 4) + allocator_bytes(counts.numel() * 4)
    assert measured > 0 and measured <= declared <= measured * 1.02, (measured, declared)
    del idx, counts


def test_fused_forward_holds_only_the_ffn_live_set_at_real_shapes():
    """The real config at 480p (CFG batch 2) and at 720p (BSA): the fused forward's peak is the
    FFN's x + w13 output + SwiGLU output, (C + 2F + F) x N x 2 bytes, plus under 1%. It held
    15 [N, C]-sized tensors before the block handed its activations over (19.4 GiB at 720p)."""
    for batch, latent, bsa, N in [(2, (24, 60, 104), False, 37440), (1, (48, 88, 160), True, 168960)]:
        r = trace_forward_memory("longcat-video", batch=batch, latent=latent, bsa=bsa)
        C, F = 4096, 11008
        ffn_set = batch * N * (C + 3 * F) * 2
        assert r["tokens"] == N and r["trace"].peak_op == "longcat_native.swiglu", r["trace"].peak_site
        assert ffn_set <= r["activation_peak"] < 1.01 * ffn_set
        assert abs(r["weights"] - 13.58e9 * 2) < 0.01 * 13.58e9 * 2
    assert r["peak"] < 80 * 1024 ** 3 / 2  # the 720p forward in half of an 80 GB card (issue 9: fits)


def test_kv_cache_is_an_input_not_an_activation():
    # 6 cached frames for 2 new ones: the attention over the concatenated keys and values is then
    # the peak (with fewer, the FFN's live set stays the largest; the block input is freed before
    # the attention runs).
    base = trace_forward_memory("tiny", batch=1, latent=(2, 8, 8), text_len=4)
    cached = trace_forward_memory("tiny", batch=1, latent=(2, 8, 8), text_len=4, kv_frames=6)
    cfg = LongCatDiT.from_config("tiny", device="meta").config
    cache = 2 * cfg.depth * allocator_bytes(6 * 16 * cfg.hidden_size * 2)  # k and v per block, bf16
    assert cached["inputs"] - base["inputs"] == cache
    assert cached["activation_peak"] > base["activation_peak"]  # keys and values concatenated with the cache
    assert cached["trace"].peak_op == "aten.scaled_dot_product_attention"


@needs_cuda
def test_trace_matches_max_memory_allocated_on_cuda():
    """A real-width model (2 blocks) at a 480p-like latent on the GPU: the fake trace's peak against
    what the caching allocator counted (~470 MB), within 3% + 8 MiB (per-call library workspaces,
    e.g. an SDPA backend's, are the allocator's and not the trace's)."""
    kw = dict(batch=2, latent=(8, 30, 52), text_len=512, dtype=torch.bfloat16)
    fake = trace_forward_memory("longcat-video", config_overrides=dict(depth=2), **kw)
    dit = LongCatDiT.from_config("longcat-video", depth=2, device="cuda", dtype=torch.bfloat16, attention="sdpa")
    args = [a.cuda() for a in _tiny_inputs(dit.config, 2, (8, 30, 52), 512, torch.bfloat16)]
    with torch.inference_mode():
        dit(*args)  # warm-up: cuBLAS handles and workspaces exist before the measured call
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = dit(*args)
        torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    assert abs(measured - fake["activation_peak"]) <= 0.03 * measured + 8 * 2**20, (measured, fake["activation_peak"])
    del out


@pytest.mark.parametrize("policy", [dict(Fn_compute_blocks=1), dict(Fn_compute_blocks=2, Bn_compute_blocks=1,
                                                                        enable_taylorseer=True),
                                    dict(Fn_compute_blocks=1, enable_taylorseer=True, taylorseer_order=2)],
                         ids=["dbcache", "F2B1-taylor1", "taylor2"])
def test_step_cache_buffers_traced_as_a_run_holds_them(policy):
    """A step cache's device state, traced on fake tensors (steps of a cached run), against what a
    real run with CFG holds after each of its steps (full and cached ones alike); its peak is the
    plain forward's plus the buffers and at most one [B, N, C] stream (the stream entering block 0
    through the first blocks; with TaylorSeer the one entering the middle blocks through them).
    It held two before the Fn residual became the reference ahead of the middle blocks."""
    from longcat_native.pipelines.sampler import denoise
    from longcat_native.runtime.memory import storage_bytes
    from longcat_native.runtime.step_cache import StepCache

    latent, depth = (3, 8, 8), {"depth": 4}
    kw = dict(batch=2, latent=latent, text_len=8, dtype=torch.float32, config_overrides=depth)
    plain = trace_forward_memory("tiny", **kw)
    given = StepCache(**policy)
    traced = trace_forward_memory("tiny", step_cache=given, **kw)
    assert given.runs == [] and given.buffers is None  # traced on a copy of its parameters
    dit = LongCatDiT.from_config("tiny", seed=0, kernels="reference", dtype=torch.float32, **depth)
    g = torch.Generator().manual_seed(0)
    noise, pe, ne = torch.randn(1, 16, *latent, generator=g), torch.randn(1, 1, 8, 64, generator=g), torch.randn(
        1, 1, 8, 64, generator=g)
    cache, held = StepCache(residual_diff_threshold=0.5, max_warmup_steps=1, **policy), []
    denoise(dit, noise, pe, None, ne, None, progress=False, cache=cache, num_steps=5,
            callback=lambda i, t, x: held.append(storage_bytes(cache.buffers.tensors())))
    assert 0 < cache.stats["cached_steps"] < 5, cache.stats["decisions"]
    assert held == [traced["step_cache_bytes"]] * 5 and held[0] > 0
    stream = allocator_bytes(2 * 3 * 4 * 4 * dit.config.hidden_size * 4)  # [B, N, C] float32
    more = traced["activation_peak"] - plain["activation_peak"]
    sums = allocator_bytes(8)  # the signal's two float32 sums, alive until the step ends
    assert traced["step_cache_bytes"] < more <= traced["step_cache_bytes"] + stream + sums, (more, stream)
    assert plain["step_cache_bytes"] == 0
    with pytest.raises(ValueError, match="kv_frames"):
        trace_forward_memory("tiny", kv_frames=2, step_cache=StepCache(Fn_compute_blocks=1), **kw)


def test_step_cache_at_the_real_shapes():
    """The 480p CFG base of the 13.6B model: DBCache's buffers are the Fn residual and the middle
    residual in bf16, TaylorSeer order 2's the Fn residual and three float32 differences (4 GiB:
    why plan_memory traces them); the peak grows by the buffers and at most one bf16 stream."""
    from longcat_native.runtime.step_cache import StepCache

    N, C, B = 37440, 4096, 2
    bf16, f32 = allocator_bytes(B * N * C * 2), allocator_bytes(B * N * C * 4)
    plain = trace_forward_memory("longcat-video", batch=B, latent=(24, 60, 104))
    db = trace_forward_memory("longcat-video", batch=B, latent=(24, 60, 104), step_cache=StepCache())
    assert db["step_cache_bytes"] == 2 * bf16 + 512  # + the scalars
    assert db["activation_peak"] - plain["activation_peak"] <= db["step_cache_bytes"] + bf16 + 512  # + the sums
    ts = trace_forward_memory("longcat-video", batch=B, latent=(24, 60, 104),
                              step_cache=StepCache(enable_taylorseer=True, taylorseer_order=2))
    assert ts["step_cache_bytes"] == bf16 + 3 * f32 + 512
    assert ts["step_cache_bytes"] > 3.9 * 2**30


def test_fake_trace_of_cached_steps_equals_the_real_run():
    """The steps trace_forward_memory runs for a step cache (full, full, cached; TaylorSeer order
    2, Bn 1) on real tensors: the same allocations as on fake ones."""
    from longcat_native.runtime.tracing import _trace_cached_steps
    from longcat_native.runtime.step_cache import StepCache

    batch, latent, text_len = 2, (2, 4, 4), 5
    policy = StepCache(Fn_compute_blocks=1, Bn_compute_blocks=1, enable_taylorseer=True, taylorseer_order=2)
    dit = LongCatDiT.from_config("tiny", device="cpu", dtype=torch.float32, kernels="triton", attention="sdpa", depth=3)
    args = _tiny_inputs(dit.config, batch, latent, text_len, torch.float32)
    with torch.inference_mode():
        held, real = trace_memory(_trace_cached_steps, dit, policy, *args, collect_cycles=True)
    fake = trace_forward_memory("tiny", batch=batch, latent=latent, text_len=text_len, dtype=torch.float32,
                                config_overrides={"depth": 3}, step_cache=policy)
    assert fake["step_cache_bytes"] == held > 0
    assert fake["trace"].peak_bytes == real.peak_bytes and fake["trace"].ops == real.ops
