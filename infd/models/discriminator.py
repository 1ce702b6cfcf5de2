"""PatchGAN discriminator of pix2pix / VQGAN: one real/fake logit per overlapping patch."""

from __future__ import annotations

import torch
from torch import nn

from infd.errors import InfdError


class PatchDiscriminator(nn.Module):
    """n_layers stride-2 4x4 convs, then two stride-1 4x4 convs down to 1 channel of logits.

    forward: (B, in_channels, H, W) -> (B, 1, h, w) patch logits, h ~ H / 2**n_layers - 2;
    H and W must be at least `min_input_size` (24 px for n_layers=3).
    Uses BatchNorm2d as VQGAN does; under multi-GPU training convert it with
    nn.SyncBatchNorm.convert_sync_batchnorm if per-GPU batches are small.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3):
        super().__init__()
        self.n_layers = n_layers
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        channels = base_channels
        for n in range(1, n_layers + 1):
            out_channels = base_channels * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last feature layer keeps the resolution
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    @property
    def min_input_size(self) -> int:
        # each stride-2 conv halves (floor) the side, each stride-1 4x4 conv with padding 1
        # removes one pixel, and the logits need at least one.
        return 3 * 2**self.n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_input_size:
            raise InfdError(
                f"patches of {x.shape[-2]}x{x.shape[-1]} px are too small for a {self.n_layers}-layer "
                f"discriminator: use patches of at least {self.min_input_size} px or fewer layers."
            )
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    """VQGAN's init: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
