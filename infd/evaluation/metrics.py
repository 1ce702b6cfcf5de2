"""Image quality and distribution metrics, as pure functions of image tensors.

Images are float tensors (B, 3, H, W) in [0, 1]; per-image metrics return float64 (B,).

- `colour_error` (channel means, /255), `rim_db` (interior minus border PSNR) and
  `blockiness` (steps across feature-cell edges over steps elsewhere): the artefacts an
  autoencoder shows that PSNR hides.
- `psnr`, `ssim` (Gaussian window 11, sigma 1.5, per RGB channel, "valid" filtering as in
  Wang et al. 2004), `LPIPSMetric` (VGG16 from a local file, tile by tile).
- `spectral_distance`: a weight-free *detail* metric. The radially averaged power
  spectrum of an image says how much energy it has at each spatial frequency; a blurry
  render lacks high-frequency energy and a noisy one has too much, while PSNR rewards
  blur. The distance is the mean absolute difference of the two log spectra in dB, over
  frequency bins from the lowest to Nyquist (most bins are high frequencies).
- `frechet_distance` of two feature sets (the FID formula), with two
  feature extractors: `InceptionFeatures` (FID; weights from a local file) and
  `RandomConvFeatures`, a fixed, seeded random conv net whose Fréchet distance is our
  weight-free distribution statistic (see docs/evaluation.md for why).
- `mean_ci`: mean and 95% confidence half-width (Student t) of per-image values.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from infd import geometry
from infd.errors import InfdError, quote_error
from infd.geometry import RIM_FRACTION, border_band

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K = (0.01, 0.03)
LUMA = (0.299, 0.587, 0.114)  # Rec. 601, what "grayscale" means for the spectrum
LPIPS_TILE = 512

_MISSING_INCEPTION = (
    "FID needs InceptionV3 weights: pass --inception PATH to torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth (or a .safetensors of it); nothing is downloaded."
)


def check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """(B, 3, H, W) finite float in [0, 1] (a (3, H, W) image gets a batch axis)."""
    if not isinstance(images, torch.Tensor):
        raise InfdError(f"{what} must be a tensor (B, 3, H, W) in [0, 1], got {type(images).__name__}.")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise InfdError(f"{what} must be RGB tensors (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}.")
    if not images.is_floating_point():
        raise InfdError(f"{what} must be float in [0, 1], got {images.dtype}; divide uint8 pixels by 255.")
    if not torch.isfinite(images).all():
        raise InfdError(f"{what} contain NaN or infinite values.")
    return images


def check_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = check_images(pred, "predicted images"), check_images(target, "target images")
    if pred.shape != target.shape:
        raise InfdError(f"cannot compare images of shapes {tuple(pred.shape)} and {tuple(target.shape)}; resize one to the other first.")
    return pred, target.to(pred.device)


# ---------------------------------------------------------------- per-image metrics


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for a peak of 1: (B,) float64, inf where identical."""
    pred, target = check_pair(pred, target)
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)  # 1 / 0 = inf: identical images


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(x**2) / (2 * sigma**2))
    return window / window.sum()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of each channel of (B, C, H, W), "valid" (no padding): (B, C, H - 10, W - 10)."""
    n, c = window.numel(), x.shape[1]
    x = F.conv2d(x, window.view(1, 1, n, 1).expand(c, 1, n, 1), groups=c)
    return F.conv2d(x, window.view(1, 1, 1, n).expand(c, 1, 1, n), groups=c)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), mean over pixels and RGB channels: (B,) float64.

    Gaussian window 11, sigma 1.5, K = (0.01, 0.03), data range 1, filtered without
    padding; 1 for identical images. Both sides must be at least 11 pixels. One channel at
    a time, so memory stays a few planes even at 8192². The moments are taken of each
    channel minus its mean (float32 variances are differences of nearly equal numbers;
    the shift leaves them unchanged and removes most of the rounding).
    """
    pred, target = check_pair(pred, target)
    if min(pred.shape[-2:]) < SSIM_WINDOW:
        raise InfdError(f"SSIM needs images of at least {SSIM_WINDOW} pixels a side, got {tuple(pred.shape[-2:])}.")
    c1, c2 = SSIM_K[0] ** 2, SSIM_K[1] ** 2
    window = _gaussian_window().float().to(pred.device)
    per_channel = []
    for c in range(3):
        x, y = pred[:, c : c + 1].float(), target[:, c : c + 1].float()
        shift_x, shift_y = x.mean((2, 3), keepdim=True), y.mean((2, 3), keepdim=True)
        x, y = x - shift_x, y - shift_y
        mu_x, mu_y, xx, yy, xy = _blur(torch.cat([x, y, x * x, y * y, x * y], 1), window).unbind(1)
        var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
        mu_x, mu_y = mu_x + shift_x[:, 0], mu_y + shift_y[:, 0]
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        per_channel.append(ssim_map.double().flatten(1).mean(1))
    return torch.stack(per_channel, 1).mean(1).cpu()


def radial_power_spectrum(images: torch.Tensor) -> torch.Tensor:
    """Radially averaged power spectrum of each image's luminance: (B, n_bins) float64.

    The image's mean is removed and a Hann window applied (so the image border does not
    leak a cross of false high frequencies into the spectrum). Bin k averages the power
    at radial frequencies [k, k + 1) / (2 n_bins) cycles per pixel, n_bins = min(H, W) // 2,
    from 1/(2 n_bins) up to Nyquist; the DC bin and the corners beyond Nyquist are left out.
    """
    images = check_images(images)
    b, _, h, w = images.shape
    weights = torch.tensor(LUMA, dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
    gray = (images.double() * weights).sum(1)
    gray = gray - gray.mean((-2, -1), keepdim=True)
    hann = torch.outer(torch.hann_window(h, periodic=False, dtype=torch.float64), torch.hann_window(w, periodic=False, dtype=torch.float64))
    power = torch.fft.rfft2(gray * hann.to(gray.device)).abs().pow(2) / (h * w)
    fy = torch.fft.fftfreq(h, dtype=torch.float64)
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
    n_bins = min(h, w) // 2
    index = (radius * 2 * n_bins).floor().long().flatten()
    keep = ((index >= 1) & (index < n_bins)).to(power.device)
    index = index.to(power.device)[keep]
    counts = torch.bincount(index, minlength=n_bins).double()
    flat = power.flatten(1)[:, keep]
    sums = torch.zeros(b, n_bins, dtype=torch.float64, device=power.device).index_add_(1, index, flat)
    return (sums[:, 1:] / counts[1:]).cpu()


def spectrum_db(power: torch.Tensor) -> torch.Tensor:
    """Power to decibels, floored at -150 dB so an empty band stays finite."""
    return 10 * torch.log10(power.clamp_min(1e-15))


def spectral_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |difference| of the radially averaged log power spectra in dB: (B,) float64, 0 when identical."""
    pred, target = check_pair(pred, target)
    return (spectrum_db(radial_power_spectrum(pred)) - spectrum_db(radial_power_spectrum(target))).abs().mean(1)


def colour_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over RGB of |mean of the channel in pred - in target|, in 8-bit levels (/255): (B,) float64.

    A render can score a fair PSNR while shifting the whole image's colour; this says how far.
    """
    pred, target = check_pair(pred, target)
    return (pred.double().mean((2, 3)) - target.double().mean((2, 3))).abs().mean(1).cpu() * 255


def rim_db(pred: torch.Tensor, target: torch.Tensor, fraction: float = RIM_FRACTION) -> torch.Tensor:
    """PSNR of the interior minus PSNR of the outer band (`border_band`): (B,) float64, in dB.

    About 0 for a render that is as good at the border as inside; large when the image has
    a rim (a coloured frame, padding artefacts). Images need at least 3 px a side.
    """
    pred, target = check_pair(pred, target)
    if min(pred.shape[-2:]) < 3:
        raise InfdError(f"the rim figure needs images of at least 3 pixels a side, got {tuple(pred.shape[-2:])}.")
    band = border_band(tuple(pred.shape[-2:]), fraction).to(pred.device)
    error = (pred.double() - target.double()).pow(2).mean(1)  # (B, H, W)
    band_mse, inner_mse = error[:, band].mean(1), error[:, ~band].mean(1)
    return (10 * torch.log10(band_mse / inner_mse)).nan_to_num(0.0, posinf=math.inf, neginf=-math.inf).cpu()


def blockiness(image: torch.Tensor, edge_rows: torch.Tensor, edge_cols: torch.Tensor) -> torch.Tensor:
    """Mean luminance step between neighbours across feature-cell edges over the mean step elsewhere: (B,) float64.

    edge_rows (H - 1,) / edge_cols (W - 1,) bool: whether pixel rows i and i + 1 (columns
    j and j + 1) lie in different cells of the feature map (`geometry.cell_edges`). A
    smooth image scores about 1; a mosaic of cells (nearest-neighbour upsampling) scores
    far more. A flat image scores 1. NaN where there are no pairs of one kind (pixels as
    large as the cells, or a region inside one cell).
    """
    image = check_images(image)
    if edge_rows.shape != (image.shape[-2] - 1,) or edge_cols.shape != (image.shape[-1] - 1,):
        raise InfdError(f"cell-edge masks of shapes {tuple(edge_rows.shape)}, {tuple(edge_cols.shape)} do not fit an image of {tuple(image.shape[-2:])}.")
    weights = torch.tensor(LUMA, dtype=torch.float64, device=image.device).view(1, 3, 1, 1)
    gray = (image.double() * weights).sum(1)
    dy, dx = (gray[:, 1:] - gray[:, :-1]).abs(), (gray[:, :, 1:] - gray[:, :, :-1]).abs()
    rows, cols = edge_rows.to(image.device), edge_cols.to(image.device)
    on = torch.cat([dy[:, rows].flatten(1), dx[:, :, cols].flatten(1)], 1)
    off = torch.cat([dy[:, ~rows].flatten(1), dx[:, :, ~cols].flatten(1)], 1)
    if on.shape[1] == 0 or off.shape[1] == 0:  # pixels at least as large as cells, or a single cell
        return torch.full((image.shape[0],), math.nan, dtype=torch.float64)
    eps = 1e-12
    return ((on.mean(1) + eps) / (off.mean(1) + eps)).cpu()


class LPIPSMetric:
    """LPIPS (VGG16) per image, from infd.training.losses.LPIPSLoss; large images go tile by tile.

    vgg_path: torchvision's vgg16 state dict (.pth/.safetensors). random_backbone=True
    without a path keeps a random VGG (tests only). Images above `tile` pixels a side are
    cut into tiles and the tiles' LPIPS averaged by area, so memory is flat in the image
    size (the conv padding at tile borders makes this differ slightly from a whole-image
    LPIPS). __call__(pred, target) -> (B,) float64, 0 for identical images.
    """

    def __init__(self, vgg_path: str | Path | None = None, device: str | torch.device = "cpu", random_backbone: bool = False, tile: int = LPIPS_TILE):
        from infd.training.losses import LPIPSLoss  # imports lpips (and torchvision): only when asked for

        self.loss = LPIPSLoss(vgg_path, random_backbone=random_backbone).to(device)
        self.device = torch.device(device)
        self.tile = tile

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred, target = check_pair(pred, target)
        h, w = pred.shape[-2:]
        total = torch.zeros(pred.shape[0], dtype=torch.float64)
        for window in geometry.tiles((h, w), self.tile):
            rows = slice(window.top, window.top + window.height)
            cols = slice(window.left, window.left + window.width)
            a, b = (x[..., rows, cols].float().to(self.device) * 2 - 1 for x in (pred, target))
            distance = self.loss.model(a, b).flatten().double().cpu()
            total += distance * window.height * window.width
        return total / (h * w)


# ---------------------------------------------------------------- summaries


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


def t_quantile_975(dof: int) -> float:
    """Student's t 97.5% quantile: a table to 30 degrees of freedom, then its Cornish-Fisher series."""
    if dof < 1:
        raise ValueError("degrees of freedom must be at least 1")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def mean_ci(values) -> tuple[float | None, float | None]:
    """(mean, 95% confidence half-width) of a sample; the width is None below 2 finite values.

    An infinite value (PSNR of an exact reconstruction) makes the mean inf, width None.
    """
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    n = len(values)
    mean = sum(values) / n
    if n < 2 or not all(math.isfinite(v) for v in values):
        return mean, None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile_975(n - 1) * std / math.sqrt(n)


# ---------------------------------------------------------------- distribution metrics


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D): the FID formula

        |mu_a - mu_b|² + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^½)

    in float64. With centred features X (N, D) and Y (M, D), the eigenvalues of S_a S_b
    are the squared singular values of X Yᵀ / sqrt((N - 1)(M - 1)), so the last term is
    that matrix's nuclear norm: exact, and cheap while the sets are smaller than D. Larger
    sets use the symmetric form tr((S_a^½ S_b S_a^½)^½) in D x D. Agrees with
    torch-fidelity's FID formula (tested).
    """
    for features in (features_a, features_b):
        if features.ndim != 2 or features.shape[0] < 2:
            raise InfdError(f"a Fréchet distance needs at least 2 feature vectors per set, got {tuple(features.shape)}.")
    if features_a.shape[1] != features_b.shape[1]:
        raise InfdError(f"feature sets of different widths {features_a.shape[1]} and {features_b.shape[1]} cannot be compared.")
    a, b = features_a.detach().double().cpu(), features_b.detach().double().cpu()
    (n, dim), m = a.shape, b.shape[0]
    x, y = a - a.mean(0), b - b.mean(0)
    trace_a, trace_b = x.pow(2).sum() / (n - 1), y.pow(2).sum() / (m - 1)
    if min(n, m) <= dim:
        cross = torch.linalg.svdvals(x @ y.T).sum() / math.sqrt((n - 1) * (m - 1))
    else:
        values, vectors = torch.linalg.eigh(x.T @ x / (n - 1))
        root_a = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
        cross = torch.linalg.eigvalsh(root_a @ (y.T @ y / (m - 1)) @ root_a).clamp_min(0).sqrt().sum()
    distance = (a.mean(0) - b.mean(0)).pow(2).sum() + trace_a + trace_b - 2 * cross
    return max(0.0, float(distance))


class RandomConvFeatures(nn.Module):
    """A fixed random conv net as a feature extractor: images (B, 3, H, W) in [0, 1] -> (B, D) float64.

    Four 4x4 stride-2 convolutions (widths 32, 64, 128, 256, leaky ReLU 0.2) with He-normal
    weights drawn from a generator seeded by `seed` alone, so every run, machine and
    process gets the same network. The features are the mean and standard deviation of
    every channel of every layer (D = 960): first- and second-order statistics of filter
    responses at four scales, which respond to colour, contrast, texture and blur.
    Works at any patch size (global pooling).
    """

    widths = (32, 64, 128, 256)

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        channels = (3, *self.widths)
        for i, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
            weight = torch.randn(c_out, c_in, 4, 4, generator=generator, dtype=torch.float64) * math.sqrt(2 / (c_in * 16))
            self.register_buffer(f"weight{i}", weight.float())

    @property
    def dim(self) -> int:
        return 2 * sum(self.widths)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = check_images(images).float().to(self.weight0.device) * 2 - 1
        features = []
        for i in range(len(self.widths)):
            x = F.leaky_relu(F.conv2d(x, getattr(self, f"weight{i}"), stride=2, padding=1), 0.2)
            features += [x.mean((2, 3)), x.std((2, 3))]
        return torch.cat(features, 1).double().cpu()


class InceptionFeatures:
    """torch-fidelity's InceptionV3 (the FID network) from a local weights file: images -> (B, 2048) float64.

    weights_path: torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`, or the
    same state dict as .safetensors. It is read without unpickling code
    (`weights_only=True`) and handed to torch-fidelity in memory. Images in [0, 1] are
    quantised to uint8, as torch-fidelity expects, and resized by it to 299².
    """

    def __init__(self, weights_path: str | Path | None, device: str | torch.device = "cpu"):
        if weights_path is None:
            raise InfdError(_MISSING_INCEPTION)
        path = Path(weights_path)
        if not path.is_file():
            raise InfdError(f"Inception weights file {path} does not exist. " + _MISSING_INCEPTION)
        state = _read_inception_state(path)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
        except RuntimeError as error:  # missing or mis-shaped keys
            raise InfdError(f"{path} does not hold torch-fidelity's InceptionV3 weights ({quote_error(error)}).") from None
        self.device = torch.device(device)
        self.net.to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (check_images(images).clamp(0, 1) * 255).round().to(torch.uint8).to(self.device)
        return self.net(pixels)[0].double().cpu()


def _read_inception_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            import safetensors.torch

            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InfdError(f"could not read {path} as a plain state dict ({type(error).__name__}): " + _MISSING_INCEPTION) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InfdError(f"{path} is not a state dict of tensors. " + _MISSING_INCEPTION)
    return state
