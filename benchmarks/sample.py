"""Time and peak memory to one image from noise: INFD at any size vs the fixed-resolution baseline.

    python benchmarks/sample.py                          # CUDA if present (paper-sized models, 50 steps, bf16)
    python benchmarks/sample.py --device cpu             # CPU default: demo-sized models, a few minutes
    python benchmarks/sample.py --quick                  # tiny models and sizes: a smoke test in seconds
    python benchmarks/sample.py --ckpt runs/ldm          # a trained LDM (run, checkpoint or pipeline folder)

One image (batch 1) is made in three timed phases:

    sampling        the UNet denoises a latent from noise (--steps DDIM steps)
    feature decode  z -> phi (the decoder trunk) -> the renderer's state
    rendering       every tile of the output grid, into a uint8 (H, W, 3) image in memory

The rows: `infd` (CLIF) at each size; `fixed` at the decoder's native resolution (the
LDM baseline as it is, e.g. 256²); `fixed+bicubic` (tiled, like any infd render) and
`fixed+lanczos` (PIL, whole image): that baseline upsampled to each target size. All
come from the same autoencoder (its fixed-resolution head on the same trunk), so every
comparison is one `--renderer` flag apart, as in `infd sample`. Sampling does not depend
on the output size: it is measured once and added to every row's total.

Models have the paper's shapes (UNet of configs/ldm-paper.json, 274M parameters, on
z 3x64x64; autoencoder with phi 128x256x256 and CLIF width 256) and random weights:
speed does not depend on the weights. On CPU the default is the demo-sized pair
(configs/ldm-demo-cpu.json on z 3x32x32, configs/ae-demo-cpu.json) so that it finishes.

Peak memory: on CUDA torch.cuda.max_memory_allocated per phase (same runs); on CPU the
peak RSS of a fresh process per row (with 2 sampling steps: the peak does not depend on
the step count). Goals (CUDA, paper sizes): INFD at 2048² end to end within 1.5x of the
baseline at its native 256², and INFD's peak memory flat in the output size.

Results: a table, benchmarks/results/sample-<device>.json and .png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from common import MIB, REPO_ROOT, BenchmarkRun, Column, Panel, Series, cuda_peak_bytes, current_rss_bytes, goal, median, peak_rss_bytes, plot_panels, reset_cuda_peak, run_in_fresh_process, time_runs

from infd import geometry
from infd.diffusion import make_sampler, make_training_scheduler, sample
from infd.diffusion.pipeline import lanczos_resize, load_pipeline
from infd.geometry import Box, parse_size
from infd.models import NeuralFieldAutoencoder
from infd.rendering import ArraySink, render_prepared
from infd.training.ldm import LDMTrainConfig, build_unet

PAPER_AE = dict(input_size=256, latent_channels=3, block_out_channels=(128, 256, 256), layers_per_block=2, renderer_hidden=256, renderer_blocks=2)
QUICK_AE = dict(PAPER_AE, input_size=64, block_out_channels=(32, 32, 32), layers_per_block=1, renderer_hidden=16)
QUICK_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
)


def demo_ae() -> dict:
    model = json.loads((REPO_ROOT / "configs" / "ae-demo-cpu.json").read_text())
    return dict(model["model"], input_size=model["data"]["input_size"])


def ldm_unet(name: str) -> dict:
    return LDMTrainConfig.load(REPO_ROOT / "configs" / name).unet


SETTINGS = {  # (autoencoder, UNet, sizes, steps)
    "paper": lambda: (PAPER_AE, ldm_unet("ldm-paper.json"), "256,512,1024,2048,4096", 50),
    "demo": lambda: (demo_ae(), ldm_unet("ldm-demo-cpu.json"), "512,1024,2048", 50),
    "quick": lambda: (QUICK_AE, QUICK_UNET, "128,256", 5),
}
METHODS = {  # method -> (renderer, upsample); "fixed" renders at the native size only
    "infd": (None, None),
    "fixed": ("fixed", None),
    "fixed+bicubic": ("fixed", "bicubic"),
    "fixed+lanczos": ("fixed", "lanczos"),
}
COLORS = {"infd": "tab:blue", "fixed": "tab:gray", "fixed+bicubic": "tab:orange", "fixed+lanczos": "tab:green"}
GOAL_RATIO = 1.5  # INFD 2048² end to end / fixed at native, end to end
GOAL_MEMORY_RATIO = 1.2  # INFD peak at the largest size / at the smallest
GOAL_SIZE = (2048, 2048)


# ---------------------------------------------------------------- models and phases


def build_models(spec: dict, device: torch.device):
    """spec: {"ckpt": path} or {"ae": ..., "unet": ...} (random weights) -> (autoencoder, unet, scaling factor)."""
    if spec.get("ckpt"):
        pipe = load_pipeline(spec["ckpt"], device)
        return pipe.autoencoder, pipe.unet.eval(), pipe.scaling_factor
    torch.manual_seed(0)
    ae = NeuralFieldAutoencoder(**spec["ae"], fixed_head=True).to(device).eval()
    unet = build_unet(spec["unet"], ae.latent_shape).to(device).eval()
    return ae, unet, 1.0


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@torch.no_grad()
def sample_latent(ae, unet, scaling_factor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Phase 1: z (1, C, h, w) from noise with DDIM."""
    sampler = make_sampler("ddim", make_training_scheduler().config)
    x = sample(unet, sampler, (1, *ae.latent_shape), steps, torch.Generator().manual_seed(0), dtype=dtype)
    return x / scaling_factor


@torch.no_grad()
def decode(ae, z: torch.Tensor, method: str, dtype: torch.dtype) -> torch.Tensor:
    """Phase 2: the renderer's state (CLIF: phi; fixed: the RGB at phi's resolution)."""
    with autocast(z.device, dtype):
        return ae.prepare_render(z, METHODS[method][0])


@torch.no_grad()
def render_image(ae, state: torch.Tensor, method: str, size, tile: int, dtype: torch.dtype) -> np.ndarray:
    """Phase 3: the (H, W, 3) uint8 image, tile by tile as `infd sample` renders it."""
    renderer, upsample = METHODS[method]
    canvas = np.empty((*size, 3), dtype=np.uint8)
    sink = ArraySink(canvas)
    with autocast(state.device, dtype):
        if upsample == "lanczos":  # the fixed image at its native size, then PIL Lanczos
            native = ae.feature_shape[1:]
            low = ((render_prepared(ae, state, Box.full(), native, renderer=renderer).float() + 1) / 2).clamp(0, 1)
            sink(geometry.Window(0, 0, *size), lanczos_resize(low, size, Box.full()))
            return canvas
        for window in geometry.tiles(size, tile):
            rgb = render_prepared(ae, state, Box.full(), size, window, renderer)
            sink(window, ((rgb.float() + 1) / 2).clamp(0, 1).cpu())
    return canvas


def plan(ae, sizes, methods) -> list[tuple[str, tuple[int, int]]]:
    """(method, size) rows: fixed at its native size, every other method at every size."""
    rows = []
    for method in methods:
        if method == "fixed":
            rows.append((method, tuple(ae.feature_shape[1:])))
        else:
            rows += [(method, size) for size in sizes]
    return rows


def base_row(method: str, size, steps: int, dtype: torch.dtype) -> dict:
    h, w = size
    return {"method": method, "size": f"{w}x{h}", "height": h, "width": w, "megapixels": h * w / 1e6, "steps": steps, "dtype": str(dtype).replace("torch.", ""), "output_mib": 3 * h * w / MIB}


# ---------------------------------------------------------------- measurements


def timed(run, device: torch.device, repeats: int) -> tuple[list[float], object]:
    """time_runs that also returns the last result."""
    results = []
    seconds = time_runs(lambda: results.append(run()), repeats, device)
    return seconds, results[-1]


def measure_sampling(ae, unet, scaling_factor, steps, dtype, repeats, device) -> tuple[dict, torch.Tensor]:
    if device.type == "cuda":
        sample_latent(ae, unet, scaling_factor, 2, dtype)  # warm-up
        reset_cuda_peak(device)
    seconds, z = timed(lambda: sample_latent(ae, unet, scaling_factor, steps, dtype), device, repeats)
    result = {"sample_s": median(seconds), "sample_runs": seconds}
    if device.type == "cuda":
        result["sample_peak_mib"] = cuda_peak_bytes(device) / MIB
    return result, z


def measure_row(ae, z, method, size, tile, dtype, repeats, device) -> dict:
    """Median decode and render seconds (and on CUDA the peak memory of each phase)."""
    row = {}
    if device.type == "cuda":
        render_image(ae, decode(ae, z, method, dtype), method, size, tile, dtype)  # warm-up (algorithm choice)
        reset_cuda_peak(device)
    decode_seconds, state = timed(lambda: decode(ae, z, method, dtype), device, repeats)
    if device.type == "cuda":
        row["decode_peak_mib"] = cuda_peak_bytes(device) / MIB
        reset_cuda_peak(device)
    render_seconds, _ = timed(lambda: render_image(ae, state, method, size, tile, dtype), device, repeats)
    if device.type == "cuda":
        row["render_peak_mib"] = cuda_peak_bytes(device) / MIB
    return dict(row, decode_s=median(decode_seconds), render_s=median(render_seconds), decode_runs=decode_seconds, render_runs=render_seconds)


def peak_rss_of_row(spec: dict, method: str, size, tile: int, threads: int) -> dict:
    """Runs in a fresh process: models, a warm-up, then one image; RSS after each phase (bytes)."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    ae, unet, scaling_factor = build_models(spec, device)
    z = sample_latent(ae, unet, scaling_factor, 1, torch.float32)
    render_image(ae, decode(ae, z, method, torch.float32), method, (64, 64), tile, torch.float32)
    result = {"base": current_rss_bytes()}
    z = sample_latent(ae, unet, scaling_factor, 2, torch.float32)
    result["sample"] = peak_rss_bytes()
    state = decode(ae, z, method, torch.float32)
    result["decode"] = peak_rss_bytes()
    render_image(ae, state, method, size, tile, torch.float32)
    result["render"] = peak_rss_bytes()
    return result


def add_cpu_memory(row: dict, spec: dict, tile: int) -> None:
    result = run_in_fresh_process(peak_rss_of_row, spec, row["method"], (row["height"], row["width"]), tile, torch.get_num_threads(), preload=("torch", "diffusers"))
    if "error" in result:
        row["note"] = result["error"]
        return
    row.update(
        base_mib=result["base"] / MIB,
        sample_peak_mib=result["sample"] / MIB,
        decode_peak_mib=result["decode"] / MIB,
        render_peak_mib=result["render"] / MIB,
    )


# ---------------------------------------------------------------- goals, table, plot


def finish_rows(rows: list[dict], sampling: dict) -> None:
    """Totals (sampling + decode + render), the overall peak, and the ratio to the native baseline."""
    for row in rows:
        if "render_s" in row:
            row["sample_s"] = sampling["sample_s"]
            row["total_s"] = sampling["sample_s"] + row["decode_s"] + row["render_s"]
        peaks = [row.get(k, sampling.get(k)) for k in ("sample_peak_mib", "decode_peak_mib", "render_peak_mib")]
        if all(p is not None for p in peaks):
            row["peak_mib"] = max(peaks)
            if "base_mib" in row:  # CPU: what making the image added to the process with its models loaded
                row["increment_mib"] = row["peak_mib"] - row["base_mib"]
    native = next((r for r in rows if r["method"] == "fixed" and "total_s" in r), None)
    for row in rows:
        if native and "total_s" in row:
            row["vs_fixed_native"] = row["total_s"] / native["total_s"]


def check_goals(rows: list[dict], device: torch.device, paper: bool) -> list[dict]:
    goals = []
    note = "" if device.type == "cuda" and paper else " (reference only: the goal is for the paper sizes on CUDA)"
    infd = sorted((r for r in rows if r["method"] == "infd" and "total_s" in r), key=lambda r: r["megapixels"])
    target = next((r for r in infd if (r["height"], r["width"]) == GOAL_SIZE), None)
    if target and "vs_fixed_native" in target:
        goals.append(goal(f"INFD {target['size']} end to end / fixed at native, {device.type}" + note, target["vs_fixed_native"], GOAL_RATIO, "x", lower_is_better=True))
    with_peak = [r for r in infd if "render_peak_mib" in r]
    if len(with_peak) >= 2:
        ratio = with_peak[-1]["peak_mib"] / with_peak[0]["peak_mib"]
        goals.append(goal(f"INFD peak memory {with_peak[-1]['size']} / {with_peak[0]['size']}" + note, ratio, GOAL_MEMORY_RATIO, "x", lower_is_better=True))
    return goals


COLUMNS = [
    Column("method", "method", justify="left"),
    Column("size", "size"),
    Column("sample_s", "sampling s", lambda v: f"{v:.3f}"),
    Column("decode_s", "decode s", lambda v: f"{v:.3f}"),
    Column("render_s", "render s", lambda v: f"{v:.3f}"),
    Column("total_s", "total s", lambda v: f"{v:.3f}"),
    Column("vs_fixed_native", "vs fixed native", lambda v: f"{v:.2f}x"),
    Column("peak_mib", "peak MiB", lambda v: f"{v:.0f}"),
    Column("render_peak_mib", "render peak MiB", lambda v: f"{v:.0f}"),
    Column("increment_mib", "+MiB", lambda v: f"{v:.0f}"),
    Column("output_mib", "image MiB", lambda v: f"{v:.1f}"),
    Column("note", "note", justify="left"),
]


def lines(rows: list[dict], key: str) -> list[Series]:
    series = []
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["megapixels"], r[key]) for r in rows if r["method"] == method and r.get(key) is not None)
        if not points:
            continue
        style = dict(color=COLORS[method])
        if len(points) == 1:  # the native baseline: a horizontal reference line across the plot
            xs = sorted({r["megapixels"] for r in rows})
            series.append(Series(f"{method} ({rows_size(rows, method)})", [xs[0], xs[-1]], [points[0][1]] * 2, dict(style, linestyle="--", marker="")))
        else:
            series.append(Series(method, [p[0] for p in points], [p[1] for p in points], style))
    return series


def rows_size(rows: list[dict], method: str) -> str:
    return next(r["size"] for r in rows if r["method"] == method)


def plot(path: Path, machine: dict, rows: list[dict], settings: dict) -> None:
    times = lines(rows, "total_s")
    native = next((r for r in rows if r["method"] == "fixed" and "total_s" in r), None)
    if native:
        xs = sorted({r["megapixels"] for r in rows})
        times.append(Series(f"goal: {GOAL_RATIO}x fixed native", [xs[0], xs[-1]], [GOAL_RATIO * native["total_s"]] * 2, dict(color="red", linestyle=":", marker="")))
    render_only = [Series(f"{s.label} render", s.x, s.y, dict(s.style, linestyle="-.", alpha=0.6)) for s in lines([r for r in rows if r["method"] != "fixed"], "render_s")]
    note = f"{settings['steps']} DDIM steps, batch 1, {settings['dtype']}; dash-dot: rendering alone"
    speed = Panel("One image from noise, end to end", "output megapixels", "seconds", times + render_only, note=note)
    memory = Panel("Peak memory", "output megapixels", "MiB", lines(rows, "peak_mib"), note=settings["memory_note"])
    title = f"infd sample benchmark — {machine.get('gpu') or machine['cpu']}, torch {machine['torch']}, {machine['date'][:10]}"
    plot_panels(path, [speed, memory], title)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", choices=tuple(SETTINGS), help="model sizes (default: paper on CUDA, demo on CPU; quick with --quick)")
    parser.add_argument("--ckpt", help="a trained LDM (run, checkpoint or pipeline folder) instead of random models")
    parser.add_argument("--sizes", help="output sizes, e.g. 256,1024,2048x1536 (default: by --models)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, help="DDIM steps (default 50; 5 with --quick)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--tile", type=int, default=512, help="render tile side")
    parser.add_argument("--repeats", type=int, help="timed runs per phase, median reported (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory runs (one fresh process per row)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="set torch.backends.cudnn.benchmark")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes: a smoke test in seconds")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    args.models = args.models or ("quick" if args.quick else "paper" if args.device == "cuda" else "demo")
    ae, unet, sizes, steps = SETTINGS[args.models]()
    args.spec = {"ckpt": args.ckpt} if args.ckpt else {"ae": ae, "unet": unet}
    args.sizes = [parse_size(part) for part in (args.sizes or sizes).split(",") if part.strip()]
    args.steps = args.steps or steps
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    args.repeats = args.repeats or (3 if args.device == "cuda" else 1)
    if args.quick:
        args.tile = min(args.tile, 128)
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    run = BenchmarkRun("sample", device, "quick" if args.quick else "", args.out)
    console = run.console
    ae, unet, scaling_factor = build_models(args.spec, device)
    if any(m.startswith("fixed") for m in args.methods) and ae.fixed_renderer is None:
        console.print("[yellow]this autoencoder has no fixed-resolution head: only the infd rows are measured[/]")
        args.methods = [m for m in args.methods if not m.startswith("fixed")]
    memory_note = "torch.cuda.max_memory_allocated" if device.type == "cuda" else ("not measured (--no-memory)" if args.no_memory else "peak RSS of a fresh process per row")
    settings = dict(
        models=args.ckpt or args.models,
        spec={k: v for k, v in args.spec.items()},
        unet_parameters=sum(p.numel() for p in unet.parameters()),
        autoencoder_parameters=sum(p.numel() for p in ae.parameters()),
        latent_shape=list(ae.latent_shape),
        feature_shape=list(ae.feature_shape),
        steps=args.steps,
        sampler="ddim",
        dtype=str(args.dtype).replace("torch.", ""),
        tile=args.tile,
        repeats=args.repeats,
        memory_note=memory_note,
    )
    console.print(
        f"UNet {settings['unet_parameters'] / 1e6:.1f}M on z {'x'.join(map(str, ae.latent_shape))}, "
        f"autoencoder {settings['autoencoder_parameters'] / 1e6:.1f}M, phi {'x'.join(map(str, ae.feature_shape))}"
    )

    render_image(ae, decode(ae, torch.zeros(1, *ae.latent_shape, device=device), "infd", args.dtype), "infd", (64, 64), args.tile, args.dtype)  # load kernels
    sampling, z = measure_sampling(ae, unet, scaling_factor, args.steps, args.dtype, args.repeats, device)
    console.print(f"  sampling ({args.steps} steps): {sampling['sample_s']:.3f} s")
    rows = []
    for method, size in plan(ae, args.sizes, args.methods):
        row = base_row(method, size, args.steps, args.dtype)
        row.update(measure_row(ae, z, method, size, args.tile, args.dtype, args.repeats, device))
        if device.type == "cpu" and not args.no_memory:
            add_cpu_memory(row, args.spec, args.tile)
        rows.append(row)
        peak = f", render peak {row['render_peak_mib']:.0f} MiB" if "render_peak_mib" in row else ""
        console.print(f"  {method:>14} {row['size']:>10}: decode {row['decode_s']:.3f} s, render {row['render_s']:.3f} s{peak}")
        run.save(rows, settings=settings, sampling=sampling)

    finish_rows(rows, sampling)
    goals = check_goals(rows, device, paper=args.models == "paper" and not args.ckpt)
    run.table(f"One image from noise — {run.machine_name}", COLUMNS, rows)
    run.goals(goals)
    run.save(rows, settings=settings, sampling=sampling, goals=goals)
    plot(run.png_path, run.machine, rows, settings)
    run.done()


if __name__ == "__main__":
    main()
