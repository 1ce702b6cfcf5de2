"""`infd app`: the web app (Generate, Explore, Reconstruct, Layout) and every model's zoom viewer on one server."""

from __future__ import annotations

from pathlib import Path

import typer

from infd.commands.common import report, reports_errors
from infd.errors import InfdError


@reports_errors
def app_command(
    model: list[Path] | None = typer.Option(
        None,
        "--model",
        help=(
            "A pipeline folder or LDM run (generates), or an autoencoder (reconstructs; e.g. an `infd convert-vae` output). "
            "Repeat for a model picker. Default: the shipped weights/wallpapers."
        ),
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; the default serves this machine only."),
    port: int = typer.Option(7860, help="TCP port."),
    clip: Path | None = typer.Option(None, "--clip", help="Local CLIP for the Layout tab: transformers folder, open_clip folder or checkpoint file (nothing is downloaded)."),
    clip_arch: str | None = typer.Option(None, "--clip-arch", help="open_clip architecture of a --clip checkpoint file, e.g. ViT-B-32."),
    device: str = typer.Option("auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N."),
    bf16: bool | None = typer.Option(None, "--bf16/--fp32", help="Render in bfloat16 where it is fast, or float32 (default)."),
):
    """Serve a web app for infd: generate at any size, zoom up to 64x with real detail, zoom videos, reconstruct any image, layouts."""
    import uvicorn

    from infd.app.server import create_server, running
    from infd.app.workspace import DEFAULT_MODEL, Workspace
    from infd.commands.viewer import _check_free, _is_loopback
    from infd.viewer.app import LOOPBACK_HOSTS

    if not 0 < port < 65536:
        raise InfdError(f"--port must be from 1 to 65535, got {port}.")
    if not model and not DEFAULT_MODEL.is_dir():
        raise InfdError(f"the shipped model is not at {DEFAULT_MODEL}; pass --model PATH (a pipeline folder).")
    _check_free(host, port)
    space = Workspace(model or [DEFAULT_MODEL], device, bf16)
    named = f"[{host}]" if ":" in host else host
    web = create_server(space, (*LOOPBACK_HOSTS, named) if _is_loopback(host) else None, str(clip) if clip else None, clip_arch)
    if not _is_loopback(host):
        report("warning:", f"listening on {host}: anyone who can reach this machine can use the app.", "yellow")
    report("infd app", f"at http://{named}:{port}/ with {', '.join(space.slots)} (Ctrl-C stops it)")
    with running(space):
        uvicorn.run(web, host=host, port=port, log_level="warning")
