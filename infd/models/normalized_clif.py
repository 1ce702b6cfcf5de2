"""CLIF with GroupNorm and zero padding: the renderer of the paper's released models.

The paper's CLIF (`CLIFRenderer`'s idea) as its authors trained it: a 3x3 conv, residual
blocks of GroupNorm-SiLU-conv, a last GroupNorm-SiLU-conv, every conv zero-padded at the
border of the grid it renders, and the query layout in half feature cells (the offset from
the nearest feature's center in [-1, 1], the pixel size as 2 / (pixels per feature)).

GroupNorm normalises with statistics of whatever grid is rendered, so the reference code's
output depends on the render's size and its tiled renders have seams. Here the statistics
are a choice (`statistics`), and everything else is exact:

- "scale" (the default): each norm's statistics are those of the whole image rendered at the
  requested pixel size (`scale_grid`: every pixel up to 256², beyond that a fixed lattice of
  windows), computed once per scale in `grid_state`. A tile equals the same pixels of the
  whole render, a zoom equals the crop of the whole image at its scale, and up to 256² the
  render is the reference's one-piece render. (The renderer reads the pixel size and the
  norms remove the constant it adds, so statistics must come from the scale rendered.)
- "latent": the statistics of the whole image at phi's own resolution (256² for the paper's
  models), computed once per latent in `prepare`: one state for every scale, exact at 256²
  only (elsewhere a colour shift).
- "whole": the statistics of the requested grid itself, gathered in one pass per norm over
  its tiles before rendering (`grid_state`): the reference's one-piece render at any size,
  with memory still flat in the size.
- "patch": the reference's patch-wise sampling (its `gen_samples.py`): the grid is cut into
  `patch_size` squares, each rendered with `patch_padding` extra pixels a side as its own
  one-piece render (statistics and zero padding of that padded patch), then cropped. Seams
  included; for comparing with the paper's patch-FID.

Zero padding is exact in every mode: convs are unpadded, and each conv's input is zeroed
outside the grid's border ("latent", "whole": the image's border, where pixel centers leave
[-1, 1]; "patch": the padded patch's), so a tile's halo carries the right neighbours inside
the image and zeros beyond it.

The state is phi with the statistics appended as extra channel planes (`pack_statistics`),
so states batch, expand and tile like every renderer's.
"""

from __future__ import annotations

import math
from collections.abc import Generator

import torch
import torch.nn as nn
import torch.nn.functional as F

from infd import geometry
from infd.errors import check_choice
from infd.geometry import Box, Size, Window
from infd.models.renderers import Renderer, gather_layout

STATISTICS = ("scale", "latent", "whole", "patch")
SCALE_BUDGET = 256 * 256  # "scale": whole images up to this many pixels exactly, larger ones from a lattice of windows
SCALE_WINDOW = 64
KEEP_BYTES = 512 * 2**20  # `gathered_statistics` keeps the windows' activations between norms up to this

Masks = tuple[torch.Tensor, torch.Tensor]  # (B, H) rows and (B, W) columns inside the grid's border
Statistics = torch.Tensor  # (B, norms, groups, 2): mean and biased variance of each group
Network = Generator[torch.Tensor, torch.Tensor, torch.Tensor]  # `NormalizedCLIFRenderer.network`: norm inputs out, statistics in, RGB returned


# ---------------------------------------------------------------- the query layout


def reference_lookup(centers: torch.Tensor, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest feature and offset along one axis, as `grid_sample(mode="nearest")` finds them.

    centers: (B, N) query centers. Returns (index (B, N) long, offset (B, N) float32), the
    offset from that feature's center in half feature cells ([-1, 1] inside the image). In
    float32 like the reference: the source position ((c + 1) n - 1) / 2 is rounded half to
    even, which picks the lower feature where a query lies exactly between two (the
    position ends in .5 when a render is a whole number of times coarser than phi).
    """
    c = centers.float()
    index = torch.round(((c + 1) * n_features - 1) / 2).clamp(0, n_features - 1)
    feature_center = -1 + 2 * ((0.5 + index) / n_features)
    return index.long(), (c - feature_center) * n_features


def reference_layout(phi: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """The reference's query layout: (B, C + 4, H, W) = nearest feature, offset (y, x), cell (y, x).

    phi: (B, C, h, w); ys (B, H), xs (B, W) query centers; cell (B, 2) the query pixel size
    in [-1, 1] units. Offset and cell are in half feature cells (the reference's units:
    twice `renderers.query_layout`'s).
    """
    h, w = phi.shape[-2:]
    iy, oy = (t.to(phi.device) for t in reference_lookup(ys, h))
    ix, ox = (t.to(phi.device) for t in reference_lookup(xs, w))
    cell_half = (cell.float() * torch.tensor([h, w], dtype=torch.float32)).to(phi.device)
    return gather_layout(phi, iy, oy, ix, ox, cell_half)


def domain_masks(ys: torch.Tensor, xs: torch.Tensor) -> Masks:
    """Rows and columns whose pixel centers lie inside the image, (-1, 1): where the whole-image render has pixels."""
    return (ys.abs() < 1), (xs.abs() < 1)


def window_masks(ys: torch.Tensor, xs: torch.Tensor, halo: int) -> Masks:
    """Rows and columns of a window rendered on its own: all but the halo (zero padding at the window's border)."""
    rows = torch.zeros(ys.shape, dtype=torch.bool)
    cols = torch.zeros(xs.shape, dtype=torch.bool)
    rows[:, halo : ys.shape[1] - halo] = True
    cols[:, halo : xs.shape[1] - halo] = True
    return rows, cols


def crop(x: torch.Tensor, k: int) -> torch.Tensor:
    return x[..., k : x.shape[-2] - k, k : x.shape[-1] - k] if k else x


def crop_masks(masks: Masks, k: int) -> Masks:
    rows, cols = masks
    return rows[:, k : rows.shape[1] - k], cols[:, k : cols.shape[1] - k]


def apply_masks(x: torch.Tensor, masks: Masks) -> torch.Tensor:
    """x (B, C, H, W), a temporary, with everything outside the masks set to zero (the next conv's zero padding).

    Without autograd the rows and columns outside are zeroed in place (a border strip, not a
    pass over the whole tile); a recorded graph gets a product instead.
    """
    rows, cols = (m.to(x.device) for m in masks)
    if rows.all() and cols.all():
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        keep = rows[:, :, None] & cols[:, None, :]
        return x * keep[:, None].to(x.dtype)
    for i in range(x.shape[0]):
        x[i, :, ~rows[i]] = 0
        x[i, :, :, ~cols[i]] = 0
    return x


# ---------------------------------------------------------------- statistics


def pack_statistics(phi: torch.Tensor, stats: Statistics) -> torch.Tensor:
    """phi (B, C, h, w) and stats (B, N, G, 2) -> the state (B, C + k, h, w): stats in k extra planes."""
    b, _, h, w = phi.shape
    flat = stats.reshape(b, -1).to(phi.dtype)
    planes = math.ceil(flat.shape[1] / (h * w))
    extra = phi.new_zeros(b, planes * h * w)
    extra[:, : flat.shape[1]] = flat
    return torch.cat([phi, extra.view(b, planes, h, w)], dim=1)


def statistics_planes(n_values: int, feature_size: tuple[int, int]) -> int:
    return math.ceil(n_values / (feature_size[0] * feature_size[1]))


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and the mean square of each channel of x (B, C, h, w), float64 (B, C).

    Per channel first (torch.var_mean over the pixels, in x's precision, which reads a
    channels_last crop in place), then in float64: twice as fast as reducing each group's
    values in one piece, which copies the crop, and as exact (2e-8).
    """
    var, mean = torch.var_mean(x, dim=(2, 3), unbiased=False)
    mean = mean.double()
    return mean, var.double() + mean * mean


class GroupStatistics:
    """Sums for a GroupNorm's statistics gathered over several tiles: add(x), then result()."""

    def __init__(self):
        self.total = self.squares = None
        self.count = 0

    def add(self, x: torch.Tensor, groups: int) -> None:
        """x: (B, C, h, w), the norm's input over pixels of the grid (no halo)."""
        b, c, h, w = x.shape
        total, squares = (m.view(b, groups, -1).sum(-1) * (h * w) for m in channel_moments(x))
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += h * w * (c // groups)

    def result(self) -> torch.Tensor:
        """(B, G, 2): mean and biased variance, float64."""
        mean = self.total / self.count
        return torch.stack([mean, (self.squares / self.count - mean * mean).clamp(min=0)], dim=-1)


def own_statistics(x: torch.Tensor, groups: int) -> torch.Tensor:
    """The statistics (B, G, 2) of x (B, C, h, w) itself: mean and biased variance of each group, float64."""
    sums = GroupStatistics()
    sums.add(x, groups)
    return sums.result()


def group_norm(x: torch.Tensor, norm: nn.GroupNorm, stats: torch.Tensor) -> torch.Tensor:
    """`norm`(x) with the statistics stats (B, G, 2) instead of x's own."""
    c, g = x.shape[1], norm.num_groups
    # y = x * scale + shift per channel: one fused pass over x
    inv = torch.rsqrt(stats[..., 1].to(torch.float32) + norm.eps).repeat_interleave(c // g, dim=1)
    mean = stats[..., 0].to(torch.float32).repeat_interleave(c // g, dim=1)
    scale = inv * norm.weight.float()
    shift = norm.bias.float() - mean * scale
    return torch.addcmul(shift.to(x.dtype)[:, :, None, None], x, scale.to(x.dtype)[:, :, None, None])


# ---------------------------------------------------------------- the renderer


class NormResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus the input: the reference's ResnetBlock without time embedding."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels, eps=eps)
        self.conv1 = nn.Conv2d(channels, channels, 3)
        self.norm2 = nn.GroupNorm(groups, channels, eps=eps)
        self.conv2 = nn.Conv2d(channels, channels, 3)


class NormalizedCLIFRenderer(Renderer):
    """CLIF with GroupNorm and zero padding, statistics by `statistics` mode (see the module docstring).

    `native_size` is phi's (h, w), whose whole-image render gives the "latent" statistics.
    """

    def __init__(
        self,
        feature_channels: int,
        hidden_channels: int = 256,
        num_blocks: int = 2,
        norm_groups: int = 32,
        eps: float = 1e-6,
        statistics: str = "scale",
        native_size: Size = (256, 256),
        patch_size: int = 256,
        patch_padding: int = 8,
    ):
        super().__init__()
        check_choice(statistics, STATISTICS, "GroupNorm statistics")
        self.statistics = statistics
        self.scale_budget = SCALE_BUDGET
        self.native_size = tuple(native_size)
        self.patch_size, self.patch_padding = patch_size, patch_padding
        self.conv_in = nn.Conv2d(feature_channels + 4, hidden_channels, 3)
        self.blocks = nn.ModuleList([NormResBlock(hidden_channels, norm_groups, eps) for _ in range(num_blocks)])
        self.norm_out = nn.GroupNorm(norm_groups, hidden_channels, eps=eps)
        self.conv_out = nn.Conv2d(hidden_channels, 3, 3)
        self.halo = 2 + 2 * num_blocks
        self.feature_channels = feature_channels

    @property
    def norms(self) -> list[nn.GroupNorm]:
        return [n for block in self.blocks for n in (block.norm1, block.norm2)] + [self.norm_out]

    @property
    def stats_shape(self) -> tuple[int, int, int]:
        return (len(self.norms), self.norm_out.num_groups, 2)

    # ---- the network, on any grid with any statistics

    def network(self, phi: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor, masks: Masks) -> Network:
        """The net on a grid, paused at each norm: yields the norm's input over the grid (the halo
        cropped), is sent the statistics (B, G, 2) to normalise with, returns (B, 3, H, W).

        Centers ys (B, H + 2 halo), xs (B, W + 2 halo); masks: where the convs see pixels
        (zeros elsewhere). Pausing lets one pass gather a norm's statistics over many
        windows before any window goes on (`gathered_statistics`).
        """
        remaining = self.halo  # halo pixels still around the grid at the current layer

        def conv(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
            nonlocal masks, remaining
            y = layer(apply_masks(x, masks))
            masks, remaining = crop_masks(masks, 1), remaining - 1
            return y

        def normalised(x: torch.Tensor, norm: nn.GroupNorm, stats: torch.Tensor) -> torch.Tensor:
            return F.silu(group_norm(x, norm, stats), inplace=True)

        h = conv(self.conv_in, reference_layout(phi, ys, xs, cell))
        norms = iter(self.norms)
        for block in self.blocks:
            stats = yield crop(h, remaining)
            t = conv(block.conv1, normalised(h, next(norms), stats))
            stats = yield crop(t, remaining)
            t = conv(block.conv2, normalised(t, next(norms), stats))
            h = crop(h, 2) + t
        stats = yield crop(h, remaining)
        return conv(self.conv_out, normalised(h, next(norms), stats))

    def run(
        self, phi: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor, masks: Masks, stats: Statistics | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`network` run through: each norm with stats (B, N, G, 2), or None for each norm's own
        statistics over the grid (the reference's one-piece render of exactly that grid).
        Returns the image (B, 3, H, W) and the statistics used."""
        used: list[torch.Tensor] = []
        net = self.network(phi, ys, xs, cell, masks)
        x = next(net)
        while True:
            used.append(own_statistics(x, self.norms[len(used)].num_groups) if stats is None else stats[:, len(used)])
            try:
                x = net.send(used[-1])
            except StopIteration as done:
                return done.value, used

    # ---- the renderer interface

    def unpack(self, state: torch.Tensor) -> tuple[torch.Tensor, Statistics]:
        """The state -> phi (B, C, h, w) and the statistics (B, N, G, 2)."""
        phi = state[:, : self.feature_channels]
        n = math.prod(self.stats_shape)
        flat = state[:, self.feature_channels :].reshape(state.shape[0], -1)[:, :n]
        return phi, flat.reshape(state.shape[0], *self.stats_shape)

    def prepare(self, phi: torch.Tensor) -> torch.Tensor:
        """phi -> the state: phi and the "latent" statistics (NaN in the other modes, which set them per grid in `grid_state`)."""
        if self.statistics != "latent":
            stats = phi.new_full((phi.shape[0], *self.stats_shape), float("nan"))
            return pack_statistics(phi, stats)
        return pack_statistics(phi, self.one_piece_statistics(phi, Box.full(), self.native_size))

    def one_piece_statistics(self, phi: torch.Tensor, box: Box, size: Size) -> Statistics:
        """Each norm's statistics in the one-piece render of the grid `size` over `box` (the whole grid at once, zero padded at its border)."""
        b = phi.shape[0]
        ys, xs = (t.expand(b, -1) for t in geometry.window_centers(box, size, None, halo=self.halo))
        cell = torch.tensor(geometry.cell_size(box, size), dtype=torch.float64).expand(b, 2)
        _, used = self.run(phi, ys, xs, cell, window_masks(ys, xs, self.halo))
        return torch.stack(used, dim=1)

    def forward(self, state: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Render with the state's statistics; a state without them (a grid-dependent mode whose `grid_state`
        was not asked for, as in training) normalises each norm over the window itself, as the reference does."""
        phi, stats = self.unpack(state)
        rgb, _ = self.run(phi, ys, xs, cell, domain_masks(ys, xs), None if torch.isnan(stats).any() else stats)
        return rgb

    def last_layer_weight(self) -> torch.Tensor:
        return self.conv_out.weight

    # ---- grid-dependent modes: "whole" statistics and "patch" renders

    @property
    def grid_dependent(self) -> bool:
        """Whether a window's pixels depend on the grid it belongs to (not just on the latent): on its pixel size in "scale"."""
        return self.statistics != "latent"

    def grid_state(self, state: torch.Tensor, box: Box, size: Size, tile: int = 512) -> torch.Tensor:
        """The state with the statistics a grid is rendered with: "whole", those of the grid `size` over `box`;
        "scale", those of the whole image at the grid's pixel size (`scale_grid`); other modes: the state itself."""
        if self.statistics == "whole":
            return self.gathered_statistics(state, box, size, geometry.tiles(size, geometry.check_tile(tile)))
        if self.statistics == "scale":
            return self.gathered_statistics(state, *scale_grid(geometry.cell_size(box, size), self.scale_budget))
        return state

    def gathered_statistics(self, state: torch.Tensor, box: Box, size: Size, windows: list[Window]) -> torch.Tensor:
        """The state with each norm's statistics over `windows` of the grid `size` over `box`, tile by tile.

        Norm k's statistics need the norms before it. Where every window's activations fit
        in KEEP_BYTES (the "scale" lattice, grids up to about 512²), each window's network
        pauses at a norm until all windows have reached it: one pass of the net in all.
        Otherwise each norm's pass runs the windows again from the start.
        """
        phi, _ = self.unpack(state)
        b = phi.shape[0]
        cell = torch.tensor(geometry.cell_size(box, size), dtype=torch.float64).expand(b, 2)
        stats = torch.full((b, *self.stats_shape), float("nan"), dtype=torch.float64, device=phi.device)
        pixels = sum((w.height + 2 * self.halo) * (w.width + 2 * self.halo) for w in windows)
        keep = 2 * b * pixels * self.norm_out.num_channels * phi.element_size() <= KEEP_BYTES  # the block's input and its branch
        paused: dict[int, Network] = {}
        for k, norm in enumerate(self.norms):
            sums = GroupStatistics()
            for i, window in enumerate(windows):
                if i in paused:
                    net = paused.pop(i)
                    x = net.send(stats[:, k - 1])
                else:
                    ys, xs = (t.expand(b, -1) for t in geometry.window_centers(box, size, window, halo=self.halo))
                    net = self.network(phi, ys, xs, cell, domain_masks(ys, xs))
                    x = next(net)
                    for j in range(k):
                        x = net.send(stats[:, j])
                sums.add(x, norm.num_groups)
                if keep and k + 1 < len(self.norms):
                    paused[i] = net
                else:
                    net.close()
            stats[:, k] = sums.result()
        return pack_statistics(phi, stats)

    def render_grid_window(self, state: torch.Tensor, box: Box, size: Size, window: Window) -> torch.Tensor:
        """`window` of the grid `size` over `box`, (B, 3, h, w): by patches in "patch" mode, else as any renderer."""
        if self.statistics != "patch":
            return super().render_grid_window(state, box, size, window)
        phi, _ = self.unpack(state)
        b = phi.shape[0]
        window = window or Window(0, 0, *size)
        cell = torch.tensor(geometry.cell_size(box, size), dtype=torch.float64).expand(b, 2)
        out = phi.new_empty(b, 3, window.height, window.width)
        for patch, padded in reference_patches(size, self.patch_size, self.patch_padding):
            inner = intersect(patch, window)
            if inner is None:
                continue
            ys, xs = geometry.window_centers(box, size, padded, halo=self.halo)
            ys, xs = ys.expand(b, -1), xs.expand(b, -1)
            rgb, _ = self.run(phi, ys, xs, cell, window_masks(ys, xs, self.halo))
            top, left = inner.top - padded.top, inner.left - padded.left
            out[:, :, inner.top - window.top : inner.top - window.top + inner.height, inner.left - window.left : inner.left - window.left + inner.width] = rgb[
                :, :, top : top + inner.height, left : left + inner.width
            ]
        return out


def scale_grid(cell: tuple[float, float], budget: int = SCALE_BUDGET) -> tuple[Box, Size, list[Window]]:
    """The whole image at pixel size `cell`, and the windows of it whose statistics stand for it.

    The grid has round(2 / cell) pixels a side and exactly that pixel size (its box is the
    image, give or take part of a pixel). Up to `budget` pixels, every pixel counts (the
    statistics are the reference's one-piece render's); beyond, a fixed, evenly spread
    lattice of SCALE_WINDOW² windows with about `budget` pixels in all estimates them.
    """
    cy, cx = cell
    h, w = max(1, round(2 / cy)), max(1, round(2 / cx))
    box = Box(-h * cy / 2, -w * cx / 2, h * cy / 2, w * cx / 2)
    if h * w <= budget:
        return box, (h, w), geometry.tiles((h, w), 512)
    side = SCALE_WINDOW
    ny = max(1, min(h // side, round(math.sqrt(budget / side**2 * h / w))))
    nx = max(1, min(w // side, math.ceil(budget / side**2 / ny)))
    wh, ww = min(side, h), min(side, w)
    tops = [round(i * (h - wh) / max(ny - 1, 1)) for i in range(ny)]
    lefts = [round(j * (w - ww) / max(nx - 1, 1)) for j in range(nx)]
    return box, (h, w), [Window(t, left, wh, ww) for t in tops for left in lefts]


def reference_patches(size: Size, patch: int, padding: int) -> list[tuple[Window, Window]]:
    """The reference's patch-wise render of an H x W grid: each `patch`² square and it padded by
    `padding` pixels a side, clipped to the grid, as (patch, padded patch) windows."""
    h, w = size
    result = []
    for top in range(0, h, patch):
        for left in range(0, w, patch):
            ph, pw = min(patch, h - top), min(patch, w - left)
            y0, x0 = max(top - padding, 0), max(left - padding, 0)
            y1, x1 = min(top + ph + padding, h), min(left + pw + padding, w)
            result.append((Window(top, left, ph, pw), Window(y0, x0, y1 - y0, x1 - x0)))
    return result


def intersect(a: Window, b: Window) -> Window | None:
    top, left = max(a.top, b.top), max(a.left, b.left)
    bottom, right = min(a.top + a.height, b.top + b.height), min(a.left + a.width, b.left + b.width)
    return Window(top, left, bottom - top, right - left) if bottom > top and right > left else None
