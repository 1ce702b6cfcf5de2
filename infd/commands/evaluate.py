"""`infd eval-ae` and `infd eval-gen`: the numbers to choose a model by (infd.evaluation)."""

from __future__ import annotations

from pathlib import Path

import typer

from infd.commands.common import console, report, reports_errors
from infd.errors import InfdError

DEVICE_HELP = "auto, cpu, cuda or cuda:N."


@reports_errors
def eval_ae(
    data: Path = typer.Option(..., "--data", help="Folder of ground-truth images at their native resolution."),
    out: Path = typer.Option(..., "--out", help="Output folder: eval-ae.json, eval-ae.md, eval-ae.png and strips/."),
    ckpt: Path | None = typer.Option(None, "--ckpt", help="One autoencoder: run folder, checkpoint folder or pipeline folder."),
    renderer: str | None = typer.Option(None, help="With --ckpt: clif, liif or fixed (the fixed-resolution head, bicubic); default: the model's own."),
    model: list[str] | None = typer.Option(None, "--model", help="LABEL=PATH[:renderer], repeat to compare several models on the same images (e.g. clif=runs/ae fixed=runs/ae:fixed liif=runs/liif)."),
    scales: str = typer.Option("256,512,1024,2048", help="Output scales: the long side in pixels, rendered at the native aspect ratio; skipped for images smaller than the scale."),
    holdout: bool = typer.Option(False, help="Evaluate only infd.data.WALLPAPER_HOLDOUT, the held-out split of the wallpapers set."),
    limit: int | None = typer.Option(None, help="Evaluate only the first N images (sorted by path)."),
    lpips_vgg: Path | None = typer.Option(None, "--lpips-vgg", help="Local VGG16 weights (torchvision state dict, .pth/.safetensors) to add LPIPS."),
    strip_crop: int = typer.Option(256, help="Side of the crops in the comparison strips (taken where the ground truth has the most detail)."),
    tile: int = typer.Option(512, help="Render tile size in pixels (memory stays flat; results do not depend on it)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    bf16: bool = typer.Option(False, help="Render in bfloat16 (autocast)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Reconstruct every image and compare with the ground truth at each scale: PSNR, SSIM, LPIPS, detail, scale consistency."""
    import torch

    from infd import evaluation, rendering
    from infd.evaluation.metrics import LPIPSMetric

    scale_list = evaluation.parse_scales(scales)
    if tile <= 0 or strip_crop < 8:
        raise InfdError(f"--tile must be positive and --strip-crop at least 8, got {tile} and {strip_crop}.")
    specs = [evaluation.ModelSpec.parse(text) for text in model or []]
    if ckpt is not None:
        specs.insert(0, evaluation.ModelSpec(None, ckpt, renderer))
    elif renderer is not None:
        raise InfdError("--renderer goes with --ckpt; with --model write LABEL=PATH:RENDERER.")
    paths, missing = evaluation.select_images(data, holdout, limit)
    if missing:
        report("warning:", f"held-out files missing from {data}: {', '.join(missing)}; the numbers are not comparable with a full run.", "yellow")
    target = rendering.pick_device(device)
    models = evaluation.load_models(specs, target)
    lpips = LPIPSMetric(lpips_vgg, target) if lpips_vgg is not None else None
    result = evaluation.evaluate_autoencoders(paths, models, scale_list, tile, torch.bfloat16 if bf16 else None, lpips, strip_crop, progress)
    written = evaluation.write_ae_report(result, out)
    console.print(evaluation.ae_markdown(result), markup=False, highlight=False, soft_wrap=True)
    report("wrote", f"{written['json']}, {written['markdown'].name}, {written['plot'].name} and {len(result['strips'])} strips ({result['seconds']:.1f} s)")


@reports_errors
def eval_gen(
    samples: list[str] = typer.Option(..., "--samples", help="Folder of generated images, or LABEL=DIR; repeat to compare several sets with the same real patches."),
    real: Path = typer.Option(..., "--real", help="Folder of real images."),
    out: Path = typer.Option(..., "--out", help="Output folder: eval-gen.json, eval-gen.md, eval-gen.png."),
    patch: int = typer.Option(256, help="Patch side in pixels."),
    scales: str = typer.Option("256,512,1024", help="Scales: the short side each image is resized to before cropping (each at least --patch)."),
    patches_per_image: int = typer.Option(4, help="Random patches per image and scale (all positions when fewer exist)."),
    inception: Path | None = typer.Option(None, "--inception", help="torch-fidelity's InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth) to add FID; nothing is downloaded."),
    seed: int = typer.Option(0, help="Seed of the patch positions."),
    limit: int | None = typer.Option(None, help="Use only the first N images of each folder."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    progress: bool = typer.Option(True, help="Show progress bars."),
):
    """FID and patch-FID of generated images against real ones at each scale, plus weight-free statistics."""
    from infd import evaluation

    scale_list = evaluation.parse_scales(scales)
    sets: dict[str, list[Path]] = {}
    for text in samples:
        label, sep, folder = text.partition("=")
        label, folder = (label, folder) if sep and label and folder else (Path(text).name or "samples", text)
        if label in sets:
            raise InfdError(f"two --samples sets are called '{label}'; name them with LABEL=DIR.")
        sets[label] = evaluation.select_images(folder, limit=limit)[0]
    real_paths = evaluation.select_images(real, limit=limit)[0]
    result = evaluation.evaluate_generated(sets, real_paths, scale_list, patch, patches_per_image, seed, inception, device, progress)
    written = evaluation.write_gen_report(result, out)
    console.print(evaluation.gen_markdown(result), markup=False, highlight=False, soft_wrap=True)
    report("wrote", f"{written['json']}, {written['markdown'].name}, {written['plot'].name} ({result['seconds']:.1f} s)")
