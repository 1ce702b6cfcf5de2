"""The FastAPI app of `infd serve`: a Deep Zoom tile source rendered from z on request.

    GET /                                       the viewer page (OpenSeadragon)
    GET /api/info                               server settings and the latent shown first
    GET /api/latents/{zid}                      what the page shows about a latent (label, size, how to reproduce)
    GET /api/stats                              counters of the tile service
    GET /dzi/{zid}.dzi                          Deep Zoom descriptor of a latent's virtual image
    GET /dzi/{zid}_files/{level}/{col}_{row}.png   one tile, at any level (finer than any training image)
    GET /api/view?z=ZID&box=y0,x0,y1,x1&size=WxH   a region rendered at W x H, as a PNG download
    GET /api/z/{zid}.safetensors                the latent itself, for `infd render`

Every parameter is parsed and checked here: nonsense gets 400 (malformed) or 404 (no
such latent or tile) with a one-sentence message, a full queue 503; ids are never paths.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from infd import geometry
from infd.errors import InfdError
from infd.geometry import Box
from infd.viewer.deepzoom import TILE_FORMATS, encode_tile
from infd.viewer.service import NotFound, ServiceBusy, TileService

STATIC_DIR = Path(__file__).resolve().parent / "static"
TILE_NAME = re.compile(r"(\d{1,9})_(\d{1,9})\.([a-z]{3,4})")
LEVEL = re.compile(r"\d{1,3}")
MAX_VIEW_PIXELS = 4096 * 4096
MAX_VIEW_SIDE = 8192  # with the pixel cap, bounds the tiles (and so the time) one view may cost
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg"}


# Host headers a loopback server answers: a web page that rebinds its own name to 127.0.0.1 sends another one.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


def create_app(
    service: TileService, first: str, max_view_pixels: int = MAX_VIEW_PIXELS, device: str = "cpu", allowed_hosts: tuple[str, ...] | None = None
) -> FastAPI:
    """The app over a started TileService; `first` is the latent id the page opens with.

    `allowed_hosts` (e.g. LOOPBACK_HOSTS) refuses requests naming another Host (DNS rebinding); None answers any.
    """
    app = FastAPI(title="infd viewer", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    book = service.book
    book.check(first)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in error.errors())
        return JSONResponse({"detail": f"bad request ({problems})."}, status_code=400)

    @app.exception_handler(InfdError)
    async def render_failed(request: Request, error: InfdError) -> JSONResponse:
        """A tile or view that cannot be rendered (e.g. NaN pixels): its one sentence, not a bare 500."""
        return JSONResponse({"detail": str(error)}, status_code=500)

    async def wait(future):
        return await asyncio.wrap_future(future)

    def check_latent(zid: str) -> str:
        try:
            return book.check(zid)
        except NotFound as error:
            raise HTTPException(404, str(error)) from None

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/info")
    async def info() -> dict:
        return {
            "first": first,
            "can_sample": book.can_sample,
            "sample_message": None if book.can_sample else "This server has an autoencoder only: start `infd serve` with an INFDPipeline (--ckpt PIPELINE) to draw new samples.",
            "tile_size": service.tile_size,
            "overlap": service.overlap,
            "tile_format": service.tile_format,
            "max_view_pixels": max_view_pixels,
            "max_seed": 2**32 - 1,
            "device": device,
            "feature_size": list(service.model.feature_shape[1:]),
        }

    @app.get("/api/stats")
    async def stats() -> dict:
        return service.stats.as_dict()

    @app.get("/api/latents/{zid}")
    async def latent(zid: str) -> dict:
        check_latent(zid)
        h, w = book.size_of(zid)
        return {**book.describe(zid), "width": w, "height": h, "max_level": service.zoom(zid).max_level}

    @app.get("/dzi/{zid}.dzi")
    async def descriptor(zid: str) -> Response:
        check_latent(zid)
        return Response(service.zoom(zid).xml(service.tile_format), media_type="application/xml")

    @app.get("/dzi/{zid}_files/{level}/{name}")
    async def tile(zid: str, level: str, name: str) -> Response:
        check_latent(zid)
        match = TILE_NAME.fullmatch(name)
        if not LEVEL.fullmatch(level) or match is None:
            raise HTTPException(404, "tiles are named /dzi/<id>_files/<level>/<col>_<row>.<format> with whole numbers.")
        col, row, suffix = int(match[1]), int(match[2]), match[3]
        if TILE_FORMATS.get(suffix) != TILE_FORMATS[service.tile_format]:
            raise HTTPException(404, f"this server's tiles are .{service.tile_format}, not .{suffix}.")
        try:
            data = await wait(service.tile(zid, int(level), col, row))
        except NotFound as error:
            raise HTTPException(404, str(error)) from None
        except ServiceBusy as error:
            raise HTTPException(503, str(error), headers={"Retry-After": "1"}) from None
        media = MEDIA_TYPES[TILE_FORMATS[service.tile_format]]
        return Response(data, media_type=media, headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/api/view")
    async def view(z: str, box: str = "-1,-1,1,1", size: str = "1024") -> Response:
        check_latent(z)
        try:
            region = geometry.check_inside_image(Box.parse(box), "the view's box")
            height, width = geometry.parse_size(size)
        except InfdError as error:
            raise HTTPException(400, str(error)) from None
        if height * width > max_view_pixels:
            raise HTTPException(400, f"{width}x{height} is more than the {max_view_pixels} pixels a view may have here; use `infd render --box` for larger ones.")
        if max(height, width) > MAX_VIEW_SIDE:
            raise HTTPException(400, f"{width}x{height} has a side longer than the {MAX_VIEW_SIDE} pixels a view may have; use `infd render --box` for it.")
        try:
            pixels = await wait(service.view(z, region, (height, width)))
        except ServiceBusy as error:
            raise HTTPException(503, str(error), headers={"Retry-After": "1"}) from None
        data = await asyncio.to_thread(encode_tile, pixels, "png")
        filename = f"infd-{z}-{width}x{height}.png"
        return Response(data, media_type="image/png", headers={"Content-Disposition": f'attachment; filename="{filename}"'})

    @app.get("/api/z/{zid}.safetensors")
    async def latent_file(zid: str) -> Response:
        from infd.latents import LATENT_SPACE_KEY, latent_space_fingerprint, save_latent

        check_latent(zid)
        try:
            latent = await wait(service.latent(zid))
        except ServiceBusy as error:
            raise HTTPException(503, str(error), headers={"Retry-After": "1"}) from None
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "z.safetensors"
            metadata = {"zid": zid, "label": latent.label, "reproduce": latent.reproduce, LATENT_SPACE_KEY: latent_space_fingerprint(service.model)}
            save_latent(path, latent.z, metadata)
            data = path.read_bytes()
        headers = {"Content-Disposition": f'attachment; filename="{zid}.z.safetensors"'}
        return Response(data, media_type="application/octet-stream", headers=headers)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
