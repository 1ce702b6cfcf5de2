"""Noise schedules and samplers, all diffusers': the training schedule (DDPMScheduler, the paper's
linear betas 0.0015 .. 0.0195 over 1000 steps) and DDIM, DPM-Solver++ or DDPM built from its
config, exactly as one swaps schedulers in any diffusers pipeline; what each accepts is checked here."""

from __future__ import annotations

import inspect

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from infd.errors import InfdError, check_choice

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


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds


def check_seed(seed: int, count: int = 1, what: str = "--seed") -> None:
    """Refuse a seed (or a run of `count` seeds from it) that a torch generator cannot take."""
    if not 0 <= seed <= MAX_SEED - (count - 1):
        raise InfdError(f"{what} must be a whole number from 0 to {MAX_SEED - (count - 1)}, got {seed}.")


def step_options(scheduler: SchedulerMixin, eta: float, generator: Generator) -> dict:
    """The keyword arguments this scheduler's `step` takes: eta (DDIM) and the generator."""
    accepted = inspect.signature(scheduler.step).parameters
    options = {}
    if "eta" in accepted:
        options["eta"] = eta
    if "generator" in accepted:
        options["generator"] = generator
    return options

