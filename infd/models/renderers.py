"""Renderers: from a decoded feature map phi to RGB at any grid of query pixels.

All renderers share one interface so that the autoencoder, the trainer, tiling and the
evaluation treat them alike:

    state = renderer.prepare(phi)                 # once per latent
    rgb = renderer(state, ys, xs, cell)           # any number of times, any windows

ys (B, h + 2 halo) and xs (B, w + 2 halo) are the float64 pixel centers of the query rows
and columns (geometry.window_centers / axis_centers, extended by the renderer's `halo`),
cell (B, 2) the query pixel size in [-1, 1] units; the result is (B, 3, h, w) in about
[-1, 1]. A renderer never sees anything but the pixels it is asked for plus its halo, and
uses no statistics across pixels (no GroupNorm), so a tile rendered alone equals the
same pixels of a whole-image render: rendering is seam-free by construction.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from infd import geometry
from infd.errors import InfdError, check_choice

RENDERERS = ("clif", "liif", "fixed", "clif_groupnorm")  # clif_groupnorm: infd.models.normalized_clif (the paper's released models)


LOOKUPS = ("nearest", "bilinear")


def layout_channels(feature_channels: int, lookup: str = "nearest") -> int:
    """Channels of `query_layout`'s output for `feature_channels` features."""
    return feature_channels + (4 if lookup == "nearest" else 6)


def cell_in_features(cell: torch.Tensor, feature_size: tuple[int, int]) -> torch.Tensor:
    """Query pixel size (B, 2) in [-1, 1] units -> in feature cells of an (h, w) feature map, float64 on the CPU."""
    return geometry.cell_in_feature_units(cell.double().cpu(), torch.tensor(feature_size, dtype=torch.float64))


def gather_layout(phi: torch.Tensor, iy: torch.Tensor, oy: torch.Tensor, ix: torch.Tensor, ox: torch.Tensor, cell_f: torch.Tensor) -> torch.Tensor:
    """The features at rows iy (B, H) and columns ix (B, W) of phi (B, C, h, w), then offset and cell.

    oy (B, H), ox (B, W): the query's offset from each feature's center, cell_f (B, 2) the
    query pixel size, both in feature cells. Returns (B, C + 4, H, W) in channels_last.
    """
    b, c = phi.shape[:2]
    layout = phi.new_empty(b, iy.shape[1], ix.shape[1], c + 4)
    phi_hwc = phi.permute(0, 2, 3, 1)
    for i in range(b):
        layout[i, :, :, :c] = phi_hwc[i].index_select(0, iy[i]).index_select(1, ix[i])
    layout[..., c] = oy.to(phi.dtype)[:, :, None]
    layout[..., c + 1] = ox.to(phi.dtype)[:, None, :]
    layout[..., c + 2 :] = cell_f.to(phi.dtype)[:, None, None, :]
    return layout.permute(0, 3, 1, 2)


def query_layout(phi: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor, lookup: str = "nearest") -> torch.Tensor:
    """The CLIF/LIIF input: a feature, the position within its cell and the pixel size, in query order.

    phi: (B, C, h, w); ys: (B, H) and xs: (B, W) query centers; cell: (B, 2).
    Returns (B, layout_channels(C, lookup), H, W) in channels_last memory.

    lookup "nearest" (the paper's CLIF and LIIF): the nearest feature, then the offset
    (y, x) from its center and the cell (y, x), in feature cells so the numbers mean the
    same at every resolution of phi. The offset jumps from +0.5 to -0.5 where cells meet.
    lookup "bilinear": the features interpolated between the 4 nearest centers, then
    sin and cos of 2 pi offset (y, x), then the cell: every input channel is continuous
    in the query position, so the render has no steps at cell edges by construction.

    The grid is separable, so the lookup is 1-D index_selects per image instead of a 2-D
    grid_sample, written straight into the channels_last buffer the convs want.
    """
    check_choice(lookup, LOOKUPS, "feature lookup")
    b, c, h, w = phi.shape
    iy, oy = (t.to(phi.device) for t in geometry.feature_lookup(ys, h))
    ix, ox = (t.to(phi.device) for t in geometry.feature_lookup(xs, w))
    cell_f = cell_in_features(cell, (h, w)).to(phi.device)
    if lookup == "nearest":
        return gather_layout(phi, iy, oy, ix, ox, cell_f)
    layout = phi.new_empty(b, iy.shape[1], ix.shape[1], layout_channels(c, lookup))
    phi_hwc = phi.permute(0, 2, 3, 1)
    y0, y1, wy = (t.to(phi.device) for t in geometry.feature_interpolation(ys, h))
    x0, x1, wx = (t.to(phi.device) for t in geometry.feature_interpolation(xs, w))
    wy, wx = wy.to(phi.dtype), wx.to(phi.dtype)
    for i in range(b):
        rows = torch.lerp(phi_hwc[i].index_select(0, y0[i]), phi_hwc[i].index_select(0, y1[i]), wy[i][:, None, None])
        layout[i, :, :, :c] = torch.lerp(rows.index_select(1, x0[i]), rows.index_select(1, x1[i]), wx[i][None, :, None])
    angles = [2 * math.pi * oy[:, :, None], 2 * math.pi * ox[:, None, :]]
    for k, values in enumerate(f(a) for a in angles for f in (torch.sin, torch.cos)):
        layout[..., c + k] = values.to(phi.dtype)
    layout[..., -2:] = cell_f.to(phi.dtype)[:, None, None, :]
    return layout.permute(0, 3, 1, 2)


def axis_layout(centers: torch.Tensor, n_features: int, lookup: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """One axis of `query_layout` as a matrix: centers (N,) -> (weights (N, n), channels (N, k)), float64.

    The layout's feature at query (i, j) is sum over y, x of rows[i, y] * cols[j, x] * phi[:, y, x]
    (nearest: a single 1 per query; bilinear: 1 - w and w at the centers around it); its
    other channels along this axis are the offset from the nearest center (nearest, k = 1)
    or its sin and cos (bilinear, k = 2).
    """
    index, offset = geometry.feature_lookup(centers, n_features)
    weights = torch.zeros(centers.shape[0], n_features, dtype=torch.float64)
    queries = torch.arange(centers.shape[0])
    if lookup == "nearest":
        weights[queries, index] = 1
        return weights, offset[:, None]
    lower, upper, upper_weight = geometry.feature_interpolation(centers, n_features)
    weights[queries, lower] += 1 - upper_weight
    weights[queries, upper] += upper_weight
    angle = 2 * math.pi * offset
    return weights, torch.stack([torch.sin(angle), torch.cos(angle)], dim=1)


def first_conv(conv: nn.Conv2d, phi: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor, lookup: str = "nearest") -> torch.Tensor:
    """`conv(query_layout(phi, ys, xs, cell, lookup))` for CLIF's first conv (3x3, unpadded): (B, O, H - 2, W - 2), channels_last.

    The conv is linear and the layout separable (`axis_layout`): its feature part is phi
    mixed once by each of the 9 taps' weights (on phi's grid, only the cells the window
    reads), then interpolated along x and along y by two matrix products, plus terms of the
    row alone, the column alone and the cell. Where query pixels are much finer than phi's
    cells that is a fraction of the conv's work (a third at 2048² of the shipped model) and
    no (H, W, C) layout is gathered; elsewhere (`separable_pays`) it is the conv. The same
    sums in another order: equal to the conv up to float rounding (~1e-6 relative), and per
    pixel, so a tile still equals the whole render.
    """
    b, _, h, w = phi.shape
    if phi.device.type != "cpu":  # measured on CPUs only; a GPU runs the conv
        return conv(query_layout(phi, ys, xs, cell, lookup))
    axes = [(axis_layout(ys[i], h, lookup), axis_layout(xs[i], w, lookup)) for i in range(b)]
    spans = [(read_span(rows), read_span(cols)) for (rows, _), (cols, _) in axes]
    k = axes[0][0][1].shape[1]  # channels of one axis
    if not all(separable_pays(conv, ys.shape[1], r1 - r0, c1 - c0, k) for (r0, r1), (c0, c1) in spans):
        return conv(query_layout(phi, ys, xs, cell, lookup))
    cell_f = cell_in_features(cell, (h, w))
    out = []
    for i, (((rows, row_channels), (cols, col_channels)), ((r0, r1), (c0, c1))) in enumerate(zip(axes, spans)):
        out.append(_separable_first_conv(conv, phi[i, :, r0:r1, c0:c1], rows[:, r0:r1], cols[:, c0:c1], row_channels, col_channels, cell_f[i]))
    return out[0] if b == 1 else torch.cat(out).contiguous(memory_format=torch.channels_last)


def read_span(weights: torch.Tensor) -> tuple[int, int]:
    """(first, last + 1): the features an `axis_layout` weight matrix (N, n) reads."""
    read = weights.abs().sum(0).nonzero()[:, 0]
    return int(read[0]), int(read[-1]) + 1


def separable_pays(conv: nn.Conv2d, height: int, rows: int, cols: int, k: int) -> bool:
    """Whether `first_conv` should take the separable form: at most half the conv's multiply-adds.

    Per output column and channel, the conv takes 9 C' a row (C' its input channels) and
    the separable form 3 (rows + k) a row, plus 9 rows cols once for the interpolation along
    x. Its matrix products and their copies are slower per multiply-add than the conv: at
    3/4 of the conv's multiply-adds (the shipped model at 1024², 512² tiles) it is no faster.
    """
    return 2 * (3 * (rows + k) * (height - 2) + 9 * rows * cols) <= 9 * conv.in_channels * (height - 2)


def _separable_first_conv(conv: nn.Conv2d, phi: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, row_channels: torch.Tensor, col_channels: torch.Tensor, cell_f: torch.Tensor) -> torch.Tensor:
    """`first_conv` of one image from its separable layout: phi (C, r, q), rows (H, r), cols (W, q),
    row_channels (H, k), col_channels (W, k), cell_f (2,) -> (1, O, H - 2, W - 2) channels_last."""
    c, r, q = phi.shape
    (height, k), width = row_channels.shape, col_channels.shape[0]
    weight = conv.weight  # (O, C + 2k + 2, 3, 3): features, row channels, column channels, cell
    o = weight.shape[0]
    rows, cols, row_channels, col_channels, cell_f = (t.to(phi.device, phi.dtype) for t in (rows, cols, row_channels, col_channels, cell_f))
    # Each tap's weights applied to the features it reads: (dy, dx, o, y, x).
    mixed = (weight[:, :c].permute(2, 3, 0, 1).reshape(9 * o, c) @ phi.reshape(c, r * q)).view(3, 3, o, r, q)
    # Along x: column j reads its tap dx at query column j + dx. -> (dy, y, j, o)
    taps_x = torch.cat([cols[dx : dx + width - 2] for dx in range(3)], dim=1)  # (W - 2, 3q)
    along_x = (taps_x @ mixed.permute(1, 4, 0, 3, 2).reshape(3 * q, 3 * r * o)).view(width - 2, 3 * r, o).transpose(0, 1)
    # The row channels' weights, summed over dx (they do not change along a row): (dy, k) rows of (W - 2, o).
    row_terms = weight[:, c : c + k].sum(3).permute(2, 1, 0).reshape(3 * k, 1, o).expand(3 * k, width - 2, o)
    # Along y, with the row channels as more rows: (H - 2, 3r + 3k) @ (3r + 3k, (W - 2) o).
    taps_y = torch.cat([rows[dy : dy + height - 2] for dy in range(3)] + [row_channels[dy : dy + height - 2] for dy in range(3)], dim=1)
    by_row = torch.cat([along_x, row_terms]).reshape(3 * r + 3 * k, (width - 2) * o)
    # Column channels, the cell and the bias: the same for every row.
    taps_cols = torch.cat([col_channels[dx : dx + width - 2] for dx in range(3)], dim=1)  # (W - 2, 3k)
    col_terms = taps_cols @ weight[:, c + k : c + 2 * k].sum(2).permute(2, 1, 0).reshape(3 * k, o)
    constant = conv.bias + weight[:, c + 2 * k :].sum((2, 3)) @ cell_f
    out = torch.addmm((col_terms + constant).reshape(1, -1), taps_y, by_row)  # (H - 2, (W - 2) o)
    return out.view(1, height - 2, width - 2, o).permute(0, 3, 1, 2)


def bicubic_matrix(centers: torch.Tensor, n: int, a: float = -0.75) -> torch.Tensor:
    """Bicubic interpolation of n samples at the query centers (N,) in [-1, 1] units, as an (N, n) float64 matrix.

    What `grid_sample(mode="bicubic", padding_mode="border", align_corners=False)` does along
    one axis: the cubic convolution kernel (a = -0.75) over the 4 samples around each
    query, taps beyond the border read the border sample.
    """
    position = ((centers.double() + 1) * n - 1) / 2
    first = torch.floor(position)
    t = (position - first)[:, None]
    distance = torch.cat([t + 1, t, 1 - t, 2 - t], dim=1)  # to taps first - 1 .. first + 2
    near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
    weights = torch.where(distance <= 1, near, far)
    taps = (first.long()[:, None] + torch.arange(-1, 3)).clamp(0, n - 1)
    return torch.zeros(centers.shape[0], n, dtype=torch.float64).scatter_add_(1, taps, weights)


def detail_weight(cell: torch.Tensor, feature_size: tuple[int, int], fade_cell: float, octaves: float = 2.0) -> torch.Tensor:
    """How much of a residual renderer's detail to keep for query pixels of size `cell` (B, 2).

    1 for pixels at least `fade_cell` feature cells wide (the finest scale trained on),
    falling linearly in log2 of the pixel size to 0 at `octaves` octaves finer: a zoom
    beyond the trained scales shows the smooth base instead of detail the renderer never
    learned. The finer axis of anisotropic pixels decides. Returns (B, 1, 1, 1) float64;
    all ones when fade_cell is 0.
    """
    cell_f = cell_in_features(cell, feature_size)
    if fade_cell <= 0:
        return torch.ones(cell.shape[0], 1, 1, 1, dtype=torch.float64)
    finest = cell_f.min(dim=1).values
    weight = 1 + torch.log2(finest / fade_cell) / octaves
    return weight.clamp(0, 1).view(-1, 1, 1, 1)


class Renderer(nn.Module):
    """Base class: subclasses set `halo` and implement `forward`.

    A renderer whose pixels depend on the grid they belong to, not only on the latent
    (`grid_dependent`: GroupNorm statistics of the whole render, patch-wise renders), also
    overrides `grid_state` (what a grid needs, computed once per grid) and
    `render_grid_window`; rendering calls both for every renderer.
    """

    halo: int = 0
    grid_dependent: bool = False

    def prepare(self, phi: torch.Tensor) -> torch.Tensor:
        return phi

    def grid_state(self, state: torch.Tensor, box: geometry.Box, size: tuple[int, int], tile: int = 512) -> torch.Tensor:
        """The state for rendering windows of the grid `size` over `box` (the state itself unless grid_dependent)."""
        return state

    def render_grid_window(self, state: torch.Tensor, box: geometry.Box, size: tuple[int, int], window: geometry.Window | None = None) -> torch.Tensor:
        """`window` (default: all) of the H x W grid over `box`: (B, 3, h, w), the halo added here."""
        ys, xs = geometry.window_centers(box, size, window, halo=self.halo)
        b = state.shape[0]
        cell = torch.tensor(geometry.cell_size(box, size), dtype=torch.float64).expand(b, 2)
        return self(state, ys.expand(b, -1), xs.expand(b, -1), cell)

    def last_layer_weight(self) -> torch.Tensor:
        raise NotImplementedError


class ValidResBlock(nn.Module):
    """Pre-activation residual block of two 3x3 convs without padding or normalisation.

    Unpadded ("valid") convs shrink the map by 2 pixels a side; the skip path is cropped
    to match. Nothing depends on where a tile starts, which keeps tiling exact.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3)
        self.conv2 = nn.Conv2d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.conv1(F.silu(x))))
        return x[..., 2:-2, 2:-2] + h


class CLIFRenderer(Renderer):
    """Convolutional Local Image Function: a small conv net over the query layout.

    Seeing its neighbours gives it the capacity for realistic texture that a per-pixel MLP
    lacks; conditioning on the pixel size keeps every scale consistent.
    """

    def __init__(self, feature_channels: int, hidden_channels: int = 256, num_blocks: int = 2, lookup: str = "nearest"):
        super().__init__()
        self.lookup = lookup
        self.conv_in = nn.Conv2d(layout_channels(feature_channels, lookup), hidden_channels, 3)
        self.blocks = nn.Sequential(*[ValidResBlock(hidden_channels) for _ in range(num_blocks)])
        self.conv_out = nn.Conv2d(hidden_channels, 3, 3)
        self.halo = 2 + 2 * num_blocks

    def forward(self, phi: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        h = self.blocks(first_conv(self.conv_in, phi, ys, xs, cell, self.lookup))
        return self.conv_out(F.silu(h))

    def last_layer_weight(self) -> torch.Tensor:
        return self.conv_out.weight


def ensemble_lookup(centers: torch.Tensor, n_features: int, local_ensemble: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The features a LIIF query reads along one axis of n features, and their blend weights.

    centers: (B, N) query centers. Returns (index: long, offset: float64, weight: float64),
    each (K, B, N). local_ensemble: K = 2, the feature centers just below and just above
    each query (clamped at the border); the weight of one is the query's distance to the
    other, in feature cells. That is LIIF's area weighting along one axis (its 2-D weights
    are the products): the weights sum to 1, are 1 on a feature's center and change
    continuously with the query. Otherwise K = 1: the nearest feature, weight 1. offset is
    the query's distance from that feature's center in feature cells.
    """
    nearest, offset = geometry.feature_lookup(centers, n_features)
    if not local_ensemble:
        return nearest[None], offset[None], torch.ones_like(offset)[None]
    lower, upper, upper_weight = geometry.feature_interpolation(centers, n_features)
    index = torch.stack([lower, upper])
    return index, offset + (nearest - index), torch.stack([1 - upper_weight, upper_weight])


class LIIFRenderer(Renderer):
    """LIIF baseline (Chen et al. 2021): an MLP applied to each query pixel on its own (1x1 convs).

    The full LIIF, so that comparing CLIF with it is fair. `unfold`: `prepare` replaces each
    feature by its 3x3 neighbourhood (zero padded, (C, 3, 3) order), the only spatial
    context LIIF has. `local_ensemble`: each query is predicted from the 4 feature centers
    around it, each with its offset from that center, and the predictions are blended with
    bilinear area weights (`ensemble_lookup` per axis), which makes the render continuous
    in the query position; without it the nearest feature alone steps where cells meet.
    Offsets and the cell (the query pixel size, which the MLP also reads) are in feature
    cells. The unfolded state is 9 times phi's memory.
    `unfold=False, local_ensemble=False` is the earlier nearest-feature renderer.
    """

    def __init__(self, feature_channels: int, hidden_channels: int = 256, num_layers: int = 4, unfold: bool = True, local_ensemble: bool = True):
        super().__init__()
        self.unfold = unfold
        self.local_ensemble = local_ensemble
        layers: list[nn.Module] = [nn.Conv2d(feature_channels * (9 if unfold else 1) + 4, hidden_channels, 1)]
        for _ in range(num_layers - 1):
            layers += [nn.SiLU(), nn.Conv2d(hidden_channels, hidden_channels, 1)]
        self.mlp = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(hidden_channels, 3, 1)

    def prepare(self, phi: torch.Tensor) -> torch.Tensor:
        """phi: (B, C, h, w) -> (B, 9C, h, w) unfolded, channels_last for the per-query gathers."""
        if not self.unfold:
            return phi
        b, c, h, w = phi.shape
        return F.unfold(phi, 3, padding=1).view(b, 9 * c, h, w).contiguous(memory_format=torch.channels_last)

    def forward(self, state: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """state: (B, C', h, w) from `prepare`; ys (B, H), xs (B, W), cell (B, 2) -> (B, 3, H, W)."""
        h, w = state.shape[-2:]
        rows = [t.to(state.device) for t in ensemble_lookup(ys, h, self.local_ensemble)]
        cols = [t.to(state.device) for t in ensemble_lookup(xs, w, self.local_ensemble)]
        cell_f = cell_in_features(cell, (h, w)).to(state.device)
        rgb = 0  # blended in the state's precision, also under autocast
        for iy, oy, wy in zip(*rows):  # one ensemble member at a time: the memory of one MLP pass
            for ix, ox, wx in zip(*cols):
                pred = self.conv_out(F.silu(self.mlp(gather_layout(state, iy, oy, ix, ox, cell_f))))
                rgb = rgb + (wy[:, None, :, None] * wx[:, None, None, :]).to(state.dtype) * pred
        return rgb

    def last_layer_weight(self) -> torch.Tensor:
        return self.conv_out.weight


class FixedResolutionRenderer(Renderer):
    """Baseline: RGB at the feature map's own resolution, resampled to the query grid.

    This is "a fixed-resolution decoder + upsampling": the head is the usual last conv of
    an LDM decoder; queries are answered by bicubic interpolation of its output, after an
    antialiased downsize when the query pixels are larger than the decoder's.

    `skip_rgb=True`: the last 3 channels of the features are already an RGB image (an
    anchored autoencoder's upsampled latent thumbnail) and the head, zero-initialised,
    learns a correction to it, so training starts from that image instead of from noise.
    """

    def __init__(self, feature_channels: int, skip_rgb: bool = False):
        super().__init__()
        self.skip_rgb = skip_rgb
        self.head = nn.Conv2d(feature_channels, 3, 3, padding=1)
        if skip_rgb:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def prepare(self, phi: torch.Tensor) -> torch.Tensor:
        rgb = self.head(phi)
        return rgb + phi[:, -3:] if self.skip_rgb else rgb

    def forward(self, rgb: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.resample(rgb[i : i + 1], ys[i], xs[i], cell[i]) for i in range(rgb.shape[0])])

    @staticmethod
    def resample(rgb: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """rgb (1, 3, h, w) -> (1, 3, len(ys), len(xs)) bicubic at the query centers."""
        h, w = rgb.shape[-2:]
        # Whole-image resolution the query pixels correspond to; shrink (antialiased) if coarser.
        target = (min(h, max(1, round(2 / float(cell[0])))), min(w, max(1, round(2 / float(cell[1])))))
        if target != (h, w):  # antialiased shrinking has float32/64 kernels only (no bfloat16 on the CPU)
            rgb = F.interpolate(rgb.float(), size=target, mode="bicubic", antialias=True, align_corners=False).to(rgb.dtype)
        # grid_sample(mode="bicubic", padding_mode="border") on a separable grid, as two matrix products
        rows, cols = (bicubic_matrix(c, n).to(rgb.device, rgb.dtype) for c, n in ((ys, rgb.shape[-2]), (xs, rgb.shape[-1])))
        return (rows @ rgb @ cols.T).contiguous()

    def last_layer_weight(self) -> torch.Tensor:
        return self.head.weight


class ResidualDetail:
    """Mixin: a renderer that adds detail to the bicubic upsampling of a fixed-resolution RGB head.

    The render is never worse than "fixed head + bicubic" at the start of training: the
    detail renderer's output conv starts at zero, so it learns only the detail the smooth
    base lacks. For a converted LDM autoencoder the head is the original decoder's last
    conv, so at the original output size the render equals the original decoder's image.
    The state is the detail renderer's state and the head's image stacked, (B, F' + 3, S, S),
    so tiles and the interface stay those of every renderer.

    `fade_cell` > 0: the detail fades out (see `detail_weight`) for query pixels finer than
    `fade_cell` feature cells, the finest scale the model was trained on, so an extreme
    zoom shows the smooth base rather than the renderer's guesses outside its training.
    Subclasses put the mixin before the detail renderer's class and call `add_base`.
    """

    def add_base(self, feature_channels: int, fade_cell: float, skip_rgb: bool) -> None:
        self.base = FixedResolutionRenderer(feature_channels, skip_rgb)
        self.fade_cell = fade_cell
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def prepare(self, phi: torch.Tensor) -> torch.Tensor:
        return torch.cat([super().prepare(phi), self.base.prepare(phi)], dim=1)

    def forward(self, state: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        detail_state, rgb = state[:, :-3], state[:, -3:]
        halo = self.halo  # the head reads the window's centers without the detail renderer's halo
        base = self.base(rgb, ys[:, halo : ys.shape[1] - halo], xs[:, halo : xs.shape[1] - halo], cell)
        weight = detail_weight(cell, tuple(rgb.shape[-2:]), self.fade_cell)
        if not weight.any():
            return base  # past the fade: no detail to add, and no detail renderer to run
        return base + weight.to(base.device, base.dtype) * super().forward(detail_state, ys, xs, cell)


class ResidualCLIFRenderer(ResidualDetail, CLIFRenderer):
    """CLIF adding detail to the bicubic upsampling of a fixed-resolution RGB head (see `ResidualDetail`)."""

    def __init__(
        self,
        feature_channels: int,
        hidden_channels: int = 256,
        num_blocks: int = 2,
        lookup: str = "nearest",
        fade_cell: float = 0.0,
        skip_rgb: bool = False,
    ):
        super().__init__(feature_channels, hidden_channels, num_blocks, lookup)
        self.add_base(feature_channels, fade_cell, skip_rgb)


class ResidualLIIFRenderer(ResidualDetail, LIIFRenderer):
    """LIIF (unfolded, local ensemble) adding detail to the same base: CLIF's residual recipe with LIIF's MLP."""

    def __init__(self, feature_channels: int, hidden_channels: int = 256, num_layers: int = 4, fade_cell: float = 0.0, skip_rgb: bool = False):
        super().__init__(feature_channels, hidden_channels, num_layers)
        self.add_base(feature_channels, fade_cell, skip_rgb)


def make_renderer(
    kind: str,
    feature_channels: int,
    hidden_channels: int = 256,
    num_blocks: int = 2,
    lookup: str = "nearest",
    residual: bool = False,
    fade_cell: float = 0.0,
    skip_rgb: bool = False,
) -> Renderer:
    """The renderer `kind` (one of RENDERERS); `residual`: its detail added to a fixed RGB head's bicubic (`ResidualDetail`)."""
    check_choice(kind, RENDERERS[:3], "renderer")  # clif_groupnorm is built by the autoencoder (it needs phi's size)
    if residual and kind == "fixed":
        raise InfdError("a residual renderer adds CLIF's or LIIF's detail to the fixed head; 'fixed' has none to add.")
    if residual and kind == "liif":
        return ResidualLIIFRenderer(feature_channels, hidden_channels, 2 * num_blocks, fade_cell, skip_rgb)
    if residual:
        return ResidualCLIFRenderer(feature_channels, hidden_channels, num_blocks, lookup, fade_cell, skip_rgb)
    if kind == "clif":
        return CLIFRenderer(feature_channels, hidden_channels, num_blocks, lookup)
    if kind == "liif":
        return LIIFRenderer(feature_channels, hidden_channels, num_layers=2 * num_blocks)
    return FixedResolutionRenderer(feature_channels)
