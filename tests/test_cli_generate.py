"""`longcat-native generate`: the default tiny random-weights run, every task, determinism,
checkpoints with precomputed embeddings, and errors that come before any model loading."""

import json
import subprocess
import sys
import time

import pytest
import torch
from cases import FIXTURE_ROOT
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from longcat_native import cli
from longcat_native.cli import main


def _run(capsys, argv):
    rc = main(["generate", *argv, "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return json.loads(cap.out.strip().splitlines()[-1]), cap.err


def _latents(path):
    return load_file(str(path))["latents"]


def test_default_run_human_readable(capsys, tmp_path):
    out = tmp_path / "t2v.safetensors"
    assert main(["generate", "--steps", "3", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "RANDOM WEIGHTS" in cap.out and "RANDOM text embeddings" in cap.out
    assert "s/step" in cap.out and str(out) in cap.out
    progress = [line for line in cap.err.splitlines() if "s/step" in line]
    assert len(progress) == 3 and "3/3" in progress[-1]
    lat = _latents(out)
    assert lat.shape == (1, 16, 4, 8, 12) and torch.isfinite(lat).all()
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["random_weights"] == "True" and meta["task"] == "t2v"


def test_default_command_as_console_script_is_fast(tmp_path):
    """The default command (50 steps with CFG on the tiny model) in a fresh process, well under a minute."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "longcat_native.cli", "generate", "--out",
                           str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM WEIGHTS" in proc.stdout and proc.stderr.count("s/step") == 50
    assert elapsed < 60


def test_determinism_and_seed(capsys, tmp_path):
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    _run(capsys, ["--steps", "2", "--seed", "4", "--out", str(a)])
    _run(capsys, ["--steps", "2", "--seed", "4", "--out", str(b)])
    _run(capsys, ["--steps", "2", "--seed", "5", "--out", str(c)])
    assert torch.equal(_latents(a), _latents(b)) and not torch.equal(_latents(a), _latents(c))


@pytest.mark.parametrize("task,argv,shape", [
    ("t2v", ["--distill", "--steps", "4"], (1, 16, 4, 8, 12)),
    ("i2v", ["--frames", "9"], (1, 16, 3, 8, 12)),
    ("vc", ["--no-kv-cache"], (1, 16, 4, 8, 12)),
    ("vc", [], (1, 16, 4, 8, 12)),
    ("long", ["--segments", "2"], (1, 16, 8, 8, 12)),
    ("refine", ["--latent", "2", "4", "6"], (1, 16, 2, 8, 12)),
])
def test_tasks(capsys, tmp_path, task, argv, shape):
    out = tmp_path / "o.safetensors"
    steps = [] if "--steps" in argv else ["--steps", "2"]
    summary, err = _run(capsys, ["--task", task, *steps, *argv, "--out", str(out)])
    assert summary["random_weights"] and summary["latent_shape"] == list(shape)
    assert summary["output"] == str(out) and summary["output_finite"]
    assert summary["mean_step_s"] > 0 and len(summary["step_times_s"]) == summary["steps"]
    assert _latents(out).shape == shape
    if task == "t2v":
        assert summary["guidance"] == 1.0 and summary["steps"] == 4 and summary["distill"]
    if task == "refine":  # stage 1 (2 steps) then refinement's 5 steps
        assert summary["steps"] == 2 + 5
    if task in ("i2v", "vc"):
        assert any("RANDOM" in n for n in summary["notes"])


def test_checkpoint_with_embeddings_file(capsys, tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = tmp_path / "emb.safetensors"
    save_file({"prompt_embeds": torch.randn(1, 1, 8, 64, generator=g),
               "prompt_mask": torch.ones(1, 8, dtype=torch.long),
               "negative_embeds": torch.randn(1, 1, 8, 64, generator=g),
               "negative_mask": torch.ones(1, 8, dtype=torch.long)}, str(emb))
    cond = tmp_path / "img.safetensors"
    save_file({"latents": torch.randn(1, 16, 1, 8, 12, generator=g)}, str(cond))
    out = tmp_path / "o.safetensors"
    summary, _ = _run(capsys, ["--checkpoint", str(FIXTURE_ROOT), "--task", "i2v", "--prompt-embeds", str(emb),
                               "--cond-latents", str(cond), "--latent", "3", "8", "12", "--steps", "2",
                               "--kernels", "reference", "--out", str(out)])
    assert not summary["random_weights"] and summary["latent_shape"] == [1, 16, 3, 8, 12]
    assert torch.equal(_latents(out)[:, :, :1], load_file(str(cond))["latents"])


@pytest.mark.parametrize("argv,exc_text", [
    (["--frames", "10"], "4k + 1"),
    (["--task", "t2v", "--image", "x.png"], "takes no image"),
    (["--task", "t2v", "--cond-latents", "x.safetensors"], "takes none"),
    (["--task", "i2v", "--image", "x.png"], "longcat-native[pipelines]"),
    (["--out", "video.mp4"], "longcat-native[pipelines]"),
    (["--out", "video.txt"], ".safetensors"),
    (["--checkpoint", str(FIXTURE_ROOT), "--prompt", "a cat"], "longcat-native[pipelines]"),
    (["--task", "vc", "--latent", "2", "8", "12"], "nothing to generate"),
    (["--latent", "3", "7", "12"], "even H and W"),
    (["--latent", "3", "8", "12", "--frames", "9"], "replaces"),
])
def test_errors_before_loading(capsys, monkeypatch, argv, exc_text):
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    from longcat_native.runtime.dit import LongCatDiT

    monkeypatch.setattr(LongCatDiT, "from_pretrained", classmethod(no_loading))
    monkeypatch.setattr(LongCatDiT, "from_config", classmethod(no_loading))
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert "longcat-native generate: error:" in err and exc_text in err


def test_unknown_task_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--task", "v2v"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_info_and_forward_still_there():
    parser = cli.build_parser()
    assert parser.parse_args(["forward"]).func is cli.cmd_forward
    assert parser.parse_args(["info", "--config", "tiny"]).func is cli.cmd_info
    assert parser.parse_args(["generate"]).func is cli.cmd_generate
