"""Training losses of the autoencoder: reconstruction, perceptual, GAN and KL terms.

Images are in [-1, 1] with shape (B, 3, H, W); every loss returns a scalar tensor.

Perceptual term. LPIPS (VGG16) is the paper's choice, but its backbone is ImageNet weights
that we cannot download, so it needs a local file (`LPIPSLoss(vgg_path)`). Without one the
default is the focal frequency loss (FFL, Jiang et al., ICCV 2021). L1 alone is blind to
the high-frequency error that makes renders look blurry: a blurred patch and a noisy one
can have the same L1. FFL measures the error in the 2-D spectrum and adaptively up-weights
the frequencies the model currently gets most wrong, usually the high ones (texture,
detail), which is exactly what an any-resolution renderer must get right. It needs no
pretrained network and works at any patch size, whereas MS-SSIM needs patches of at least
161 px for its 5 scales and is mostly a luminance/structure term. Hence FFL is the default.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import focal_frequency_loss
import lpips
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from infd import geometry
from infd.errors import InfdError, check_choice

PERCEPTUAL_KINDS = ("auto", "lpips", "ffl", "none")

# torchvision's vgg16.features indices of the conv layers, grouped as lpips' slice1..slice5
# (lpips keeps the original indices as the module names inside each slice).
_VGG16_SLICES = {
    1: (0, 2),
    2: (5, 7),
    3: (10, 12, 14),
    4: (17, 19, 21),
    5: (24, 26, 28),
}

_MISSING_VGG = (
    "LPIPS needs VGG16 backbone weights: pass --lpips-vgg PATH (torchvision's vgg16 state "
    "dict as .pth or .safetensors); none can be downloaded."
)


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error. pred, target: (B, C, H, W) -> scalar."""
    return (pred - target).abs().mean()


def band_l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the outer band of the images only (`geometry.border_band`, 3% a side): scalar."""
    band = geometry.border_band(tuple(pred.shape[-2:])).to(pred.device)
    return (pred - target).abs()[..., band].mean()


class FocalFrequencyLoss(focal_frequency_loss.FocalFrequencyLoss):
    """Focal frequency loss (Jiang et al., ICCV 2021) of the `focal_frequency_loss` package.

    forward(pred, target): (B, C, H, W) each -> scalar; 0 for identical inputs.
    The FFT runs in float32 because cuFFT has no bfloat16 and half needs power-of-2 sizes.
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor, matrix=None, **kwargs) -> torch.Tensor:
        return super().forward(pred.float(), target.float(), matrix, **kwargs)


class LPIPSLoss(nn.Module):
    """LPIPS (VGG16) distance with the backbone loaded from a local torchvision state dict.

    vgg_path: torchvision's vgg16 state dict (`features.N.weight/bias`; `classifier.*` is
    ignored) as .safetensors or .pth. The calibrated linear heads ship inside the `lpips`
    package. random_backbone=True with vgg_path=None keeps a random VGG (tests only).
    The network is frozen and always in eval mode (its heads contain dropout).
    forward(pred, target): (B, 3, H, W) in [-1, 1] each -> scalar mean distance.
    """

    def __init__(self, vgg_path: str | Path | None = None, random_backbone: bool = False):
        super().__init__()
        if vgg_path is None and not random_backbone:
            raise InfdError(_MISSING_VGG)
        backbone = None if vgg_path is None else _vgg16_backbone_state(Path(vgg_path))
        with warnings.catch_warnings():  # lpips uses torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore")
            self.model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if backbone is not None:
            try:
                self.model.net.load_state_dict(backbone)
            except RuntimeError as e:  # shape mismatch: vgg16_bn, vgg19, another net
                raise InfdError(
                    f"{vgg_path} does not hold VGG16's conv shapes: pass torchvision's vgg16 "
                    "(not vgg16_bn or another net) state dict."
                ) from e
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPSLoss:
        return super().train(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(pred, target).mean()


def _vgg16_backbone_state(path: Path) -> dict[str, torch.Tensor]:
    """torchvision vgg16 state dict at `path` -> state dict of lpips' `net` (slice1..slice5).

    Accepts the whole model's keys (`features.N.*`) or those of `vgg16().features` (`N.*`).
    """
    if not path.is_file():
        raise InfdError(
            f"LPIPS VGG16 weights file {path} does not exist: pass --lpips-vgg PATH to "
            "torchvision's vgg16 state dict (.pth or .safetensors)."
        )
    state = _read_state_dict(path)
    mapped = {}
    for k, indices in _VGG16_SLICES.items():
        for n in indices:
            for param in ("weight", "bias"):
                tensor = state.get(f"features.{n}.{param}", state.get(f"{n}.{param}"))
                if tensor is None:
                    raise InfdError(
                        f"{path} is not torchvision's vgg16 state dict (no key 'features.{n}.{param}'): "
                        "pass the file saved from torchvision.models.vgg16(weights=...).state_dict()."
                    )
                mapped[f"slice{k}.{n}.{param}"] = tensor
    return mapped


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth state dict; .pth without unrestricted pickle."""
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt"):
        raise InfdError(f"LPIPS VGG16 weights {path} must be a .safetensors or .pth file.")
    try:
        if suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InfdError(
            f"could not read {path} as a plain state dict ({type(e).__name__}): save "
            "torchvision's vgg16 state_dict() with torch.save or safetensors."
        ) from e
    if not isinstance(state, dict):
        raise InfdError(f"{path} holds a {type(state).__name__}, not a state dict: save model.state_dict() instead.")
    return state


def make_perceptual_loss(kind: str = "auto", vgg_path: str | Path | None = None) -> nn.Module | None:
    """The perceptual term: "auto" (LPIPS if vgg_path else FFL), "lpips", "ffl" or "none" (None)."""
    check_choice(kind, PERCEPTUAL_KINDS, "perceptual loss")
    if kind == "none":
        return None
    if kind == "lpips" or (kind == "auto" and vgg_path is not None):
        return LPIPSLoss(vgg_path)
    return FocalFrequencyLoss()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss. logits: (B, 1, h, w) patch logits each -> scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator's adversarial loss. logits_fake: (B, 1, h, w) -> scalar."""
    return -logits_fake.mean()


def adaptive_gan_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """VQGAN/LDM balance: ||d rec/d w|| / (||d g/d w|| + 1e-4) at the last layer's weight w.

    rec_loss, g_loss: scalars still attached to the graph (which is kept for backward).
    reduce: applied to both gradients before the norms, e.g. an all-reduce across ranks.
    Returns a detached scalar in [0, max_weight].
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    if reduce is not None:
        rec_grad, g_grad = reduce(rec_grad), reduce(g_grad)
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over latent elements, averaged over batch.

    mean, logvar: (B, C, h, w) -> scalar. This is LDM's convention: the sum makes the term
    grow with the latent size, so its weight is tiny (~1e-6).
    """
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()
