"""`infd eval-gen`: FID and patch-FID of generated images against real ones.

At each scale S every image (real or generated) is resized (antialiased) so that its *short* side is S, and random
`patch`² crops (seeded, reproducible) are taken from it; the two patch sets are
compared by FID (InceptionV3 from a local file), by the Fréchet distance in the features
of a fixed random conv net (weight-free) and by the distance of their mean power
spectra. At S = patch a square image yields exactly its whole self: plain FID; above,
patch-FID as in Chen et al. 2024 (after Chai et al. 2022).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import infd.evaluation.metrics as metrics
from infd import rendering
from infd.errors import InfdError
from infd.evaluation.inputs import MIN_SCALE, scaled_size
from infd.evaluation.report import machine_line, machine_summary, markdown_table, metric_panels, number_text, plot_panels, write_json, write_text
from infd.geometry import Size
from infd.images import ImageError, load_image, resize


def crop_positions(size: Size, patch: int, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """`count` random (top, left) of patch² crops inside an image of `size`; all of them if there are fewer."""
    h, w = size
    rows, cols = h - patch + 1, w - patch + 1
    if rows <= 0 or cols <= 0:
        return []
    if rows * cols <= count:
        return [(top, left) for top in range(rows) for left in range(cols)]
    return [(int(rng.integers(rows)), int(rng.integers(cols))) for _ in range(count)]


def scale_patches(image: torch.Tensor, scale: int, patch: int, count: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[tuple[int, int]], Size]:
    """Random patch² crops of image (3, H, W) resized (antialiased) to short side `scale`.

    Returns (crops (n, 3, patch, patch), their (top, left) in the resized image, its size).
    """
    size = scaled_size(tuple(image.shape[-2:]), scale, "short")
    resized = resize(image[None], size)[0]
    positions = crop_positions(size, patch, count, rng)
    crops = [resized[:, top : top + patch, left : left + patch] for top, left in positions]
    return (torch.stack(crops) if crops else torch.empty(0, 3, patch, patch)), positions, size


@dataclass
class PatchSet:
    """Features and spectra of one image set's patches, per scale."""

    features: dict[int, dict[str, list[torch.Tensor]]]
    spectra: dict[int, torch.Tensor]  # summed power per bin
    counts: Counter
    images: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    too_small: Counter = field(default_factory=Counter)  # per scale

    def stacked(self, scale: int, name: str) -> torch.Tensor | None:
        parts = self.features[scale][name]
        return torch.cat(parts) if parts else None

    def mean_spectrum(self, scale: int) -> torch.Tensor | None:
        return self.spectra[scale] / self.counts[scale] if self.counts[scale] else None


def collect_patches(
    paths: list[Path], scales: list[int], patch: int, per_image: int, seed: int, extractors: dict, progress: bool = True, desc: str = "patches"
) -> PatchSet:
    """Crop every image at every scale and keep only the patches' features and spectra.

    The crops of image i at scale S come from the generator seeded with (seed, i, S):
    the same arguments give the same patches on any machine, and a set compared with
    itself gives identical patches (distance 0).
    """
    result = PatchSet({s: {name: [] for name in extractors} for s in scales}, {s: 0 for s in scales}, Counter())
    for index, path in enumerate(tqdm(paths, desc=desc, unit="image", disable=not progress)):
        try:
            image = load_image(path)
        except ImageError as error:
            result.skipped[path.name] = error.reason
            continue
        result.images += 1
        for scale in scales:
            if min(image.shape[-2:]) < scale:
                result.too_small[scale] += 1
                continue
            crops, _, _ = scale_patches(image, scale, patch, per_image, np.random.default_rng([seed, index, scale]))
            for name, extract in extractors.items():
                result.features[scale][name].append(extract(crops))
            result.spectra[scale] = result.spectra[scale] + metrics.radial_power_spectrum(crops).sum(0)
            result.counts[scale] += len(crops)
    if not result.images:
        raise InfdError(f"none of the {len(paths)} images could be read ({', '.join(f'{k}: {v}' for k, v in result.skipped.items())}).")
    return result


def compare_patch_sets(real: PatchSet, generated: PatchSet, scales: list[int], patch: int, label: str) -> list[dict]:
    """One row per scale: FID (if Inception features were taken), random-feature FD, spectral distance."""
    rows = []
    for scale in scales:
        row = {"samples": label, "scale": scale, "patch": patch, "n_real": real.counts[scale], "n_samples": generated.counts[scale]}
        for name in real.features[scale]:
            a, b = real.stacked(scale, name), generated.stacked(scale, name)
            enough = a is not None and b is not None and len(a) >= 2 and len(b) >= 2
            row[name] = metrics.frechet_distance(a, b) if enough else None
        spectra = real.mean_spectrum(scale), generated.mean_spectrum(scale)
        row["spectral_db"] = None if None in spectra else float((metrics.spectrum_db(spectra[0]) - metrics.spectrum_db(spectra[1])).abs().mean())
        rows.append(row)
    return rows


def evaluate_generated(
    samples: dict[str, list[Path]],
    real: list[Path],
    scales: list[int],
    patch: int = 256,
    per_image: int = 4,
    seed: int = 0,
    inception: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Compare each set of generated images (label -> paths) with the real images, patch by patch at each scale."""
    if patch < MIN_SCALE:
        raise InfdError(f"--patch must be at least {MIN_SCALE} pixels, got {patch}.")
    if per_image < 1:
        raise InfdError(f"--patches-per-image must be at least 1, got {per_image}.")
    if scales[0] < patch:
        raise InfdError(f"every scale must be at least the patch size {patch} (a patch is cut from the image at that scale), got {scales[0]}.")
    device = rendering.pick_device(device) if isinstance(device, str) else device
    start = time.perf_counter()
    extractors = {"rfid": metrics.RandomConvFeatures(seed=0).to(device)}
    if inception is not None:
        extractors["fid"] = metrics.InceptionFeatures(inception, device)
    real_set = collect_patches(real, scales, patch, per_image, seed, extractors, progress, "real patches")
    rows, sets = [], {}
    for label, paths in samples.items():
        same = [p.resolve() for p in paths] == [p.resolve() for p in real]  # a sanity check: distance 0
        generated = real_set if same else collect_patches(paths, scales, patch, per_image, seed, extractors, progress, f"{label} patches")
        rows += compare_patch_sets(real_set, generated, scales, patch, label)
        sets[label] = {"images": generated.images, "skipped": generated.skipped, "too_small": dict(generated.too_small)}
    if not any(row["n_real"] >= 2 and row["n_samples"] >= 2 for row in rows):
        raise InfdError(f"no scale has 2 or more patches in both sets: the images are smaller than the scales {', '.join(map(str, scales))}; pass smaller --scales.")
    return {
        "benchmark": "eval-gen",
        "machine": machine_summary(device),
        "settings": {
            "scales": scales,
            "scale_meaning": "short side; patches are random patch² crops of each image resized (antialiased) to that scale",
            "patch": patch,
            "patches_per_image": per_image,
            "seed": seed,
            "inception": str(inception) if inception else None,
            "random_features": "infd.evaluation.metrics.RandomConvFeatures(seed=0)",
        },
        "real": {"images": real_set.images, "skipped": real_set.skipped, "too_small": dict(real_set.too_small)},
        "samples": sets,
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }


def gen_markdown(result: dict, link_prefix: str = "") -> str:
    settings = result["settings"]
    with_fid = settings.get("inception") is not None
    headers = ["samples", "scale", "patches (real / samples)", *(["FID (Inception)"] if with_fid else []), "random-feature FD", "spectral dist. (dB)"]
    rows = []
    for r in result["rows"]:
        kind = " (FID)" if r["scale"] == r["patch"] else " (patch)"
        cells = [r["samples"], f"{r['scale']}{kind}", f"{r['n_real']} / {r['n_samples']}"]
        cells += [number_text(r.get("fid"), 2)] if with_fid else []
        cells += [number_text(r["rfid"], 4), number_text(r["spectral_db"], 2)]
        rows.append(cells)
    text = (
        f"{result['real']['images']} real images, {settings['patch']}² patches, up to {settings['patches_per_image']} per image and scale "
        f"(scale = short side), seed {settings['seed']}, {machine_line(result['machine'])}.\n\n"
    )
    text += markdown_table(headers, rows)
    if result.get("plot"):
        text += f"\n![eval-gen plot]({link_prefix}{result['plot']})\n"
    return text


def write_gen_report(result: dict, out: str | os.PathLike, name: str = "eval-gen") -> dict[str, Path]:
    out = Path(out)
    result["plot"] = f"{name}.png"
    names = ("fid", "rfid", "spectral_db") if result["settings"].get("inception") else ("rfid", "spectral_db")
    panels = metric_panels(result["rows"], names, "samples", result["settings"]["scales"])
    plot_panels(out / result["plot"], panels, "eval-gen: generated vs real patches")
    write_json(out / f"{name}.json", result)
    write_text(out / f"{name}.md", f"# Generated images: FID and patch-FID\n\n{gen_markdown(result)}")
    return {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "plot": out / result["plot"]}

