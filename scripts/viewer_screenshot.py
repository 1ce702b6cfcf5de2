"""A screenshot of the viewer for the docs: `infd serve` in a child process, photographed by headless chromium.

    python scripts/viewer_screenshot.py docs/images/viewer.png --ckpt weights/wallpapers --seed 106
    python scripts/viewer_screenshot.py docs/images/viewer.png --ckpt weights/demo-ae --image assets/sample.jpg --zoom 2

Needs playwright and chromium (scripts/browser.sh installs it; INFD_CHROMIUM names another).
"""

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

LOADED = "() => { const i = window.infdViewer && window.infdViewer.world.getItemAt(0); return i && i.getFullyLoaded(); }"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--ckpt", default="weights/demo-ae", help="what `infd serve` serves (an autoencoder or a pipeline)")
    parser.add_argument("--image", help="the image to show (encoded by --ckpt)")
    parser.add_argument("--seed", help="with a pipeline --ckpt: the sample to show")
    parser.add_argument("--zoom", type=float, default=1.0, help="zoom factor from the whole image")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = ["--image", args.image] * bool(args.image) + ["--seed", args.seed] * bool(args.seed)
    server = subprocess.Popen([sys.executable, "-c", "from infd.cli import main; main()", "serve", "--ckpt", args.ckpt, "--port", str(port), "--device", args.device, *options])
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while server.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(url + "api/info", timeout=2).raise_for_status()
                break
            time.sleep(0.3)
        else:
            raise SystemExit("infd serve exited (its message is above) or did not answer within 3 minutes.")
        with sync_playwright() as playwright:
            page = playwright.chromium.launch(executable_path=os.environ.get("INFD_CHROMIUM", "/usr/bin/chromium"), headless=True).new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(300_000)
            page.goto(url)
            page.wait_for_function(LOADED)
            if args.zoom != 1:
                page.evaluate(f"window.infdViewer.viewport.zoomBy({args.zoom}, undefined, true)")
                page.wait_for_timeout(500)
                page.wait_for_function(LOADED)
            page.wait_for_timeout(500)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
    finally:
        server.kill()
        server.wait()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
