"""Render throughput (megapixels/s) and peak memory vs output size, tiled vs whole.

    python benchmarks/render.py                          # CUDA if present, else CPU
    python benchmarks/render.py --device cpu --sizes 512,1024 --variants fp32-plain,bf16
    python benchmarks/render.py --ckpt runs/ae           # a trained autoencoder
    python benchmarks/render.py --quick                  # smoke test in seconds
    python benchmarks/render.py --allocator              # the shipped model, 1024² and 2048² fp32, allocator tuned vs not

Each measurement is `infd.rendering.render(model, z, size, tile=..., dtype=...)` from a
latent z: decode phi once, then render every tile. Tiles go to a sink that only counts
pixels, so neither the time nor the memory includes the output buffer (its size is
reported beside them). The model has the paper's shapes (z 3x64x64, phi 128x256x256,
CLIF with 256 hidden channels) and random weights unless --ckpt is given.

Variants: `fp32-plain` is the baseline, CLIF's math in contiguous NCHW fp32 (the
library's CPU path switches to channels_last); `fp32`, `bf16` and `fp16` are the
library's `render` with that dtype (bf16/fp16 under autocast).

On CPU the throughput sweep runs at the real width; peak memory is a separate sweep
(up to 8192²) with a narrow renderer (--memory-width, default 32) so that it finishes,
one fresh process per measurement, reading its peak RSS. On CUDA both come from the
same runs at the real width (torch.cuda.max_memory_allocated).

`--allocator` (CPU): the shipped model (weights/demo-ae, or --ckpt) at 1024² and 2048² in
float32, each size once with infd's allocator setting (`infd.system.tune_allocator`) and once
with glibc's defaults (INFD_MALLOC_TUNING=0), each in a fresh process: seconds (median of
--repeats), minor page faults per render and peak RSS.

Results: a table, benchmarks/results/render-<device>.json and .png
(render-cpu-allocator.* for --allocator).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    MIB,
    REPO_ROOT,
    BenchmarkRun,
    Column,
    Panel,
    Series,
    cuda_peak_bytes,
    current_rss_bytes,
    goal,
    median,
    minor_faults,
    peak_rss_bytes,
    plot_panels,
    reset_cuda_peak,
    run_in_fresh_process,
    time_runs,
)

from infd import system
from infd.geometry import Window, parse_size
from infd.models import NeuralFieldAutoencoder
from infd.models.renderers import CLIFRenderer, query_layout
from infd.rendering import effective_dtype, render
from infd.store import load_autoencoder

# The paper's autoencoder: 256² input -> z 3x64x64 -> phi 128x256x256 -> CLIF, width 256.
PAPER_MODEL = dict(
    input_size=256,
    latent_channels=3,
    block_out_channels=(128, 256, 256),
    layers_per_block=2,
    renderer_type="clif",
    renderer_hidden=256,
    renderer_blocks=2,
)
QUICK_MODEL = dict(PAPER_MODEL, input_size=64, block_out_channels=(32, 32, 32), layers_per_block=1, renderer_hidden=16)

DEFAULT_SIZES = {"cpu": "256,512,1024,2048", "cuda": "256,512,1024,2048,4096,8192"}
MEMORY_SIZES = "256,512,1024,2048,4096,8192"
WHOLE_BUDGET_GIB = {"cpu": 8.0, "cuda": None}  # None: 60% of the GPU's memory
GOAL_SECONDS_2048 = 0.15  # CUDA: 2048² from z
GOAL_MEMORY_RATIO = 1.2  # tiled peak at 8192² / at 1024²
GOAL_CPU_SPEEDUP = 1.5  # best variant vs fp32-plain


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: torch.dtype
    plain: bool = False  # CLIF in contiguous NCHW instead of the library's channels_last layout
    color: str = "black"


VARIANTS = {
    v.name: v
    for v in (
        Variant("fp32-plain", torch.float32, plain=True, color="tab:gray"),
        Variant("fp32", torch.float32, color="tab:blue"),
        Variant("bf16", torch.bfloat16, color="tab:orange"),
        Variant("fp16", torch.float16, color="tab:green"),
    )
}
# bf16 on a CPU without fast bfloat16 renders in float32 (rendering.effective_dtype): not worth a row.
DEFAULT_VARIANTS = {"cpu": "fp32-plain,fp32" + (",bf16" if system.fast_bf16(torch.device("cpu")) else ""), "cuda": "fp32,bf16,fp16"}
BASELINE = {"cpu": "fp32-plain", "cuda": "fp32"}


# ---------------------------------------------------------------- model and variants


def plain_clif_forward(renderer: CLIFRenderer, phi: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """CLIFRenderer.forward in contiguous NCHW memory: the plain fp32 baseline."""
    layout = query_layout(phi, ys, xs, cell).contiguous()  # (B, C + 4, H, W), NCHW
    h = renderer.blocks(renderer.conv_in(layout))
    return renderer.conv_out(F.silu(h))


@contextlib.contextmanager
def variant_forward(model: NeuralFieldAutoencoder, variant: Variant):
    """Swap `plain_clif_forward` into this model's renderer instance for the plain variant (CLIF only; other renderers run as they are)."""
    renderer = model.renderer
    swap = variant.plain and isinstance(renderer, CLIFRenderer)
    if swap:
        renderer.forward = types.MethodType(plain_clif_forward, renderer)
    try:
        yield
    finally:
        if swap:
            del renderer.forward


def build_model(spec: dict, device: torch.device) -> NeuralFieldAutoencoder:
    """spec: {"ckpt": path} or {"config": NeuralFieldAutoencoder keyword arguments} (random weights)."""
    if spec.get("ckpt"):
        return load_autoencoder(spec["ckpt"], device)
    torch.manual_seed(0)
    return NeuralFieldAutoencoder(**spec["config"]).to(device).eval()


def random_latent(model: NeuralFieldAutoencoder) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, *model.latent_shape, generator=generator).to(next(model.parameters()).device)


class CountingSink:
    """A render sink that drops tiles and counts their pixels (so the output costs nothing)."""

    def __init__(self) -> None:
        self.pixels = 0

    def __call__(self, window: Window, tile: torch.Tensor) -> None:
        self.pixels += tile.shape[0] * window.height * window.width


def render_once(model: NeuralFieldAutoencoder, z: torch.Tensor, size: tuple[int, int], tile: int | None, variant: Variant) -> None:
    sink = CountingSink()
    with variant_forward(model, variant):
        render(model, z, size, tile=tile, dtype=variant.dtype, sink=sink)
    assert sink.pixels == z.shape[0] * size[0] * size[1], "the sink did not receive every pixel"


def whole_render_bytes(model: NeuralFieldAutoencoder, size: tuple[int, int], dtype: torch.dtype) -> int:
    """Rough activation memory of an untiled render: query layout (+ a copy) and ~3 hidden maps."""
    pixels = (size[0] + 2 * model.halo) * (size[1] + 2 * model.halo)
    element = 4 if dtype == torch.float32 else 2
    layout_channels = model.config.block_out_channels[0] + 4
    return pixels * (3 * model.config.renderer_hidden * element + 2 * 4 * layout_channels)


def whole_fits(model: NeuralFieldAutoencoder, budget: float, size: tuple[int, int], variant: Variant) -> bool:
    return whole_render_bytes(model, size, variant.dtype) <= budget


def whole_budget_bytes(device: torch.device, budget_gib: float | None) -> float:
    if budget_gib is not None:
        return budget_gib * 2**30
    if device.type == "cuda":
        return 0.6 * torch.cuda.get_device_properties(device).total_memory
    return WHOLE_BUDGET_GIB["cpu"] * 2**30


# ---------------------------------------------------------------- measurements


def base_row(size: tuple[int, int], variant: Variant, tile: int | None, width: int) -> dict:
    h, w = size
    return {
        "size": f"{w}x{h}",
        "height": h,
        "width": w,
        "megapixels": h * w / 1e6,
        "variant": variant.name,
        "mode": "tiled" if tile else "whole",
        "tile": tile,
        "renderer_width": width,
        "output_mib": 3 * 4 * h * w / MIB,  # the float32 result a non-sink render returns
    }


def measure_throughput(model, z, size, tile, variant, repeats, device) -> dict:
    """Median seconds of `repeats` renders from z; on CUDA also the peak allocated memory."""
    row = base_row(size, variant, tile, model.config.renderer_hidden)
    run = functools.partial(render_once, model, z, size, tile, variant)
    if device.type == "cuda":
        run()  # per-shape warm-up (cuDNN algorithm choice); cheap on a GPU
        base = reset_cuda_peak(device)
    seconds = time_runs(run, repeats, device)
    row.update(seconds=seconds, median_s=median(seconds), mpix_per_s=row["megapixels"] / median(seconds))
    if effective_dtype(device, variant.dtype) != variant.dtype:
        row["note"] = "rendered in float32: no fast bfloat16 here"
    if device.type == "cuda":
        peak = cuda_peak_bytes(device)
        row.update(peak_mib=peak / MIB, base_mib=base / MIB, increment_mib=(peak - base) / MIB)
    return row


def peak_rss_of_render(spec: dict, size: tuple[int, int], tile: int | None, variant_name: str, threads: int) -> dict:
    """Runs in a fresh process: build the model, warm up, then one render; peak RSS in bytes.

    The increment (peak - RSS after warm-up) is what the render itself added.
    """
    torch.set_num_threads(threads)
    variant = VARIANTS[variant_name]
    model = build_model(spec, torch.device("cpu"))
    z = random_latent(model)
    render_once(model, z, (64, 64), tile, variant)
    base = current_rss_bytes()
    seconds = time_runs(functools.partial(render_once, model, z, size, tile, variant), 1, torch.device("cpu"))[0]
    return {"peak": peak_rss_bytes(), "base": base, "seconds": seconds}


def measure_memory_cpu(spec: dict, width: int, size, tile, variant: Variant) -> dict:
    row = base_row(size, variant, tile, width)
    result = run_in_fresh_process(peak_rss_of_render, spec, size, tile, variant.name, torch.get_num_threads(), preload=["infd.rendering"])
    if "error" in result:
        return dict(row, note=result["error"])
    return dict(
        row,
        seconds=[result["seconds"]],
        peak_mib=result["peak"] / MIB,
        base_mib=result["base"] / MIB,
        increment_mib=(result["peak"] - result["base"]) / MIB,
    )


def add_speedups(rows: list[dict], baseline: str) -> None:
    """speedup = baseline seconds / this row's seconds, at the same size and tile mode."""
    reference = {(r["size"], r["mode"]): r["median_s"] for r in rows if r["variant"] == baseline and "median_s" in r}
    for row in rows:
        key = (row["size"], row["mode"])
        if "median_s" in row and key in reference:
            row["speedup"] = reference[key] / row["median_s"]


def sweep(rows: list[dict], sizes, variants, tiles, width, measure, fits, console, on_row) -> None:
    """Append a row for every size x tile mode x variant, variants back to back.

    Whole-image renders (tile None) run only where `fits(size, variant)`.
    """
    for size in sizes:
        for mode_tile in tiles:
            for variant in variants:
                if mode_tile is None and not fits(size, variant):
                    row = dict(base_row(size, variant, None, width), note="skipped: over the memory budget")
                else:
                    row = measure(size, mode_tile, variant)
                rows.append(row)
                console.print(format_progress(row))
                on_row()


def format_progress(row: dict) -> str:
    text = f"  {row['size']:>10} {row['variant']:>10} {row['mode']:>5}"
    if "median_s" in row:
        text += f"  {row['median_s']:8.3f} s  {row['mpix_per_s']:8.3f} MP/s"
    if "peak_mib" in row:
        text += f"  peak {row['peak_mib']:8.1f} MiB ({row['increment_mib']:+.1f})"
    return text + (f"  [{row['note']}]" if row.get("note") else "")


# ---------------------------------------------------------------- goals, table, plot


def check_goals(device: torch.device, throughput: list[dict], memory: list[dict], baseline: str) -> list[dict]:
    goals = []
    for row in throughput:
        if device.type == "cuda" and row["size"] == "2048x2048" and row["mode"] == "tiled" and "median_s" in row:
            goals.append(goal(f"2048² from z, {row['variant']}", row["median_s"], GOAL_SECONDS_2048, "s", lower_is_better=True))
        if device.type == "cpu" and row["variant"] != baseline and "speedup" in row:
            goals.append(goal(f"{row['size']} {row['mode']} {row['variant']} vs {baseline}", row["speedup"], GOAL_CPU_SPEEDUP, "x"))
    peaks = {(r["variant"], r["size"]): r["peak_mib"] for r in memory if r["mode"] == "tiled" and "peak_mib" in r}
    for variant in dict.fromkeys(v for v, _ in peaks):
        if (variant, "8192x8192") in peaks and (variant, "1024x1024") in peaks:
            ratio = peaks[(variant, "8192x8192")] / peaks[(variant, "1024x1024")]
            goals.append(goal(f"tiled peak 8192² / 1024², {variant}", ratio, GOAL_MEMORY_RATIO, "x", lower_is_better=True))
    return goals


COLUMNS = [
    Column("size", "size"),
    Column("variant", "variant"),
    Column("mode", "mode"),
    Column("allocator", "allocator", justify="left"),
    Column("renderer_width", "width"),
    Column("median_s", "seconds", lambda v: f"{v:.3f}"),
    Column("mpix_per_s", "MP/s", lambda v: f"{v:.3f}"),
    Column("speedup", "speedup", lambda v: f"{v:.2f}x"),
    Column("minor_faults", "faults/render", lambda v: f"{v:,.0f}"),
    Column("peak_mib", "peak MiB", lambda v: f"{v:.0f}"),
    Column("increment_mib", "+MiB", lambda v: f"{v:+.0f}"),
    Column("output_mib", "output MiB", lambda v: f"{v:.3g}"),
    Column("note", "note", justify="left"),
]


def series_by_variant(rows: list[dict], key: str) -> list[Series]:
    """One line per (variant, mode): solid tiled, dashed whole."""
    lines = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        for mode, linestyle in (("tiled", "-"), ("whole", "--")):
            points = sorted((r["megapixels"], r[key]) for r in rows if r["variant"] == name and r["mode"] == mode and key in r)
            if points:
                style = dict(color=VARIANTS[name].color, linestyle=linestyle)
                lines.append(Series(f"{name} {mode}", [p[0] for p in points], [p[1] for p in points], style))
    return lines


def size_ticks(rows: list[dict]) -> dict[float, str]:
    """x ticks at the measured sizes: "1024²" for squares, "2048x1536" otherwise."""
    return {r["megapixels"]: f"{r['width']}²" if r["width"] == r["height"] else r["size"] for r in rows}


def plot(path: Path, machine: dict, throughput: list[dict], memory: list[dict], tile: int, memory_note: str) -> None:
    widths = sorted({r["renderer_width"] for r in throughput if "mpix_per_s" in r})
    speed = Panel(
        "Render throughput from z (decode phi + all tiles)",
        "output size",
        "megapixels / s",
        series_by_variant(throughput, "mpix_per_s"),
        note=f"renderer width {', '.join(map(str, widths))}; solid: {tile}² tiles, dashed: whole image",
        xticks=size_ticks(throughput),
    )
    sizes = sorted({(r["megapixels"], r["output_mib"]) for r in memory})
    reference = Series("output image, float32 (not held)", [s[0] for s in sizes], [s[1] for s in sizes], dict(color="lightgray", linestyle=":", marker=""))
    peak = Panel(
        "Peak memory during the render",
        "output size",
        "peak MiB",
        [*series_by_variant(memory, "peak_mib"), reference],
        logy=False,
        note=memory_note,
        xticks=size_ticks(memory),
    )
    title = f"infd render benchmark — {machine.get('gpu') or machine['cpu']}, torch {machine['torch']}, {machine['date'][:10]}"
    plot_panels(path, [speed, peak], title)


# ---------------------------------------------------------------- the allocator setting (CPU, the shipped model)

SHIPPED_MODEL = REPO_ROOT / "weights" / "demo-ae"
ALLOCATOR_SIZES = "1024,2048"
BEFORE_2048_S = 7.3  # the shipped model's 2048² float32 render on the 2-core EPYC before the allocator setting
GOAL_ALLOCATOR_SPEEDUP = 2.5  # issue 23: that render at least 2.5x faster
ALLOCATOR_SETTINGS = {"tuned": {}, "glibc default": {system.MALLOC_TUNING_ENV: "0"}}


def render_in_this_process(ckpt: str, size: tuple[int, int], tile: int, repeats: int, threads: int) -> dict:
    """Runs in a fresh process (with or without INFD_MALLOC_TUNING=0 from its start): float32 renders of `size`.

    Returns seconds per render, minor page faults per render, peak and base RSS (bytes)
    and the allocator's state as `infd.system` saw it.
    """
    torch.set_num_threads(threads)
    model = build_model({"ckpt": ckpt}, torch.device("cpu"))
    z = random_latent(model)
    variant = VARIANTS["fp32"]
    render_once(model, z, (tile, tile), tile, variant)  # kernels; one tile's buffers
    base, faults = current_rss_bytes(), minor_faults()
    seconds = time_runs(functools.partial(render_once, model, z, size, tile, variant), repeats, torch.device("cpu"))
    width = model.config.renderer_hidden
    return {"seconds": seconds, "faults": (minor_faults() - faults) / repeats, "peak": peak_rss_bytes(), "base": base, "allocator": system.tune_allocator(), "width": width}


def measure_allocator(ckpt: str, sizes, tile: int, repeats: int, console, on_row) -> list[dict]:
    """One row per size x allocator setting, the settings back to back (each in its own fresh process)."""
    rows = []
    for size in sizes:
        for setting, env in ALLOCATOR_SETTINGS.items():
            row = dict(base_row(size, VARIANTS["fp32"], tile, None), allocator=setting)
            result = run_in_fresh_process(render_in_this_process, ckpt, size, tile, repeats, torch.get_num_threads(), env=env)
            if "error" in result:
                row["note"] = result["error"]
            else:
                row.update(
                    seconds=result["seconds"],
                    median_s=median(result["seconds"]),
                    mpix_per_s=row["megapixels"] / median(result["seconds"]),
                    minor_faults=result["faults"],
                    peak_mib=result["peak"] / MIB,
                    increment_mib=(result["peak"] - result["base"]) / MIB,
                    allocator_state=result["allocator"],
                    renderer_width=result["width"],
                )
            rows.append(row)
            console.print(format_progress(row) + f"  {setting}")
            on_row(rows)
    reference = {r["size"]: r["median_s"] for r in rows if r["allocator"] == "glibc default" and "median_s" in r}
    for row in rows:
        if row["size"] in reference and "median_s" in row:
            row["speedup"] = reference[row["size"]] / row["median_s"]
    return rows


def allocator_goals(rows: list[dict]) -> list[dict]:
    goals = []
    for row in rows:
        if row["size"] == "2048x2048" and row["allocator"] == "tuned" and "median_s" in row:
            goals.append(goal(f"shipped model 2048² fp32 vs {BEFORE_2048_S} s before", BEFORE_2048_S / row["median_s"], GOAL_ALLOCATOR_SPEEDUP, "x"))
    return goals


def plot_allocator(path: Path, machine: dict, rows: list[dict], model_name: str) -> None:
    colors = {"tuned": "tab:blue", "glibc default": "tab:gray"}

    def series(key: str) -> list[Series]:
        lines = []
        for setting, color in colors.items():
            points = sorted((r["megapixels"], r[key]) for r in rows if r["allocator"] == setting and key in r)
            lines.append(Series(setting, [p[0] for p in points], [p[1] for p in points], dict(color=color)))
        return lines

    panels = [
        Panel("Render time from z, float32", "output size", "seconds", series("median_s"), note=model_name, xticks=size_ticks(rows)),
        Panel("Minor page faults per render", "output size", "faults", series("minor_faults"), xticks=size_ticks(rows)),
        Panel("Peak RSS (fresh process)", "output size", "MiB", series("peak_mib"), logy=False, xticks=size_ticks(rows)),
    ]
    cores = machine["cpu_affinity"] or machine["cpu_count"]
    title = f"infd render: the allocator setting — {machine['cpu']} ({' '.join(machine['cpu_flags'])}), {cores} cores, torch {machine['torch']}, {machine['date'][:10]}"
    plot_panels(path, panels, title)


def main_allocator(args: argparse.Namespace) -> None:
    """--allocator: the shipped model's float32 renders with and without infd's allocator setting."""
    ckpt = str(args.ckpt or SHIPPED_MODEL)
    run = BenchmarkRun("render", torch.device("cpu"), "allocator" + ("-quick" if args.quick else ""), args.out, "render benchmark: the allocator setting")
    settings = dict(model={"ckpt": ckpt}, tile=args.tile, repeats=args.repeats, quick=args.quick, environments={k: v or "infd's (default)" for k, v in ALLOCATOR_SETTINGS.items()})
    rows = measure_allocator(ckpt, args.sizes, args.tile, args.repeats, run.console, lambda rows: run.save(rows, settings=settings))
    goals = allocator_goals(rows) if not args.quick else []
    run.table(f"The allocator setting — {run.machine_name}, {Path(ckpt).name}, float32, {args.tile}² tiles", COLUMNS, rows)
    run.goals(goals)
    run.save(rows, settings=settings, goals=goals)
    plot_allocator(run.png_path, run.machine, rows, f"{Path(ckpt).name}, {args.tile}² tiles, median of {args.repeats}")
    run.done()


# ---------------------------------------------------------------- main


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", help="throughput sizes, e.g. 256,512,2048x1536 (default: up to 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS)} (default: CPU {DEFAULT_VARIANTS['cpu']}; CUDA {DEFAULT_VARIANTS['cuda']})")
    parser.add_argument("--tile", type=int, default=512, help="tile side for the tiled mode")
    parser.add_argument("--repeats", type=int, help="timed runs per row, median reported (default 3; 1 on CPU from 512²)")
    parser.add_argument("--width", type=int, default=PAPER_MODEL["renderer_hidden"], help="renderer hidden width (random model)")
    parser.add_argument("--ckpt", help="benchmark this autoencoder (run or checkpoint folder) instead of a random paper-shaped one")
    parser.add_argument("--memory-sizes", default=MEMORY_SIZES, help="CPU peak-memory sweep sizes")
    parser.add_argument("--memory-width", type=int, default=32, help="renderer width of the CPU peak-memory sweep")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory sweep")
    parser.add_argument("--no-whole", action="store_true", help="only the tiled mode")
    parser.add_argument("--whole-budget-gib", type=float, help="skip whole-image renders estimated above this (default: 8 on CPU, 60%% of the GPU)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="set torch.backends.cudnn.benchmark")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 with --quick)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke test in seconds")
    parser.add_argument("--allocator", action="store_true", help=f"CPU: the shipped model (or --ckpt) at {ALLOCATOR_SIZES} in float32, with infd's allocator setting and with glibc's defaults")
    args = parser.parse_args()
    if args.allocator:  # the CPU's allocator, whatever --device says
        args.device = "cpu"
        args.sizes = parse_sizes(args.sizes or ("256,512" if args.quick else ALLOCATOR_SIZES))
        args.repeats = args.repeats or (1 if args.quick else 3)
        return args
    if args.quick:
        args.sizes, args.memory_sizes, args.tile, args.repeats = "64,128", "64,256", 64, 1
        args.width, args.memory_width = QUICK_MODEL["renderer_hidden"], 8
        # Tiny ops on a busy machine spend most of their time in OpenMP barriers.
        args.threads = args.threads or 1
    args.sizes = parse_sizes(args.sizes or DEFAULT_SIZES[args.device])
    args.memory_sizes = parse_sizes(args.memory_sizes)
    unknown = [v for v in (args.variants or DEFAULT_VARIANTS[args.device]).split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.variants = [VARIANTS[v] for v in (args.variants or DEFAULT_VARIANTS[args.device]).split(",")]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return args


def main() -> None:
    args = parse_args()
    if args.allocator:
        return main_allocator(args)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    run = BenchmarkRun("render", device, "quick" if args.quick else "", args.out)
    console = run.console

    config = dict(QUICK_MODEL if args.quick else PAPER_MODEL, renderer_hidden=args.width)
    spec = {"ckpt": args.ckpt} if args.ckpt else {"config": config}
    model = build_model(spec, device)
    z = random_latent(model)
    width = model.config.renderer_hidden
    budget = whole_budget_bytes(device, args.whole_budget_gib)
    tiles = (args.tile,) if args.no_whole else (args.tile, None)
    settings = dict(
        model=spec,
        latent_shape=list(model.latent_shape),
        feature_shape=list(model.feature_shape),
        tile=args.tile,
        whole_budget_gib=budget / 2**30,
        memory_width=args.memory_width if device.type == "cpu" else width,
    )
    throughput, memory = [], []

    def save() -> None:  # after every row, so an interrupted run keeps what it measured
        run.save(throughput + memory, settings=settings)

    for variant in args.variants:  # load kernels / pick algorithms once per variant
        render_once(model, z, args.sizes[0], args.tile, variant)

    def measure(size, tile, variant) -> dict:
        repeats = args.repeats or (1 if device.type == "cpu" and size[0] * size[1] > 0.1e6 else 3)
        return dict(measure_throughput(model, z, size, tile, variant, repeats, device), sweep="throughput")

    console.print(f"throughput (renderer width {width}, tile {args.tile}):")
    sweep(throughput, args.sizes, args.variants, tiles, width, measure, functools.partial(whole_fits, model, budget), console, save)
    add_speedups(throughput, BASELINE[device.type])

    if device.type == "cuda":
        memory_rows, memory_note = throughput, f"torch.cuda.max_memory_allocated; renderer width {width}"
    elif args.no_memory:
        memory_rows, memory_note = [], "not measured (--no-memory)"
    else:
        memory_width = width if args.ckpt else args.memory_width
        memory_spec = spec if args.ckpt else {"config": dict(config, renderer_hidden=memory_width)}
        fits = functools.partial(whole_fits, build_model(memory_spec, torch.device("cpu")), budget)

        def measure_memory(size, tile, variant) -> dict:
            return dict(measure_memory_cpu(memory_spec, memory_width, size, tile, variant), sweep="memory")

        console.print(f"peak memory (fresh process per row, renderer width {memory_width}):")
        sweep(memory, args.memory_sizes, args.variants, tiles, memory_width, measure_memory, fits, console, save)
        memory_rows, memory_note = memory, f"peak RSS of a fresh process; renderer width {memory_width}, not {width}"

    goals = check_goals(device, throughput, memory_rows, BASELINE[device.type])
    run.table(f"Render throughput — {run.machine_name}", COLUMNS, throughput)
    if memory:
        run.table(f"Peak memory (CPU, fresh process per row, width {memory[0]['renderer_width']})", COLUMNS, memory)
    run.goals(goals)
    run.save(throughput + memory, settings=settings, goals=goals)
    plot(run.png_path, run.machine, throughput, memory_rows, args.tile, memory_note)
    run.done()


if __name__ == "__main__":
    main()
