"""The paper's code vs infd on the same weights: render time, peak memory and GroupNorm statistics modes.

    PYTHONPATH=/tmp/refdeps python benchmarks/official.py --reference /tmp/infd-ref --quick
    PYTHONPATH=/tmp/refdeps python benchmarks/official.py --reference /tmp/infd-ref            # CPU: 512..2048, width 256
    PYTHONPATH=/tmp/refdeps python benchmarks/official.py --reference /tmp/infd-ref --sizes 256,512 --repeats 1
    PYTHONPATH=/tmp/refdeps python benchmarks/official.py --reference /tmp/infd-ref --ckpt ae_ffhq/last-model.pth

--reference is a checkout of github.com/yinboc/infd (the paper's code); this script imports
it from there and runs it beside infd in one process (nothing of it is copied here). Its
extra dependencies (einops, omegaconf) must be importable, e.g. via PYTHONPATH; the LPIPS
network and the discriminator, which rendering never uses, are replaced by empty modules so
that nothing is downloaded.

The model is the paper's autoencoder (cfgs/models/ae-d4vq.yaml: z 3x64x64, phi
128x256x256, GroupNorm CLIF of --width hidden channels, 256 in the paper) built by the
reference code with seeded random weights (a N(0, 1) codebook, the renderer's last conv
scaled so that the 256² render has std 0.45, like an image), saved as a reference-format
checkpoint and converted with `infd.official` (`read_reference_checkpoint` + `build_models`),
so both sides hold the same weights; `--ckpt` takes a released file instead. The latent z
is 64x64 codebook rows drawn at random. Before anything is timed, both one-piece 256²
renders are compared (PSNR).

1. Render time from z (decode phi once + render, both returning the float32 image):
   the reference's own sampling path, `gen_samples.render_output_patchwise(z, model, size,
   256, 8)`, vs `infd.rendering.render(model, z, (size, size), tile=512)` in the default
   "latent" statistics mode (fp32; on CUDA also bf16), interleaved run by run after a
   warm-up of each; median of --repeats. The PSNR between the two outputs is listed: they
   agree at 256² only (elsewhere the reference normalises with each patch's statistics,
   infd with those of the 256² render).
2. Peak memory vs output size, up to 8192², with a narrow renderer (--memory-width) on
   CPU (the peak RSS of a fresh process per measurement, restarted once the model is
   loaded and warmed up); on CUDA torch.cuda.max_memory_allocated at the real width. infd's tiles go to a sink that drops them (how a large image is
   written to a file), while the reference's path holds the whole float32 output and two
   float32 coordinate grids of the output's size: "output MiB" lists the former.
3. Statistics modes on one latent (--modes-width): PSNR of "whole" and "patch" against
   "latent" at 256², 1024², 4096², the "patch" mode against the reference's patch-wise
   render (up to 1024²), and a seam measure per mode: the mean absolute jump between
   neighbouring pixels across the 256-pixel patch boundaries divided by that across the
   other feature-cell edges (the same phase of phi's grid, so that CLIF's own steps at
   feature edges cancel out). ~1: seam-free; > 1: seams.

`--profile`: torch.profiler over one 512² render of each path, the top 5 ops by self time.
Ctrl-C stops measuring and reports what was measured; `--report JSON` prints the tables of
a saved run and redraws its plot.

Results: tables, benchmarks/results/official-<device>[-quick].json and .png.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
from common import (
    GOAL_COLUMNS,
    MIB,
    BenchmarkRun,
    Column,
    Panel,
    Series,
    cuda_peak_bytes,
    current_rss_bytes,
    describe_machine,
    goal,
    make_console,
    median,
    peak_rss_bytes,
    plot_panels,
    print_table,
    reset_cuda_peak,
    run_in_fresh_process,
    time_runs,
    write_json,
)

from infd.official import build_models, read_reference_checkpoint
from infd.rendering import render

PAPER_YAML = "cfgs/models/ae-d4vq.yaml"
PATCH, PADDING = 256, 8  # gen_samples.py's --patch-size / --patch-padding for the paper's samples
TILE = 512
QUICK_TRUNK = dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1)  # z 3x64x64, phi 32x256x256
RENDER_STD = 0.45  # the random renderer's output std at 256², about an image's in [-1, 1]
MODES = ("latent", "whole", "patch")
PARITY_PSNR_DB = 60.0  # float32 renders of the same weights: round-off only
GOAL_MEMORY_RATIO = 1.2  # infd peak at 8192² / at 1024²
GOAL_SEAM_FREE = 1.1  # "latent" mode: jumps across patch boundaries like any other feature edge
DEFAULT_SIZES = {"cpu": "512,1024,2048", "cuda": "1024,2048,4096"}
MEMORY_SIZES = "1024,2048,4096,8192"
MODES_SIZES = "256,1024,4096"


class ReferenceUnavailable(Exception):
    """The --reference checkout is missing or cannot be imported; the message says which."""


# ---------------------------------------------------------------- the reference code


def import_reference(path: Path) -> types.SimpleNamespace:
    """The reference modules this benchmark runs, imported from the checkout at `path`."""
    path = path.resolve()
    if not (path / "gen_samples.py").is_file() or not (path / "models").is_dir():
        raise ReferenceUnavailable(f"--reference {path} is not a checkout of github.com/yinboc/infd (no gen_samples.py and models/ there)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if "tensorboardX" not in sys.modules:  # the reference's utils import it for logging only
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            sys.modules["tensorboardX"] = types.SimpleNamespace(SummaryWriter=None)
    try:
        import gen_samples
        import models
        import models.infd
        import utils.geometry
    except ImportError as error:
        raise ReferenceUnavailable(
            f"could not import the reference code from {path} ({error}); install its dependencies (einops, omegaconf), e.g. put them on PYTHONPATH"
        ) from None
    for module in (models, gen_samples, utils.geometry):
        if not Path(module.__file__).resolve().is_relative_to(path):
            raise ReferenceUnavailable(f"'{module.__name__}' was imported from {module.__file__}, not from --reference {path}; run from another folder")
    return types.SimpleNamespace(path=path, models=models, infd=models.infd, gen_samples=gen_samples, geometry=utils.geometry)


def without_training_modules(R):
    """Build INFD models with empty modules in place of LPIPS (a VGG download) and the discriminator."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(R.infd, "LPIPS", lambda *a, **k: nn.Module()))
    stack.enter_context(mock.patch.object(R.infd, "make_discriminator", lambda *a, **k: nn.Module()))
    return stack


def autoencoder_args(args: dict) -> dict:
    """A model's args without its diffusion model (rendering never needs the UNet)."""
    return {k: copy.deepcopy(v) for k, v in args.items() if not k.startswith(("z_dm", "z_dp", "z_ddim"))}


def paper_args(R, width: int, trunk: dict | None = None) -> dict:
    """cfgs/models/ae-d4vq.yaml's model args, with renderer width `width` (and a smaller trunk for --quick)."""
    import yaml

    spec = yaml.safe_load((R.path / PAPER_YAML).read_text())["model"]
    args = spec["args"]
    if trunk:
        args["encoder"]["args"] = dict(trunk)
        args["decoder"]["args"] = dict(trunk)
        args["renderer"]["args"]["z_dec_channels"] = trunk["ch"] * trunk["ch_mult"][0]
    args["renderer"]["args"]["net"]["args"]["hidden_channels"] = width
    return args


@torch.no_grad()
def reference_one_piece(R, model, z: torch.Tensor, size: int) -> torch.Tensor:
    """The reference's render of the whole size² grid at once, (B, 3, size, size) in about [-1, 1]."""
    coord, cell = R.geometry.make_coord_cell_grid((size, size), device=z.device, bs=z.shape[0])
    return model.run_renderer(model.decode_z(z), coord, cell)


def reference_patchwise(R, model, z: torch.Tensor, size: int) -> torch.Tensor:
    """The reference's sampling render (gen_samples.py): 256² patches, 8 px padding; (B, 3, size, size) on the CPU."""
    return R.gen_samples.render_output_patchwise(z, model, size, PATCH, PADDING)


@torch.no_grad()
def random_reference_model(R, args: dict, seed: int):
    """The reference INFD of `args` with seeded random weights, a N(0, 1) codebook and its output scaled to std 0.45 at 256²."""
    torch.manual_seed(seed)
    with without_training_modules(R):
        model = R.models.make({"name": "infd", "args": copy.deepcopy(args)}).eval()
    if model.quantizer is not None:
        weight = model.quantizer.embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)))
    rgb = reference_one_piece(R, model, random_latent(model, seed), 256)
    conv_out = model.renderer.net.conv_out
    scale = RENDER_STD / float(rgb.std())
    conv_out.weight.mul_(scale)
    conv_out.bias.mul_(scale)
    return model


def save_reference_checkpoint(path: Path, args: dict, model) -> None:
    """What the reference trainer saves, as far as loading needs: {"model": {"name", "args", "sd"}}."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("perc_loss.", "disc."))}
    torch.save({"model": {"name": "infd", "args": args, "sd": state}}, path)


def load_reference_model(R, path: Path, device: torch.device):
    """The reference autoencoder of a reference checkpoint, as gen_samples.py loads it (without the UNet)."""
    spec = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"]
    with without_training_modules(R):
        model = R.models.make({"name": spec["name"], "args": autoencoder_args(spec["args"]), "sd": spec["sd"]}, load_sd=True)
    return model.to(device).eval()


def load_infd_model(path: Path, device: torch.device):
    autoencoder, _, _, _ = build_models(read_reference_checkpoint(path))
    return autoencoder.to(device).eval()


def random_latent(model, seed: int) -> torch.Tensor:
    """z (1, C, h, w) for either side's model: codebook rows drawn at random (VQ), or N(0, 1) (KL)."""
    generator = torch.Generator().manual_seed(seed + 1)
    c, h, w = model.z_shape if hasattr(model, "z_shape") else model.latent_shape
    if model.quantizer is None:
        return torch.randn(1, c, h, w, generator=generator)
    codebook = model.quantizer.embedding.weight.detach().float().cpu()
    rows = torch.randint(codebook.shape[0], (h * w,), generator=generator)
    return codebook[rows].T.reshape(1, c, h, w).contiguous()


# ---------------------------------------------------------------- the pair of models


class Pair:
    """One reference-format checkpoint, loaded by the reference code and converted by infd: the same weights twice."""

    def __init__(self, R, path: Path, device: torch.device, seed: int):
        self.path = path
        self.reference = load_reference_model(R, path, device)
        self.infd = load_infd_model(path, device)
        self.width = self.infd.config.renderer_hidden
        self.z = random_latent(self.reference, seed).to(device)


def make_checkpoint(R, folder: Path, ckpt: Path | None, width: int, trunk: dict | None, seed: int) -> Path:
    """A reference checkpoint with renderer width `width`: --ckpt itself if that is its width, else random weights."""
    if ckpt is not None:
        spec = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["model"]
        if spec["args"]["renderer"]["args"]["net"]["args"]["hidden_channels"] == width:
            return ckpt
        args = autoencoder_args(spec["args"])
        args["renderer"]["args"]["net"]["args"]["hidden_channels"] = width
    else:
        args = paper_args(R, width, trunk)
    path = folder / f"reference-width{width}.pth"
    if not path.exists():
        save_reference_checkpoint(path, args, random_reference_model(R, args, seed))
    return path


def checkpoint_width(ckpt: Path) -> int:
    spec = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["model"]
    return int(spec["args"]["renderer"]["args"]["net"]["args"]["hidden_channels"])


# ---------------------------------------------------------------- measures


def to_unit(reference_rgb: torch.Tensor) -> torch.Tensor:
    """A reference output (about [-1, 1]) as infd's renders are: float32 in [0, 1] on the CPU."""
    return ((reference_rgb.float().cpu() + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1] (200 dB for identical ones)."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return min(200.0, -10 * math.log10(max(mse, 1e-30)))


def seam_ratio(image: torch.Tensor, period: int = PATCH, feature_size: int = 256) -> float | None:
    """Mean |jump| between neighbouring pixels across the `period` boundaries / across the other feature-cell edges.

    image: (B, 3, H, W) with H = W. Jump i is between pixel rows (or columns) i - 1 and i;
    the boundaries are i = k * period, the comparison the other i on the same phase of phi's
    grid (multiples of H / feature_size when that is whole), where CLIF's nearest-feature
    lookup steps too. None when the image has no boundary.
    """
    size = image.shape[-1]
    if size <= period:
        return None
    step = size // feature_size if size % feature_size == 0 and size >= feature_size else 1
    rows = (image[..., 1:, :] - image[..., :-1, :]).abs().double().mean(dim=(0, 1, 3))
    cols = (image[..., :, 1:] - image[..., :, :-1]).abs().double().mean(dim=(0, 1, 2))
    index = torch.arange(1, size)
    boundary = index % period == 0
    other = (index % step == 0) & ~boundary
    across = torch.cat([rows[boundary], cols[boundary]]).mean()
    elsewhere = torch.cat([rows[other], cols[other]]).mean()
    return float(across / elsewhere)


def drop_tiles(window, tile) -> None:
    """A render sink that keeps nothing (so infd's memory excludes the output)."""


def render_infd(model, z: torch.Tensor, size: int, dtype: torch.dtype | None = None, sink=None) -> torch.Tensor | None:
    return render(model, z, (size, size), tile=TILE, dtype=dtype, sink=sink)


@contextlib.contextmanager
def statistics_mode(model, mode: str):
    """Render `model` with GroupNorm statistics `mode` ("latent", "whole", "patch") inside the block."""
    renderer = model.renderer
    saved = renderer.statistics
    renderer.statistics = mode
    try:
        yield model
    finally:
        renderer.statistics = saved


# ---------------------------------------------------------------- 1. render time


def measure_time(R, pair: Pair, sizes: list[int], repeats: int, device: torch.device, bf16: bool, console, on_row) -> list[dict]:
    """Per size: the reference's patch-wise render and infd's (fp32, and bf16 if asked), interleaved run by run."""
    paths = {"reference": lambda s: reference_patchwise(R, pair.reference, pair.z, s), "infd": lambda s: render_infd(pair.infd, pair.z, s)}
    if bf16:
        paths["infd_bf16"] = lambda s: render_infd(pair.infd, pair.z, s, torch.bfloat16)
    for run in paths.values():  # kernels, allocator, cuDNN: once each before any timing
        run(sizes[0])
    rows = []
    for size in sizes:
        seconds = {name: [] for name in paths}
        outputs = {}
        for _ in range(repeats):
            for name, run in paths.items():
                outputs[name] = None
                seconds[name] += time_runs(lambda name=name, run=run: outputs.__setitem__(name, run(size)), 1, device)  # noqa: B023 (size: called at once)
        row = {"section": "time", "size": size, "width": pair.width, "repeats": repeats}
        for name in paths:
            row[f"{name}_runs"] = seconds[name]
            row[f"{name}_s"] = median(seconds[name])
            row[f"{name}_speedup"] = row["reference_s"] / row[f"{name}_s"]
        row["psnr_vs_reference"] = psnr(outputs["infd"], to_unit(outputs["reference"]))
        del row["reference_speedup"]
        rows.append(row)
        console.print(
            f"  {size}²  reference {row['reference_s']:.3f} s  infd {row['infd_s']:.3f} s ({row['infd_speedup']:.2f}x)"
            + (f"  bf16 {row['infd_bf16_s']:.3f} s ({row['infd_bf16_speedup']:.2f}x)" if bf16 else "")
            + f"  PSNR {row['psnr_vs_reference']:.1f} dB"
        )
        on_row(rows)
    return rows


def profile_renders(R, pair: Pair, size: int, device: torch.device, console) -> list[dict]:
    """torch.profiler over one render of each path; the top 5 ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rows = []
    for name, run in (("reference", lambda: reference_patchwise(R, pair.reference, pair.z, size)), ("infd", lambda: render_infd(pair.infd, pair.z, size))):
        with profile(activities=activities) as prof:
            run()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        averages = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in averages)
        for rank, event in enumerate(averages[:5], 1):
            spent = getattr(event, key)
            rows.append({"section": "profile", "path": name, "size": size, "width": pair.width, "rank": rank, "op": event.key, "calls": event.count, "self_ms": spent / 1e3, "share": spent / total})
        console.print(f"profile of one {size}² render, {name} ({total / 1e6:.2f} s of self time):")
        console.print(prof.key_averages().table(sort_by=key, row_limit=5))
    return rows


# ---------------------------------------------------------------- 2. peak memory


# What the forkserver imports once, so that each measuring process starts in a fraction of a second: it
# re-runs this script as __mp_main__, whose imports (diffusers: 5-20 s on a busy 2-core machine) are
# then already loaded. ("__main__" itself is not preloaded by Python 3.11's forkserver.)
CHILD_PRELOAD = ("torch", "diffusers", "infd.official", "infd.rendering", "common")


def peak_rss_of_render(reference: str, ckpt: str, path: str, size: int, seed: int, threads: int) -> dict:
    """Runs in a fresh process: load one side of the pair, warm up at 64², then one render of size²; peak RSS in bytes."""
    torch.set_num_threads(threads)
    R = import_reference(Path(reference))
    cpu = torch.device("cpu")
    if path == "reference":
        model = load_reference_model(R, Path(ckpt), cpu)
        run = functools.partial(reference_patchwise, R, model, random_latent(model, seed))
    else:
        model = load_infd_model(Path(ckpt), cpu)
        run = functools.partial(render_infd, model, random_latent(model, seed), sink=drop_tiles)
    run(64)
    reset = reset_peak_rss()
    base = current_rss_bytes()
    seconds = time_runs(lambda: run(size), 1, cpu)[0]
    return {"peak": peak_rss_bytes(), "base": base, "peak_reset": reset, "seconds": seconds}


def reset_peak_rss() -> bool:
    """Restart the peak RSS (Linux: /proc/self/clear_refs 5) at the current RSS, so that the peak is the render's and not loading's; False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_memory_cpu(reference: Path, ckpt: Path, width: int, sizes: list[int], seed: int, console, on_row) -> list[dict]:
    """Per size: the peak RSS of each path's render, each in a fresh process."""
    rows = []
    for size in sizes:
        row = {"section": "memory", "size": size, "width": width, "output_mib": 3 * 4 * size * size / MIB}
        for path in ("reference", "infd"):
            result = run_in_fresh_process(peak_rss_of_render, str(reference), str(ckpt), path, size, seed, torch.get_num_threads(), preload=CHILD_PRELOAD)
            if "error" in result:
                row[f"{path}_note"] = result["error"]
                continue
            row.update({f"{path}_peak_mib": result["peak"] / MIB, f"{path}_increment_mib": (result["peak"] - result["base"]) / MIB, f"{path}_s": result["seconds"]})
            if not result["peak_reset"]:
                row[f"{path}_note"] = "peak since the process started (could not reset it): loading may set it"
        rows.append(row)
        console.print(format_memory(row))
        on_row(rows)
    return rows


def measure_memory_cuda(R, pair: Pair, sizes: list[int], device: torch.device, console, on_row) -> list[dict]:
    """Per size: torch.cuda.max_memory_allocated during each path's render (the reference's output lives on the CPU)."""
    rows = []
    runs = {"reference": lambda s: reference_patchwise(R, pair.reference, pair.z, s), "infd": lambda s: render_infd(pair.infd, pair.z, s, sink=drop_tiles)}
    for size in sizes:
        row = {"section": "memory", "size": size, "width": pair.width, "output_mib": 3 * 4 * size * size / MIB}
        for path, run in runs.items():
            base = reset_cuda_peak(device)
            seconds = time_runs(functools.partial(run, size), 1, device)[0]
            peak = cuda_peak_bytes(device)
            row.update({f"{path}_peak_mib": peak / MIB, f"{path}_increment_mib": (peak - base) / MIB, f"{path}_s": seconds})
        rows.append(row)
        console.print(format_memory(row))
        on_row(rows)
    return rows


def format_memory(row: dict) -> str:
    text = f"  {row['size']}² (width {row['width']})"
    for path in ("reference", "infd"):
        if f"{path}_peak_mib" in row:
            text += f"  {path} peak {row[f'{path}_peak_mib']:.0f} MiB ({row[f'{path}_increment_mib']:+.0f}, {row[f'{path}_s']:.1f} s)"
        else:
            text += f"  {path}: {row.get(f'{path}_note')}"
    return text


# ---------------------------------------------------------------- 3. statistics modes


def measure_modes(R, pair: Pair, sizes: list[int], device: torch.device, console, on_row, reference_up_to: int = 1024) -> list[dict]:
    """Per size: each mode's render, PSNRs against "latent" (and "patch" against the reference), and the seam ratios."""
    rows = []
    for size in sizes:
        row = {"section": "modes", "size": size, "width": pair.width}
        images = {}
        for mode in MODES:
            with statistics_mode(pair.infd, mode):
                (seconds,) = time_runs(functools.partial(lambda mode: images.__setitem__(mode, render_infd(pair.infd, pair.z, size)), mode), 1, device)  # noqa: B023 (called at once)
            row[f"{mode}_s"] = seconds
            row[f"seam_{mode}"] = seam_ratio(images[mode])
        row["psnr_whole_vs_latent"] = psnr(images["whole"], images["latent"])
        row["psnr_patch_vs_latent"] = psnr(images["patch"], images["latent"])
        row["psnr_patch_vs_whole"] = psnr(images["patch"], images["whole"])
        if size <= reference_up_to:
            row["psnr_patch_vs_reference"] = psnr(images["patch"], to_unit(reference_patchwise(R, pair.reference, pair.z, size)))
        rows.append(row)
        seams = "  ".join(f"seam {m} {row[f'seam_{m}']:.3f}" for m in MODES if row[f"seam_{m}"] is not None)
        console.print(f"  {size}² (width {pair.width})  PSNR whole/latent {row['psnr_whole_vs_latent']:.1f} dB  patch/latent {row['psnr_patch_vs_latent']:.1f} dB  {seams}")
        on_row(rows)
    return rows


# ---------------------------------------------------------------- goals, tables, plot


def check_goals(parity: dict, memory: list[dict], modes: list[dict]) -> list[dict]:
    goals = [goal("one-piece 256² render, infd vs reference (dB)", parity["psnr_db"], PARITY_PSNR_DB)]
    peaks = {r["size"]: r["infd_peak_mib"] for r in memory if "infd_peak_mib" in r}
    if 8192 in peaks and 1024 in peaks:
        goals.append(goal(f"infd peak 8192² / 1024² (width {memory[0]['width']})", peaks[8192] / peaks[1024], GOAL_MEMORY_RATIO, "x", lower_is_better=True))
    for row in modes:
        if row["seam_latent"] is not None:
            goals.append(goal(f"seam ratio, latent mode, {row['size']}²", row["seam_latent"], GOAL_SEAM_FREE, lower_is_better=True))
    return goals


def fmt_seconds(v) -> str:
    return f"{v:.3f}"


def fmt_ratio(v) -> str:
    return f"{v:.2f}x"


def fmt_db(v) -> str:
    return "identical" if v >= 200 else f"{v:.1f}"


def fmt_mib(v) -> str:
    return f"{v:.0f}"


def fmt_plain(v) -> str:
    return f"{v:.3f}"


SIZE_COLUMNS = [Column("size", "size", lambda v: f"{v}²"), Column("width", "width")]
TIME_COLUMNS = [
    *SIZE_COLUMNS,
    Column("repeats", "runs"),
    Column("reference_s", "reference s", fmt_seconds),
    Column("infd_s", "infd s", fmt_seconds),
    Column("infd_speedup", "speed-up", fmt_ratio),
    Column("infd_bf16_s", "infd bf16 s", fmt_seconds),
    Column("infd_bf16_speedup", "bf16 speed-up", fmt_ratio),
    Column("psnr_vs_reference", "PSNR infd/ref dB", fmt_db),
]
MEMORY_COLUMNS = [
    *SIZE_COLUMNS,
    Column("reference_peak_mib", "reference peak MiB", fmt_mib),
    Column("reference_increment_mib", "ref +MiB", fmt_mib),
    Column("infd_peak_mib", "infd peak MiB", fmt_mib),
    Column("infd_increment_mib", "infd +MiB", fmt_mib),
    Column("output_mib", "output MiB (ref holds it)", fmt_mib),
    Column("reference_s", "reference s", fmt_seconds),
    Column("infd_s", "infd s", fmt_seconds),
    Column("reference_note", "reference note", justify="left"),
    Column("infd_note", "infd note", justify="left"),
]
MODES_COLUMNS = [
    *SIZE_COLUMNS,
    Column("psnr_whole_vs_latent", "whole/latent", fmt_db),
    Column("psnr_patch_vs_latent", "patch/latent", fmt_db),
    Column("psnr_patch_vs_whole", "patch/whole", fmt_db),
    Column("psnr_patch_vs_reference", "patch/ref", fmt_db),
    Column("seam_latent", "latent seam", fmt_plain),
    Column("seam_whole", "whole seam", fmt_plain),
    Column("seam_patch", "patch seam", fmt_plain),
]  # each mode's seconds are in the JSON
PROFILE_COLUMNS = [
    Column("path", "path", justify="left"),
    Column("rank", "#"),
    Column("op", "op", justify="left"),
    Column("calls", "calls"),
    Column("self_ms", "self ms", lambda v: f"{v:.1f}"),
    Column("share", "share", lambda v: f"{100 * v:.1f}%"),
]
PATH_STYLES = {"reference": dict(color="tab:gray"), "infd": dict(color="tab:blue"), "infd_bf16": dict(color="tab:orange")}
PATH_LABELS = {"reference": "reference (patch-wise, gen_samples.py)", "infd": "infd (latent statistics, 512² tiles)", "infd_bf16": "infd bf16"}


def series(rows: list[dict], key: str) -> list[Series]:
    """One line per path that has `<path>_<key>` in some row, x = megapixels."""
    lines = []
    for path, style in PATH_STYLES.items():
        points = sorted((r["size"] ** 2 / 1e6, r[f"{path}_{key}"]) for r in rows if f"{path}_{key}" in r)
        if points:
            lines.append(Series(PATH_LABELS[path], [p[0] for p in points], [p[1] for p in points], style))
    return lines


def ticks(rows: list[dict]) -> dict[float, str]:
    return {r["size"] ** 2 / 1e6: f"{r['size']}²" for r in rows}


def plot(path: Path, machine: dict, time_rows: list[dict], memory_rows: list[dict], memory_note: str) -> None:
    widths = ", ".join(sorted({str(r["width"]) for r in time_rows}))
    output = Series("output image, float32", [r["size"] ** 2 / 1e6 for r in memory_rows], [r["output_mib"] for r in memory_rows], dict(color="lightgray", linestyle=":", marker=""))
    panels = [
        Panel("Render time from z (decode phi + render)", "output size", "seconds", series(time_rows, "s"), note=f"renderer width {widths}", xticks=ticks(time_rows)),
        Panel("Peak memory during the render", "output size", "peak MiB", [*series(memory_rows, "peak_mib"), output], logy=False, note=memory_note, xticks=ticks(memory_rows)),
    ]
    title = f"The paper's code vs infd, same weights — {machine.get('gpu') or machine['cpu']}, torch {machine['torch']}, {machine['date'][:10]}"
    plot_panels(path, panels, title)


# ---------------------------------------------------------------- main


def parse_sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, help="checkout of github.com/yinboc/infd (imported and run, never copied); required")
    parser.add_argument("--ckpt", type=Path, help="a released reference checkpoint (AE or DM stage) instead of random weights")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", help=f"render-time sizes (default: CPU {DEFAULT_SIZES['cpu']}; CUDA {DEFAULT_SIZES['cuda']})")
    parser.add_argument("--width", type=int, default=256, help="renderer hidden channels of the random model (the paper's: 256)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per size and path, median reported")
    parser.add_argument("--memory-sizes", default=MEMORY_SIZES, help="peak-memory sizes")
    parser.add_argument("--memory-width", type=int, help="renderer width of the peak-memory sweep (default: CPU 32; CUDA --width)")
    parser.add_argument("--modes-sizes", default=MODES_SIZES, help="statistics-mode sizes")
    parser.add_argument("--modes-width", type=int, help="renderer width of the statistics-mode comparison (default: CPU 32; CUDA --width)")
    parser.add_argument("--parts", default="time,memory,modes", help="which measurements to run, of time, memory, modes")
    parser.add_argument("--profile", action="store_true", help="also profile one 512² render of each path (top 5 ops)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 with --quick)")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--tag", default="", help="results/official-<device>-<tag>.json (default: none; 'quick' with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny trunk, width 32, sizes 64/128: a smoke test in seconds")
    parser.add_argument("--report", type=Path, metavar="JSON", help="measure nothing: print the tables of an earlier (e.g. interrupted) run's JSON and redraw its plot")
    args = parser.parse_args()
    if args.report is not None:
        if not args.report.is_file():
            parser.error(f"--report {args.report} does not exist; pass a results/official-*.json this script wrote")
        return args
    if args.reference is None:
        parser.error("--reference PATH (a checkout of github.com/yinboc/infd) is required")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if args.ckpt is not None and not args.ckpt.is_file():
        parser.error(f"--ckpt {args.ckpt} does not exist; pass a checkpoint written by the paper's code (e.g. ae_ffhq/last-model.pth)")
    args.parts = set(args.parts.split(","))
    if args.parts - {"time", "memory", "modes"}:
        parser.error(f"unknown --parts {', '.join(sorted(args.parts - {'time', 'memory', 'modes'}))}; choose from time, memory, modes")
    narrow = 32 if args.device == "cpu" else None
    if args.quick:
        args.sizes, args.memory_sizes, args.modes_sizes, args.repeats = "64,128", "64,256", "256,512", 1
        args.width = args.memory_width = args.modes_width = 32  # the least: GroupNorm's 32 groups
        args.threads = args.threads or 1  # tiny ops on a shared machine mostly wait in OpenMP barriers
    args.sizes = parse_sizes(args.sizes or DEFAULT_SIZES[args.device])
    args.memory_sizes, args.modes_sizes = parse_sizes(args.memory_sizes), parse_sizes(args.modes_sizes)
    try:
        args.R = import_reference(args.reference)
    except ReferenceUnavailable as error:
        parser.exit(2, f"official.py: {error}.\n")
    if args.ckpt is not None:
        args.width = checkpoint_width(args.ckpt)
    args.memory_width = args.memory_width or narrow or args.width
    args.modes_width = args.modes_width or narrow or args.width
    if any(w % 32 for w in (args.width, args.memory_width, args.modes_width)):
        parser.error("renderer widths must be multiples of 32 (the GroupNorm has 32 groups)")
    return args


def memory_note(device_type: str, width: int | None) -> str:
    if width is None:
        return "not measured"
    return f"torch.cuda.max_memory_allocated; width {width}" if device_type == "cuda" else f"peak RSS of a fresh process; width {width}"


def measure(args: argparse.Namespace, device: torch.device, console, save) -> None:
    """Parity, then each part asked for; `save(part, rows)` after every row."""
    R = args.R
    with tempfile.TemporaryDirectory(prefix="infd-official-") as folder:
        checkpoint = functools.partial(make_checkpoint, R, Path(folder), args.ckpt, trunk=QUICK_TRUNK if args.quick else None, seed=args.seed)
        pair = Pair(R, checkpoint(args.width), device, args.seed)
        with torch.no_grad():
            native = render(pair.infd, pair.z, (256, 256), tile=None)
            parity = {"section": "parity", "size": 256, "width": pair.width, "psnr_db": psnr(native, to_unit(reference_one_piece(R, pair.reference, pair.z, 256)))}
        console.print(f"one-piece 256² render, infd vs reference (same weights, width {pair.width}): PSNR {parity['psnr_db']:.1f} dB")
        save("parity", [parity])

        def pair_of_width(width: int) -> Pair:
            return pair if width == pair.width else Pair(R, checkpoint(width), device, args.seed)

        if "time" in args.parts:
            console.print(f"render time from z (width {pair.width}, median of {args.repeats}, interleaved):")
            measure_time(R, pair, args.sizes, args.repeats, device, device.type == "cuda", console, functools.partial(save, "time"))
        if args.profile:
            save("profile", profile_renders(R, pair, 512, device, console))
        if "modes" in args.parts:
            modes_pair = pair_of_width(args.modes_width)
            console.print(f"statistics modes (width {modes_pair.width}, {TILE}² tiles):")
            measure_modes(R, modes_pair, args.modes_sizes, device, console, functools.partial(save, "modes"))
        if "memory" in args.parts:
            console.print(f"peak memory ({memory_note(device.type, args.memory_width)}):")
            if device.type == "cuda":
                measure_memory_cuda(R, pair_of_width(args.memory_width), args.memory_sizes, device, console, functools.partial(save, "memory"))
            else:
                measure_memory_cpu(args.reference, checkpoint(args.memory_width), args.memory_width, args.memory_sizes, args.seed, console, functools.partial(save, "memory"))


def report(rows: list[dict], machine: dict, settings: dict, png_path: Path) -> list[dict]:
    """Print the tables and goals of `rows`, draw the plot; returns the goals."""
    part = {name: [r for r in rows if r["section"] == name] for name in ("parity", "time", "profile", "memory", "modes")}
    device = machine["device"]
    note = memory_note(device, settings["widths"]["memory"] if part["memory"] else None)
    tables = (
        ("time", f"Render time from z — {machine.get('gpu') or machine['cpu']}, float32{' (bf16: infd)' if device == 'cuda' else ''}", TIME_COLUMNS),
        ("profile", "Top 5 ops by self time, one 512² render each", PROFILE_COLUMNS),
        ("memory", f"Peak memory ({note})", MEMORY_COLUMNS),
        ("modes", "GroupNorm statistics modes (infd), one latent: PSNR (dB) between renders, seam ratio (1: no seams)", MODES_COLUMNS),
    )
    for name, title, columns in tables:
        if part[name]:
            print_table(title, columns, part[name])
    goals = check_goals(part["parity"][0], part["memory"], part["modes"]) if part["parity"] else []
    if goals:
        print_table("Goals", GOAL_COLUMNS, goals)
    plot(png_path, machine, part["time"], part["memory"], note)
    return goals


def report_from_json(path: Path) -> None:
    """--report: the tables, goals and plot of a saved run (the goals are added to its JSON)."""
    saved = json.loads(path.read_text())
    make_console().print(f"[bold]the paper's code vs infd[/] (from {path}) on {describe_machine(saved['machine'])}")
    saved["goals"] = report(saved["rows"], saved["machine"], saved["settings"], path.with_suffix(".png"))
    write_json(path, saved.pop("machine"), saved.pop("rows"), **saved)
    print(f"wrote {path} and {path.with_suffix('.png')}")


def main() -> None:
    args = parse_args()
    if args.report is not None:
        return report_from_json(args.report)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = BenchmarkRun("official", device, args.tag or ("quick" if args.quick else ""), args.out, "the paper's code vs infd")
    settings = dict(
        reference=str(args.reference),
        reference_commit=reference_commit(args.reference),
        ckpt=str(args.ckpt) if args.ckpt else None,
        model=PAPER_YAML + (" with a small trunk (--quick)" if args.quick else ""),
        widths=dict(time=args.width, memory=args.memory_width, modes=args.modes_width),
        patch=PATCH,
        padding=PADDING,
        tile=TILE,
        repeats=args.repeats,
        seed=args.seed,
    )
    parts: dict[str, list[dict]] = {}

    def save(part: str, part_rows: list[dict], **extra) -> None:  # after every row: an interrupted run keeps them
        parts[part] = part_rows
        run.save([r for rs in parts.values() for r in rs], settings=settings, **extra)

    try:
        measure(args, device, run.console, save)
    except KeyboardInterrupt:
        run.console.print("[bold]interrupted[/]: the tables and the plot show what was measured")
    rows = [r for rs in parts.values() for r in rs]
    goals = report(rows, run.machine, settings, run.png_path)
    run.save(rows, settings=settings, goals=goals)
    run.done()


def reference_commit(path: Path) -> str | None:
    import subprocess

    done = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


if __name__ == "__main__":
    main()
