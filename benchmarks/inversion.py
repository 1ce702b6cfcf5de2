"""Inversion step cost: region-only rendering vs decoding the full canvas and cropping.

    PYTHONPATH=. python3 benchmarks/inversion.py                    # CUDA if present, else CPU
    PYTHONPATH=. python3 benchmarks/inversion.py --device cuda      # paper-sized autoencoder
    PYTHONPATH=. python3 benchmarks/inversion.py --quick            # smoke test in seconds

One optimisation step of z: decode phi, render three 224² regions of the canvas, an L1
loss against a 224² target each, and the gradient with respect to z. "region" renders
only the three boxes (infd.inversion.condition_losses, what the solvers do); "naive"
renders the whole canvas differentiably, then crops the three regions out of it. Both
compute the same loss and the same gradient (checked numerically on a small canvas,
`grad_check` in the JSON). The diffusion prior's cost (UNet) is the same for both and
is left out.

Peak memory: on CPU the peak RSS of a fresh process per row, reported as the increment
over the process's RSS before the step (model, z and targets loaded); on CUDA
max_memory_allocated minus the memory allocated before the step. Naive rows that cannot
run (over --naive-budget-gib, or out of memory) are *estimated* from the measured naive
rows by a fit a + b * pixels (marked "estimated"). Models (random weights): "paper"
(z 3x64x64, phi 128x256x256, CLIF width 256; default on CUDA), "demo" (the shipped demo
autoencoder's shapes: phi 32x128x128, CLIF width 64; default on CPU), "quick" (tiny).

Results: a table, benchmarks/results/inversion-<device>.json and .png.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
from common import MIB, BenchmarkRun, Column, Panel, Series, cuda_peak_bytes, current_rss_bytes, goal, median, peak_rss_bytes, plot_panels, reset_cuda_peak, run_in_fresh_process, time_runs

from infd.geometry import Box, crop_box, parse_size
from infd.inversion import condition_losses
from infd.inversion.conditions import Critics, ImageRegion
from infd.models import NeuralFieldAutoencoder
from infd.rendering import render_prepared

MODELS = {
    "paper": dict(input_size=256, latent_channels=3, block_out_channels=(128, 256, 256), layers_per_block=2, renderer_hidden=256),
    "demo": dict(input_size=128, latent_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, renderer_hidden=64),
    "quick": dict(input_size=32, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, renderer_hidden=16),
}
DEFAULT_MODEL = {"cpu": "demo", "cuda": "paper"}
DEFAULT_CANVASES = "1024,2048,4096,8192"
DEFAULT_NAIVE_BUDGET_GIB = {"cpu": 12.0, "cuda": None}  # None: try, and estimate after an out-of-memory error
REGION = 224
GOALS = {2048: 10.0, 8192: 50.0}  # canvas side -> minimum naive / region step memory


# ---------------------------------------------------------------- the step


def build(model_name: str, device: torch.device, width: int | None = None) -> NeuralFieldAutoencoder:
    torch.manual_seed(0)
    config = dict(MODELS[model_name])
    if width:
        config["renderer_hidden"] = width
    return NeuralFieldAutoencoder(**config).to(device).eval()


def region_conditions(canvas: int, region: int = REGION) -> list[ImageRegion]:
    """Three region x region boxes on the canvas's diagonal, each with a random target of that size."""
    conditions = []
    for i, fraction in enumerate((0.2, 0.5, 0.8)):
        corner = min(canvas - region, max(0, round(fraction * canvas - region / 2)))
        target = torch.rand(3, region, region, generator=torch.Generator().manual_seed(i))
        conditions.append(ImageRegion(crop_box((canvas, canvas), corner, corner, (region, region)), target))
    return conditions


def naive_losses(model: NeuralFieldAutoencoder, z: torch.Tensor, conditions: list[ImageRegion], canvas: int) -> torch.Tensor:
    """The same losses, from the whole canvas rendered differentiably and then cropped."""
    full = (render_prepared(model, model.prepare_render(z), Box.full(), (canvas, canvas)) + 1) / 2
    losses = []
    for condition in conditions:
        top, left, bottom, right = (round(v) for v in condition.box.to_pixels((canvas, canvas)))
        losses.append(condition.loss(full[..., top:bottom, left:right], Critics()))
    return torch.stack(losses)


def step(model, z, conditions, canvas: int, mode: str) -> torch.Tensor:
    """One optimisation step's forward and backward: the gradient of the summed losses w.r.t. z."""
    z = z.detach().requires_grad_(True)
    if mode == "region":
        losses = condition_losses(model, z, conditions, Critics(), (canvas, canvas))
    else:
        losses = naive_losses(model, z, conditions, canvas)
    (grad,) = torch.autograd.grad(losses.sum(), [z])
    return grad


def setup(model_name: str, width: int | None, canvas: int, device: torch.device, region: int = REGION):
    model = build(model_name, device, width)
    z = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
    conditions = [c.to(device) for c in region_conditions(canvas, region)]
    return model, z, conditions


def measure_in_fresh_process(model_name: str, width: int | None, canvas: int, mode: str, repeats: int, threads: int) -> dict:
    """Runs in a new process: peak RSS and seconds of `repeats` steps (the first one included)."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    model, z, conditions = setup(model_name, width, canvas, device)
    base = current_rss_bytes()
    seconds = time_runs(functools.partial(step, model, z, conditions, canvas, mode), repeats, device)
    return {"peak": peak_rss_bytes(), "base": base, "seconds": seconds}


def measure_cuda(model_name: str, width: int | None, canvas: int, mode: str, repeats: int, device: torch.device) -> dict:
    model, z, conditions = setup(model_name, width, canvas, device)
    try:
        step(model, z, conditions, canvas, mode)  # warm-up: cuDNN's algorithm choice
        base = reset_cuda_peak(device)
        seconds = time_runs(functools.partial(step, model, z, conditions, canvas, mode), repeats, device)
        peak = cuda_peak_bytes(device)
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of GPU memory"}
    finally:
        del model, z, conditions
        torch.cuda.empty_cache()
    return {"peak": peak, "base": base, "seconds": seconds}


def naive_bytes_estimate(model: NeuralFieldAutoencoder, canvas: int) -> float:
    """Rough autograd memory of a whole-canvas render: layout, its copy, and ~8 saved hidden maps."""
    pixels = (canvas + 2 * model.halo) ** 2
    layout_channels = model.config.block_out_channels[0] + 4
    return pixels * 4 * (8 * model.config.renderer_hidden + 2 * layout_channels)


# ---------------------------------------------------------------- gradient check


def gradient_check(model_name: str, width: int | None, device: torch.device, canvas: int = 256, region: int = 48) -> dict:
    model, z, conditions = setup(model_name, width, canvas, device, region)
    # TF32 convolutions (cuDNN's default) differ by ~1e-3 between two ways of tiling the
    # same work; the check compares the maths, so it runs in true fp32.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        regional = step(model, z, conditions, canvas, "region").double()
        naive = step(model, z, conditions, canvas, "naive").double()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    difference = (regional - naive).abs().max().item()
    scale = naive.abs().max().item()
    return {"canvas": canvas, "region": region, "max_abs_difference": difference, "max_abs_gradient": scale, "relative": difference / scale}


# ---------------------------------------------------------------- sweep, goals, table, plot


def run_sweep(args, device: torch.device, console) -> list[dict]:
    rows = []
    probe = build(args.model, torch.device("cpu"), args.width)
    budget = args.naive_budget_gib
    if budget is None and device.type == "cpu":
        budget = DEFAULT_NAIVE_BUDGET_GIB["cpu"]
    for canvas in args.canvases:
        for mode in ("region", "naive"):
            row = {"canvas": canvas, "size": f"{canvas}²", "mode": mode, "model": args.model, "renderer_width": probe.config.renderer_hidden}
            if mode == "naive" and budget is not None and naive_bytes_estimate(probe, canvas) > budget * 2**30:
                row["note"] = f"over {budget:g} GiB"
            elif device.type == "cpu":
                result = run_in_fresh_process(measure_in_fresh_process, args.model, args.width, canvas, mode, args.repeats, torch.get_num_threads(), preload=["infd.inversion"])
                row.update(_row_values(result))
            else:
                row.update(_row_values(measure_cuda(args.model, args.width, canvas, mode, args.repeats, device)))
            rows.append(row)
            console.print(format_progress(row))
    estimate_missing_naive(rows)
    add_ratios(rows)
    return rows


def _row_values(result: dict) -> dict:
    if "error" in result:
        return {"note": result["error"]}
    return {
        "seconds": result["seconds"],
        "median_s": median(result["seconds"]),
        "peak_mib": result["peak"] / MIB,
        "base_mib": result["base"] / MIB,
        "step_mib": (result["peak"] - result["base"]) / MIB,
    }


def estimate_missing_naive(rows: list[dict]) -> None:
    """Fill naive rows that could not run from a least-squares fit a + b * pixels of the measured ones."""
    measured = [(r["canvas"] ** 2, r["step_mib"], r["median_s"]) for r in rows if r["mode"] == "naive" and "step_mib" in r]
    if len(measured) < 2:
        return
    fits = {}
    for key, index in (("step_mib", 1), ("median_s", 2)):
        xs, ys = [m[0] for m in measured], [m[index] for m in measured]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
        fits[key] = (mean_y - slope * mean_x, slope)
    for row in rows:
        if row["mode"] == "naive" and "step_mib" not in row:
            pixels = row["canvas"] ** 2
            for key, (a, b) in fits.items():
                row[key] = a + b * pixels
            row["estimated"] = True
            row["note"] = ", ".join(filter(None, [row.get("note"), "estimated"]))


def add_ratios(rows: list[dict]) -> None:
    regions = {r["canvas"]: r for r in rows if r["mode"] == "region" and "step_mib" in r}
    for row in rows:
        if row["mode"] == "naive" and "step_mib" in row and row["canvas"] in regions:
            region = regions[row["canvas"]]
            row["memory_ratio"] = row["step_mib"] / region["step_mib"]
            row["time_ratio"] = row["median_s"] / region["median_s"]


def check_goals(rows: list[dict], grad: dict) -> list[dict]:
    goals = []
    for row in rows:
        if row["mode"] == "naive" and row["canvas"] in GOALS and "memory_ratio" in row:
            label = f"step memory naive / region at {row['canvas']}²" + (" (naive estimated)" if row.get("estimated") else "")
            target = GOALS[row["canvas"]]
            goals.append(goal(label, row["memory_ratio"], target, "x"))
    goals.append(goal(f"gradient relative difference at {grad['canvas']}²", grad["relative"], 1e-4, lower_is_better=True))
    return goals


def format_progress(row: dict) -> str:
    text = f"  {row['size']:>6} {row['mode']:>6}"
    if "median_s" in row and not row.get("estimated"):
        text += f"  {row['median_s']:8.3f} s/step  +{row['step_mib']:9.1f} MiB (peak {row['peak_mib']:.0f})"
    return text + (f"  ({row['note']})" if row.get("note") else "")  # not [..]: rich would read it as markup


COLUMNS = [
    Column("size", "canvas"),
    Column("mode", "mode", justify="left"),
    Column("renderer_width", "width"),
    Column("median_s", "s / step", lambda v: f"{v:.3f}"),
    Column("step_mib", "step MiB", lambda v: f"{v:,.0f}"),
    Column("peak_mib", "peak MiB", lambda v: f"{v:,.0f}"),
    Column("memory_ratio", "memory naive/region", lambda v: f"{v:.1f}x"),
    Column("time_ratio", "time naive/region", lambda v: f"{v:.1f}x"),
    Column("note", "note", justify="left"),
]


def plot(path: Path, machine: dict, rows: list[dict], settings: dict) -> None:
    def series(key: str) -> list[Series]:
        lines = []
        for mode, color in (("region", "tab:blue"), ("naive", "tab:red")):
            measured = sorted((r["canvas"], r[key]) for r in rows if r["mode"] == mode and key in r and not r.get("estimated"))
            estimated = sorted((r["canvas"], r[key]) for r in rows if r["mode"] == mode and key in r and r.get("estimated"))
            if measured:
                lines.append(Series(f"{mode}", [m[0] for m in measured], [m[1] for m in measured], dict(color=color)))
            if estimated:
                tail = measured[-1:] + estimated
                lines.append(Series(f"{mode} (estimated)", [m[0] for m in tail], [m[1] for m in tail], dict(color=color, linestyle="--", marker="x")))
        return lines

    ticks = {r["canvas"]: f"{r['canvas']}²" for r in rows}
    note = f"{settings['model']} model, renderer width {settings['renderer_width']}; three {REGION}² regions"
    panels = [
        Panel("Memory of one inversion step (above the loaded model)", "canvas", "MiB", series("step_mib"), note=note, xticks=ticks),
        Panel("Time of one inversion step", "canvas", "seconds", series("median_s"), note=note, xticks=ticks),
    ]
    title = f"infd inversion benchmark — {machine.get('gpu') or machine['cpu']}, torch {machine['torch']}, {machine['date'][:10]}"
    plot_panels(path, panels, title)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=tuple(MODELS), help="random model shapes (default: demo on CPU, paper on CUDA)")
    parser.add_argument("--width", type=int, help="renderer hidden width (default: the model's)")
    parser.add_argument("--canvases", help=f"square canvas sides (default {DEFAULT_CANVASES}; 256,512 with --quick)")
    parser.add_argument("--repeats", type=int, default=2, help="steps timed per row (median reported)")
    parser.add_argument("--naive-budget-gib", type=float, help="skip (and estimate) naive rows estimated above this (default 12 on CPU; on CUDA: try)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="tiny model, canvases 256 and 512: a smoke test in seconds")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if args.quick:
        args.model, args.repeats = "quick", 1
        args.canvases = args.canvases or "256,512"
        args.threads = args.threads or 1
    args.model = args.model or DEFAULT_MODEL[args.device]
    args.canvases = args.canvases or DEFAULT_CANVASES
    args.canvases = [parse_size(part)[0] for part in args.canvases.split(",") if part.strip()]
    if min(args.canvases) < REGION:
        parser.error(f"every canvas must be at least the {REGION}² regions it holds")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = BenchmarkRun("inversion", device, "quick" if args.quick else "", args.out)
    console = run.console
    grad = gradient_check(args.model, args.width, device)
    console.print(f"  gradient check at {grad['canvas']}²: max |region - naive| = {grad['max_abs_difference']:.3g} (max |grad| {grad['max_abs_gradient']:.3g})")
    rows = run_sweep(args, device, console)
    goals = check_goals(rows, grad)
    settings = {"model": args.model, "config": MODELS[args.model], "renderer_width": args.width or MODELS[args.model]["renderer_hidden"], "regions": 3, "region": REGION, "repeats": args.repeats}
    run.save(rows, settings=settings, gradient_check=grad, goals=goals)
    plot(run.png_path, run.machine, rows, settings)
    run.table(f"inversion step: region-only vs full canvas then crop ({args.model} model, {device.type})", COLUMNS, rows)
    run.goals(goals)
    run.done()


if __name__ == "__main__":
    main()
