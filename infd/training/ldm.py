"""Training the latent diffusion model on z (`infd train-ldm`).

A diffusers `UNet2DModel` learns to denoise scaled latents x = z * scaling_factor under
the DDPM forward process of infd.diffusion (the paper's linear betas; epsilon or v
prediction). z comes from a latent cache (`infd encode-latents`) or is encoded on the fly
from an image folder by the frozen autoencoder. The scaling factor, 1 / std of the
training latents, is computed once at the start and stored in the copy of the
autoencoder saved with every checkpoint.

Every checkpoint is a complete INFDPipeline folder (model_index.json, autoencoder/,
unet/ with the EMA weights, scheduler/) plus the training state, so `infd sample --ckpt
RUN` uses it as it is. Exact resume: a training item (which latent, its posterior noise,
the diffusion noise and timestep) is a pure function of (seed, global sample counter),
and a checkpoint stores the optimizer, EMA and RNG states; a killed and resumed run
continues bit for bit. The same script runs on the CPU, one GPU (bf16) or many
(`accelerate launch -m infd.cli train-ldm ...`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate.utils import broadcast
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from infd.data import StepBatchSampler, epoch_order, list_images, mix_seed
from infd.diffusion import PREDICTION_TYPES, SAMPLERS, diffusion_loss, make_training_scheduler
from infd.diffusion.pipeline import INFDPipeline
from infd.errors import InfdError, check_choice, quote_error
from infd.images import save_image
from infd.latents import EncoderInputs, LatentCache, keep_items, latent_std, weights_fingerprint
from infd.rendering import render
from infd.store import MODEL_WEIGHTS, PIPELINE_INDEX, load_autoencoder, load_optimizer_state, load_training_state
from infd.training.autoencoder import ema_weights
from infd.training.loop import StepTrainer, step_loader
from infd.training.options import TrainConfig, check_common_options

log = logging.getLogger(__name__)



@dataclass
class LDMTrainConfig(TrainConfig):
    """Everything an LDM run needs besides its autoencoder and data; saved as train_config.json."""

    unet: dict = field(default_factory=dict)  # UNet2DModel arguments; sample_size and channels come from the autoencoder
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    num_train_timesteps: int = 1000
    scaling_factor: float | None = None  # None: 1 / std of the training latents
    sample_posterior: bool = True  # KL latents: train on z drawn from the posterior (as LDM does), not its mean
    scale_images: int = 512  # encoding on the fly: images encoded to estimate the std
    steps: int = 200_000
    batch_size: int = 32
    lr: float = 1e-4
    lr_warmup_steps: int = 0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999  # 0 disables EMA
    mixed_precision: str = "auto"  # auto (bf16 on GPU) | no | bf16 | fp16
    num_workers: int = 2  # image decoding when encoding on the fly
    time_limit: float = 0.0  # minutes; stop (with a checkpoint) at the first step after it; 0: none
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    sample_every: int = 5000
    sample_count: int = 4
    sample_sizes: tuple[int, ...] = (256, 1024)  # every grid is rendered at each of these (square) sizes
    sample_sampler: str = "ddim"
    sample_steps: int = 50

    tuple_options: ClassVar[tuple[str, ...]] = ("adam_betas", "sample_sizes")

    def validate(self) -> None:
        check_common_options(self)
        check_choice(self.prediction_type, PREDICTION_TYPES, "prediction type")
        if self.scaling_factor is not None and not (self.scaling_factor > 0 and math.isfinite(self.scaling_factor)):
            raise InfdError(f"scaling_factor {self.scaling_factor} must be a positive number (or null to compute it).")
        check_choice(self.sample_sampler, SAMPLERS, "sampler")
        if not self.sample_sizes or min(self.sample_sizes) <= 0 or not 1 <= self.sample_steps <= self.num_train_timesteps:
            raise InfdError("sample_sizes must be positive sizes and sample_steps between 1 and num_train_timesteps.")
        make_training_scheduler(self.prediction_type, self.beta_start, self.beta_end, self.num_train_timesteps)  # checks the betas


def build_unet(options: dict, latent_shape: tuple[int, int, int]) -> UNet2DModel:
    """A UNet2DModel for latents of `latent_shape`; options may repeat, never contradict, that shape."""
    c, h, w = latent_shape
    shape_options = {"sample_size": h, "in_channels": c, "out_channels": c}
    for name, value in shape_options.items():
        given = options.get(name, value)
        if given != value and not (name == "sample_size" and isinstance(given, (list, tuple)) and tuple(given) == (h, w)):
            raise InfdError(f"the UNet option {name}={given} does not match the autoencoder's {c}x{h}x{w} latents; leave it out.")
    try:
        return UNet2DModel(**{**options, **shape_options})
    except (TypeError, ValueError, AttributeError) as error:
        raise InfdError(f"invalid UNet options ({quote_error(error)}); see diffusers' UNet2DModel.") from None


# ------------------------------------------------------------------ training items


class LatentSamples(Dataset):
    """Training items indexed by a global sample counter (see infd.data.StepBatchSampler).

    The latent of counter c is item (c mod N) of the permutation of epoch c // N; its
    posterior noise, diffusion noise and timestep are drawn from a generator seeded by
    (seed, c). The source is a LatentCache (mean, logvar) or EncoderInputs (the image as
    encoder input, encoded in the training step); an image that fails to decode is
    replaced by the next one of the permutation and counted in "failed".
    """

    def __init__(self, source: LatentCache | EncoderInputs, latent_shape: tuple[int, ...], num_train_timesteps: int, seed: int = 0):
        self.source, self.latent_shape = source, tuple(latent_shape)
        self.num_train_timesteps, self.seed = num_train_timesteps, seed
        self.failed_files: set[int] = set()
        self._order: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, counter: int) -> dict[str, torch.Tensor | int]:
        counter = int(counter)
        n = len(self)
        epoch, position = divmod(counter, n)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(n, self.seed, epoch))
        generator = torch.Generator().manual_seed(mix_seed("ldm", self.seed, counter))
        item = {
            "noise": torch.randn(self.latent_shape, generator=generator),
            "posterior_noise": torch.randn(self.latent_shape, generator=generator),
            "timestep": torch.randint(self.num_train_timesteps, (), generator=generator),
        }
        for attempt in range(n):
            latent = self.load(self._order[1][(position + attempt) % n])
            if latent is not None:
                return {**latent, **item, "failed": attempt}
        raise InfdError(f"all {n} images failed to decode (see the warnings above); check the image folder.")

    def load(self, index: int) -> dict[str, torch.Tensor] | None:
        if isinstance(self.source, LatentCache):
            latent = {"mean": self.source.mean[index]}
            if self.source.logvar is not None:
                latent["logvar"] = self.source.logvar[index]
            return latent
        if index in self.failed_files:
            return None
        _, image, reason = self.source[index]
        if image is None:
            self.failed_files.add(index)
            log.warning("skipping %s for the rest of training (%s)", self.source.paths[index], reason)
            return None
        return {"image": image}


# ------------------------------------------------------------------ the trainer


class LDMTrainer(StepTrainer):
    """Holds the state of one LDM run; `run()` trains until `config.steps`."""

    name = "train-ldm"
    rate_name = "latents_per_s"
    checkpoint_marker = PIPELINE_INDEX  # every checkpoint is a pipeline folder

    def __init__(
        self,
        config: LDMTrainConfig,
        out: str | Path,
        autoencoder: str | Path | None = None,
        latents: str | Path | None = None,
        data: str | Path | None = None,
        resume: bool = False,
        exclude=(),
        progress: bool = True,
    ):
        if (latents is None) == (data is None):
            raise InfdError("pass exactly one of --latents (a cache from `infd encode-latents`) and --data (encode images on the fly).")
        if autoencoder is None and not resume:
            raise InfdError("pass --ae, the autoencoder run (or checkpoint) whose latents the LDM learns.")
        precision = self.start_run(config, out, resume, progress)
        existing = self.checkpoints()
        self.sample_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        device = self.accelerator.device

        state = load_training_state(existing[-1]) if resume else None
        self.autoencoder = load_autoencoder(autoencoder if autoencoder is not None else existing[-1], device).requires_grad_(False)
        self.fingerprint = weights_fingerprint(self.autoencoder)
        if state is not None and state["autoencoder_fingerprint"] != self.fingerprint:
            raise InfdError(f"--ae '{autoencoder}' is not the autoencoder this run was trained with; leave --ae out to use the run's own copy.")
        latent_shape = self.autoencoder.latent_shape
        source = self.open_source(latents, data, exclude)
        self.dataset = LatentSamples(source, latent_shape, config.num_train_timesteps, config.seed)

        self.unet = build_unet(config.unet, latent_shape)
        self.scheduler = make_training_scheduler(config.prediction_type, config.beta_start, config.beta_end, config.num_train_timesteps)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay)
        self.ema = EMAModel(self.unet.parameters(), decay=config.ema_decay) if config.ema_decay > 0 else None
        self.step, self.failed_images, resumed_scaler = 0, 0, None
        if state is not None:
            resumed_scaler = self.load(existing[-1], state)
        else:
            self.scaling_factor = config.scaling_factor or 1.0 / self.estimate_std(source)
        self.autoencoder.register_to_config(scaling_factor=self.scaling_factor)
        self.unet, self.optimizer = self.accelerator.prepare(self.unet, self.optimizer)
        if self.ema is not None:
            self.ema.to(device)
        if resumed_scaler is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(resumed_scaler)

    @property
    def unwrapped(self) -> UNet2DModel:
        return self.accelerator.unwrap_model(self.unet)

    def open_source(self, latents, data, exclude) -> LatentCache | EncoderInputs:
        """The latent cache (made by this very autoencoder), or the image folder to encode on the fly."""
        if latents is None:
            excluded = {Path(name).name for name in exclude}
            return EncoderInputs([p for p in list_images(data) if p.name not in excluded], self.autoencoder.config.input_size)
        cache = LatentCache.open(latents)
        if cache.latent_shape != self.autoencoder.latent_shape or cache.fingerprint != self.fingerprint:
            raise InfdError(
                f"the latents in '{latents}' ({'x'.join(map(str, cache.latent_shape))}) were encoded by another autoencoder "
                f"than --ae; encode them again with this autoencoder or pass the one they came from."
            )
        return cache

    @torch.no_grad()
    def estimate_std(self, source: LatentCache | EncoderInputs) -> float:
        """Std of the training latents: the whole cache, or the first `scale_images` images encoded now.

        Every process computes it and takes the main process's value, so all agree exactly.
        """
        cfg = self.config
        if isinstance(source, LatentCache):
            std = latent_std(source.mean, source.logvar if cfg.sample_posterior else None)
        else:
            subset = torch.utils.data.Subset(source, range(min(cfg.scale_images, len(source))))
            loader = DataLoader(subset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=keep_items)
            means, logvars = [], []
            for items in loader:
                images = [image for _, image, _ in items if image is not None]
                if images:
                    mean, logvar = self.autoencoder.encode_moments(torch.stack(images).to(self.accelerator.device))
                    means.append(mean.float().cpu())
                    logvars.append(None if logvar is None else logvar.float().cpu())
            if not means:
                raise InfdError("none of the images used to estimate the latent scale could be read; check the image folder.")
            logvar = torch.cat(logvars) if logvars[0] is not None and cfg.sample_posterior else None
            std = latent_std(torch.cat(means), logvar)
        if not std > 0:
            raise InfdError("the training latents have zero variance; check the autoencoder and the data.")
        value = broadcast(torch.tensor([std], dtype=torch.float64, device=self.accelerator.device))
        return float(value.item())

    def batches(self):
        sampler = StepBatchSampler(self.config.batch_size, self.step, self.accelerator.process_index, self.accelerator.num_processes)
        workers = self.config.num_workers if isinstance(self.dataset.source, EncoderInputs) else 0  # a cache is already in memory
        return step_loader(self.dataset, sampler, workers, self.config.seed)

    @torch.no_grad()
    def clean_latents(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x0 = autoencoder.to_diffusion(z) (B, C, h, w): z is the posterior mean, or a draw from the posterior."""
        if "image" in batch:
            mean, logvar = self.autoencoder.encode_moments(batch["image"])
        else:
            mean, logvar = batch["mean"], batch.get("logvar")
        z = mean
        if self.config.sample_posterior and logvar is not None:
            z = mean + torch.exp(0.5 * logvar) * batch["posterior_noise"]
        return self.autoencoder.to_diffusion(z.float())

    def learning_rate(self, step: int) -> float:
        warmup = self.config.lr_warmup_steps
        return self.config.lr * min(1.0, (step + 1) / warmup) if warmup > 0 else self.config.lr

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        cfg = self.config
        x0 = self.clean_latents(batch)
        with self.accelerator.autocast():
            loss = diffusion_loss(self.unet, self.scheduler, x0, batch["noise"], batch["timestep"])
        if not torch.isfinite(loss):
            raise InfdError(f"the loss became {float(loss)} at step {self.step}; lower the learning rate or resume from an earlier checkpoint.")
        lr = self.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if cfg.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.unet.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.step(self.unwrapped.parameters())
        return {"loss": float(loss.detach()), "lr": lr}

    def training_module(self) -> torch.nn.Module:
        return self.unet

    def ema_weights(self):
        """The UNet holds its EMA weights inside this context (a no-op without EMA)."""
        return ema_weights(self.ema, list(self.unwrapped.parameters()))

    def pipeline(self) -> INFDPipeline:
        pipe = INFDPipeline(autoencoder=self.autoencoder, unet=self.unwrapped, scheduler=self.scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def write_samples(self) -> None:
        """samples/step_NNNNNNN_<size>.png: the same `sample_count` latents (fixed seeds) at each sample size."""
        if not self.accelerator.is_main_process:
            return
        cfg = self.config
        generators = [torch.Generator().manual_seed(mix_seed("samples", cfg.seed, i)) for i in range(cfg.sample_count)]
        unet = self.unwrapped
        unet.eval()
        with self.ema_weights():
            z = self.pipeline().use_sampler(cfg.sample_sampler).sample_latents(cfg.sample_count, cfg.sample_steps, generators, dtype=self.sample_dtype)
        unet.train()
        for size in cfg.sample_sizes:
            images = render(self.autoencoder, z, (size, size), dtype=self.sample_dtype)
            save_image(torch.cat(list(images), dim=-1), self.out / "samples" / f"step_{self.step:07d}_{size}.png")

    def training_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "scaling_factor": self.scaling_factor,
            "autoencoder_fingerprint": self.fingerprint,
            "optimizer": self.optimizer.state_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
            state["unet"] = self.unwrapped.state_dict()  # raw weights; unet/ holds the EMA weights
        return state

    def write_models(self, folder: Path) -> None:
        self.pipeline().save_pretrained(folder, safe_serialization=True)

    def load(self, folder: Path, state: dict[str, Any]) -> dict | None:
        """Restore weights, optimizer, EMA, step, RNG and scaling factor; returns the grad scaler's state."""
        weights = state.get("unet") or load_file(str(folder / "unet" / MODEL_WEIGHTS))
        try:
            self.unet.load_state_dict(weights)
        except RuntimeError:
            raise InfdError(f"the UNet in '{folder}' does not match this config's unet options; use the run's own train_config.json.") from None
        load_optimizer_state(self.optimizer, state["optimizer"], folder)
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.restore_progress(state)
        self.scaling_factor = float(state["scaling_factor"])
        return state.get("scaler")


def train_ldm(
    config: LDMTrainConfig,
    out: str | Path,
    autoencoder: str | Path | None = None,
    latents: str | Path | None = None,
    data: str | Path | None = None,
    resume: bool = False,
    exclude=(),
    progress: bool = True,
) -> Path:
    """Train (or resume) an LDM run in `out` on a latent cache or an image folder; returns its last checkpoint."""
    return LDMTrainer(config, out, autoencoder, latents, data, resume=resume, exclude=exclude, progress=progress).run()
