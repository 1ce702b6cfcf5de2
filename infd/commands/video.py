"""`infd zoom-video`: a continuous zoom from the whole image into a box, every frame rendered from the field."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from infd.commands.common import PRECISION_HELP, SIZE_HELP, report, reports_errors
from infd.errors import InfdError


@reports_errors
def zoom_video(
    ckpt: Path = typer.Option(..., "--ckpt", help="Autoencoder: run, checkpoint or pipeline folder (for --z, the one the latent came from)."),
    out: Path = typer.Option(..., "--out", help="Output video: .mp4 (H.264), .gif or .webp (short clips); replaces a file of that name."),
    box: str = typer.Option(..., "--box", help="Where the zoom ends: y0,x0,y1,x1 inside the image [-1, 1] (e.g. --box=-0.1,0.2,0.05,0.4); it grows to the video's shape around its centre."),
    z: Path | None = typer.Option(None, "--z", help="Zoom into this latent (a .z.safetensors from `infd sample`)."),
    image: Path | None = typer.Option(None, "--image", help="Zoom into this image, encoded by the autoencoder."),
    size: str = typer.Option("1024", help=SIZE_HELP + " Default: 1024 on the long side. MP4 sides are even (a derived short side is rounded down)."),
    frames: int = typer.Option(120, help="Frames, from the whole image to the box (both included)."),
    fps: float = typer.Option(30, help="Frames per second."),
    tile: int = typer.Option(512, help="Render tile size in pixels (the output is identical for every tile size)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    bf16: bool | None = typer.Option(None, "--bf16/--fp32", help=PRECISION_HELP),
    progress: bool = typer.Option(True, help="Show a progress bar (with ETA)."),
):
    """Render a zoom video from the whole image into --box at constant zoom speed; every frame is rendered from the field at the video's size."""
    from infd import geometry, images, rendering, store
    from infd.files import check_output_path
    from infd.latents import load_latent, load_latent_for
    from infd.viewer import video

    if (z is None) == (image is None):
        raise InfdError("pass exactly one of --z (a latent from `infd sample`) and --image (an image to encode).")
    check_output_path(out)
    region = geometry.Box.parse(box)
    suffix = video.check_video_options(out, region, frames, fps)
    geometry.check_tile(tile)
    if z is not None:
        saved, metadata = load_latent(z)
        aspect = geometry.latent_aspect(metadata, saved.shape[-2:])
    else:
        height, width = images.image_size(image)
        aspect = width / height
    frame_size = video.video_size(geometry.parse_size_request(size), aspect, suffix)
    video.check_animation_memory(suffix, frames, frame_size)
    model = store.load_autoencoder(ckpt, rendering.pick_device(device))
    latent = load_latent_for(model, z)[0] if z is not None else rendering.encode(model, image)
    dtype = rendering.render_dtype(next(model.parameters()).device, bf16)
    start = time.perf_counter()
    boxes = video.zoom_path(geometry.Box.full(), region, frames, aspect, frame_size)
    video.write_zoom_video(rendering.LatentField(model, latent, dtype=dtype), boxes, frame_size, out, fps, tile, progress)
    h, w = frame_size
    zoom = boxes[0].height / boxes[-1].height
    report("wrote", f"{out} ({w}x{h}, {frames} frames at {fps:g} fps, {zoom:.1f}x zoom, {time.perf_counter() - start:.1f} s)")
