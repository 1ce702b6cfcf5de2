"""`infd eval-ae`: reconstruction at every scale, beside the model-free floors and the baselines.

Every image is encoded from its fixed-size input and rendered at each *scale* S: the long side S at the image's native aspect ratio (the
field's domain spans the whole image), compared with the native image resized
(antialiased) to that size. A scale above the image's native long side is skipped for
that image: there is no ground truth for it. Per model and scale: PSNR, SSIM, LPIPS
(with local VGG16 weights) and the spectral distance (detail), each as a mean and 95%
confidence interval over images, plus *scale consistency*: the render at the largest
scale, downsampled to each smaller scale, against the direct render there (PSNR).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import infd.evaluation.metrics as metrics
from infd import geometry, rendering, store
from infd.errors import InfdError
from infd.evaluation.inputs import scaled_size
from infd.evaluation.report import goal_row, goals_markdown, machine_line, machine_summary, markdown_table, metric_panels, number_text, plot_panels, with_ci, write_json, write_text
from infd.geometry import Box, Size
from infd.images import ImageError, load_image, resize, save_image
from infd.models.renderers import RENDERERS, FixedResolutionRenderer

AE_METRICS = ("psnr", "ssim", "lpips", "spectral_db", "consistency_db", "colour", "rim_db", "blockiness", "zoom_blockiness")


GOAL_PSNR_GAP_DB = 0.3  # to the best model


GOAL_CONSISTENCY_DB = 35.0


GOAL_FLOOR_MARGIN_DB = 2.0  # above the thumbnail floor, at 512 and 2048


GOAL_SCALES = (512, 2048)


GOAL_MIN_PSNR_512_DB = 25.0


GOAL_COLOUR = 3.0  # /255


GOAL_RIM_DB = 1.5


GOAL_BLOCKINESS = 1.5


ZOOM = 4  # the zoom of the largest scale at which blockiness is also measured


ZOOM_WINDOW = 512  # side of the centred window rendered at that zoom


@dataclass
class ModelSpec:
    """`LABEL=PATH[:renderer]` from the command line; label None: named after its renderer."""

    label: str | None
    path: Path
    renderer: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        label, sep, rest = text.partition("=")
        if not sep or not label or not rest:
            raise InfdError(f"--model '{text}' must be LABEL=PATH or LABEL=PATH:RENDERER (renderer {', '.join(RENDERERS)}).")
        path, colon, renderer = rest.rpartition(":")
        if not colon or renderer not in RENDERERS:
            path, renderer = rest, None
        return cls(label, Path(path), renderer)


@dataclass
class EvalModel:
    """An autoencoder to evaluate, rendered with `renderer` (None: its own)."""

    label: str
    model: torch.nn.Module
    renderer: str | None = None
    path: str = ""

    @property
    def renderer_name(self) -> str:
        return self.renderer or self.model.config.renderer_type

    def describe(self) -> dict:
        cfg = self.model.config
        return {
            "label": self.label,
            "path": self.path,
            "renderer": self.renderer_name,
            "input_size": cfg.input_size,
            "latent_shape": list(self.model.latent_shape),
            "feature_shape": list(self.model.feature_shape),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


@dataclass
class Floor:
    """A model-free reference row: the image squashed to `grid` pixels, bicubic up to any size.

    `thumbnail` holds as many numbers as a model's latent (what storing a thumbnail instead
    of z would give); `input` is the encoder's own input (what a decoder that adds nothing
    to it recovers). Rendering a box reads the same bicubic field at that box's pixels.
    """

    label: str
    grid: Size
    meaning: str

    renderer_name = "floor"

    def describe(self) -> dict:
        return {"label": self.label, "renderer": "floor", "grid": list(self.grid), "meaning": self.meaning}


def floors_for(model: torch.nn.Module) -> list[Floor]:
    """The two floors of an autoencoder: its latent's worth of thumbnail, and its encoder input."""
    c, h, w = model.latent_shape
    side = max(1, round(math.sqrt(c * h * w / 3)))
    s = model.config.input_size
    return [
        Floor("thumbnail", (side, side), f"the image squashed to {side}x{side} RGB ({3 * side * side} numbers; the latent has {c * h * w}), bicubic up"),
        Floor("input", (s, s), f"the encoder's input ({s}x{s}), bicubic up"),
    ]


def default_label(renderer: str) -> str:
    return "fixed+bicubic" if renderer == "fixed" else renderer


def load_models(specs: list[ModelSpec], device: torch.device) -> list[EvalModel]:
    """Load every autoencoder (run, checkpoint or pipeline folder) and check its renderer exists."""
    if not specs:
        raise InfdError("nothing to evaluate: pass --ckpt RUN, or one or more --model LABEL=PATH[:renderer].")
    models = []
    for spec in specs:
        folder = store.find_checkpoint(spec.path)
        model = store.load_autoencoder(folder, device)
        model.get_renderer(spec.renderer)
        evaluated = EvalModel("", model, spec.renderer, str(folder))
        evaluated.label = spec.label or default_label(evaluated.renderer_name)
        models.append(evaluated)
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise InfdError(f"model labels must differ, got {', '.join(labels)}; name them with --model LABEL=PATH[:renderer].")
    return models


def detail_window(image: torch.Tensor, crop: int) -> tuple[int, int, int]:
    """(top, left, side) of the crop of image (3, H, W) with the most fine detail (mean |Laplacian|).

    Candidates lie on a grid of half-crop steps, so the strip shows texture, not sky.
    """
    h, w = image.shape[-2:]
    side = min(crop, h, w)
    gray = image.mean(0)
    laplacian = (4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]).abs()
    step = max(1, side // 2)
    best = (-1.0, 0, 0)
    for top in sorted({*range(0, h - side + 1, step), h - side}):
        for left in sorted({*range(0, w - side + 1, step), w - side}):
            energy = float(laplacian[top : top + side - 2, left : left + side - 2].mean())
            best = max(best, (energy, top, left))
    return best[1], best[2], side


def comparison_strip(crops: list[tuple[str, torch.Tensor]]) -> np.ndarray:
    """Labelled crops side by side: (H, W, 3) uint8. crops: (label, (3, s, s) in [0, 1])."""
    from PIL import Image, ImageDraw

    from infd.images import to_uint8_hwc

    gap, bar = 4, 16
    side = crops[0][1].shape[-1]
    canvas = Image.new("RGB", (len(crops) * (side + gap) - gap, side + bar), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, crop) in enumerate(crops):
        x = i * (side + gap)
        canvas.paste(Image.fromarray(to_uint8_hwc(crop)), (x, bar))
        draw.text((x + 2, 2), label, fill="black")
    return np.asarray(canvas)


RenderFn = Callable[[Size, Box], torch.Tensor]  # (size, box) -> (3, H, W) in [0, 1]


def reconstruction(entry: EvalModel | Floor, image: torch.Tensor, tile: int | None, dtype: torch.dtype | None) -> RenderFn:
    """What `entry` makes of image (3, H, W): a function rendering any box at any size."""
    if isinstance(entry, Floor):
        thumb = resize(image[None].double(), entry.grid)  # float64: a flat image stays exactly flat

        def render_floor(size: Size, box: Box) -> torch.Tensor:
            ys, xs = geometry.window_centers(box, size)
            cell = torch.tensor(geometry.cell_size(box, size), dtype=torch.float64)
            return FixedResolutionRenderer.resample(thumb, ys, xs, cell)[0].clamp(0, 1).float()

        return render_floor
    field = rendering.LatentField(entry.model, rendering.encode(entry.model, image[None]), renderer=entry.renderer, dtype=dtype)

    def render_model(size: Size, box: Box) -> torch.Tensor:
        return field.image(size, tile, box=box)[0]  # phi is decoded once for every scale and zoom

    return render_model


def zoom_box(size: Size, zoom: int = ZOOM, window: int = ZOOM_WINDOW) -> tuple[Box, Size]:
    """The centred `window`² (at most) of the grid `zoom` times finer than `size`, as (box, its size)."""
    h, w = size[0] * zoom, size[1] * zoom
    wh, ww = min(window, h), min(window, w)
    return Box(-wh / h, -ww / w, wh / h, ww / w), (wh, ww)


def block_figure(render: torch.Tensor, box: Box, feature_grid: Size) -> float | None:
    """Blockiness of render (3, H, W) of `box` with respect to the cells of a feature map of `feature_grid`
    (None where it is undefined: pixels no smaller than the cells)."""
    ys, xs = geometry.window_centers(box, tuple(render.shape[-2:]))
    edges = geometry.cell_edges(ys, feature_grid[0]), geometry.cell_edges(xs, feature_grid[1])
    value = float(metrics.blockiness(render[None], *edges)[0])
    return value if math.isfinite(value) else None


@torch.no_grad()
def evaluate_image(
    image: torch.Tensor,
    models: list[EvalModel | Floor],
    scales: list[int],
    tile: int | None = rendering.DEFAULT_TILE,
    dtype: torch.dtype | None = None,
    lpips: metrics.LPIPSMetric | None = None,
    strip_crop: int = 256,
    feature_grid: Size | None = None,
) -> tuple[list[dict], np.ndarray | None]:
    """Evaluate every model (and floor) on one image (3, H, W) at the scales it is large enough for.

    `feature_grid`: the cells blockiness is measured against (default: each model's own phi;
    floors use the first model's). Returns one record per (entry, scale) and the comparison
    strip at the largest scale (None when no scale fits the image).
    """
    native = tuple(image.shape[-2:])
    fitting = [s for s in scales if s <= max(native)]
    if not fitting:
        return [], None
    truths = {s: resize(image[None], scaled_size(native, s))[0] for s in fitting}
    largest = fitting[-1]
    top, left, side = detail_window(truths[largest], strip_crop)
    crops = [("ground truth", truths[largest][:, top : top + side, left : left + side])]
    grids = [tuple(m.model.feature_shape[1:]) for m in models if isinstance(m, EvalModel)]
    default_grid = feature_grid or (grids[0] if grids else (8, 8))
    records = []
    for entry in models:
        grid = feature_grid or (tuple(entry.model.feature_shape[1:]) if isinstance(entry, EvalModel) else default_grid)
        render_fn = reconstruction(entry, image, tile, dtype)
        renders = {}
        for s in reversed(fitting):  # the largest first: the others are compared with it
            start = time.perf_counter()
            render = render_fn(tuple(truths[s].shape[-2:]), Box.full())
            seconds = time.perf_counter() - start
            renders[s] = render
            record = _image_record(entry, s, render, truths[s], renders[largest], lpips, seconds)
            record["blockiness"] = block_figure(render, Box.full(), grid)
            if s == largest:
                box, size = zoom_box(tuple(render.shape[-2:]))
                record["zoom_blockiness"] = block_figure(render_fn(size, box), box, grid)
            records.append(record)
        crops.append((entry.label, renders[largest][:, top : top + side, left : left + side]))
    return records, comparison_strip(crops)


def _image_record(entry: EvalModel | Floor, scale: int, render: torch.Tensor, truth: torch.Tensor, largest: torch.Tensor, lpips, seconds: float) -> dict:
    device = next(entry.model.parameters()).device if isinstance(entry, EvalModel) else torch.device("cpu")  # metrics run where the model does
    pred, target = render[None].to(device), truth[None].to(device)
    record = {
        "model": entry.label,
        "scale": scale,
        "size": list(truth.shape[-2:]),
        "psnr": float(metrics.psnr(pred, target)[0]),
        "ssim": float(metrics.ssim(pred, target)[0]),
        "spectral_db": float(metrics.spectral_distance(pred, target)[0]),
        "lpips": float(lpips(pred, target)[0]) if lpips is not None else None,
        "consistency_db": None,
        "colour": float(metrics.colour_error(pred, target)[0]),
        "rim_db": float(metrics.rim_db(pred, target)[0]),
        "blockiness": None,
        "zoom_blockiness": None,
        "render_s": seconds,
    }
    if largest.shape != render.shape:
        downsampled = resize(largest[None].to(device), tuple(render.shape[-2:]))
        record["consistency_db"] = float(metrics.psnr(downsampled, pred)[0])
    return record


def evaluate_autoencoders(
    paths: list[Path],
    models: list[EvalModel],
    scales: list[int],
    tile: int | None = rendering.DEFAULT_TILE,
    dtype: torch.dtype | None = None,
    lpips: metrics.LPIPSMetric | None = None,
    strip_crop: int = 256,
    progress: bool = True,
    floors: bool = True,
) -> dict:
    """Evaluate `models` on the images at `paths`: the result dict written by `write_ae_report`.

    The floors of the first model (`floors_for`: its latent's worth of thumbnail and its
    encoder input, each bicubic up) are evaluated beside them unless `floors` is False.
    Unreadable images and images smaller than every scale are skipped and listed.
    """
    start = time.perf_counter()
    entries: list[EvalModel | Floor] = [*models, *(floors_for(models[0].model) if floors else [])]
    per_image, strips, skipped = [], {}, {}
    bar = tqdm(paths, desc="eval-ae", unit="image", disable=not progress)
    for path in bar:
        bar.set_postfix_str(path.name)
        try:
            image = load_image(path)
        except ImageError as error:
            skipped[path.name] = error.reason
            continue
        records, strip = evaluate_image(image, entries, scales, tile, dtype, lpips, strip_crop)
        if not records:
            skipped[path.name] = f"smaller than every scale ({image.shape[-1]}x{image.shape[-2]})"
            continue
        for record in records:
            per_image.append({"image": path.name, **record})
        strips[path.stem] = strip
    if not per_image:
        raise InfdError(f"no image could be evaluated ({len(skipped)} skipped: {', '.join(f'{k}: {v}' for k, v in skipped.items())}).")
    device = next(models[0].model.parameters()).device
    rows = summarize_records(per_image, entries, scales)
    return {
        "benchmark": "eval-ae",
        "machine": machine_summary(device),
        "settings": {
            "images": sorted({r["image"] for r in per_image}),
            "scales": scales,
            "scale_meaning": "long side at the native aspect ratio; ground truth = native image resized (antialiased)",
            "tile": tile,
            "dtype": str(dtype or torch.float32).replace("torch.", ""),
            "lpips": lpips is not None,
            "strip_crop": strip_crop,
        },
        "models": [m.describe() for m in entries],
        "rows": rows,
        "goals": ae_goals(rows, models),
        "skipped": skipped,
        "seconds": time.perf_counter() - start,
        "per_image": per_image,
        "_strips": strips,  # arrays; written as PNGs, not to the JSON
    }


def summarize_records(records: list[dict], models: list[EvalModel | Floor], scales: list[int]) -> list[dict]:
    """Mean and 95% CI of every metric per (model, scale) over the images."""
    rows = []
    for entry in models:
        for scale in scales:
            group = [r for r in records if r["model"] == entry.label and r["scale"] == scale]
            if not group:
                continue
            row = {"model": entry.label, "renderer": entry.renderer_name, "scale": scale, "n": len(group)}
            for name in AE_METRICS:
                row[name], row[f"{name}_ci"] = metrics.mean_ci(r[name] for r in group)
            row["render_s"] = sum(r["render_s"] for r in group) / len(group)
            rows.append(row)
    return rows


def ae_goals(rows: list[dict], models: list[EvalModel]) -> list[dict]:
    """The goals for each CLIF model, against the floors and the other models on the same images.

    PSNR at 512 and 2048 at least the thumbnail floor + 2 dB (and 25 dB at 512); colour
    error <= 3/255, rim <= 1.5 dB and blockiness <= 1.5 (at the largest scale and at a 4x
    zoom of it) at every scale; at every scale above the input: detail (spectral distance)
    better than every fixed-resolution model and PSNR within 0.3 dB of the best model;
    scale consistency >= 35 dB.
    """
    goals = []
    by_key = {(r["model"], r["scale"]): r for r in rows}
    for entry in (m for m in models if m.renderer_name == "clif"):
        mine = sorted((r for r in rows if r["model"] == entry.label), key=lambda r: r["scale"])
        if not mine:
            continue
        for row in mine:
            scale = row["scale"]
            floor = by_key.get(("thumbnail", scale))
            if scale in GOAL_SCALES and floor is not None:
                target = floor["psnr"] + GOAL_FLOOR_MARGIN_DB
                goals.append(goal_row(f"{entry.label} PSNR at {scale}: thumbnail floor + {GOAL_FLOOR_MARGIN_DB:g} dB", row["psnr"], f">= {target:.2f} dB", row["psnr"] >= target))
            if scale == GOAL_SCALES[0]:
                goals.append(goal_row(f"{entry.label} PSNR at {scale}", row["psnr"], f">= {GOAL_MIN_PSNR_512_DB:g} dB", row["psnr"] >= GOAL_MIN_PSNR_512_DB))
            if scale <= entry.model.config.input_size:
                continue
            others = [by_key[(m.label, scale)] for m in models if m is not entry and (m.label, scale) in by_key]
            fixed = [by_key[(m.label, scale)] for m in models if m.renderer_name == "fixed" and (m.label, scale) in by_key]
            for other in fixed:
                better = row["spectral_db"] < other["spectral_db"]
                goals.append(goal_row(f"{entry.label} detail at {scale}: better than {other['model']}", row["spectral_db"], f"< {other['spectral_db']:.4g} dB", better))
            if others:
                gap = max([row["psnr"], *(o["psnr"] for o in others)]) - row["psnr"]
                goals.append(goal_row(f"{entry.label} PSNR at {scale}: gap to the best model", gap, f"<= {GOAL_PSNR_GAP_DB} dB", gap <= GOAL_PSNR_GAP_DB))
        worst_colour = max(r["colour"] for r in mine)
        goals.append(goal_row(f"{entry.label} colour error (worst scale)", worst_colour, f"<= {GOAL_COLOUR:g}/255", worst_colour <= GOAL_COLOUR))
        worst_rim = max(r["rim_db"] for r in mine)
        goals.append(goal_row(f"{entry.label} rim (worst scale)", worst_rim, f"<= {GOAL_RIM_DB:g} dB", worst_rim <= GOAL_RIM_DB))
        top = mine[-1]
        for name, what in (("blockiness", f"at {top['scale']}"), ("zoom_blockiness", f"at a {ZOOM}x zoom of {top['scale']}")):
            if top.get(name) is not None:
                goals.append(goal_row(f"{entry.label} blockiness {what}", top[name], f"<= {GOAL_BLOCKINESS:g}", top[name] <= GOAL_BLOCKINESS))
        consistency = [r["consistency_db"] for r in mine if r["consistency_db"] is not None]
        if consistency:
            low = min(consistency)
            goals.append(goal_row(f"{entry.label} scale consistency (lowest scale mean)", low, f">= {GOAL_CONSISTENCY_DB:g} dB", low >= GOAL_CONSISTENCY_DB))
    return goals


def ae_markdown(result: dict, link_prefix: str = "") -> str:
    """The eval-ae table (mean ± 95% CI), goals, plot and strips as markdown; links start with `link_prefix`."""
    settings = result["settings"]
    lpips = settings.get("lpips")
    headers = ["model", "scale", "n", "PSNR (dB)", "SSIM", *(["LPIPS"] if lpips else []), "spectral dist. (dB) ↓", "consistency (dB)"]
    headers += ["colour (/255) ↓", "rim (dB) ↓", "blockiness", f"blockiness {ZOOM}x zoom", "render (s)"]
    rows = []
    for r in result["rows"]:
        cells = [r["model"], str(r["scale"]), str(r["n"]), with_ci(r["psnr"], r["psnr_ci"], 2), with_ci(r["ssim"], r["ssim_ci"], 4)]
        cells += [with_ci(r["lpips"], r["lpips_ci"], 4)] if lpips else []
        cells += [with_ci(r["spectral_db"], r["spectral_db_ci"], 2), with_ci(r["consistency_db"], r["consistency_db_ci"], 2)]
        cells += [with_ci(r.get(k), r.get(f"{k}_ci"), 2) for k in ("colour", "rim_db", "blockiness", "zoom_blockiness")]
        cells.append(number_text(r["render_s"], 1))
        rows.append(cells)
    images = settings["images"]
    text = (
        f"{len(images)} images ({', '.join(images)}), scales {', '.join(map(str, settings['scales']))} "
        f"(long side, native aspect), {settings['dtype']}, {machine_line(result['machine'])}. "
        "Floors (no model): `thumbnail`, the image squashed to as many numbers as the latent, and `input`, the encoder's input, each bicubic up.\n\n"
    )
    text += markdown_table(headers, rows)
    if result.get("goals"):
        text += "\n" + goals_markdown(result["goals"])
    if result.get("skipped"):
        text += "\nSkipped: " + ", ".join(f"{name} ({why})" for name, why in result["skipped"].items()) + ".\n"
    if result.get("plot"):
        text += f"\n![eval-ae plot]({link_prefix}{result['plot']})\n"
    for name in result.get("strips", [])[:1]:
        text += f"\nCrops at the largest scale (ground truth, then each model): ![strip]({link_prefix}{name})\n"
    return text


def write_ae_report(result: dict, out: str | os.PathLike, name: str = "eval-ae") -> dict[str, Path]:
    """Write NAME.json, NAME.md, NAME.png and strips/NAME-IMAGE.png into `out`; returns the paths."""
    out = Path(out)
    strips = result.pop("_strips", {})
    result["strips"] = []
    for stem, strip in strips.items():
        relative = f"strips/{name}-{stem}.png"
        save_image(strip, out / relative)
        result["strips"].append(relative)
    result["plot"] = f"{name}.png"
    scales = result["settings"]["scales"]
    plot_panels(out / result["plot"], metric_panels(result["rows"], AE_METRICS, "model", scales), f"eval-ae: {len(result['settings']['images'])} images")
    write_json(out / f"{name}.json", result)
    write_text(out / f"{name}.md", f"# Autoencoder evaluation\n\n{ae_markdown(result)}")
    return {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "plot": out / result["plot"]}

