"""`infd train-ae`, `infd encode-latents` and `infd train-ldm`: the training stages."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from infd.commands.common import TIME_LIMIT_HELP, report, reports_errors
from infd.errors import InfdError

RUNTIME_OPTIONS = ("steps", "time_limit", "num_workers", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every")


def _run_config(config_class, config: Path | None, out: Path, resume: bool):
    """The training config of a run: --config, or with --resume the run's own train_config.json.

    A --config given with --resume must describe the same training as the run's (only
    budgets and logging, RUNTIME_OPTIONS, may differ), else the resumed run would not be
    the run it continues.
    """
    saved = out / "train_config.json"
    if not (resume and saved.is_file()):
        return config_class.load(config) if config else config_class()
    own = config_class.load(saved)
    if config is not None:
        given = config_class.load(config)
        differs = sorted(k for k, v in given.to_dict().items() if k not in RUNTIME_OPTIONS and v != own.to_dict().get(k))
        if differs:
            raise InfdError(f"--config {config} differs from the run's own train_config.json in {', '.join(differs)}; resume without --config (the run's is used) or start a new --out.")
    return own


def _override(config, **options) -> None:
    """Set the config fields given on the command line (None: not given, keep the config's)."""
    for name, value in options.items():
        if value is not None:
            setattr(config, name, value)


@reports_errors
def train_ae(
    data: Path = typer.Option(..., "--data", help="Folder of training images (any sizes, aspect ratios and formats)."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoints/, samples/, log.jsonl, train_config.json."),
    config: Path | None = typer.Option(None, "--config", help="JSON training config (see configs/); options below override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where its last checkpoint left off, with the run's own train_config.json."),
    steps: int | None = typer.Option(None, help="Total optimisation steps."),
    batch_size: int | None = typer.Option(None, help="Images per step per process."),
    lr: float | None = typer.Option(None, help="Learning rate of the autoencoder."),
    init: str | None = typer.Option(None, help="Start from the weights of this checkpoint (e.g. from `infd convert-vae`)."),
    lpips_vgg: str | None = typer.Option(None, help="Local VGG16 weights (.pth/.safetensors) to train with LPIPS instead of focal frequency loss."),
    num_workers: int | None = typer.Option(None, help="Processes preparing training samples."),
    holdout: bool = typer.Option(False, help="Leave out infd.data.WALLPAPER_HOLDOUT, the evaluation split of the wallpapers set."),
    time_limit: float | None = typer.Option(None, "--time-limit", help=TIME_LIMIT_HELP),
    freeze_encoder: bool | None = typer.Option(
        None, "--freeze-encoder/--no-freeze-encoder", help="Keep the encoder (and so the latent space) fixed, e.g. when finetuning a converted SD VAE. Default: the config's."
    ),
    freeze_decoder: bool | None = typer.Option(None, "--freeze-decoder/--no-freeze-decoder", help="Keep the decoder trunk fixed (train the renderer alone). Default: the config's."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Train a neural-field autoencoder on mixed-resolution images (runs under `accelerate launch` too)."""
    from infd.data import WALLPAPER_HOLDOUT
    from infd.files import check_output_path
    from infd.training.autoencoder import AETrainConfig, train_autoencoder

    check_output_path(out, folder=True)
    cfg = _run_config(AETrainConfig, config, out, resume)
    _override(
        cfg, steps=steps, batch_size=batch_size, lr=lr, init=init, lpips_vgg=lpips_vgg, time_limit=time_limit,
        num_workers=num_workers, freeze_encoder=freeze_encoder, freeze_decoder=freeze_decoder,
    )
    last = train_autoencoder(cfg, data, out, resume=resume, exclude=WALLPAPER_HOLDOUT if holdout else (), progress=progress)
    report("done:", f"last checkpoint {last}")


@reports_errors
def encode_latents(
    ae: Path = typer.Option(..., "--ae", help="Autoencoder: run folder, checkpoint folder or pipeline folder."),
    data: Path = typer.Option(..., "--data", help="Folder of images (any sizes and formats; unreadable files are skipped and counted)."),
    out: Path = typer.Option(..., "--out", help="Latent cache folder: safetensors shards + index.json. Run again to resume."),
    shard_size: int = typer.Option(1024, help="Images per shard (the unit of resuming)."),
    batch_size: int = typer.Option(16, help="Images per encoder batch."),
    num_workers: int = typer.Option(2, help="Processes decoding images."),
    holdout: bool = typer.Option(False, help="Leave out infd.data.WALLPAPER_HOLDOUT, the evaluation split of the wallpapers set."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Encode every image of a folder once into a latent cache for `infd train-ldm`."""
    from infd import rendering, store
    from infd.data import WALLPAPER_HOLDOUT
    from infd.files import check_output_path
    from infd.latents import encode_folder

    check_output_path(out, folder=True)
    model = store.load_autoencoder(ae, rendering.pick_device(device))
    start = time.perf_counter()
    cache = encode_folder(model, data, out, shard_size, batch_size, num_workers, WALLPAPER_HOLDOUT if holdout else (), progress)
    skipped = cache.index["skipped"]
    detail = f", skipped {sum(skipped.values())} ({', '.join(f'{n} {reason}' for reason, n in sorted(skipped.items()))})" if skipped else ""
    shape = "x".join(map(str, cache.latent_shape))
    report("done:", f"{len(cache)} latents of {shape} in {out}{detail} ({time.perf_counter() - start:.1f} s)")


@reports_errors
def train_ldm(
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoints/ (pipeline folders), samples/, log.jsonl, train_config.json."),
    ae: Path | None = typer.Option(None, "--ae", help="Autoencoder run or checkpoint whose latents to learn (optional with --resume)."),
    latents: Path | None = typer.Option(None, "--latents", help="Latent cache from `infd encode-latents`."),
    data: Path | None = typer.Option(None, "--data", help="Image folder to encode on the fly instead of --latents."),
    config: Path | None = typer.Option(None, "--config", help="JSON training config (see configs/ldm-*.json); options below override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where its last checkpoint left off."),
    steps: int | None = typer.Option(None, help="Total optimisation steps."),
    batch_size: int | None = typer.Option(None, help="Latents per step per process."),
    lr: float | None = typer.Option(None, help="Learning rate."),
    holdout: bool = typer.Option(False, help="With --data: leave out infd.data.WALLPAPER_HOLDOUT."),
    time_limit: float | None = typer.Option(None, "--time-limit", help=TIME_LIMIT_HELP),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Train a latent diffusion model (diffusers UNet2DModel, DDPM) on the autoencoder's latents (runs under `accelerate launch` too)."""
    from infd.data import WALLPAPER_HOLDOUT
    from infd.files import check_output_path
    from infd.training.ldm import LDMTrainConfig
    from infd.training.ldm import train_ldm as train

    check_output_path(out, folder=True)
    cfg = _run_config(LDMTrainConfig, config, out, resume)
    _override(cfg, steps=steps, batch_size=batch_size, lr=lr, time_limit=time_limit)
    last = train(cfg, out, ae, latents, data, resume=resume, exclude=WALLPAPER_HOLDOUT if holdout else (), progress=progress)
    report("done:", f"last checkpoint {last}")
