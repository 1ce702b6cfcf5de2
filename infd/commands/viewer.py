"""`infd serve`: the infinite-zoom web viewer (gigapixel exports are `infd render --out big.tif`)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer

from infd.commands.common import report, reports_errors
from infd.errors import InfdError, quote_error


@reports_errors
def serve(
    ckpt: Path = typer.Option(..., "--ckpt", help="An INFDPipeline (LDM run or pipeline folder: new samples by seed) or an autoencoder (then pass --z or --image)."),
    z: Path | None = typer.Option(None, "--z", help="Show this latent (a .z.safetensors from `infd sample`)."),
    image: Path | None = typer.Option(None, "--image", help="Show this image, encoded by the autoencoder."),
    seed: int | None = typer.Option(None, "--seed", help="Show the pipeline's sample from this seed first (default 0)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; the default serves this machine only."),
    port: int = typer.Option(8000, help="TCP port."),
    size: str | None = typer.Option(None, help="Virtual image size WIDTHxHEIGHT (default 65536 on the long side, at the image's aspect for --image)."),
    tile_size: int = typer.Option(254, help="Deep Zoom tile size (tiles are rendered at tile size + 2 overlap)."),
    overlap: int = typer.Option(1, help="Deep Zoom tile overlap in pixels."),
    tile_format: str = typer.Option("png", "--tile-format", help="png (exact) or jpg (smaller)."),
    steps: int | None = typer.Option(None, help="Sampling steps for new samples. Default: the pipeline's own (50; 200 for the paper's converted models)."),
    sampler: str = typer.Option("ddim", help="ddim, dpm++ or ddpm."),
    batch: int | None = typer.Option(None, help="Most tiles rendered in one renderer call; default 32 on a GPU, 1 (no batching, measured faster) on CPU."),
    queue: int = typer.Option(256, help="Most requests waiting; beyond it the server answers 503."),
    cache_mib: int = typer.Option(256, help="Memory for the LRU cache of encoded tiles, in MiB."),
    max_view: str = typer.Option("4096x4096", help="Largest 'download this view' size (its pixel count is the cap)."),
    device: str = typer.Option("auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N."),
    bf16: bool = typer.Option(False, help="Sample and render in bfloat16 (autocast)."),
):
    """Serve an infinite-zoom viewer of a latent's neural field: tiles rendered on request at any depth."""
    import torch
    import uvicorn

    from infd import geometry
    from infd.viewer.app import LOOPBACK_HOSTS, create_app
    from infd.viewer.service import TileService, open_latents

    if not 0 < port < 65536:
        raise InfdError(f"--port must be from 1 to 65535, got {port}.")
    if cache_mib < 0:
        raise InfdError(f"--cache-mib must be 0 (no cache) or more, got {cache_mib}.")
    _check_free(host, port)
    virtual = geometry.parse_size(size) if size else None
    view_h, view_w = geometry.parse_size(max_view)
    dtype = torch.bfloat16 if bf16 else None
    model, book, first = open_latents(ckpt, device, z, image, seed, virtual, steps, sampler, dtype)
    on = next(model.parameters()).device
    batch = batch if batch is not None else (32 if on.type == "cuda" else 1)
    service = TileService(
        model, book, tile_size, overlap, tile_format, max_batch=batch, max_queue=queue, cache_bytes=cache_mib * 2**20, dtype=dtype
    )
    named = f"[{host}]" if ":" in host else host
    web = create_app(service, first, view_h * view_w, str(on), (*LOOPBACK_HOSTS, named) if _is_loopback(host) else None)
    if not _is_loopback(host):
        report("warning:", f"listening on {host}: anyone who can reach this machine can use the viewer.", "yellow")
    shown = f"[{host}]" if ":" in host else host
    report("infd viewer", f"at http://{shown}:{port}/ showing {first} (Ctrl-C stops it)")
    with service:
        uvicorn.run(web, host=host, port=port, log_level="warning")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_free(host: str, port: int) -> None:
    """Fail early, in one sentence, when the address cannot be listened on (uvicorn would exit with a log line)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise InfdError(f"--host '{host}' is not an address of this machine; use e.g. 127.0.0.1.") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise InfdError(f"cannot listen on {host}:{port} ({quote_error(error)}); pick another --port or --host.") from None
