"""Time and peak memory to one image from noise: INFD at any size vs the fixed-resolution baseline.

    python benchmarks/sample.py                  # CUDA if present (paper-sized models, 50 steps, bf16)
    python benchmarks/sample.py --device cpu     # CPU: the demo-sized pair, a few minutes
    python benchmarks/sample.py --ckpt runs/ldm  # a trained LDM (run, checkpoint or pipeline folder)
    python benchmarks/sample.py --smoke          # seconds

Phases: sampling (the UNet, --steps DDIM steps, measured once), feature decode, rendering
(every tile into a uint8 image in memory). Details and goals: benchmarks/README.md.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from harness import MIB, PAPER_AE, REPO_ROOT, Benchmark, Panel, Table, current_rss_bytes, goal, hline, in_fresh_process, lines, measure, parse_sizes, peak_rss_bytes, size_fields

from infd import geometry
from infd.diffusion import make_sampler, make_training_scheduler, sample
from infd.diffusion.pipeline import load_pipeline
from infd.images import lanczos_resize
from infd.models import NeuralFieldAutoencoder
from infd.rendering import ArraySink, LatentField
from infd.training.ldm import LDMTrainConfig, build_unet

SMOKE_UNET = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
MODELS = {  # name -> (autoencoder options, UNet options, sizes, steps)
    "paper": lambda: (PAPER_AE, LDMTrainConfig.load(REPO_ROOT / "configs" / "ldm-paper.json").unet, "256,512,1024,2048,4096", 50),
    "demo": lambda: (demo_ae(), LDMTrainConfig.load(REPO_ROOT / "configs" / "ldm-demo-cpu.json").unet, "512,1024,2048", 50),
    "smoke": lambda: (dict(PAPER_AE, input_size=64, block_out_channels=(32, 32, 32), layers_per_block=1, renderer_hidden=16), SMOKE_UNET, "128", 3),
}
METHODS = {"infd": (None, None), "fixed": ("fixed", None), "fixed+bicubic": ("fixed", "bicubic"), "fixed+lanczos": ("fixed", "lanczos")}  # -> (renderer, upsampling)
STYLES = {"infd": dict(color="tab:blue"), "fixed": dict(color="tab:gray"), "fixed+bicubic": dict(color="tab:orange"), "fixed+lanczos": dict(color="tab:green")}
GOAL_RATIO, GOAL_MEMORY_RATIO, GOAL_SIZE = 1.5, 1.2, "2048²"  # INFD 2048² end to end / fixed at native; INFD peak largest / smallest size
COLUMNS = dict(method="method", size="size", sample_s="sampling s", decode_s="decode s", render_s="render s", total_s="total s", vs_fixed_native="vs fixed native (x)")
COLUMNS.update(peak_mib="peak MiB", render_peak_mib="render peak MiB", increment_mib="+MiB", output_mib="image MiB", note="note")


def demo_ae() -> dict:
    config = json.loads((REPO_ROOT / "configs" / "ae-demo-cpu.json").read_text())
    return dict(config["model"], input_size=config["data"]["input_size"])


# ---------------------------------------------------------------- the three phases


def build_models(spec: dict, device: torch.device):
    """spec {"ckpt": path} or {"ae": ..., "unet": ...} (random weights) -> (autoencoder, UNet, scaling factor)."""
    if spec.get("ckpt"):
        pipe = load_pipeline(spec["ckpt"], device)
        return pipe.autoencoder, pipe.unet.eval(), pipe.scaling_factor
    torch.manual_seed(0)
    ae = NeuralFieldAutoencoder(**spec["ae"], fixed_head=True).to(device).eval()
    return ae, build_unet(spec["unet"], ae.latent_shape).to(device).eval(), 1.0


@torch.no_grad()
def sample_latent(ae, unet, scaling_factor: float, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Phase 1: z (1, C, h, w) from noise with DDIM."""
    x = sample(unet, make_sampler("ddim", make_training_scheduler().config), (1, *ae.latent_shape), steps, torch.Generator().manual_seed(0), dtype=dtype)
    return x / scaling_factor


def decode(ae, z: torch.Tensor, method: str, dtype: torch.dtype) -> LatentField:
    """Phase 2: z -> the renderer's state (CLIF: phi; fixed: the RGB at phi's resolution), decoded once."""
    field = LatentField(ae, z, renderer=METHODS[method][0], dtype=None if dtype == torch.float32 else dtype)
    _ = field.state  # decoded now (a cached property), not at the first render
    return field


def render_image(field: LatentField, method: str, size, tile: int) -> np.ndarray:
    """Phase 3: the (H, W, 3) uint8 image, tile by tile as `infd sample` renders it (Lanczos: the native image, then PIL)."""
    canvas = np.empty((*size, 3), dtype=np.uint8)
    if METHODS[method][1] == "lanczos":
        ArraySink(canvas)(geometry.Window(0, 0, *size), lanczos_resize(field.image(field.model.feature_shape[1:], tile=None), size, geometry.Box.full()))
    else:
        field.image(size, tile, sink=ArraySink(canvas))
    return canvas


def peak_rss_of_row(spec: dict, method: str, size, tile: int, threads: int) -> dict:
    """In a fresh process: the models, a warm-up, then one image (2 sampling steps: the peak does not depend on them); RSS after each phase."""
    torch.set_num_threads(threads)
    ae, unet, scaling_factor = build_models(spec, torch.device("cpu"))
    render_image(decode(ae, sample_latent(ae, unet, scaling_factor, 1, torch.float32), method, torch.float32), method, (64, 64), tile)
    base = current_rss_bytes()
    z = sample_latent(ae, unet, scaling_factor, 2, torch.float32)
    sample_peak = peak_rss_bytes()
    field = decode(ae, z, method, torch.float32)
    decode_peak = peak_rss_bytes()
    render_image(field, method, size, tile)
    return dict(base_mib=base / MIB, sample_peak_mib=sample_peak / MIB, decode_peak_mib=decode_peak / MIB, render_peak_mib=peak_rss_bytes() / MIB)


# ---------------------------------------------------------------- rows, goals, plot


def measure_rows(bench: Benchmark, args) -> dict:
    device, dtype = bench.device, args.dtype
    ae, unet, scaling_factor = build_models(args.spec, device)
    render_image(decode(ae, torch.zeros(1, *ae.latent_shape, device=device), "infd", dtype), "infd", (64, 64), args.tile)  # kernels
    latents = []
    sampling = measure(lambda: latents.append(sample_latent(ae, unet, scaling_factor, args.steps, dtype)), device, args.repeats)
    bench.save(sampling={"sample_s": sampling["median_s"], "runs": sampling["seconds"], "peak_mib": sampling.get("peak_mib")})
    bench.say(f"  sampling ({args.steps} steps): {sampling['median_s']:.3f} s")
    methods = [m for m in args.methods if ae.fixed_renderer is not None or not m.startswith("fixed")]
    for method, size in [(m, size) for m in methods for size in ([tuple(ae.feature_shape[1:])] if m == "fixed" else args.sizes)]:  # fixed: its native size
        row = dict(method=method, **size_fields(size), steps=args.steps, dtype=str(dtype).removeprefix("torch."), output_mib=3 * size[0] * size[1] / MIB)
        fields = []
        decoded = measure(lambda: fields.append(decode(ae, latents[-1], method, dtype)), device, args.repeats)  # noqa: B023 (called at once)
        rendered = measure(lambda: render_image(fields[-1], method, size, args.tile), device, args.repeats)  # noqa: B023
        row.update(sample_s=sampling["median_s"], decode_s=decoded["median_s"], render_s=rendered["median_s"], decode_runs=decoded["seconds"], render_runs=rendered["seconds"])
        row["total_s"] = row["sample_s"] + row["decode_s"] + row["render_s"]
        if device.type == "cuda":
            row.update(sample_peak_mib=sampling["peak_mib"], decode_peak_mib=decoded["peak_mib"], render_peak_mib=rendered["peak_mib"])
        elif not args.no_memory:
            row.update(in_fresh_process(peak_rss_of_row, args.spec, method, size, args.tile, torch.get_num_threads(), preload=("torch", "diffusers")))
        if "render_peak_mib" in row:
            row["peak_mib"] = max(row["sample_peak_mib"], row["decode_peak_mib"], row["render_peak_mib"])
            row["increment_mib"] = row["peak_mib"] - row["base_mib"] if "base_mib" in row else None  # CPU: over the process with its models loaded
        bench.add_row(row)
    native = next((r for r in bench.rows if r["method"] == "fixed"), None)
    for row in bench.rows:
        row["vs_fixed_native"] = row["total_s"] / native["total_s"] if native else None


def check_goals(rows: list[dict], paper_on_cuda: bool) -> list[dict]:
    note = "" if paper_on_cuda else " (for reference: the goal is for the paper sizes on CUDA)"
    infd = sorted((r for r in rows if r["method"] == "infd"), key=lambda r: r["megapixels"])
    goals = [goal(f"INFD {r['size']} end to end / fixed at native" + note, r["vs_fixed_native"], GOAL_RATIO, "x", True) for r in infd if r["size"] == GOAL_SIZE and r["vs_fixed_native"]]
    peaks = [r for r in infd if r.get("peak_mib")]
    if len(peaks) >= 2:
        goals.append(goal(f"INFD peak memory {peaks[-1]['size']} / {peaks[0]['size']}" + note, peaks[-1]["peak_mib"] / peaks[0]["peak_mib"], GOAL_MEMORY_RATIO, "x", True))
    return goals


def panels(rows: list[dict], settings: dict) -> list[Panel]:
    scaled = [r for r in rows if r["method"] != "fixed"]
    xs = [r["megapixels"] for r in rows]
    native = [hline(f"fixed at its native {r['size']}", xs, r[key], color="tab:gray", linestyle="--") for r in rows if r["method"] == "fixed" for key in ("total_s",)]
    goal_line = [hline(f"goal: {GOAL_RATIO}x fixed native", xs, GOAL_RATIO * r["total_s"], color="red") for r in rows if r["method"] == "fixed"]
    render_only = lines(scaled, "megapixels", "render_s", "method", STYLES, label=" render", linestyle="-.", alpha=0.6)
    note = f"{settings['steps']} DDIM steps, batch 1, {settings['dtype']}; dash-dot: rendering alone"
    return [
        Panel("One image from noise, end to end", "output megapixels", "seconds", lines(scaled, "megapixels", "total_s", "method", STYLES) + native + goal_line + render_only, note=note),
        Panel("Peak memory", "output megapixels", "MiB", lines(scaled, "megapixels", "peak_mib", "method", STYLES), note=settings["memory"]),
    ]


def main() -> None:
    bench = Benchmark("sample", __doc__)
    bench.add("--models", choices=tuple(MODELS), help="model sizes (default: paper on CUDA, demo on CPU, smoke with --smoke)")
    bench.add("--ckpt", help="a trained LDM (run, checkpoint or pipeline folder) instead of random models")
    bench.add("--sizes", help="output sizes, e.g. 256,1024,2048x1536 (default: by --models)")
    bench.add("--methods", default=",".join(METHODS), help=f"of {', '.join(METHODS)}")
    bench.add("--steps", type=int, help="DDIM steps (default 50)")
    bench.add("--dtype", choices=("fp32", "bf16"), help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    bench.add("--tile", type=int, default=512, help="render tile side")
    bench.add("--no-memory", action="store_true", help="skip the CPU peak-memory runs (a fresh process per row)")
    args = bench.parse()
    args.models = args.models or ("smoke" if args.smoke else "paper" if args.device == "cuda" else "demo")
    ae, unet, sizes, steps = MODELS[args.models]()
    args.spec = {"ckpt": args.ckpt} if args.ckpt else {"ae": ae, "unet": unet}
    args.sizes, args.steps, args.methods = parse_sizes(args.sizes or sizes), args.steps or steps, args.methods.split(",")
    if unknown := [m for m in args.methods if m not in METHODS]:
        bench.parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    args.dtype = torch.bfloat16 if (args.dtype or ("bf16" if args.device == "cuda" else "fp32")) == "bf16" else torch.float32
    args.repeats, args.tile = args.repeats or (3 if args.device == "cuda" else 1), min(args.tile, 128) if args.smoke else args.tile
    memory = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "not measured (--no-memory)" if args.no_memory else "peak RSS of a fresh process per row"
    settings = dict(models=args.ckpt or args.models, spec=args.spec, steps=args.steps, sampler="ddim", dtype=str(args.dtype).removeprefix("torch."), tile=args.tile, memory=memory)
    bench.start("infd sample benchmark", [Table("One image from noise", COLUMNS)], **settings)
    with bench.interruptible():
        measure_rows(bench, args)
    bench.finish(check_goals(bench.rows, args.models == "paper" and not args.ckpt and args.device == "cuda"), panels(bench.rows, settings))


if __name__ == "__main__":
    main()
