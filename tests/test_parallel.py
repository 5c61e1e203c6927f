"""Context parallelism (runtime/parallel.py): gloo on the CPU with 2 and 4 processes.

Each multi-process test starts ``world`` copies of tests/cp_worker.py the way torchrun would
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment) and reads back what every rank
measured: the official golden cases (plain forward, text masks, conditioning frames, KV cache
prefill and continuation, BSA, LoRA, sampling, the fused kernel path, torch.compile) within the
float32 bound, equal to the single-process result, and the errors for bad splits raised on every
rank without a hang.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import gloo_launch
import pytest
import torch
from helpers import MODEL_RTOL

import longcat_native as lcn
from longcat_native.runtime.parallel import comm_bytes_per_block, optimal_split_hw, resolve_split_hw

WORKER = Path(__file__).parent / "cp_worker.py"
REPO = Path(__file__).parent.parent


def _launch(world: int, scenarios, tmp_path, timeout_s: float = 600, worker=WORKER, **env):
    """``world`` ranks of ``worker`` running ``scenarios``; every rank's report (a failed rank
    fails the test with its log)."""
    return gloo_launch.reports(gloo_launch.launch(worker, world, tmp_path, [",".join(scenarios)], timeout_s=timeout_s,
                                                  LONGCAT_CP_TIMEOUT_S="300", **env))


def _check_cases(reports, expected_cases):
    for rep in reports:
        assert set(expected_cases) <= set(rep["cases"]), sorted(rep["cases"])
        for name, errs in rep["cases"].items():
            for what, err in errs.items():
                if what.endswith("shape_mismatch"):
                    assert err == 0, f"rank {rep['rank']} {name}: returned KV cache has the wrong shape"
                else:
                    assert err <= MODEL_RTOL, f"rank {rep['rank']} {name} {what}: error {err:.3g}"
    # Every rank returns the same full output (gathered), so their errors are identical.
    first = reports[0]["cases"]
    for rep in reports[1:]:
        assert rep["cases"] == first, f"rank {rep['rank']} saw different results than rank 0"


def _check_errors(reports, world):
    for rep in reports:
        errs = rep["errors"]
        assert errs["grid"]["raised"] == "ValueError" and "divisible" in errs["grid"]["message"], errs["grid"]
        assert errs["heads"]["raised"] == "ValueError" and "num_heads" in errs["heads"]["message"], errs["heads"]
        assert errs["split_product"]["raised"] == "ValueError" and "cp_split_hw" in errs["split_product"]["message"]
        assert errs["world_mismatch"]["raised"] == "ValueError" and "ranks" in errs["world_mismatch"]["message"], \
            errs["world_mismatch"]
        assert rep["checks"]["after_error_ok"], "the model must still work after a rejected input"
        if rep["rank"] != 0:  # rank 0 stays out of that collective on purpose
            assert errs["timeout"]["raised"] == "RuntimeError", errs["timeout"]
            assert errs["timeout"]["seconds"] < 60


FORWARD = ["t2v_nomask", "t2v_mask", "t2v_mask_varlen", "per_frame_timestep", "i2v_cond1", "skip_cross_attn",
           "kv_prefill", "kv_continue", "bsa_t2v", "bsa_cond"]


def test_two_ranks_every_case(tmp_path):
    reports = _launch(2, ["forward", "lora", "sample", "triton", "compile", "errors"], tmp_path)
    _check_cases(reports, FORWARD + ["lora_both", "sample_t2v_cfg", "sample_i2v_cfg", "sample_t2v_cfg_rank0_inputs",
                                     "i2v_cond1_triton",
                                     "kv_continue_triton", "bsa_cond_triton", "t2v_mask_compiled"])
    _check_errors(reports, 2)
    for rep in reports:
        assert rep["checks"]["split"] == [1, 2]
        assert rep["checks"]["repr_has_cp"]
        assert rep["checks"]["graph_breaks"] == 0
        # 14 forwards of the 2-block fixture with CP: 2 all-to-alls per block, 1 gather per forward
        # plus 2 per block for each return_kv call: the split really happened.
        calls = rep["checks"]["forward_collective_calls"]
        assert calls["all_to_all"] >= 2 * 2 * 11 and calls["all_gather"] >= 11


def test_four_ranks_2d_split(tmp_path):
    reports = _launch(4, ["forward", "sample", "errors"], tmp_path)
    _check_cases(reports, FORWARD + ["sample_t2v_cfg", "sample_i2v_cfg", "sample_t2v_cfg_rank0_inputs"])
    _check_errors(reports, 4)
    assert all(rep["checks"]["split"] == [2, 2] for rep in reports)


# -- single-process pieces -----------------------------------------------------------------------

@pytest.mark.parametrize("n,split", [(1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (4, (2, 2)), (6, (2, 3)), (8, (2, 4)),
                                     (9, (3, 3)), (16, (4, 4))])
def test_optimal_split_is_most_square(n, split):
    assert optimal_split_hw(n) == split


def test_resolve_split():
    assert resolve_split_hw(4, None) == (2, 2)
    assert resolve_split_hw(4, [1, 1]) == (2, 2)  # the checkpoint's single-device default
    assert resolve_split_hw(4, [1, 4]) == (1, 4)  # a user's explicit split is kept
    with pytest.raises(ValueError, match="cp_split_hw"):
        resolve_split_hw(4, [2, 3])
    with pytest.raises(ValueError, match="cp_size"):
        optimal_split_hw(0)


def test_comm_bytes_formula():
    # 480p, batch 2 (CFG), C = 4096, bf16, 4 ranks: a local [B, N/4, C] tensor is 153.4 MB.
    b = comm_bytes_per_block(4, 2, 37440, 4096, 2)
    local = 2 * 37440 * 4096 * 2 / 4
    assert b["qkv_all_to_all"] == pytest.approx(3 * local * 0.75)
    assert b["out_all_to_all"] == pytest.approx(local * 0.75)
    assert b["total"] == pytest.approx(4 * local * 0.75)
    assert comm_bytes_per_block(1, 2, 37440, 4096)["total"] == 0
    assert comm_bytes_per_block(2, 1, 10, 8, return_kv=True)["kv_all_gather"] == pytest.approx(2 * 10 * 8 * 2 / 2)


def test_cp_size_without_a_process_group_names_torchrun(monkeypatch):
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group exists in this process")
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node 2"):
        lcn.LongCatDiT.from_config("tiny", cp_size=2, device="cpu")


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_cp_size_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="cp_size"):
        lcn.LongCatDiT.from_config("tiny", cp_size=bad, device="cpu")


def test_split_without_cp_size_is_an_error():
    with pytest.raises(ValueError, match="cp_size=1"):
        lcn.LongCatDiT.from_config("tiny", cp_split_hw=[1, 2], device="cpu")


def test_single_process_has_no_cp():
    dit = lcn.LongCatDiT.from_config("tiny", device="cpu")
    assert dit.cp is None and "cp=" not in repr(dit)
    assert torch.distributed.is_available()


# -- the CLI under torchrun ------------------------------------------------------------------------

def test_cli_generate_with_cp_size_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m longcat_native.cli generate --cp-size 2`: the same latents as
    one process with the same seed; only rank 0 writes and prints."""
    from safetensors.torch import load_file

    port = str(gloo_launch.free_port())
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "longcat_native.cli", "generate", "--task", "vc", "--steps", "2", "--json",
           "--device", "cpu"]
    procs = [subprocess.Popen(cmd + ["--cp-size", "2", "--out", str(tmp_path / "cp.safetensors")], cwd=tmp_path,
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}:\n{err[-3000:]}"
    summary = json.loads(outs[0][0].strip().splitlines()[-1])
    assert any("context parallelism: 2 ranks" in n for n in summary["notes"])
    assert outs[1][0].strip() == "", "rank 1 must not print the summary"
    single = subprocess.run(cmd + ["--out", str(tmp_path / "single.safetensors")], cwd=tmp_path, env=dict(
        os.environ, PYTHONPATH=base["PYTHONPATH"]), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    a = load_file(str(tmp_path / "cp.safetensors"))["latents"]
    b = load_file(str(tmp_path / "single.safetensors"))["latents"]
    assert a.shape == b.shape and (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_cli_cp_size_needs_torchrun(monkeypatch, capsys):
    from longcat_native.cli import main

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert main(["generate", "--cp-size", "2"]) == 2
    assert "torchrun --nproc-per-node 2 -m longcat_native.cli generate" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["generate", "--cp-size", "2"]) == 2
    assert "--nproc-per-node must equal --cp-size" in capsys.readouterr().err
    assert main(["generate", "--cp-size", "0"]) == 2
