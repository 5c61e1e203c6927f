"""`longcat-native generate`: the default tiny random-weights run, every task, determinism,
checkpoints with precomputed embeddings, the tiny checkpoint root with its text encoder and VAE
(prompt strings, image/video files, .mp4 output, the per-stage memory report), and errors that
come before any model loading."""

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

pytest_plugins = ("tiny_components",)  # the session-wide tiny_root fixture


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


@pytest.mark.timing
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
    ("refine", ["--latent", "2", "4", "6"], (1, 16, 3, 8, 12)),  # 2x in space, 2T - 1 latents in time
    ("refine", ["--latent", "2", "4", "6", "--spatial-refine-only"], (1, 16, 2, 8, 12)),
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
    (["--task", "i2v", "--image", "x.png"], "needs the Wan VAE"),
    (["--out", "video.mp4"], "needs the Wan VAE"),
    (["--out", "video.txt"], ".safetensors"),
    (["--checkpoint", str(FIXTURE_ROOT), "--prompt", "a cat"], "no tokenizer/ folder"),
    (["--checkpoint", str(FIXTURE_ROOT), "--task", "i2v"], "needs its conditioning"),
    (["--checkpoint", str(FIXTURE_ROOT), "--task", "refine"], "stage-1 video"),
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


# -- with the tiny checkpoint root: text encoder, VAE, pixels, .mp4 ---------------------------------

def _media(tmp_path):
    """A conditioning image and a 9-frame video (smooth, so H.264 keeps them close)."""
    import numpy as np
    from PIL import Image

    from longcat_native.pipelines.media import write_video

    yy, xx = np.mgrid[0:40, 0:70]
    frames = np.stack([np.stack([(xx * 3 + t * 10) % 256, yy * 5 % 256, np.full_like(xx, 120)], -1)
                       for t in range(9)]).astype(np.uint8)
    Image.fromarray(frames[0]).save(tmp_path / "img.png")
    write_video(tmp_path / "clip.mp4", frames, fps=15)
    write_video(tmp_path / "stage1.mp4", frames[:5, :32, :48], fps=15)
    return tmp_path / "img.png", tmp_path / "clip.mp4", tmp_path / "stage1.mp4"


CKPT = ["--kernels", "reference", "--steps", "2"]


def test_checkpoint_prompt_strings_to_mp4_with_memory_report(capsys, tmp_path, tiny_root):
    from longcat_native.pipelines.media import read_video_frames

    out = tmp_path / "t2v.mp4"
    summary, err = _run(capsys, ["--checkpoint", str(tiny_root), "--prompt", "a cat walking in the park",
                                 "--latent", "3", "8", "12", *CKPT, "--out", str(out)])
    assert not summary["random_weights"] and "umT5" in summary["text"] and summary["latent_shape"] == [1, 16, 3, 8, 12]
    assert summary["video_shape"] == [9, 64, 96, 3] and summary["steps"] == 2
    frames, fps = read_video_frames(out)
    assert frames.shape == (9, 64, 96, 3) and fps == pytest.approx(15)
    # the .mp4's metadata (what a .safetensors output holds in its header) in a sidecar
    assert summary["metadata_file"] == str(out) + ".json"
    meta = json.loads((tmp_path / "t2v.mp4.json").read_text())
    assert meta["task"] == "t2v" and meta["steps"] == "2" and meta["quantize"] == meta["cache"] == "none"
    mem = summary["memory"]
    assert [r["stage"] for r in mem["stages"]] == ["text_encode", "load", "denoise", "vae_decode"]
    assert mem["kind"] == "host_peak_rss" and "HOST" in mem["label"]  # CPU: host memory, labelled as such
    assert all(r["peak_bytes"] > 0 and r["seconds"] >= 0 for r in mem["stages"])
    assert summary["peak_memory_bytes"] == max(r["peak_bytes"] for r in mem["stages"])
    # human-readable: the stages and the label are printed
    assert main(["generate", "--checkpoint", str(tiny_root), "--latent", "2", "8", "12", *CKPT,
                 "--out", str(tmp_path / "h.mp4")]) == 0
    text = capsys.readouterr().out
    assert "HOST memory" in text and "vae_decode" in text and "text_encode" in text


def test_checkpoint_prompt_strings_to_latents_same_seed_same_result(capsys, tmp_path, tiny_root):
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    base = ["--checkpoint", str(tiny_root), "--latent", "3", "8", "12", *CKPT, "--seed", "3"]
    summary, _ = _run(capsys, [*base, "--prompt", "a cat", "--out", str(a)])
    assert summary["video_shape"] is None and [r["stage"] for r in summary["memory"]["stages"]] == \
        ["text_encode", "load", "denoise"]
    _run(capsys, [*base, "--prompt", "a cat", "--out", str(b)])
    _run(capsys, [*base, "--prompt", "a dog", "--out", str(c)])
    assert torch.equal(_latents(a), _latents(b)) and not torch.equal(_latents(a), _latents(c))


@pytest.mark.parametrize("task", ["i2v", "vc", "refine"])
def test_checkpoint_pixel_inputs(capsys, tmp_path, tiny_root, task):
    from longcat_native.pipelines.media import read_video_frames

    img, clip, stage1 = _media(tmp_path)
    out = tmp_path / "o.mp4"
    argv = {"i2v": ["--image", str(img), "--latent", "3", "8", "12"],
            "vc": ["--video", str(clip), "--cond-frames", "5", "--latent", "4", "8", "12"],
            "refine": ["--video", str(stage1), "--resolution", "64x96", "--lora-network-dim", "4"]}[task]
    summary, _ = _run(capsys, ["--checkpoint", str(tiny_root), "--task", task, *argv, *CKPT, "--out", str(out)])
    stages = [r["stage"] for r in summary["memory"]["stages"]]
    assert stages[:3] == ["text_encode", "load", "vae_encode"] and stages[-1] == "vae_decode"
    frames, fps = read_video_frames(out)
    expected = {"i2v": (9, 64, 96, 3), "vc": (13, 64, 96, 3), "refine": (10, 64, 96, 3)}[task]
    assert frames.shape == expected and tuple(summary["video_shape"]) == expected
    if task == "refine":  # 5 frames doubled at 64x96, padded to 4 latents; no guidance; 30 fps as officially
        assert summary["latent_shape"] == [1, 16, 4, 8, 12] and summary["steps"] == 5 and summary["guidance"] == 1.0
        assert fps == pytest.approx(30) and any("refinement LoRA on" in n for n in summary["notes"])
    if task == "i2v":
        # the first frame is the image's (cropped to 64 x 96, through the VAE: close to it, not equal)
        assert any("encoded by the VAE" in n for n in summary["notes"])


@pytest.mark.parametrize("argv,without,exc_text", [
    (["--out", "x.mp4"], ("vae",), "no vae/ folder"),
    (["--prompt", "a cat"], ("tokenizer",), "no tokenizer/ folder"),
    (["--prompt", "a cat"], ("text_encoder",), "no text_encoder/ folder"),
    (["--task", "refine", "--video", "{stage1}", "--guidance", "4"], (), "without guidance"),
    (["--task", "vc", "--video", "{clip}", "--cond-frames", "6", "--latent", "4", "8", "12"], (), "4k + 1"),
    (["--task", "vc", "--video", "{clip}", "--cond-frames", "13", "--latent", "5", "8", "12"], (),
     "13 conditioning frames"),
    (["--resolution", "64x100"], (), "multiples of 16"),
    (["--task", "i2v", "--image", "{missing}"], (), "does not exist"),
    (["--task", "i2v", "--image", "{img}", "--cond-latents", "x.safetensors"], (), "replaces --image"),
    (["--out", "x.mp4", "--vae-tile", "128", "--no-vae-tiling"], (), "contradicts"),
    (["--task", "refine", "--video", "{stage1}", "--frames", "9"], (), "fixes the frame count"),
    (["--out", "x.mp4", "--vae-tile", "100"], (), "--vae-tile must be a multiple of 8"),
])
def test_checkpoint_errors_before_loading(capsys, monkeypatch, tmp_path, tiny_root, argv, without, exc_text):
    from tiny_components import partial_root

    from longcat_native.pipelines.components import TextEncoder, VideoVAE
    from longcat_native.runtime.dit import LongCatDiT

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    for cls in (LongCatDiT, TextEncoder, VideoVAE):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(no_loading))
    img, clip, stage1 = _media(tmp_path)
    root = partial_root(tiny_root, tmp_path / "root", without=without) if without else tiny_root
    argv = [a.format(img=img, clip=clip, stage1=stage1, missing=tmp_path / "missing.png") for a in argv]
    assert main(["generate", "--checkpoint", str(root), *argv]) == 2
    err = capsys.readouterr().err
    assert "longcat-native generate: error:" in err and exc_text in err


@pytest.mark.parametrize("module", ["diffusers", "transformers", "imageio_ffmpeg"])
def test_missing_extras_before_loading(capsys, monkeypatch, tmp_path, tiny_root, module):
    from longcat_native.runtime.dit import LongCatDiT

    monkeypatch.setattr(LongCatDiT, "from_pretrained", classmethod(lambda *a, **k: 1 / 0))
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    assert main(["generate", "--checkpoint", str(tiny_root), "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert module in err and "pip install 'longcat-native[pipelines]'" in err


def test_long_video_the_official_way(capsys, tmp_path, tiny_root):
    """--task long to .mp4 with a checkpoint: the official demo's chain (each segment decoded to
    uint8 frames, the next continuing its last frames re-encoded); --chain latent the latent chain."""
    from longcat_native.pipelines.media import read_video_frames

    base = ["--checkpoint", str(tiny_root), "--task", "long", "--segments", "1", "--cond-frames", "5",
            "--latent", "3", "8", "12", *CKPT]
    summary, _ = _run(capsys, [*base, "--out", str(tmp_path / "l.mp4")])
    assert any("official way" in n for n in summary["notes"]) and summary["video_shape"] == [13, 64, 96, 3]
    assert summary["latent_shape"] == [1, 16, 4, 8, 12] and read_video_frames(tmp_path / "l.mp4")[0].shape[0] == 13
    summary, _ = _run(capsys, [*base, "--chain", "latent", "--out", str(tmp_path / "m.mp4")])
    assert not any("official way" in n for n in summary["notes"]) and summary["video_shape"] == [13, 64, 96, 3]
    assert main(["generate", *base, "--chain", "pixels", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--chain pixels" in capsys.readouterr().err


def test_negative_prompt_without_guidance_is_ignored(capsys, tmp_path, tiny_root):
    """As officially: guidance <= 1 runs no negative branch, and a negative prompt is ignored (a note says so)."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    base = ["--checkpoint", str(tiny_root), "--latent", "2", "8", "12", *CKPT, "--guidance", "1"]
    summary, _ = _run(capsys, [*base, "--negative-prompt", "blurred", "--out", str(a)])
    assert any("--negative-prompt ignored" in n for n in summary["notes"])
    _run(capsys, [*base, "--out", str(b)])
    assert torch.equal(_latents(a), _latents(b))


def test_vae_tiling_is_asked_for(monkeypatch, tmp_path, tiny_root, capsys):
    """Whole frames by default (official); --vae-tile N / --vae-tiling tile (N / 256 pixels)."""
    from longcat_native.pipelines import components as C

    seen = []
    real = C.VideoVAE.__init__

    def spy(self, vae, **kw):
        seen.append((kw.get("tiling"), kw.get("tile")))
        real(self, vae, **kw)

    monkeypatch.setattr(C.VideoVAE, "__init__", spy)
    base = ["--checkpoint", str(tiny_root), "--latent", "2", "8", "12", *CKPT]
    for extra in ([], ["--vae-tile", "32"], ["--vae-tiling"]):
        _run(capsys, [*base, *extra, "--out", str(tmp_path / "v.mp4")])
    assert seen == [(False, (256, 256)), (True, (32, 32)), (True, (256, 256))]


def test_pixel_inputs_take_the_official_bucket(capsys, tmp_path, tiny_root, monkeypatch):
    """Without --latent / --resolution HxW, i2v resizes its image to the official 480p bucket of
    its aspect ratio (checked on the plan: no model runs)."""
    import numpy as np
    from PIL import Image

    from longcat_native.pipelines.run import GenerateRequest, plan_generate

    Image.fromarray(np.zeros((90, 160, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    plan = plan_generate(GenerateRequest(checkpoint=str(tiny_root), task="i2v", image=str(tmp_path / "wide.png"),
                                         frames=5, out=str(tmp_path / "o.mp4")))
    assert plan.latent == (2, 480 // 8, 832 // 8) and plan.pixels.shape == (1, 3, 480, 832)
    plan = plan_generate(GenerateRequest(checkpoint=str(tiny_root), task="i2v", image=str(tmp_path / "wide.png"),
                                         frames=5, resolution="720p", out=str(tmp_path / "o.mp4")))
    assert plan.latent[1:] == (704 // 8, 1312 // 8)
    plan = plan_generate(GenerateRequest(checkpoint=str(tiny_root), task="i2v", image=str(tmp_path / "wide.png"),
                                         frames=5, resolution=(64, 96), out=str(tmp_path / "o.mp4")))
    assert plan.latent[1:] == (8, 12) and plan.vae_tile is None


def test_resolution_flag(capsys):
    """A bucket name stays a name (i2v / vc / refine then take the official bucket of the input's
    aspect ratio); HxW is a size; anything else is an argument error naming the flag."""
    parse = cli.build_parser().parse_args
    assert parse(["generate", "--resolution", "480p"]).resolution == "480p"
    assert parse(["generate", "--resolution", "64x96"]).resolution == (64, 96)
    with pytest.raises(SystemExit) as e:
        parse(["generate", "--resolution", "1080p"])
    assert e.value.code == 2 and "--resolution" in capsys.readouterr().err


def test_generate_flags_default_to_the_request_defaults():
    """`generate`'s flags and GenerateRequest (the same run from Python) have the same defaults."""
    import dataclasses

    from longcat_native.pipelines.run import GenerateRequest

    args = vars(cli.build_parser().parse_args(["generate"]))
    assert {f.name: f.default for f in dataclasses.fields(GenerateRequest)} == \
        {f.name: args[f.name] for f in dataclasses.fields(GenerateRequest)}


def test_generate_flags_are_declared_once_on_the_request():
    """Issue 27 item 11: each GenerateRequest field is its flag (help, group, choices, type in the
    field's metadata; cli.py adds nothing but --json), listed under its group; info, forward and
    profile take their shared flags from the same fields."""
    import argparse
    import dataclasses

    from longcat_native.pipelines.plan import GenerateRequest

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    gen = {a.dest: a for a in sub["generate"]._actions}
    fields = dataclasses.fields(GenerateRequest)
    assert set(gen) == {f.name for f in fields} | {"help", "json"}
    groups = {g.title: {a.dest for a in g._group_actions} for g in sub["generate"]._action_groups}
    for f in fields:
        assert f.name in groups[f.metadata["group"]], f.name
        assert gen[f.name].help == f.metadata["help"] and gen[f.name].choices == f.metadata.get("choices")
    for command, names in (("info", ("quantize", "max_memory", "cache")),
                           ("forward", cli._MODEL_FLAGS), ("profile", cli._MODEL_FLAGS)):
        acts = {a.dest: a for a in sub[command]._actions}
        for name in names:
            assert acts[name].help == gen[name].help and acts[name].choices == gen[name].choices, (command, name)


# -- nothing lost, nothing silently wrong (issue 19: outputs, paths, honest metadata) ----------------

def test_out_path_checked_before_loading(capsys, tmp_path, monkeypatch):
    """--out onto a folder, or into a folder that cannot be made, fails before anything loads;
    a missing folder is created (as for .mp4)."""
    from longcat_native.runtime.dit import LongCatDiT

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(LongCatDiT, "from_config", no_load)
    folder = tmp_path / "taken.safetensors"
    folder.mkdir()
    assert main(["generate", "--out", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["generate", "--out", str(blocker / "sub" / "x.safetensors")]) == 2
    assert "--out" in capsys.readouterr().err
    monkeypatch.undo()
    made = tmp_path / "new" / "deeper" / "x.safetensors"
    assert main(["generate", "--steps", "1", "--out", str(made)]) == 0
    assert _latents(made).shape == (1, 16, 4, 8, 12)


def test_failed_write_leaves_the_previous_output(capsys, tmp_path, monkeypatch):
    """The latents go to a temporary file renamed into place: a write that fails half-way leaves
    the previous file byte-identical and no temporary file behind."""
    out = tmp_path / "x.safetensors"
    assert main(["generate", "--steps", "1", "--out", str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    import safetensors.torch

    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        main(["generate", "--steps", "2", "--seed", "5", "--out", str(out)])
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # the usual permissions, not mkstemp's


def test_metadata_records_the_steps_run(capsys, tmp_path):
    """--steps is the base schedule's length: vc adds the enhance_hf tail; the file says what ran."""
    out = tmp_path / "vc.safetensors"
    s, _ = _run(capsys, ["--task", "vc", "--steps", "2", "--out", str(out)])
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["steps_requested"] == "2" and int(meta["steps"]) == s["steps"] > 2


def test_metadata_and_summary_record_quantize_and_cache(capsys, tmp_path):
    """Issue 27 item 8: --quantize and --cache change the result, so the output file records them
    (what ran: the model's mode, the cache's spec and policy) and so does the --json summary."""
    out = tmp_path / "q.safetensors"
    s, _ = _run(capsys, ["--steps", "3", "--quantize", "int8-weight-only", "--cache", "dbcache:fn=1,warmup=1",
                         "--out", str(out)])
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["quantize"] == "int8-weight-only" and meta["cache"] == "dbcache:fn=1,warmup=1"
    policy = json.loads(meta["cache_policy"])
    assert policy["Fn_compute_blocks"] == 1 and policy["max_warmup_steps"] == 1
    assert s["quantize"] == "int8-weight-only" and s["cache"] == "dbcache:fn=1,warmup=1"
    assert s["step_cache"]["policy"] == policy
    plain = tmp_path / "p.safetensors"
    s, _ = _run(capsys, ["--steps", "1", "--out", str(plain)])
    with safe_open(str(plain), "pt") as f:
        meta = f.metadata()
    assert meta["quantize"] == meta["cache"] == "none" and "cache_policy" not in meta
    assert s["quantize"] is None and s["cache"] is None


def test_image_without_checkpoint_points_to_cond_latents(capsys, tmp_path):
    assert main(["generate", "--task", "i2v", "--image", str(tmp_path / "x.png")]) == 2
    assert "--cond-latents" in capsys.readouterr().err


def test_smoke_run_says_what_next(capsys, tmp_path):
    assert main(["generate", "--steps", "1", "--out", str(tmp_path / "x.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "next" in out and "--checkpoint" in out and ".mp4" in out


@pytest.mark.parametrize("argv, flag", [(["--steps", "0"], "--steps"), (["--steps", str(10**9)], "--steps"),
                                        (["--guidance", "inf"], "--guidance"), (["--guidance", "nan"], "--guidance"),
                                        (["--seed", "1e23"], "--seed"), (["--seed", str(2**64)], "--seed")])
def test_absurd_numbers_are_argument_errors(argv, flag, capsys):
    """Caught by the parser, before anything loads (exit 2, the flag named)."""
    with pytest.raises(SystemExit) as e:
        main(["generate", *argv])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_quantize_and_memory_budget_flags(capsys, tmp_path):
    """--quantize builds the quantized model (deviation from the plain run reported, not zero, not
    huge); --max-memory plans the run's own stages and applies the plan (here: the tiny model's
    one denoising stage); a budget nothing fits, a bad mode and conflicting flags are errors
    before anything loads."""
    plain_out, q_out = tmp_path / "plain.safetensors", tmp_path / "q.safetensors"
    _run(capsys, ["--steps", "2", "--out", str(plain_out)])
    s, _ = _run(capsys, ["--steps", "2", "--quantize", "int8-weight-only", "--out", str(q_out)])
    plain, quant = _latents(plain_out), _latents(q_out)
    rel = float((quant - plain).norm() / plain.norm())
    assert 0 < rel < 0.05, rel
    s, _ = _run(capsys, ["--steps", "2", "--max-memory", "4GiB", "--out", str(tmp_path / "m.safetensors")])
    plan = s["memory_plan"]
    assert plan["fits"] and [st["name"] for st in plan["stages"]] == ["denoise"]
    assert plan["stages"][0]["device_bytes"] <= 4 * 2**30 and not plan["streams"]
    assert torch.equal(_latents(tmp_path / "m.safetensors"), plain)  # nothing needed switching on
    s, _ = _run(capsys, ["--steps", "2", "--max-memory", "4GiB", "--cache", "dbcache:fn=1",
                         "--out", str(tmp_path / "c.safetensors")])
    cached = s["memory_plan"]["stages"][0]  # the plan counts the step cache's buffers
    assert s["memory_plan"]["step_cache"]["Fn_compute_blocks"] == 1 and cached["parts"]["step_cache"] > 0
    assert cached["device_bytes"] > plan["stages"][0]["device_bytes"]
    assert main(["generate", "--steps", "2", "--max-memory", "1KiB", "--out", str(tmp_path / "x.safetensors")]) != 0
    assert "does not fit" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    for bad in (["--quantize", "int4"], ["--max-memory", "lots"], ["--max-memory", "4GiB", "--offload", "blocks"]):
        try:  # argparse exits for a bad choice; main returns 2 for a ValueError
            rc = main(["generate", "--steps", "2", *bad, "--out", str(tmp_path / "y.safetensors")])
        except SystemExit as e:
            rc = e.code
        assert rc not in (0, None), bad
        capsys.readouterr()
    assert not (tmp_path / "y.safetensors").exists()


def test_an_impossible_budget_fails_before_loading_or_tracing(capsys, tmp_path, monkeypatch):
    """Issue 27 item 9: --max-memory under the run's floor is an error with the stage table, before
    the model loads and before any stage is traced (the floor needs sizes only)."""
    from longcat_native.pipelines import budget, run

    def forbidden(*args, **kwargs):
        raise AssertionError("loaded or traced")

    for tracer in ("_denoise_activation", "trace_text_encoder", "_vae_trace"):
        monkeypatch.setattr(budget, tracer, forbidden)
    monkeypatch.setattr(run, "_load", forbidden)  # the run's model (and VAE) loading
    out = tmp_path / "x.safetensors"
    assert main(["generate", "--steps", "2", "--max-memory", "1MiB", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not fit --max-memory 1MiB" in err and "gave up before tracing" in err and "denoise" in err
    assert not out.exists()


def test_checkpoint_run_within_a_budget(capsys, tmp_path, tiny_root):
    """--max-memory with the tiny checkpoint root: the plan traces the text encoder, the denoising
    pass and the VAE decode of this run's own shapes (the checkpoint's component configs); a
    budget the text encoder fits only alone turns model offload on, with the same latents."""
    base = ["--checkpoint", str(tiny_root), "--prompt", "a cat", "--latent", "3", "8", "12", *CKPT]
    _run(capsys, [*base, "--out", str(tmp_path / "a.safetensors")])
    s, _ = _run(capsys, [*base, "--max-memory", "64GiB", "--out", str(tmp_path / "b.mp4")])
    plan = s["memory_plan"]
    assert [st["name"] for st in plan["stages"]] == ["text_encode", "denoise", "vae_decode"]
    assert plan["fits"] and not plan["streams"] and not plan["vae_tiling"] and not plan["offload_dit"]
    rows = {st["name"]: st for st in plan["stages"]}
    te_alone = rows["text_encode"]["device_bytes"] - rows["text_encode"]["parts"]["dit_weights"]
    if max(rows["denoise"]["device_bytes"], rows["vae_decode"]["device_bytes"]) > te_alone:
        pytest.skip("at these sizes the text encoder is not the largest stage")
    s, _ = _run(capsys, [*base, "--max-memory", str(te_alone), "--out", str(tmp_path / "c.safetensors")])
    plan = s["memory_plan"]
    assert plan["fits"] and plan["offload_dit"] and not plan["streams"]
    assert "dit" not in next(st for st in plan["stages"] if st["name"] == "text_encode")["on_device"]
    assert any("host memory during" in n for n in s["notes"])
    assert torch.equal(_latents(tmp_path / "c.safetensors"), _latents(tmp_path / "a.safetensors"))
