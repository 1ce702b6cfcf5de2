"""The sampling loop: a pure function of (unet, scheduler, shape, steps, generator, eta).

It works on a fresh copy of the scheduler, so the same arguments give the same latents.
The UNet denoises *scaled* latents, x = autoencoder.to_diffusion(z) = (z - shift_factor) *
scaling_factor (unit variance over the data); the autoencoder decodes z = from_diffusion(x).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from infd.diffusion.schedulers import Generator, check_sampling, step_options
from infd.errors import InfdError
from infd.rendering import autocast


def sample(
    unet: UNet2DModel | ClassifierFreeGuidance,
    scheduler: SchedulerMixin,
    shape: tuple[int, ...],
    num_inference_steps: int = 50,
    generator: Generator = None,
    eta: float = 0.0,
    latents: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> torch.Tensor:
    """Run the reverse process from noise: scaled latents x (B, C, h, w), float32.

    `generator` (one, or one per image) draws the starting noise; CPU generators give the
    same latents on every device. `latents` replaces that noise. `eta` is DDIM's
    stochasticity (0: deterministic). `dtype` (bfloat16/float16) runs the UNet under
    autocast. `progress` wraps the timesteps, e.g. tqdm.
    """
    check_sampling(scheduler, num_inference_steps, eta)
    scheduler = type(scheduler).from_config(scheduler.config)  # fresh state: calls never interfere
    param = next(unet.parameters())
    device = param.device
    if latents is None:
        latents = randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    elif tuple(latents.shape) != tuple(shape):
        raise InfdError(f"the starting latents have shape {tuple(latents.shape)}, expected {tuple(shape)}.")
    x = latents.to(device, torch.float32) * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps, device=device)
    options = step_options(scheduler, eta, generator)
    precision = autocast(device, dtype)
    for t in (progress or iter)(scheduler.timesteps):
        with precision:
            prediction = unet(scheduler.scale_model_input(x, t).to(param.dtype), t).sample
        x = scheduler.step(prediction.float(), t, x, **options).prev_sample
    return x


class ClassifierFreeGuidance(torch.nn.Module):
    """A text-conditional UNet as a denoiser for `sample`: eps = uncond + scale * (cond - uncond).

    `text` (2B, L, D) holds the negative prompts' embeddings, then the prompts'; with
    guidance_scale <= 1 guidance is off, `text` is the prompts' alone (B, L, D) and the
    UNet runs once per step. Called like a UNet2DModel: (x (B, C, h, w), t) -> .sample.
    """

    def __init__(self, unet: torch.nn.Module, text: torch.Tensor, guidance_scale: float):
        super().__init__()
        self.unet, self.text, self.guidance_scale = unet, text, guidance_scale

    @staticmethod
    def is_guided(guidance_scale: float) -> bool:
        return guidance_scale > 1.0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> UNet2DOutput:
        guided = self.is_guided(self.guidance_scale)
        dtype = next(self.unet.parameters()).dtype
        x_in = torch.cat([x, x]) if guided else x
        prediction = self.unet(x_in, t, encoder_hidden_states=self.text.to(dtype)).sample.float()
        if guided:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + self.guidance_scale * (conditional - unconditional)
        return UNet2DOutput(sample=prediction)

