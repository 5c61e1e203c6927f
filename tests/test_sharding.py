"""Weight sharding (``shard_weights=True``, FSDP2, runtime/sharding.py): gloo on the CPU with 2 and
4 processes, one launch per world size running every scenario of tests/sharding_worker.py, and
the memory-plan arithmetic in one process.

Multi-process: the official golden cases within the float32 bound and equal to the single-process
model (1e-5); LoRA merged and unmerged, restored bit-exactly; int8/fp8 weights equal to the
single-process quantized model; regional compile; Ulysses cp 2 composed with sharding over 4
ranks; each rank's parameter bytes 1/N of the blocks'; the order of FSDP2's all-gathers (block
i+1 gathered while block i runs, never more than two blocks); the refusals.
"""

from pathlib import Path

import pytest
import torch
from helpers import MODEL_RTOL
from test_parallel import _launch as _launch_cp

from longcat_native.runtime import sharding

WORKER = Path(__file__).parent / "sharding_worker.py"

SINGLE_RTOL = 1e-5


def _launch(world, scenarios, tmp_path, timeout_s=240):
    return _launch_cp(world, scenarios, tmp_path, timeout_s=timeout_s, worker=WORKER, SHARD_TMP=str(tmp_path / "save"))


def _check_cases(reports):
    for rep in reports:
        assert rep["cases"], f"rank {rep['rank']} ran no case"
        for name, errs in rep["cases"].items():
            if "golden" in errs:
                assert errs["golden"] <= MODEL_RTOL, f"rank {rep['rank']} {name}: golden error {errs['golden']:.3g}"
            if "single" in errs:
                assert errs["single"] <= SINGLE_RTOL, f"rank {rep['rank']} {name}: vs single {errs['single']:.3g}"


def _check_bytes(reports, world):
    for rep in reports:
        b = rep["checks"]["bytes"]
        assert rep["checks"]["sharded"]
        assert b["sum_over_ranks"] == b["block_params"]  # every byte on exactly one rank
        assert b["sharded"] == b["block_params"] // world  # the fixture's rows divide by 1, 2, 4
        assert b["replicated"] == b["single_replicated"]  # the root (and block buffers) whole
        assert b["on_device"] == b["total"] == b["sharded"] + b["replicated"]  # dit.weight_bytes_on_device()


def test_sharding_two_ranks(tmp_path):
    reports = _launch(2, ["prefetch", "step_cache", "lora", "quant", "compile", "errors"], tmp_path)
    _check_cases(reports)
    _check_bytes(reports, 2)
    for rep in reports:
        c, e = rep["checks"], rep["errors"]
        assert c["lora_merged_restored_exact"] and c["lora_unmerged_restored_exact"]
        assert all(c[f"lora_{m}_int8_{w}"] for m in ("merged", "unmerged") for w in ("scales_equal", "restored_exact"))
        assert {"lora_merged", "lora_unmerged", "after_lora", "lora_merged_int8", "lora_unmerged_int8", "from_config_int8",
                "compiled_regional", "t2v_mask_int8-weight-only", "t2v_mask_fp8-weight-only"} <= set(rep["cases"])
        assert c["int8-weight-only_dtype"] == "torch.int8" and c["fp8-weight-only_dtype"] == "torch.float8_e4m3fn"
        assert c["compiles"] == 1  # one compiled block body for every block
        assert c["state_dict_full"]
        for name, exc in (("compile_whole", "ValueError"),
                          ("save_quantized", "RuntimeError"), ("cast", "RuntimeError"), ("offload", "ValueError"),
                          ("load_state_dict", "RuntimeError"), ("streaming", "RuntimeError"),
                          ("graphs", "ValueError"), ("step_cache_dp", "ValueError"),
                          ("dp_without_work", "ValueError")):
            assert e[name]["raised"] == exc and not e[name].get("wrong_type"), (name, e[name])
        assert "shard_weights" in e["offload"]["message"]
        assert "every replica must denoise at least one video" in e["dp_without_work"]["message"]
        assert c["turns_disjoint"]  # the ranks loaded one after another
        last = rep["rank"] == rep["world"] - 1
        assert e["turn_failure"]["raised"] == ("ValueError" if last else "RuntimeError"), e["turn_failure"]
        assert "a bad tensor" in e["turn_failure"]["message"] and (last or "rank 1 failed" in e["turn_failure"]["message"])
        sc = c["step_cache"]
        assert sc["decisions_equal"] and sc["cached_steps"] >= 1 and sc["gathered_after"] == 0, sc
        _check_prefetch(c["events"], depth=5, forwards=2)
        # Communication counted: each forward gathers every block once, whole ((N-1)/N received).
        gathered = sum(e[2] for e in c["events"] if e[0] == "gather")
        assert gathered == 2 * sum(c["deep_block_bytes"])
        assert c["gathered_after"] == 0  # every block resharded after the forward


def _check_prefetch(events, depth, forwards):
    """One all-gather per block per forward; block i+1's is issued after block i-1 ran and before
    block i runs (one ahead, not all at once); at most two blocks gathered while one runs."""
    gathers = [e for e in events if e[0] == "gather"]
    runs = [e for e in events if e[0] == "run"]
    assert len(gathers) == depth * forwards and len(runs) == depth * forwards, events
    per = len(events) // forwards
    for f in range(forwards):
        ev = events[f * per:(f + 1) * per]
        pos = {(kind, name): k for k, (kind, name, *_) in enumerate(ev)}
        for i in range(depth):
            assert pos[("gather", f"blocks.{i}")] < pos[("run", f"blocks.{i}")]
            if i + 1 < depth:
                assert pos[("gather", f"blocks.{i + 1}")] < pos[("run", f"blocks.{i}")], ev  # prefetched
            if i >= 1 and i + 1 < depth:
                assert pos[("gather", f"blocks.{i + 1}")] > pos[("run", f"blocks.{i - 1}")], ev  # not earlier
        assert max(e[2] for e in ev if e[0] == "run") == 2


def test_sharding_four_ranks_with_ulysses(tmp_path):
    reports = _launch(4, ["cp"], tmp_path)
    _check_cases(reports)
    _check_bytes(reports, 4)
    assert "t2v_mask" in reports[0]["cases"]


# -- the memory plan's arithmetic (one process) ---------------------------------------------------


def test_sharded_device_bytes_arithmetic():
    # Three blocks: parameters as (rows, bytes per row), and a buffer (a quantized weight's scales).
    params = [[(8, 10), (5, 4)], [(8, 10), (5, 4)], [(9, 10)]]
    sizes = (1000, params, [7, 7, 0])
    b = sharding.sharded_device_bytes(sizes, 4)
    # rank 0 holds ceil(rows / 4) rows of each parameter: 2*10 + 2*4, twice, then 3*10
    assert b["shards"] == 28 + 28 + 30
    assert b["replicated"] == 1000 + 14  # the root and the buffers, whole on every rank
    assert b["gathered"] == 100 + 100  # the two largest blocks' parameters
    assert b["total"] == 86 + 1014 + 200
    one = sharding.sharded_device_bytes(sizes, 1, gathered=0)
    assert one["total"] == 1000 + 14 + 100 + 100 + 90  # one rank: the whole model


def test_shard_rows_match_torch_chunk():
    for rows in (1, 5, 8, 13, 64):
        for world in (1, 2, 3, 4):
            chunks = torch.arange(rows).chunk(world)
            for i in range(world):
                start, stop = sharding._shard_rows(rows, world, i)
                expect = chunks[i].tolist() if i < len(chunks) else []
                assert list(range(start, stop)) == expect, (rows, world, i)


def test_plan_memory_counts_per_rank_weights():
    from longcat_native.pipelines.budget import Stage, dit_device_bytes, plan_memory

    cfg = {"hidden_size": 256, "depth": 8, "num_heads": 4, "caption_channels": 128, "adaln_tembed_dim": 64}
    whole = dit_device_bytes(cfg, torch.bfloat16)["total"]
    per_rank = dit_device_bytes(cfg, torch.bfloat16, shard_ranks=4)
    from longcat_native.runtime.config import resolve_config
    from longcat_native.runtime.dit import LongCatDiT
    meta = LongCatDiT.from_config(resolve_config(cfg, {}), device="meta", dtype=torch.bfloat16)
    block = sum(p.numel() * 2 for p in meta.blocks[0].parameters())
    other = sum(p.numel() * 2 for n, p in meta.named_parameters() if not n.startswith("blocks."))
    assert per_rank["total"] == other + 8 * block // 4 + 2 * block  # rows of 256, 768, ... divide by 4
    assert per_rank["shards"] == 8 * block // 4 and per_rank["gathered"] == 2 * block
    assert per_rank["total"] < whole
    stages = [Stage("denoise", "denoise", batch=1, latent=(2, 8, 8), tokens=16)]
    plan = plan_memory(10 * 2**30, dit_config=cfg, stages=stages, shard_ranks=4)
    assert plan.shard_ranks == 4 and plan.fits
    assert plan.stages[0].parts["dit_weights"] == per_rank["total"]
    unsharded = plan_memory(10 * 2**30, dit_config=cfg, stages=stages)
    assert unsharded.stages[0].parts["dit_weights"] == whole
    # Sharding and streaming exclude each other: a budget under the shards is over, not streamed.
    small = plan_memory(per_rank["total"] // 2, dit_config=cfg, stages=stages, shard_ranks=4)
    assert not small.fits and small.resident_blocks is None
    with pytest.raises(ValueError, match="shard_ranks"):
        plan_memory("1GiB", dit_config=cfg, stages=stages, shard_ranks=0)


def test_shard_weights_refusals_in_one_process():
    import longcat_native as lcn

    with pytest.raises(ValueError, match="single process"):
        lcn.LongCatDiT.from_config("tiny", device="cpu", shard_weights=True)
    with pytest.raises(ValueError, match='offload="blocks"'):
        lcn.LongCatDiT.from_config("tiny", device="cpu", shard_weights=True, offload="blocks")
    meta = lcn.LongCatDiT.from_config("tiny", device="meta", shard_weights=True)  # planning: shapes only
    assert not sharding.is_sharded(meta)


def test_the_planners_plan_one_rank_of_a_sharded_run(capsys):
    """info --max-memory, generate's plan and the pipeline's max_memory= count a sharded DiT's
    per-rank weights (plan_memory's shard_ranks = every rank of the layout)."""
    import json

    from longcat_native.cli import main
    from longcat_native.pipelines.loading import _shard_ranks

    for flags, ranks in (([], 1), (["--shard-weights"], 4), (["--shard-weights", "--cfg-parallel", "--dp", "2"], 16)):
        main(["info", "--config", "tiny", "--frames", "9", "--height", "64", "--width", "64", "--max-memory", "1GiB",
              "--cp-size", "4", *flags, "--json"])
        assert json.loads(capsys.readouterr().out)["memory_plan"]["shard_ranks"] == ranks
    assert _shard_ranks({"shard_weights": True, "cp_size": 2, "ring_size": 2, "cfg_parallel": True}) == 8
    assert _shard_ranks({"cp_size": 2}) == 1
