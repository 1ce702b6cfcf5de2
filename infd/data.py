"""Mixed-resolution training data (DESIGN.md, "Training the autoencoder").

A sample pairs the encoder input (the whole image at a fixed square size) with a target
crop of the image downsampled to a random resolution between the input size and the
native size, plus the exact pixel centers (`coord`) and pixel size (`cell`) of that crop
in the image's [-1, 1]² domain, so the renderer can be queried at precisely those pixels.

A sample is a pure function of (seed, global sample counter): resuming a run at step s
reproduces the very batches an uninterrupted run would have seen, whatever the number
of DataLoader workers or processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from infd import geometry
from infd.errors import InfdError, check_choice
from infd.geometry import Size
from infd.images import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, ImageError, image_size, load_image, resize, resize_window, unit_float

log = logging.getLogger(__name__)

WALLPAPER_HOLDOUT: tuple[str, ...] = (
    "Altai.jpg",
    "ColorfulCups.jpg",
    "Kite.jpg",
    "Opal.jpg",
    "adwaita-l.jpg",
    "desert.jpg",
    "goldfish.jpg",
    "truchet-d.jpg",
)
"""The fixed evaluation split of ../shared/data/wallpapers: never used for training.

Pass it as `exclude=WALLPAPER_HOLDOUT` when training on the wallpapers, and evaluate on
exactly these files, so numbers from different runs are comparable."""

ASPECT_MODES = ("squash", "crop")
CROP_SAMPLINGS = ("inside", "cover")


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under `root`, recursively, sorted; hidden files and folders are ignored.

    Hidden entries are skipped because they are never training data: half-written
    `.name.tmp-*` files of atomic writes, `.ipynb_checkpoints`, macOS `._*` forks.
    """
    root = Path(root)
    if not root.is_dir():
        raise InfdError(f"image folder {root} does not exist or is not a folder; pass a folder of images.")
    paths = sorted(
        path
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and path.is_file()
    )
    if not paths:
        raise InfdError(f"{root} contains no images (files ending in {', '.join(IMAGE_SUFFIXES)}).")
    return paths


@dataclass
class DataConfig:
    """How training pairs are cut from an image.

    aspect "squash": the whole image is resized to input_size² for the encoder and the
    field's domain [-1, 1]² spans the whole image, so non-square images have anisotropic
    cells. aspect "crop": a random square crop of the native image, as large as its short
    side, is used as the image.

    crop_sampling "inside": the crop's corner is uniform over the positions inside the
    image, so a pixel within a crop's width of the border is in fewer crops than the
    interior's (the outermost in 1/crop_size as many) and the model learns the border
    band least. "cover": the corner is uniform over every position where the crop
    overlaps the image, then moved inside, so no pixel is in fewer crops than the
    interior's (those near the border in up to twice as many).
    """

    input_size: int = 256  # encoder input, square
    crop_size: int = 256  # target crop, square
    aspect: str = "squash"
    max_pixels: int = MAX_IMAGE_PIXELS
    crop_sampling: str = "inside"

    def __post_init__(self) -> None:
        for name in ("input_size", "crop_size", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InfdError(f"DataConfig.{name} must be a positive whole number, got {value!r}.")
        if self.aspect not in ASPECT_MODES:
            raise InfdError(f"DataConfig.aspect must be one of {', '.join(ASPECT_MODES)}, got {self.aspect!r}.")
        check_choice(self.crop_sampling, CROP_SAMPLINGS, "DataConfig.crop_sampling")


# ------------------------------------------------------------------ one training pair


def min_target_scale(native: Size, input_size: int, crop_size: int) -> float:
    """Smallest downsampling factor: the long side stays >= input_size, both sides >= crop_size."""
    h, w = native
    return min(1.0, max(input_size / max(h, w), crop_size / h, crop_size / w))


def target_resolution(native: Size, scale: float, crop_size: int) -> Size:
    """(rh, rw): the native size times `scale`, rounded, kept within [crop_size, native]."""
    h, w = native
    return (
        min(h, max(crop_size, round(scale * h))),
        min(w, max(crop_size, round(scale * w))),
    )


def make_sample(image: torch.Tensor, config: DataConfig, generator: torch.Generator, inp: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One mixed-resolution training pair cut from `image` (3, H, W) in [0, 1] (float, or uint8 0..255).

    `inp`: the image already resized to the encoder input (a cached "squash" input), or None.

    Returns inp (3, S, S) and gt (3, c, c) in [-1, 1]; size (rh, rw) the target
    resolution; window (top, left) of the crop in it; coord (c, c, 2) the crop's pixel
    centers and cell (2,) its pixel size, both in the image's [-1, 1]² domain.
    All randomness comes from `generator`, always drawn in the same order.
    """
    c = config.crop_size
    if config.aspect == "crop":
        image = _random_square_crop(image, generator)
    native = (image.shape[-2], image.shape[-1])
    if inp is None:
        inp = resize(unit_float(image), (config.input_size, config.input_size))

    lowest = min_target_scale(native, config.input_size, c)
    scale = lowest + (1 - lowest) * torch.rand((), generator=generator, dtype=torch.float64).item()
    rh, rw = target_resolution(native, scale, c)
    top, left = crop_start(rh, c, config.crop_sampling, generator), crop_start(rw, c, config.crop_sampling, generator)
    # Only the crop of the downsampled image is computed (a few ms instead of tens for a
    # 2048² image); at native resolution the crop is the native pixels themselves.
    gt = resize_window(image, (rh, rw), geometry.Window(top, left, c, c))

    box = geometry.crop_box((rh, rw), top, left, (c, c))
    return {
        "inp": _to_signed(inp),
        "gt": _to_signed(gt),
        "size": torch.tensor([rh, rw], dtype=torch.long),
        "window": torch.tensor([top, left], dtype=torch.long),
        "coord": geometry.coord_grid(box, (c, c)),
        "cell": torch.tensor(geometry.cell_size(geometry.Box.full(), (rh, rw)), dtype=torch.float32),
    }


def crop_start(length: int, crop: int, sampling: str, generator: torch.Generator) -> int:
    """First index of a `crop`-long window in `length` (see DataConfig.crop_sampling); one draw from `generator`."""
    if sampling == "inside":
        return _randint(length - crop + 1, generator)
    start = _randint(length + crop - 1, generator) - (crop - 1)  # any window overlapping [0, length)
    return min(max(start, 0), length - crop)


def _random_square_crop(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(3, H, W) -> (3, s, s) with s = min(H, W), at a random position."""
    h, w = image.shape[-2:]
    side = min(h, w)
    top, left = _randint(h - side + 1, generator), _randint(w - side + 1, generator)
    return image[:, top : top + side, left : left + side]


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=generator).item())


def _to_signed(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], as a compact tensor: a view would ship its whole parent image
    between DataLoader processes."""
    return (image * 2 - 1).contiguous()


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple, e.g. ("sample", seed, counter); distinct tuples give
    unrelated streams (unlike seed * k + counter, which collides across seeds)."""
    canonical = tuple(part if isinstance(part, str) else int(part) for part in parts)  # np.int64(3) -> 3
    digest = hashlib.blake2b(repr(canonical).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def epoch_order(length: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch `epoch` visits items 0 .. length - 1: a permutation seeded by (seed, epoch)."""
    generator = torch.Generator().manual_seed(mix_seed("epoch", seed, epoch))
    return torch.randperm(length, generator=generator).tolist()


def _compact(image: torch.Tensor) -> torch.Tensor:
    """An image as uint8 when that is exact (8-bit sources: 4x less memory), else as is."""
    quantized = (image * 255).round().to(torch.uint8)
    return quantized if torch.equal(unit_float(quantized), image) else image


# ------------------------------------------------------------------ the dataset


class MixedResolutionDataset(Dataset):
    """Mixed-resolution training pairs from a folder (or list) of images of any size.

    Index it with a *global* sample counter (0, 1, 2, ... across epochs, see
    StepBatchSampler): epoch = counter // len, and the image is position counter % len
    of a permutation seeded by (seed, epoch); the sample's own randomness is seeded by
    (seed, counter). Files that cannot serve (unreadable, smaller than the crop, over
    the pixel cap) are skipped at construction, from headers only, and tallied in
    `skipped` / `skipped_files`. A file found corrupt only when decoded is replaced by
    the next image of the permutation, with a warning, and counted in the sample's
    "failed" entry; training never stops for one bad file.
    """

    def __init__(
        self,
        source: str | os.PathLike | Iterable[str | os.PathLike],
        config: DataConfig | None = None,
        seed: int = 0,
        exclude: Iterable[str] = (),
        cache_images: bool = False,
    ) -> None:
        self.config = config or DataConfig()
        # path -> (image, encoder input or None): decoded once per process. Only for small
        # datasets: each DataLoader worker keeps its own copy (3 bytes per pixel of 8-bit images).
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = {} if cache_images else None
        self.seed = int(seed)
        excluded = {Path(name).name for name in exclude}
        candidates = list_images(source) if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
        candidates = [path for path in candidates if path.name not in excluded]

        self.paths: list[Path] = []
        self.sizes: list[Size] = []  # upright (height, width) from the headers
        self.skipped_files: list[tuple[str, str]] = []  # (path, reason)
        for path in candidates:
            reason, size = self._check(path)
            if reason is None:
                self.paths.append(path)
                self.sizes.append(size)
            else:
                self.skipped_files.append((str(path), reason))
        self.skipped: dict[str, int] = dict(Counter(reason for _, reason in self.skipped_files))
        self.failed_files: set[str] = set()  # found corrupt at decode time, in this process
        self._permutation_cache: tuple[int, list[int]] | None = None

        if self.skipped:
            log.warning("skipped %d of %d images: %s", len(self.skipped_files), len(candidates), self._skip_summary())
        if not self.paths:
            raise InfdError(
                f"none of the {len(candidates)} images is usable for training ({self._skip_summary() or 'no files'}); "
                f"images must be readable and at least {self.config.crop_size} pixels on each side."
            )

    def _check(self, path: Path) -> tuple[str | None, Size]:
        """(None, size) for a usable image, else (reason, (0, 0)); reads the header only."""
        try:
            size = image_size(path, self.config.max_pixels)
        except ImageError as error:
            log.debug("skipping %s", error)
            return error.reason, (0, 0)
        if min(size) < max(self.config.crop_size, MIN_IMAGE_SIDE):
            return "too small", (0, 0)
        return None, size

    def _skip_summary(self) -> str:
        return ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, counter: int) -> dict[str, torch.Tensor | int]:
        """The sample for global counter `counter` (see the class docstring)."""
        counter = int(counter)
        if counter < 0:
            raise IndexError(f"sample counters start at 0, got {counter}.")
        n = len(self)
        failed = 0
        for attempt in range(n):
            loaded = self._load_cached(self.paths[self.image_index(counter, attempt)])
            if loaded is None:
                failed += 1
                continue
            image, inp = loaded
            generator = torch.Generator().manual_seed(mix_seed("sample", self.seed, counter))
            return {**make_sample(image, self.config, generator, inp), "failed": failed}
        raise InfdError(f"all {n} images failed to decode (see the warnings above); check the image folder.")

    def image_index(self, counter: int, attempt: int = 0) -> int:
        """Index into `paths` of the image for `counter` (attempt k: the k-th fallback)."""
        n = len(self)
        return self._permutation(counter // n)[(counter + attempt) % n]

    def _permutation(self, epoch: int) -> list[int]:
        """The image order of `epoch`: a permutation of range(len), seeded by (seed, epoch)."""
        if self._permutation_cache is None or self._permutation_cache[0] != epoch:
            self._permutation_cache = (epoch, epoch_order(len(self), self.seed, epoch))
        return self._permutation_cache[1]

    def _load_cached(self, path: Path) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(image, encoder input or None) for `path`, from the cache when caching."""
        if self.cache is not None and str(path) in self.cache:
            return self.cache[str(path)]  # make_sample reads uint8 images as they are
        image = self._load(path)
        if image is None:
            return None
        if self.cache is None:
            return image, None
        # In "squash" mode the encoder input is the same for every sample of an image.
        inp = resize(image, (self.config.input_size,) * 2) if self.config.aspect == "squash" else None
        self.cache[str(path)] = (_compact(image), inp)
        return image, inp

    def _load(self, path: Path) -> torch.Tensor | None:
        """(3, H, W) in [0, 1], or None (warning once) for a file that fails to decode."""
        if str(path) in self.failed_files:
            return None
        try:
            image = load_image(path, self.config.max_pixels)
            if min(image.shape[-2:]) < self.config.crop_size:  # the file changed since the header check
                raise ImageError(f"{path} is now smaller than the crop size {self.config.crop_size}.", "too small")
            return image
        except InfdError as error:
            self.failed_files.add(str(path))
            log.warning("skipping an image for the rest of training: %s", error)
            return None


class StepBatchSampler(Sampler):
    """Infinite batches of global sample counters, one batch per optimizer step.

    Step s on rank r of world_size processes gets counters
    (s * world_size + r) * batch_size + [0, batch_size): ranks never overlap, and a run
    resumed with start_step=s continues exactly where it stopped.
    Use as DataLoader(dataset, batch_sampler=StepBatchSampler(...), num_workers=k).
    """

    def __init__(self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size <= 0 or start_step < 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise InfdError(
                f"StepBatchSampler needs batch_size > 0, start_step >= 0 and 0 <= rank < world_size, "
                f"got batch_size={batch_size}, start_step={start_step}, rank={rank}, world_size={world_size}."
            )
        self.batch_size = batch_size
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size

    def counters(self, step: int) -> list[int]:
        first = (step * self.world_size + self.rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.counters(step)
            step += 1
