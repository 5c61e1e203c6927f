"""The parallel modes composed (issue 29): the combinations the per-mode tests
(test_parallel_modes.py, test_ring_attention.py, test_sharding.py, test_parallel.py) do not run
together, in ONE 4-rank gloo launch of tests/parallel_combos_worker.py, each against the
single-process run (float32, <= 1e-5 relative) and the official golden case where one exists:

* cfg_parallel x ring 2: the guided sampling cases (t2v; i2v with a conditioning latent);
* shard_weights over 4 x ring 2 x Ulysses 2: a forward case, KV-cache prefill and continuation;
* dp 2 x ring 2: three videos over two replicas (uneven);
* cfg_parallel x Ulysses 2 x shard_weights with a StepCache: the same decisions as one process;
* ``generate --ring 2 --cfg-parallel --shard-weights``: the run's note names the layout.

Without a launch: ``generate --ring R`` checks before loading that R x cp divides the tokens per
frame.
"""

import json
from pathlib import Path

import pytest
from helpers import MODEL_RTOL
from test_parallel import _launch as _launch_cp

from longcat_native.pipelines.plan import GenerateRequest, plan_generate

SINGLE_RTOL = 1e-5
SCENARIOS = ["cfg_ring", "shard_usp", "dp_ring", "cfg_shard_cache", "cli"]
EXPECTED = ["cfg2_ring2_sample_t2v_cfg", "cfg2_ring2_sample_i2v_cfg", "shard4_ring2_ulysses2_t2v_mask",
            "shard4_ring2_ulysses2_kv_prefill", "shard4_ring2_ulysses2_kv_continue", "dp2_ring2_t2v_uneven",
            "cfg2_ulysses2_shard4_step_cache"]


def test_four_ranks_combinations(tmp_path):
    (tmp_path / "cli").mkdir()
    reports = _launch_cp(4, SCENARIOS, tmp_path, timeout_s=180, worker=Path(__file__).parent / "parallel_combos_worker.py",
                         CLI_OUT=str(tmp_path / "cli"))  # a crashed rank fails the test with its trace
    for rep in reports:
        r = rep["rank"]
        assert set(EXPECTED) <= set(rep["cases"]), sorted(rep["cases"])
        for name, errs in rep["cases"].items():
            for what, err in errs.items():
                if what == "shape":
                    continue
                if what.endswith("shape_mismatch"):
                    assert err == 0, f"rank {r} {name}: the returned KV cache has the wrong shape"
                    continue
                bound = MODEL_RTOL if "golden" in what else SINGLE_RTOL
                assert err <= bound, f"rank {r} {name} {what}: error {err:.3g}"
        c = rep["checks"]
        # The layouts really are what they claim: cfg outermost of ring; dp outermost of ring.
        assert c["cfg_ring_coords"] == {"dp": 0, "cfg": r // 2, "ring": r % 2, "ulysses": 0}
        assert c["cfg_ring_cp"] == [2, 2, 1] and c["cfg_ring_cfg_bytes"] > 0
        assert c["dp_ring_coords"] == {"dp": r // 2, "cfg": 0, "ring": r % 2, "ulysses": 0}
        assert c["shard_usp_sharded"] and c["shard_usp_bytes"][0] * 4 == c["shard_usp_bytes"][1]
        sc = c["cfg_shard_cache"]
        assert sc["decisions"] == sc["single_decisions"] and sc["cached_steps"] >= 2, sc
    assert reports[0]["cases"]["dp2_ring2_t2v_uneven"]["shape"][0] == 3
    first = reports[0]["cases"]
    assert all(rep["cases"] == first for rep in reports[1:]), "the ranks returned different results"
    # The command: rank 0 reports; its note names ring, Ulysses, cfg and the sharding.
    assert reports[0]["cli"]["code"] == 0 and all(rep["cli"] == {"code": 0, "stdout": ""} for rep in reports[1:])
    notes = json.loads(reports[0]["cli"]["stdout"].strip().splitlines()[-1])["notes"]
    cp_note = [n for n in notes if n.startswith("context parallelism")]
    assert cp_note == ["context parallelism: 2 ranks, ring 2 x Ulysses 1, each latent frame's tokens in 2 chunks "
                       "(cfg 2, weights sharded)"], notes


def _plan_error(monkeypatch, world, **flags):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ValueError) as e:
        plan_generate(GenerateRequest(**flags))
    return str(e.value)


def test_generate_ring_checks_tokens_per_frame(monkeypatch, tmp_path):
    out = str(tmp_path / "x.safetensors")
    # Latent 8 x 10: 4 x 5 = 20 tokens per frame. Ring 2 x cp 2 = 4 divides; ring 2 x cp 4 = 8 does not.
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert plan_generate(GenerateRequest(out=out, latent=(2, 8, 10), ring_size=2, cp_size=2)).latent == (2, 8, 10)
    msg = _plan_error(monkeypatch, 8, out=out, latent=(2, 8, 10), ring_size=2, cp_size=4)
    assert "--ring 2 x --cp 4 = 8" in msg and "4 x 5 = 20 tokens" in msg, msg
    # Latent 6 x 10: 3 x 5 = 15 tokens, odd: no ring of 2 (each of Ulysses' tiles is the model's own check).
    msg = _plan_error(monkeypatch, 2, out=out, latent=(2, 6, 10), ring_size=2)
    assert "15 is not divisible by 2" in msg, msg
    msg = _plan_error(monkeypatch, 6, out=out, latent=(2, 6, 10), ring_size=3, cp_size=2)  # 15 % 6
    assert "--ring 3 x --cp 2 = 6" in msg, msg
    monkeypatch.setenv("WORLD_SIZE", "3")
    plan_generate(GenerateRequest(out=out, latent=(2, 6, 10), ring_size=3))  # 15 tokens in 3 chunks: fine
