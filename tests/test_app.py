"""`infd app` without a browser: each tab's work on tiny models, the one server (page, viewers, Host check), the command's errors.

tests/test_app_browser.py drives the same server in Chromium.
"""

import numpy as np
import pytest
import torch
from conftest import write_pattern_image
from PIL import Image
from typer.testing import CliRunner

from infd.errors import InfdError
from infd.geometry import Box

gradio = pytest.importorskip("gradio", reason="gradio is not installed (pip install -e .)")

from infd.app import workspace as ws  # noqa: E402
from infd.app.workspace import Cancelled, Job, Workspace  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_workspace(folder) -> Workspace:
    """A workspace over a tiny pipeline ("pipe") and a tiny autoencoder alone ("ae"), saved in `folder`."""
    from conftest import TINY_MODEL, TINY_UNET
    from diffusers import UNet2DModel

    from infd.diffusion import make_training_scheduler
    from infd.diffusion.pipeline import INFDPipeline
    from infd.models import NeuralFieldAutoencoder

    torch.manual_seed(0)
    autoencoder = NeuralFieldAutoencoder(**{**TINY_MODEL, "fixed_head": True}).eval()
    c, h, _ = autoencoder.latent_shape
    INFDPipeline(autoencoder, UNet2DModel(sample_size=h, in_channels=c, out_channels=c, **TINY_UNET).eval(), make_training_scheduler()).save_pretrained(folder / "pipe")
    autoencoder.save_pretrained(folder / "ae")
    return Workspace([folder / "pipe", folder / "ae"], "cpu")


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("models"))


def test_generate_is_the_clis_image_at_any_aspect(space):
    from infd.diffusion.pipeline import load_pipeline

    reports = []
    picture = space.generate("pipe", 5, 48, 27, 3, Job(report=lambda fraction, text: reports.append((fraction, text))))
    assert picture.render.shape == (27, 48, 3) and picture.seed == 5 and picture.aspect == pytest.approx(48 / 27)
    same = load_pipeline(space.slots["pipe"].path).use_sampler("ddim").sample_latents(1, 3, [torch.Generator().manual_seed(5)])
    assert torch.allclose(picture.z, same, atol=1e-6)  # `infd sample --seed 5 --steps 3` draws this z
    assert [text for _, text in reports].count("sampling") == 4 and reports[-1] == (1.0, "rendering")
    zid = picture.viewer.split("?z=")[1]
    assert picture.viewer.startswith("/viewer/0/") and space.slots["pipe"].service.book.size_of(zid) == (36864, 65536)  # 16:9 in the viewer too
    assert "--seed 5" in picture.reproduce and "--size 48x27" in picture.reproduce
    assert space.generate("pipe", None, 8, 8, 1, Job()).seed is not None  # a random seed, said


def test_generate_streams_what_does_not_fit_in_memory(space, monkeypatch):
    monkeypatch.setattr(ws, "MAX_RENDER_PIXELS", 1000)
    monkeypatch.setattr(ws, "PREVIEW_SIDE", 32)
    picture = space.generate("pipe", 1, 60, 40, 2, Job())
    assert picture.file.suffix == ".tif" and picture.render.shape == (21, 32, 3)
    import tifffile

    assert tifffile.imread(picture.file).shape == (40, 60, 3)


def test_cancel_stops_at_the_next_step(space):
    job = Job()
    job.cancel.set()
    with pytest.raises(Cancelled):
        space.generate("pipe", 1, 16, 16, 3, job)


@pytest.mark.parametrize(
    "args, message",
    [
        (("ae", 0, 16, 16, 2), "cannot generate"),
        (("pipe", 0, 0, 16, 2), "the height must be a whole number"),
        (("pipe", 0, 40000, 16, 2), "longer than the 32768"),
        (("pipe", -1, 16, 16, 2), "the seed must be"),
        (("pipe", 0, 16, 16, 0), "sampling steps"),
        (("nope", 0, 16, 16, 2), "unknown model"),
    ],
)
def test_bad_generate_requests_are_one_sentence(space, args, message):
    name, seed, height, width, steps = args
    with pytest.raises(InfdError, match=message):
        space.generate(name, seed, width, height, steps, Job())


def test_explore_renders_the_region_beside_the_upsampled_cut(space):
    picture = space.generate("pipe", 2, 64, 32, 2, Job())
    rendered, cut, box = space.explore(picture, (0.9, -0.95), 4, 40, Job())
    assert box == Box(0.5, -1.0, 1.0, -0.5)  # moved inside the image
    assert rendered.shape == cut.shape == (20, 40, 3)  # the region keeps the image's 2:1
    whole, same, _ = space.explore(picture, (0.0, 0.0), 1, 64, Job())
    assert np.abs(same.astype(int) - picture.render.astype(int)).max() <= 1  # at 1x the cut is the shown render itself
    with pytest.raises(InfdError, match="magnification must be from 1 to 64"):
        space.explore(picture, (0, 0), 65, 40, Job())


def test_zoom_video_from_the_app(space):
    import imageio_ffmpeg

    picture = space.generate("pipe", 2, 32, 32, 2, Job())
    out = space.zoom_video(picture, ws.zoom_region((0.2, 0.2), 8), 24, 4, Job())
    reader = imageio_ffmpeg.read_frames(str(out))
    assert next(reader)["size"] == (24, 24) and len(list(reader)) == 4


def test_reconstruct_shows_the_floors_with_psnr(space, tmp_path):
    photo = tmp_path / "photo.png"
    write_pattern_image(photo, 30, 40)
    picture, rows = space.reconstruct("ae", photo, 20, Job())
    assert picture.render.shape == (15, 20, 3) and picture.aspect == pytest.approx(4 / 3)
    assert [label for label, _, _ in rows] == ["infd", "thumbnail floor", "input floor"]
    assert all(pixels.shape == (15, 20, 3) and 5 < value < 80 for _, pixels, value in rows)
    _, larger = space.reconstruct("ae", photo, 80, Job())
    assert [value for _, _, value in larger] == [None] * 3  # no ground truth above the image's own size
    native, _ = space.reconstruct("ae", photo, None, Job())
    assert native.render.shape == (30, 40, 3)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InfdError, match="not a readable image"):
        space.reconstruct("ae", bad, 20, Job())


def test_layout_says_what_to_pass_without_clip(space):
    with pytest.raises(InfdError, match="start `infd app --clip PATH`"):
        space.layout("pipe", [(Box.full(), "a house")], 64, 64, 2, 0, None, None, Job())
    with pytest.raises(InfdError, match="at least one box"):
        space.layout("pipe", [], 64, 64, 2, 0, "clip", None, Job())


def test_the_viewer_keeps_a_bounded_number_of_latents(space, monkeypatch):
    monkeypatch.setattr(ws, "KEEP_LATENTS", 2)
    slot = space.slots["ae"]
    ids = [space.show_in_viewer(slot, torch.full((1, 3, 8, 8), i + 1.0), 1.0, "x", "") for i in range(4)]
    assert len(slot.kept) == 2 and all(zid.split("=")[1] in slot.service.book.added for zid in ids[-2:])
    assert ids[0].split("=")[1] not in slot.service.book.added


def test_one_server_for_the_page_and_the_viewers(space):
    from fastapi.testclient import TestClient

    from infd.app.server import create_server, running
    from infd.viewer.app import LOOPBACK_HOSTS

    with running(space), TestClient(create_server(space, LOOPBACK_HOSTS), base_url="http://127.0.0.1") as client:
        assert client.get("/").status_code == 200 and "infd" in client.get("/").text
        info = client.get("/viewer/0/api/info").json()
        assert info["first"] == "seed-0" and info["can_sample"]
        assert client.get("/viewer/1/api/info").json()["can_sample"] is False  # the autoencoder's viewer
        assert client.get("/viewer/0/").status_code == 200
        assert client.get("/", headers={"host": "attacker.example"}).status_code == 400
        assert client.get("/viewer/0/api/info", headers={"host": "attacker.example"}).status_code == 400


def test_app_command_errors_are_one_sentence(tmp_path):
    from infd.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["app", "--port", "0"])
    assert result.exit_code == 1 and "--port must be from 1 to 65535" in result.output
    result = runner.invoke(app, ["app", "--model", str(tmp_path / "missing"), "--port", "7999"])
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output


def test_the_page_image_is_written_as_shown(space):
    picture = space.generate("pipe", 3, 20, 10, 1, Job())
    assert Image.fromarray(picture.render).size == (20, 10)
