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
    crop = M.load_image(tmp_path / "ramp.png", (16, 16))
    stretch = M.load_image(str(tmp_path / "ramp.png"), (16, 16), resize="stretch")
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
