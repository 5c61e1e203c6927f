"""Images and videos in, .mp4 out: sizes, value ranges, resizing modes, frame counts read back,
and the errors (files, formats, sizes, missing packages)."""

import sys

import numpy as np
import pytest
import torch

from longcat_native.pipelines import media as M


def smooth_frames(n=9, h=32, w=48):
    """Frames that survive H.264 nearly intact: gradients moving over time."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([np.stack([(xx * 4 + t * 8) % 256, yy * 6 % 256, np.full_like(xx, 100 + 10 * t)], -1)
                     for t in range(n)]).astype(np.uint8)


def test_mp4_round_trip(tmp_path):
    frames = smooth_frames()
    path = M.write_video(tmp_path / "sub" / "v.mp4", frames, fps=15)
    meta = M.read_video_meta(path)
    assert meta["size"] == (32, 48) and meta["fps"] == pytest.approx(15)
    back, fps = M.read_video_frames(path)
    assert back.shape == frames.shape and back.dtype == np.uint8 and fps == pytest.approx(15)
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6  # lossy, but close at crf 18
    # decoded pixels [1, 3, F, H, W] in [-1, 1] are written the same way
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    M.write_video(tmp_path / "p.mp4", pixels, fps=30)
    assert M.read_video_frames(tmp_path / "p.mp4")[0].shape == (9, 32, 48, 3)


def test_pixels_to_uint8():
    px = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    out = M.pixels_to_uint8(px)
    assert out.shape == (1, 5, 1, 1, 3) and out.dtype == np.uint8
    assert out[0, :, 0, 0, 0].tolist() == [0, 128, 255, 255, 0]


def test_load_image_crop_and_stretch(tmp_path):
    from PIL import Image

    ramp = np.tile((np.arange(64) * 4).astype(np.uint8)[None, :, None], (16, 1, 3))  # 16 x 64, left dark
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    crop = M.load_image(tmp_path / "ramp.png", (16, 16), resize="crop")
    stretch = M.load_image(str(tmp_path / "ramp.png"), (16, 16), resize="stretch")
    assert torch.equal(M.load_image(tmp_path / "ramp.png", (16, 16)), stretch)  # stretch: the official default
    assert crop.shape == stretch.shape == (1, 3, 16, 16) and crop.dtype == torch.float32
    # the crop keeps the middle of the ramp; stretching keeps all of it
    assert float(crop.min()) > -0.4 and float(crop.max()) < 0.4
    assert float(stretch.min()) < -0.9 and float(stretch.max()) > 0.9
    same = M.load_image(Image.fromarray(ramp))  # no size: as is, from PIL
    assert same.shape == (1, 3, 16, 64) and float(same[0, 0, 0, 0]) == -1.0
    assert torch.equal(M.load_image(ramp), same)  # from a uint8 array
    assert torch.equal(M.load_image(same, (16, 64)), same)  # a tensor is passed through
    with pytest.raises(ValueError, match="expected"):
        M.load_image(same, (16, 16))
    with pytest.raises(ValueError, match="resize"):
        M.load_image(ramp, (16, 16), resize="pad")


def test_load_video(tmp_path):
    frames = smooth_frames(9)
    M.write_video(tmp_path / "v.mp4", frames)
    v = M.load_video(tmp_path / "v.mp4", (64, 96), last_frames=5)
    assert v.shape == (1, 3, 5, 64, 96) and float(v.min()) >= -1 and float(v.max()) <= 1
    from PIL import Image

    as_list = M.load_video([Image.fromarray(f) for f in frames], last_frames=5)
    assert as_list.shape == (1, 3, 5, 32, 48)
    assert torch.equal(as_list, M.load_video(frames, last_frames=5))
    assert torch.equal(as_list[:, :, -1], M.load_image(frames[-1]))  # the last frames, in order
    assert torch.equal(M.load_video(as_list, last_frames=2), as_list[:, :, -2:])
    with pytest.raises(ValueError, match="9 frames; 13 conditioning"):
        M.load_video(frames, last_frames=13)
    with pytest.raises(ValueError, match="empty"):
        M.load_video([])


def test_official_frame_conversions(tmp_path):
    """uint8 frames read as they are (images too), the official 0..255 float view of a stage-1
    video, the demos' truncation to uint8, and the bicubic resize of the long-video demo."""
    from PIL import Image

    frames = smooth_frames(5)
    assert np.array_equal(M.load_frames([Image.fromarray(f) for f in frames]), frames)
    assert np.array_equal(M.load_frames(frames), frames)
    Image.fromarray(frames[0]).save(tmp_path / "f.png")
    assert np.array_equal(M.load_frames(tmp_path / "f.png"), frames[:1])
    v = M.frames_0_255(frames)
    assert v.shape == (5, 3, 32, 48) and v.dtype == torch.float32 and torch.equal(v[0, 0], torch.from_numpy(
        frames[0, :, :, 0]).float())
    px = M.load_video(frames)  # [-1, 1]
    assert torch.allclose(M.frames_0_255(px), v, atol=1e-4)
    unit = np.array([0.0, 0.5, 0.999, 1.0], dtype=np.float32)
    assert M.truncate_to_uint8(unit).tolist() == [0, 127, 254, 255]  # truncation, as the demos
    small = M.resize_frames(frames, (16, 24), resample="bicubic")
    ref = np.asarray(Image.fromarray(frames[2]).resize((24, 16), Image.BICUBIC))
    assert small.shape == (5, 16, 24, 3) and np.array_equal(small[2], ref)
    with pytest.raises(ValueError, match="resample"):
        M.resize_frames(frames, (16, 24), resample="area")


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.load_image(tmp_path / "missing.png")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type"):
        M.load_image(tmp_path / "x.txt")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        M.load_image(tmp_path / "bad.png")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="not a readable video"):
        M.read_video_frames(tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match="even"):
        M.write_video(tmp_path / "odd.mp4", smooth_frames(3, 33, 48))
    with pytest.raises(ValueError, match=".mp4"):
        M.write_video(tmp_path / "v.avi", smooth_frames(3))
    with pytest.raises(ValueError, match="uint8"):
        M.write_video(tmp_path / "v.mp4", np.full((3, 32, 48, 3), 300, dtype=np.int32))


@pytest.mark.parametrize("module,call", [
    ("imageio_ffmpeg", lambda p: M.write_video(p / "v.mp4", smooth_frames(3))),
    ("PIL.Image", lambda p: M.load_image(np.zeros((8, 8, 3), dtype=np.uint8), (16, 16))),
    ("imageio.v3", lambda p: M.read_video_meta(p / "v.mp4")),
])
def test_missing_packages_name_the_extra(tmp_path, monkeypatch, module, call):
    M.write_video(tmp_path / "v.mp4", smooth_frames(3))
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(M.MissingExtraError, match=r"pip install 'longcat-native\[pipelines\]'"):
        call(tmp_path)


# -- write_video: atomic (issue 19) ----------------------------------------------------------------

def _tmp_leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def _wrap_write_frames(monkeypatch, make):
    """Replace imageio_ffmpeg.write_frames by ``make(real_write_frames, path, *args, **kwargs)``."""
    import imageio_ffmpeg

    real = imageio_ffmpeg.write_frames
    monkeypatch.setattr(imageio_ffmpeg, "write_frames", lambda path, *a, **k: make(real, path, *a, **k))


@pytest.mark.parametrize("exc", [KeyboardInterrupt, BrokenPipeError])
def test_interrupted_encode_leaves_the_previous_video_byte_identical(tmp_path, monkeypatch, exc):
    path = M.write_video(tmp_path / "v.mp4", smooth_frames(5), fps=15)
    before = open(path, "rb").read()

    def make(real, out, *a, **k):
        gen = real(out, *a, **k)

        def interrupted():
            gen.send(None)
            sent = 0
            try:
                while True:
                    frame = yield
                    if sent == 2:
                        raise exc("interrupted mid-encode")  # Ctrl-C, or ffmpeg dying
                    gen.send(frame)
                    sent += 1
            finally:
                gen.close()
        return interrupted()

    _wrap_write_frames(monkeypatch, make)
    with pytest.raises(exc):
        M.write_video(path, smooth_frames(9), fps=30)
    assert open(path, "rb").read() == before and _tmp_leftovers(tmp_path) == []
    monkeypatch.undo()
    M.read_video_frames(path)  # still the good video


def test_failed_encode_that_leaves_a_corrupt_file_is_an_error(tmp_path, monkeypatch):
    """ffmpeg can exit without a complete file and without the pipe failing: the result is
    checked (a finished MP4 has its moov box) before it replaces anything."""
    path = M.write_video(tmp_path / "v.mp4", smooth_frames(5))
    before = open(path, "rb").read()

    def make(real, out, *a, **k):
        def truncated():  # what a killed ffmpeg leaves: the start of an mp4, no moov atom
            yield
            with open(out, "wb") as f:
                f.write(before[: len(before) // 3])
            while True:
                yield
        return truncated()

    _wrap_write_frames(monkeypatch, make)
    with pytest.raises(OSError, match="incomplete"):
        M.write_video(path, smooth_frames(9))
    assert open(path, "rb").read() == before and _tmp_leftovers(tmp_path) == []


def test_written_video_has_the_usual_permissions_and_replaces_the_previous(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        path = M.write_video(tmp_path / "v.mp4", smooth_frames(3))
        M.write_video(path, smooth_frames(7))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert M.read_video_frames(path)[0].shape[0] == 7 and _tmp_leftovers(tmp_path) == []
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        M.write_video(tmp_path / "d.mp4", smooth_frames(3))


def test_read_pixels_and_their_size():
    """The pipelines' input reader: uint8 frames from frames / arrays, float tensors as they are."""
    frames = smooth_frames(3)
    got = M.read_pixels(list(frames), "video")
    assert got.dtype == np.uint8 and np.array_equal(got, frames) and M.pixel_hw(got) == frames.shape[1:3]
    t = torch.zeros(1, 3, 5, 16, 24)
    assert M.read_pixels(t, "video") is t and M.pixel_hw(t) == (16, 24)
    with pytest.raises(ValueError, match="stage1_video is None"):
        M.read_pixels(None, "stage1_video")
