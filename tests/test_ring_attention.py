"""Ring attention composed with Ulysses (runtime/ring.py, runtime/parallel.py): the online-softmax
merge against plain attention in one process, and the model on gloo with 2 and 4 CPU processes
(tests/ring_worker.py: ring 2; ring 2 x Ulysses 2 and ring 4), one launch per world size.

Every rank must match the single-process model (float32, 1e-5 relative) and the official golden
cases (1e-4) on the plain forward, text masks, conditioning frames, KV-cache prefill and
continuation and a step-cached denoise; BSA and unsplittable grids are refused with the same
ValueError on every rank, before any collective. A rank that raises ends every rank at once.
"""

import time
from pathlib import Path

import gloo_launch
import pytest
import torch
from helpers import MODEL_RTOL, max_rel_err

import longcat_native as lcn
from longcat_native.runtime.attention import attention, attention_with_lse
from longcat_native.runtime.parallel import comm_bytes_per_block
from longcat_native.runtime.ring import SoftmaxMerge, apply_rope, merge_partials, segment_rope_tables

WORKER = Path(__file__).parent / "ring_worker.py"
REPO = Path(__file__).parent.parent
SINGLE_RTOL = 1e-5  # float32, vs the single-process model


# -- the online-softmax merge (one process) --------------------------------------------------------

def _split_keys(nk, parts, gen):
    cuts = sorted(torch.randperm(nk - 1, generator=gen)[: parts - 1].add(1).tolist())
    return list(zip([0] + cuts, cuts + [nk]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_merge_of_key_blocks_equals_attention_fp32(seed, backend):
    gen = torch.Generator().manual_seed(seed)
    B, H = (int(v) for v in torch.randint(1, 4, (2,), generator=gen))
    D = int(torch.tensor([8, 16, 32, 64])[torch.randint(0, 4, (1,), generator=gen)])
    nq, nk = (int(v) for v in torch.randint(5, 70, (2,), generator=gen))
    q, k, v = (torch.randn(B, n, H, D, generator=gen) * 2 for n in (nq, nk, nk))
    expected = attention(q, k, v, "reference")
    parts = [attention_with_lse(q, k[:, a:b], v[:, a:b], backend)
             for a, b in _split_keys(nk, int(torch.randint(2, 6, (1,), generator=gen)), gen)]
    got = merge_partials(parts)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert max_rel_err(got, expected) <= 1e-5
    # The log-sum-exp itself is the one of all scores.
    _, lse = attention_with_lse(q, k, v, backend)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * D**-0.5
    assert max_rel_err(lse, torch.logsumexp(scores, -1)) <= 1e-5


def test_merge_of_key_blocks_equals_attention_fp16():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, n, 3, 32, generator=gen).half() for n in (33, 50, 50))
    expected = attention(q, k, v, "reference")  # float32 math from the fp16 inputs
    parts = [attention_with_lse(q, k[:, a:b], v[:, a:b], "sdpa") for a, b in ((0, 7), (7, 31), (31, 50))]
    got = merge_partials(parts)
    assert got.dtype == torch.float16
    assert max_rel_err(got, expected) <= 2e-3


def test_merge_order_does_not_matter_and_one_part_is_identity():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 2, 16, generator=gen) for n in (9, 24, 24))
    parts = [attention_with_lse(q, k[:, a:b], v[:, a:b], "sdpa") for a, b in ((0, 5), (5, 12), (12, 24))]
    a, b = merge_partials(parts), merge_partials(parts[::-1])
    assert max_rel_err(a, b) <= 1e-6
    m = SoftmaxMerge()
    m.add(*parts[0])
    assert torch.equal(m.result(torch.float32), parts[0][0])
    # Very different score scales (one block dominates): no overflow, still exact.
    k2 = k.clone()
    k2[:, :5] *= 30
    parts = [attention_with_lse(q, k2[:, a:b], v[:, a:b], "sdpa") for a, b in ((0, 5), (5, 24))]
    assert max_rel_err(merge_partials(parts), attention(q, k2, v, "reference")) <= 1e-5


def test_attention_with_lse_refuses_an_empty_side():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="keys"):
        attention_with_lse(q, q[:, :0], q[:, :0], "sdpa")


def test_segment_rope_tables_are_the_grid_rows():
    """The table RoPE of a ring segment equals the grid RoPE of the whole sequence at its tokens."""
    from longcat_native.kernels.qk_rmsnorm_rope3d import rope3d_reference

    T, Hh, Ww, D, R, t_off = 3, 4, 6, 32, 4, 2
    x = torch.randn(2, T * Hh * Ww, 3, D)
    full = rope3d_reference(x, (T, Hh, Ww), t_off).view(2, T, Hh * Ww, 3, D)
    c = Hh * Ww // R
    for r in range(R):
        cos, sin = segment_rope_tables((T, Hh, Ww), D, t_off, r, R, "cpu")
        seg = x.view(2, T, Hh * Ww, 3, D)[:, :, r * c:(r + 1) * c].reshape(2, T * c, 3, D)
        assert torch.equal(apply_rope(seg, cos, sin), full[:, :, r * c:(r + 1) * c].reshape(2, T * c, 3, D))


def test_comm_bytes_ring_formula():
    # ring 2 x Ulysses 2, batch 2, 480p tokens, C = 4096, bf16: a rank's [B, N/4, C] is 153.4 MB.
    local = 2 * 37440 * 4096 * 2 / 4
    b = comm_bytes_per_block(2, 2, 37440, 4096, 2, ring_size=2)
    assert b["qkv_all_to_all"] == pytest.approx(3 * local / 2)
    assert b["ring_kv"] == pytest.approx(2 * local)  # one step: k and v of [B, N/2, C/2]
    assert b["total"] == pytest.approx(3 * local / 2 + local / 2 + 2 * local)
    r4 = comm_bytes_per_block(1, 1, 64, 8, 4, return_kv=True, ring_size=4)
    assert r4["qkv_all_to_all"] == 0 and r4["ring_kv"] == pytest.approx(2 * 64 * 8 * 4 / 4 * 3)
    assert r4["kv_all_gather"] == pytest.approx(2 * 64 * 8 * 4 / 4 * 3)
    assert "ring_kv" not in comm_bytes_per_block(4, 1, 64, 8)  # Ulysses alone: unchanged


def test_ring_split_hw_is_refused_before_any_process_group():
    with pytest.raises(ValueError, match="per-frame chunks"):
        lcn.LongCatDiT.from_config("tiny", ring_size=2, cp_split_hw=[1, 2], device="cpu")


# -- gloo, 2 and 4 processes ------------------------------------------------------------------------

def _launch(world: int, tmp_path, timeout_s: float = 300, **env):
    """``world`` workers as torchrun would start them; the first one to fail (or the deadline)
    ends them all, so a rank that raises never leaves the others waiting in a collective."""
    return gloo_launch.reports(gloo_launch.launch(WORKER, world, tmp_path, timeout_s=timeout_s, **env))


CASES = ["t2v_nomask", "t2v_mask", "t2v_mask_varlen", "per_frame_timestep", "i2v_cond1", "skip_cross_attn",
         "kv_prefill", "kv_continue", "step_cache"]


def _check(reports, layouts, extra=()):
    for rep in reports:
        cases = rep["cases"]
        want = {f"ring{R}_ulysses{U}/{c}" for R, U in layouts for c in CASES if c != "t2v_mask_varlen"}
        want |= {f"ring{layouts[0][0]}_ulysses{layouts[0][1]}/t2v_mask_varlen", *extra}
        assert want <= set(cases), sorted(want - set(cases))
        for name, errs in cases.items():
            for what, err in errs.items():
                if what.endswith("shape_mismatch"):
                    assert err == 0, f"rank {rep['rank']} {name}: the returned KV cache has the wrong shape"
                elif what.endswith("single"):
                    assert err <= SINGLE_RTOL, f"rank {rep['rank']} {name} {what}: {err:.3g}"
                else:
                    assert err <= MODEL_RTOL, f"rank {rep['rank']} {name} {what}: {err:.3g}"
        for R, U in layouts:
            tag = f"ring{R}_ulysses{U}"
            chk = rep["checks"][tag]
            assert chk["cp_size"] == R * U and f"ring={R}" in chk["repr"]
            # The split really happened, and the counted bytes are comm_bytes_per_block's.
            comm = chk["comm"]
            assert comm["ring_steps"] == 2 * (R - 1)  # 2 blocks x (R - 1) steps
            assert comm["counted"]["ring"] == pytest.approx(comm["formula"]["ring_kv"])
            assert comm["counted"]["all_to_all"] == pytest.approx(
                comm["formula"]["qkv_all_to_all"] + comm["formula"]["out_all_to_all"])
            assert comm["counted"]["all_gather"] == pytest.approx(comm["final_gather"])
            # Step cache: each decision saw the sums over every ring x Ulysses rank (the
            # single-process sums), so every rank cached the same steps as one process.
            sc = chk["step_cache"]
            assert len(sc["sums"]) == len(sc["single_sums"]) > 0
            for got, want in zip(sc["sums"], sc["single_sums"]):
                assert got == pytest.approx(want, rel=1e-5)
            assert sc["cached"] == sc["single_cached"]
            for what in ("enable_bsa", "bsa_call"):
                e = rep["errors"][f"{tag}/{what}"]
                assert e["raised"] == "ValueError" and "ring attention" in e["message"], e
            e = rep["errors"][f"{tag}/grid"]
            assert e["raised"] == "ValueError" and "divisible" in e["message"] and "3 x 3" in e["message"], e
            e = rep["errors"][f"{tag}/split_hw"]
            assert e["raised"] == "ValueError" and "cp_split_hw" in e["message"], e
            assert chk["after_error_ok"] <= MODEL_RTOL
    first = reports[0]
    for rep in reports[1:]:  # every rank returns the gathered output and raises the same errors
        assert rep["cases"] == first["cases"] and rep["errors"] == first["errors"]
    ranks = {(rep["checks"][f"ring{R}_ulysses{U}"]["ring_rank"], rep["checks"][f"ring{R}_ulysses{U}"]["ulysses_rank"])
             for rep in reports for R, U in layouts[:1]}
    assert len(ranks) == len(reports)  # each rank a distinct (ring, ulysses) coordinate


def test_ring_two_ranks(tmp_path):
    reports = _launch(2, tmp_path)
    _check(reports, [(2, 1)], extra=["ring2_ulysses1/i2v_cond1_triton", "compiled/i2v_cond1"])


def test_ring_four_ranks_with_ulysses_and_ring_four(tmp_path):
    reports = _launch(4, tmp_path)
    _check(reports, [(2, 2), (4, 1)])


def test_a_failing_rank_ends_every_rank(tmp_path):
    """Rank 1 raises while rank 0 waits in a ring step for it: the launch ends at once with rank
    1's error, not after the process group's timeout."""
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="failed") as info:
        _launch(2, tmp_path, RING_WORKER_FAIL_RANK="1")
    assert "this rank fails on purpose" in str(info.value)
    assert time.monotonic() - t0 < 90  # the group's timeout is 120 s
