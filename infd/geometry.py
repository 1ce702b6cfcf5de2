"""The one coordinate convention of infd.

An image is a function on the continuous square [-1, 1]², indexed (y, x) like tensors.
A grid of H x W pixels over a box (y0, x0, y1, x1) has pixel centers

    y_i = y0 + (i + 0.5) * (y1 - y0) / H,    x_j = x0 + (j + 0.5) * (x1 - x0) / W

and its *cell* (the pixel size) is ((y1 - y0) / H, (x1 - x0) / W); the whole image at
H x W has cell (2 / H, 2 / W). Non-square images keep the square domain: their pixels
are simply anisotropic cells.

Crops, tiles, boxes, feature lookups and downsampling all go through this module. Pixel
centers are always computed from integer pixel indices of the *parent* grid, so a tile
and the whole image agree bit for bit on every shared pixel.

Boxes: every Box is finite, non-empty and within [-MAX_BOX_COORDINATE,
MAX_BOX_COORDINATE]² (±8, four image widths past each edge). A render may reach
beyond the image, where the field extends its border (views around the image); what
refers to the image itself (inversion conditions, the viewer's download of the visible
view, Lanczos resampling of the fixed head's image) must lie inside [-1, 1]², which
`check_inside_image` checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from infd.errors import InfdError

Size = tuple[int, int]  # (height, width) in pixels

# Farthest a box may reach, in image units: far enough for any view around the image,
# near enough that pixel centers and cells stay well inside float range.
MAX_BOX_COORDINATE = 8.0
# The largest render or TIFF tile: a tile's buffers (features, pixels) must fit in memory.
MAX_TILE = 4096


@dataclass(frozen=True)
class Box:
    """An axis-aligned region of the field, in image units (the image is [-1, 1]²), (y0, x0) top-left."""

    y0: float
    x0: float
    y1: float
    x1: float

    def __post_init__(self) -> None:
        values = (self.y0, self.x0, self.y1, self.x1)
        if not all(math.isfinite(v) for v in values):
            raise InfdError(f"box {values} has a non-finite coordinate.")
        if not (self.y0 < self.y1 and self.x0 < self.x1):
            raise InfdError(f"box {values} is empty: it needs y0 < y1 and x0 < x1.")
        if max(abs(v) for v in values) > MAX_BOX_COORDINATE:
            bound = f"{MAX_BOX_COORDINATE:g}"
            raise InfdError(f"box {values} reaches too far from the image [-1, 1]²; keep every coordinate in [-{bound}, {bound}].")

    @classmethod
    def full(cls) -> Box:
        return cls(-1.0, -1.0, 1.0, 1.0)

    @classmethod
    def parse(cls, text: str) -> Box:
        """Parse "y0,x0,y1,x1" in image units (the image is [-1, 1]²)."""
        parts = text.replace(" ", "").split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 4:
            raise InfdError(f"box '{text}' must be four numbers y0,x0,y1,x1 in image units (the image is [-1, 1]²).")
        return cls(*values)

    @classmethod
    def from_pixels(cls, top: float, left: float, bottom: float, right: float, image_size: Size) -> Box:
        """The box covering pixel rows [top, bottom) and columns [left, right) of an image."""
        h, w = image_size
        return cls(-1 + 2 * top / h, -1 + 2 * left / w, -1 + 2 * bottom / h, -1 + 2 * right / w)

    def to_pixels(self, image_size: Size) -> tuple[float, float, float, float]:
        """(top, left, bottom, right) in pixels of an image of `image_size`."""
        h, w = image_size
        return ((self.y0 + 1) * h / 2, (self.x0 + 1) * w / 2, (self.y1 + 1) * h / 2, (self.x1 + 1) * w / 2)

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    def is_inside_image(self) -> bool:
        return self.y0 >= -1 and self.x0 >= -1 and self.y1 <= 1 and self.x1 <= 1

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.y0, self.x0, self.y1, self.x1)


def check_inside_image(box: Box, what: str) -> Box:
    """`box` when it lies inside the image [-1, 1]²; else an InfdError naming it as `what` (e.g. "the view's box")."""
    if not box.is_inside_image():
        raise InfdError(f"{what} {box.as_tuple()} reaches outside the image [-1, 1]²; keep every coordinate in [-1, 1].")
    return box


@dataclass(frozen=True)
class Window:
    """A rectangle of pixels of a grid: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int


def check_size(size: Size, what: str = "size") -> Size:
    h, w = (int(size[0]), int(size[1]))
    if h <= 0 or w <= 0 or h != size[0] or w != size[1]:
        raise InfdError(f"{what} {tuple(size)} is not a positive whole number of pixels (height, width).")
    return h, w


def parse_size_request(text: str) -> Size | int:
    """Parse "WIDTHxHEIGHT" into (height, width), or one number into that number: a long side (`fit_size`)."""
    parts = text.lower().replace(" ", "").split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) <= 0:
        raise InfdError(f"size '{text}' must be WIDTHxHEIGHT in positive pixels, e.g. 2048x1536, or one number for the long side, e.g. 2048.")
    if len(numbers) == 1:
        return numbers[0]
    width, height = numbers
    return height, width


def fit_size(request: Size | int, aspect: float, box: Box | None = None) -> Size:
    """The (height, width) a size request means for `box` (default: all) of content of `aspect` (width / height).

    The one size rule of infd: WIDTHxHEIGHT is exact; one number is the long side, and the
    short side follows the aspect of what is shown (rounded, at least 1 px), so nothing is
    squashed. A box of the image has the aspect it has in the image's pixels.
    """
    if not isinstance(request, int):
        return check_size(request)
    if box is not None:
        aspect = aspect * box.width / box.height
    if not (math.isfinite(aspect) and aspect > 0):
        raise InfdError(f"aspect ratio {aspect} must be a positive number (width / height).")
    if aspect >= 1:
        return max(1, round(request / aspect)), request
    return request, max(1, round(request * aspect))


def parse_size(text: str, aspect: float = 1.0) -> Size:
    """Parse "WIDTHxHEIGHT" into (height, width), or one number as the long side at `aspect` (1: a square)."""
    return fit_size(parse_size_request(text), aspect)


ASPECT_KEY = "aspect"  # metadata of a saved latent: width / height of what it shows, when not its grid's


def latent_aspect(metadata: dict[str, str], latent_size: Size) -> float:
    """Width / height of a saved latent's image: its stored `ASPECT_KEY`, else its grid's (h, w) (square for infd's)."""
    stored = metadata.get(ASPECT_KEY)
    if stored is None:
        return latent_size[1] / latent_size[0]
    try:
        aspect = float(stored)
    except ValueError:
        aspect = math.nan
    if not (math.isfinite(aspect) and aspect > 0):
        raise InfdError(f"the latent's stored aspect ratio '{stored}' is not a positive number; the file is damaged, so write it again.")
    return aspect


def cell_size(box: Box, size: Size) -> tuple[float, float]:
    """Pixel size (cy, cx) of an H x W grid over `box`."""
    h, w = size
    return box.height / h, box.width / w


def axis_centers(lo: torch.Tensor, hi: torch.Tensor, n: int | torch.Tensor, start: int | torch.Tensor, count: int) -> torch.Tensor:
    """Centers of pixels start .. start + count - 1 of an n-pixel axis over [lo, hi].

    lo, hi, n, start broadcast together (shape (...) or scalars); the result is float64
    of shape (..., count). Indices outside [0, n) are allowed: they extend the grid
    beyond the box with the same spacing (used for renderer halos).
    """
    lo, hi, n, start = (torch.as_tensor(v, dtype=torch.float64) for v in (lo, hi, n, start))
    index = start.unsqueeze(-1) + torch.arange(count, dtype=torch.float64) + 0.5
    return lo.unsqueeze(-1) + index * (hi - lo).unsqueeze(-1) / n.unsqueeze(-1)


def window_centers(box: Box, size: Size, window: Window | None = None, halo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centers (ys (h + 2 halo,), xs (w + 2 halo,)) of `window` of the grid `size` over `box`."""
    h, w = size
    window = window or Window(0, 0, h, w)
    ys = axis_centers(box.y0, box.y1, h, window.top - halo, window.height + 2 * halo)
    xs = axis_centers(box.x0, box.x1, w, window.left - halo, window.width + 2 * halo)
    return ys, xs


def coord_grid(box: Box, size: Size) -> torch.Tensor:
    """Pixel centers of an H x W grid over `box` as a (H, W, 2) float32 tensor of (y, x)."""
    ys, xs = window_centers(box, size)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)
    return grid.float()


def window_box(box: Box, size: Size, window: Window) -> Box:
    """The part of `box` that `window` of an H x W grid over it covers."""
    cy, cx = cell_size(box, size)
    return Box(
        box.y0 + window.top * cy,
        box.x0 + window.left * cx,
        box.y0 + (window.top + window.height) * cy,
        box.x0 + (window.left + window.width) * cx,
    )


def check_tile(tile: int | Size) -> int | Size:
    """Refuse a tile (a side, or height and width) that is not whole numbers of pixels from 1 to MAX_TILE."""
    for side in (tile,) if isinstance(tile, int) else tile:
        if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_TILE:
            raise InfdError(f"the tile size must be from 1 to {MAX_TILE} pixels, got {tile}.")
    return tile


def tiles(size: Size, tile: int | Size) -> list[Window]:
    """Cover an H x W grid with row-major tiles of at most `tile` pixels (the last ones are smaller)."""
    h, w = check_size(size)
    th, tw = check_size((tile, tile) if isinstance(tile, int) else tile, "tile size")
    return [
        Window(top, left, min(th, h - top), min(tw, w - left))
        for top in range(0, h, th)
        for left in range(0, w, tw)
    ]


def crop_box(image_size: Size, top: int, left: int, crop_size: Size) -> Box:
    """Box of the pixel crop [top, top + ch) x [left, left + cw) of an image of `image_size`.

    Rendering `crop_size` pixels over this box queries exactly that crop's pixel centers
    and pixel size (the alignment the mixed-resolution training targets rely on).
    """
    ch, cw = crop_size
    return Box.from_pixels(top, left, top + ch, left + cw, image_size)


def feature_lookup(centers: torch.Tensor, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest feature of an n-feature axis over [-1, 1] for each query center.

    Returns (index: long, offset: float64), where offset is the query's distance from that
    feature's center in feature cells (in [-0.5, 0.5) inside the image, larger outside,
    where the border feature is used).
    """
    position = (centers.double() + 1) * n_features / 2
    index = position.floor().clamp(0, n_features - 1)
    return index.long(), position - (index + 0.5)


def feature_interpolation(centers: torch.Tensor, n_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear interpolation between the two feature centers around each query center.

    Returns (lower index: long, upper index: long, weight of the upper: float64); the
    value at a query is (1 - weight) * f[lower] + weight * f[upper]. Beyond the outer
    feature centers the border feature is used (weight 0), as in bilinear sampling
    with border padding. The weights are a continuous function of the position, so a
    field read this way has no steps where feature cells meet.
    """
    position = ((centers.double() + 1) * n_features / 2 - 0.5).clamp(0, n_features - 1)
    lower = position.floor()
    upper = (lower + 1).clamp(max=n_features - 1)
    return lower.long(), upper.long(), position - lower


def cell_edges(centers: torch.Tensor, n_features: int) -> torch.Tensor:
    """(N - 1,) bool: whether query centers i and i + 1 (N,) fall in different cells of an n-feature axis."""
    index, _ = feature_lookup(centers, n_features)
    return index[1:] != index[:-1]


def cell_in_feature_units(cell: torch.Tensor, n_features: int) -> torch.Tensor:
    """Pixel size measured in feature cells (1 = one feature per pixel)."""
    return cell * n_features / 2


RIM_FRACTION = 0.03  # the outer band the rim figure compares with the interior (and a training loss may weight)


def border_band(size: Size, fraction: float = RIM_FRACTION) -> torch.Tensor:
    """Mask (H, W) of the outer band of an image: `fraction` of the height at top and bottom, of the width left and right (at least 1 px)."""
    h, w = size
    by, bx = max(1, math.ceil(fraction * h)), max(1, math.ceil(fraction * w))
    mask = torch.ones(h, w, dtype=torch.bool)
    mask[by : h - by, bx : w - bx] = False
    return mask
