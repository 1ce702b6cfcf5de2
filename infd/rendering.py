"""Encode images to latents and render latents at any size, region and aspect ratio.

    model = load_autoencoder("runs/ae")
    z = encode(model, "photo.jpg")                       # (1, C, h, w), any input size
    img = render(model, z, size=(1536, 2048))            # (1, 3, 1536, 2048) in [0, 1]
    crop = render(model, z, size=(512, 512), box=Box(-0.25, -0.25, 0.25, 0.25))
    field = LatentField(model, z)                        # phi decoded once, for many renders
    small, large = field.image((256, 256)), field.image((2048, 2048))

The feature map is decoded once per call; the renderer then runs tile by tile, so memory
does not grow with the output size. Outputs too large to hold go to a `sink` (a callable
receiving each finished tile, e.g. `ArraySink` over a numpy memmap).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from infd import geometry, system
from infd.errors import InfdError
from infd.geometry import Box, Size, Window
from infd.images import lanczos_resize, load_image, pil_to_tensor, resize, to_uint8_hwc
from infd.models import NeuralFieldAutoencoder

# Largest output returned as one tensor (B * H * W pixels, 12 bytes each): 8192² fits.
MAX_RENDER_PIXELS = 8192 * 8192
DEFAULT_TILE = 512

Sink = Callable[[Window, torch.Tensor], None]

# Tiles reuse the memory of the tile before instead of page-faulting fresh pages in (see system.tune_allocator).
system.tune_allocator()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InfdError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InfdError(f"device '{device}' was asked for but no CUDA GPU is available; use --device cpu.")
    return resolved


def image_to_tensor(image: str | Path | Image.Image | np.ndarray | torch.Tensor, reduce_to: int | None = None) -> torch.Tensor:
    """Any image-like input -> (B, 3, H, W) float in [0, 1]; a huge file is decoded reduced
    to no less than `reduce_to` a side (`images.load_image`)."""
    if isinstance(image, (str, Path)):
        return load_image(image, reduce_to=reduce_to)[None]
    if isinstance(image, Image.Image):
        return pil_to_tensor(image)[None]
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        image = torch.from_numpy(array).permute(2, 0, 1)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] != 3:
        raise InfdError(f"an image tensor must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}.")
    if not torch.isfinite(image).all():
        raise InfdError("the image contains NaN or infinite values.")
    return image.float()


@torch.no_grad()
def encode(model: NeuralFieldAutoencoder, image, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Encode an image of any size and aspect: (B, 3, H, W) in [0, 1], a path or PIL -> z (B, C, h, w).

    The whole image is resized (antialiased) to the encoder's square input; the field's
    domain [-1, 1]² always spans the whole image, so render at the original aspect to get
    it back. A file path is decoded only as large as the encoder needs (huge files reduced
    while decoding, see `images.load_image`).
    """
    x = image_to_tensor(image, reduce_to=model.config.input_size)
    s = model.config.input_size
    param = next(model.parameters())
    resized = lanczos_resize(x, (s, s)) if getattr(model.config, "input_resampling", "antialias") == "lanczos" else resize(x, (s, s))
    x = resized.to(param.device, param.dtype) * 2 - 1
    return model.encode(x, sample=sample, generator=generator)


def check_latent(model: NeuralFieldAutoencoder, z: torch.Tensor) -> torch.Tensor:
    if z.ndim == 3:
        z = z[None]
    if tuple(z.shape[1:]) != tuple(model.latent_shape):
        raise InfdError(f"z has shape {tuple(z.shape[1:])} but this autoencoder's latents are {tuple(model.latent_shape)}.")
    if not torch.isfinite(z).all():
        raise InfdError("z contains NaN or infinite values.")
    return z


# bfloat16 is the default on CPUs where it is fast only while it changes the shipped model's
# held-out PSNR by under 0.05 dB. The weights trained to +2 dB over the thumbnail floor lose
# 0.051 dB at 512 (and 0.021 at 2048) and gain visible rounding noise in flat areas, so
# commands render in float32 unless given --bf16 (README, "Fidelity on the held-out wallpapers").
BF16_BY_DEFAULT_ON_NATIVE_CPUS = False
SLOW_BF16_MESSAGE = (
    "bfloat16 was asked for, but this {device} has no fast bfloat16 (see `infd doctor`), "
    "so infd runs in float32 instead (faster here, and more precise)."
)


class PrecisionWarning(UserWarning):
    """A render runs in another precision than the one asked for (bfloat16 on a machine without fast bfloat16)."""


_warned_slow_bf16 = False  # the fallback warns once per process


def effective_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype | None:
    """The precision a render (or sampling) on `device` runs in when `dtype` is asked for.

    bfloat16 only where it is fast (`system.fast_bf16`: CUDA GPUs, CPUs with bfloat16
    instructions); elsewhere float32 (None), with one PrecisionWarning per process, since
    emulated bfloat16 is both slower and less exact. Every render precision goes through here
    (`autocast`, `render_dtype`), so `render(dtype=torch.bfloat16)`, `LatentField`, the
    exports, the viewer, the evaluation and the commands' --bf16 all fall back alike.
    """
    global _warned_slow_bf16
    if dtype != torch.bfloat16 or system.fast_bf16(device):
        return dtype
    if not _warned_slow_bf16:
        _warned_slow_bf16 = True
        # warn_explicit without a source line: one line on stderr, under the CLI as in a script.
        warnings.warn_explicit(SLOW_BF16_MESSAGE.format(device="CPU" if device.type == "cpu" else device.type), PrecisionWarning, "infd", 0)
    return None


def render_dtype(device: torch.device, bf16: bool | None = None) -> torch.dtype | None:
    """The precision of a command's render: bfloat16 when asked (True) and fast here (`effective_dtype`), float32 when asked (False).

    By default (None) float32; bfloat16 on CPUs with fast bfloat16 only while
    BF16_BY_DEFAULT_ON_NATIVE_CPUS holds (it renders 2048² 2.8x faster there, but the
    shipped model's PSNR changes by more than the 0.05 dB that allows; see above).
    """
    if bf16 is None:
        bf16 = BF16_BY_DEFAULT_ON_NATIVE_CPUS and device.type == "cpu" and system.fast_bf16(device)
    return effective_dtype(device, torch.bfloat16 if bf16 else None)


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to `effective_dtype(device, dtype)` (bfloat16/float16) on `device`; a no-op for None or float32."""
    dtype = effective_dtype(device, dtype)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype not in (None, torch.float32))


def to_unit_rgb(rgb: torch.Tensor) -> torch.Tensor:
    """A renderer's output (about [-1, 1], any dtype and device) as float32 in [0, 1] on the CPU."""
    return ((rgb.float() + 1) / 2).clamp(0, 1).cpu()


def finished_tile(rgb: torch.Tensor) -> torch.Tensor:
    """`to_unit_rgb` of a tile a render returns or writes, refusing NaN or infinite pixels.

    Clamping and quantising would turn them into plausible-looking black or white, so
    every output (images, exports, viewer tiles) goes through this check before anything
    is written.
    """
    if not torch.isfinite(rgb).all():
        raise InfdError("the render has NaN or infinite pixels, so nothing was written; the latent does not suit this autoencoder (or its weights are broken).")
    return to_unit_rgb(rgb)


def render_prepared(
    model: NeuralFieldAutoencoder, state: torch.Tensor, box: Box, size: Size, window: Window | None = None, renderer: str | None = None
) -> torch.Tensor:
    """Differentiable render of `window` of an H x W grid over `box`: (B, 3, h, w) in about [-1, 1].

    `state` is `model.prepare_render(z, renderer)` (phi, decoded once); the window's halo
    (that of `renderer`, default the model's own) is added here. Training and inversion
    call this directly; everything that only looks at pixels goes through `LatentField`.
    """
    size = geometry.check_size(size)
    if model.get_renderer(renderer).grid_dependent:  # its own way to render a window of a grid (e.g. patch-wise)
        return model.get_renderer(renderer).render_grid_window(state, box, size, window)
    ys, xs = geometry.window_centers(box, size, window, halo=model.get_renderer(renderer).halo)
    b = state.shape[0]
    cell = torch.tensor(geometry.cell_size(box, size), dtype=torch.float64).expand(b, 2)
    return model.render_window(state, ys.expand(b, -1), xs.expand(b, -1), cell, renderer)


class LatentField:
    """The neural fields of latents z (B, C, h, w): phi decoded once, then any windows of any grids rendered.

    `box` is the region every grid spans (default: the whole image); `dtype`
    (bfloat16/float16) renders under autocast; `renderer="fixed"` renders the fixed head
    upsampled (the baseline). `render`, `image` and `tiles` all return finished pixels:
    float32 in [0, 1] on the CPU, refusing NaN or infinite ones. `infd render`,
    `infd reconstruct`, the exports, the viewer and the evaluation all render through here.
    The renderer and z are checked here, and phi is decoded at the first render, so that a
    render's own checks (size, memory) also come before any work.
    """

    def __init__(
        self,
        model: NeuralFieldAutoencoder,
        z: torch.Tensor,
        box: Box | None = None,
        renderer: str | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.halo = model.get_renderer(renderer).halo  # an unknown or missing renderer fails here
        self.z = check_latent(model, z)
        self.model, self.box, self.renderer, self.dtype = model, box or Box.full(), renderer, dtype
        self.device = next(model.parameters()).device
        self.batch = self.z.shape[0]
        self.grid_states: dict[tuple, torch.Tensor] = {}

    def grid_state(self, box: Box, size: Size) -> torch.Tensor:
        """The state for windows of the grid `size` over `box`: `state` itself unless the renderer is grid-dependent
        (then computed once per grid and kept, e.g. GroupNorm statistics of that whole render)."""
        renderer = self.model.get_renderer(self.renderer)
        if not renderer.grid_dependent:
            return self.state
        key = (tuple(size), box)
        if key not in self.grid_states:
            with torch.no_grad(), autocast(self.device, self.dtype):
                self.grid_states[key] = renderer.grid_state(self.state, box, tuple(size))
        return self.grid_states[key]

    @functools.cached_property
    def state(self) -> torch.Tensor:
        """`model.prepare_render(z)`: phi (and what the renderer derives from it), decoded once."""
        param = next(self.model.parameters())
        with torch.no_grad(), autocast(self.device, self.dtype):
            return self.model.prepare_render(self.z.to(param.device, param.dtype), self.renderer)

    @torch.no_grad()
    def render(self, requests: Sequence[tuple[Size, Window]], box: Box | None = None) -> torch.Tensor:
        """Windows of equal size, each of its own grid (size, window) over `box` (default: the field's).

        Returns (n, 3, h, w) for n requests of one latent, or (B, 3, h, w) for one request
        of B latents. Windows of several grids (Deep Zoom levels) go into one renderer
        call, which is what makes serving tiles to many clients cheap on a GPU.
        """
        box = box or self.box
        shapes = {(window.height, window.width) for _, window in requests}
        if len(shapes) != 1:
            raise InfdError(f"windows rendered together must all have one size, got {sorted(shapes)}.")
        if self.batch > 1 and len(requests) > 1:
            raise InfdError(f"windows of several grids are rendered together for one latent only, this field holds {self.batch}.")
        if self.model.get_renderer(self.renderer).grid_dependent and len(requests) > 1:  # each grid has its own state
            return torch.cat([self.render([request], box) for request in requests])
        if len(requests) == 1:
            (size, window), = requests
            with autocast(self.device, self.dtype):
                return finished_tile(render_prepared(self.model, self.grid_state(box, size), box, size, window, self.renderer))
        centers = [geometry.window_centers(box, size, window, self.halo) for size, window in requests]
        ys = torch.stack([y for y, _ in centers])
        xs = torch.stack([x for _, x in centers])
        cell = torch.tensor([geometry.cell_size(box, size) for size, _ in requests], dtype=torch.float64)
        state = self.state.expand(len(requests), *self.state.shape[1:])  # a view: phi is not copied
        with autocast(self.device, self.dtype):
            rgb = self.model.render_window(state, ys, xs, cell, self.renderer)
        return finished_tile(rgb)

    def image(
        self,
        size: Size,
        tile: int | Size | None = DEFAULT_TILE,
        sink: Sink | None = None,
        max_pixels: int = MAX_RENDER_PIXELS,
        progress: bool = False,
        box: Box | None = None,
    ) -> torch.Tensor | None:
        """The whole H x W grid over `box`, tile by tile: (B, 3, H, W), or None when a `sink` takes the tiles."""
        size = geometry.check_size(size)
        check_render_memory(self.batch, size, sink, max_pixels)
        windows = geometry.tiles(size, size if tile is None else geometry.check_tile(tile))
        output = None if sink is not None else torch.empty(self.batch, 3, *size)
        for window in tqdm(windows, desc="render", unit="tile", disable=not progress or len(windows) == 1):
            rgb = self.render([(size, window)], box)
            if output is None:
                sink(window, rgb)
            else:
                output[:, :, window.top : window.top + window.height, window.left : window.left + window.width] = rgb
        return output

    def tiles(self, size: Size, tile: int | Size, box: Box | None = None) -> Iterator[tuple[Window, np.ndarray]]:
        """The H x W grid over `box` of the first latent tile by tile, row-major: (window, (h, w, 3) uint8)."""
        for window in geometry.tiles(size, tile):
            yield window, to_uint8_hwc(self.render([(size, window)], box)[:1])


def check_render_memory(batch: int, size: Size, sink: Sink | None, max_pixels: int = MAX_RENDER_PIXELS) -> None:
    """Refuse a render returned as one tensor that would not fit (12 bytes a pixel): pass a sink instead."""
    h, w = size
    if sink is None and batch * h * w > max_pixels:
        gib = batch * h * w * 12 / 2**30
        raise InfdError(
            f"a {w}x{h} render of {batch} image(s) would need {gib:.1f} GiB in memory; "
            "pass a sink (e.g. infd.rendering.ArraySink over a numpy memmap) or a smaller size."
        )


@torch.no_grad()
def render(
    model: NeuralFieldAutoencoder,
    z: torch.Tensor,
    size: Size,
    box: Box | None = None,
    tile: int | Size | None = DEFAULT_TILE,
    sink: Sink | None = None,
    dtype: torch.dtype | None = None,
    max_pixels: int = MAX_RENDER_PIXELS,
    progress: bool = False,
    renderer: str | None = None,
) -> torch.Tensor | None:
    """Render latents z (B, C, h, w) as H x W images of `box` (default: the whole image).

    Returns (B, 3, H, W) float32 in [0, 1] on the CPU, or None when a `sink` takes the
    tiles (each call: sink(window, tile (B, 3, h, w))). `tile=None` renders in one piece;
    the result is the same for every tile size. `dtype` (bfloat16/float16) runs the
    renderer under autocast. `renderer="fixed"` renders with the model's fixed-resolution
    head (the upsampled baseline) instead of its own renderer. Every check runs before phi
    is decoded.
    """
    return LatentField(model, z, box, renderer, dtype).image(size, tile, sink, max_pixels, progress)


class ArraySink:
    """Writes tiles into an (H, W, 3) or (B, H, W, 3) array, e.g. a numpy memmap; uint8 arrays are quantised."""

    def __init__(self, array: np.ndarray):
        if array.ndim not in (3, 4) or array.shape[-1] != 3:
            raise InfdError(f"an ArraySink array must be (H, W, 3) or (B, H, W, 3), got {array.shape}.")
        self.array = array

    def __call__(self, window: Window, tile: torch.Tensor) -> None:
        values = tile.permute(0, 2, 3, 1).numpy()
        if self.array.dtype == np.uint8:
            values = np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)
        rows = slice(window.top, window.top + window.height)
        cols = slice(window.left, window.left + window.width)
        if self.array.ndim == 3:
            self.array[rows, cols] = values[0]
        else:
            self.array[:, rows, cols] = values
