"""`infd convert-vae` and `infd txt2img`: Stable Diffusion with any-resolution output."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from infd.commands.common import BOX_HELP, SIZE_HELP, check_image_suffix, check_output_pixels, report, reports_errors
from infd.errors import InfdError, check_choice


@reports_errors
def convert_vae(
    vae: Path = typer.Option(..., "--vae", help="A local diffusers AutoencoderKL or VQModel folder (or an SD folder: its vae/), or a .safetensors VAE in the original SD layout."),
    out: Path = typer.Option(..., "--out", help="New checkpoint folder for the converted autoencoder (+ finetune.json)."),
    input_size: int | None = typer.Option(None, help="Encoder input size. Default: the VAE's sample_size (512 for SD 1.x: a 64x64 latent)."),
    scaling_factor: float | None = typer.Option(None, help="Latent scaling factor. Default: the VAE's own (0.18215 for single files)."),
    renderer_hidden: int = typer.Option(128, help="Width of the new CLIF renderer."),
    renderer_blocks: int = typer.Option(2, help="Residual blocks of the new CLIF renderer."),
    freeze_encoder: bool = typer.Option(True, "--freeze-encoder/--no-freeze-encoder", help="finetune.json keeps the encoder frozen, so the LDM's latent space stays valid."),
    freeze_decoder: bool = typer.Option(False, "--freeze-decoder/--no-freeze-decoder", help="finetune.json also freezes the decoder trunk (trains CLIF alone)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier `infd convert-vae` output at --out (never a folder holding anything else)."),
):
    """Convert an LDM autoencoder (Stable Diffusion's VAE, VQ-f4) into a neural-field autoencoder."""
    from infd.stable_diffusion.convert import FINETUNE_CONFIG
    from infd.stable_diffusion.convert import convert_vae as convert

    if renderer_hidden <= 0 or renderer_blocks < 0:
        raise InfdError(f"--renderer-hidden must be positive and --renderer-blocks 0 or more, got {renderer_hidden} and {renderer_blocks}.")
    model = convert(vae, out, input_size, scaling_factor, renderer_hidden, renderer_blocks, freeze_encoder, freeze_decoder, overwrite)
    c, h, w = model.latent_shape
    s = model.config.input_size
    report(
        "wrote",
        f"{out}: z {c}x{h}x{w} from {s}x{s}, phi {'x'.join(map(str, model.feature_shape))}, "
        f"scaling factor {model.config.scaling_factor:g}; finetune with\n"
        f"  infd train-ae --config {out / FINETUNE_CONFIG} --data DIR --out RUN",
    )


@reports_errors
def txt2img(
    prompt: str = typer.Option(..., "--prompt", help="What to draw."),
    sd: Path = typer.Option(..., "--sd", help="Local Stable Diffusion folder (diffusers layout: text_encoder/, tokenizer/, unet/, scheduler/), or a saved INFDStableDiffusionPipeline."),
    ae: Path | None = typer.Option(None, "--ae", help="The converted autoencoder (run, checkpoint or pipeline folder); optional when --sd is a saved INFDStableDiffusionPipeline."),
    out: Path = typer.Option(..., "--out", help="Output image (.png, .jpg, .webp or .tif); with --n > 1, OUT_0000.png ...; each image's z beside it (.z.safetensors)."),
    size: str = typer.Option("2048", help=SIZE_HELP),
    box: str | None = typer.Option(None, help=BOX_HELP),
    negative_prompt: str = typer.Option("", help="What not to draw."),
    n: int = typer.Option(1, "--n", help="Number of images (image i uses seed + i)."),
    steps: int = typer.Option(50, help="Denoising steps."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale (1: none)."),
    seed: int = typer.Option(0, help="The same seed gives the same image."),
    sampler: str | None = typer.Option(None, help="ddim, dpm++ or ddpm. Default: the folder's own scheduler."),
    renderer: str | None = typer.Option(None, help="clif (default) or fixed: the original decoder's image, bicubic-upsampled (the baseline)."),
    tile: int = typer.Option(512, help="Render tile size in pixels (the output is identical for every tile size)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    bf16: bool | None = typer.Option(None, "--bf16/--fp32", help="--bf16: denoise and render in bfloat16 (autocast); --fp32: both in float32. Default: both in float32."),
):
    """Text-to-image with Stable Diffusion, rendered at any size (2048², 4096², ...) by the converted autoencoder."""
    import torch

    from infd import geometry, images, rendering
    from infd.diffusion import SAMPLERS
    from infd.diffusion.pipeline import render_to_array
    from infd.latents import LATENT_SPACE_KEY, latent_space_fingerprint, save_latent
    from infd.stable_diffusion.pipeline import load_sd_pipeline

    check_image_suffix(out)
    if n <= 0 or steps <= 0 or tile <= 0:
        raise InfdError(f"--n, --steps and --tile must be positive, got {n}, {steps} and {tile}.")
    height, width = geometry.parse_size(size)
    check_output_pixels(height, width)
    region = geometry.Box.parse(box) if box else None
    if sampler is not None:
        check_choice(sampler, SAMPLERS, "sampler")
    pipe = load_sd_pipeline(sd, ae, device)
    if sampler is not None:
        pipe.use_sampler(sampler)
    pipe.autoencoder.get_renderer(renderer)
    pipe.set_progress_bar_config(desc="denoising", leave=False)
    dtype = torch.bfloat16 if bf16 else None  # the UNet's precision
    render_dtype = rendering.render_dtype(next(pipe.autoencoder.parameters()).device, bf16)
    latent_space = latent_space_fingerprint(pipe.autoencoder)
    start = time.perf_counter()
    names = [out] if n == 1 else [out.with_name(f"{out.stem}_{i:04d}{out.suffix}") for i in range(n)]
    for i, name in enumerate(names):
        generator = torch.Generator().manual_seed(seed + i)
        z = pipe.sample_latents(prompt, negative_prompt, steps, guidance, generator, dtype=dtype)
        metadata = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed + i, "steps": steps, "guidance": guidance, "sd": str(sd)}
        pixels = render_to_array(pipe.autoencoder, z, (height, width), region, renderer, tile=tile, dtype=render_dtype, progress=True)
        images.save_image(pixels, name)
        save_latent(name.with_suffix(".z.safetensors"), z, {**metadata, LATENT_SPACE_KEY: latent_space})
    report("wrote", f"{n} image(s) of {width}x{height} to {', '.join(map(str, names[:3]))}{' ...' if n > 3 else ''} ({time.perf_counter() - start:.1f} s)")
