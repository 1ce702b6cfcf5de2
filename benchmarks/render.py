"""Render throughput (megapixels/s) and peak memory vs output size, tiled vs whole, from a latent z.

    python benchmarks/render.py                          # CUDA if present, else CPU
    python benchmarks/render.py --device cpu --sizes 512,1024 --variants fp32-plain,fp32 --no-memory
    python benchmarks/render.py --ckpt runs/ae           # a trained autoencoder instead of a random paper-shaped one
    python benchmarks/render.py --allocator              # the shipped model at 1024² and 2048², allocator tuned vs glibc's
    python benchmarks/render.py --smoke                  # seconds

Details (variants, the CPU memory sweep, goals): benchmarks/README.md.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import types

import torch
import torch.nn.functional as F
from harness import MIB, PAPER_AE, REPO_ROOT, Benchmark, Panel, Table, autoencoder, goal, lines, measure, measure_fresh, parse_sizes, random_latent, size_fields, size_ticks

from infd import system
from infd.models.renderers import CLIFRenderer, query_layout
from infd.rendering import effective_dtype, render

SMOKE_AE = dict(PAPER_AE, input_size=64, block_out_channels=(32, 32, 32), layers_per_block=1, renderer_hidden=16)
SHIPPED_MODEL = REPO_ROOT / "weights" / "demo-ae"
WHOLE_BUDGET_GIB = 8.0  # CPU; CUDA: 60% of the GPU
GOAL_SECONDS_2048, GOAL_MEMORY_RATIO, GOAL_CPU_SPEEDUP = 0.15, 1.2, 1.5  # CUDA 2048² from z; tiled peak 8192²/1024²; CPU vs fp32-plain
BEFORE_2048_S, GOAL_ALLOCATOR_SPEEDUP = 7.3, 2.5  # the shipped model's 2048² fp32 render on the 2-core EPYC before issue 23, and its goal
ALLOCATORS = {"tuned": None, "glibc default": {system.MALLOC_TUNING_ENV: "0"}}


Variant = collections.namedtuple("Variant", "name dtype plain color")  # plain: CLIF in contiguous NCHW, not the library's channels_last
VARIANTS = {v.name: v for v in (Variant("fp32-plain", torch.float32, True, "tab:gray"), Variant("fp32", torch.float32, False, "tab:blue"))}
VARIANTS.update({v.name: v for v in (Variant("bf16", torch.bfloat16, False, "tab:orange"), Variant("fp16", torch.float16, False, "tab:green"))})
# bf16 on a CPU without fast bfloat16 renders in float32 (rendering.effective_dtype): not worth a row.
DEFAULT_VARIANTS = {"cpu": "fp32-plain,fp32" + (",bf16" if system.fast_bf16(torch.device("cpu")) else ""), "cuda": "fp32,bf16,fp16"}
BASELINE = {"cpu": "fp32-plain", "cuda": "fp32"}
COLUMNS = dict(size="size", variant="variant", mode="mode", allocator="allocator", renderer_width="width", median_s="seconds", mpix_per_s="MP/s", speedup="speed-up (x)")
COLUMNS.update(minor_faults="faults/render", peak_mib="peak MiB", increment_mib="+MiB", output_mib="output MiB", note="note")
TABLES = [Table("Render throughput", COLUMNS, "throughput"), Table("Peak memory (CPU: a fresh process per row)", COLUMNS, "memory"), Table("The allocator setting", COLUMNS, "allocator")]


# ---------------------------------------------------------------- one render


def plain_clif_forward(renderer: CLIFRenderer, phi, ys, xs, cell) -> torch.Tensor:
    """CLIFRenderer.forward in contiguous NCHW memory: the plain fp32 baseline."""
    h = renderer.blocks(renderer.conv_in(query_layout(phi, ys, xs, cell).contiguous()))
    return renderer.conv_out(F.silu(h))


@contextlib.contextmanager
def variant_forward(model, variant: Variant):
    """The plain variant swaps `plain_clif_forward` into this model's CLIF renderer for the block."""
    swap = variant.plain and isinstance(model.renderer, CLIFRenderer)
    if swap:
        model.renderer.forward = types.MethodType(plain_clif_forward, model.renderer)
    try:
        yield
    finally:
        if swap:
            del model.renderer.forward


def render_once(model, z: torch.Tensor, size: tuple[int, int], tile: int | None, variant: Variant) -> None:
    """A render into a sink that only counts pixels, so the output buffer costs neither time nor memory."""
    pixels = []
    with variant_forward(model, variant):
        render(model, z, size, tile=tile, dtype=variant.dtype, sink=lambda window, rgb: pixels.append(rgb.shape[0] * window.height * window.width))
    assert sum(pixels) == z.shape[0] * size[0] * size[1], "the sink did not receive every pixel"


def render_setup(spec: dict, size, tile: int | None, variant_name: str):
    """In a fresh process: the model, a 64² warm-up, then `size` (harness.measure_fresh)."""
    model = autoencoder(spec, torch.device("cpu"))
    z, variant = random_latent(model), VARIANTS[variant_name]
    info = {"renderer_width": model.config.renderer_hidden, "allocator_state": system.tune_allocator()}
    return functools.partial(render_once, model, z, size, tile, variant), functools.partial(render_once, model, z, (64, 64), tile, variant), info


def whole_render_bytes(model, size: tuple[int, int], dtype: torch.dtype) -> int:
    """Rough activation memory of an untiled render: the query layout (and a copy) and ~3 hidden maps."""
    pixels = (size[0] + 2 * model.halo) * (size[1] + 2 * model.halo)
    return pixels * (3 * model.config.renderer_hidden * (4 if dtype == torch.float32 else 2) + 8 * (model.config.block_out_channels[0] + 4))


def base_row(section: str, size, variant: Variant, tile: int | None, width: int | None) -> dict:
    mode = "tiled" if tile else "whole"
    return {"section": section, **size_fields(size), "variant": variant.name, "mode": mode, "tile": tile, "renderer_width": width, "output_mib": 12 * size[0] * size[1] / MIB}


def with_rate(row: dict, result: dict) -> dict:
    row.update(result)
    if "median_s" in row:
        row["mpix_per_s"] = row["megapixels"] / row["median_s"]
    return row


def add_speedups(rows: list[dict], baseline: str, key: str = "variant") -> None:
    """speedup = the baseline's seconds / this row's, at the same size and mode."""
    reference = {(r["size"], r["mode"]): r["median_s"] for r in rows if r.get(key) == baseline and "median_s" in r}
    for row in rows:
        if "median_s" in row and (row["size"], row["mode"]) in reference:
            row["speedup"] = reference[(row["size"], row["mode"])] / row["median_s"]


# ---------------------------------------------------------------- the sweeps


def sweeps(bench: Benchmark, args) -> None:
    device = bench.device
    config = dict(SMOKE_AE if args.smoke else PAPER_AE, renderer_hidden=args.width)
    spec = {"ckpt": str(args.ckpt)} if args.ckpt else {"config": config}
    model = autoencoder(spec, device)
    z = random_latent(model)
    budget = args.whole_budget_gib * 2**30 if args.whole_budget_gib else 0.6 * torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else WHOLE_BUDGET_GIB * 2**30
    for variant in args.variants:  # kernels and algorithm choice, once per variant
        render_once(model, z, args.sizes[0], args.tile, variant)

    def throughput(size, tile, variant) -> dict:
        repeats = args.repeats or (1 if device.type == "cpu" and size[0] * size[1] > 0.1e6 else 3)
        result = measure(functools.partial(render_once, model, z, size, tile, variant), device, repeats)
        return dict(result, note="rendered in float32: no fast bfloat16 here") if effective_dtype(device, variant.dtype) != variant.dtype else result

    # CPU peak memory: a fresh process per row, with a narrow renderer so that 8192² finishes.
    memory_spec = spec if args.ckpt else {"config": dict(config, renderer_hidden=args.memory_width)}
    sweeps = [("throughput", args.sizes, model, throughput)]
    if device.type == "cpu" and not args.no_memory:
        probe = autoencoder(memory_spec, torch.device("cpu"))
        sweeps.append(("memory", args.memory_sizes, probe, lambda size, tile, v: measure_fresh(render_setup, memory_spec, size, tile, v.name, preload=["infd.rendering"])))
    for section, sizes, sized_model, run in sweeps:
        for size, tile, variant in itertools.product(sizes, (args.tile,) if args.no_whole else (args.tile, None), args.variants):
            row = base_row(section, size, variant, tile, sized_model.config.renderer_hidden)
            if tile is None and whole_render_bytes(sized_model, size, variant.dtype) > budget:
                bench.add_row(dict(row, note="skipped: over the memory budget"))
            else:
                bench.add_row(with_rate(row, run(size, tile, variant)))
        if section == "throughput":
            add_speedups(bench.rows, BASELINE[device.type])


def allocator_rows(bench: Benchmark, args) -> None:
    """--allocator: the shipped model's float32 renders in fresh processes, with infd's allocator setting and with glibc's defaults."""
    for size in args.sizes:
        for setting, env in ALLOCATORS.items():
            row = dict(base_row("allocator", size, VARIANTS["fp32"], args.tile, None), allocator=setting)
            bench.add_row(with_rate(row, measure_fresh(render_setup, {"ckpt": str(args.ckpt)}, size, args.tile, "fp32", repeats=args.repeats, env=env)))
    add_speedups(bench.rows, "glibc default", "allocator")


# ---------------------------------------------------------------- goals, plot, main


def check_goals(rows: list[dict], device: str, baseline: str) -> list[dict]:
    goals = []
    for r in rows:
        if r["section"] == "throughput" and "median_s" in r:
            if device == "cuda" and r["size"] == "2048²" and r["mode"] == "tiled":
                goals.append(goal(f"2048² from z, {r['variant']}", r["median_s"], GOAL_SECONDS_2048, "s", lower_is_better=True))
            if device == "cpu" and r["variant"] != baseline and "speedup" in r:
                goals.append(goal(f"{r['size']} {r['mode']} {r['variant']} vs {baseline}", r["speedup"], GOAL_CPU_SPEEDUP, "x"))
        if r["section"] == "allocator" and r["size"] == "2048²" and r["allocator"] == "tuned" and "median_s" in r:
            goals.append(goal(f"shipped model 2048² fp32 vs {BEFORE_2048_S} s before", BEFORE_2048_S / r["median_s"], GOAL_ALLOCATOR_SPEEDUP, "x"))
    memory = "throughput" if device == "cuda" else "memory"
    peaks = {(r["variant"], r["size"]): r["peak_mib"] for r in rows if r["section"] == memory and r["mode"] == "tiled" and "peak_mib" in r}
    for variant in dict.fromkeys(v for v, _ in peaks):
        if (variant, "8192²") in peaks and (variant, "1024²") in peaks:
            goals.append(goal(f"tiled peak 8192² / 1024², {variant}", peaks[(variant, "8192²")] / peaks[(variant, "1024²")], GOAL_MEMORY_RATIO, "x", lower_is_better=True))
    return goals


def panels(rows: list[dict], device: str, tile: int) -> list[Panel]:
    if rows and rows[0]["section"] == "allocator":
        styles = {"tuned": dict(color="tab:blue"), "glibc default": dict(color="tab:gray")}
        note = f"{SHIPPED_MODEL.name} (or --ckpt), {tile}² tiles, float32"
        plots = (("Render time from z", "seconds", "median_s", True), ("Minor page faults per render", "faults", "minor_faults", True), ("Peak RSS (fresh process)", "MiB", "peak_mib", False))
        return [Panel(title, "output size", unit, lines(rows, "megapixels", key, "allocator", styles), logy=logy, note=note, xticks=size_ticks(rows)) for title, unit, key, logy in plots]
    styles = {(v.name, mode): dict(color=v.color, linestyle="-" if mode == "tiled" else "--") for v in VARIANTS.values() for mode in ("tiled", "whole")}
    speed = [r for r in rows if r["section"] == "throughput"]
    memory = [r for r in rows if r["section"] == ("throughput" if device == "cuda" else "memory")]
    widths = ", ".join(sorted({str(r["renderer_width"]) for r in memory}))
    output = lines(memory, "megapixels", "output_mib", label="output image, float32 (not held)", color="lightgray", linestyle=":", marker="")
    memory_note = "torch.cuda.max_memory_allocated" if device == "cuda" else f"peak RSS of a fresh process per row; renderer width {widths}"
    rates, peaks = lines(speed, "megapixels", "mpix_per_s", ("variant", "mode"), styles), lines(memory, "megapixels", "peak_mib", ("variant", "mode"), styles)
    return [
        Panel("Render throughput from z (decode phi + all tiles)", "output size", "megapixels / s", rates, note=f"solid: {tile}² tiles, dashed: whole image", xticks=size_ticks(speed)),
        Panel("Peak memory during the render", "output size", "peak MiB", peaks + output, logy=False, note=memory_note, xticks=size_ticks(memory)),
    ]


def main() -> None:
    bench = Benchmark("render", __doc__)
    bench.add("--sizes", help="throughput sizes, e.g. 256,512,2048x1536 (default: up to 2048 on CPU, 8192 on CUDA)")
    bench.add("--variants", help=f"of {', '.join(VARIANTS)} (default: CPU {DEFAULT_VARIANTS['cpu']}; CUDA {DEFAULT_VARIANTS['cuda']})")
    bench.add("--tile", type=int, default=512, help="tile side of the tiled mode")
    bench.add("--width", type=int, default=PAPER_AE["renderer_hidden"], help="renderer width of the random model")
    bench.add("--ckpt", help="an autoencoder (run or checkpoint folder) instead of a random paper-shaped one")
    bench.add("--memory-sizes", default="256,512,1024,2048,4096,8192", help="sizes of the CPU peak-memory sweep")
    bench.add("--memory-width", type=int, default=32, help="renderer width of the CPU peak-memory sweep")
    bench.add("--no-memory", action="store_true", help="skip the CPU peak-memory sweep")
    bench.add("--no-whole", action="store_true", help="only the tiled mode")
    bench.add("--whole-budget-gib", type=float, help="skip whole-image renders estimated above this (default: 8 on CPU, 60%% of the GPU)")
    bench.add("--allocator", action="store_true", help="CPU: the shipped model (or --ckpt) at 1024,2048 in float32, with infd's allocator setting and with glibc's defaults")
    args = bench.parse()
    if args.allocator:
        args.ckpt, args.device = args.ckpt or SHIPPED_MODEL, "cpu"
        args.sizes, args.repeats = parse_sizes(args.sizes or ("256,512" if args.smoke else "1024,2048")), args.repeats or (1 if args.smoke else 3)
    else:
        if args.smoke:
            args.sizes, args.memory_sizes, args.tile, args.repeats, args.width, args.memory_width = "64,128", "128", 64, 1, 16, 8
        args.sizes, args.memory_sizes = parse_sizes(args.sizes or ("256,512,1024,2048" if args.device == "cpu" else "256,512,1024,2048,4096,8192")), parse_sizes(args.memory_sizes)
        names = (args.variants or DEFAULT_VARIANTS[args.device]).split(",")
        if unknown := [v for v in names if v not in VARIANTS]:
            bench.parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        args.variants = [VARIANTS[v] for v in names]
    settings = dict(model=str(args.ckpt or "random, paper-shaped"), tile=args.tile, width=args.width, memory_width=args.memory_width)
    bench.start("render benchmark" + (": the allocator setting" if args.allocator else ""), TABLES, tag="allocator" if args.allocator else None, device=args.device, **settings)
    with bench.interruptible():
        (allocator_rows if args.allocator else sweeps)(bench, args)
    bench.finish(check_goals(bench.rows, bench.device.type, BASELINE[bench.device.type]), panels(bench.rows, bench.device.type, args.tile))


if __name__ == "__main__":
    main()
