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

import torch
import torch.nn as nn
import torch.nn.functional as F

from infd import geometry
from infd.errors import InfdError

RENDERERS = ("clif", "liif", "fixed")


def query_layout(phi: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
    """The CLIF/LIIF input: nearest feature, offset and pixel size, laid out in query order.

    phi: (B, C, h, w); ys: (B, H) and xs: (B, W) query centers; cell: (B, 2).
    Returns (B, C + 4, H, W) in channels_last memory: C feature channels, then the offset
    (y, x) from the nearest feature's center and the cell (y, x), both in feature cells so
    the numbers mean the same at every resolution of phi. The grid is separable, so the
    lookup is two 1-D index_selects per image instead of a 2-D grid_sample, written
    straight into the channels_last buffer the convs want.
    """
    b, c, h, w = phi.shape
    iy, oy = geometry.feature_lookup(ys, h)
    ix, ox = geometry.feature_lookup(xs, w)
    hq, wq = iy.shape[1], ix.shape[1]
    iy, ix = iy.to(phi.device), ix.to(phi.device)
    layout = phi.new_empty(b, hq, wq, c + 4)
    phi_hwc = phi.permute(0, 2, 3, 1)
    for i in range(b):
        layout[i, :, :, :c] = phi_hwc[i].index_select(0, iy[i]).index_select(1, ix[i])
    feature_size = torch.tensor([h, w], dtype=torch.float64)
    cell_f = geometry.cell_in_feature_units(cell.double().cpu(), feature_size)
    layout[..., c] = oy.to(phi.device, phi.dtype)[:, :, None]
    layout[..., c + 1] = ox.to(phi.device, phi.dtype)[:, None, :]
    layout[..., c + 2 :] = cell_f.to(phi.device, phi.dtype)[:, None, None, :]
    return layout.permute(0, 3, 1, 2)


class Renderer(nn.Module):
    """Base class: subclasses set `halo` and implement `forward`."""

    halo: int = 0

    def prepare(self, phi: torch.Tensor) -> torch.Tensor:
        return phi

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

    def __init__(self, feature_channels: int, hidden_channels: int = 256, num_blocks: int = 2):
        super().__init__()
        self.conv_in = nn.Conv2d(feature_channels + 4, hidden_channels, 3)
        self.blocks = nn.Sequential(*[ValidResBlock(hidden_channels) for _ in range(num_blocks)])
        self.conv_out = nn.Conv2d(hidden_channels, 3, 3)
        self.halo = 2 + 2 * num_blocks

    def forward(self, phi: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.conv_in(query_layout(phi, ys, xs, cell)))
        return self.conv_out(F.silu(h))

    def last_layer_weight(self) -> torch.Tensor:
        return self.conv_out.weight


class LIIFRenderer(Renderer):
    """LIIF baseline: an MLP applied to each query pixel on its own (1x1 convs).

    Nearest-feature lookup with offset and cell as in LIIF, without its feature unfolding
    and local ensemble; it has the same inputs as CLIF but no spatial context.
    """

    def __init__(self, feature_channels: int, hidden_channels: int = 256, num_layers: int = 4):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(feature_channels + 4, hidden_channels, 1)]
        for _ in range(num_layers - 1):
            layers += [nn.SiLU(), nn.Conv2d(hidden_channels, hidden_channels, 1)]
        self.mlp = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(hidden_channels, 3, 1)

    def forward(self, phi: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.mlp(query_layout(phi, ys, xs, cell))))

    def last_layer_weight(self) -> torch.Tensor:
        return self.conv_out.weight


class FixedResolutionRenderer(Renderer):
    """Baseline: RGB at the feature map's own resolution, resampled to the query grid.

    This is "a fixed-resolution decoder + upsampling": the head is the usual last conv of
    an LDM decoder; queries are answered by bicubic interpolation of its output, after an
    antialiased downsize when the query pixels are larger than the decoder's.
    """

    def __init__(self, feature_channels: int):
        super().__init__()
        self.head = nn.Conv2d(feature_channels, 3, 3, padding=1)

    def prepare(self, phi: torch.Tensor) -> torch.Tensor:
        return self.head(phi)

    def forward(self, rgb: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.resample(rgb[i : i + 1], ys[i], xs[i], cell[i]) for i in range(rgb.shape[0])])

    @staticmethod
    def resample(rgb: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """rgb (1, 3, h, w) -> (1, 3, len(ys), len(xs)) bicubic at the query centers."""
        h, w = rgb.shape[-2:]
        # Whole-image resolution the query pixels correspond to; shrink (antialiased) if coarser.
        target = (min(h, max(1, round(2 / float(cell[0])))), min(w, max(1, round(2 / float(cell[1])))))
        if target != (h, w):
            rgb = F.interpolate(rgb, size=target, mode="bicubic", antialias=True, align_corners=False)
        gy, gx = torch.meshgrid(ys.to(rgb.device, rgb.dtype), xs.to(rgb.device, rgb.dtype), indexing="ij")
        grid = torch.stack([gx, gy], dim=-1)[None]  # grid_sample wants (x, y)
        return F.grid_sample(rgb, grid, mode="bicubic", padding_mode="border", align_corners=False)

    def last_layer_weight(self) -> torch.Tensor:
        return self.head.weight


class ResidualCLIFRenderer(CLIFRenderer):
    """CLIF adding detail to the bicubic upsampling of a fixed-resolution RGB head.

    For a converted LDM autoencoder the head is the original decoder's last conv, so the
    renderer starts as "the original decoder, upsampled": its CLIF output conv starts at
    zero, and at the original output size the render equals the original decoder's image.
    Finetuning teaches CLIF the residual detail. The state is phi and the head's image
    stacked, (B, F + 3, S, S), so tiles and the interface stay those of every renderer.
    """

    def __init__(self, feature_channels: int, hidden_channels: int = 256, num_blocks: int = 2):
        super().__init__(feature_channels, hidden_channels, num_blocks)
        self.base = FixedResolutionRenderer(feature_channels)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def prepare(self, phi: torch.Tensor) -> torch.Tensor:
        return torch.cat([phi, self.base.prepare(phi)], dim=1)

    def forward(self, state: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        phi, rgb = state[:, :-3], state[:, -3:]
        halo = self.halo  # the head reads the window's centers without CLIF's halo
        base = self.base(rgb, ys[:, halo : ys.shape[1] - halo], xs[:, halo : xs.shape[1] - halo], cell)
        return base + super().forward(phi, ys, xs, cell)


def make_renderer(kind: str, feature_channels: int, hidden_channels: int = 256, num_blocks: int = 2) -> Renderer:
    if kind == "clif":
        return CLIFRenderer(feature_channels, hidden_channels, num_blocks)
    if kind == "liif":
        return LIIFRenderer(feature_channels, hidden_channels, num_layers=2 * num_blocks)
    if kind == "fixed":
        return FixedResolutionRenderer(feature_channels)
    raise InfdError(f"unknown renderer '{kind}'; choose one of {', '.join(RENDERERS)}.")
