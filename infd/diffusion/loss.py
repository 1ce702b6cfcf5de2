"""The training loss: the UNet's prediction at x_t against the noise (epsilon) or v."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from infd.diffusion.schedulers import PREDICTION_TYPES
from infd.errors import check_choice


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict from x_t: the noise (epsilon) or v = a_t noise - s_t x0."""
    kind = scheduler.config.prediction_type
    check_choice(kind, PREDICTION_TYPES, "prediction type")
    return noise if kind == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)


def diffusion_loss(unet: UNet2DModel, scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The DDPM loss: MSE between the UNet's prediction at x_t and the target.

    x0, noise: (B, C, h, w) scaled latents and their noise; timesteps: (B,) long.
    """
    noisy = scheduler.add_noise(x0, noise, timesteps)
    prediction = unet(noisy, timesteps).sample
    return F.mse_loss(prediction.float(), training_target(scheduler, x0, noise, timesteps).float())

