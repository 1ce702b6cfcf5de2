"""Zoom videos: the path (constant zoom speed, a fixed point), frames rendered from the field, MP4/GIF/WebP, one-line errors."""

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import write_pattern_image
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from infd.cli import app
from infd.geometry import Box
from infd.images import to_uint8_hwc
from infd.rendering import LatentField
from infd.viewer import video

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def centre(box: Box) -> np.ndarray:
    return np.array([(box.y0 + box.y1) / 2, (box.x0 + box.x1) / 2])


def shape_in_pixels(box: Box, aspect: float) -> float:
    return aspect * box.width / box.height


boxes_inside = st.tuples(st.floats(-1, 0.9), st.floats(-1, 0.9), st.floats(0.02, 1.9), st.floats(0.02, 1.9)).map(
    lambda t: Box(t[0], t[1], min(1.0, t[0] + t[2]), min(1.0, t[1] + t[3]))
)


@given(end=boxes_inside, aspect=st.floats(0.5, 2.0), video_aspect=st.floats(0.5, 2.0), frames=st.integers(2, 40))
def test_the_zoom_path_has_constant_speed_and_the_video_shape(end, aspect, video_aspect, frames):
    size = (100, max(1, round(100 * video_aspect)))
    boxes = video.zoom_path(Box.full(), end, frames, aspect, size)
    assert len(boxes) == frames
    # Every box shows undistorted at the video's size, and contains what was asked for at either end.
    for box in boxes:
        assert math.isclose(shape_in_pixels(box, aspect), size[1] / size[0], rel_tol=1e-6)
    first, last = boxes[0], boxes[-1]
    assert first.y0 <= -1 + 1e-9 and first.x0 <= -1 + 1e-9 and first.y1 >= 1 - 1e-9 and first.x1 >= 1 - 1e-9
    assert last.y0 <= end.y0 + 1e-9 and last.x0 <= end.x0 + 1e-9 and last.y1 >= end.y1 - 1e-9 and last.x1 >= end.x1 - 1e-9
    assert min(last.y1 - end.y1 + end.y0 - last.y0, last.x1 - end.x1 + end.x0 - last.x0) < 1e-6  # and is the smallest such box
    # Constant zoom speed: the box shrinks by the same factor every frame.
    ratios = [b.height / a.height for a, b in itertools.pairwise(boxes)]
    assert max(ratios) - min(ratios) < 1e-9
    # A fixed point: the same screen position of the same image point in every frame.
    if ratios[0] < 1 - 1e-6:
        p = (centre(last) - ratios[0] ** (frames - 1) * centre(first)) / (1 - ratios[0] ** (frames - 1))
        screen = [(p - [b.y0, b.x0]) / [b.height, b.width] for b in boxes]
        assert np.allclose(screen, screen[0], atol=1e-6)


def test_a_pan_without_zoom_is_a_straight_line():
    boxes = video.zoom_path(Box(-1, -1, 0, 0), Box(0, 0, 1, 1), 5, 1.0, (8, 8))
    assert [centre(b).tolist() for b in boxes] == [[-0.5, -0.5], [-0.25, -0.25], [0.0, 0.0], [0.25, 0.25], [0.5, 0.5]]


def test_every_frame_is_rendered_from_the_field_at_the_video_size(make_tiny_model):
    model = make_tiny_model("clif")
    field = LatentField(model, torch.randn(1, *model.latent_shape))
    boxes = video.zoom_path(Box.full(), Box(-0.5, -0.5, 0.0, 0.0), 3, 1.0, (16, 16))
    frames = list(video.render_frames(field, boxes, (16, 16), tile=7))
    assert [f.shape for f in frames] == [(16, 16, 3)] * 3 and frames[0].dtype == np.uint8
    # The last frame is the box rendered at full resolution, not a crop of the first frame upsampled.
    direct = to_uint8_hwc(field.image((16, 16), box=Box(-0.5, -0.5, 0.0, 0.0))[0])
    assert np.abs(frames[-1].astype(int) - direct.astype(int)).max() <= 1


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".webp"])
def test_the_formats_are_written_whole(tmp_path, suffix):
    frames = [np.full((24, 32, 3), 40 * i, np.uint8) for i in range(5)]
    out = tmp_path / f"clip{suffix}"
    video.write_video(iter(frames), (24, 32), out, fps=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    if suffix == ".mp4":
        assert out.read_bytes()[4:8] == b"ftyp" and b"avc1" in out.read_bytes()[:4096]  # an MP4 holding H.264
        import imageio_ffmpeg

        reader = imageio_ffmpeg.read_frames(str(out))
        meta = next(reader)
        decoded = [np.frombuffer(f, np.uint8).reshape(24, 32, 3) for f in reader]
        assert meta["size"] == (32, 24) and len(decoded) == 5
        assert abs(int(decoded[3].mean()) - 120) <= 3
    else:
        with Image.open(out) as image:
            assert image.size == (32, 24) and image.n_frames == 5


def test_zoom_video_command(make_tiny_model, tmp_path):
    ckpt = tmp_path / "ae"
    make_tiny_model("clif").save_pretrained(ckpt)
    photo = tmp_path / "photo.png"
    write_pattern_image(photo, 30, 40)  # 4:3
    out = tmp_path / "zoom.mp4"
    result = invoke("zoom-video", "--ckpt", ckpt, "--image", photo, "--box=-0.2,0,0.1,0.4", "--size", "38", "--frames", 6, "--fps", 12, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "38x28, 6 frames" in result.output  # the long side, the short one at the photo's aspect rounded to even
    gif = tmp_path / "zoom.gif"
    from infd.geometry import ASPECT_KEY
    from infd.latents import save_latent

    z = tmp_path / "wide.z.safetensors"
    save_latent(z, torch.randn(1, *make_tiny_model("clif").latent_shape), {ASPECT_KEY: 2.0})
    result = invoke("zoom-video", "--ckpt", ckpt, "--z", z, "--box", "0,0,0.5,0.5", "--size", "24", "--frames", 3, "--out", gif, "--no-progress")
    assert result.exit_code == 0, result.output
    with Image.open(gif) as image:
        assert image.size == (24, 12) and image.n_frames == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ae", "photo.png", "zoom.mp4", "zoom.gif", "wide.z.safetensors"])


@pytest.mark.parametrize(
    "options, message",
    [
        (["--box", "0,0,2,2"], "outside the image"),
        (["--box", "0,0,0,1"], "empty"),
        (["--box", "0,0,1e-6,1e-6"], "more than the 65536x"),
        (["--frames", 1], "--frames must be from 2"),
        (["--fps", 0], "--fps must be from 1"),
        (["--size", "33x20"], "even sides"),
        (["--size", "0"], "positive pixels"),
        (["--size", "9000"], "longer than the 8192"),
        (["--out", "OUT/zoom.avi"], "must end in one of .mp4"),
        (["--out", "OUT/zoom.gif", "--size", "8000", "--frames", 9000], "GiB in memory"),
        (["--image", "MISSING"], "does not exist"),
        (["--z", "PHOTO"], "pass exactly one of --z"),
    ],
)
def test_bad_zoom_videos_fail_in_one_sentence(make_tiny_model, tmp_path, options, message):
    ckpt = tmp_path / "ae"
    make_tiny_model("clif").save_pretrained(ckpt)
    photo = tmp_path / "photo.png"
    write_pattern_image(photo, 30, 40)
    folder = tmp_path / "out"
    replace = {"OUT/zoom.avi": folder / "zoom.avi", "OUT/zoom.gif": folder / "zoom.gif", "MISSING": tmp_path / "missing.png", "PHOTO": photo}
    options = [replace.get(o, o) if isinstance(o, str) else o for o in options]
    settings = {"--ckpt": ckpt, "--image": photo, "--box": "0,0,0.5,0.5", "--size": "16", "--frames": 3, "--out": folder / "zoom.mp4"}
    settings.update(zip(options[::2], options[1::2], strict=True))
    args = [f"{key}={value}" for key, value in settings.items()]
    result = invoke("zoom-video", *args, "--no-progress")
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Traceback" not in result.output and message in result.output, result.output
    assert not folder.exists() or not any(folder.iterdir())
