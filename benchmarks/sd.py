"""Decoding Stable Diffusion latents at 2048² and 4096²: SD's VAE vs the converted neural field.

    PYTHONPATH=. python3 benchmarks/sd.py --device cuda          # SD-1.5-sized models, ~1-2 minutes
    PYTHONPATH=. python3 benchmarks/sd.py --device cuda --quick  # 2048² only, bf16
    PYTHONPATH=. python3 benchmarks/sd.py --quick                # CPU: tiny models, seconds

SD's VAE reaches an N² image only by decoding an (N/8)² latent (256x256 for 2048²): its
decoder, mid-block attention included, runs at the output size. The converted model
(`infd.stable_diffusion.convert.convert_autoencoder`) decodes SD's native 64x64 latent once to phi
(128x512x512) and renders the output tile by tile with CLIF. Both models are random-
initialised from the SD-1.5 VAE config (block_out_channels 128,256,512,512, 2 layers per
block, 4 latent channels; no weights are needed to time them); CLIF has --renderer-hidden
channels (default 128, what `infd convert-vae` builds). Each row: time from latent to the
image in CPU memory, and peak memory (CUDA: torch.cuda.max_memory_allocated, weights
included; CPU: peak RSS of a fresh process). On CUDA the allocator is capped at
--memory-cap-gib (default 80, an 80 GB GPU, even on a larger one), so an out-of-memory
is an error caught and reported, never an oversubscribed (managed-memory) crawl.
`--train-batch B` adds one finetuning step (encoder frozen, 512² input, 256² crops)
to size the batch of configs/ae-sd-finetune.json.

Results: a table, benchmarks/results/sd-<device>[-quick].json and .png.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
from common import MIB, BenchmarkRun, Column, Panel, Series, cuda_peak_bytes, current_rss_bytes, goal, median, peak_rss_bytes, plot_panels, reset_cuda_peak, run_in_fresh_process, time_runs
from diffusers import AutoencoderKL

from infd import geometry
from infd.rendering import render
from infd.stable_diffusion.convert import CONVERTED_RENDERER_HIDDEN, convert_autoencoder

SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
TINY_VAE = dict(SD15_VAE, block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, sample_size=64)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DECODERS = ("sd-vae", "infd")
GOAL_MEMORY_RATIO = 4.0  # SD VAE peak / infd peak at 4x the native size (2048² for SD)
GOAL_SPEEDUP = 2.0


# ---------------------------------------------------------------- models and one decode


@functools.lru_cache(maxsize=1)
def build(decoder: str, spec_key: tuple, device_name: str):
    """The random SD-shaped VAE, or its conversion (same weights), on `device`; one cached at a time."""
    spec = dict(spec_key)
    torch.manual_seed(0)
    vae = AutoencoderKL(**dict(spec["vae"])).eval()
    model = vae if decoder == "sd-vae" else convert_autoencoder(vae, renderer_hidden=spec["renderer_hidden"])
    return model.to(torch.device(device_name)).requires_grad_(False)


def decode_fn(decoder: str, model, side: int, tile: int, dtype: torch.dtype | None, device: torch.device):
    """A callable producing one side² image on the CPU from a random latent, the way each decoder must."""
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    native = model.config.sample_size if decoder == "sd-vae" else model.config.input_size
    generator = torch.Generator().manual_seed(0)
    if decoder == "sd-vae":
        z = torch.randn(1, model.config.latent_channels, side // factor, side // factor, generator=generator).to(device)

        def run():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return model.decode(z).sample.float().cpu()

        return run
    z = torch.randn(1, *model.latent_shape, generator=generator).to(device)
    assert model.latent_shape[1] == native // factor
    return lambda: render(model, z, (side, side), tile=tile, dtype=dtype)


def row_base(decoder: str, side: int, dtype_name: str, model) -> dict:
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    latent = side // factor if decoder == "sd-vae" else model.latent_shape[1]
    return {"decoder": decoder, "size": side, "dtype": dtype_name, "latent": f"{latent}x{latent}"}


def measure_cuda(decoder: str, spec_key: tuple, side: int, tile: int, dtype_name: str, repeats: int) -> dict:
    device = torch.device("cuda")
    model = build(decoder, spec_key, "cuda")
    row = row_base(decoder, side, dtype_name, model)
    try:
        run = decode_fn(decoder, model, side, tile, DTYPES[dtype_name], device)
        run()  # warm-up: cuDNN algorithms, allocator
        base = reset_cuda_peak(device)
        seconds = time_runs(run, repeats, device)
        peak = cuda_peak_bytes(device)
        row.update(seconds=seconds, median_s=median(seconds), peak_mib=peak / MIB, increment_mib=(peak - base) / MIB)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except RuntimeError as error:  # e.g. a kernel refusing tensors of more than 2^31 elements
        row["error"] = "failed: " + (str(error).splitlines() or ["RuntimeError"])[0][:120]
    finally:
        torch.cuda.empty_cache()
    return row


def measure_cpu_in_fresh_process(decoder: str, spec_key: tuple, side: int, tile: int, dtype_name: str, threads: int) -> dict:
    """Runs in a fresh process (peak RSS only grows): build, warm up small, one timed decode."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    model = build(decoder, spec_key, "cpu")
    row = row_base(decoder, side, dtype_name, model)
    decode_fn(decoder, model, 64, tile, DTYPES[dtype_name], device)()
    base = current_rss_bytes()
    seconds = time_runs(decode_fn(decoder, model, side, tile, DTYPES[dtype_name], device), 1, device)
    peak = peak_rss_bytes()
    return dict(row, seconds=seconds, median_s=seconds[0], peak_mib=peak / MIB, increment_mib=(peak - base) / MIB)


def measure_cpu(decoder: str, spec_key: tuple, side: int, tile: int, dtype_name: str) -> dict:
    result = run_in_fresh_process(measure_cpu_in_fresh_process, decoder, spec_key, side, tile, dtype_name, torch.get_num_threads(), preload=["infd.rendering"])
    if "decoder" not in result:
        return {"decoder": decoder, "size": side, "dtype": dtype_name, "error": result["error"]}
    return result


def measure_finetune_step(spec_key: tuple, batch: int, device: torch.device, dtype_name: str) -> dict:
    """One generator step of finetuning (L1 only, encoder frozen): time and peak memory.

    Not included: Adam's moments (8 bytes per trainable weight, about 0.5 GB for SD's
    trunk), the discriminator and LPIPS.
    """
    model = build("infd", spec_key, device.type)
    model.requires_grad_(True).encoder.requires_grad_(False)
    model.quant_conv.requires_grad_(False)
    s, crop = model.config.input_size, 256
    box = geometry.crop_box((2 * s, 2 * s), s // 2, s // 2, (crop, crop))  # a crop of the image at twice the input size
    ys, xs = geometry.window_centers(box, (crop, crop), halo=model.halo)
    cell = torch.tensor(geometry.cell_size(box, (crop, crop)), dtype=torch.float64).expand(batch, 2)
    x = torch.rand(batch, 3, s, s, device=device) * 2 - 1
    target = torch.rand(batch, 3, crop, crop, device=device) * 2 - 1
    dtype = DTYPES[dtype_name]

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            pred = model(x, ys.expand(batch, -1), xs.expand(batch, -1), cell)["pred"]
        (pred.float() - target).abs().mean().backward()
        model.zero_grad(set_to_none=True)

    row = {"decoder": f"infd finetune step, batch {batch}", "size": crop, "dtype": dtype_name, "latent": f"{model.latent_shape[1]}x{model.latent_shape[2]}"}
    try:
        step()
        if device.type == "cuda":
            reset_cuda_peak(device)
        seconds = time_runs(step, 1, device)
        row.update(seconds=seconds, median_s=seconds[0])
        if device.type == "cuda":
            row["peak_mib"] = cuda_peak_bytes(device) / MIB
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except RuntimeError as error:
        row["error"] = "failed: " + (str(error).splitlines() or ["RuntimeError"])[0][:120]
    finally:
        model.requires_grad_(False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------- goals, table, plot


def check_goals(rows: list[dict], native: int, device: torch.device) -> list[dict]:
    """Memory: CUDA compares peaks (weights included); CPU the increments over each process's
    start (imports alone are hundreds of MiB, more than tiny models use)."""
    memory = "peak_mib" if device.type == "cuda" else "increment_mib"
    goals = []
    by_key = {(r["decoder"], r["size"], r["dtype"]): r for r in rows}
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sd, infd = by_key.get(("sd-vae", 4 * native, dtype)), by_key.get(("infd", 4 * native, dtype))
        if sd and infd and "median_s" in sd and "median_s" in infd:
            goals.append(goal(f"{4 * native}² {dtype}: SD VAE / infd memory ({memory})", sd[memory] / infd[memory], GOAL_MEMORY_RATIO))
            goals.append(goal(f"{4 * native}² {dtype}: SD VAE time / infd time", sd["median_s"] / infd["median_s"], GOAL_SPEEDUP))
        sd, infd = by_key.get(("sd-vae", 8 * native, dtype)), by_key.get(("infd", 8 * native, dtype))
        if device.type == "cuda" and sd and infd:
            met = "error" in sd and "error" not in infd
            goals.append({"goal": f"{8 * native}² {dtype}: SD VAE fails (memory cap), infd does not", "value": float(met), "target": "1 (yes)", "met": met})
    return goals


COLUMNS = [
    Column("decoder", "decoder", justify="left"),
    Column("size", "output", lambda v: f"{v}²"),
    Column("latent", "latent"),
    Column("dtype", "dtype"),
    Column("median_s", "time (s)", lambda v: f"{v:.3f}"),
    Column("peak_mib", "peak (MiB)", lambda v: f"{v:,.0f}"),
    Column("increment_mib", "above start (MiB)", lambda v: f"{v:,.0f}"),
    Column("error", "error", justify="left"),
]


def plot(path: Path, machine: dict, rows: list[dict], note: str) -> None:
    def series(key: str) -> list[Series]:
        out = []
        for decoder in DECODERS:
            for dtype in dict.fromkeys(r["dtype"] for r in rows):
                done = [r for r in rows if r["decoder"] == decoder and r["dtype"] == dtype and key in r]
                style = {"linestyle": "-" if decoder == "infd" else "--"}
                out.append(Series(f"{decoder} {dtype}", [r["size"] for r in done], [r[key] for r in done], style))
        return out

    sizes = sorted({r["size"] for r in rows if r["decoder"] in DECODERS})
    ticks = {s: f"{s}²" for s in sizes}
    panels = [
        Panel("latent -> image in CPU memory", "output side (px)", "seconds", series("median_s"), note=note, xticks=ticks),
        Panel("peak memory above the start (weights, latent)", "output side (px)", "MiB", series("increment_mib"), note="missing point: out of memory", xticks=ticks),
    ]
    plot_panels(path, panels, f"SD VAE vs converted neural field — {machine.get('gpu') or machine['cpu']}")


# ---------------------------------------------------------------- main


def progress_line(row: dict) -> str:
    shown = f"{row['median_s']:.3f} s" if "median_s" in row else row.get("error", "")
    if "peak_mib" in row:
        shown += f", peak {row['peak_mib']:,.0f} MiB"
    return f"  {row['decoder']:>7} {row['size']}² {row['dtype']}: {shown}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CUDA: 2048² only, bf16; CPU: tiny models (a smoke test in seconds)")
    parser.add_argument("--sizes", help="output sides (default: 4x and 8x the native size: 2048,4096 for SD)")
    parser.add_argument("--dtypes", help=f"of {', '.join(DTYPES)} (default CUDA fp32,bf16; CPU fp32)")
    parser.add_argument("--renderer-hidden", type=int, default=CONVERTED_RENDERER_HIDDEN)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per row on CUDA (median)")
    parser.add_argument("--memory-cap-gib", type=float, default=80.0, help="CUDA: cap the allocator at this (an 80 GB GPU); 0: no cap")
    parser.add_argument("--train-batch", type=int, help="also time one finetuning step at this batch (default 8 on CUDA without --quick)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    tiny = args.device == "cpu" and args.quick
    native = TINY_VAE["sample_size"] if tiny else SD15_VAE["sample_size"]
    default_sizes = [4 * native] if args.quick and args.device == "cuda" else [4 * native, 8 * native]
    args.sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else default_sizes
    default_dtypes = "fp32" if args.device == "cpu" else ("bf16" if args.quick else "fp32,bf16")
    args.dtypes = (args.dtypes or default_dtypes).split(",")
    if unknown := [d for d in args.dtypes if d not in DTYPES]:
        parser.error(f"unknown dtype(s) {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    if args.train_batch is None and args.device == "cuda" and not args.quick:
        args.train_batch = 8
    args.vae = TINY_VAE if tiny else SD15_VAE
    args.native = native
    if tiny:
        args.renderer_hidden, args.tile, args.threads = 32, 128, args.threads or 1
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and args.memory_cap_gib > 0:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), torch.cuda.current_device())
    run = BenchmarkRun("sd", device, "quick" if args.quick else "", args.out, "SD decoding benchmark")
    console = run.console
    spec_key = (("vae", tuple(args.vae.items())), ("renderer_hidden", args.renderer_hidden))  # hashable: `build` caches on it
    settings = dict(vae=args.vae, renderer_hidden=args.renderer_hidden, tile=args.tile, memory_cap_gib=args.memory_cap_gib if device.type == "cuda" else None)
    rows: list[dict] = []
    for decoder in DECODERS:  # one model in memory at a time
        for dtype in args.dtypes:
            for side in args.sizes:
                if device.type == "cuda":
                    row = measure_cuda(decoder, spec_key, side, args.tile, dtype, args.repeats)
                else:
                    row = measure_cpu(decoder, spec_key, side, args.tile, dtype)
                rows.append(row)
                console.print(progress_line(row))
                run.save(rows, settings=settings)
    if args.train_batch:
        rows.append(measure_finetune_step(spec_key, args.train_batch, device, args.dtypes[-1]))
        console.print(progress_line(rows[-1]))
    goals = check_goals(rows, args.native, device)
    run.table(f"Decoding SD latents — {run.machine_name}", COLUMNS, rows)
    run.goals(goals)
    run.save(rows, settings=settings, goals=goals)
    cap = f", allocator capped at {args.memory_cap_gib:g} GiB" if device.type == "cuda" and args.memory_cap_gib > 0 else ""
    plot(run.png_path, run.machine, [r for r in rows if r["decoder"] in DECODERS], f"CLIF width {args.renderer_hidden}, tile {args.tile}{cap}")
    run.done()


if __name__ == "__main__":
    main()
