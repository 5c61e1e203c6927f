"""The longcat-native command line: info and forward, in process and as the console script."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from cases import FIXTURE_ROOT

from longcat_native.cli import main
from longcat_native.pipelines.run import refine_memory_estimate
from longcat_native.pipelines.shapes import latent_size
from longcat_native.runtime.config import resolve_config
from longcat_native.runtime.memory import activation_bytes


def _json_out(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_info_real_config(capsys):
    info = _json_out(capsys, ["info", "--config", "longcat-video", "--json"])
    assert abs(info["parameters"] - 13.6e9) / 13.6e9 < 0.01
    assert info["weight_bytes_in_dtype"] == 2 * info["parameters"]  # bf16 by default
    assert info["latent_thw"] == [24, 60, 104] and info["tokens"] == 37440  # docs/workloads.md, 480p
    assert info["peak_activation_bytes"] > 37440 * 4096 * 2
    weights_and_inputs = info["peak_forward_bytes"] - info["peak_activation_bytes"]
    assert 0 < weights_and_inputs - info["weight_bytes_in_dtype"] < 0.001 * info["weight_bytes_in_dtype"]


def test_info_checkpoint_path(capsys):
    info = _json_out(capsys, ["info", str(FIXTURE_ROOT), "--frames", "13", "--height", "64", "--width", "96",
                              "--dtype", "float32", "--kv-frames", "2", "--json"])
    assert info["parameters"] == 768000 and info["weight_bytes_in_dtype"] == 4 * 768000
    assert info["weight_file_bytes"] > 4 * 768000 * 0.99
    assert info["latent_thw"] == [4, 8, 12] and info["tokens"] == 96
    assert info["kv_cache_bytes"] == 2 * 2 * 2 * 24 * 128 * 4  # k and v, 2 blocks, 2 frames of 24 tokens


def test_info_human_readable(capsys):
    assert main(["info", "--config", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "768,000 (768 K)" in out and "peak activations" in out
    assert "0.00 B" not in out  # the count in a unit that fits it


def test_info_refinement_estimate_only_where_it_fits(capsys):
    """The refinement estimate assumes the official umT5-XXL and Wan VAE: shown for the official
    size, a one-line pointer for a tiny config, and the estimate when asked for."""
    tiny = _json_out(capsys, ["info", "--config", "tiny", "--json"])
    assert "refine_720p_estimate" not in tiny
    assert main(["info", "--config", "tiny"]) == 0
    assert "--refine-estimate" in capsys.readouterr().out
    asked = _json_out(capsys, ["info", "--config", "tiny", "--refine-estimate", "--json"])
    assert asked["refine_720p_estimate"]["estimate"] is True


@pytest.mark.parametrize("seed", ["1e23", "-1", str(2**64), "abc"])
def test_seed_out_of_range_is_an_argument_error(seed, capsys):
    with pytest.raises(SystemExit) as e:
        main(["forward", "--config", "tiny", "--seed", seed])
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import longcat_native.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_forward", interrupted)
    assert cli.main(["forward", "--config", "tiny"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "longcat-native forward: interrupted"


def test_traced_activations_scale_with_tokens():
    """Traced, not a formula: the peak is the FFN's live set, linear in the tokens (the text and
    adaLN terms are under 1% of it)."""
    cfg = resolve_config("longcat-video")
    a = activation_bytes(cfg, (24, 60, 104), 1, torch.bfloat16)
    b = activation_bytes(cfg, (48, 88, 160), 1, torch.bfloat16)
    assert a["peak_op"] == b["peak_op"] == "longcat_native.swiglu"
    assert b["tokens"] == 168960
    assert b["peak_activation_bytes"] / a["peak_activation_bytes"] == pytest.approx(168960 / 37440, rel=1e-2)


def test_info_refinement_estimate(capsys):
    """The 480p -> 720p refinement of 93 frames on the real config (docs/workloads.md: 168,960
    tokens): an estimate made of its documented parts (denoising activations traced with BSA on),
    reported as one, and whether it fits 48 GB."""
    info = _json_out(capsys, ["info", "--config", "longcat-video", "--json"])
    r = info["refine_720p_estimate"]
    assert r["estimate"] and r["tokens"] == 168960 and r["latent_thw"] == [48, 88, 160] and r["frames"] == 186
    assert r["dit_weight_bytes"] == info["weight_bytes_in_dtype"]  # ~27 GB in bf16
    cfg = resolve_config("longcat-video")
    assert r["activation_bytes"] == activation_bytes(cfg, (48, 88, 160), 1, torch.bfloat16, bsa=True)["peak_activation_bytes"]
    assert r["stages"]["denoise"] == (r["dit_weight_bytes"] + r["activation_bytes"] + r["latent_bytes"]
                                      + r["overhead_bytes"])
    assert r["peak_bytes"] == max(r["stages"].values()) == r["stages"]["denoise"]
    assert r["budget_bytes"] == 48 * 1024 ** 3 and r["fits"] == (r["peak_bytes"] <= r["budget_bytes"])
    assert 38e9 < r["peak_bytes"] < 48 * 1024 ** 3  # weights 27.2 GB + activations 12.6 GB + the rest: it fits
    assert main(["info", "--config", "longcat-video"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATED peak GPU memory" in out and "fits in 48.00 GiB" in out


def test_refine_memory_estimate_assumptions():
    cfg = resolve_config("longcat-video")
    params = 13_600_000_000
    base = refine_memory_estimate(cfg, params)
    assert not refine_memory_estimate(cfg, params, budget_bytes=36 * 1024 ** 3)["fits"]
    # untiled decoding (tiles as large as the frame) holds no overlapping tile outputs
    untiled = refine_memory_estimate(cfg, params, vae_tile=2048, vae_tile_stride=2048)
    assert untiled["vae_decode_bytes"] < base["vae_decode_bytes"]
    # the text encoder is alone on the GPU (encoded before the DiT is loaded)
    assert base["stages"]["text_encode"] < base["dit_weight_bytes"]
    assert base["text_encode_with_dit_resident_bytes"] == base["stages"]["text_encode"] + base["dit_weight_bytes"]
    # more frames, more tokens, more memory
    longer = refine_memory_estimate(cfg, params, stage1_frames=189)
    assert longer["tokens"] > base["tokens"] and longer["peak_bytes"] > base["peak_bytes"]
    assert refine_memory_estimate(cfg, params, dtype_bytes=4)["dit_weight_bytes"] == 4 * params


def test_latent_shape_rules():
    assert latent_size(93, 480, 832) == (24, 60, 104)
    assert latent_size(1, 16, 16) == (1, 2, 2)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        latent_size(92, 480, 832)
    with pytest.raises(ValueError, match="multiples of 16"):
        latent_size(93, 480, 840)


def test_forward_tiny(capsys):
    stats = _json_out(capsys, ["forward", "--config", "tiny", "--json"])
    assert stats["output_shape"] == [1, 16, 3, 8, 12] and stats["output_finite"]
    assert stats["kernels"] == "reference" and stats["forward_ms"] > 0 and stats["output_std"] > 0


def test_forward_checkpoint_and_options(capsys):
    stats = _json_out(capsys, ["forward", "--path", str(FIXTURE_ROOT), "--latent", "2", "4", "6", "--batch", "2",
                               "--attention", "reference", "--kernels", "reference", "--json"])
    assert stats["output_shape"] == [2, 16, 2, 4, 6] and stats["attention"] == "reference"


def test_errors_exit_2(capsys):
    assert main(["info", "/no/such/checkpoint"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["forward", "--latent", "2", "5", "6"]) == 2
    assert "odd H or W" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info"])  # a path or --config is required


def test_console_script_or_module_runs():
    exe = shutil.which("longcat-native")
    cmd = [exe] if exe else [sys.executable, "-m", "longcat_native.cli"]
    r = subprocess.run(cmd + ["forward", "--config", "tiny", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["output_finite"]


# What the parser path imports: --help and an argument error must not pay for torch (item 8).
_IMPORT_DRIVER = """
import json, sys
from longcat_native.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = [m for m in sys.modules if m in ("torch", "triton", "numpy") or m.startswith(("torch.", "triton."))
         or m.startswith("longcat_native.kernels.")]
print(json.dumps({"code": code, "heavy": sorted(heavy)}))
"""


@pytest.mark.parametrize("argv,code", [(["--help"], 0), (["generate", "--help"], 0), (["bench", "--help"], 0),
                                       (["generate", "--task", "nope"], 2), (["forward", "--kernels", "x"], 2)])
def test_parser_path_imports_no_torch(argv, code):
    r = subprocess.run([sys.executable, "-c", _IMPORT_DRIVER, *argv], capture_output=True, text=True, timeout=120)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"code": code, "heavy": []}, r.stderr[-2000:]


def test_help_as_module_imports_no_torch():
    """``python -m longcat_native.cli --help`` under ``-X importtime``: every module it imports is
    listed on stderr; none is torch, triton, torch._dynamo or a kernel module."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "longcat_native.cli", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "generate" in r.stdout
    modules = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "longcat_native.runtime.names" in modules  # what the parser imports (the CLI runs as __main__)
    heavy = [m for m in modules if m.split(".")[0] in ("torch", "triton") or m.startswith("longcat_native.kernels.")]
    assert heavy == []


def test_info_memory_plan_with_a_step_cache(capsys):
    """info --max-memory --cache: the denoising stages are traced with the cache (its buffers a
    part of their own, more than without); --cache alone is an error."""
    base = ["info", str(FIXTURE_ROOT), "--frames", "13", "--height", "64", "--width", "96", "--dtype", "float32",
            "--max-memory", "1TiB", "--json"]
    plain = _json_out(capsys, base)["memory_plan"]
    cached = _json_out(capsys, base + ["--cache", "taylorseer:fn=1,order=2"])["memory_plan"]
    assert plain["step_cache"] is None and cached["step_cache"]["taylorseer_order"] == 2
    for p, c in zip(plain["stages"], cached["stages"]):
        if p["kind"] == "denoise":
            assert c["parts"]["step_cache"] > 0 and c["device_bytes"] > p["device_bytes"]
        else:
            assert c == p
    assert main(["info", "--config", "tiny", "--cache", "dbcache"]) != 0
    assert "needs --max-memory" in capsys.readouterr().err


def test_info_with_a_budget_nothing_fits_fails_fast_with_the_table(capsys, monkeypatch):
    """Issue 27 item 9: the whole report, the stage table with each stage's floor included, then
    exit 1; the planner gives up on the floor without tracing a stage (it used to trace every
    stage at the real shapes: minutes for the official model). --json: the same status."""
    from longcat_native.pipelines import budget

    def no_trace(*args, **kwargs):
        raise AssertionError("a stage was traced")

    for tracer in ("_denoise_activation", "trace_text_encoder", "_vae_trace"):
        monkeypatch.setattr(budget, tracer, no_trace)
    base = ["info", "--config", "tiny", "--frames", "13", "--height", "64", "--width", "96", "--max-memory", "1KiB"]
    assert main(base) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "OVER" in out and "gave up before tracing" in out and "peak activations" in out
    assert main(base + ["--json"]) == 1
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["memory_plan"]
    assert not plan["fits"] and not plan["traced"] and plan["floor_bytes"] > 1024
