"""The paper's code vs infd on the same weights: render time, peak memory and GroupNorm statistics modes.

    PYTHONPATH=/tmp/refdeps python benchmarks/official.py --reference /tmp/infd-ref              # CPU: 512..2048, width 256
    PYTHONPATH=/tmp/refdeps python benchmarks/official.py --reference /tmp/infd-ref --parts time --sizes 512,1024 --tag time
    PYTHONPATH=/tmp/refdeps python benchmarks/official.py --reference /tmp/infd-ref --ckpt ae_ffhq/last-model.pth
    PYTHONPATH=/tmp/refdeps python benchmarks/official.py --reference /tmp/infd-ref --smoke      # seconds

--reference is a checkout of github.com/yinboc/infd, imported and run from there (nothing of it
is copied here); its extra dependencies (einops, omegaconf) must be importable. Details: benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import statistics
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
from harness import MIB, Benchmark, Panel, Table, git, goal, lines, measure, measure_fresh, time_runs

from infd.official import build_models, read_reference_checkpoint
from infd.rendering import render

PAPER_YAML = "cfgs/models/ae-d4vq.yaml"
PATCH, PADDING, TILE = 256, 8, 512  # gen_samples.py's --patch-size / --patch-padding for the paper's samples; infd's tile
SMOKE_TRUNK = dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1)  # z 3x64x64, phi 32x256x256
RENDER_STD = 0.45  # the random renderer's output std at 256², about an image's in [-1, 1]
MODES = ("scale", "latent", "whole", "patch")
PARITY_PSNR_DB, GOAL_MEMORY_RATIO, GOAL_SEAM_FREE = 60.0, 1.2, 1.1  # same weights in fp32: round-off only; peak 8192²/1024²; seam ratio
PATHS = {"reference": dict(color="tab:gray"), "infd": dict(color="tab:blue"), "infd_bf16": dict(color="tab:orange")}
SIZE = dict(size="size", width="width")
TIME = dict(SIZE, repeats="runs", reference_s="reference s", infd_s="infd s", infd_speedup="speed-up (x)", infd_bf16_s="infd bf16 s", psnr_vs_reference="PSNR infd/ref dB")
MEMORY = dict(SIZE, reference_peak_mib="reference peak MiB", reference_increment_mib="ref +MiB", infd_peak_mib="infd peak MiB", infd_increment_mib="infd +MiB", output_mib="output MiB")
MEMORY.update(reference_s="reference s", infd_s="infd s", reference_note="reference note", infd_note="infd note")
MODE_COLUMNS = dict(SIZE, psnr_scale_vs_whole="scale/whole", psnr_whole_vs_latent="whole/latent", psnr_patch_vs_latent="patch/latent", psnr_patch_vs_reference="patch/ref")
MODE_COLUMNS.update(seam_scale="scale seam", seam_latent="latent seam", seam_whole="whole seam", seam_patch="patch seam")
TABLES = [
    Table("Render time from z (decode phi + render), interleaved", TIME, "time"),
    Table("Top 5 ops by self time, one 512² render each", dict(path="path", rank="#", op="op", calls="calls", self_ms="self ms", share="share"), "profile"),
    Table("Peak memory (infd's tiles go to a sink; the reference holds its float32 output)", MEMORY, "memory"),
    Table("GroupNorm statistics modes: PSNR (dB) between renders, seam ratio (1: none)", MODE_COLUMNS, "modes"),
    Table("Parity: the one-piece 256² render", dict(SIZE, psnr_db="PSNR infd/ref dB"), "parity"),
]


class ReferenceUnavailable(Exception):
    """The --reference checkout is missing or cannot be imported; the message says which."""


# ---------------------------------------------------------------- the reference code and the pair of models


def import_reference(path: Path) -> types.SimpleNamespace:
    """The reference modules this benchmark runs, imported from the checkout at `path`."""
    path = path.resolve()
    if not (path / "gen_samples.py").is_file() or not (path / "models").is_dir():
        raise ReferenceUnavailable(f"--reference {path} is not a checkout of github.com/yinboc/infd (no gen_samples.py and models/ there)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    with contextlib.suppress(ImportError):  # the reference's utils import tensorboardX for logging only
        import tensorboardX  # noqa: F401
    sys.modules.setdefault("tensorboardX", types.SimpleNamespace(SummaryWriter=None))
    try:
        import gen_samples
        import models
        import models.infd
        import utils.geometry
    except ImportError as error:
        raise ReferenceUnavailable(f"could not import the reference code from {path} ({error}); install its dependencies (einops, omegaconf), e.g. on PYTHONPATH") from None
    for module in (models, gen_samples, utils.geometry):
        if not Path(module.__file__).resolve().is_relative_to(path):
            raise ReferenceUnavailable(f"'{module.__name__}' was imported from {module.__file__}, not from --reference {path}; run from another folder")
    return types.SimpleNamespace(path=path, models=models, infd=models.infd, gen_samples=gen_samples, geometry=utils.geometry)


def reference_model(R, args: dict, sd: dict | None = None):
    """The reference INFD of `args` (its diffusion model left out), with empty modules for LPIPS (a VGG download) and the discriminator."""
    args = {k: copy.deepcopy(v) for k, v in args.items() if not k.startswith(("z_dm", "z_dp", "z_ddim"))}
    with mock.patch.object(R.infd, "LPIPS", lambda *a, **k: nn.Module()), mock.patch.object(R.infd, "make_discriminator", lambda *a, **k: nn.Module()):
        return R.models.make({"name": "infd", "args": args, "sd": sd}, load_sd=sd is not None).eval()


def reference_one_piece(R, model, z: torch.Tensor, size: int) -> torch.Tensor:
    """The reference's render of the whole size² grid at once, (B, 3, size, size) in about [-1, 1]."""
    coord, cell = R.geometry.make_coord_cell_grid((size, size), device=z.device, bs=z.shape[0])
    with torch.no_grad():
        return model.run_renderer(model.decode_z(z), coord, cell)


def reference_patchwise(R, model, z: torch.Tensor, size: int) -> torch.Tensor:
    """The reference's sampling render (gen_samples.py): 256² patches, 8 px padding; (B, 3, size, size) on the CPU."""
    return R.gen_samples.render_output_patchwise(z, model, size, PATCH, PADDING)


def random_latent(model, seed: int) -> torch.Tensor:
    """z (1, C, h, w) for either side's model: codebook rows drawn at random (VQ), or N(0, 1) (KL)."""
    generator = torch.Generator().manual_seed(seed + 1)
    c, h, w = model.z_shape if hasattr(model, "z_shape") else model.latent_shape
    if model.quantizer is None:
        return torch.randn(1, c, h, w, generator=generator)
    codebook = model.quantizer.embedding.weight.detach().float().cpu()
    return codebook[torch.randint(codebook.shape[0], (h * w,), generator=generator)].T.reshape(1, c, h, w).contiguous()


def checkpoint_args(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["model"]


@torch.no_grad()
def make_checkpoint(R, folder: Path, ckpt: Path | None, width: int, trunk: dict | None, seed: int) -> Path:
    """A reference-format checkpoint with renderer width `width`: --ckpt itself if it has that width, else seeded random
    weights (a N(0, 1) codebook, the last conv scaled so that the 256² render has std 0.45) of the paper's config or --ckpt's."""
    if ckpt is not None:
        args = checkpoint_args(ckpt)["args"]
        if args["renderer"]["args"]["net"]["args"]["hidden_channels"] == width:
            return ckpt
    else:
        import yaml

        args = yaml.safe_load((R.path / PAPER_YAML).read_text())["model"]["args"]
        for part in ("encoder", "decoder") if trunk else ():
            args[part]["args"] = dict(trunk)
        args["renderer"]["args"]["z_dec_channels"] = trunk["ch"] * trunk["ch_mult"][0] if trunk else args["renderer"]["args"]["z_dec_channels"]
    args["renderer"]["args"]["net"]["args"]["hidden_channels"] = width
    path = folder / f"reference-width{width}.pth"
    if not path.exists():
        torch.manual_seed(seed)
        model = reference_model(R, args)
        if model.quantizer is not None:
            model.quantizer.embedding.weight.copy_(torch.randn(model.quantizer.embedding.weight.shape, generator=torch.Generator().manual_seed(seed)))
        conv_out = model.renderer.net.conv_out
        scale = RENDER_STD / float(reference_one_piece(R, model, random_latent(model, seed), 256).std())
        conv_out.weight.mul_(scale)
        conv_out.bias.mul_(scale)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(("perc_loss.", "disc."))}
        torch.save({"model": {"name": "infd", "args": args, "sd": state}}, path)  # what the reference trainer saves, as far as loading needs
    return path


def load_side(R, path: Path, side: str, device: torch.device):
    """One side of the pair: the reference's model as gen_samples.py loads it, or infd's conversion."""
    if side == "reference":
        spec = checkpoint_args(path)
        return reference_model(R, spec["args"], spec["sd"]).to(device)
    return build_models(read_reference_checkpoint(path))[0].to(device).eval()


class Pair:
    """One reference-format checkpoint loaded by the reference code and converted by infd: the same weights twice."""

    def __init__(self, R, path: Path, device: torch.device, seed: int):
        self.reference, self.infd = load_side(R, path, "reference", device), load_side(R, path, "infd", device)
        self.width, self.z = self.infd.config.renderer_hidden, random_latent(self.reference, seed).to(device)


# ---------------------------------------------------------------- measures


def to_unit(reference_rgb: torch.Tensor) -> torch.Tensor:
    """A reference output (about [-1, 1]) as infd's renders are: float32 in [0, 1] on the CPU."""
    return ((reference_rgb.float().cpu() + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1] (200 dB for identical ones)."""
    return min(200.0, -10 * math.log10(max(float((a.double() - b.double()).pow(2).mean()), 1e-30)))


def seam_ratio(image: torch.Tensor, period: int = PATCH, feature_size: int = 256) -> float | None:
    """Mean |jump| between neighbouring pixels across the `period` boundaries / across the other feature-cell edges
    (on the same phase of phi's grid, where CLIF's nearest-feature lookup steps too); ~1: seam-free. None without a boundary."""
    size = image.shape[-1]
    if size <= period:
        return None
    step = size // feature_size if size % feature_size == 0 and size >= feature_size else 1
    rows = (image[..., 1:, :] - image[..., :-1, :]).abs().double().mean(dim=(0, 1, 3))
    cols = (image[..., :, 1:] - image[..., :, :-1]).abs().double().mean(dim=(0, 1, 2))
    index = torch.arange(1, size)
    boundary = index % period == 0
    other = (index % step == 0) & ~boundary
    return float(torch.cat([rows[boundary], cols[boundary]]).mean() / torch.cat([rows[other], cols[other]]).mean())


def render_infd(model, z: torch.Tensor, size: int, dtype: torch.dtype | None = None, sink=None, mode: str | None = None) -> torch.Tensor | None:
    """infd's render of size² in 512² tiles, with GroupNorm statistics `mode` (default: the model's)."""
    saved = model.renderer.statistics
    model.renderer.statistics = mode or saved
    try:
        return render(model, z, (size, size), tile=TILE, dtype=dtype, sink=sink)
    finally:
        model.renderer.statistics = saved


def render_setup(reference: str, ckpt: str, side: str, size: int, seed: int):
    """In a fresh process: one side of the pair, a 64² warm-up, then size² (harness.measure_fresh); infd's tiles go to a sink that keeps nothing."""
    R = import_reference(Path(reference))
    model = load_side(R, Path(ckpt), side, torch.device("cpu"))
    z = random_latent(model, seed)
    run = functools.partial(reference_patchwise, R, model, z) if side == "reference" else functools.partial(render_infd, model, z, sink=lambda window, tile: None)
    return functools.partial(run, size), functools.partial(run, 64)


def measure_time(bench: Benchmark, R, pair: Pair, sizes: list[int], repeats: int) -> None:
    """Per size: the reference's patch-wise render and infd's (fp32; bf16 too on CUDA), interleaved run by run after a warm-up of each."""
    paths = {"reference": lambda s: reference_patchwise(R, pair.reference, pair.z, s), "infd": lambda s: render_infd(pair.infd, pair.z, s)}
    if bench.device.type == "cuda":
        paths["infd_bf16"] = lambda s: render_infd(pair.infd, pair.z, s, torch.bfloat16)
    for run in paths.values():
        run(sizes[0])
    for size in sizes:
        seconds, outputs = {name: [] for name in paths}, {}
        for _ in range(repeats):
            for name, run in paths.items():
                seconds[name] += time_runs(lambda name=name, run=run: outputs.__setitem__(name, run(size)), 1, bench.device)  # noqa: B023 (called at once)
        row = {"section": "time", "size": size, "width": pair.width, "repeats": repeats}
        for name in paths:
            row.update({f"{name}_runs": seconds[name], f"{name}_s": statistics.median(seconds[name])})
            row[f"{name}_speedup"] = row["reference_s"] / row[f"{name}_s"] if name != "reference" else None
        bench.add_row(dict(row, psnr_vs_reference=psnr(outputs["infd"], to_unit(outputs["reference"]))))


def profile_renders(bench: Benchmark, R, pair: Pair, size: int = 512) -> None:
    """torch.profiler over one render of each path; the top 5 ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    key = "self_cuda_time_total" if bench.device.type == "cuda" else "self_cpu_time_total"
    for name, run in (("reference", lambda: reference_patchwise(R, pair.reference, pair.z, size)), ("infd", lambda: render_infd(pair.infd, pair.z, size))):
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])) as prof:
            run()
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events)
        for rank, event in enumerate(events[:5], 1):
            spent = getattr(event, key)
            bench.add_row({"section": "profile", "path": name, "size": size, "width": pair.width, "rank": rank, "op": event.key, "calls": event.count, "self_ms": spent / 1e3, "share": spent / total})


def measure_memory(bench: Benchmark, R, args, ckpt: Path, pair: Pair | None, sizes: list[int]) -> None:
    """Per size and side: CPU the peak RSS of a fresh process (restarted after loading and a warm-up), CUDA torch.cuda's peak."""
    for size in sizes:
        row = {"section": "memory", "size": size, "width": pair.width if pair else args.memory_width, "output_mib": 12 * size * size / MIB}
        for side in ("reference", "infd"):
            if pair is None:
                result = measure_fresh(render_setup, str(args.reference), str(ckpt), side, size, args.seed, preload=("torch", "diffusers", "infd.official", "infd.rendering", "harness"))
            elif side == "reference":
                result = measure(lambda: reference_patchwise(R, pair.reference, pair.z, size), bench.device, warm=False)  # noqa: B023 (called at once)
            else:
                result = measure(lambda: render_infd(pair.infd, pair.z, size, sink=lambda window, tile: None), bench.device, warm=False)  # noqa: B023
            row.update({f"{side}_{key}": result.get(value) for key, value in (("peak_mib", "peak_mib"), ("increment_mib", "increment_mib"), ("s", "median_s"), ("note", "note"))})
        bench.add_row(row)


def measure_modes(bench: Benchmark, R, pair: Pair, sizes: list[int], reference_up_to: int = 1024) -> None:
    """Per size: each statistics mode's render, PSNRs between them (and "patch" against the reference's), seam ratios."""
    for size in sizes:
        images = {mode: render_infd(pair.infd, pair.z, size, mode=mode) for mode in MODES}
        row = {"section": "modes", "size": size, "width": pair.width, **{f"seam_{mode}": seam_ratio(images[mode]) for mode in MODES}}
        row.update({f"psnr_{a}_vs_{b}": psnr(images[a], images[b]) for a, b in (("scale", "whole"), ("whole", "latent"), ("patch", "latent"), ("patch", "whole"))})
        if size <= reference_up_to:
            row["psnr_patch_vs_reference"] = psnr(images["patch"], to_unit(reference_patchwise(R, pair.reference, pair.z, size)))
        bench.add_row(row)


# ---------------------------------------------------------------- main


def measure_all(bench: Benchmark, args) -> None:
    """Parity, then each part asked for."""
    R = args.R
    with tempfile.TemporaryDirectory(prefix="infd-official-") as folder:
        checkpoint = functools.partial(make_checkpoint, R, Path(folder), args.ckpt, trunk=SMOKE_TRUNK if args.smoke else None, seed=args.seed)
        pair = Pair(R, checkpoint(args.width), bench.device, args.seed)
        with torch.no_grad():
            parity = psnr(render(pair.infd, pair.z, (256, 256), tile=None), to_unit(reference_one_piece(R, pair.reference, pair.z, 256)))
        bench.add_row({"section": "parity", "size": 256, "width": pair.width, "psnr_db": parity})
        if "time" in args.parts:
            measure_time(bench, R, pair, args.sizes, args.repeats)
        if args.profile:
            profile_renders(bench, R, pair)
        if "modes" in args.parts:
            measure_modes(bench, R, pair if args.modes_width == pair.width else Pair(R, checkpoint(args.modes_width), bench.device, args.seed), args.modes_sizes)
        if "memory" in args.parts:
            cuda_pair = (pair if args.memory_width == pair.width else Pair(R, checkpoint(args.memory_width), bench.device, args.seed)) if bench.device.type == "cuda" else None
            measure_memory(bench, R, args, checkpoint(args.memory_width), cuda_pair, args.memory_sizes)


def check_goals(rows: list[dict]) -> list[dict]:
    goals = [goal("one-piece 256² render, infd vs reference (dB)", r["psnr_db"], PARITY_PSNR_DB) for r in rows if r["section"] == "parity"]
    peaks = {r["size"]: r for r in rows if r["section"] == "memory" and r.get("infd_peak_mib")}
    if 8192 in peaks and 1024 in peaks:
        goals.append(goal(f"infd peak 8192² / 1024² (width {peaks[1024]['width']})", peaks[8192]["infd_peak_mib"] / peaks[1024]["infd_peak_mib"], GOAL_MEMORY_RATIO, "x", lower_is_better=True))
    modes = [r for r in rows if r["section"] == "modes" and r["seam_scale"] is not None]
    return goals + [goal(f"seam ratio, scale mode (the default), {r['size']}²", r["seam_scale"], GOAL_SEAM_FREE, lower_is_better=True) for r in modes]


def panels(rows: list[dict], memory_note: str) -> list[Panel]:
    out = []
    for section, title, unit, key in (("time", "Render time from z (decode phi + render)", "seconds", "s"), ("memory", "Peak memory during the render", "peak MiB", "peak_mib")):
        part = [dict(r, megapixels=r["size"] ** 2 / 1e6) for r in rows if r["section"] == section]
        series = [s for path, style in PATHS.items() for s in lines(part, "megapixels", f"{path}_{key}", label=path, **style)]
        if section == "memory":
            series += lines(part, "megapixels", "output_mib", label="output image, float32", color="lightgray", linestyle=":", marker="")
        note = f"renderer width {', '.join(sorted({str(r['width']) for r in part}))}" + (f"; {memory_note}" if section == "memory" else "")
        out.append(Panel(title, "output size", unit, series, logy=section == "time", note=note, xticks={r["megapixels"]: f"{r['size']}²" for r in part}))
    return out


def main() -> None:
    bench = Benchmark("official", __doc__)
    bench.add("--reference", type=Path, help="checkout of github.com/yinboc/infd (imported and run, never copied); required")
    bench.add("--ckpt", type=Path, help="a released reference checkpoint (AE or DM stage) instead of random weights")
    bench.add("--sizes", help="render-time sizes (default: CPU 512,1024,2048; CUDA 1024,2048,4096)")
    bench.add("--width", type=int, default=256, help="renderer width of the random model (the paper's: 256)")
    bench.add("--memory-sizes", default="1024,2048,4096,8192", help="peak-memory sizes")
    bench.add("--memory-width", type=int, help="renderer width of the peak-memory sweep (default: CPU 32; CUDA --width)")
    bench.add("--modes-sizes", default="256,1024,4096", help="statistics-mode sizes")
    bench.add("--modes-width", type=int, help="renderer width of the statistics-mode comparison (default: CPU 32; CUDA --width)")
    bench.add("--parts", default="time,memory,modes", help="of time, memory, modes")
    bench.add("--profile", action="store_true", help="also profile one 512² render of each path (top 5 ops)")
    bench.add("--seed", type=int, default=0)
    args = bench.parse()
    if args.reference is None:
        bench.parser.error("--reference PATH (a checkout of github.com/yinboc/infd) is required")
    if args.ckpt is not None and not args.ckpt.is_file():
        bench.parser.error(f"--ckpt {args.ckpt} does not exist; pass a checkpoint written by the paper's code (e.g. ae_ffhq/last-model.pth)")
    if unknown := set(args.parts.split(",")) - {"time", "memory", "modes"}:
        bench.parser.error(f"unknown --parts {', '.join(sorted(unknown))}; choose from time, memory, modes")
    if args.smoke:  # width 32: the least for GroupNorm's 32 groups
        args.sizes, args.memory_sizes, args.modes_sizes, args.repeats, args.width, args.memory_width, args.modes_width = "64,128", "64,256", "256,512", 1, 32, 32, 32
    args.parts, args.repeats = set(args.parts.split(",")), args.repeats or 3
    args.sizes = args.sizes or ("512,1024,2048" if args.device == "cpu" else "1024,2048,4096")
    args.sizes, args.memory_sizes, args.modes_sizes = ([int(s) for s in text.split(",")] for text in (args.sizes, args.memory_sizes, args.modes_sizes))
    try:
        args.R = import_reference(args.reference)
    except ReferenceUnavailable as error:
        bench.parser.exit(2, f"official.py: {error}.\n")
    args.width = checkpoint_args(args.ckpt)["args"]["renderer"]["args"]["net"]["args"]["hidden_channels"] if args.ckpt else args.width
    narrow = 32 if args.device == "cpu" else args.width
    args.memory_width, args.modes_width = args.memory_width or narrow, args.modes_width or narrow
    if any(w % 32 for w in (args.width, args.memory_width, args.modes_width)):
        bench.parser.error("renderer widths must be multiples of 32 (the GroupNorm has 32 groups)")
    settings = dict(reference=str(args.reference), reference_commit=git("rev-parse", "HEAD", cwd=args.reference), ckpt=str(args.ckpt) if args.ckpt else None)
    settings.update(model=PAPER_YAML + (" with a small trunk" if args.smoke else ""), widths=dict(time=args.width, memory=args.memory_width, modes=args.modes_width))
    bench.start("the paper's code vs infd, same weights", TABLES, **settings, patch=PATCH, padding=PADDING, tile=TILE, seed=args.seed)
    with bench.interruptible():
        measure_all(bench, args)
    bench.finish(check_goals(bench.rows), panels(bench.rows, "torch.cuda peak" if args.device == "cuda" else "peak RSS of a fresh process"))


if __name__ == "__main__":
    main()
