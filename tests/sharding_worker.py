"""One rank of the weight-sharding tests (tests/test_sharding.py starts ``world`` of these).

Launched like torchrun launches a program (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...), so the
model's own process-group setup is what runs. Every scenario runs on every rank, in one process
(one launch per world size); each rank writes what it saw to ``<out>/rank<r>.json`` and the test
asserts on all of them. A rank that fails writes its traceback and exits at once, so the other
ranks' next collective fails instead of waiting (gloo sees the closed connection).
"""

import os
import sys
import time

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cases import FIXTURE_ROOT, load_case  # noqa: E402
from helpers import max_rel_err  # noqa: E402
from gloo_launch import expect_error as _expect_error, worker_main  # noqa: E402

import longcat_native as lcn  # noqa: E402

CASES = ["t2v_mask", "i2v_cond1", "kv_continue", "skip_cross_attn"]


def _run(dit, name, **extra):
    inputs, kv, expected, meta = load_case(name)
    kwargs = dict(meta.get("kwargs", {}), **extra)
    if kv is not None:
        kwargs["kv_cache_dict"] = kv
    with torch.inference_mode():
        out = dit(**inputs, **kwargs)
    return (out[0] if isinstance(out, tuple) else out), expected["output"]


def _load(**kw):
    return lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, device="cpu", kernels="reference", attention="sdpa", **kw)


def _layout(world, cp):
    return dict(shard_weights=True, cp_size=cp, dp_size=world // cp)


def _record_gathers():
    """Every all-gather FSDP2 issues (a no-op unshard of a gathered block is not one) and every
    block's start, in order, with how many blocks are gathered or being gathered at that start."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    events, groups = [], []
    orig = FSDPParamGroup.unshard

    def unshard(self, async_op=False):
        if self._all_gather_result is None and not self.is_unsharded:
            whole = sum(fp.sharded_param.numel() * fp.sharded_param.element_size() for fp in self.fsdp_params)
            events.append(("gather", self._module_fqn, whole))  # the bytes gathered (the whole block)
        return orig(self, async_op)

    FSDPParamGroup.unshard = unshard

    def live():
        return sum(1 for g in groups if g.is_unsharded or g._all_gather_result is not None)

    return events, groups, live, lambda: setattr(FSDPParamGroup, "unshard", orig)


def run(report, world, scenarios):
    import torch.distributed as dist

    from longcat_native.runtime import sharding

    cp = 2 if "cp" in scenarios else 1
    t0 = time.perf_counter()
    dit = _load(**_layout(world, cp))
    single = _load()
    report["checks"]["load_seconds"] = time.perf_counter() - t0
    report["checks"]["sharded"] = sharding.is_sharded(dit) and not sharding.is_sharded(single)

    # Each rank's parameters are 1/N of the blocks' (the fixture's rows divide by 4), the root whole.
    mine = sharding.local_weight_bytes(dit)
    whole = sharding.local_weight_bytes(single)
    block_params = sum(p.numel() * p.element_size() for p in single.blocks.parameters())
    report["checks"]["bytes"] = {"sharded": mine["sharded"], "replicated": mine["replicated"],
                                 "block_params": block_params, "single_replicated": whole["replicated"]}
    report["checks"]["bytes"]["on_device"] = dit.weight_bytes_on_device()
    report["checks"]["bytes"]["total"] = mine["total"]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine["sharded"])
    report["checks"]["bytes"]["sum_over_ranks"] = sum(gathered)

    for name in (CASES if cp == 1 else CASES[:1]):  # under CP the one case the 4-process run affords
        out, expected = _run(dit, name)
        report["cases"][name] = {"golden": max_rel_err(out, expected), "single": max_rel_err(out, _run(single, name)[0])}

    if "prefetch" in scenarios:
        # Five blocks (the fixture has two): "one ahead" is then distinguishable from "all at once".
        deep = lcn.LongCatDiT.from_config(str(FIXTURE_ROOT / "dit" / "config.json"), device="cpu", kernels="reference",
                                          depth=5, **_layout(world, cp))
        events, groups, live, undo = _record_gathers()
        groups += [b._get_fsdp_state()._fsdp_param_group for b in deep.blocks]
        handles = [b.register_forward_pre_hook(lambda m, a, i=i: events.append(("run", f"blocks.{i}", live())))
                   for i, b in enumerate(deep.blocks)]
        _run(deep, "t2v_mask")
        _run(deep, "t2v_mask")
        for h in handles:
            h.remove()
        undo()
        report["checks"]["events"] = events
        report["checks"]["deep_block_bytes"] = [sum(p.numel() * p.element_size() for p in b.parameters())
                                                for b in deep.blocks]
        report["checks"]["gathered_after"] = live()

    if "step_cache" in scenarios:
        # A cached step skips the middle blocks: the one prefetched after the first is not left
        # gathered; decisions and outputs are the single-process run's (Ulysses over every rank).
        from test_step_cache import _inputs
        from test_step_cache import _run as _denoise

        sc_dit = lcn.LongCatDiT.from_config("tiny", seed=0, depth=5, kernels="reference", cp_size=world,
                                            shard_weights=True)
        sc_single = lcn.LongCatDiT.from_config("tiny", seed=0, depth=5, kernels="reference")
        inputs = _inputs(T=2, H=8, W=8, m=1)
        caches = [lcn.StepCache(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.45,
                                max_warmup_steps=2, warmup_interval=1)
                  for _ in range(2)]
        groups = [b._get_fsdp_state()._fsdp_param_group for b in sc_dit.blocks]
        after = []  # blocks gathered or in flight once each step's forward returned
        hook = sc_dit.register_forward_hook(lambda m, a, o: after.append(
            sum(1 for g in groups if not g.is_sharded or g._all_gather_result is not None)))
        out = _denoise(sc_dit, inputs, caches[0])
        hook.remove()
        ref = _denoise(sc_single, inputs, caches[1])
        report["cases"]["step_cache"] = {"single": max_rel_err(out, ref)}
        report["checks"]["step_cache"] = {
            "decisions_equal": caches[0].stats["decisions"] == caches[1].stats["decisions"],
            "cached_steps": caches[0].stats["cached_steps"], "steps": len(after),
            "gathered_after": max(after)}

    if "lora" in scenarios:
        inputs, _, expected, meta = load_case("lora_both")
        base = {k: v.clone() for k, v in dit.state_dict().items()}  # full tensors (a collective)
        for m in (dit, single):
            for e in meta["lora"]:
                m.load_lora(FIXTURE_ROOT / e["file"], e["key"], multiplier=e["multiplier"],
                            lora_network_dim=e["lora_network_dim"], lora_network_alpha=e["lora_network_alpha"])
        for mode in ("merged", "unmerged"):
            for m in (dit, single):
                m.lora_mode = mode
                m.enable_loras(meta["enable"])
            with torch.inference_mode():
                out = dit(**inputs, **meta.get("kwargs", {}))
                ref = single(**inputs, **meta.get("kwargs", {}))
            report["cases"][f"lora_{mode}"] = {"golden": max_rel_err(out, expected["output"]),
                                               "single": max_rel_err(out, ref)}
            for m in (dit, single):
                m.disable_all_loras()
            after = dit.state_dict()
            report["checks"][f"lora_{mode}_restored_exact"] = all(torch.equal(after[k], base[k]) for k in base)
        out, _ = _run(dit, "t2v_mask")
        report["cases"]["after_lora"] = {"single": max_rel_err(out, _run(single, "t2v_mask")[0])}

    if "quant" in scenarios:
        for mode in ("int8-weight-only", "fp8-weight-only"):
            q = _load(quantize=mode, **_layout(world, cp))
            qs = _load(quantize=mode)
            report["checks"][f"{mode}_dtype"] = str(q.blocks[0].attn.qkv.weight.dtype)
            for name in ("t2v_mask", "i2v_cond1"):
                out, expected = _run(q, name)
                report["cases"][f"{name}_{mode}"] = {"single": max_rel_err(out, _run(qs, name)[0]),
                                                     "golden_loose": max_rel_err(out, expected)}
            if mode == "int8-weight-only":  # unmerged LoRA composes; merged is refused clearly
                inputs, _, _, meta = load_case("lora_both")
                for m in (q, qs):
                    for e in meta["lora"]:
                        m.load_lora(FIXTURE_ROOT / e["file"], e["key"], multiplier=e["multiplier"],
                                    lora_network_dim=e["lora_network_dim"], lora_network_alpha=e["lora_network_alpha"])
                base = {k: v.clone() for k, v in q.state_dict().items()}
                for lmode in ("merged", "unmerged"):  # merged: requantized rows, the scales gathered
                    for m in (q, qs):
                        m.lora_mode = lmode
                        m.enable_loras(meta["enable"])
                    with torch.inference_mode():
                        a = q(**inputs, **meta.get("kwargs", {}))
                        b = qs(**inputs, **meta.get("kwargs", {}))
                    report["cases"][f"lora_{lmode}_int8"] = {"single": max_rel_err(a, b)}
                    report["checks"][f"lora_{lmode}_int8_scales_equal"] = torch.equal(
                        q.blocks[0].attn.qkv.weight_scale, qs.blocks[0].attn.qkv.weight_scale)
                    for m in (q, qs):
                        m.disable_all_loras()
                    after = q.state_dict()
                    report["checks"][f"lora_{lmode}_int8_restored_exact"] = all(
                        torch.equal(after[k].view(torch.uint8) if after[k].dtype == torch.int8 else after[k],
                                    base[k].view(torch.uint8) if base[k].dtype == torch.int8 else base[k])
                        for k in base)
            del q, qs
        # from_config: drawn tensor by tensor, the same values as the single-process model's
        r = lcn.LongCatDiT.from_config(str(FIXTURE_ROOT / "dit" / "config.json"), device="cpu", kernels="reference",
                                       seed=3, quantize="int8-weight-only", **_layout(world, cp))
        rs = lcn.LongCatDiT.from_config(str(FIXTURE_ROOT / "dit" / "config.json"), device="cpu", kernels="reference",
                                        seed=3, quantize="int8-weight-only")
        out, _ = _run(r, "t2v_mask")
        report["cases"]["from_config_int8"] = {"single": max_rel_err(out, _run(rs, "t2v_mask")[0])}

    if "compile" in scenarios:
        from longcat_native.runtime.compiled import compile_model

        c = compile_model(dit, regional=True, backend="eager")
        out, expected = _run(c, "t2v_mask")
        out2, _ = _run(c, "t2v_mask")
        report["cases"]["compiled_regional"] = {"golden": max_rel_err(out, expected),
                                                "single": max_rel_err(out2, _run(single, "t2v_mask")[0])}
        report["checks"]["compiles"] = c.stats()["compiles"]
        report["errors"]["compile_whole"] = _expect_error(lambda: compile_model(dit, backend="eager"), ValueError)

    if "errors" in scenarios:
        sd, sd1 = dit.state_dict(), single.state_dict()
        report["checks"]["state_dict_full"] = (set(sd) == set(sd1) and
                                               all(type(v) is torch.Tensor and torch.equal(v, sd1[k]) for k, v in sd.items()))
        report["errors"]["save_quantized"] = _expect_error(lambda: dit.save_quantized(os.environ["SHARD_TMP"]),
                                                           RuntimeError)
        report["errors"]["cast"] = _expect_error(lambda: dit.to(torch.float16), RuntimeError)
        report["errors"]["load_state_dict"] = _expect_error(lambda: dit.load_state_dict(sd1), RuntimeError)
        report["errors"]["streaming"] = _expect_error(lambda: dit.enable_weight_streaming(1), RuntimeError)
        report["errors"]["offload"] = _expect_error(lambda: _load(offload="blocks", **_layout(world, cp)), ValueError)
        from longcat_native.runtime.compiled import graph_runner_for

        report["errors"]["graphs"] = _expect_error(lambda: graph_runner_for(dit, graphs=True), ValueError)
        if world // cp > 1:
            from longcat_native.runtime.step_cache import StepCache

            inputs, _, _, _ = load_case("t2v_mask")
            report["errors"]["step_cache_dp"] = _expect_error(
                lambda: dit(**inputs, step_cache=StepCache()), ValueError)
            from longcat_native.pipelines.sampler import denoise

            # one video over more replicas than videos: refused on every rank before any gather
            text = inputs["encoder_hidden_states"][:1]
            report["errors"]["dp_without_work"] = _expect_error(
                lambda: denoise(dit, torch.randn(1, 16, 1, 4, 4), text, num_steps=1, guidance_scale=1.0,
                                progress=False), ValueError)
        # Loading in turns: the ranks' loads do not overlap, and one rank's failure is every rank's error.
        def timed(_):
            start = time.monotonic()
            time.sleep(0.2)
            return (start, time.monotonic())

        spans = [None] * world
        dist.all_gather_object(spans, sharding.load_in_turns(dit.parallel, timed, None))
        report["checks"]["turns_disjoint"] = all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))

        def fails_on_last(_):
            if dist.get_rank() == world - 1:
                raise ValueError("a bad tensor")
            return 1

        report["errors"]["turn_failure"] = _expect_error(
            lambda: sharding.load_in_turns(dit.parallel, fails_on_last, None),
            ValueError if dist.get_rank() == world - 1 else RuntimeError)
        # After the errors the ranks are still in step.
        out, _ = _run(dit, "t2v_mask")
        report["cases"]["after_errors"] = {"single": max_rel_err(out, _run(single, "t2v_mask")[0])}


if __name__ == "__main__":
    worker_main(run, sys.argv[1], sys.argv[2].split(","))
