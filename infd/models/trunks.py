"""A small, normalisation-free encoder/decoder trunk for autoencoders trained on small budgets.

The default trunk of `NeuralFieldAutoencoder` is diffusers' VAE `Encoder`/`Decoder` (what
Stable Diffusion's autoencoder is made of, so that one converts). For a model trained
from scratch on a small budget, `trunk="sr"` swaps in the design of super-resolution
networks (EDSR, Lim et al. 2017): residual blocks without normalisation (GroupNorm
removes the per-image contrast a decoder must restore), strided convolutions down and
pixel-shuffle up, no attention. It is what the shipped CPU model uses; its learning curve
beside the VAE trunk's is in benchmarks/results/train_ae-cpu.json.

Shapes: the encoder maps (B, in, S, S) to (B, out, S / 2^(L-1), S / 2^(L-1)) for L =
len(block_out_channels) levels; the decoder maps a latent back to (B, block_out_channels[0],
S, S): the feature map phi the renderer reads.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResidualBlock(nn.Module):
    """x + conv(silu(conv(silu(x)))), 3x3 convs, no normalisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


PADDINGS = ("zeros", "replicate", "reflect")  # what the padded convs of a trunk read beyond the border


def set_padding(module: nn.Module, mode: str) -> None:
    """Make every padded conv in `module` pad with `mode` (one of PADDINGS); weights are unchanged.

    Zero padding makes a conv see a dark frame around every map, which a decoder learns
    to undo only partly: the outer band of its output reconstructs worse than the
    interior. "replicate" and "reflect" continue the map instead.
    """
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d) and any(conv.padding):
            conv.padding_mode = mode


def blocks(channels: int, count: int) -> nn.Sequential:
    return nn.Sequential(*[ResidualBlock(channels) for _ in range(count)])


class SREncoder(nn.Module):
    """Image (B, in, S, S) -> (B, out, S / 2^(L-1), ...): residual blocks per level, 4x4 stride-2 convs between."""

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: tuple[int, ...], layers_per_block: int):
        super().__init__()
        channels = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        levels: list[nn.Module] = []
        for i, c in enumerate(channels):
            levels.append(blocks(c, layers_per_block))
            if i + 1 < len(channels):
                levels.append(nn.Conv2d(c, channels[i + 1], 4, stride=2, padding=1))
        levels.append(blocks(channels[-1], layers_per_block))  # more depth where it is cheapest
        self.levels = nn.Sequential(*levels)
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.levels(self.conv_in(x))))


class SRDecoder(nn.Module):
    """Latent (B, in, s, s) -> phi (B, block_out_channels[0], s 2^(L-1), ...): residual blocks, pixel-shuffle 2x up."""

    def __init__(self, in_channels: int, block_out_channels: tuple[int, ...], layers_per_block: int):
        super().__init__()
        channels = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        levels: list[nn.Module] = [blocks(channels[0], 2 * layers_per_block)]  # the low-resolution core
        for c_in, c_out in itertools.pairwise(channels):
            levels += [nn.Conv2d(c_in, 4 * c_out, 3, padding=1), nn.PixelShuffle(2), blocks(c_out, layers_per_block)]
        self.levels = nn.Sequential(*levels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.silu(self.levels(self.conv_in(z)))
