"""Latent diffusion on z: the noise schedule, the training loss and the sampling loop.

Everything stateful is diffusers': training uses `DDPMScheduler` with the paper's linear
betas (0.0015 .. 0.0195 over 1000 steps); sampling builds DDIM, DPM-Solver++ or DDPM from
the same scheduler config, exactly as one swaps schedulers in any diffusers pipeline.
The sampler loop is a pure function of (unet, scheduler, shape, steps, generator, eta):
it works on a fresh copy of the scheduler, so the same arguments give the same latents.

The UNet denoises *scaled* latents, x = autoencoder.to_diffusion(z) = (z - shift_factor) *
scaling_factor (unit variance over the data); the autoencoder decodes z = from_diffusion(x).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from infd.errors import InfdError, check_choice
from infd.rendering import autocast

SAMPLERS: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "ddpm": DDPMScheduler,
}
PREDICTION_TYPES = ("epsilon", "v_prediction")

Generator = torch.Generator | list[torch.Generator] | None


def make_training_scheduler(
    prediction_type: str = "epsilon",
    beta_start: float = 0.0015,
    beta_end: float = 0.0195,
    num_train_timesteps: int = 1000,
) -> DDPMScheduler:
    """The forward process of training: linear betas, no clipping (latents are not in [-1, 1]).

    "trailing" spacing makes every sampler built from this config start at the last,
    pure-noise timestep.
    """
    check_choice(prediction_type, PREDICTION_TYPES, "prediction type")
    if not 0 < beta_start < beta_end < 1:
        raise InfdError(f"betas must satisfy 0 < beta_start < beta_end < 1, got {beta_start} and {beta_end}.")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule="linear",
        prediction_type=prediction_type,
        clip_sample=False,
        timestep_spacing="trailing",
    )


def make_sampler(name: str, config) -> SchedulerMixin:
    """A fresh sampler `name` (ddim, dpm++, ddpm) for the noise schedule in `config`."""
    check_choice(name, SAMPLERS, "sampler")
    return SAMPLERS[name].from_config(config)


def sampler_name(scheduler: SchedulerMixin) -> str:
    """The SAMPLERS key of a scheduler (its class name when it is another diffusers scheduler)."""
    return next((name for name, cls in SAMPLERS.items() if type(scheduler) is cls), type(scheduler).__name__)


def check_sampling(scheduler: SchedulerMixin, num_inference_steps: int, eta: float = 0.0) -> None:
    """Refuse step counts and eta values this scheduler cannot use, before any work."""
    limit = scheduler.config.num_train_timesteps
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= limit:
        raise InfdError(f"the number of sampling steps must be a whole number from 1 to {limit}, got {num_inference_steps}.")
    if not eta >= 0:  # also refuses NaN
        raise InfdError(f"eta must be 0 or more, got {eta}.")
    if eta and "eta" not in inspect.signature(scheduler.step).parameters:
        raise InfdError(f"eta applies to the ddim sampler only, not to {sampler_name(scheduler)}; leave it at 0.")


# ---------------------------------------------------------------- training


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds


def check_seed(seed: int, count: int = 1, what: str = "--seed") -> None:
    """Refuse a seed (or a run of `count` seeds from it) that a torch generator cannot take."""
    if not 0 <= seed <= MAX_SEED - (count - 1):
        raise InfdError(f"{what} must be a whole number from 0 to {MAX_SEED - (count - 1)}, got {seed}.")


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


# ---------------------------------------------------------------- sampling


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


def step_options(scheduler: SchedulerMixin, eta: float, generator: Generator) -> dict:
    """The keyword arguments this scheduler's `step` takes: eta (DDIM) and the generator."""
    accepted = inspect.signature(scheduler.step).parameters
    options = {}
    if "eta" in accepted:
        options["eta"] = eta
    if "generator" in accepted:
        options["generator"] = generator
    return options
