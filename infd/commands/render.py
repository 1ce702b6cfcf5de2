"""`infd reconstruct`, `infd sample`, `infd render` and `infd info`: images out of latents."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from infd.commands.common import BOX_HELP, PRECISION_HELP, RENDERER_HELP, SIZE_HELP, UPSAMPLE_HELP, check_image_suffix, check_output_pixels, report, reports_errors
from infd.errors import InfdError, check_choice


@reports_errors
def reconstruct(
    image: Path = typer.Argument(..., help="Image to encode (jpg/png/webp/tiff; any size)."),
    ckpt: Path = typer.Option(..., "--ckpt", help="Autoencoder: run folder, checkpoint folder or pipeline folder."),
    out: Path = typer.Option(..., "--out", help="Output image (.png, .jpg, .webp or .tif)."),
    size: str | None = typer.Option(None, help=SIZE_HELP + " Default: the input's long side (the input's own size for the whole image)."),
    box: str | None = typer.Option(None, help=BOX_HELP),
    tile: int = typer.Option(512, help="Render tile size in pixels (the output is identical for every tile size)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    bf16: bool | None = typer.Option(None, "--bf16/--fp32", help=PRECISION_HELP),
):
    """Encode IMAGE and render it back at any size, region and aspect ratio."""
    import numpy as np

    from infd import geometry, images, rendering, store
    from infd.files import check_output_path

    check_output_path(out)
    request = geometry.parse_size_request(size) if size else None
    region = geometry.Box.parse(box) if box else None
    check_image_suffix(out)
    image_height, image_width = images.image_size(image)
    [out_size] = _fit_output_sizes([request or max(image_height, image_width)], image_width / image_height, region)
    height, width = out_size
    model = store.load_autoencoder(ckpt, rendering.pick_device(device))
    start = time.perf_counter()
    z = rendering.encode(model, image)  # decoded only as large as the encoder needs
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    dtype = rendering.render_dtype(next(model.parameters()).device, bf16)
    rendering.render(model, z, out_size, box=region, tile=tile, sink=rendering.ArraySink(canvas), dtype=dtype, progress=True)
    images.save_image(canvas, out)
    report("wrote", f"{out} ({width}x{height}, {time.perf_counter() - start:.1f} s)")


def _render_options(sizes: list[str], box: str | None, renderer: str | None, upsample: str):
    """Parse and check the options `sample` and `render` share, before any work: (size requests, box)."""
    from infd import geometry
    from infd.diffusion.pipeline import check_upsample
    from infd.models.renderers import RENDERERS

    requests = [geometry.parse_size_request(text) for text in sizes]
    if renderer is not None:
        check_choice(renderer, RENDERERS, "renderer")
    check_upsample(renderer, upsample)
    return requests, geometry.Box.parse(box) if box else None


def _fit_output_sizes(requests: list, aspect: float, region, streamed: bool = False) -> list[tuple[int, int]]:
    """The (height, width) of each --size request for `region` of content of `aspect`, refused when too large (in memory or `streamed`)."""
    from infd import geometry
    from infd.viewer.deepzoom import check_export_size

    sizes = [geometry.fit_size(request, aspect, region) for request in requests]
    for height, width in sizes:
        if streamed:
            check_export_size((height, width))
        else:
            check_output_pixels(height, width)
    return sizes


@reports_errors
def sample(
    ckpt: Path = typer.Option(..., "--ckpt", help="LDM: run folder from `infd train-ldm`, one of its checkpoints, or a pipeline folder."),
    out: Path = typer.Option(..., "--out", help="Output folder: sample_NNNN.png (one per --size) and sample_NNNN.z.safetensors."),
    n: int = typer.Option(4, "--n", help="Number of samples."),
    size: list[str] | None = typer.Option(None, "--size", help=SIZE_HELP + " Repeat to render every sample at several sizes. Default: the encoder's input size."),
    sampler: str = typer.Option("ddim", help="ddim, dpm++ or ddpm."),
    steps: int | None = typer.Option(None, help="Sampling steps. Default: the pipeline's own (50; 200 for the paper's converted models)."),
    eta: float | None = typer.Option(None, help="DDIM stochasticity (0: deterministic). Default: the pipeline's own (0; 1 for the paper's converted models)."),
    seed: int = typer.Option(0, help="Sample i starts from the noise of seed + i: the same seed gives the same images (--batch-size changes only float rounding)."),
    batch_size: int = typer.Option(4, help="Samples denoised together."),
    box: str | None = typer.Option(None, help=BOX_HELP),
    renderer: str | None = typer.Option(None, help=RENDERER_HELP),
    upsample: str = typer.Option("bicubic", help=UPSAMPLE_HELP),
    tile: int = typer.Option(512, help="Render tile size in pixels (the output is identical for every tile size)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    bf16: bool | None = typer.Option(None, "--bf16/--fp32", help="--bf16: sample and render in bfloat16 (autocast); --fp32: both in float32. Default: sample and render in float32."),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """Sample images from a latent diffusion model at any sizes; each sample's z is saved to render again later.

    Under `accelerate launch` each process samples its share (sample i on process i mod N)
    on its own device; the files are the same as one process would write.
    """
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from infd import images, rendering
    from infd.diffusion import SAMPLERS, check_sampling, check_seed
    from infd.diffusion.pipeline import load_pipeline, render_to_array
    from infd.files import check_output_path
    from infd.latents import LATENT_SPACE_KEY, latent_space_fingerprint, save_latent
    from infd.store import find_pipeline

    check_output_path(out, folder=True)
    if n <= 0 or batch_size <= 0:
        raise InfdError(f"--n and --batch-size must be positive, got {n} and {batch_size}.")
    check_seed(seed, n)
    check_choice(sampler, SAMPLERS, "sampler")
    requests, region = _render_options(size or [], box, renderer, upsample)
    if steps is not None and steps <= 0:
        raise InfdError(f"--steps must be at least 1, got {steps}.")
    folder = find_pipeline(ckpt)
    state = PartialState(cpu=device == "cpu")
    if state.num_processes > 1:
        device = state.device  # one device per process
    pipe = load_pipeline(folder, device).use_sampler(sampler)
    steps = pipe.default_steps if steps is None else steps
    eta = pipe.default_eta if eta is None else eta
    check_sampling(pipe.scheduler, steps, eta)
    pipe.autoencoder.get_renderer(renderer)
    _, latent_height, latent_width = pipe.autoencoder.latent_shape
    sizes = _fit_output_sizes(requests or [pipe.autoencoder.config.input_size], latent_width / latent_height, region)
    pipe.set_progress_bar_config(desc="sampling", disable=not (progress and state.is_main_process), leave=False)
    dtype = torch.bfloat16 if bf16 else None  # the UNet's precision
    render_dtype = rendering.render_dtype(next(pipe.autoencoder.parameters()).device, bf16)
    latent_space = latent_space_fingerprint(pipe.autoencoder)
    metadata = {"ckpt": str(folder), "sampler": sampler, "steps": steps, "eta": eta, "scaling_factor": pipe.scaling_factor, LATENT_SPACE_KEY: latent_space}
    start = time.perf_counter()
    mine = range(state.process_index, n, state.num_processes)
    if state.num_processes > 1:
        report(f"process {state.process_index} of {state.num_processes}:", f"samples {', '.join(map(str, mine)) or 'none'} on {device}", "")
    bar = tqdm(total=len(mine) * len(sizes), desc="render", unit="image", disable=not (progress and state.is_main_process))
    for first in range(0, len(mine), batch_size):
        indices = mine[first : first + batch_size]
        generators = [torch.Generator().manual_seed(seed + i) for i in indices]
        z = pipe.sample_latents(len(indices), steps, generators, eta, dtype=dtype)
        for row, i in enumerate(indices):
            for height, width in sizes:
                name = f"sample_{i:04d}.png" if len(sizes) == 1 else f"sample_{i:04d}_{width}x{height}.png"
                pixels = render_to_array(pipe.autoencoder, z[row : row + 1], (height, width), region, renderer, upsample, tile, render_dtype)
                images.save_image(pixels, out / name)
                bar.update(1)
            save_latent(out / f"sample_{i:04d}.z.safetensors", z[row : row + 1], {**metadata, "seed": seed + i, "index": i})
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    shown = ", ".join(f"{w}x{h}" for h, w in sizes)
    report("wrote", f"{n} sample{'s' if n != 1 else ''} ({shown}) and {'their' if n != 1 else 'its'} z to {out} ({time.perf_counter() - start:.1f} s)")


@reports_errors
def render_latent(
    z: Path = typer.Argument(..., help="A latent written by `infd sample` (sample_NNNN.z.safetensors)."),
    ckpt: Path = typer.Option(..., "--ckpt", help="The LDM run or pipeline it was sampled from, or its autoencoder."),
    out: Path = typer.Option(
        ...,
        "--out",
        help=(
            "Output: .tif (tiled pyramidal BigTIFF), .png (streamed), .dzi (Deep Zoom: NAME.dzi + NAME_files/), .jpg or .webp. "
            "An image file replaces one of its name; an existing Deep Zoom export needs --overwrite."
        ),
    ),
    size: str | None = typer.Option(None, help=SIZE_HELP + " Default: the encoder's input size on the long side. .tif, .png and .dzi stream tile by tile, so any size fits in memory."),
    box: str | None = typer.Option(None, help=BOX_HELP),
    renderer: str | None = typer.Option(None, help=RENDERER_HELP),
    upsample: str = typer.Option("bicubic", help=UPSAMPLE_HELP),
    tile: int = typer.Option(512, help="Render tile size in pixels (the output is identical for every tile size); also the TIFF's tile size (a multiple of 16)."),
    output_format: str | None = typer.Option(None, "--format", help="tif, png or dzi; default: from the --out suffix."),
    compression: str = typer.Option("deflate", help="TIFF compression: deflate or none."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    bf16: bool | None = typer.Option(None, "--bf16/--fp32", help=PRECISION_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier Deep Zoom export at --out (never a folder holding anything else)."),
    progress: bool = typer.Option(True, help="Show a progress bar (with ETA)."),
):
    """Render a saved latent z again at any size, region and aspect ratio; gigapixel outputs stream to disk."""

    from infd import geometry, images, rendering, store
    from infd.diffusion.pipeline import render_to_array
    from infd.files import check_output_path
    from infd.latents import load_latent, load_latent_for
    from infd.rendering import LatentField
    from infd.viewer import deepzoom

    kind = deepzoom.export_format(out, output_format)
    if kind == "dzi" and out.suffix.lower() != ".dzi":
        out = out.with_name(out.name + ".dzi")
    if kind is None and out.suffix.lower() not in tuple(images.SAVE_FORMATS):
        raise InfdError(f"output '{out}' must end in one of {', '.join((*images.SAVE_FORMATS, '.dzi'))}.")
    streamed = kind is not None and upsample != "lanczos"
    if kind == "dzi" and not streamed:
        raise InfdError("Deep Zoom outputs are rendered tile by tile, which Lanczos upsampling cannot do; use --upsample bicubic.")
    check_output_path(out)
    if kind == "dzi":
        deepzoom.check_dzi_output(out, overwrite)
    requests, region = _render_options([size] if size else [], box, renderer, upsample)
    saved, metadata = load_latent(z)
    aspect = geometry.latent_aspect(metadata, saved.shape[-2:])
    sizes = _fit_output_sizes(requests, aspect, region, streamed)
    model = store.load_autoencoder(ckpt, rendering.pick_device(device))
    model.get_renderer(renderer)
    latent, _ = load_latent_for(model, z)
    height, width = sizes[0] if sizes else geometry.fit_size(model.config.input_size, aspect, region)
    dtype = rendering.render_dtype(next(model.parameters()).device, bf16)
    start = time.perf_counter()
    if streamed:
        field = LatentField(model, latent, region, renderer, dtype)
        if kind == "tif":
            deepzoom.export_tiff(field, (height, width), out, tile=tile, compression=compression, progress=progress)
        elif kind == "png":
            deepzoom.export_png(field, (height, width), out, tile=tile, progress=progress)
        else:
            deepzoom.export_dzi(field, (height, width), out, progress=progress, overwrite=overwrite)
    else:
        pixels = render_to_array(model, latent, (height, width), region, renderer, upsample, tile, dtype, progress=progress)
        images.save_image(pixels, out)
    report("wrote", f"{out} ({width}x{height}, {time.perf_counter() - start:.1f} s)")


@reports_errors
def info(run: Path = typer.Argument(..., help="Run folder, checkpoint folder or pipeline folder.")):
    """Describe a checkpoint: model shapes, renderer, parameters and training progress."""
    from infd import store

    folder = store.find_checkpoint(run)
    model = store.load_autoencoder(folder)
    table = Table(title=Text(f"infd autoencoder: {folder}"), show_header=False)
    cfg = model.config
    anchor = ", anchored: thumbnail + residual" if cfg.latent_anchor else ""
    table.add_row("latent z", "x".join(map(str, model.latent_shape)) + f" ({cfg.latent_type}{anchor})")
    table.add_row("feature map phi", "x".join(map(str, model.feature_shape)) + f" ({cfg.trunk_type} trunk)")
    kind = f"residual {cfg.renderer_type} over fixed+bicubic" if cfg.residual_renderer else cfg.renderer_type
    fade = f", detail fades below {cfg.detail_fade_cell:g} feature cells per pixel" if cfg.detail_fade_cell else ""
    table.add_row("renderer", f"{kind}, {cfg.renderer_lookup} lookup, hidden {cfg.renderer_hidden}, halo {model.halo} px{fade}")
    table.add_row("encoder input", f"{model.config.input_size}x{model.config.input_size}")
    table.add_row("parameters", f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    state_file = folder / "training_state.json"
    if state_file.is_file():
        step = json.loads(state_file.read_text()).get("__dict__", {}).get("step")
        table.add_row("training step", str(step))
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    table.add_row("files", Text(f"{', '.join(sorted(f.name for f in folder.iterdir()))} ({size / 2**20:.1f} MiB)"))
    if folder.name == "autoencoder" and (folder.parent / "model_index.json").is_file():
        _describe_pipeline(table, folder.parent, model)
    Console().print(table)


def _describe_pipeline(table: Table, folder: Path, autoencoder) -> None:
    """Rows for the diffusion half of a pipeline folder, read from its configs and weight headers."""
    from safetensors import safe_open

    unet = json.loads((folder / "unet" / "config.json").read_text())
    parameters = 0
    for weights in (folder / "unet").glob("*.safetensors"):
        with safe_open(str(weights), "pt") as f:
            parameters += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    channels = "/".join(map(str, unet.get("block_out_channels", [])))
    table.add_row("diffusion UNet", f"{unet.get('_class_name')}, channels {channels}, {parameters / 1e6:.2f} M parameters")
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    table.add_row("scheduler", f"{scheduler.get('_class_name')}, {scheduler.get('num_train_timesteps')} steps, {scheduler.get('prediction_type')} prediction")
    table.add_row("latent scaling factor", f"{autoencoder.config.scaling_factor:.4g}")
