"""Gigapixel outputs of a neural field: tiled pyramidal BigTIFF, Deep Zoom folders, streamed PNG.

    field = LatentField(model, z)                       # phi decoded once
    export_tiff(field, (16384, 16384), "big.tif")        # tiled, pyramidal BigTIFF
    export_dzi(field, (16384, 16384), "big.dzi")         # big.dzi + big_files/<level>/<col>_<row>.png
    export_png(field, (16384, 16384), "big.png")         # streamed row band by row band

Every output is rendered tile by tile and written as the tiles come, so memory does not
grow with the output size (PNG, a row-major format, holds one band of tiles: memory grows
with the width only). Files appear under their final name only when complete.

Pyramid levels, in the TIFF and in Deep Zoom, are rendered from the field itself at each
level's size rather than by downsampling the level above: the renderer knows the pixel
size it is asked for, so every level is the field seen at that resolution, seam-free, and
no level needs another level in memory. It costs a third more rendering than level 0.

Deep Zoom (the tile layout OpenSeadragon reads, and that `infd serve` serves): level L of
an H x W image is ceil(H / 2^(max_level - L)) x ceil(W / 2^(max_level - L)), where level
max_level is the full size and level 0 is one pixel; each level is cut into tiles of
`tile_size` pixels that overlap their neighbours by `overlap` pixels on each inner side.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile
import torch
from PIL import Image
from tqdm.auto import tqdm

from infd import geometry
from infd.errors import InfdError, check_choice
from infd.files import atomic_directory, atomic_path, check_replaceable
from infd.geometry import Size, Window
from infd.images import to_uint8_hwc
from infd.rendering import LatentField

TILE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
TIFF_COMPRESSIONS = ("deflate", "none")
MAX_EXPORT_SIDE = 2**20  # a million pixels a side; far beyond any use, short of nonsense


# ---------------------------------------------------------------- Deep Zoom


@dataclass(frozen=True)
class DeepZoom:
    """The Deep Zoom pyramid of an H x W image cut into `tile_size` tiles overlapping by `overlap`."""

    size: Size
    tile_size: int = 254
    overlap: int = 1

    def __post_init__(self) -> None:
        geometry.check_size(self.size, "Deep Zoom image size")
        if self.tile_size < 1 or self.overlap < 0 or self.overlap > self.tile_size // 2:
            raise InfdError(f"Deep Zoom tiles of {self.tile_size} px with {self.overlap} px overlap make no sense; use e.g. 254 and 1.")

    @property
    def max_level(self) -> int:
        return (max(self.size) - 1).bit_length()

    @property
    def padded(self) -> int:
        """Side of the square every tile is rendered at (then cropped): tile_size + 2 overlap."""
        return self.tile_size + 2 * self.overlap

    def level_size(self, level: int) -> Size:
        shift = self.max_level - level
        return tuple(-(-side // 2**shift) for side in self.size)

    def tile_counts(self, level: int) -> tuple[int, int]:
        """(rows, columns) of tiles of a level."""
        h, w = self.level_size(level)
        return -(-h // self.tile_size), -(-w // self.tile_size)

    def has_tile(self, level: int, col: int, row: int) -> bool:
        if not 0 <= level <= self.max_level:
            return False
        rows, cols = self.tile_counts(level)
        return 0 <= col < cols and 0 <= row < rows

    def tile_window(self, level: int, col: int, row: int) -> Window:
        """The pixels of tile (col, row) of a level, its overlap with the neighbours included."""
        h, w = self.level_size(level)
        t, o = self.tile_size, self.overlap
        top, left = max(row * t - o, 0), max(col * t - o, 0)
        return Window(top, left, min((row + 1) * t + o, h) - top, min((col + 1) * t + o, w) - left)

    def padded_window(self, level: int, col: int, row: int) -> Window:
        """The padded x padded window that holds the tile (it may reach outside the level's grid)."""
        t, o = self.tile_size, self.overlap
        return Window(row * t - o, col * t - o, self.padded, self.padded)

    def all_tiles(self) -> Iterator[tuple[int, int, int]]:
        """(level, col, row) of every tile, coarsest level first, row-major."""
        for level in range(self.max_level + 1):
            rows, cols = self.tile_counts(level)
            for row in range(rows):
                for col in range(cols):
                    yield level, col, row

    def xml(self, tile_format: str = "png") -> str:
        """The .dzi descriptor."""
        h, w = self.size
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{tile_format}" '
            f'Overlap="{self.overlap}" TileSize="{self.tile_size}">\n'
            f'  <Size Width="{w}" Height="{h}"/>\n'
            "</Image>\n"
        )


def render_tiles(field: LatentField, zoom: DeepZoom, tiles: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Deep Zoom tiles (level, col, row) in one renderer call: each (3, h, w) float in [0, 1].

    Every tile is rendered as its padded square, with pixel centers from the integer
    pixel indices of its level's grid, then cropped: edge tiles batch with the others,
    and a tile equals the same pixels of a whole render of its level.
    """
    padded = [zoom.padded_window(*tile) for tile in tiles]
    rgb = field.render([(zoom.level_size(tile[0]), window) for tile, window in zip(tiles, padded)])
    crops = []
    for image, tile, pad in zip(rgb, tiles, padded, strict=True):
        win = zoom.tile_window(*tile)
        top, left = win.top - pad.top, win.left - pad.left
        crops.append(image[:, top : top + win.height, left : left + win.width])
    return crops


def encode_tile(tile: torch.Tensor | np.ndarray, tile_format: str = "png") -> bytes:
    """A tile (3, h, w) float in [0, 1] or (h, w, 3) uint8 as PNG or JPEG bytes."""
    import io

    pixels = to_uint8_hwc(tile) if isinstance(tile, torch.Tensor) else tile
    buffer = io.BytesIO()
    options = {"compress_level": 1} if TILE_FORMATS[tile_format] == "PNG" else {"quality": 90}
    Image.fromarray(pixels).save(buffer, format=TILE_FORMATS[tile_format], **options)
    return buffer.getvalue()


# ---------------------------------------------------------------- exports


def check_export_size(size: Size) -> Size:
    h, w = geometry.check_size(size, "export size")
    if max(h, w) > MAX_EXPORT_SIDE:
        raise InfdError(f"{w}x{h} has a side longer than the {MAX_EXPORT_SIDE} pixels an export may have; render a --box of it instead.")
    return h, w


def _progress(total: int, what: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=what, unit="tile", disable=not progress, dynamic_ncols=True)


def pyramid_sizes(size: Size, tile: int) -> list[Size]:
    """Level sizes of a TIFF pyramid: halved (rounding up) until the level fits one tile."""
    sizes = [geometry.check_size(size)]
    while max(sizes[-1]) > tile:
        sizes.append(tuple(-(-side // 2) for side in sizes[-1]))
    return sizes


def export_tiff(
    field: LatentField,
    size: Size,
    path: str | Path,
    tile: int = 512,
    compression: str = "deflate",
    pyramid: bool = True,
    progress: bool = True,
) -> list[Size]:
    """Write the field at H x W as a tiled BigTIFF; its reduced levels are SubIFDs of the first page.

    Returns the level sizes. Tiles stream from the renderer into the file (tifffile
    compresses a bounded number of them at a time), so memory is flat in the output size.
    """
    size = check_export_size(size)
    if geometry.check_tile(tile) < 16 or tile % 16:
        raise InfdError(f"TIFF tiles must be a multiple of 16 pixels, got {tile}.")
    check_choice(compression, TIFF_COMPRESSIONS, "TIFF compression")
    path = Path(path)
    levels = pyramid_sizes(size, tile) if pyramid else [size]
    tile_bytes = tile * tile * 3
    bar = _progress(sum(len(geometry.tiles(level, tile)) for level in levels), "export", progress)
    options = dict(
        photometric="rgb",
        tile=(tile, tile),
        compression=None if compression == "none" else "zlib",
        buffersize=8 * tile_bytes,  # tifffile's default would queue up to 512 MiB of tiles
        metadata=None,
    )

    def pixels(level: Size) -> Iterator[np.ndarray]:
        for _, array in field.tiles(level, tile):
            bar.update(1)  # before the yield: tifffile never resumes the generator after a level's last tile
            yield array

    with bar, atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tiff:
        for index, level in enumerate(levels):
            extra = {"subifds": len(levels) - 1} if index == 0 else {"subfiletype": 1}
            tiff.write(pixels(level), shape=(*level, 3), dtype=np.uint8, **options, **extra)
    return levels


def dzi_files(path: Path) -> Path:
    """The tile folder beside a .dzi descriptor: big.dzi -> big_files."""
    return path.with_name(path.stem + "_files")


# What an export writes in <name>_files: one folder per level, holding its tiles.
DZI_TILES_LAYOUT = {r"\d+": {r"\d+_\d+\.(" + "|".join(TILE_FORMATS) + ")": None}}


def check_dzi_output(path: str | Path, overwrite: bool = False) -> None:
    """Refuse to export over an existing `path` or its `_files` folder unless `overwrite` and both are an earlier export's."""
    path = Path(path)
    check_replaceable(path, None, overwrite, "infd render")
    check_replaceable(dzi_files(path), DZI_TILES_LAYOUT, overwrite, "infd render")


def export_dzi(
    field: LatentField,
    size: Size,
    path: str | Path,
    tile_size: int = 254,
    overlap: int = 1,
    tile_format: str = "png",
    batch: int = 4,
    progress: bool = True,
    overwrite: bool = False,
) -> DeepZoom:
    """Write a Deep Zoom image: `path` (.dzi descriptor, written last) and its `_files` folder.

    The tiles are those `infd serve` serves for the same field and size. An existing
    export there is replaced only with `overwrite`, and anything else never (`check_dzi_output`).
    """
    size = check_export_size(size)
    check_choice(tile_format, TILE_FORMATS, "tile format")
    path = Path(path)
    if path.suffix.lower() != ".dzi":
        raise InfdError(f"a Deep Zoom output must end in .dzi (its tiles go to <name>_files beside it), got '{path}'.")
    check_dzi_output(path, overwrite)
    zoom = DeepZoom(size, tile_size, overlap)
    tiles = list(zoom.all_tiles())
    with _progress(len(tiles), "export", progress) as bar:
        with atomic_directory(dzi_files(path)) as folder:
            for level in range(zoom.max_level + 1):
                (folder / str(level)).mkdir()
            for first in range(0, len(tiles), batch):
                chunk = tiles[first : first + batch]
                for (level, col, row), image in zip(chunk, render_tiles(field, zoom, chunk), strict=True):
                    (folder / str(level) / f"{col}_{row}.{tile_format}").write_bytes(encode_tile(image, tile_format))
                bar.update(len(chunk))
        with atomic_path(path) as tmp:
            tmp.write_text(zoom.xml(tile_format))
    return zoom


class PNGStream:
    """A PNG written row by row (8-bit RGB, no filtering), so no image is ever held whole."""

    def __init__(self, file: BinaryIO, size: Size, level: int = 6):
        self.file, (self.height, self.width) = file, size
        self.rows_written = 0
        self.compressor = zlib.compressobj(level)
        file.write(b"\x89PNG\r\n\x1a\n")
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0))

    def _chunk(self, kind: bytes, data: bytes) -> None:
        self.file.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))

    def write_rows(self, rows: np.ndarray) -> None:
        """rows: (n, W, 3) uint8, the next n rows."""
        filtered = np.zeros((rows.shape[0], 1 + 3 * self.width), dtype=np.uint8)  # filter byte 0: None
        filtered[:, 1:] = rows.reshape(rows.shape[0], -1)
        data = self.compressor.compress(filtered.tobytes())
        if data:
            self._chunk(b"IDAT", data)
        self.rows_written += rows.shape[0]

    def close(self) -> None:
        if self.rows_written != self.height:
            raise RuntimeError(f"PNG of {self.height} rows closed after {self.rows_written}")
        self._chunk(b"IDAT", self.compressor.flush())
        self._chunk(b"IEND", b"")


def export_png(field: LatentField, size: Size, path: str | Path, tile: int = 512, progress: bool = True) -> None:
    """Write the field at H x W as a PNG, one row band of tiles at a time (memory: tile x W x 3 bytes)."""
    h, w = check_export_size(size)
    path = Path(path)
    windows = geometry.tiles((h, w), tile)
    band = np.empty((min(tile, h), w, 3), dtype=np.uint8)
    with _progress(len(windows), "export", progress) as bar, atomic_path(path) as tmp:
        with open(tmp, "wb") as file:
            png = PNGStream(file, (h, w))
            for window, pixels in field.tiles((h, w), tile):
                band[: window.height, window.left : window.left + window.width] = pixels
                if window.left + window.width == w:
                    png.write_rows(band[: window.height])
                bar.update(1)
            png.close()


EXPORT_FORMATS = ("tif", "png", "dzi")


def export_format(path: Path, requested: str | None) -> str | None:
    """The streaming format of an output (tif, png, dzi): `requested`, else from the suffix; None for other images."""
    by_suffix = {".tif": "tif", ".tiff": "tif", ".png": "png", ".dzi": "dzi"}.get(path.suffix.lower())
    if requested is None:
        return by_suffix
    requested = requested.lower().lstrip(".")
    requested = {"tiff": "tif"}.get(requested, requested)
    check_choice(requested, EXPORT_FORMATS, "export format", " (or leave it to the --out suffix)")
    if path.suffix and by_suffix != requested:
        raise InfdError(f"--format {requested} does not match the output '{path.name}'; give it the .{requested} suffix.")
    return requested
