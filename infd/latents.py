"""Latents on disk: the training cache of a whole image folder, and single sampled z files.

`infd encode-latents` encodes every image of a folder once with a frozen autoencoder:

    LATENTS/shard_00000.safetensors   mean (n, C, h, w) [+ logvar for KL latents], float32;
                                      metadata: the shard's files, skipped files, the
                                      autoencoder's weights fingerprint
    LATENTS/index.json                written last: shards, counts, skipped files, shapes

Shards are written atomically and one at a time, so an interrupted run resumes by
skipping every shard already on disk for the same files and autoencoder; the index
marks the cache complete. Each image is encoded as `infd.rendering.encode` does: the
whole image resized (antialiased) to the encoder's square input. Unreadable images are
skipped and counted, never fatal.

A sampled latent (`infd sample`) is one safetensors file holding `z` (1, C, h, w), what
the autoencoder decodes (already divided by the scaling factor), with the sampling
settings and the fingerprint of its autoencoder's latent space as metadata; `infd render`
renders it again at any size or region, and refuses it with an autoencoder of another
latent space (`load_latent_for`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from infd.data import list_images
from infd.errors import InfdError, quote_error
from infd.files import atomic_path
from infd.images import MAX_IMAGE_PIXELS, ImageError, load_image, resize
from infd.models import NeuralFieldAutoencoder
from infd.rendering import check_latent

INDEX = "index.json"
SHARD_NAME = "shard_{:05d}.safetensors"
CACHE_FORMAT = "infd-latents"
LATENT_KEY = "z"


def weights_fingerprint(model: torch.nn.Module, modules: tuple[str, ...] | None = None) -> str:
    """A short hash of a model's weights (names, shapes, dtypes and values), or only those of `modules`.

    Ties a latent cache or an LDM to the autoencoder that made its latents: latents of
    another autoencoder, even one of the same shape, mean nothing to it.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if modules is not None and name.split(".", 1)[0] not in modules:
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def latent_std(mean: torch.Tensor, logvar: torch.Tensor | None = None) -> float:
    """Standard deviation of the latents the LDM trains on, over all elements.

    With a posterior (KL), z = mean + exp(logvar / 2) * noise has variance
    Var(mean) + E[exp(logvar)]: the exact value, without sampling.
    """
    mean = mean.double()
    variance = mean.var(unbiased=False)
    if logvar is not None:
        variance = variance + logvar.double().exp().mean()
    return float(variance.sqrt())


# ---------------------------------------------------------------- encoder inputs


class EncoderInputs(Dataset):
    """Images as encoder inputs: item i is (i, (3, S, S) in [-1, 1] or None, None or the reason it failed)."""

    def __init__(self, paths: list[Path], input_size: int, max_pixels: int = MAX_IMAGE_PIXELS):
        self.paths, self.input_size, self.max_pixels = list(paths), input_size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_image(self.paths[index], self.max_pixels, reduce_to=self.input_size)
        except ImageError as error:
            return index, None, error.reason
        s = self.input_size
        return index, resize(image[None], (s, s))[0] * 2 - 1, None


def keep_items(items: list) -> list:
    """A DataLoader collate_fn that keeps EncoderInputs' (index, image | None, reason) items as a list."""
    return items


# ---------------------------------------------------------------- the cache


@dataclass
class LatentCache:
    """A finished latent cache, loaded into memory (about 100 KB per image at 3x64x64).

    mean: (N, C, h, w) float32; logvar: the same or None (VQ latents); files: the N
    image paths relative to `source`, in order.
    """

    folder: Path
    mean: torch.Tensor
    logvar: torch.Tensor | None
    files: list[str]
    index: dict

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.index["latent_shape"])

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]

    def __len__(self) -> int:
        return self.mean.shape[0]

    def std(self) -> float:
        return latent_std(self.mean, self.logvar)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> LatentCache:
        folder = Path(folder)
        if not folder.is_dir():
            raise InfdError(f"latent cache '{folder}' does not exist; create it with `infd encode-latents`.")
        try:
            index = json.loads((folder / INDEX).read_text())
        except FileNotFoundError:
            raise InfdError(f"'{folder}' is not a finished latent cache (no {INDEX}); run `infd encode-latents` with --out {folder} to finish it.") from None
        except json.JSONDecodeError as error:
            raise InfdError(f"'{folder / INDEX}' is damaged ({quote_error(error)}); run `infd encode-latents` again.") from None
        if index.get("format") != CACHE_FORMAT:
            raise InfdError(f"'{folder}' is not a latent cache written by `infd encode-latents`.")
        means, logvars, files = [], [], []
        for shard in index["shards"]:
            tensors, metadata = read_shard(folder / shard["file"])
            if metadata.get("fingerprint") != index["fingerprint"]:
                raise InfdError(f"shard {shard['file']} of '{folder}' comes from another autoencoder; run `infd encode-latents` again into a new folder.")
            means.append(tensors["mean"])
            logvars.append(tensors.get("logvar"))
            files += json.loads(metadata["files"])
        if not files:
            raise InfdError(f"latent cache '{folder}' holds no latents (all {len(index.get('skipped_files', []))} images were skipped).")
        logvar = torch.cat(logvars) if logvars and logvars[0] is not None else None
        return cls(folder, torch.cat(means), logvar, files, index)


def read_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        return load_file(str(path)), metadata
    except (OSError, ValueError, RuntimeError) as error:
        raise InfdError(f"latent shard '{path}' is missing or damaged ({quote_error(error)}); run `infd encode-latents` again to rewrite it.") from None


def _shard_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of a complete shard on disk, or None when there is none (or it is unreadable)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as file:
            return file.metadata() or {}
    except (OSError, ValueError, RuntimeError):
        return None


@torch.no_grad()
def encode_folder(
    autoencoder: NeuralFieldAutoencoder,
    data: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int = 1024,
    batch_size: int = 16,
    num_workers: int = 2,
    exclude: tuple[str, ...] = (),
    progress: bool = True,
) -> LatentCache:
    """Encode every image under `data` into the latent cache `out` (resuming a partial one).

    Images are planned in sorted order, `shard_size` per shard; a shard already in `out`
    for the same files and autoencoder is kept. Returns the finished cache.
    """
    if shard_size <= 0 or batch_size <= 0 or num_workers < 0:
        raise InfdError("shard_size and batch_size must be positive and num_workers at least 0.")
    data, out = Path(data), Path(out)
    excluded = {Path(name).name for name in exclude}
    paths = [p for p in list_images(data) if p.name not in excluded]
    names = [str(p.relative_to(data)) for p in paths]
    fingerprint = weights_fingerprint(autoencoder)
    plan = [list(range(i, min(i + shard_size, len(paths)))) for i in range(0, len(paths), shard_size)]
    if out.exists() and not out.is_dir():
        raise InfdError(f"--out '{out}' is a file; pass a folder for the latent cache.")
    _check_previous_index(out, fingerprint)

    param = next(autoencoder.parameters())
    inputs = EncoderInputs(paths, autoencoder.config.input_size)
    skipped: list[tuple[str, str]] = []
    shards = []
    bar = tqdm(total=len(paths), desc="encode-latents", unit="img", disable=not progress)
    for number, members in enumerate(plan):
        target = out / SHARD_NAME.format(number)
        files = [names[i] for i in members]
        existing = _shard_metadata(target)
        if existing is not None and existing.get("fingerprint") not in (None, fingerprint):
            raise InfdError(f"'{out}' holds latents of another autoencoder; choose a new --out or delete it.")
        if existing is None or json.loads(existing.get("planned", "null")) != files:
            _encode_shard(autoencoder, inputs, members, names, target, fingerprint, batch_size, num_workers, param, bar)
            existing = _shard_metadata(target)
        else:
            bar.update(len(members))
        kept = json.loads(existing["files"])
        skipped += [tuple(item) for item in json.loads(existing["skipped"])]
        shards.append({"file": target.name, "count": len(kept)})
        bar.set_postfix(skipped=len(skipped))
    bar.close()
    for stale in out.glob("shard_*.safetensors"):  # left by an earlier plan with more shards
        if stale.name not in {s["file"] for s in shards}:
            stale.unlink()

    index = {
        "format": CACHE_FORMAT,
        "version": 1,
        "source": str(data),
        "fingerprint": fingerprint,
        "latent_shape": list(autoencoder.latent_shape),
        "latent_type": autoencoder.config.latent_type,
        "input_size": autoencoder.config.input_size,
        "count": sum(s["count"] for s in shards),
        "shards": shards,
        "skipped": dict(Counter(reason for _, reason in skipped)),
        "skipped_files": [list(item) for item in skipped],
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / INDEX) as tmp:
        tmp.write_text(json.dumps(index, indent=1))
    return LatentCache.open(out)


def _check_previous_index(out: Path, fingerprint: str) -> None:
    try:
        previous = json.loads((out / INDEX).read_text())
    except (OSError, json.JSONDecodeError):
        return
    if previous.get("fingerprint") != fingerprint:
        raise InfdError(f"'{out}' holds latents of another autoencoder; choose a new --out or delete it.")


def _encode_shard(autoencoder, inputs, members, names, target, fingerprint, batch_size, num_workers, param, bar) -> None:
    """Encode the images `members` and write them as one shard (atomically)."""
    subset = torch.utils.data.Subset(inputs, members)
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers, collate_fn=keep_items)
    means, logvars, kept, skipped = [], [], [], []
    for items in loader:
        good = [(index, image) for index, image, _ in items if image is not None]
        skipped += [(names[index], reason) for index, image, reason in items if image is None]
        if good:
            batch = torch.stack([image for _, image in good]).to(param.device, param.dtype)
            mean, logvar = autoencoder.encode_moments(batch)
            means.append(mean.float().cpu())
            if logvar is not None:
                logvars.append(logvar.float().cpu())
            kept += [names[index] for index, _ in good]
        bar.update(len(items))
        bar.set_postfix(skipped=len(skipped))
    shape = (0, *autoencoder.latent_shape)
    tensors = {"mean": torch.cat(means) if means else torch.zeros(shape)}
    if autoencoder.config.latent_type == "kl":
        tensors["logvar"] = torch.cat(logvars) if logvars else torch.zeros(shape)
    metadata = {
        "fingerprint": fingerprint,
        "planned": json.dumps([names[i] for i in members]),
        "files": json.dumps(kept),
        "skipped": json.dumps(skipped),
    }
    with atomic_path(target) as tmp:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)


# ---------------------------------------------------------------- single latents

# The modules that decide what a z means: finetuning the decoder or the renderer alone
# (train-ae --freeze-encoder) keeps them, and so keeps every saved z valid.
LATENT_SPACE_MODULES = ("encoder", "quant_conv", "quantizer")
LATENT_SPACE_KEY = "latent_space"  # the metadata entry holding a saved z's latent-space fingerprint


def latent_space_fingerprint(autoencoder: NeuralFieldAutoencoder) -> str:
    """The fingerprint of an autoencoder's latent space, saved with every z it makes (`LATENT_SPACE_KEY`)."""
    return weights_fingerprint(autoencoder, LATENT_SPACE_MODULES)



def save_latent(path: str | os.PathLike, z: torch.Tensor, metadata: dict | None = None) -> None:
    """Write z (1, C, h, w) or (C, h, w) as safetensors (atomically); metadata values become strings."""
    z = z.detach().float().cpu().contiguous()
    if z.ndim == 3:
        z = z[None]
    text = {key: value if isinstance(value, str) else json.dumps(value) for key, value in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file({LATENT_KEY: z}, str(tmp), metadata={"format": "infd-latent", **text})


def load_latent(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """Read a latent written by `save_latent` (or `infd sample`): z (1, C, h, w) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise InfdError(f"latent file '{path}' does not exist; pass a .z.safetensors file written by `infd sample`.")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            z = file.get_tensor(LATENT_KEY)
    except Exception as error:  # safetensors raises its own error types for garbage
        raise InfdError(f"'{path}' is not a latent file written by `infd sample` ({type(error).__name__}).") from None
    return (z[None] if z.ndim == 3 else z), metadata


def load_latent_for(autoencoder: NeuralFieldAutoencoder, path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]]:
    """`load_latent`, refusing a z this autoencoder cannot render: another shape, NaN, or another latent space."""
    z, metadata = load_latent(path)
    z = check_latent(autoencoder, z)
    recorded = metadata.get(LATENT_SPACE_KEY)
    if recorded is not None and recorded != latent_space_fingerprint(autoencoder):
        origin = f" ('{metadata['ckpt']}')" if "ckpt" in metadata else ""
        raise InfdError(f"'{path}' was made by another autoencoder than this one (their encoders differ), so it would render as noise; pass the checkpoint it came from{origin}.")
    return z, metadata
