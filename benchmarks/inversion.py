"""Inversion step cost: region-only rendering vs decoding the full canvas and cropping.

    python benchmarks/inversion.py                 # CUDA if present (paper-sized model), else CPU (demo-sized)
    python benchmarks/inversion.py --smoke         # seconds

One step: decode phi, render three 224² regions, an L1 loss each, the gradient w.r.t. z;
"region" renders only the boxes, "naive" the whole canvas, then crops. Details: docs/inversion.md.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from harness import PAPER_AE, TINY_AE, Benchmark, Panel, Table, autoencoder, goal, lines, measure, measure_fresh, parse_sizes

from infd.geometry import Box, crop_box
from infd.inversion import condition_losses
from infd.inversion.conditions import Critics, ImageRegion
from infd.rendering import render_prepared

MODELS = {
    "paper": PAPER_AE,
    "demo": dict(input_size=128, latent_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, renderer_hidden=64),
    "smoke": dict(TINY_AE, renderer_hidden=16, renderer_blocks=2),
}
REGION = 224
GOALS = {2048: 10.0, 8192: 50.0}  # canvas side -> least naive / region step memory
COLUMNS = dict(size="canvas", mode="mode", renderer_width="width", median_s="s / step", step_mib="step MiB", peak_mib="peak MiB")
COLUMNS.update(memory_ratio="memory naive/region (x)", time_ratio="time naive/region (x)", note="note")


def region_conditions(canvas: int, region: int = REGION) -> list[ImageRegion]:
    """Three region² boxes on the canvas's diagonal, each with a random target."""
    conditions = []
    for i, fraction in enumerate((0.2, 0.5, 0.8)):
        corner = min(canvas - region, max(0, round(fraction * canvas - region / 2)))
        target = torch.rand(3, region, region, generator=torch.Generator().manual_seed(i))
        conditions.append(ImageRegion(crop_box((canvas, canvas), corner, corner, (region, region)), target))
    return conditions


def step(model, z: torch.Tensor, conditions: list[ImageRegion], canvas: int, mode: str) -> torch.Tensor:
    """One step's forward and backward: the gradient of the summed losses w.r.t. z (naive: the whole canvas rendered, then cropped)."""
    z = z.detach().requires_grad_(True)
    if mode == "region":
        losses = condition_losses(model, z, conditions, Critics(), (canvas, canvas))
    else:
        full = (render_prepared(model, model.prepare_render(z), Box.full(), (canvas, canvas)) + 1) / 2
        crops = [[round(v) for v in c.box.to_pixels((canvas, canvas))] for c in conditions]
        losses = torch.stack([c.loss(full[..., t:b, left:r], Critics()) for c, (t, left, b, r) in zip(conditions, crops, strict=True)])
    return torch.autograd.grad(losses.sum(), [z])[0]


def step_setup(config: dict, canvas: int, mode: str, device_name: str = "cpu", region: int = REGION):
    """The model, z and targets; returns one step (harness.measure_fresh times it, the first included)."""
    device = torch.device(device_name)
    model = autoencoder({"config": config}, device)
    z = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
    return functools.partial(step, model, z, [c.to(device) for c in region_conditions(canvas, region)], canvas, mode)


def gradient_check(config: dict, device: torch.device, canvas: int = 256, region: int = 48) -> dict:
    """Region vs naive gradients on a small canvas, in true fp32 (TF32 convolutions differ by ~1e-3 between two tilings)."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        regional, naive = (step_setup(config, canvas, mode, device.type, region)().double() for mode in ("region", "naive"))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    difference, scale = (regional - naive).abs().max().item(), naive.abs().max().item()
    return {"canvas": canvas, "region": region, "max_abs_difference": difference, "max_abs_gradient": scale, "relative": difference / scale}


def measure_rows(bench: Benchmark, args, config: dict) -> None:
    probe = autoencoder({"config": config}, torch.device("cpu"))
    budget = args.naive_budget_gib if args.naive_budget_gib is not None else 12.0 if bench.device.type == "cpu" else None
    for canvas in args.canvases:
        for mode in ("region", "naive"):
            row = {"canvas": canvas, "size": f"{canvas}²", "mode": mode, "renderer_width": probe.config.renderer_hidden}
            # the naive step's rough autograd memory: the layout, its copy and ~8 saved hidden maps of the whole canvas
            naive_bytes = (canvas + 2 * probe.halo) ** 2 * 4 * (8 * probe.config.renderer_hidden + 2 * (probe.config.block_out_channels[0] + 4))
            if mode == "naive" and budget is not None and naive_bytes > budget * 2**30:
                row["note"] = f"over {budget:g} GiB"
            elif bench.device.type == "cpu":
                row.update(measure_fresh(step_setup, config, canvas, mode, repeats=args.repeats, preload=["infd.inversion"]))
            else:
                try:
                    row.update(measure(step_setup(config, canvas, mode, "cuda"), bench.device, args.repeats))
                except torch.cuda.OutOfMemoryError:
                    row["note"] = "out of GPU memory"
                torch.cuda.empty_cache()
            bench.add_row(dict(row, step_mib=row.get("increment_mib")))
    estimate_missing_naive(bench.rows)
    regions = {r["canvas"]: r for r in bench.rows if r["mode"] == "region" and r.get("step_mib")}
    for row in bench.rows:
        if row["mode"] == "naive" and row.get("step_mib") and row["canvas"] in regions:
            row.update(memory_ratio=row["step_mib"] / regions[row["canvas"]]["step_mib"], time_ratio=row["median_s"] / regions[row["canvas"]]["median_s"])


def estimate_missing_naive(rows: list[dict]) -> None:
    """Naive rows that could not run, from a least-squares fit a + b * pixels of the measured ones (marked "estimated")."""
    measured = [r for r in rows if r["mode"] == "naive" and r.get("step_mib")]
    for row in (r for r in rows if r["mode"] == "naive" and not r.get("step_mib") and len(measured) >= 2):
        for key in ("step_mib", "median_s"):
            row[key] = float(np.polyval(np.polyfit([r["canvas"] ** 2 for r in measured], [r[key] for r in measured], 1), row["canvas"] ** 2))
        row.update(estimated=True, note=", ".join(filter(None, [row.get("note"), "estimated"])))


def main() -> None:
    bench = Benchmark("inversion", __doc__)
    bench.add("--model", choices=tuple(MODELS), help="random model shapes (default: demo on CPU, paper on CUDA)")
    bench.add("--width", type=int, help="renderer width (default: the model's)")
    bench.add("--canvases", help="square canvas sides (default 1024,2048,4096,8192)")
    bench.add("--naive-budget-gib", type=float, help="skip (and estimate) naive rows estimated above this (default 12 on CPU; CUDA: try)")
    args = bench.parse()
    args.model = "smoke" if args.smoke else args.model or ("paper" if args.device == "cuda" else "demo")
    args.canvases = [h for h, _ in parse_sizes(args.canvases or ("256,512" if args.smoke else "1024,2048,4096,8192"))]
    args.repeats = args.repeats or (1 if args.smoke else 2)
    if min(args.canvases) < REGION:
        bench.parser.error(f"every canvas must be at least the {REGION}² regions it holds")
    config = dict(MODELS[args.model], **({"renderer_hidden": args.width} if args.width else {}))
    table = Table(f"Inversion step: region-only vs the full canvas, then crop ({args.model} model)", COLUMNS)
    bench.start("infd inversion benchmark", [table], model=args.model, config=config, regions=3, region=REGION, repeats=args.repeats)
    grad = gradient_check(config, bench.device)
    bench.say(f"  gradient check at {grad['canvas']}²: max |region - naive| = {grad['max_abs_difference']:.3g} (max |grad| {grad['max_abs_gradient']:.3g})")
    bench.save(gradient_check=grad)
    with bench.interruptible():
        measure_rows(bench, args, config)
    ratios = [r for r in bench.rows if r["canvas"] in GOALS and "memory_ratio" in r]
    goals = [goal(f"step memory naive / region at {r['size']}" + (" (naive estimated)" if r.get("estimated") else ""), r["memory_ratio"], GOALS[r["canvas"]], "x") for r in ratios]
    goals.append(goal(f"gradient relative difference at {grad['canvas']}²", grad["relative"], 1e-4, lower_is_better=True))
    styles = {(mode, estimated): dict(color=color, linestyle="--" if estimated else "-") for mode, color in (("region", "tab:blue"), ("naive", "tab:red")) for estimated in (None, True)}
    ticks, note = {r["canvas"]: r["size"] for r in bench.rows}, f"{args.model} model, renderer width {config['renderer_hidden']}; three {REGION}² regions"
    plots = (("Memory of one inversion step (above the loaded model)", "MiB", "step_mib"), ("Time of one inversion step", "seconds", "median_s"))
    bench.finish(goals, [Panel(title, "canvas", unit, lines(bench.rows, "canvas", key, ("mode", "estimated"), styles), note=note, xticks=ticks) for title, unit, key in plots])


if __name__ == "__main__":
    main()
