"""Training: the autoencoder (`infd train-ae`) and the latent diffusion model (`infd train-ldm`).

    options      configs from JSON (with `base`), every option checked by name and type
    loop         `StepTrainer`: the step loop, logs, atomic checkpoints, exact resume
    losses       L1, LPIPS, focal frequency, GAN (hinge, adaptive weight), KL
    autoencoder  `train_autoencoder` and its config
    ldm          `train_ldm` and its config (the UNet on encoded latents)
"""

from infd.training.loop import StepTrainer, step_loader
from infd.training.options import TrainConfig, check_common_options, check_keyword_options, check_option_types

__all__ = ["StepTrainer", "TrainConfig", "check_common_options", "check_keyword_options", "check_option_types", "step_loader"]
