"""One rank of the context-parallel tests (tests/test_parallel.py starts ``world`` of these).

Launched like torchrun launches a program: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in the environment, so the model's own process-group setup is
what gets tested. Every scenario runs on every rank; each rank writes what it saw to
``<out>/rank<r>.json`` (errors measured, exceptions named) and the test asserts on all files.
"""

import os
import sys
import time

import torch

# gloo on the CPU even where a GPU exists (one GPU cannot host several ranks), so the fused
# kernels run under the interpreter; set before triton is imported (tests/conftest.py).
os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cases import FIXTURE_ROOT, FORWARD_CASES, load_case  # noqa: E402
from helpers import max_rel_err  # noqa: E402
from gloo_launch import expect_error as _expect_error, worker_main  # noqa: E402

import longcat_native as lcn  # noqa: E402


def _forward(dit, name, enable_bsa=False):
    inputs, kv, expected, meta = load_case(name)
    kwargs = dict(meta.get("kwargs", {}))
    if kv is not None:
        kwargs["kv_cache_dict"] = kv
    if enable_bsa:
        dit.enable_bsa()
    with torch.inference_mode():
        result = dit(**inputs, **kwargs)
    dit.disable_bsa()
    return result, expected


def _errors(result, expected, single):
    """Errors of the CP result vs the golden data and vs the single-process result."""
    if isinstance(result, tuple):
        out, kv = result
        s_out, s_kv = single
        errs = {"golden": max_rel_err(out, expected["output"]), "single": max_rel_err(out, s_out)}
        for b, (k, v) in kv.items():
            ek, ev = expected["kv"][b]
            errs[f"kv{b}_golden"] = max(max_rel_err(k, ek), max_rel_err(v, ev))
            errs[f"kv{b}_single"] = max(max_rel_err(k, s_kv[b][0]), max_rel_err(v, s_kv[b][1]))
            errs[f"kv{b}_shape_mismatch"] = float(tuple(k.shape) != tuple(ek.shape))
        return errs
    return {"golden": max_rel_err(result, expected["output"]), "single": max_rel_err(result, single)}


def run(report, world, scenarios):
    import torch.distributed as dist

    # The error for a rank count that does not match the group comes before the group exists
    # only when it is initialized already; here the model initializes it from the environment.
    dit = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, device="cpu", kernels="reference", attention="sdpa", cp_size=world)
    single = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, device="cpu", kernels="reference", attention="sdpa")
    report["checks"]["split"] = list(dit.cp_split_hw)
    report["checks"]["repr_has_cp"] = "cp=ContextParallel" in repr(dit)
    # Count the exchanges, so a model that silently ran unsplit cannot pass.
    from longcat_native.runtime.parallel import ContextParallel

    calls = report["checks"]["collective_calls"] = {"all_to_all": 0, "all_gather": 0}
    for name, key in (("_all_to_all", "all_to_all"), ("_all_gather", "all_gather")):
        def counted(self, x, _orig=getattr(ContextParallel, name), _key=key):
            calls[_key] += 1
            return _orig(self, x)
        setattr(ContextParallel, name, counted)

    if "forward" in scenarios:
        for name in FORWARD_CASES:
            result, expected = _forward(dit, name)
            report["cases"][name] = _errors(result, expected, _forward(single, name)[0])
        for name in ("bsa_t2v", "bsa_cond"):
            result, expected = _forward(dit, name, enable_bsa=True)
            report["cases"][name] = _errors(result, expected, _forward(single, name, enable_bsa=True)[0])
        varlen = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, device="cpu", kernels="reference", attention="sdpa", cp_size=world,
                                                text_tokens_zero_pad=False)
        result, expected = _forward(varlen, "t2v_mask_varlen")
        report["cases"]["t2v_mask_varlen"] = {"golden": max_rel_err(result, expected["output"])}
        report["checks"]["forward_collective_calls"] = dict(calls)

    if "lora" in scenarios:
        inputs, _, expected, meta = load_case("lora_both")
        for e in meta["lora"]:
            dit.load_lora(FIXTURE_ROOT / e["file"], e["key"], multiplier=e["multiplier"],
                          lora_network_dim=e["lora_network_dim"], lora_network_alpha=e["lora_network_alpha"])
        dit.enable_loras(meta["enable"])
        with torch.inference_mode():
            out = dit(**inputs, **meta.get("kwargs", {}))
        report["cases"]["lora_both"] = {"golden": max_rel_err(out, expected["output"])}
        dit.disable_all_loras()

    if "sample" in scenarios:
        for name in ("sample_t2v_cfg", "sample_i2v_cfg"):
            inputs, _, expected, meta = load_case(name)
            out = lcn.denoise(dit, inputs["noise"], inputs["prompt_embeds"], inputs["prompt_mask"],
                              inputs["negative_embeds"], inputs["negative_mask"],
                              cond_latents=inputs.get("cond_latents"), progress=False, **meta["kwargs"])
            report["cases"][name] = {"golden": max_rel_err(out, expected["latents"])}
        # Ranks that pass other noise and prompts still denoise rank 0's (broadcast in denoise).
        inputs, _, expected, meta = load_case("sample_t2v_cfg")
        r = dist.get_rank()
        out = lcn.denoise(dit, inputs["noise"] + r, inputs["prompt_embeds"] * (1 + r), inputs["prompt_mask"],
                          inputs["negative_embeds"], inputs["negative_mask"], progress=False, **meta["kwargs"])
        report["cases"]["sample_t2v_cfg_rank0_inputs"] = {"golden": max_rel_err(out, expected["latents"])}

    if "triton" in scenarios:
        fused = lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, device="cpu", kernels="triton", attention="sdpa", cp_size=world)
        for name in ("i2v_cond1", "kv_continue"):
            result, expected = _forward(fused, name)
            report["cases"][f"{name}_triton"] = {"golden": max_rel_err(result, expected["output"])}
        result, expected = _forward(fused, "bsa_cond", enable_bsa=True)
        report["cases"]["bsa_cond_triton"] = {"golden": max_rel_err(result, expected["output"])}

    if "compile" in scenarios:
        inputs, _, expected, _ = load_case("t2v_mask")
        explain = torch._dynamo.explain(dit)(**inputs)
        report["checks"]["graph_breaks"] = explain.graph_break_count
        with torch.inference_mode():
            out = torch.compile(dit, fullgraph=True)(**inputs)
        report["cases"]["t2v_mask_compiled"] = {"golden": max_rel_err(out, expected["output"])}

    if "errors" in scenarios:
        x, t, text = torch.randn(1, 16, 2, 8, 12), torch.tensor([500.0]), torch.randn(1, 1, 4, 64)
        sh, sw = dit.cp_split_hw
        # A token grid whose H does not split (3 rows over split_h > 1) or W (5 columns).
        bad = torch.randn(1, 16, 2, 2 * 3, 2 * 5) if sh > 1 else torch.randn(1, 16, 2, 8, 2 * 5)
        report["errors"]["grid"] = _expect_error(lambda: dit(bad, t, text), ValueError)
        # The group is still usable: nothing was left half-exchanged.
        with torch.inference_mode():
            report["checks"]["after_error_ok"] = bool(torch.isfinite(dit(x, t, text)).all())
        report["errors"]["heads"] = _expect_error(
            lambda: lcn.LongCatDiT.from_config(str(FIXTURE_ROOT / "dit" / "config.json"), device="cpu", cp_size=world,
                                               num_heads=world // 2 if world > 2 else 1, kernels="reference"),
            ValueError)
        report["errors"]["split_product"] = _expect_error(
            lambda: lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, device="cpu", cp_size=world, cp_split_hw=[world, 2]), ValueError)
        report["errors"]["world_mismatch"] = _expect_error(  # heads divisible, so the rank count is what fails
            lambda: lcn.LongCatDiT.from_config(str(FIXTURE_ROOT / "dit" / "config.json"), device="cpu", cp_size=world * 2,
                                               num_heads=world * 2, hidden_size=32 * world * 2, kernels="reference"),
            ValueError)
        # A collective some rank never joins ends in an error after the group's timeout.
        import datetime

        slow = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=3))
        from longcat_native.runtime.parallel import ContextParallel

        cp = ContextParallel(slow, tuple(dit.cp_split_hw), 4)
        qkv = torch.randn(1, 4, 3, 4, 8)  # a 2 x 2 tile: [B, n_local, q|k|v, heads, D]
        if dist.get_rank() != 0:
            t_start = time.perf_counter()
            report["errors"]["timeout"] = _expect_error(lambda: cp.tokens_to_heads(qkv, (1, 2 * sh, 2 * sw)),
                                                        RuntimeError)
            report["errors"]["timeout"]["seconds"] = time.perf_counter() - t_start
        dist.barrier()  # the default group is unaffected


if __name__ == "__main__":
    worker_main(run, sys.argv[1], sys.argv[2].split(","))
