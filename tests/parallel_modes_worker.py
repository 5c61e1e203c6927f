"""One rank of tests/test_parallel_modes.py (CFG-parallel, data parallel and their compositions
with Ulysses; the test starts ``world`` of these the way torchrun would: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Every scenario runs on every rank against a
single-process model with the same weights; each rank writes ``<out>/rank<r>.json``.

The last scenario, ``crash``, makes the last rank raise while the others are inside a collective:
they must fail at once (gloo sees the peer go), not wait for the group's timeout.
"""

import os
import sys
import time
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from cases import FIXTURE_ROOT, load_case  # noqa: E402
from helpers import max_rel_err  # noqa: E402
from gloo_launch import expect_error as _expect_error, worker_main  # noqa: E402

import longcat_native as lcn  # noqa: E402
from longcat_native.pipelines.tasks import generate_i2v, generate_t2v, generate_vc  # noqa: E402

FIXTURE = dict(device="cpu", kernels="reference", attention="sdpa")


def _fixture(**parallel):
    return lcn.LongCatDiT.from_pretrained(FIXTURE_ROOT, **FIXTURE, **parallel)


def _cache_model(**parallel):
    # Five blocks, so a step cache with Fn = Bn = 1 has middle blocks to skip.
    return lcn.LongCatDiT.from_config("tiny", seed=0, depth=5, kernels="reference", **parallel)


def _golden(dit, single, name):
    inputs, _, expected, meta = load_case(name)
    run = lambda model: lcn.denoise(model, inputs["noise"], inputs["prompt_embeds"], inputs["prompt_mask"],  # noqa
                                    inputs["negative_embeds"], inputs["negative_mask"],
                                    cond_latents=inputs.get("cond_latents"), progress=False, **meta["kwargs"])
    out = run(dit)
    return {"golden": max_rel_err(out, expected["latents"]), "single": max_rel_err(out, run(single))}


def _text(B=1, L=8, C=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    pe, ne = torch.randn(B, 1, L, C, generator=g), torch.randn(B, 1, L, C, generator=g)
    pm = torch.ones(B, L, dtype=torch.long)
    pm[:, L - 3:] = 0  # a padded prompt: the mask matters
    return pe, pm, ne, torch.ones(B, L, dtype=torch.long)


def _continuation(dit, single):
    """Video continuation with the KV cache (tasks.generate_vc, guided)."""
    g = torch.Generator().manual_seed(5)
    video = torch.randn(1, 16, 3, 8, 8, generator=g)
    run = lambda model: generate_vc(model, video, *_text(), num_frames=13, num_cond_frames=5, num_steps=3,  # noqa
                                    guidance_scale=4.0, enhance_hf=False, use_kv_cache=True, seed=7, progress=False)
    out = run(dit)
    return {"single": max_rel_err(out, run(single))}


def _i2v(dit, single, n_videos=1):
    g = torch.Generator().manual_seed(6)
    image = torch.randn(1, 16, 1, 8, 8, generator=g)
    run = lambda model: generate_i2v(model, image, *_text(), num_frames=9, num_steps=3, guidance_scale=3.5,  # noqa
                                     seed=11, num_videos_per_prompt=n_videos, progress=False)
    out = run(dit)
    return {"single": max_rel_err(out, run(single))}


def _step_cache(dit, single, guidance=4.0):
    """The same StepCache policy on both: decisions, signals and latents equal the single run's."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 2, 8, 8, generator=g)
    pe, ne = torch.randn(1, 1, 8, 64, generator=g), torch.randn(1, 1, 8, 64, generator=g)

    def run(model):
        c = lcn.StepCache(Fn_compute_blocks=1, Bn_compute_blocks=1, residual_diff_threshold=0.3, max_warmup_steps=2)
        out = lcn.denoise(model, noise, pe, None, ne, None, num_steps=10, guidance_scale=guidance, progress=False,
                          cache=c)
        return out, c.stats

    out, st = run(dit)
    ref, ref_st = run(single)
    sig = [(a, b) for a, b in zip(st["signal"], ref_st["signal"]) if b is not None]
    errs = {"single": max_rel_err(out, ref), "signal": max([abs(a - b) / abs(b) for a, b in sig] or [0.0])}
    return errs, {"decisions": st["decisions"], "single_decisions": ref_st["decisions"],
                  "cached_steps": st["cached_steps"]}


def _t2v(dit, single, B=1, n_videos=1, guidance=4.0):
    run = lambda model: generate_t2v(model, *_text(B=B), latent=(2, 8, 8), num_steps=3,  # noqa
                                     guidance_scale=guidance, seed=13, num_videos_per_prompt=n_videos,
                                     progress=False)
    out = run(dit)
    return {"single": max_rel_err(out, run(single)), "shape": list(out.shape)}


def run(rep, world, scenarios):
    import torch.distributed as dist

    cases, checks = rep["cases"], rep["checks"]
    single = _fixture()
    single_cache = _cache_model()

    rep["timings"]["before_cfg"] = time.perf_counter()
    if "cfg" in scenarios:  # CFG-parallel over all ranks of a 2-rank world, or x Ulysses on 4
        cp = world // 2
        dit = _fixture(cfg_parallel=True, cp_size=cp)
        tag = f"cfg2_cp{cp}"
        checks[f"{tag}_coords"] = dit.parallel.coords
        for name in ("sample_t2v_cfg", "sample_i2v_cfg"):
            cases[f"{tag}_{name}"] = _golden(dit, single, name)
        cases[f"{tag}_vc_kv"] = _continuation(dit, single)
        cases[f"{tag}_i2v"] = _i2v(dit, single)
        dit.parallel.comm_bytes.clear()
        cases[f"{tag}_t2v_batch2"] = _t2v(dit, single, B=2)
        # 3 steps, each rank sends its half [2, 16, 2, 8, 8] float32 once per step.
        checks[f"{tag}_cfg_bytes"] = dit.parallel.comm_bytes.get("cfg", 0)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            cases[f"{tag}_guidance1"] = _t2v(dit, single, guidance=1.0)
        checks[f"{tag}_guidance1_warned"] = any("no negative half" in str(x.message) for x in w)
        cases[f"{tag}_step_cache"], checks[f"{tag}_step_cache"] = _step_cache(
            _cache_model(cfg_parallel=True, cp_size=cp), single_cache)

    rep["timings"]["before_dp"] = time.perf_counter()
    if "dp" in scenarios:  # data parallel over every rank, then dp x CFG-parallel on 4
        dit = _fixture(dp_size=world)
        # world + 1 items: uneven (the first replica takes two), and 1 item: replicas left idle.
        cases[f"dp{world}_t2v_uneven"] = _t2v(dit, single, n_videos=world + 1)
        cases[f"dp{world}_t2v_one_item"] = _t2v(dit, single)
        cases[f"dp{world}_i2v_prompts2"] = _i2v(dit, single, n_videos=2)
        checks[f"dp{world}_bytes"] = dit.parallel.comm_bytes.get("dp", 0)
        if world == 4:
            both = _fixture(dp_size=2, cfg_parallel=True)
            cases["dp2_cfg2_t2v_uneven"] = _t2v(both, single, B=3)
            cases["dp2_cfg2_vc_kv"] = _continuation(both, single)

    rep["timings"]["before_errors"] = time.perf_counter()
    if "errors" in scenarios:
        cfg_json = str(FIXTURE_ROOT / "dit" / "config.json")
        errs = rep["errors"]
        # A mesh that needs twice the ranks launched: a ValueError on every rank, no collective.
        errs["mesh_world"] = _expect_error(lambda: lcn.LongCatDiT.from_config(
            cfg_json, cfg_parallel=True, dp_size=world, kernels="reference"))
        errs["mesh_heads"] = _expect_error(lambda: lcn.LongCatDiT.from_config(
            cfg_json, cfg_parallel=True, cp_size=3, kernels="reference"))
        dist.barrier()  # the group still works after both

    rep["timings"]["before_cli"] = time.perf_counter()
    if "cli" in scenarios:  # the command line in this process group (it keeps a group it did not create)
        import contextlib
        import io

        from longcat_native.cli import main as cli_main

        flags = ["--dp", "2", "--num-videos", "3"] if world == 2 else \
            ["--dp", "2", "--cfg-parallel", "--prompt", "a red fox", "a blue bird", "snow", "--num-videos", "1"]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = cli_main(["generate", "--steps", "2", "--seed", "3", "--json",
                             "--out", os.path.join(os.environ["CLI_OUT"], "v.safetensors")] + flags)
        rep["cli"] = {"code": code, "stdout": buf.getvalue(), "flags": flags}
        dist.barrier()

    rep["timings"]["before_crash"] = time.perf_counter()
    if "crash" in scenarios:  # last: the last rank fails, the others are in a collective
        dit = _fixture(dp_size=world)
        dist.barrier()
        if dist.get_rank() == world - 1:
            rep["crash_injected"] = True
            raise RuntimeError(f"injected failure on rank {world - 1}")
        t0 = time.perf_counter()
        try:
            _t2v(dit, single, n_videos=world)
            rep["errors"]["peer_failure"] = {"raised": None}
        except Exception as e:
            rep["errors"]["peer_failure"] = {"raised": type(e).__name__, "message": str(e)[:300],
                                             "seconds": time.perf_counter() - t0}
            raise


if __name__ == "__main__":
    worker_main(run, sys.argv[1], sys.argv[2].split(","))
