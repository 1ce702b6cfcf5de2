"""Ship an `infd train-ldm` checkpoint: the pipeline folder in fp16, without training state.

    python scripts/export_pipeline.py runs/wallpapers/ldm weights/wallpapers [--autoencoder weights/demo-ae] [--clip-sample-range 2.5] [--decoder RUN]

Writes OUT (model_index.json, autoencoder/, unet/, scheduler/: config JSON + fp16
safetensors) through a temporary folder renamed at the end, replacing OUT. With
--autoencoder also writes the autoencoder alone there, the same fp16 weights. With
--decoder, the pipeline ships that autoencoder instead of the one its LDM was trained
on: a decoder fine-tuned with a frozen encoder (`"freeze_encoder": true`), whose
latents are the same, so the LDM needs no retraining; it takes the pipeline's latent
scale, and an encoder that differs is refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from infd.diffusion.pipeline import load_pipeline
from infd.errors import InfdError
from infd.files import atomic_directory
from infd.models.autoencoder import NeuralFieldAutoencoder
from infd.store import load_autoencoder


def replace_with(path: Path, write) -> None:
    """Write a folder with `write(tmp)` and put it at `path`, replacing what was there."""
    staging = path.with_name(path.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    with atomic_directory(staging) as tmp:
        write(Path(tmp))
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)


def tidy(folder: Path) -> None:
    """Ordinary file permissions (safetensors writes 0600) and no machine-local paths in the configs."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
        if path.suffix == ".json":
            config = json.loads(path.read_text())
            if config.pop("_name_or_path", None) is not None:
                path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def swap_decoder(trained_on: NeuralFieldAutoencoder, run: Path) -> NeuralFieldAutoencoder:
    """The autoencoder of `run` with `trained_on`'s latent scale; refused unless its encoder is `trained_on`'s."""
    scale = {k: trained_on.config[k] for k in ("scaling_factor", "shift_factor")}
    model = load_autoencoder(run, overrides=scale)
    ours, theirs = trained_on.encoding_modules(), model.encoding_modules()
    same = model.config.encoder_padding == trained_on.config.encoder_padding and len(ours) == len(theirs)
    for mine, other in zip(ours, theirs):
        a, b = mine.state_dict(), other.state_dict()
        same = same and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if not same:
        raise InfdError(f"the autoencoder in '{run}' encodes differently from the one the LDM was trained on; train it with \"freeze_encoder\": true and --init from that one.")
    return model


def save(model, tmp: Path) -> None:
    model.save_pretrained(tmp, safe_serialization=True)
    tidy(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path, help="An LDM run (its newest checkpoint) or one of its checkpoints.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--autoencoder", type=Path, default=None)
    parser.add_argument(
        "--clip-sample-range", type=float, default=None,
        help="Clamp the sampler's x0 predictions to [-R, R] (the scaled latents' range, e.g. 2.5): "
        "an epsilon-prediction UNet trained briefly errs most at the noisiest steps, where one small error "
        "in epsilon is a large one in x0, and without the clamp samples saturate.",
    )
    parser.add_argument("--decoder", type=Path, default=None, help="Ship this autoencoder run (a decoder fine-tuned with a frozen encoder) instead.")
    args = parser.parse_args()
    try:  # a missing or mismatched model is one sentence, before anything is written
        pipe = load_pipeline(args.ckpt)
        if args.decoder is not None:
            pipe.register_modules(autoencoder=swap_decoder(pipe.autoencoder, args.decoder))
    except InfdError as error:
        raise SystemExit(f"export_pipeline: {error}") from None
    pipe = pipe.to(dtype=torch.float16)
    if args.clip_sample_range is not None:
        pipe.scheduler.register_to_config(clip_sample=True, clip_sample_range=args.clip_sample_range)
    replace_with(args.out, lambda tmp: save(pipe, tmp))
    if args.autoencoder is not None:
        replace_with(args.autoencoder, lambda tmp: save(pipe.autoencoder, tmp))
    print(f"wrote {args.out}" + (f" and {args.autoencoder}" if args.autoencoder else ""))


if __name__ == "__main__":
    main()
