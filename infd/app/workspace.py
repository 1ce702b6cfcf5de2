"""What `infd app` does, without the web page: the models it serves, and each tab's work.

    space = Workspace(["weights/wallpapers"], device="cpu")
    picture = space.generate("wallpapers", seed=7, width=2048, height=1152, steps=None, job=Job())
    zoom, cut, box = space.explore(picture, centre=(0.1, -0.3), magnification=16, long_side=1024, job=Job())

Every model is loaded once, at start-up, with a `TileService` for its zoom viewer; the
tabs and the viewers share the model. A tab's result is a `Picture`: a latent with its
aspect and a render of it, which Explore, the zoom video and the viewer all start from.
Work reports its progress and checks for a cancel through a `Job` at every sampler step
and every tile, so Cancel stops it within one step. Every user error is an `InfdError`
sentence, the CLI's own.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from infd import geometry
from infd.errors import InfdError
from infd.geometry import Box, Size
from infd.rendering import MAX_RENDER_PIXELS, LatentField, encode, render_dtype

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "weights" / "wallpapers"  # the shipped pipeline, in a clone
MAX_MAGNIFICATION = 64
MAX_EXPORT_SIDE = 32768  # a streamed .tif from the page; `infd render` goes further
PREVIEW_SIDE = 2048  # what the page shows of a streamed export
MAX_UPLOAD_PIXELS = 2**26  # the CLI reads up to 2^28; a shared page keeps four times less per request
LAYOUT_NEEDS_CLIP = (
    "Layout needs CLIP weights on this machine (nothing is downloaded): start `infd app --clip PATH`, or type PATH in the CLIP field, "
    "where PATH is a transformers CLIP folder, an open_clip folder, or an open_clip checkpoint file with its architecture (e.g. ViT-B-32)."
)
KEEP_LATENTS = 256  # latents a viewer keeps from the tabs (oldest dropped)
RANDOM_SEEDS = 2**32
TILE = 512


class Cancelled(Exception):
    """The user pressed Cancel; the work stopped at a step boundary and wrote nothing."""


@dataclass
class Job:
    """Progress and cancellation of one request: `report(fraction, text)` is called at every step."""

    report: Callable[[float, str], None] = lambda fraction, text: None
    cancel: threading.Event = field(default_factory=threading.Event)

    def tick(self, done: int, total: int, text: str) -> None:
        """Report `done` of `total`; raise Cancelled when the user asked to stop."""
        if self.cancel.is_set():
            raise Cancelled()
        self.report(done / max(1, total), text)

    def steps(self, items: Iterable, total: int, text: str) -> Iterator:
        """`items`, each reported as it starts, stopping with Cancelled when asked to."""
        for done, item in enumerate(items):
            self.tick(done, total, text)
            yield item
        self.tick(total, total, text)


@dataclass
class Slot:
    """One model of the picker: its autoencoder, its pipeline (None for an autoencoder alone) and its zoom viewer."""

    name: str
    path: str
    autoencoder: torch.nn.Module
    pipe: object | None
    service: object  # infd.viewer.service.TileService
    first: str  # the latent the viewer opens with
    mount: str  # where the viewer is served, e.g. /viewer/0/
    kept: OrderedDict = field(default_factory=OrderedDict)  # ids this slot added to its viewer, oldest first

    @property
    def kind(self) -> str:
        return "pipeline" if self.pipe is not None else "autoencoder"


@dataclass
class Picture:
    """A latent shown by the app: z (1, C, h, w), the aspect of its image, a render of it and how to get it again."""

    model: str
    z: torch.Tensor
    aspect: float
    render: np.ndarray  # (H, W, 3) uint8: the image shown (for a streamed export, its preview)
    label: str
    reproduce: str
    viewer: str  # the zoom viewer's address of this latent
    file: Path | None = None  # the full-size download, when it is not `render`
    seed: int | None = None  # the seed it was sampled from


# ---------------------------------------------------------------- models


def slot_name(path: Path, taken: set[str]) -> str:
    """A short unique name for the picker: the folder's name (its parent's too for a run's checkpoint)."""
    name = path.name if path.name not in ("autoencoder",) and not path.name.startswith("step_") else f"{path.parent.parent.name}/{path.name}"
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name} ({n})", n + 1
    return unique


class Workspace:
    """The models of `infd app` (see the module docstring)."""

    def __init__(self, paths: list[str | Path], device: str = "auto", bf16: bool | None = None, tile_size: int = 254, max_view: int = 4096 * 4096):
        from infd.commands.invert import load_generator
        from infd.viewer.service import DEFAULT_VIRTUAL_SIDE, LatentBook, TileService

        if not paths:
            raise InfdError(f"no model to serve: pass --model PATH (a pipeline folder such as {DEFAULT_MODEL}).")
        self.folder = Path(tempfile.mkdtemp(prefix="infd-app-"))  # downloads: videos and streamed exports
        self.slots: dict[str, Slot] = {}
        self.max_view = max_view
        for number, path in enumerate(paths):
            autoencoder, pipe = load_generator(Path(path), device)
            if pipe is not None:
                pipe.set_progress_bar_config(disable=True)
                pipe.use_sampler("ddim")  # `infd sample`'s default, so a seed gives the CLI's image
            book = LatentBook(pipe, (DEFAULT_VIRTUAL_SIDE,) * 2, pipe.default_steps if pipe is not None else 50, ckpt=str(path))
            first = "seed-0"
            if pipe is None:  # a viewer needs a latent to open with: a flat grey until something is reconstructed
                first = book.add(torch.zeros(1, *autoencoder.latent_shape), "nothing yet: reconstruct an image", "", (DEFAULT_VIRTUAL_SIDE,) * 2).zid
            service = TileService(autoencoder, book, tile_size, max_batch=32 if next(autoencoder.parameters()).is_cuda else 1)
            name = slot_name(Path(path), set(self.slots))
            self.slots[name] = Slot(name, str(path), autoencoder, pipe, service, first, f"/viewer/{number}/")
        self.dtype = render_dtype(next(next(iter(self.slots.values())).autoencoder.parameters()).device, bf16)

    def slot(self, name: str) -> Slot:
        if name not in self.slots:
            raise InfdError(f"unknown model '{name}'; choose one of {', '.join(self.slots)}.")
        return self.slots[name]

    @property
    def pipelines(self) -> list[str]:
        return [name for name, slot in self.slots.items() if slot.pipe is not None]

    def show_in_viewer(self, slot: Slot, z: torch.Tensor, aspect: float, label: str, reproduce: str) -> str:
        """Add z to the slot's viewer (at its aspect) and return the viewer's address of it."""
        from infd.viewer.service import DEFAULT_VIRTUAL_SIDE

        size = geometry.fit_size(DEFAULT_VIRTUAL_SIDE, aspect)
        zid = slot.service.book.add(z, label, reproduce, size).zid
        slot.kept[zid] = None
        slot.kept.move_to_end(zid)
        while len(slot.kept) > KEEP_LATENTS:
            old, _ = slot.kept.popitem(last=False)
            if old != slot.first:  # the latent the viewer opens with stays
                slot.service.book.added.pop(old, None)
        return f"{slot.mount}?z={zid}"

    # ------------------------------------------------------------ tabs

    def generate(self, name: str, seed: int | None, width: int, height: int, steps: int | None, job: Job) -> Picture:
        """Sample z from `seed` (None: a random one) exactly as `infd sample --seed` does, and render it at width x height.

        Up to MAX_RENDER_PIXELS the image is rendered in memory; larger ones stream to a
        pyramidal .tif (up to MAX_EXPORT_SIDE a side), with a preview for the page.
        """
        from infd.diffusion import check_sampling, check_seed, sample

        slot = self.slot(name)
        if slot.pipe is None:
            raise InfdError(f"'{name}' is an autoencoder without a diffusion model, so it cannot generate; pick a pipeline, or use Reconstruct.")
        size = _whole_size(height, width)
        if max(size) > MAX_EXPORT_SIDE:
            raise InfdError(f"{width}x{height} has a side longer than the {MAX_EXPORT_SIDE} pixels the app renders; use `infd render --size` for larger.")
        seed = int(np.random.default_rng().integers(RANDOM_SEEDS)) if seed is None else seed
        check_seed(seed, what="the seed")
        pipe = slot.pipe
        steps = pipe.default_steps if steps is None else steps
        check_sampling(pipe.scheduler, steps, pipe.default_eta)
        generator = [torch.Generator().manual_seed(seed)]  # as `infd sample --seed S --n 1` seeds sample 0
        shape = (1, *slot.autoencoder.latent_shape)
        with torch.no_grad():
            x = sample(pipe.unet, pipe.scheduler, shape, steps, generator, pipe.default_eta, progress=lambda timesteps: job.steps(timesteps, steps, "sampling"))
        z = slot.autoencoder.from_diffusion(x).float().cpu()
        aspect = width / height
        label = f"seed {seed}, {width}x{height}"
        reproduce = f"infd sample --ckpt {slot.path} --seed {seed} --n 1 --steps {steps} --size {width}x{height}"
        viewer = self.show_in_viewer(slot, z, aspect, label, reproduce)
        field_ = LatentField(slot.autoencoder, z, dtype=self.dtype)
        if size[0] * size[1] <= MAX_RENDER_PIXELS:
            return Picture(name, z, aspect, self._render(field_, size, None, job), label, reproduce, viewer, seed=seed)
        out = self.folder / f"infd-seed{seed}-{width}x{height}.tif"
        self._export_tiff(field_, size, out, job)
        preview = self._render(field_, geometry.fit_size(PREVIEW_SIDE, aspect), None, job)
        return Picture(name, z, aspect, preview, label, reproduce, viewer, out, seed)

    def explore(self, picture: Picture, centre: tuple[float, float], magnification: float, long_side: int, job: Job) -> tuple[np.ndarray, np.ndarray, Box]:
        """The region `magnification` times smaller than the image around `centre` (y, x in image units), at `long_side`.

        Returns (rendered from the field, the same region cut from the shown render and
        upsampled bicubic, the box): the difference is the detail the field adds.
        """
        from infd.evaluation import Floor, reconstruction

        box = zoom_region(centre, magnification)
        size = geometry.fit_size(_whole_number(long_side, "the output size"), picture.aspect, box)
        _check_in_memory(size)
        slot = self.slot(picture.model)
        rendered = self._render(LatentField(slot.autoencoder, picture.z, dtype=self.dtype), size, box, job)
        shown = torch.from_numpy(picture.render).permute(2, 0, 1).float() / 255
        upsampled = reconstruction(Floor("shown", tuple(shown.shape[-2:]), "the shown render"), shown, None, None)(size, box)
        return rendered, _to_uint8(upsampled), box

    def zoom_video(self, picture: Picture, box: Box, long_side: int, frames: int, job: Job, fps: float = 24) -> Path:
        """An MP4 zoom from the whole image into `box`, every frame rendered from the field (`infd zoom-video`)."""
        from infd.viewer import video

        out = self.folder / f"zoom-{time.time_ns()}.mp4"
        suffix = video.check_video_options(out, box, frames, fps)
        size = video.video_size(_whole_number(long_side, "the video size"), picture.aspect, suffix)
        slot = self.slot(picture.model)
        boxes = video.zoom_path(Box.full(), box, frames, picture.aspect, size)
        field_ = LatentField(slot.autoencoder, picture.z, dtype=self.dtype)
        frames_out = (self._render(field_, size, b, None) for b in job.steps(boxes, len(boxes), "zoom video"))
        video.write_video(frames_out, size, out, fps)
        return out

    def reconstruct(self, name: str, path: str | Path, long_side: int | None, job: Job) -> tuple[Picture, list[tuple[str, np.ndarray, float | None]]]:
        """Encode an uploaded image and render it at its aspect, `long_side` on the long side (None: its own size).

        Returns the picture and, beside the model's render, the model-free floors of
        `infd eval-ae` (its latent's worth of thumbnail, its encoder input; bicubic up),
        each with its PSNR against the image resized to the same size (None when the
        render is larger than the image, which has no ground truth there).
        """
        from infd.evaluation import floors_for, reconstruction, scaled_size
        from infd.evaluation.metrics import psnr
        from infd.images import image_size, load_image, resize

        slot = self.slot(name)
        native = image_size(path, MAX_UPLOAD_PIXELS)
        long_side = max(native) if long_side is None else _whole_number(long_side, "the scale")
        size = scaled_size(native, long_side)
        _check_in_memory(size)
        job.report(0.0, "reading the image")
        image = load_image(path, MAX_UPLOAD_PIXELS, reduce_to=max(min(long_side, max(native)), slot.autoencoder.config.input_size))
        truth = resize(image[None], size)[0] if long_side <= max(native) else None
        z = encode(slot.autoencoder, image[None]).float().cpu()
        aspect = native[1] / native[0]
        label = f"{Path(path).name} reconstructed"
        reproduce = f"infd reconstruct IMAGE --ckpt {slot.path} --size {long_side}"
        viewer = self.show_in_viewer(slot, z, aspect, label, reproduce)
        rendered = self._render(LatentField(slot.autoencoder, z, dtype=self.dtype), size, None, job)
        rows = [("infd", rendered)]
        for floor in floors_for(slot.autoencoder):
            rows.append((f"{floor.label} floor", _to_uint8(reconstruction(floor, image, None, None)(size, Box.full()))))
        scored = [(label_, pixels, _psnr(psnr, pixels, truth)) for label_, pixels in rows]
        return Picture(name, z, aspect, rendered, label, reproduce, viewer), scored

    def layout(self, name: str, regions: list[tuple[Box, str]], width: int, height: int, steps: int, seed: int, clip: str | None, clip_arch: str | None, job: Job) -> Picture:
        """Layout-to-image: z whose render shows each prompt in its box, by any-scale inversion scored by a local CLIP."""
        from infd import inversion
        from infd.commands.invert import _critics
        from infd.inversion.conditions import TextRegion, check_box

        slot = self.slot(name)
        if not regions:
            raise InfdError("add at least one box with a prompt.")
        if not clip:
            raise InfdError(LAYOUT_NEEDS_CLIP)
        problem = inversion.InversionSpec(
            [TextRegion(check_box(box, f"box {i + 1}"), prompt) for i, (box, prompt) in enumerate(regions)],
            canvas=_whole_size(height, width),
            clip=clip,
            clip_arch=clip_arch,
        )
        problem.solver.steps, problem.solver.seed = _whole_number(steps, "the steps"), seed
        problem.solver.check()
        inversion.check_bounds(problem)
        _check_in_memory(problem.canvas)
        inversion.check_solvable(problem.solver, slot.pipe, False)
        job.report(0.0, "loading CLIP")
        critics = _critics(problem, next(slot.autoencoder.parameters()).device)
        job.report(0.0, "inverting")
        result = inversion.invert(slot.autoencoder, problem, critics, slot.pipe, None, progress=True)
        z = result.z.float().cpu()
        aspect = width / height
        prompts = "; ".join(prompt for _, prompt in regions)
        label = f"layout: {prompts}"[:120]
        texts = " ".join(f"--text '{box.y0:g},{box.x0:g},{box.y1:g},{box.x1:g}:{prompt}'" for box, prompt in regions)
        reproduce = f"infd invert --ckpt {slot.path} --clip {clip} --size {width}x{height} --steps {steps} --seed {seed} {texts} --out OUT"
        viewer = self.show_in_viewer(slot, z, aspect, label, reproduce)
        rendered = self._render(LatentField(slot.autoencoder, z, dtype=self.dtype), problem.canvas, None, job)
        return Picture(name, z, aspect, rendered, label, reproduce, viewer)

    # ------------------------------------------------------------ rendering

    def _render(self, field_: LatentField, size: Size, box: Box | None, job: Job | None) -> np.ndarray:
        """(H, W, 3) uint8 of `box` at `size`, tile by tile (each tile a step of `job`)."""
        from infd.rendering import ArraySink

        canvas = np.empty((*size, 3), dtype=np.uint8)
        write = ArraySink(canvas)
        count, done = len(geometry.tiles(size, TILE)), itertools.count(1)

        def sink(window, tile) -> None:
            write(window, tile)
            if job is not None:
                job.tick(next(done), count, "rendering")

        field_.image(size, TILE, sink=sink, box=box)
        return canvas

    def _export_tiff(self, field_: LatentField, size: Size, out: Path, job: Job) -> None:
        from infd.viewer.deepzoom import export_tiff

        job.report(0.0, f"streaming {size[1]}x{size[0]} to a .tif")
        if job.cancel.is_set():
            raise Cancelled()
        export_tiff(field_, size, out, progress=True)


# ---------------------------------------------------------------- helpers


def zoom_region(centre: tuple[float, float], magnification: float) -> Box:
    """The box `magnification` times smaller than the image around `centre` (y, x), moved inside the image."""
    if not (isinstance(magnification, (int, float)) and math.isfinite(magnification) and 1 <= magnification <= MAX_MAGNIFICATION):
        raise InfdError(f"the magnification must be from 1 to {MAX_MAGNIFICATION}, got {magnification}.")
    half = 1 / magnification
    cy, cx = (min(max(c, -1 + half), 1 - half) for c in centre)
    return Box(cy - half, cx - half, cy + half, cx + half)


def _whole_number(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value) or value < 1:
        raise InfdError(f"{what} must be a whole number of at least 1, got {value}.")
    return int(value)


def _whole_size(height, width) -> Size:
    return _whole_number(height, "the height"), _whole_number(width, "the width")


def _check_in_memory(size: Size) -> None:
    from infd.commands.common import check_output_pixels

    check_output_pixels(*size)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    from infd.images import to_uint8_hwc

    return to_uint8_hwc(image)


def _psnr(psnr, pixels: np.ndarray, truth: torch.Tensor | None) -> float | None:
    if truth is None:
        return None
    shown = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255  # as the page shows it: 8-bit
    return float(psnr(shown, truth[None]))
