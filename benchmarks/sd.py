"""Decoding Stable Diffusion latents at 4x and 8x the native size: SD's VAE vs the converted neural field.

    python benchmarks/sd.py --device cuda                                   # SD-1.5-shaped models, 2048² and 4096², fp32 and bf16
    python benchmarks/sd.py --device cuda --sizes 2048,4096 --dtypes bf16 --repeats 2
    python benchmarks/sd.py --smoke                                         # CPU: tiny models, seconds (CUDA: 2048² bf16 only)

Details (the models, the memory measures, the allocator cap, goals): benchmarks/README.md.
"""

from __future__ import annotations

import functools

import torch
from diffusers import AutoencoderKL
from harness import Benchmark, Panel, Table, goal, lines, measure, measure_fresh, size_fields, size_ticks

from infd.rendering import render
from infd.stable_diffusion.convert import CONVERTED_RENDERER_HIDDEN, convert_autoencoder

SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
TINY_VAE = dict(SD15_VAE, block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, sample_size=64)
DTYPES, DECODERS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}, ("sd-vae", "infd")
GOAL_MEMORY_RATIO, GOAL_SPEEDUP = 4.0, 2.0  # SD VAE / infd at 4x the native size (2048² for SD): peak memory, time
COLUMNS = dict(decoder="decoder", size="output", latent="latent", dtype="dtype", median_s="time (s)", peak_mib="peak (MiB)", increment_mib="above start (MiB)", error="error", note="note")
STYLES = {(d, t): {"linestyle": "-" if d == "infd" else "--"} for d in DECODERS for t in DTYPES}


@functools.lru_cache(maxsize=1)
def build(decoder: str, spec_key: tuple, device_name: str):
    """The random SD-shaped VAE, or its conversion (same weights), on the device; one cached at a time."""
    spec = dict(spec_key)
    torch.manual_seed(0)
    vae = AutoencoderKL(**dict(spec["vae"])).eval()
    model = vae if decoder == "sd-vae" else convert_autoencoder(vae, renderer_hidden=spec["renderer_hidden"])
    return model.to(torch.device(device_name)).requires_grad_(False)


def decoding(decoder: str, model, side: int, tile: int, dtype_name: str):
    """A call producing one side² image in CPU memory from a random latent, the way each decoder must:
    SD's VAE from a (side/8)² latent, at the output size; infd from the native latent, tile by tile."""
    device, dtype, generator = next(model.parameters()).device, DTYPES[dtype_name], torch.Generator().manual_seed(0)
    if decoder == "infd":
        return functools.partial(render, model, torch.randn(1, *model.latent_shape, generator=generator).to(device), (side, side), tile=tile, dtype=dtype)
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    z = torch.randn(1, model.config.latent_channels, side // factor, side // factor, generator=generator).to(device)

    def run():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return model.decode(z).sample.float().cpu()

    return run


def decode_setup(decoder: str, spec_key: tuple, side: int, tile: int, dtype_name: str):
    """In a fresh process (harness.measure_fresh): build, a 64² decode to warm up, then side²."""
    model = build(decoder, spec_key, "cpu")
    return decoding(decoder, model, side, tile, dtype_name), decoding(decoder, model, 64, tile, dtype_name)


def measure_cuda(decoder: str, spec_key: tuple, side: int, tile: int, dtype_name: str, repeats: int) -> dict:
    """Time and peak allocated memory on the GPU; an out-of-memory under the cap is a row's error, not a crash."""
    try:
        return measure(decoding(decoder, build(decoder, spec_key, "cuda"), side, tile, dtype_name), torch.device("cuda"), repeats)
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    except RuntimeError as error:  # e.g. a kernel refusing tensors of more than 2^31 elements
        return {"error": "failed: " + (str(error).splitlines() or ["RuntimeError"])[0][:120]}
    finally:
        torch.cuda.empty_cache()


def check_goals(rows: list[dict], native: int, device: str) -> list[dict]:
    """Memory: CUDA compares peaks (weights included); CPU the increments over each process's start (imports alone are hundreds of MiB)."""
    memory, by, goals = "peak_mib" if device == "cuda" else "increment_mib", {(r["decoder"], r["width"], r["dtype"]): r for r in rows}, []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        sd, nf = by.get(("sd-vae", 4 * native, dtype)), by.get(("infd", 4 * native, dtype))
        if sd and nf and "median_s" in sd and "median_s" in nf:
            goals.append(goal(f"{4 * native}² {dtype}: SD VAE / infd memory ({memory})", sd[memory] / nf[memory], GOAL_MEMORY_RATIO))
            goals.append(goal(f"{4 * native}² {dtype}: SD VAE time / infd time", sd["median_s"] / nf["median_s"], GOAL_SPEEDUP))
        sd, nf = by.get(("sd-vae", 8 * native, dtype)), by.get(("infd", 8 * native, dtype))
        if device == "cuda" and sd and nf:
            met = "error" in sd and "error" not in nf
            goals.append({"goal": f"{8 * native}² {dtype}: SD VAE fails (memory cap), infd does not", "value": float(met), "target": "1 (yes)", "met": met})
    return goals


def main() -> None:
    bench = Benchmark("sd", __doc__)
    bench.add("--sizes", help="output sides (default: 4x and 8x the native size, 2048,4096 for SD; 2048 with --smoke on CUDA)")
    bench.add("--dtypes", help=f"of {', '.join(DTYPES)} (default CUDA fp32,bf16, bf16 with --smoke; CPU fp32)")
    bench.add("--renderer-hidden", type=int, default=CONVERTED_RENDERER_HIDDEN, help="CLIF width of the converted model (what `infd convert-vae` builds)")
    bench.add("--tile", type=int, default=512, help="infd's render tile side")
    bench.add("--memory-cap-gib", type=float, default=80.0, help="CUDA: cap the allocator at this (an 80 GB GPU); 0: no cap")
    args = bench.parse()
    cuda, tiny = args.device == "cuda", args.smoke and args.device == "cpu"
    vae, native = (TINY_VAE, TINY_VAE["sample_size"]) if tiny else (SD15_VAE, SD15_VAE["sample_size"])
    if tiny:
        args.renderer_hidden, args.tile = 32, 128
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [4 * native] if args.smoke and cuda else [4 * native, 8 * native]
    dtypes = (args.dtypes or ("fp32" if not cuda else "bf16" if args.smoke else "fp32,bf16")).split(",")
    if unknown := [d for d in dtypes if d not in DTYPES]:
        bench.parser.error(f"unknown dtype(s) {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    cap = cuda and args.memory_cap_gib > 0
    if cap:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory), 0)
    spec_key = (("vae", tuple(vae.items())), ("renderer_hidden", args.renderer_hidden))  # hashable: `build` caches on it
    note = f"random weights, CLIF width {args.renderer_hidden}, tile {args.tile}" + (f", allocator capped at {args.memory_cap_gib:g} GiB" if cap else "; CPU: a fresh process per row")
    table = Table("Decoding SD latents (CUDA: peak allocated, weights included; CPU: peak RSS of a fresh process)", COLUMNS)
    bench.start("SD VAE vs converted neural field", [table], vae=vae, renderer_hidden=args.renderer_hidden, tile=args.tile, memory_cap_gib=args.memory_cap_gib if cap else None)
    with bench.interruptible():
        for decoder in DECODERS:  # one model in memory at a time
            for dtype in dtypes:
                for side in sizes:
                    latent = (side if decoder == "sd-vae" else native) // 2 ** (len(vae["block_out_channels"]) - 1)
                    row = {"decoder": decoder, **size_fields((side, side)), "dtype": dtype, "latent": f"{latent}x{latent}"}
                    if cuda:
                        bench.add_row(dict(row, **measure_cuda(decoder, spec_key, side, args.tile, dtype, args.repeats or 2)))
                    else:
                        bench.add_row(dict(row, **measure_fresh(decode_setup, decoder, spec_key, side, args.tile, dtype, repeats=args.repeats or 1, preload=["infd.rendering", "diffusers"])))
    rows, ticks, by = bench.rows, size_ticks(bench.rows, "width"), ("decoder", "dtype")
    panels = [Panel("latent -> image in CPU memory", "output side (px)", "seconds", lines(rows, "width", "median_s", by, STYLES), note=note, xticks=ticks)]
    panels.append(Panel("peak memory above the start (weights, latent)", "output side (px)", "MiB", lines(rows, "width", "increment_mib", by, STYLES), xticks=ticks, note="no point: out of memory"))
    bench.finish(check_goals(rows, native, args.device), panels)


if __name__ == "__main__":
    main()
