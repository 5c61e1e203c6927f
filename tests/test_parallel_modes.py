"""CFG-parallel and data-parallel runs (pipelines/sampler.py denoise, runtime/mesh.py), alone and
composed with Ulysses, on gloo with 2 and 4 CPU processes, against single-process outputs; the
``generate`` command's parallel flags (pipelines/plan.py checks, pipelines/run.py outputs).

One launch per world size runs every scenario of tests/parallel_modes_worker.py (started the
way torchrun starts a program); the last one makes a rank fail while the others are inside a
collective, and every rank must exit at once with an error.
"""

import json
import os
from pathlib import Path

import gloo_launch
import pytest
import torch
from helpers import MODEL_RTOL

from longcat_native.pipelines.plan import GenerateRequest, parallel_layout, parallel_world, plan_generate
from longcat_native.runtime.mesh import dp_split

WORKER = Path(__file__).parent / "parallel_modes_worker.py"
REPO = Path(__file__).parent.parent
SINGLE_RTOL = 1e-5  # float32, the parallel run against the single-process one


def _launch(world: int, scenarios, tmp_path, timeout_s: float = 240):
    """The ranks run ``scenarios``, the last of which ("crash") fails one rank on purpose: the
    others get 60 s to fail on their own (what the test measures) before they are killed."""
    cli_out = tmp_path / "cli"
    cli_out.mkdir()
    run = gloo_launch.launch(WORKER, world, tmp_path, [",".join(scenarios)], timeout_s=timeout_s, grace_s=60,
                             LONGCAT_CP_TIMEOUT_S="60", CLI_OUT=str(cli_out))
    return gloo_launch.reports(run, crash_ok=True), run.codes, cli_out


def _check(reports, codes, world, expected_cases):
    failing = world - 1
    for rep in reports:
        r = rep["rank"]
        # Every scenario ran before the injected failure; only that failure ended each rank.
        crash = rep.get("crash", "")
        if r == failing:
            assert rep.get("crash_injected") and f"injected failure on rank {failing}" in crash, crash[-2000:]
        else:
            peer = rep["errors"].get("peer_failure", {})
            assert peer.get("raised") == "RuntimeError", (peer, crash[-2000:])
            assert peer["seconds"] < 30, f"rank {r} waited {peer['seconds']:.1f} s for a rank that had failed"
        assert codes[r] != 0, f"rank {r} exited 0 although the run failed"
        assert set(expected_cases) <= set(rep["cases"]), sorted(rep["cases"])
        for name, errs in rep["cases"].items():
            for what, err in errs.items():
                if what == "shape":
                    continue
                bound = MODEL_RTOL if what == "golden" else SINGLE_RTOL
                assert err <= bound, f"rank {r} {name} {what}: error {err:.3g}"
        # A layout the launch cannot hold: the same clear error on every rank, before any exchange.
        e = rep["errors"]
        assert e["mesh_world"]["raised"] == "ValueError" and "needs" in e["mesh_world"]["message"] and \
            f"{world} were launched" in e["mesh_world"]["message"], e["mesh_world"]
        assert e["mesh_heads"]["raised"] == "ValueError" and "num_heads" in e["mesh_heads"]["message"]
    first = reports[0]["cases"]
    for rep in reports[1:]:
        assert rep["cases"] == first, f"rank {rep['rank']} returned other results than rank 0"


def _check_cfg(reports, tag):
    for rep in reports:
        c = rep["checks"]
        # 3 steps x this rank's half of the [2 prompts] batch: [2, 16, 2, 8, 8] float32 per step.
        assert c[f"{tag}_cfg_bytes"] == 3 * 2 * 16 * 2 * 8 * 8 * 4
        assert c[f"{tag}_guidance1_warned"]
        sc = c[f"{tag}_step_cache"]
        assert sc["decisions"] == sc["single_decisions"], sc
        assert sc["cached_steps"] >= 2, sc  # the policy really skipped steps
    assert [rep["checks"][f"{tag}_coords"]["cfg"] for rep in reports] == \
        [r // (len(reports) // 2) for r in range(len(reports))]


def _check_cli(reports, cli_out, single_request):
    """The command's per-video files (written by each replica's lead) against the single-process
    command's batch; rank 0 alone printed the summary."""
    summary = json.loads(reports[0]["cli"]["stdout"])
    assert reports[0]["cli"]["code"] == 0
    assert all(rep["cli"]["stdout"] == "" and rep["cli"]["code"] == 0 for rep in reports[1:])
    from safetensors.torch import load_file

    from longcat_native.pipelines.run import run_generate

    ref_out = cli_out / "single.safetensors"
    run_generate(plan_generate(GenerateRequest(out=str(ref_out), **single_request)))
    ref = load_file(str(ref_out))["latents"]
    assert summary["outputs"] == [str(cli_out / f"v-{i}.safetensors") for i in range(ref.shape[0])]
    for i, path in enumerate(summary["outputs"]):
        lat = load_file(path)["latents"]
        assert lat.shape == (1,) + ref.shape[1:]
        err = float((lat[0] - ref[i]).abs().max() / ref[i].abs().max())
        assert err <= SINGLE_RTOL, f"video {i}: {err:.3g}"
    assert sorted(os.listdir(cli_out)) == sorted([f"v-{i}.safetensors" for i in range(ref.shape[0])]
                                                 + ["single.safetensors"]), "stray or temporary files"


SCENARIOS = ["cfg", "dp", "errors", "cli", "crash"]


def test_two_ranks(tmp_path):
    reports, codes, cli_out = _launch(2, SCENARIOS, tmp_path)
    _check(reports, codes, 2, ["cfg2_cp1_sample_t2v_cfg", "cfg2_cp1_sample_i2v_cfg", "cfg2_cp1_vc_kv", "cfg2_cp1_i2v",
                               "cfg2_cp1_step_cache", "cfg2_cp1_guidance1", "dp2_t2v_uneven", "dp2_t2v_one_item",
                               "dp2_i2v_prompts2"])
    _check_cfg(reports, "cfg2_cp1")
    assert reports[0]["cases"]["dp2_t2v_uneven"]["shape"][0] == 3
    _check_cli(reports, cli_out, dict(steps=2, seed=3, num_videos=3))


def test_four_ranks_cfg_x_ulysses_and_dp(tmp_path):
    reports, codes, cli_out = _launch(4, SCENARIOS, tmp_path)
    _check(reports, codes, 4, ["cfg2_cp2_sample_t2v_cfg", "cfg2_cp2_sample_i2v_cfg", "cfg2_cp2_vc_kv",
                               "cfg2_cp2_step_cache", "dp4_t2v_uneven", "dp4_t2v_one_item", "dp2_cfg2_t2v_uneven",
                               "dp2_cfg2_vc_kv"])
    _check_cfg(reports, "cfg2_cp2")
    _check_cli(reports, cli_out, dict(steps=2, seed=3, prompt=["a red fox", "a blue bird", "snow"]))


# -- no launch: the split and the command's checks (each rank runs them alike, before loading) -----

def test_dp_split_contiguous_and_uneven():
    for n in range(0, 9):
        for dp in range(1, 5):
            s = dp_split(n, dp)
            assert len(s) == dp and s[0][0] == 0 and s[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(s, s[1:]))
            sizes = [hi - lo for lo, hi in s]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def _plan_error(monkeypatch, world, **flags):
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ValueError) as e:
        plan_generate(GenerateRequest(**flags))
    return str(e.value)


def test_generate_parallel_flags_checked_before_loading(monkeypatch, tmp_path):
    out = str(tmp_path / "x.safetensors")
    assert "torchrun --nproc-per-node 4 -m longcat_native.cli generate" in _plan_error(monkeypatch, None, out=out, cfg_parallel=True, dp_size=2)
    msg = _plan_error(monkeypatch, 4, out=out, cfg_parallel=True, cp_size=4)
    assert "needs 8" in msg and "started 4" in msg
    assert "must equal --cp-size" in _plan_error(monkeypatch, 2, out=out, dp_size=1)  # world 2, layout 1
    assert "no negative half" in _plan_error(monkeypatch, 2, out=out, cfg_parallel=True, guidance=1.0)
    assert "no negative half" in _plan_error(monkeypatch, 2, out=out, cfg_parallel=True, distill=True)
    assert "attention heads" in _plan_error(monkeypatch, 6, out=out, cfg_parallel=True, cp_size=3)
    assert ">= 1" in _plan_error(monkeypatch, 2, out=out, dp_size=0)
    assert "--num-videos" in _plan_error(monkeypatch, None, out=out, num_videos=0)
    monkeypatch.setenv("WORLD_SIZE", "8")
    r = GenerateRequest(out=out, cfg_parallel=True, cp_size=2, dp_size=2)
    plan = plan_generate(r)  # a valid layout plans
    assert parallel_world(r) == 8 and parallel_layout(r) == "dp=2 x cfg=2 x ulysses=2 (8 ranks)"
    assert plan.guidance > 1


def test_generate_flag_names(monkeypatch):
    from longcat_native.cli import build_parser

    args = build_parser().parse_args(["generate", "--cp", "2", "--ring", "2", "--dp", "2", "--cfg-parallel",
                                      "--shard-weights", "--num-videos", "3", "--prompt", "a", "b"])
    assert (args.cp_size, args.ring_size, args.dp_size, args.cfg_parallel, args.shard_weights) == (2, 2, 2, True, True)
    assert args.num_videos == 3 and args.prompt == ["a", "b"]
    assert build_parser().parse_args(["generate", "--cp-size", "4"]).cp_size == 4  # the old spelling


def test_single_process_generate_several_prompts_and_videos(tmp_path, monkeypatch):
    """No parallel flags: prompts x --num-videos items in one batch (one .safetensors), each prompt's
    videos consecutive with their own noise."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from safetensors.torch import load_file

    from longcat_native.pipelines.run import run_generate

    out = tmp_path / "b.safetensors"
    res = run_generate(plan_generate(GenerateRequest(out=str(out), steps=1, prompt=["a", "b"], num_videos=2)))
    lat = load_file(str(out))["latents"]
    assert lat.shape[0] == 4 and res.summary["outputs"] == [str(out)]
    assert not torch.allclose(lat[0], lat[1]) and not torch.allclose(lat[1], lat[2])


def test_info_shows_the_layout(capsys):
    from longcat_native.cli import main

    assert main(["info", "--config", "tiny", "--frames", "5", "--height", "64", "--width", "64", "--batch", "3",
                 "--cp", "2", "--cfg-parallel", "--dp", "2", "--json"]) == 0
    layout = json.loads(capsys.readouterr().out)["parallel"]
    assert layout["world"] == 8 and layout["videos_per_replica"] == 2 and layout["guided_batch_per_rank"] == 2
    assert layout["heads_per_rank"] == 2
    assert main(["info", "--config", "tiny", "--cp", "3"]) == 2
    assert "attention heads" in capsys.readouterr().err


pytest_plugins = ("tiny_components",)  # the session-wide tiny_root fixture (umT5 + Wan VAE, tiny)


def test_generate_mp4_one_file_per_video(tmp_path, tiny_root, monkeypatch, capsys):
    """Several videos to .mp4: OUT-<index>.mp4 each with its sidecar, in prompt-major order."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from longcat_native.cli import main

    out = tmp_path / "v.mp4"
    assert main(["generate", "--checkpoint", str(tiny_root), "--prompt", "a cat", "a dog", "--latent", "2", "8", "12",
                 "--kernels", "reference", "--steps", "1", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["outputs"] == [str(tmp_path / "v-0.mp4"), str(tmp_path / "v-1.mp4")]
    assert sorted(os.listdir(tmp_path)) == ["v-0.mp4", "v-0.mp4.json", "v-1.mp4", "v-1.mp4.json"]
    meta = json.loads((tmp_path / "v-1.mp4.json").read_text())
    assert meta["item"] == "1" and meta["items"] == "2"
