"""Latent diffusion on z: the noise schedule, the training loss, the sampling loop and the pipeline.

    schedulers  the training schedule and the samplers built from it (diffusers')
    loss        the DDPM training loss (epsilon or v)
    sampling    `sample`: the reverse process, any scheduler; classifier-free guidance
    pipeline    `INFDPipeline`: a diffusers pipeline folder (autoencoder, UNet, scheduler)
"""

from infd.diffusion.loss import diffusion_loss, training_target
from infd.diffusion.sampling import ClassifierFreeGuidance, Generator, sample
from infd.diffusion.schedulers import MAX_SEED, PREDICTION_TYPES, SAMPLERS, check_sampling, check_seed, make_sampler, make_training_scheduler, sampler_name, step_options

__all__ = [
    "MAX_SEED", "PREDICTION_TYPES", "SAMPLERS", "ClassifierFreeGuidance", "Generator", "check_sampling", "check_seed", "diffusion_loss",
    "make_sampler", "make_training_scheduler", "sample", "sampler_name", "step_options", "training_target",
]
