"""`infd invert`: find a latent whose image satisfies conditions on regions at any scale."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from infd.commands.common import report, reports_errors
from infd.errors import InfdError

TEXT_HELP = (
    "A text condition BOX:PROMPT, BOX as y0,x0,y1,x1 in [-1, 1] units (e.g. '-1,-1,0,0:a red boat'); "
    "a PROMPT alone covers the whole image. Repeat for several boxes; adds to --spec's conditions."
)
# Everything `write_outputs` writes in --out: what --overwrite may replace.
OUTPUT_LAYOUT = {
    r"image\.png|z\.safetensors|losses\.json|losses\.png": None,
    "regions": {r"\d{2,}-[a-z]+(-target)?\.png": None},
}


def parse_text_condition(text: str):
    """"y0,x0,y1,x1:prompt" (or just "prompt", for the whole image) -> TextRegion."""
    from infd.geometry import Box
    from infd.inversion.conditions import TextRegion, check_box

    head, sep, tail = text.partition(":")
    if sep and _is_four_numbers(head):
        return TextRegion(check_box(Box.parse(head), f"--text '{text}'"), tail.strip())
    return TextRegion(Box.full(), text.strip())


def _is_four_numbers(text: str) -> bool:
    parts = text.split(",")
    try:
        [float(part) for part in parts]
    except ValueError:
        return False
    return len(parts) == 4


def load_generator(ckpt: Path, device: str):
    """(autoencoder, pipeline or None) from a pipeline/LDM run, or an autoencoder alone."""
    from infd.diffusion.pipeline import load_pipeline
    from infd.rendering import pick_device
    from infd.store import find_pipeline, load_autoencoder

    try:
        folder = find_pipeline(ckpt)
    except InfdError:
        return load_autoencoder(ckpt, pick_device(device)), None
    pipe = load_pipeline(folder, device)
    return pipe.autoencoder, pipe


@reports_errors
def invert_command(
    ckpt: Path = typer.Option(..., "--ckpt", help="Pipeline folder or `infd train-ldm` run (both solvers), or an autoencoder alone (solver optimize with the norm prior)."),
    out: Path = typer.Option(..., "--out", help="New (or empty) output folder: image.png, z.safetensors, regions/, losses.json, losses.png."),
    spec: Path | None = typer.Option(None, "--spec", help="JSON spec: canvas, conditions, solver, steps, seed (see examples/)."),
    text: list[str] | None = typer.Option(None, "--text", help=TEXT_HELP),
    size: str | None = typer.Option(None, "--size", help="Canvas (final image) size WIDTHxHEIGHT; overrides the spec's. Default 1024x1024."),
    solver: str | None = typer.Option(None, help="optimize (Adam on the latent or its noise) or guided (guided DDIM sampling)."),
    steps: int | None = typer.Option(None, help="Adam steps (optimize) or denoising steps (guided)."),
    seed: int | None = typer.Option(None, help="Seed of the starting noise."),
    lr: float | None = typer.Option(None, help="Adam learning rate (optimize)."),
    prior: str | None = typer.Option(None, help="optimize: ddim (noise through a few DDIM steps; needs a pipeline), norm, or auto."),
    guidance_scale: float | None = typer.Option(None, help="guided: step size of the conditions' gradient on the predicted noise."),
    clip: Path | None = typer.Option(None, "--clip", help="Local CLIP for text conditions: transformers folder, open_clip folder or checkpoint file."),
    clip_arch: str | None = typer.Option(None, "--clip-arch", help="open_clip architecture of a --clip checkpoint file, e.g. ViT-B-32."),
    lpips_vgg: Path | None = typer.Option(None, "--lpips-vgg", help="Local VGG16 weights for image conditions with loss lpips."),
    init: Path | None = typer.Option(None, "--init", help="Start z from this image's encoding (optimize with the norm prior)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier `infd invert` output at --out (never a folder holding anything else)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Invert conditions on regions (text via CLIP, observations at any resolution, masks) into a latent, rendering only those regions."""
    from infd import geometry, inversion, rendering
    from infd.files import check_output_path, check_replaceable

    check_output_path(out, folder=True)
    check_replaceable(out, OUTPUT_LAYOUT, overwrite, "infd invert")
    problem = _build_spec(spec, text or [])
    overrides = {"solver": solver, "steps": steps, "seed": seed, "lr": lr, "prior": prior, "guidance_scale": guidance_scale}
    for name, value in overrides.items():
        if value is not None:
            setattr(problem.solver, name, value)
    problem.solver.check()
    for name, value in {"clip": clip, "lpips_vgg": lpips_vgg, "init": init}.items():
        if value is not None:
            setattr(problem, name, str(value))
    problem.clip_arch = clip_arch or problem.clip_arch
    if size:
        problem.canvas = geometry.parse_size(size)
    height, width = problem.canvas
    inversion.check_bounds(problem)
    if height * width > rendering.MAX_RENDER_PIXELS:
        raise InfdError(
            f"a {width}x{height} canvas is larger than the {rendering.MAX_RENDER_PIXELS} pixels one output image may have; "
            "invert at a smaller --size and render any region of OUT/z.safetensors at any size with `infd render`."
        )
    if problem.needs_clip and not problem.clip:
        from infd.inversion.clip import MISSING_CLIP

        raise InfdError(MISSING_CLIP)

    model, pipe = load_generator(ckpt, device)
    inversion.check_solvable(problem.solver, pipe, bool(problem.init))  # before CLIP loads
    torch_device = next(model.parameters()).device
    critics = _critics(problem, torch_device)
    init_z = rendering.encode(model, problem.init) if problem.init else None
    start = time.perf_counter()
    result = inversion.invert(model, problem, critics, pipe, init_z, progress)
    seconds = time.perf_counter() - start
    write_outputs(out, model, problem, result, critics, seconds, str(ckpt))
    finals = ", ".join(f"{c.describe()} {v:.4f}" for c, v in zip(result.conditions, result.final_losses(), strict=True))
    report("wrote", f"{out} ({width}x{height}, {seconds:.1f} s); final losses: {finals}")


def _build_spec(spec_path: Path | None, texts: list[str]):
    from infd import inversion

    problem = inversion.load_spec(spec_path) if spec_path else inversion.InversionSpec([])
    problem.conditions = problem.conditions + [parse_text_condition(t) for t in texts]
    if not problem.conditions:
        raise InfdError("nothing to invert: pass --spec with conditions or at least one --text BOX:PROMPT.")
    return problem


def _critics(problem, device):
    from infd.inversion.conditions import Critics

    critics = Critics()
    if problem.needs_clip:
        from infd.inversion.clip import load_clip

        critics.clip = load_clip(problem.clip, problem.clip_arch, device)
    if problem.needs_lpips:
        from infd.training.losses import LPIPSLoss

        if not problem.lpips_vgg:
            raise InfdError("an image condition with loss 'lpips' needs VGG16 weights: pass --lpips-vgg PATH, or use loss 'l1'.")
        critics.lpips = LPIPSLoss(problem.lpips_vgg).to(device)
    return critics


def write_outputs(out: Path, model, problem, result, critics, seconds: float, ckpt: str) -> None:
    """Everything into a temporary folder renamed to `out` at the end (nothing half-written)."""
    from infd import images
    from infd.diffusion.pipeline import render_to_array
    from infd.files import atomic_directory
    from infd.inversion import render_conditions, spec_to_dict
    from infd.latents import LATENT_SPACE_KEY, latent_space_fingerprint, save_latent
    from infd.rendering import render_dtype

    canvas = problem.canvas
    regions = render_conditions(model, result.z, result.conditions, critics, canvas)
    dtype = render_dtype(next(model.parameters()).device)  # as `infd render` renders the saved z by default
    with atomic_directory(out) as folder:
        images.save_image(render_to_array(model, result.z, canvas, dtype=dtype, progress=False), folder / "image.png")
        metadata = {"ckpt": ckpt, "inversion": spec_to_dict(problem), LATENT_SPACE_KEY: latent_space_fingerprint(model)}
        save_latent(folder / "z.safetensors", result.z, metadata)
        (folder / "regions").mkdir()
        for i, (condition, region) in enumerate(zip(result.conditions, regions, strict=True)):
            images.save_image(region, folder / "regions" / f"{i:02d}-{condition.kind}.png")
            if hasattr(condition, "image"):
                images.save_image(condition.image.cpu(), folder / "regions" / f"{i:02d}-{condition.kind}-target.png")
        log = {**result.log(problem), "seconds": round(seconds, 3), "ckpt": ckpt}
        (folder / "losses.json").write_text(json.dumps(log, indent=1) + "\n")
        plot_losses(result, folder / "losses.png")


def plot_losses(result, path: Path) -> None:
    """Each condition's loss (and the weighted total) against the step, log scale when positive."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in result.history]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, condition in enumerate(result.conditions):
        ax.plot(steps, [entry["losses"][i] for entry in result.history], label=f"{i}: {condition.describe()}")
    ax.plot(steps, [entry["total"] for entry in result.history], "k--", label="weighted total")
    values = [v for entry in result.history for v in (*entry["losses"], entry["total"])]
    if min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
