"""Training the neural-field autoencoder on mixed-resolution data (`infd train-ae`).

Each step: encode the image at the fixed input size, render the query window of a crop
of the image downsampled to a random resolution, and compare with that crop:
L1 + perceptual (LPIPS, or focal frequency without weights) + KL (or VQ) + hinge GAN with
the adaptive weight of VQGAN/LDM. The same script runs on the CPU, one GPU or many
(`accelerate launch -m infd.cli train-ae ...`).

Exact resume: a sample is a pure function of (seed, global sample counter), the data
loader draws no global randomness, and every checkpoint stores the optimizer moments,
EMA, discriminator and RNG states; so a run killed and resumed continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

import infd.training.losses as losses
from infd import geometry
from infd.data import DataConfig, MixedResolutionDataset, StepBatchSampler
from infd.errors import InfdError
from infd.geometry import Box
from infd.images import load_image, resize, save_image
from infd.models import NeuralFieldAutoencoder
from infd.models.discriminator import PatchDiscriminator
from infd.rendering import encode, render_prepared, to_unit_rgb
from infd.store import MODEL_WEIGHTS, load_autoencoder, load_optimizer_state, load_training_state
from infd.training.loop import StepTrainer, step_loader
from infd.training.options import TrainConfig, check_common_options, check_keyword_options, check_option_types


@dataclass
class AETrainConfig(TrainConfig):
    """Everything a run needs besides its data; saved as train_config.json in the run."""

    model: dict = field(default_factory=dict)  # NeuralFieldAutoencoder arguments
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 100_000
    batch_size: int = 16
    lr: float = 1e-4
    disc_lr: float = 1e-4
    adam_betas: tuple[float, float] = (0.5, 0.9)
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    fixed_head_weight: float = 1.0  # L1 of the fixed-resolution head (model option fixed_head), if any
    base_weight: float = 0.0  # L1 of a residual renderer's base image (at phi's grid) against the encoder input
    base_rim_weight: float = 0.0  # and an L1 of that image's outer 3% band alone: its outermost pixels are what a zero-padded trunk learns worst
    perceptual: str = "auto"  # auto | lpips | ffl | none
    lpips_vgg: str | None = None
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    vq_weight: float = 1.0
    gan_weight: float = 0.75  # 0 disables the discriminator
    gan_start: int = 20_000
    adaptive_gan_weight: bool = True
    ema_decay: float = 0.0  # 0 disables EMA
    mixed_precision: str = "auto"  # auto (bf16 on GPU) | no | bf16 | fp16
    num_workers: int = 2
    cache_images: bool = False  # keep decoded images in each worker's memory: for small datasets
    time_limit: float = 0.0  # minutes; stop (with a checkpoint) at the first step after it; 0: none
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 1000
    init: str | None = None  # start from this checkpoint's weights (e.g. a converted SD VAE)
    freeze_encoder: bool = False
    freeze_decoder: bool = False

    @classmethod
    def nested_options(cls, values: dict[str, Any]) -> dict[str, Any]:
        data = values.get("data", {})
        data_names = {f.name for f in dataclasses.fields(DataConfig)}
        if set(data) - data_names:
            raise InfdError(f"unknown data option(s) {', '.join(sorted(set(data) - data_names))}; known: {', '.join(sorted(data_names))}.")
        check_option_types(DataConfig, data)
        check_keyword_options(NeuralFieldAutoencoder.__init__, values.get("model", {}), "model", exclude=("self", "input_size"))
        return {**values, "data": DataConfig(**data)}

    def validate(self) -> None:
        check_common_options(self)
        if self.lpips_vgg and self.perceptual not in ("auto", "lpips"):
            raise InfdError(f"lpips_vgg (--lpips-vgg) is given but the config's perceptual loss is '{self.perceptual}'; set \"perceptual\" to \"lpips\" or \"auto\" to train with LPIPS.")


def build_model(config: AETrainConfig) -> NeuralFieldAutoencoder:
    if config.init:  # the checkpoint's architecture, with the config's weight-free options (padding, ...)
        overrides = {k: v for k, v in config.model.items() if k in NeuralFieldAutoencoder.WEIGHT_FREE_OPTIONS}
        model = load_autoencoder(config.init, overrides=overrides)  # a damaged or foreign checkpoint is one sentence
    else:
        model = NeuralFieldAutoencoder(input_size=config.data.input_size, **config.model)
    if model.config.input_size != config.data.input_size:
        raise InfdError(f"the model's input size {model.config.input_size} differs from data.input_size {config.data.input_size}.")
    if config.freeze_encoder:
        for module in model.encoding_modules():
            module.requires_grad_(False)
    if config.freeze_decoder:
        for module in (model.post_quant_conv, model.decoder):
            module.requires_grad_(False)
    return model


@contextlib.contextmanager
def ema_weights(ema: EMAModel | None, params: list[torch.nn.Parameter]):
    """`params` hold their EMA values inside this context (a no-op when `ema` is None)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def query_centers(batch: dict[str, torch.Tensor], halo: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query pixel centers of each sample's target crop, extended by the renderer's halo.

    The crop is window (top, left, c, c) of the whole image at resolution (rh, rw).
    Returns ys (B, c + 2 halo), xs (B, c + 2 halo), cell (B, 2).
    """
    size, window = batch["size"], batch["window"]  # on the CPU (AutoencoderTrainer.host_keys)
    ch, cw = batch["gt"].shape[-2:]
    ys = geometry.axis_centers(-1.0, 1.0, size[:, 0], window[:, 0] - halo, ch + 2 * halo)
    xs = geometry.axis_centers(-1.0, 1.0, size[:, 1], window[:, 1] - halo, cw + 2 * halo)
    return ys, xs, batch["cell"].double()


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    mse = ((pred.float().clamp(-1, 1) - target.float()) / 2).pow(2).mean()
    return float(-10 * torch.log10(mse.clamp_min(1e-10)))


@torch.no_grad()
def reconstruction_grid(model: NeuralFieldAutoencoder, images: list[torch.Tensor], zooms=(1, 2, 4)) -> torch.Tensor:
    """Rows of [ground truth | reconstruction] at each zoom (center box), each S x S: (3, H, W) in [0, 1].

    The ground truth of a zoom is the same box of the native image, so a reconstruction can
    be judged against detail that the encoder's input never had.
    """
    s = model.config.input_size
    rows = []
    for image in images:
        z = encode(model, image[None])
        state = model.prepare_render(z)
        cells = []
        for zoom in zooms:
            box = Box(-1 / zoom, -1 / zoom, 1 / zoom, 1 / zoom)
            top, left, bottom, right = (round(v) for v in box.to_pixels(image.shape[-2:]))
            truth = resize(image[None, :, top:bottom, left:right], (s, s))[0]
            rec = to_unit_rgb(render_prepared(model, state, box, (s, s)))[0]
            cells += [truth, rec]
        rows.append(torch.cat(cells, dim=-1))
    return torch.cat(rows, dim=-2)


class AutoencoderTrainer(StepTrainer):
    """Holds the state of one training run; `run()` trains until `config.steps`."""

    name = "train-ae"
    host_keys = ("size", "window", "cell")  # query geometry: computed on the CPU in float64, as for rendering

    def __init__(self, config: AETrainConfig, data: str | Path | list, out: str | Path, resume: bool = False, exclude=(), progress: bool = True):
        self.start_run(config, out, resume, progress)
        self.dataset = MixedResolutionDataset(data, config.data, seed=config.seed, exclude=exclude, cache_images=config.cache_images)
        self.model = build_model(config)
        self.disc = PatchDiscriminator() if config.gan_weight > 0 else None
        self.perceptual = losses.make_perceptual_loss(config.perceptual, config.lpips_vgg)
        if self.perceptual is not None:
            self.perceptual.to(self.accelerator.device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt_g = torch.optim.Adam(trainable, lr=config.lr, betas=config.adam_betas)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=config.disc_lr, betas=config.adam_betas) if self.disc else None
        self.ema = EMAModel(trainable, decay=config.ema_decay) if config.ema_decay > 0 else None
        self.step, self.failed_images, self.resumed_scaler = 0, 0, None
        if resume:
            self.load(self.last_checkpoint())
        self.model, self.opt_g = self.accelerator.prepare(self.model, self.opt_g)
        if self.disc is not None:
            self.disc, self.opt_d = self.accelerator.prepare(self.disc, self.opt_d)
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
        if self.resumed_scaler is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(self.resumed_scaler)

    @property
    def unwrapped(self) -> NeuralFieldAutoencoder:
        return self.accelerator.unwrap_model(self.model)

    def batches(self):
        sampler = StepBatchSampler(self.config.batch_size, self.step, self.accelerator.process_index, self.accelerator.num_processes)
        return step_loader(self.dataset, sampler, self.config.num_workers, self.config.seed)

    def generator_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        cfg, model = self.config, self.unwrapped
        ys, xs, cell = query_centers(batch, model.halo)
        with self.accelerator.autocast():
            out = self.model(batch["inp"], ys, xs, cell)
            pred, target = out["pred"], batch["gt"]
            rec = cfg.l1_weight * losses.l1_loss(pred, target)
            logs = {"l1": float(losses.l1_loss(pred.detach(), target))}
            if "pred_fixed" in out:  # the baseline head on the same trunk, trained jointly
                fixed_l1 = losses.l1_loss(out["pred_fixed"], target)
                rec = rec + cfg.fixed_head_weight * fixed_l1
                logs["l1_fixed"] = float(fixed_l1.detach())
            if "base" in out and cfg.base_weight > 0:
                # The whole image at phi's resolution is the encoder input itself: a dense
                # target for the entire decoder every step, where the crop sees a window.
                base_l1 = losses.l1_loss(out["base"], batch["inp"])
                rec = rec + cfg.base_weight * base_l1
                logs["l1_base"] = float(base_l1.detach())
                if cfg.base_rim_weight > 0:
                    rim_l1 = losses.band_l1_loss(out["base"], batch["inp"])
                    rec = rec + cfg.base_rim_weight * rim_l1
                    logs["l1_base_rim"] = float(rim_l1.detach())
            if self.perceptual is not None:
                perceptual = self.perceptual(pred.float(), target.float())
                rec = rec + cfg.perceptual_weight * perceptual
                logs["perc"] = float(perceptual.detach())
            loss = rec
            if out["logvar"] is not None:
                loss = loss + cfg.kl_weight * losses.kl_loss(out["mean"], out["logvar"])
            else:
                loss = loss + cfg.vq_weight * out["vq_loss"]
            if self.disc is not None and self.step >= cfg.gan_start:
                # The generator's view of the discriminator: unwrapped (no DDP gradient sync) and frozen.
                disc = self.accelerator.unwrap_model(self.disc).requires_grad_(False)
                g_loss = losses.generator_loss(disc(pred))
                weight = cfg.gan_weight
                if cfg.adaptive_gan_weight:
                    weight = weight * losses.adaptive_gan_weight(rec, g_loss, model.renderer.last_layer_weight(), reduce=self.accelerator.reduce)
                loss = loss + weight * g_loss
                disc.requires_grad_(True)
                logs["g"] = float(g_loss.detach())
        if not torch.isfinite(loss):
            raise InfdError(f"the loss became {float(loss)} at step {self.step}; lower the learning rate or resume from an earlier checkpoint.")
        self.opt_g.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        if cfg.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt_g.step()
        if self.ema is not None:
            self.ema.step([p for p in self.unwrapped.parameters() if p.requires_grad])
        logs["psnr"] = psnr(pred.detach(), target)
        self.last_pred = pred.detach()
        return logs

    def discriminator_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        with self.accelerator.autocast():
            d_loss = losses.hinge_d_loss(self.disc(batch["gt"]), self.disc(self.last_pred))
        self.opt_d.zero_grad(set_to_none=True)
        self.accelerator.backward(d_loss)
        self.opt_d.step()
        return {"d": float(d_loss.detach())}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        logs = self.generator_step(batch)
        if self.disc is not None and self.step >= self.config.gan_start:
            logs.update(self.discriminator_step(batch))
        return logs

    def training_module(self) -> torch.nn.Module:
        return self.model

    def write_samples(self, count: int = 4) -> None:
        if not self.accelerator.is_main_process:
            return
        images = []
        for path in self.dataset.paths[:count]:
            try:
                images.append(load_image(path))
            except InfdError:
                continue
        if not images:
            return
        model = self.unwrapped
        model.eval()
        with self.ema_weights():
            grid = reconstruction_grid(model, images)
        model.train()
        save_image(grid, self.out / "samples" / f"step_{self.step:07d}.png")

    def ema_weights(self):
        """The model holds its EMA weights inside this context (a no-op without EMA)."""
        return ema_weights(self.ema, [p for p in self.unwrapped.parameters() if p.requires_grad])

    def training_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"opt_g": self.opt_g.state_dict()}
        if self.disc is not None:
            state["disc"] = self.accelerator.unwrap_model(self.disc).state_dict()
            state["opt_d"] = self.opt_d.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
            state["model"] = self.unwrapped.state_dict()  # raw weights; the folder's model file holds EMA weights
        return state

    def write_models(self, folder: Path) -> None:
        self.unwrapped.save_pretrained(folder, safe_serialization=True)

    def load(self, folder: Path) -> None:
        state = load_training_state(folder)
        weights = state.get("model") or load_file(str(folder / MODEL_WEIGHTS))
        self.model.load_state_dict(weights)
        load_optimizer_state(self.opt_g, state["opt_g"], folder)
        if self.disc is not None:
            if "disc" not in state:
                raise InfdError(f"checkpoint '{folder}' has no discriminator but this config trains one; use the run's own train_config.json.")
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.restore_progress(state)
        self.resumed_scaler = state.get("scaler")


def train_autoencoder(config: AETrainConfig, data, out, resume: bool = False, exclude=(), progress: bool = True) -> Path:
    """Train (or resume) an autoencoder run in `out`; returns its last checkpoint folder."""
    return AutoencoderTrainer(config, data, out, resume=resume, exclude=exclude, progress=progress).run()
