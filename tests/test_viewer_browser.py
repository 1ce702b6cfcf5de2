"""The viewer in a real browser (headless Debian chromium driven by playwright): the page loads
and draws tiles, zooming asks for deeper tiles, and "New sample" shows another image.

Needs /usr/bin/chromium (scripts/browser.sh installs it); skipped, with the reason, without it.
"""

import io
import re

import numpy as np
import pytest
from browser import browser_page, require_chromium, serving
from PIL import Image

TILE_URL = re.compile(r"/dzi/(seed-\d+|z-[0-9a-f]{16})_files/(\d+)/(\d+)_(\d+)\.png$")
TIMEOUT_MS = 30_000

require_chromium()


@pytest.fixture(scope="module")
def server():
    """`infd serve`'s app over a tiny random pipeline, on a loopback port, in this process."""
    import torch
    from conftest import TINY_MODEL, TINY_UNET
    from diffusers import UNet2DModel

    from infd.diffusion import make_training_scheduler
    from infd.diffusion.pipeline import INFDPipeline
    from infd.models import NeuralFieldAutoencoder
    from infd.viewer.app import create_app
    from infd.viewer.service import LatentBook, TileService

    torch.manual_seed(0)
    autoencoder = NeuralFieldAutoencoder(**{**TINY_MODEL, "renderer_hidden": 4, "renderer_blocks": 0}).eval()  # cheap tiles
    c, h, _ = autoencoder.latent_shape
    unet = UNet2DModel(sample_size=h, in_channels=c, out_channels=c, **TINY_UNET).eval()
    pipe = INFDPipeline(autoencoder, unet, make_training_scheduler())
    pipe.set_progress_bar_config(disable=True)
    book = LatentBook(pipe, (4096, 4096), steps=2, ckpt="PIPE")
    service = TileService(autoencoder, book, tile_size=126).start()
    with serving(create_app(service, "seed-0")) as url:
        yield url
    service.close()


@pytest.fixture(scope="module")
def page(server):
    def watch(page):
        page.tiles = []  # (zid, level, status) of every tile the page asked for

        def on_response(response):
            match = TILE_URL.search(response.url)
            if match:
                page.tiles.append((match[1], int(match[2]), response.status))

        page.on("response", on_response)

    with browser_page(server, (800, 600), TIMEOUT_MS, watch) as page:
        yield page


def wait_until_drawn(page) -> None:
    page.wait_for_function("() => { const item = window.infdViewer && window.infdViewer.world.getItemAt(0); return item && item.getFullyLoaded(); }")
    page.wait_for_timeout(300)  # the drawer paints on the next animation frame


def viewer_pixels(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator("#viewer").screenshot())).convert("RGB")).astype(float)


def test_the_page_loads_and_draws_tiles(page):
    wait_until_drawn(page)
    assert page.locator("body").get_attribute("data-zid") == "seed-0"
    assert page.locator("#latent-label").inner_text().startswith("seed 0")
    assert "--seed 0" in page.locator("#reproduce").inner_text()
    assert "zoom ×" in page.locator("#zoom-info").inner_text()
    assert page.tiles and all(status == 200 for _, _, status in page.tiles)
    pixels = viewer_pixels(page)
    assert pixels.std() > 2, "the viewer shows a uniform picture: no tiles were drawn"
    assert page.errors == []


def test_zooming_in_asks_for_deeper_tiles(page):
    wait_until_drawn(page)
    deepest = max(level for _, level, _ in page.tiles)
    box = page.locator("#viewer").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.6)
    for _ in range(12):  # each wheel step zooms by 1.2x
        page.mouse.wheel(0, -200)
        page.wait_for_timeout(100)
    page.wait_for_function("() => window.infdViewer.viewport.getZoom() > 4 * window.infdViewer.viewport.getHomeZoom()")
    wait_until_drawn(page)
    assert max(level for _, level, _ in page.tiles) >= deepest + 2
    assert "view=" in page.url  # the link now holds this view


def test_new_sample_shows_another_image(page):
    page.locator("#home").click()
    wait_until_drawn(page)
    before = viewer_pixels(page)
    page.locator("#new-sample").click()
    page.wait_for_function("() => document.body.dataset.zid !== 'seed-0'")
    zid = page.locator("body").get_attribute("data-zid")
    wait_until_drawn(page)
    assert any(tile_zid == zid for tile_zid, _, _ in page.tiles)
    assert f"z={zid}" in page.url
    after = viewer_pixels(page)
    assert np.abs(after - before).mean() > 1, "the image did not change"
    assert page.errors == []
