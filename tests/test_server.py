"""The viewer's tile service and HTTP API: tiles equal a direct render of their level, batching,
caches, a bounded queue, seeds from a pipeline, view downloads, and 4xx for every kind of nonsense."""

import io
import socket
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from infd.cli import app as cli_app
from infd.geometry import Box
from infd.images import to_uint8_hwc
from infd.latents import load_latent, save_latent
from infd.rendering import render
from infd.viewer.app import create_app
from infd.viewer.deepzoom import render_tiles
from infd.viewer.service import LatentBook, ServiceBusy, TileService

SIZE = (300, 420)  # the viewer's virtual image: small, so that every level is cheap
TILE, OVERLAP = 62, 1  # tiles rendered at 64²


@pytest.fixture
def served(make_tiny_model, one_torch_thread):
    """(service (not started), latent, model) for a tiny autoencoder and one random latent."""
    model = make_tiny_model()
    book = LatentBook()
    z = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    latent = book.add(z, "random", "a test latent", SIZE)
    service = TileService(model, book, TILE, OVERLAP, max_batch=8)
    yield service, latent, model
    service.close()


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_tiles_of_a_level_match_a_direct_render_at_that_levels_size(served):
    service, latent, model = served
    client = TestClient(create_app(service.start(), latent.zid))
    zoom = service.zoom(latent.zid)
    assert client.get(f"/dzi/{latent.zid}.dzi").text == zoom.xml("png")
    for level in (zoom.max_level, zoom.max_level - 2):
        whole = render(model, latent.z, zoom.level_size(level))[0]
        rows, cols = zoom.tile_counts(level)
        tiles = [(level, col, row) for row in range(rows) for col in range(cols)]
        # Before quantisation: what the service renders equals the direct render within 1e-5.
        for (_, col, row), crop in zip(tiles, render_tiles(service._field(latent.zid), zoom, tiles), strict=True):
            win = zoom.tile_window(level, col, row)
            assert (crop - whole[:, win.top : win.top + win.height, win.left : win.left + win.width]).abs().max() <= 1e-5
        # Over HTTP: 8-bit tiles that reassemble the level without seams.
        canvas = np.zeros((*zoom.level_size(level), 3), np.uint8)
        for _, col, row in tiles:
            response = client.get(f"/dzi/{latent.zid}_files/{level}/{col}_{row}.png")
            assert response.status_code == 200 and response.headers["content-type"] == "image/png"
            win = zoom.tile_window(level, col, row)
            tile = png(response.content)
            assert tile.shape == (win.height, win.width, 3)
            canvas[win.top : win.top + win.height, win.left : win.left + win.width] = tile
        difference = np.abs(canvas.astype(int) - to_uint8_hwc(whole).astype(int))
        assert difference.max() <= 1 and (difference == 0).mean() > 0.999


def test_concurrent_requests_are_batched_and_phi_is_decoded_once(served, make_tiny_model):
    service, latent, model = served
    zoom = service.zoom(latent.zid)
    level = zoom.max_level
    futures = [service.tile(latent.zid, level, col, row) for row in range(2) for col in range(4)]
    service.start()  # eight requests were waiting: one renderer call takes them all
    tiles = [f.result(timeout=60) for f in futures]
    assert service.stats.batches == 1 and service.stats.tiles_rendered == 8 and service.stats.decodes == 1
    unbatched = TileService(model, service.book, TILE, OVERLAP, max_batch=1)
    futures = [unbatched.tile(latent.zid, level, col, row) for row in range(2) for col in range(4)]
    with unbatched:
        assert [f.result(timeout=60) for f in futures] == tiles  # batching changes nothing in the tiles
    assert unbatched.stats.batches == 8 and unbatched.stats.decodes == 1


def test_repeated_tiles_come_from_the_cache_or_join_the_request_in_flight(served):
    service, latent, _ = served
    first, second = service.tile(latent.zid, 5, 0, 0), service.tile(latent.zid, 5, 0, 0)
    assert second is first and service.stats.shared == 1
    service.start()
    data = first.result(timeout=60)
    assert service.tile(latent.zid, 5, 0, 0).result() == data
    assert service.stats.cache_hits == 1 and service.stats.tiles_rendered == 1


def test_a_full_queue_answers_503_and_recovers(make_tiny_model):
    model = make_tiny_model()
    book = LatentBook()
    zid = book.add(torch.zeros(1, *model.latent_shape), "zeros", "-", SIZE).zid
    service = TileService(model, book, TILE, OVERLAP, max_queue=2)
    client = TestClient(create_app(service, zid))
    waiting = [service.tile(zid, 9, col, 0) for col in range(2)]  # the worker is not started: the queue fills
    with pytest.raises(ServiceBusy):
        service.tile(zid, 9, 2, 0)
    response = client.get(f"/dzi/{zid}_files/9/3_0.png")
    assert response.status_code == 503 and response.headers["retry-after"] == "1" and "queue is full" in response.json()["detail"]
    with service:
        assert all(len(f.result(timeout=60)) > 0 for f in waiting)
        assert client.get(f"/dzi/{zid}_files/9/3_0.png").status_code == 200


@pytest.mark.parametrize(
    "url, status",
    [
        ("/dzi/ZID_files/99/0_0.png", 404),  # level beyond the finest
        ("/dzi/ZID_files/9/7_0.png", 404),  # column beyond the level
        ("/dzi/ZID_files/9/0_5.png", 404),  # row beyond the level
        ("/dzi/ZID_files/-1/0_0.png", 404),
        ("/dzi/ZID_files/abc/0_0.png", 404),
        ("/dzi/ZID_files/9/0_0.gif", 404),
        ("/dzi/ZID_files/9/..%2F..%2Fpyproject.toml", 404),
        ("/dzi/ZID_files/9/00000000000000000000_0.png", 404),
        ("/dzi/..%2F..%2Fpyproject.toml.dzi", 404),
        ("/dzi/seed-1.dzi", 404),  # an autoencoder alone has no seeds
        ("/dzi/seed-99999999999.dzi", 404),
        ("/dzi/z-0123456789abcdef.dzi", 404),  # a well-formed id of no latent here
        ("/api/latents/%00", 404),
        ("/api/z/nope.safetensors", 404),
        ("/static/../pyproject.toml", 404),
        ("/api/view?z=ZID&size=0x5", 400),
        ("/api/view?z=ZID&size=100000x100000", 400),
        ("/api/view?z=ZID&size=1x16777216", 400),  # within the pixel cap, but thousands of tiles
        ("/api/view?z=ZID&size=lots", 400),
        ("/api/view?z=ZID&box=0,0,2,2", 400),
        ("/api/view?z=ZID&box=1,1,0,0", 400),
        ("/api/view?z=ZID&box=nan,0,1,1", 400),
        ("/api/view?z=ZID&box=a,b", 400),
        ("/api/view", 400),  # z missing
        ("/api/view?z=../../etc/passwd", 404),
    ],
)
def test_nonsense_parameters_get_4xx_with_a_message(served, url, status):
    service, latent, _ = served
    client = TestClient(create_app(service.start(), latent.zid), raise_server_exceptions=False)
    response = client.get(url.replace("ZID", latent.zid))
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "Traceback" not in detail and "/work" not in detail


def test_view_download_is_the_region_rendered_at_the_asked_size(served):
    service, latent, model = served
    client = TestClient(create_app(service.start(), latent.zid))
    response = client.get(f"/api/view?z={latent.zid}&box=-0.5,-0.25,0.25,1&size=50x30")
    assert response.status_code == 200 and "attachment" in response.headers["content-disposition"]
    expected = to_uint8_hwc(render(model, latent.z, (30, 50), box=Box(-0.5, -0.25, 0.25, 1.0)))
    assert np.array_equal(png(response.content), expected)


def test_tiles_are_served_while_a_large_view_renders(make_tiny_model, one_torch_thread):
    """A view renders one window per worker turn: a tile asked for after it is answered long before it ends."""
    model = make_tiny_model()
    book = LatentBook()
    latent = book.add(torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(2)), "random", "a test latent", SIZE)
    with TileService(model, book, TILE, OVERLAP, view_tile=32) as service:
        view = service.view(latent.zid, Box.full(), (2048, 2048))  # 4096 windows
        time.sleep(0.2)  # the worker is into the view
        tile = service.tile(latent.zid, service.zoom(latent.zid).max_level, 0, 0)
        tile.result(timeout=60)
        assert not view.done(), "the tile waited for the whole view"
        pixels = view.result(timeout=300)
    assert pixels.shape == (2048, 2048, 3)
    assert np.array_equal(pixels[:64, :96], to_uint8_hwc(render(model, latent.z, (2048, 2048), box=None, tile=32)[..., :64, :96]))


def test_seeds_draw_reproducible_samples_from_a_pipeline(make_tiny_pipeline, tmp_path, one_torch_thread):
    pipe = make_tiny_pipeline()
    book = LatentBook(pipe, (256, 256), steps=2, ckpt="PIPE")
    with TileService(pipe.autoencoder, book, TILE, OVERLAP) as service:
        client = TestClient(create_app(service, "seed-1"))
        assert client.get("/api/info").json()["can_sample"] is True
        info = client.get("/api/latents/seed-1").json()
        assert info["label"] == "seed 1" and "--seed 1 --n 1 --steps 2" in info["reproduce"] and info["max_level"] == 8
        one, two = (png(client.get(f"/dzi/seed-{s}_files/8/1_1.png").content) for s in (1, 2))
        assert not np.array_equal(one, two)
        file = tmp_path / "z.safetensors"
        file.write_bytes(client.get("/api/z/seed-1.safetensors").content)
    z, _ = load_latent(file)
    expected = pipe.sample_latents(1, 2, [torch.Generator().manual_seed(1)])  # what `infd sample --seed 1` draws
    assert torch.allclose(z, expected.float(), atol=1e-6)


# ---------------------------------------------------------------- infd serve


@pytest.fixture
def ae_folder(make_tiny_model, tmp_path):
    model = make_tiny_model()
    model.save_pretrained(tmp_path / "ae")
    save_latent(tmp_path / "z.safetensors", torch.randn(1, *model.latent_shape), {"seed": 3})
    return tmp_path / "ae", tmp_path / "z.safetensors"


def test_serve_binds_to_loopback_by_default(ae_folder, monkeypatch):
    import uvicorn

    ae, z = ae_folder
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = CliRunner().invoke(cli_app, ["serve", "--ckpt", str(ae), "--z", str(z), "--port", str(port), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    web, options = calls[0]
    assert options["host"] == "127.0.0.1" and options["port"] == port
    client = TestClient(web, base_url=f"http://127.0.0.1:{port}")
    info = client.get("/api/info").json()
    assert info["can_sample"] is False and "autoencoder only" in info["sample_message"]
    assert client.get(f"/api/latents/{info['first']}").json()["label"] == "z.safetensors (seed 3)"
    assert TestClient(web, base_url="http://rebound.example").get("/api/info").status_code == 400  # DNS rebinding


def test_bad_serve_options_fail_in_one_sentence(ae_folder, tmp_path):
    ae, z = ae_folder
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        for options, message in [
            ([], "cannot draw samples"),
            (["--z", z, "--seed", 1], "at most one"),
            (["--z", tmp_path / "missing.safetensors"], "does not exist"),
            (["--image", tmp_path / "missing.png"], "does not exist"),
            (["--z", z, "--port", 0], "--port"),
            (["--z", z, "--port", taken], "cannot listen"),
            (["--z", z, "--size", "0x0"], "positive pixels"),
            (["--z", z, "--batch", 0], "at least 1"),
            (["--z", z, "--tile-format", "bmp"], "unknown tile format"),
        ]:
            result = CliRunner().invoke(cli_app, ["serve", "--ckpt", str(ae), "--device", "cpu", *map(str, options)])
            assert result.exit_code == 1 and message in result.output, (options, result.output)


def test_a_loopback_viewer_refuses_another_host_header(served):
    """DNS rebinding: a web page whose name now points at 127.0.0.1 still sends its own name as Host."""
    from infd.viewer.app import LOOPBACK_HOSTS

    service, latent, _ = served
    web = create_app(service.start(), latent.zid, allowed_hosts=LOOPBACK_HOSTS)
    url = f"/dzi/{latent.zid}.dzi"
    assert TestClient(web, base_url="http://127.0.0.1:8000").get(url).status_code == 200
    assert TestClient(web, base_url="http://[::1]:8000").get(url).status_code == 200
    assert TestClient(web, base_url="http://evil.example:8000").get(url).status_code == 400
