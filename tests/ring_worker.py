"""One rank of the ring-attention tests (tests/test_ring_attention.py starts ``world`` of these).

Launched like torchrun launches a program (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT`` in the environment). Every rank runs every scenario of every layout of its world
size (world 2: ring 2; world 4: ring 2 x Ulysses 2, then ring 4) and writes what it measured to
``<out>/rank<r>.json``. A rank that raises writes its traceback there and exits 1 at once; the
test then ends the other ranks (never a hang).
"""

import os
import sys

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # gloo on the CPU: the fused kernels run interpreted

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cases import FIXTURE_ROOT, FORWARD_CASES, load_case  # noqa: E402
from helpers import max_rel_err  # noqa: E402
from gloo_launch import expect_error as _expect_error, worker_main  # noqa: E402

import longcat_native as lcn  # noqa: E402
from longcat_native.runtime import parallel as par_mod  # noqa: E402

LAYOUTS = {2: [(2, 1)], 4: [(2, 2), (4, 1)]}  # (ring, ulysses) per world size


def _load(**kw):
    return lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, device="cpu", kernels=kw.pop("kernels", "reference"),
                                          attention="sdpa", **kw)


def _forward(dit, name):
    inputs, kv, expected, meta = load_case(name)
    kwargs = dict(meta.get("kwargs", {}))
    if kv is not None:
        kwargs["kv_cache_dict"] = kv
    with torch.inference_mode():
        return dit(**inputs, **kwargs), expected


def _errors(result, expected, single):
    if isinstance(result, tuple):
        (out, kv), (s_out, s_kv) = result, single
        errs = {"golden": max_rel_err(out, expected["output"]), "single": max_rel_err(out, s_out)}
        for b, (k, v) in kv.items():
            ek, ev = expected["kv"][b]
            errs[f"kv{b}_shape_mismatch"] = float(tuple(k.shape) != tuple(ek.shape) or tuple(v.shape) != tuple(ev.shape))
            errs[f"kv{b}_golden"] = max(max_rel_err(k, ek), max_rel_err(v, ev))
            errs[f"kv{b}_single"] = max(max_rel_err(k, s_kv[b][0]), max_rel_err(v, s_kv[b][1]))
        return errs
    return {"golden": max_rel_err(result, expected["output"]), "single": max_rel_err(result, single)}


class Counter:
    """Bytes each rank sends through the context-parallel collectives (what leaves the rank:
    ``(U-1)/U`` of an all-to-all's input, all of a ring step's, the part an all-gather sends to each
    peer), and how many ring steps ran."""

    def __init__(self):
        self.bytes = {"all_to_all": 0.0, "ring": 0.0, "all_gather": 0.0}
        self.ring_steps = 0
        CP = par_mod.ContextParallel
        orig_a2a, orig_ring, orig_gather = CP._all_to_all, CP.ring_pass, CP._all_gather
        counter = self

        def a2a(cp, x):
            counter.bytes["all_to_all"] += x.numel() * x.element_size() * (cp.ulysses_size - 1) / cp.ulysses_size
            return orig_a2a(cp, x)

        def ring(cp, x):
            counter.bytes["ring"] += x.numel() * x.element_size()
            counter.ring_steps += 1
            return orig_ring(cp, x)

        def gather(cp, x):
            counter.bytes["all_gather"] += x.numel() * x.element_size() * (cp.size - 1)
            return orig_gather(cp, x)

        CP._all_to_all, CP.ring_pass, CP._all_gather = a2a, ring, gather

    def reset(self):
        self.bytes = dict.fromkeys(self.bytes, 0.0)
        self.ring_steps = 0


def _step_cache_sums(dit, name):
    """A step-cached denoise of a sampling case; the signal sums every decision saw."""
    from longcat_native.runtime.step_cache import StepCache

    seen = []
    orig = StepCache.decide

    def decide(self, sums):
        if sums is not None:
            seen.append([float(v) for v in sums.tolist()])
        return orig(self, sums)

    StepCache.decide = decide
    try:
        inputs, _, _, meta = load_case(name)
        cache = StepCache(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.5, max_warmup_steps=1)
        out = lcn.denoise(dit, inputs["noise"], inputs["prompt_embeds"], inputs["prompt_mask"], inputs["negative_embeds"],
                          inputs["negative_mask"], progress=False, cache=cache, **meta["kwargs"])
    finally:
        StepCache.decide = orig
    return out, seen, cache.stats


def run_layout(report, R, U, single, singles, counter, world):
    tag = f"ring{R}_ulysses{U}"
    dit = _load(cp_size=U, ring_size=R)
    cases, errors, checks = report["cases"], report["errors"], report["checks"].setdefault(tag, {})
    checks["repr"] = repr(dit.cp)
    checks["cp_size"], checks["ring_rank"], checks["ulysses_rank"] = dit.cp.size, dit.cp.ring_rank, dit.cp.ulysses_rank

    for name in FORWARD_CASES:
        if name == "t2v_mask_varlen":
            continue  # needs text_tokens_zero_pad=False: its own model below
        counter.reset()
        result, expected = _forward(dit, name)
        cases[f"{tag}/{name}"] = _errors(result, expected, singles[name])
        if name == "t2v_nomask":  # counted bytes vs comm_bytes_per_block
            inputs, _, _, _ = load_case(name)
            B, _, T, H, W = inputs["hidden_states"].shape
            N, C, depth = T * (H // 2) * (W // 2), dit.cfg.hidden_size, dit.cfg.depth
            f = par_mod.comm_bytes_per_block(U, B, N, C, dtype_bytes=4, ring_size=R)
            out_bytes = B * N * dit.cfg.patch_volume * dit.cfg.out_channels * 4 / (R * U) * (R * U - 1)  # the final gather, float32
            checks["comm"] = {"counted": dict(counter.bytes), "ring_steps": counter.ring_steps,
                              "formula": {k: v * depth for k, v in f.items()}, "final_gather": out_bytes}
    if (R, U) == LAYOUTS[world][0]:  # the cross-attention's key mask: per token, one layout is enough
        varlen = _load(cp_size=U, ring_size=R, text_tokens_zero_pad=False)
        result, expected = _forward(varlen, "t2v_mask_varlen")
        cases[f"{tag}/t2v_mask_varlen"] = {"golden": max_rel_err(result, expected["output"])}
        del varlen

    if R == 2 and U == 1:  # the fused kernels (norm-only op + table RoPE) under the interpreter
        fused = _load(cp_size=U, ring_size=R, kernels="triton")
        for name in ("i2v_cond1",):
            result, expected = _forward(fused, name)
            cases[f"{tag}/{name}_triton"] = {"golden": max_rel_err(result, expected["output"])}
        del fused

    # Step cache: every decision reads sums reduced over all ring x Ulysses ranks.
    out, seen, stats = _step_cache_sums(dit, "sample_t2v_cfg")
    s_out, s_seen, s_stats = singles["step_cache"]
    cases[f"{tag}/step_cache"] = {"single": max_rel_err(out, s_out)}
    checks["step_cache"] = {"sums": seen, "single_sums": s_seen, "cached": stats.get("cached_steps"),
                            "single_cached": s_stats.get("cached_steps")}

    # BSA is refused before any compute, on every rank, and the model works after.
    errors[f"{tag}/enable_bsa"] = _expect_error(dit.enable_bsa)
    dit.cfg.enable_bsa = True  # a config that has BSA on: refused at the call
    errors[f"{tag}/bsa_call"] = _expect_error(lambda: _forward(dit, "bsa_t2v"))
    dit.cfg.enable_bsa = False
    # Tokens per frame that the ring x Ulysses ranks cannot chunk: 3 x 3 tokens.
    x, t, text = torch.randn(1, 16, 2, 6, 6), torch.tensor([500.0]), torch.randn(1, 1, 4, 64)
    errors[f"{tag}/grid"] = _expect_error(lambda: dit(x, t, text))
    errors[f"{tag}/split_hw"] = _expect_error(lambda: _load(cp_size=U, ring_size=R, cp_split_hw=[1, 2]))
    with torch.inference_mode():
        result, expected = _forward(dit, "i2v_cond1")
    checks["after_error_ok"] = max_rel_err(result, expected["output"])
    return dit


def run(report, world):
    fail = os.environ.get("RING_WORKER_FAIL_RANK")
    if fail is not None:  # the harness test: one rank raises while the others enter a ring step
        dit = _load(cp_size=world // 2, ring_size=2)
        if int(os.environ["RANK"]) == int(fail):
            raise RuntimeError("this rank fails on purpose")
        _forward(dit, "t2v_nomask")
        return
    single = _load()
    singles = {name: _forward(single, name)[0] for name in FORWARD_CASES if name != "t2v_mask_varlen"}
    s_out, s_seen, s_stats = _step_cache_sums(single, "sample_t2v_cfg")
    singles["step_cache"] = (s_out, s_seen, s_stats)
    counter = Counter()
    dit = None
    for R, U in LAYOUTS[world]:
        dit = run_layout(report, R, U, single, singles, counter, world)
    if world == 2:
        # torch.compile of the ring forward: fullgraph=True fails on any graph break (the ring's
        # permute_tensor and the log-sum-exp kernels must trace). aot_eager traces what inductor
        # would get without its code generation, which on 2 CPU cores costs ~35 s per rank.
        inputs, _, expected, meta = load_case("i2v_cond1")
        torch._dynamo.reset()
        with torch.inference_mode():
            out = torch.compile(dit, fullgraph=True, backend=os.environ.get("RING_COMPILE_BACKEND", "aot_eager"))(
                **inputs, **meta["kwargs"])
        report["cases"]["compiled/i2v_cond1"] = {"golden": max_rel_err(out, expected["output"]),
                                                 "single": max_rel_err(out, singles["i2v_cond1"])}


if __name__ == "__main__":
    worker_main(run, sys.argv[1])
