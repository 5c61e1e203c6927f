"""Weight streaming (runtime/streaming.py, docs/design/streaming.md): streamed models give output
bit-identical to the all-resident model, with the staging buffers poisoned between calls and before
every block; any call order of before_block; blocks of any dtype; the max_memory rule; loading with
offload="blocks"; compile; hostile inputs; the benchmark script at tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from longcat_native.kernels._common import allocator_bytes
from longcat_native.runtime import streaming
from longcat_native.runtime.dit import LongCatDiT
from longcat_native.runtime.names import parse_bytes

DEPTH = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(kernels="reference", depth=DEPTH, **kw):
    return LongCatDiT.from_config("tiny", depth=depth, kernels=kernels, device="cpu", **kw)


def _inputs(T=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, T, 4, 4, generator=g)
    t = torch.tensor([500.0])
    text = torch.randn(1, 1, 8, 64, generator=g)
    return x, t, text


def _poison(streamer, keep=None):
    for s, buf in enumerate(streamer.staging):
        if s != keep:
            buf.fill_(255)  # NaN in float16/bfloat16/float32, -1 in int8


def _poison_before_every_block(streamer):
    """Before each before_block, every staging set but the one holding the pending prefetch is
    poisoned: a block can only compute right from a copy made for it."""
    real = streamer.before_block

    def hook(i):
        pending = streamer._pending
        _poison(streamer, None if pending is None else streamer._slot[pending[0]])
        real(i)

    streamer.before_block = hook


def _snapshot(dit):
    return {n: t.detach().clone() for n, t in list(dit.named_parameters()) + list(dit.named_buffers())}


# -- parse_bytes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 * 2**30), ("24 GB", 24 * 10**9), ("1.5g", int(1.5 * 2**30)), ("512MiB", 512 * 2**20),
    ("4096", 4096), ("4096 B", 4096), ("2TiB", 2 * 2**40), ("1e3", 1000), (7, 7), (0, 0), ("10kb", 10_000),
])
def test_parse_bytes_good(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["-1GB", "GiB", "", "24XB", "nan", "inf", "1.2.3", "1e400GB", True, -3, None,
                                 float("nan"), [1], "24 G B"])
def test_parse_bytes_bad(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


# -- bit identity --------------------------------------------------------------------------------

@pytest.mark.parametrize("kernels", ["reference", "triton"])
@pytest.mark.parametrize("resident", [0, 1, DEPTH - 1, DEPTH])
def test_streamed_output_bit_identical(kernels, resident):
    dit = _model(kernels)
    x, t, text = _inputs()
    with torch.no_grad():
        ref = dit(x, t, text)
        before = _snapshot(dit)
        st = dit.enable_weight_streaming(resident)
        if resident == DEPTH:
            assert st is None and dit.weight_streamer is None
        else:
            assert st is dit.weight_streamer and st.streamed == tuple(range(resident, DEPTH))
            _poison_before_every_block(st)
        for _ in range(3):
            if st is not None:
                _poison(st)
            assert torch.equal(dit(x, t, text), ref)
        if st is not None:
            stats = st.memory_stats()
            assert stats["copies"] == 3 * (DEPTH - resident)
            assert stats["bytes_copied"] == 3 * stats["bytes_per_forward"]
            assert stats["streamed_blocks"] == DEPTH - resident
            assert stats["host_bytes"] == stats["bytes_per_forward"]
            assert dit.weight_bytes_on_device() == stats["device_bytes"]
        dit.disable_weight_streaming()
        after = _snapshot(dit)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(dit(x, t, text), ref)


def test_disable_restores_separate_device_storage():
    dit = _model()
    before = _snapshot(dit)
    st = dit.enable_weight_streaming(1)
    staging_ptrs = {b.untyped_storage().data_ptr() for b in st.staging}
    w = dit.blocks[2].ffn.w13.weight
    assert w.untyped_storage().data_ptr() in staging_ptrs
    # blocks 1 and 3 (positions 0 and 2) share staging set 0; block 2 has set 1
    assert dit.blocks[1].ffn.w13.weight.data_ptr() == dit.blocks[3].ffn.w13.weight.data_ptr()
    assert dit.blocks[1].ffn.w13.weight.data_ptr() != w.data_ptr()
    # the adaLN modulation is used outside the block's call: it stays resident
    assert dit.blocks[2].adaLN_modulation.weight.untyped_storage().data_ptr() not in staging_ptrs
    dit.disable_weight_streaming()
    assert dit.weight_streamer is None
    ptrs = [p.untyped_storage().data_ptr() for p in dit.parameters()]
    assert len(set(ptrs)) == len(ptrs)  # every tensor in its own storage again
    assert all(torch.equal(before[n], t) for n, t in dit.named_parameters())
    # caching-allocator sizes (512-byte blocks), what max_memory_allocated counts
    assert dit.weight_bytes_on_device() == sum(allocator_bytes(p.untyped_storage().nbytes()) for p in dit.parameters())


def test_return_kv_and_kv_cache():
    dit = _model()
    cond, t, text = _inputs(T=1, seed=1)
    x, _, _ = _inputs(T=2, seed=2)
    with torch.no_grad():
        ref_out, ref_kv = dit(cond, t, text, return_kv=True, skip_crs_attn=True)
        ref_next = dit(x, t, text, kv_cache_dict=ref_kv)
        st = dit.enable_weight_streaming(1)
        _poison_before_every_block(st)
        out, kv = dit(cond, t, text, return_kv=True, skip_crs_attn=True)
        _poison(st)
        nxt = dit(x, t, text, kv_cache_dict=kv)
    assert torch.equal(out, ref_out) and torch.equal(nxt, ref_next)
    assert kv.keys() == ref_kv.keys()
    assert all(torch.equal(a, b) for i in kv for a, b in zip(kv[i], ref_kv[i]))


def test_before_block_out_of_order():
    """Skipped and repeated blocks (a step cache), any order: block i's weights are right after
    before_block(i), whatever came before."""
    dit = _model(depth=6)
    before = _snapshot(dit)
    st = dit.enable_weight_streaming(1)
    order = [0, 3, 1, 2, 5, 5, 4, 1, 0, 2, 3, 4, 5, 2]
    for i in order:
        _poison(st, None if st._pending is None else st._slot[st._pending[0]])
        st.before_block(i)
        for n, p in dit.blocks[i].named_parameters():
            assert torch.equal(p, before[f"blocks.{i}.{n}"]), (i, n)
    # a forward whose loop skips blocks 2 and 4 (a step cache) after such a history
    x, t, text = _inputs()
    with torch.no_grad():
        ref = dit(x, t, text)  # the streamed model itself, every block
        st.before_block(3)
        st.before_block(5)
        _poison(st, st._slot[st._pending[0]] if st._pending else None)
        assert torch.equal(dit(x, t, text), ref)
    dit.disable_weight_streaming()
    with torch.no_grad():
        assert torch.equal(dit(x, t, text), ref)


def test_block_with_int8_tensors_and_float32_buffers():
    """Generic over dtypes: int8 weights + float32 scales (what quantization adds) stream like the rest."""
    dit = _model()
    g = torch.Generator().manual_seed(3)
    for b in dit.blocks:
        for lin in (b.attn.qkv, b.ffn.w2):
            lin.register_buffer("qweight", torch.randint(-128, 127, lin.weight.shape, generator=g, dtype=torch.int8))
            lin.register_buffer("weight_scale", torch.rand(lin.weight.shape[0], generator=g) + 0.5)
        b.ffn.register_buffer("step", torch.tensor(7, dtype=torch.int64))
    before = _snapshot(dit)
    x, t, text = _inputs()
    with torch.no_grad():
        ref = dit(x, t, text)
        st = dit.enable_weight_streaming(0)
        for i in range(DEPTH):
            _poison(st, None if st._pending is None else st._slot[st._pending[0]])
            st.before_block(i)
            for n, v in list(dit.blocks[i].named_parameters()) + list(dit.blocks[i].named_buffers()):
                assert v.dtype == before[f"blocks.{i}.{n}"].dtype
                assert torch.equal(v, before[f"blocks.{i}.{n}"]), (i, n)
        assert dit.blocks[1].ffn.w2.qweight.untyped_storage().data_ptr() == st.staging[1].untyped_storage().data_ptr()
        _poison(st)
        assert torch.equal(dit(x, t, text), ref)
        dit.disable_weight_streaming()
    after = _snapshot(dit)
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_composes_with_quantized_model():
    """The quantize work's int8 weights (if present in this checkout) stream unchanged."""
    try:
        dit = _model(quantize="int8-weight-only")
    except (TypeError, ValueError, ImportError, AttributeError) as e:
        pytest.skip(f"quantized construction unavailable: {e}")
    x, t, text = _inputs()
    with torch.no_grad():
        ref = dit(x, t, text)
        st = dit.enable_weight_streaming(1)
        _poison_before_every_block(st)
        _poison(st)
        assert torch.equal(dit(x, t, text), ref)
        dtypes = {b.dtype for b in dit.blocks[2].buffers()} | {p.dtype for p in dit.blocks[2].parameters()}
        dit.disable_weight_streaming()
        assert torch.equal(dit(x, t, text), ref)
    assert len(dtypes) > 1


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _assert_same_state(got, want, what):
    assert sorted(got) == sorted(want), what
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(_bits(got[k]), _bits(want[k])), f"{what}: {k}"


@pytest.mark.parametrize("quantize", [None, "int8-weight-only", "fp8"])
def test_state_dict_of_a_streaming_model_is_its_weights(quantize):
    """state_dict() of a streaming model (and of a streamed block) holds the real weights, the
    host copies, not the staging buffers (which hold whichever block was copied last and are
    shared between blocks); load_state_dict writes the host copies, so the next forward uses the
    loaded weights. Depth 4 with one resident block: blocks 1 and 3 share a staging set."""
    ref = _model(quantize=quantize)
    other = _model(quantize=quantize, seed=7)
    dit = _model(quantize=quantize, offload="blocks", resident_blocks=1)
    assert dit.weight_streamer is not None and dit.weight_streamer.streamed == (1, 2, 3)
    x, t, text = _inputs()
    with torch.no_grad():
        dit(x, t, text)  # the staging sets now hold blocks 2 and 3
    _assert_same_state(dit.state_dict(), ref.state_dict(), "streaming model")
    _assert_same_state(dit.blocks[1].state_dict(), ref.blocks[1].state_dict(), "streamed block")
    _assert_same_state(dit.blocks[1].ffn.state_dict(), ref.blocks[1].ffn.state_dict(), "submodule of a streamed block")
    sd = dit.state_dict()
    assert sd["blocks.1.ffn.w2.weight"].data_ptr() != sd["blocks.3.ffn.w2.weight"].data_ptr()
    dit.load_state_dict(other.state_dict())
    _assert_same_state(dit.state_dict(), other.state_dict(), "after load_state_dict")
    assert dit.weight_streamer.attached and dit.blocks[2].ffn.w13.weight.untyped_storage().data_ptr() in {
        b.untyped_storage().data_ptr() for b in dit.weight_streamer.staging}
    with torch.no_grad():
        assert torch.equal(dit(x, t, text), other(x, t, text))
    for target in (dit, dit.blocks[2], dit.blocks[2].ffn.w2):  # assign=True would swap the staging views out
        with pytest.raises(RuntimeError, match=r"assign=True\) is not possible while the model streams"):
            target.load_state_dict(ref.state_dict() if target is dit else {}, strict=False, assign=True)
    _assert_same_state(dit.state_dict(), other.state_dict(), "after the refused assign")
    dit.disable_weight_streaming()  # the hooks go with the streamer: the block's own tensors again
    _assert_same_state(dit.state_dict(), other.state_dict(), "after disable")


def test_unmerged_lora_composes_merged_refused(fixtures_dir):
    dit = LongCatDiT.from_pretrained(fixtures_dir, kernels="reference", device="cpu")
    dit.load_lora(fixtures_dir / "lora" / "cfg_step_lora.safetensors", "a", lora_network_dim=4)
    x, t, text = _inputs()
    dit.lora_mode = "unmerged"
    dit.enable_loras(["a"])
    with torch.no_grad():
        ref = dit(x, t, text)
        st = dit.enable_weight_streaming(0)
        _poison(st)
        assert torch.equal(dit(x, t, text), ref)
        with pytest.raises(ValueError, match="unmerged"):
            dit.lora_mode = "merged"
        dit.disable_all_loras()
        with pytest.raises(ValueError, match="unmerged"):
            dit.lora_mode = "merged"
            dit.enable_loras(["a"])
    dit.disable_weight_streaming()
    dit.lora_mode = "merged"
    dit.enable_loras(["a"])
    with pytest.raises(ValueError, match="merged LoRAs"):
        dit.enable_weight_streaming(0)


def test_streaming_applies_loras_unmerged(fixtures_dir):
    """A model that starts streaming in the default merged mode with no LoRA active switches to
    unmerged, so a LoRA step (the pipelines' distilled pass, the refinement) runs while streaming
    and gives the plain model's unmerged result."""
    lora_file = fixtures_dir / "lora" / "cfg_step_lora.safetensors"
    plain = LongCatDiT.from_pretrained(fixtures_dir, kernels="reference", device="cpu")
    plain.lora_mode = "unmerged"
    plain.load_lora(lora_file, "a", lora_network_dim=4)
    plain.enable_loras(["a"])
    dit = LongCatDiT.from_pretrained(fixtures_dir, kernels="reference", device="cpu", offload="blocks",
                                     resident_blocks=1)
    assert dit.lora_mode == "unmerged"
    dit.load_lora(lora_file, "a", lora_network_dim=4)
    dit.enable_loras(["a"])
    x, t, text = _inputs()
    with torch.no_grad():
        assert torch.equal(dit(x, t, text), plain(x, t, text))


# -- the max_memory rule -------------------------------------------------------------------------

def _need(dit, r, reserve, num_staging=2):
    """The documented rule, recomputed independently."""
    blocks = list(dit.blocks)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    full = [nbytes(list(b.parameters())) for b in blocks]
    kept = [nbytes(list(b.adaLN_modulation.parameters())) for b in blocks]
    packed = [streaming.block_layout(b)[1] for b in blocks]
    other = nbytes(list(dit.parameters())) - sum(full)
    staging = sorted(packed[r:], reverse=True)[:min(num_staging, len(blocks) - r)]
    return other + sum(full[:r]) + sum(kept[r:]) + sum(staging) + reserve


def _expected(dit, budget, reserve):
    """The rule: the largest resident count whose need fits (need is not monotone near the depth:
    with few streamed blocks the staging sets can cost as much as the blocks themselves)."""
    fits = [r for r in range(len(dit.blocks) + 1) if _need(dit, r, reserve) <= budget]
    return max(fits) if fits else None


def test_max_memory_rule_on_meta_model():
    meta = LongCatDiT.from_config("tiny", depth=DEPTH, device="meta")
    reserve = 1000
    needs = [_need(meta, r, reserve) for r in range(DEPTH + 1)]
    for budget in sorted(set(needs + [n - 1 for n in needs] + [n + 1 for n in needs])):
        want = _expected(meta, budget, reserve)
        if want is None:
            with pytest.raises(ValueError, match="too small"):
                streaming.plan_resident_blocks(meta, budget, activation_reserve=reserve)
        else:
            assert streaming.plan_resident_blocks(meta, budget, activation_reserve=reserve) == want, budget
    assert streaming.plan_resident_blocks(meta, "1TiB", activation_reserve="1MiB") == DEPTH
    with pytest.raises(ValueError, match=r"too small.*staging sets.*activation reserve"):
        streaming.plan_resident_blocks(meta, min(needs) - 1, activation_reserve=reserve)


def test_max_memory_rule_real_model_numbers():
    """The 13.6B config in bf16: a 24 GiB budget with a 6 GiB reserve (shapes only); every block
    resident at 40 GiB; 16 GiB is too small (the kept-resident parts + staging + reserve)."""
    meta = LongCatDiT.from_config("longcat-video", device="meta", dtype=torch.bfloat16)
    for budget in ("24GiB", "40GiB", "80GiB"):
        r = streaming.plan_resident_blocks(meta, budget, activation_reserve="6GiB")
        assert r == _expected(meta, parse_bytes(budget), 6 * 2**30)
    assert 0 < streaming.plan_resident_blocks(meta, "24GiB", activation_reserve="6GiB") < 48
    assert streaming.plan_resident_blocks(meta, "40GiB", activation_reserve="6GiB") == 48
    with pytest.raises(ValueError, match="too small"):
        streaming.plan_resident_blocks(meta, "5GiB", activation_reserve="6GiB")


def test_enable_with_max_memory_and_default_reserve():
    dit = _model(depth=8)
    need = _need(dit, 3, 0)
    st = dit.enable_weight_streaming(max_memory=need, activation_reserve=0)
    assert st.memory_stats()["resident_blocks"] == _expected(dit, need, 0)
    dit.disable_weight_streaming()
    reserve = streaming.default_activation_reserve(dit)  # traced 480p CFG peak
    assert reserve > 0
    need = _need(dit, 1, reserve)
    st = dit.enable_weight_streaming(max_memory=need)
    assert st.memory_stats()["resident_blocks"] == _expected(dit, need, reserve)
    dit.disable_weight_streaming()


# -- loading -------------------------------------------------------------------------------------

def test_from_pretrained_offload_equals_normal_load(fixtures_dir):
    x, t, text = _inputs()
    normal = LongCatDiT.from_pretrained(fixtures_dir, kernels="reference", device="cpu")
    with torch.no_grad():
        ref = normal(x, t, text)
    for resident in (0, 1):
        dit = LongCatDiT.from_pretrained(fixtures_dir, kernels="reference", device="cpu", offload="blocks",
                                         resident_blocks=resident)
        st = dit.weight_streamer
        assert st is not None and st.attached and st.streamed == tuple(range(resident, 2))
        _poison(st)
        with torch.no_grad():
            assert torch.equal(dit(x, t, text), ref)
        dit.disable_weight_streaming()
        assert all(torch.equal(a, b) for a, b in zip(dit.parameters(), normal.parameters()))
    roomy = LongCatDiT.from_pretrained(fixtures_dir, kernels="reference", device="cpu", offload="blocks",
                                       max_memory="1GiB")
    assert roomy.weight_streamer is None  # everything fits: nothing streams
    with torch.no_grad():
        assert torch.equal(roomy(x, t, text), ref)


def test_from_config_offload_same_values():
    ref = _model()
    dit = _model(offload="blocks", resident_blocks=1)
    x, t, text = _inputs()
    _poison(dit.weight_streamer)
    with torch.no_grad():
        assert torch.equal(dit(x, t, text), ref(x, t, text))
    meta = LongCatDiT.from_config("tiny", depth=DEPTH, device="meta", offload="blocks", resident_blocks=1)
    assert meta.weight_streamer is None and next(meta.parameters()).is_meta


# -- compile -------------------------------------------------------------------------------------

@pytest.mark.parametrize("regional", [True, False])
def test_compile_streamed_model(regional):
    import longcat_native as lcn

    torch._dynamo.reset()
    x, t, text = _inputs()
    dit = _model(depth=2)
    with torch.no_grad():
        eager = dit(x, t, text)
        compiled_resident = lcn.compile(dit, regional=regional, fullgraph=regional)(x, t, text)
        torch._dynamo.reset()
        st = dit.enable_weight_streaming(0)
        # whole-model: before_block is torch.compiler.disable'd, a graph break per block (fullgraph=False)
        c = lcn.compile(dit, regional=regional, fullgraph=regional)
        outs = []
        for _ in range(2):
            _poison(st)
            outs.append(c(x, t, text))
        stats = c.stats()
    scale = eager.abs().max()
    for o in outs:
        assert torch.equal(o, outs[0])
        assert float((o - compiled_resident).abs().max() / scale) <= 1e-5
        assert float((o - eager).abs().max() / scale) <= 1e-5
    if regional:
        assert stats["compiles"] == 1 and torch.equal(outs[0], compiled_resident)
    else:
        assert stats["compiles"] >= 2  # graphs split at each before_block
    torch._dynamo.reset()


def test_whole_model_fullgraph_compile_refuses_clearly():
    import longcat_native as lcn

    torch._dynamo.reset()
    dit = _model(depth=2)
    dit.enable_weight_streaming(0)
    with pytest.raises(Exception, match="disable"):
        with torch.no_grad():
            lcn.compile(dit)(*_inputs())
    torch._dynamo.reset()


# -- hostile inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-1, DEPTH + 1, True, "2", 1.0])
def test_bad_resident_blocks(bad):
    dit = _model()
    with pytest.raises(ValueError, match="resident_blocks"):
        dit.enable_weight_streaming(bad)
    assert dit.weight_streamer is None


def test_hostile_arguments(fixtures_dir):
    dit = _model()
    with pytest.raises(ValueError, match="not both"):
        dit.enable_weight_streaming(1, max_memory="1GiB")
    with pytest.raises(ValueError, match="byte count"):
        dit.enable_weight_streaming(max_memory="lots")
    with pytest.raises(ValueError, match="byte count"):
        dit.enable_weight_streaming(max_memory="1GiB", activation_reserve="-1")
    with pytest.raises(ValueError, match="num_staging"):
        dit.enable_weight_streaming(1, num_staging=0)
    with pytest.raises(ValueError, match="offload"):
        _model(offload="disk")
    with pytest.raises(ValueError, match='offload="blocks"'):
        _model(max_memory="1GiB")
    with pytest.raises(ValueError, match="byte count"):
        LongCatDiT.from_pretrained(fixtures_dir, device="cpu", offload="blocks", max_memory="24 parsecs")
    with pytest.raises(ValueError, match="too small"):
        LongCatDiT.from_pretrained(fixtures_dir, device="cpu", offload="blocks", max_memory="1KiB")
    with pytest.raises(ValueError, match="meta"):
        LongCatDiT.from_config("tiny", device="meta").enable_weight_streaming(0)


def test_moving_a_streaming_model_is_refused():
    dit = _model()
    dit.enable_weight_streaming(1)
    for move in (lambda: dit.to("cpu"), lambda: dit.to(torch.float16), dit.half, dit.float):
        with pytest.raises(RuntimeError, match="disable_weight_streaming"):
            move()
    dit.disable_weight_streaming()
    dit.to(torch.float16)
    assert dit.dtype == torch.float16


def test_enable_twice_replans():
    dit = _model()
    x, t, text = _inputs()
    with torch.no_grad():
        ref = dit(x, t, text)
        dit.enable_weight_streaming(1)
        st = dit.enable_weight_streaming(3)
        assert st.streamed == (3,)
        _poison(st)
        assert torch.equal(dit(x, t, text), ref)


# -- the benchmark script ------------------------------------------------------------------------

def test_bench_streaming_script_tiny():
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", "streaming.py"), "--size", "tiny",
                           "--repeats", "1", "--copy-mib", "8"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["bench"] == "streaming"
    for key in ("resident_forward_ms", "streamed_forward_ms", "bytes_per_forward", "h2d_bandwidth_gbps",
                "streamed_blocks", "estimated_overhead_fraction", "outputs_bit_identical"):
        assert key in last, key
    assert last["outputs_bit_identical"] is True
    assert last["bytes_per_forward"] > 0 and last["h2d_bandwidth_gbps"] > 0
