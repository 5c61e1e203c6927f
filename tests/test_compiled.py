"""The compiled runtime (runtime/compiled.py): whole-forward torch.compile with zero graph breaks
on both kernel paths, compiled == eager, recompiles counted and bounded, and the CUDA-graph
runner's CPU-testable logic (fallback warning, keys, LRU, text padding) with a fake capture."""

import warnings

import pytest
import torch
from helpers import assert_close_rel, requires_cuda

import longcat_native as lcn
from longcat_native.runtime.compiled import CUDAGraphRunner, compile_model


def _tiny(kernels="reference", **over):
    cfg = dict(depth=1, caption_channels=24)
    cfg.update(over)
    return lcn.LongCatDiT.from_config("tiny", seed=1, kernels=kernels, **cfg)


def _inputs(B=1, T=2, H=4, W=4, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, T, H, W, generator=g)
    t = torch.rand(B, generator=g) * 1000
    text = torch.randn(B, 1, L, 24, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[:, L - 2:] = 0
    return x, t, text, mask


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_whole_forward_compiles_without_graph_breaks_and_matches_eager(kernels):
    torch._dynamo.reset()
    dit = _tiny(kernels)
    args = _inputs()
    explained = torch._dynamo.explain(dit)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    cm = compile_model(dit)
    with torch.no_grad():
        eager = dit(*args)
        out = cm(*args)
    assert_close_rel(out, eager, 1e-5, f"compiled {kernels}")
    s = cm.stats()
    assert s["compiles"] == 1 and s["recompiles"] == 0 and s["mode"] == "default"
    assert cm.config is dit.config  # attribute access falls through to the model


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_regional_compile_shares_one_graph_across_blocks(kernels):
    """regional=True: every block runs through one compiled graph (fullgraph, so no breaks), the
    result matches eager, the model itself is left uncompiled, and only a new shape recompiles."""
    torch._dynamo.reset()
    dit = _tiny(kernels, depth=3)
    cm = compile_model(dit, regional=True)
    a, a2, b = _inputs(), _inputs(seed=4), _inputs(H=6)
    with torch.no_grad():
        assert_close_rel(cm(*a), dit(*a), 1e-5, f"regional {kernels}")
        assert cm.stats()["compiles"] == 1 and cm.stats()["regional"] is True  # 3 blocks, one graph
        assert_close_rel(cm(*a2), dit(*a2), 1e-5, "same shape, new values")
        assert cm.stats()["compiles"] == 1
        with pytest.warns(UserWarning, match="recompiling"):
            out_b = cm(*b)
        assert_close_rel(out_b, dit(*b), 1e-5, "new shape")
        assert cm.stats()["compiles"] == 2
    torch._dynamo.reset()


def test_recompiles_are_counted_reported_and_bounded():
    torch._dynamo.reset()
    dit = _tiny()
    cm = compile_model(dit, backend="eager", recompile_limit=2)
    a, b, c = _inputs(H=4), _inputs(H=6), _inputs(H=8)
    with torch.no_grad():
        cm(*a)
        cm(*a)
        assert cm.stats()["compiles"] == 1
        with pytest.warns(UserWarning, match="recompiling"):
            out_b = cm(*b)
        s = cm.stats()
        assert s["compiles"] == 2 and s["recompiles"] == 1 and s["calls"] == 3
        assert [16, 4, 4] != s["graphs"][1]["input_shapes"][0][-3:]
        # Past the limit dynamo runs the forward eagerly: no third graph, the result is still right.
        with pytest.warns(UserWarning, match="recompile limit"):
            out_c = cm(*c)
        assert cm.stats()["compiles"] == 2 and cm.stats()["eager_calls_past_limit"] == 1
        assert_close_rel(out_b, dit(*b), 1e-5, "recompiled")
        assert_close_rel(out_c, dit(*c), 1e-5, "past the limit")
    torch._dynamo.reset()


def test_graph_runner_falls_back_on_cpu_with_one_warning():
    dit = _tiny()
    runner = CUDAGraphRunner(dit)
    args = _inputs()
    with torch.no_grad():
        with pytest.warns(UserWarning, match="not on a CUDA device"):
            out = runner(*args)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            out2 = runner(*args)
        ref = dit(*args)
    assert torch.equal(out, ref) and torch.equal(out2, ref)
    assert runner.stats()["fallbacks"] == {"the model is not on a CUDA device": 2}
    assert runner.dtype == dit.dtype and runner.config is dit.config


def _fake_capture(log):
    """Stands in for CUDA graph capture: 'replay' reruns the forward on the static buffers and
    writes into the static output, which is what a graph replay does."""

    def capture(fn, static):
        log.append({k: None if v is None else tuple(v.shape) for k, v in static.items()})
        out = fn(**static)

        def replay():
            out.copy_(fn(**static))

        return replay, out

    return capture


def test_graph_runner_keys_lru_and_static_buffers():
    dit = _tiny()
    log = []
    runner = CUDAGraphRunner(dit, max_graphs=2, capture_fn=_fake_capture(log))
    A, A2, B, C = _inputs(H=4), _inputs(H=4, seed=5), _inputs(H=6), _inputs(H=8)
    with torch.no_grad():
        for args in (A, B, A2, C):
            assert_close_rel(runner(*args), dit(*args), 1e-6, "replay")
        ka = runner.key({"hidden_states": A[0], "timestep": A[1], "encoder_hidden_states": A[2],
                         "encoder_attention_mask": A[3]}, 0, False)
        keys = runner.keys()
        assert len(keys) == 2 and keys[0] == ka  # B was evicted (least recently used), C is newest
        assert runner.stats() == {"graphs": 2, "max_graphs": 2, "captures": 3, "replays": 4, "evictions": 1,
                                  "weight_invalidations": 0, "fallbacks": {}, "uncapturable_keys": 0}
        # Flags are part of the key.
        runner(*A, num_cond_latents=1)
        runner(*A, skip_crs_attn=True)
        assert runner.stats()["captures"] == 5
        # So are BSA on/off and its parameters (Python values a graph bakes in).
        k_off = runner.key({"hidden_states": A[0]}, 0, False)
        dit.enable_bsa()
        k_bsa = runner.key({"hidden_states": A[0]}, 0, False)
        dit.config.bsa_params = dict(dit.config.bsa_params, sparsity=0.75)
        assert len({k_off, k_bsa, runner.key({"hidden_states": A[0]}, 0, False)}) == 3
        dit.disable_bsa()
        assert runner.key({"hidden_states": A[0]}, 0, False) == k_off
        assert_close_rel(runner(*A, num_cond_latents=1), dit(*A, num_cond_latents=1), 1e-6, "cond")
        # Paths that cannot be captured fall back, warning once per reason.
        with pytest.warns(UserWarning, match="return_kv"):
            out, kv = runner(*A, return_kv=True)
        assert len(kv) == 1


def test_graph_runner_capture_failure_falls_back_once():
    dit = _tiny()

    def broken(fn, static):
        raise RuntimeError("operation not permitted when stream is capturing")

    runner = CUDAGraphRunner(dit, capture_fn=broken)
    args = _inputs()
    with torch.no_grad():
        with pytest.warns(UserWarning, match="capture failed"):
            out = runner(*args)
        assert torch.equal(out, dit(*args))
        with pytest.warns(UserWarning, match="earlier"):
            runner(*args)
    assert runner.stats()["uncapturable_keys"] == 1


def _weight_storages(dit):
    """What a captured graph has baked in: weight addresses, LoRA branch addresses and scales."""
    ptrs = [p.data_ptr() for p in dit.parameters()]
    for m in dit.modules():
        ptrs += [(down.data_ptr(), up.data_ptr(), scale) for down, up, scale, _ in getattr(m, "lora_branches", ())]
    return ptrs


def _address_bound_capture(dit):
    """Like _fake_capture, but a replay reads the weights at the addresses of capture time and
    uses the LoRA scales of capture time, as a real graph does: if any of them changed since, it
    yields garbage (NaN, standing in for a stale result or whatever freed memory now holds)."""

    def capture(fn, static):
        out = fn(**static)
        captured = _weight_storages(dit)

        def replay():
            if _weight_storages(dit) != captured:
                out.fill_(float("nan"))
            else:
                out.copy_(fn(**static))

        return replay, out

    return capture


def test_graph_runner_recaptures_when_weights_move():
    """A graph reads weights by address. Unmerged LoRA switches (new branch tensors) and
    ``dit.to(dtype)`` (new parameter storage) drop the graphs, so replays never read stale or
    freed memory; merged switches write in place and keep them."""
    from cases import FIXTURE_ROOT

    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT)
    dit.load_lora(FIXTURE_ROOT / "lora" / "cfg_step_lora.safetensors", "cfg_step", lora_network_dim=4)
    runner = CUDAGraphRunner(dit, capture_fn=_address_bound_capture(dit))
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 16, 2, 4, 4, generator=g), torch.rand(1, generator=g) * 1000,
            torch.randn(1, 1, 6, dit.config.caption_channels, generator=g))

    def check(what):
        with torch.no_grad():
            assert_close_rel(runner(*args), dit(*args), 1e-6, what)

    dit.lora_mode = "unmerged"
    dit.enable_loras(["cfg_step"])
    check("unmerged, first capture")
    check("unmerged, replay")
    assert runner.stats()["captures"] == 1 and runner.stats()["weight_invalidations"] == 0
    dit.lora_dict["cfg_step"].set_multiplier(0.5)
    dit.enable_loras(["cfg_step"])  # same active set and mode (same key), new branch tensors
    check("unmerged, re-enabled with another multiplier")
    assert runner.stats()["captures"] == 2 and runner.stats()["weight_invalidations"] == 1

    dit.lora_mode = "merged"  # merged in place: graphs stay valid across switches
    check("merged")
    captures = runner.stats()["captures"]
    dit.disable_all_loras()
    check("base weights restored in place")
    dit.enable_loras(["cfg_step"])
    check("merged again")
    assert runner.stats()["weight_invalidations"] == 2  # only the unmerged -> merged change of branches
    assert runner.stats()["captures"] == captures + 1  # one new key (no LoRA), no invalidation

    dit.to(torch.float64)
    check("after dit.to(float64)")
    assert runner.stats()["weight_invalidations"] == 3
    # A runner over lcn.compile(dit) watches the same weights.
    assert CUDAGraphRunner(compile_model(dit)).weights_fingerprint() == runner.weights_fingerprint() != ()


@requires_cuda
def test_graph_runner_unmerged_lora_switch_on_cuda():
    from cases import FIXTURE_ROOT

    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, device="cuda", dtype=torch.float32, kernels="triton")
    dit.load_lora(FIXTURE_ROOT / "lora" / "cfg_step_lora.safetensors", "cfg_step", lora_network_dim=4)
    dit.lora_mode = "unmerged"
    runner = CUDAGraphRunner(dit)
    g = torch.Generator().manual_seed(0)
    args = [a.cuda() for a in (torch.randn(1, 16, 2, 4, 4, generator=g), torch.rand(1, generator=g) * 1000,
                               torch.randn(1, 1, 6, dit.config.caption_channels, generator=g))]
    with torch.no_grad():
        for mult in (1.0, 0.5):
            dit.lora_dict["cfg_step"].set_multiplier(mult)
            dit.enable_loras(["cfg_step"])
            assert_close_rel(runner(*args), dit(*args), 1e-4, f"multiplier {mult}")
    assert runner.stats()["captures"] == 2 and runner.stats()["weight_invalidations"] == 1


@pytest.mark.parametrize("zero_pad", [False, True])
def test_graph_runner_text_padding(zero_pad):
    dit = _tiny(text_tokens_zero_pad=zero_pad)
    log = []
    runner = CUDAGraphRunner(dit, text_len=8, capture_fn=_fake_capture(log))
    short, longer = _inputs(L=5), _inputs(L=7, seed=2)
    with torch.no_grad():
        for args in (short, longer):
            assert_close_rel(runner(*args), dit(*args), 1e-5, f"padded zero_pad={zero_pad}")
    if zero_pad:  # padding would change the result: never padded, one graph per text length
        assert [c["encoder_hidden_states"][2] for c in log] == [5, 7]
    else:  # exact with masked padding: both prompts share the 8-token graph
        assert len(log) == 1 and log[0]["encoder_hidden_states"][2] == 8
        assert log[0]["encoder_attention_mask"] == (1, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_runner_cuda_replay_matches_eager():
    dit = lcn.LongCatDiT.from_config("tiny", seed=1, device="cuda", dtype=torch.float32, kernels="triton",
                                     caption_channels=24, text_tokens_zero_pad=False)
    runner = CUDAGraphRunner(dit, text_len=8)
    args = [a.cuda() for a in _inputs(L=5)]
    with torch.no_grad():
        out1 = runner(*args)
        out2 = runner(*[a.cuda() for a in _inputs(L=6, seed=3)])
        assert_close_rel(out1, dit(*args), 1e-4, "graph replay")
    assert runner.stats()["captures"] == 1 and runner.stats()["replays"] == 2
    assert out2.shape == out1.shape


def test_graph_runner_is_a_drop_in_for_denoise():
    """The sampler takes the runner where it takes the DiT: one capture (CFG batch 2), one replay per step."""
    dit = _tiny()
    runner = CUDAGraphRunner(dit, capture_fn=_fake_capture([]))
    g = torch.Generator().manual_seed(0)
    noise, pos, neg = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 1, 5, 24, generator=g), \
        torch.randn(1, 1, 5, 24, generator=g)
    kw = dict(negative_embeds=neg, num_steps=3, guidance_scale=4.0, progress=False)
    assert torch.equal(lcn.denoise(runner, noise, pos, **kw), lcn.denoise(dit, noise, pos, **kw))
    assert runner.stats()["captures"] == 1 and runner.stats()["replays"] == 3


# -- graphs in the pipelines (graph_runner_for, what denoise calls each step) -------------------

def test_pipelines_use_graphs_transparently_where_they_apply(monkeypatch):
    """With graphs applicable (CUDA stands in: the device check is patched, capture is faked),
    plain ``denoise(dit, ...)`` and the pipelines on it replay one graph per step; the runner lives
    on the model, so a second call replays the graph captured by the first; the KV-cache path
    falls back with one message."""
    from longcat_native import pipelines
    from longcat_native.runtime import compiled

    dit = _tiny()
    monkeypatch.setattr(compiled, "_graphs_supported", lambda model: True)
    log = []
    dit.graph_runner = runner = CUDAGraphRunner(dit, capture_fn=_fake_capture(log))
    assert compiled.graph_runner_for(dit) is runner
    g = torch.Generator().manual_seed(0)
    noise, pos, neg = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 1, 5, 24, generator=g), \
        torch.randn(1, 1, 5, 24, generator=g)
    kw = dict(negative_embeds=neg, num_steps=3, guidance_scale=4.0, progress=False)
    eager = lcn.denoise(dit, noise, pos, graphs=False, **kw)
    assert runner.stats()["replays"] == 0
    assert torch.equal(lcn.denoise(dit, noise, pos, **kw), eager)
    assert runner.stats()["captures"] == 1 and runner.stats()["replays"] == 3
    out = pipelines.generate_t2v(dit, pos, None, neg, None, latent=(3, 4, 4), num_steps=2, seed=0, progress=False)
    assert out.shape == (1, 16, 3, 4, 4)
    assert runner.stats()["captures"] == 1 and runner.stats()["replays"] == 5  # same shape: no new capture
    cond = torch.randn(1, 16, 1, 4, 4, generator=g)
    with pytest.warns(UserWarning, match="kv_cache_dict"):
        cached = lcn.denoise(dit, noise, pos, cond_latents=cond, use_kv_cache=True, **kw)
    assert torch.equal(cached, lcn.denoise(dit, noise, pos, cond_latents=cond, use_kv_cache=True, graphs=False, **kw))


def test_graph_runner_for_choices():
    from longcat_native.runtime.compiled import graph_runner_for

    dit = _tiny()
    assert graph_runner_for(dit) is dit  # CPU: quietly no graphs
    assert graph_runner_for(dit, False) is dit
    with pytest.raises(ValueError, match="graphs=True needs a LongCatDiT on a CUDA device"):
        graph_runner_for(dit, True)
    with pytest.raises(ValueError, match="graphs must be"):
        graph_runner_for(dit, "yes")
    runner = CUDAGraphRunner(dit)
    assert graph_runner_for(runner) is runner  # a runner passed in is used as it is
    with pytest.raises(ValueError, match="graphs=True"):
        lcn.denoise(dit, torch.randn(1, 16, 2, 4, 4), torch.randn(1, 1, 5, 24), num_steps=1, guidance_scale=1.0,
                    progress=False, graphs=True)


@requires_cuda
def test_pipelines_capture_real_graphs_on_cuda():
    dit = _tiny().cuda()
    g = torch.Generator().manual_seed(0)
    noise, pos, neg = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 1, 5, 24, generator=g), \
        torch.randn(1, 1, 5, 24, generator=g)
    kw = dict(negative_embeds=neg, num_steps=3, guidance_scale=4.0, progress=False)
    eager = lcn.denoise(dit, noise, pos, graphs=False, **kw)
    graphed = lcn.denoise(dit, noise, pos, **kw)
    from longcat_native.runtime.compiled import graph_runner_for

    stats = graph_runner_for(dit).stats()
    assert stats["captures"] == 1 and stats["replays"] == 3, stats
    assert_close_rel(graphed, eager, 1e-5, "graphed denoise")


def test_release_graphs_drops_the_pipeline_runner(monkeypatch):
    from longcat_native.runtime import compiled

    dit = _tiny()
    monkeypatch.setattr(compiled, "_graphs_supported", lambda model: True)
    runner = compiled.graph_runner_for(dit)
    assert isinstance(runner, CUDAGraphRunner) and compiled.graph_runner_for(dit) is runner  # kept on the model
    assert compiled.release_graphs(dit) is True
    assert dit.graph_runner is None and compiled.release_graphs(dit) is False
    assert compiled.graph_runner_for(dit) is not runner  # a fresh one next time


def test_meta_model_checks_cp_without_a_process_group():
    dit = lcn.LongCatDiT.from_config("longcat-video", device="meta", cp_size=4)
    assert dit.cp is None and dit.cp_split_hw == [2, 2]
    with pytest.raises(ValueError, match="num_heads=32 is not divisible by cp_size=3"):
        lcn.LongCatDiT.from_config("longcat-video", device="meta", cp_size=3)
