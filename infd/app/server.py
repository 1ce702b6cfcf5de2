"""One FastAPI server for `infd app`: the Gradio page at /, each model's zoom viewer at /viewer/N/.

One process, one port. A loopback server answers only requests addressed to loopback
(the Host header is checked for every path, the viewers' and the page's alike), exactly
as `infd serve` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware

from infd.app.workspace import Workspace

MAX_QUEUE = 16  # requests waiting for their turn; beyond it the page says the server is busy


def create_server(space: Workspace, allowed_hosts: tuple[str, ...] | None, clip: str | None = None, clip_arch: str | None = None) -> FastAPI:
    """The app: every model's viewer mounted at its `Slot.mount`, the page at /. `allowed_hosts` None answers any Host."""
    import gradio as gr

    from infd.app.ui import build_ui
    from infd.viewer.app import create_app

    server = FastAPI(title="infd app", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts is not None:
        server.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    for slot in space.slots.values():
        device = str(next(slot.autoencoder.parameters()).device)
        server.mount(slot.mount.rstrip("/"), create_app(slot.service, slot.first, space.max_view, device))
    page = build_ui(space, clip, clip_arch).queue(max_size=MAX_QUEUE, default_concurrency_limit=1)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts: nothing is fetched
    return gr.mount_gradio_app(server, page, path="", allowed_paths=[str(space.folder)], theme=theme, footer_links=[], ssr_mode=False)


@contextmanager
def running(space: Workspace) -> Iterator[Workspace]:
    """Start every model's tile service for the server's lifetime."""
    with ExitStack() as stack:
        for slot in space.slots.values():
            stack.enter_context(slot.service)
        yield space
