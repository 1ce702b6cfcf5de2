"""The `infd` command line (typer + rich).

Every command reports a user error as one sentence on stderr and exits with status 1;
outputs are written to a temporary name and renamed, so a failed command leaves nothing.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from infd.errors import InfdError

app = typer.Typer(
    name="infd",
    help="Image neural field diffusion: train autoencoders whose latents render at any resolution, region and aspect ratio.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

SIZE_HELP = "Output size as WIDTHxHEIGHT (e.g. 2048x1536) or one number for a square."
BOX_HELP = "Region to render as y0,x0,y1,x1 in [-1, 1] image units (top-left to bottom-right); default: the whole image."


def reports_errors(command):
    """Turn InfdError (and Ctrl-C) into one line on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InfdError as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]; nothing was left half-written.")
            raise typer.Exit(130) from None

    return wrapper


@app.command("train-ae")
@reports_errors
def train_ae(
    data: Path = typer.Option(..., "--data", help="Folder of training images (any sizes, aspect ratios and formats)."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoints/, samples/, log.jsonl, train_config.json."),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON training config (see configs/); options below override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where its last checkpoint left off."),
    steps: Optional[int] = typer.Option(None, help="Total optimisation steps."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step per process."),
    lr: Optional[float] = typer.Option(None, help="Learning rate of the autoencoder."),
    init: Optional[str] = typer.Option(None, help="Start from the weights of this checkpoint (e.g. from `infd convert-vae`)."),
    lpips_vgg: Optional[str] = typer.Option(None, help="Local VGG16 weights (.pth/.safetensors) to train with LPIPS instead of focal frequency loss."),
    holdout: bool = typer.Option(False, help="Leave out infd.data.WALLPAPER_HOLDOUT, the evaluation split of the wallpapers set."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Train a neural-field autoencoder on mixed-resolution images (runs under `accelerate launch` too)."""
    from infd.data import WALLPAPER_HOLDOUT
    from infd.train_ae import AETrainConfig, train_autoencoder

    cfg = AETrainConfig.load(config) if config else AETrainConfig()
    overrides = {"steps": steps, "batch_size": batch_size, "lr": lr, "init": init, "lpips_vgg": lpips_vgg}
    for name, value in overrides.items():
        if value is not None:
            setattr(cfg, name, value)
    last = train_autoencoder(cfg, data, out, resume=resume, exclude=WALLPAPER_HOLDOUT if holdout else (), progress=progress)
    console.print(f"[green]done:[/] last checkpoint {last}")


@app.command()
@reports_errors
def reconstruct(
    image: Path = typer.Argument(..., help="Image to encode (jpg/png/webp/tiff; any size)."),
    ckpt: Path = typer.Option(..., "--ckpt", help="Autoencoder: run folder, checkpoint folder or pipeline folder."),
    out: Path = typer.Option(..., "--out", help="Output image (.png, .jpg, .webp or .tif)."),
    size: Optional[str] = typer.Option(None, help=SIZE_HELP + " Default: the input's size."),
    box: Optional[str] = typer.Option(None, help=BOX_HELP),
    tile: int = typer.Option(512, help="Render tile size in pixels (the output is identical for every tile size)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    bf16: bool = typer.Option(False, help="Render in bfloat16 (faster on recent CPUs and GPUs)."),
):
    """Encode IMAGE and render it back at any size, region and aspect ratio."""
    import numpy as np
    import torch

    from infd import geometry, images, rendering

    out_size = geometry.parse_size(size) if size else None
    region = geometry.Box.parse(box) if box else None
    if out.suffix.lower() not in tuple(images.SAVE_FORMATS):
        raise InfdError(f"output '{out}' must end in one of {', '.join(tuple(images.SAVE_FORMATS))}.")
    picture = images.load_image(image)
    out_size = out_size or tuple(picture.shape[-2:])
    height, width = out_size
    if height * width > rendering.MAX_RENDER_PIXELS:
        raise InfdError(f"{width}x{height} is larger than the {rendering.MAX_RENDER_PIXELS} pixels one output image may have; render a --box of it or a smaller --size.")
    model = rendering.load_autoencoder(ckpt, rendering.pick_device(device))
    start = time.perf_counter()
    z = rendering.encode(model, picture[None])
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    rendering.render(model, z, out_size, box=region, tile=tile, sink=rendering.ArraySink(canvas), dtype=torch.bfloat16 if bf16 else None, progress=True)
    images.save_image(canvas, out)
    console.print(f"[green]wrote[/] {out} ({width}x{height}, {time.perf_counter() - start:.1f} s)")


@app.command()
@reports_errors
def info(run: Path = typer.Argument(..., help="Run folder, checkpoint folder or pipeline folder.")):
    """Describe a checkpoint: model shapes, renderer, parameters and training progress."""
    from infd import rendering

    folder = rendering.find_checkpoint(run)
    model = rendering.load_autoencoder(folder)
    table = Table(title=f"infd autoencoder: {folder}", show_header=False)
    table.add_row("latent z", "x".join(map(str, model.latent_shape)) + f" ({model.config.latent_type})")
    table.add_row("feature map phi", "x".join(map(str, model.feature_shape)))
    table.add_row("renderer", f"{model.config.renderer_type}, hidden {model.config.renderer_hidden}, halo {model.halo} px")
    table.add_row("encoder input", f"{model.config.input_size}x{model.config.input_size}")
    table.add_row("parameters", f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    state_file = folder / "training_state.json"
    if state_file.is_file():
        step = json.loads(state_file.read_text()).get("__dict__", {}).get("step")
        table.add_row("training step", str(step))
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    table.add_row("files", f"{', '.join(sorted(f.name for f in folder.iterdir()))} ({size / 2**20:.1f} MiB)")
    Console().print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
