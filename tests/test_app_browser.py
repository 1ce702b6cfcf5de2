"""`infd app` in a real browser (headless Debian chromium driven by playwright), over tiny models:
the page loads, Generate makes an image of the asked size, Explore renders a region, Reconstruct
takes an upload and shows PSNR, and a bad upload shows its sentence while the next request works.

Needs /usr/bin/chromium (scripts/browser.sh installs it) and gradio; skipped, saying why, without them.
"""

import os
import threading
import time

import pytest
from conftest import write_pattern_image

CHROMIUM = os.environ.get("INFD_CHROMIUM", "/usr/bin/chromium")
TIMEOUT_MS = 60_000

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} is missing: run scripts/browser.sh (apt-get install chromium) for the browser tests", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
pytest.importorskip("gradio", reason="gradio is not installed (pip install -e .)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`infd app`'s server over a tiny pipeline and a tiny autoencoder, on a loopback port, in this process."""
    import uvicorn
    from test_app import tiny_workspace
    from test_viewer_browser import free_port

    from infd.app.server import create_server, running
    from infd.viewer.app import LOOPBACK_HOSTS

    space = tiny_workspace(tmp_path_factory.mktemp("models"))
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(create_server(space, LOOPBACK_HOSTS), host="127.0.0.1", port=port, log_level="warning"))
    with running(space):
        thread = threading.Thread(target=web.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not web.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/"
        web.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto(server)
        page.wait_for_selector("#generate")
        yield page
        browser.close()


def image_size(page, selector: str) -> list[int]:
    """The natural size of the image in `selector`, once it has loaded."""
    page.wait_for_function(f"() => {{ const i = document.querySelector('{selector} img'); return i && i.complete && i.naturalWidth > 0; }}")
    return page.locator(f"{selector} img").evaluate("i => [i.naturalWidth, i.naturalHeight]")


def test_generate_makes_an_image_of_the_asked_size(page, server):
    for tab in ("Generate", "Explore", "Reconstruct", "Layout"):
        assert page.get_by_role("tab", name=tab).is_visible()
    page.get_by_label("Width").fill("96")
    page.get_by_label("Height").fill("54")
    page.click("#generate")
    assert image_size(page, "#generated") == [96, 54]
    link = page.locator("#generated-info a", has_text="open in the zoom viewer")
    assert page.request.get(server.rstrip("/") + link.get_attribute("href")).ok
    assert "--size 96x54" in page.locator("#generated-info").inner_text()
    assert page.errors == []


def test_explore_renders_a_region(page):
    page.get_by_role("tab", name="Explore").click()
    source = page.locator("#explore-source img")
    box = source.bounding_box()
    source.click(position={"x": box["width"] * 0.75, "y": box["height"] * 0.25})
    page.wait_for_function("() => document.querySelector('#explore-where').innerText.includes('Zooms around')")
    page.get_by_label("Output size (long side)").fill("40")
    page.click("#explore")
    assert image_size(page, "#from-field") == [40, 22]  # 16x into the 96x54 image, at its aspect
    assert image_size(page, "#upsampled") == [40, 22]


def test_reconstruct_shows_psnr_and_survives_a_bad_upload(page, tmp_path):
    page.get_by_role("tab", name="Reconstruct").click()
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    page.locator("#upload input[type=file]").set_input_files(str(bad))
    page.get_by_label("Scale (long side; 0: the image's own)").fill("40")
    page.click("#reconstruct")
    toast = page.get_by_text("broken.png is", exact=False).first
    toast.wait_for()
    assert "/tmp" not in toast.inner_text()  # the file's name, not where the upload was kept
    good = tmp_path / "photo.png"
    write_pattern_image(good, 30, 40)
    page.locator("#upload button[aria-label=Clear]").click()
    page.locator("#upload input[type=file]").set_input_files(str(good))
    page.click("#reconstruct")
    page.wait_for_function("() => document.querySelector('#psnr').innerText.includes('dB')")
    assert image_size(page, "#reconstruction-0") == [40, 30]
    text = page.locator("#psnr").inner_text()
    assert "thumbnail floor" in text and "input floor" in text
    assert page.errors == []


def test_layout_without_clip_says_what_to_pass(page):
    page.get_by_role("tab", name="Layout").click()
    assert "infd app --clip PATH" in page.locator("#clip-note").inner_text()
    page.click("#layout")
    page.get_by_text("Layout needs CLIP weights", exact=False).last.wait_for()
    assert page.errors == []
