"""Conditions on regions of an image neural field, for any-scale inversion.

Each condition names a box of the image domain [-1, 1]² (any position, any aspect, any
zoom) and scores a render of that box alone, at the resolution the condition needs:

    TextRegion(box, "a lighthouse")                  CLIP at its input size (224² for ViT-B)
    ImageRegion(box, image)                          an observation at whatever resolution it has
    MaskedRegion(box, image, mask)                   an observation with a hole to fill (inpainting)

`render_size(canvas, critics)` is the pixel grid the region is rendered at and
`loss(region, critics)` scores that render, (1, 3, h, w) in [0, 1] -> scalar. The
canvas is the size of the final image; it sets the pixel aspect of a text region.

Why each region is rendered directly at the size its condition needs, and not at the
canvas's pixel size and then resized: the renderer is conditioned on the pixel size and
trained to render the (antialiased) image at every scale, so a direct render *is* the
model's downsized view of the box, and its cost does not depend on the canvas. Rendering
at the canvas's cell first would cost the box's area at the canvas's resolution (a
quarter of an 8192² canvas is 16 Mpx per step), which is what region-only rendering
avoids. When a condition's size equals the box's extent in canvas pixels, the two agree
exactly: the region render equals that crop of a full canvas render (tested).

A spec entry (JSON) is {"type": "text" | "image" | "masked", "box": [y0, x0, y1, x1], ...};
see `condition_from_dict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from infd.errors import InfdError, check_choice
from infd.geometry import Box, Size, check_inside_image
from infd.images import load_image
from infd.training.losses import l1_loss

IMAGE_LOSSES = ("l1", "lpips")
MIN_REGION_SIDE = 8  # observations smaller than this say nothing a renderer can be checked against


@dataclass
class Critics:
    """The pretrained networks conditions may need; None where the spec needs none."""

    clip: object | None = None  # infd.inversion.clip.CLIPScorer
    lpips: torch.nn.Module | None = None  # infd.training.losses.LPIPSLoss


def check_box(box: Box | tuple | list | str, what: str = "condition") -> Box:
    """A Box inside the image [-1, 1]², from a Box, four numbers or "y0,x0,y1,x1"."""
    if isinstance(box, str):
        box = Box.parse(box)
    elif not isinstance(box, Box):
        values = list(box) if isinstance(box, (tuple, list)) else []
        if len(values) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise InfdError(f"the {what}'s box must be four numbers [y0, x0, y1, x1] in [-1, 1] units, got {box!r}.")
        box = Box(*(float(v) for v in values))
    return check_inside_image(box, f"the {what}'s box")


def _check_weight(weight: float, what: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise InfdError(f"the {what}'s weight must be a number >= 0, got {weight!r}.")
    return float(weight)


def _check_observation(image: torch.Tensor, what: str) -> torch.Tensor:
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] != 3:
        raise InfdError(f"the {what}'s image must be (3, H, W), got {tuple(image.shape)}.")
    if min(image.shape[-2:]) < MIN_REGION_SIDE:
        raise InfdError(f"the {what}'s image is {image.shape[-1]}x{image.shape[-2]} pixels; it needs at least {MIN_REGION_SIDE} on each side.")
    if not torch.isfinite(image).all():
        raise InfdError(f"the {what}'s image contains NaN or infinite values.")
    return image.float()


@dataclass
class TextRegion:
    """The box should look like `prompt` to CLIP.

    Rendered with square canvas pixels, short side at CLIP's input size; a box whose
    aspect is not square is scored by the mean embedding of square windows spread along
    its long side, so the whole box is judged and nothing is stretched.
    """

    box: Box
    prompt: str
    weight: float = 1.0
    kind = "text"

    def __post_init__(self) -> None:
        self.box = check_box(self.box, "text condition")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InfdError("a text condition needs a non-empty prompt.")
        self.weight = _check_weight(self.weight, "text condition")

    def render_size(self, canvas: Size, critics: Critics) -> Size:
        side = _clip(critics).image_size
        height, width = self.box.height * canvas[0], self.box.width * canvas[1]  # in canvas pixels (x 2)
        if height <= width:
            return side, max(side, round(side * width / height))
        return max(side, round(side * height / width)), side

    def loss(self, region: torch.Tensor, critics: Critics) -> torch.Tensor:
        clip = _clip(critics)
        windows = square_windows(region, clip.image_size)
        embeddings = clip.embed_images(windows).mean(dim=0)
        return 1 - torch.nn.functional.normalize(embeddings, dim=-1) @ clip.embed_text(self.prompt)

    def describe(self) -> str:
        return f"text '{self.prompt}'"

    def to(self, device: torch.device) -> TextRegion:
        return self


def square_windows(region: torch.Tensor, side: int) -> torch.Tensor:
    """(1, 3, h, w) with min(h, w) == side -> (n, 3, side, side) windows evenly covering the long side."""
    h, w = region.shape[-2:]
    length = max(h, w)
    count = math.ceil(length / side)
    starts = [round(i * (length - side) / max(count - 1, 1)) for i in range(count)]
    if h >= w:
        return torch.cat([region[..., s : s + side, :] for s in starts])
    return torch.cat([region[..., s : s + side] for s in starts])


def _clip(critics: Critics):
    if critics.clip is None:
        from infd.inversion.clip import MISSING_CLIP

        raise InfdError(MISSING_CLIP)
    return critics.clip


@dataclass
class ImageRegion:
    """The box, rendered at the observation's own resolution, should match `image`.

    image: (3, H, W) in [0, 1]: a low-resolution view of the whole image, a
    high-resolution detail crop, anything in between. loss: "l1" (mean absolute error in
    [0, 1] units) or "lpips" (needs local VGG16 weights).
    """

    box: Box
    image: torch.Tensor
    weight: float = 1.0
    loss_type: str = "l1"
    kind = "image"

    def __post_init__(self) -> None:
        self.box = check_box(self.box, "image condition")
        self.image = _check_observation(self.image, "image condition")
        self.weight = _check_weight(self.weight, "image condition")
        check_choice(self.loss_type, IMAGE_LOSSES, "image loss")

    def render_size(self, canvas: Size, critics: Critics) -> Size:
        return tuple(self.image.shape[-2:])

    def loss(self, region: torch.Tensor, critics: Critics) -> torch.Tensor:
        target = self.image[None]
        if self.loss_type == "lpips":
            if critics.lpips is None:
                raise InfdError("an image condition with loss 'lpips' needs VGG16 weights: pass --lpips-vgg PATH, or use loss 'l1'.")
            return critics.lpips(region * 2 - 1, target * 2 - 1)
        return l1_loss(region, target)

    def describe(self) -> str:
        return f"image {self.image.shape[-1]}x{self.image.shape[-2]} ({self.loss_type})"

    def to(self, device: torch.device) -> ImageRegion:
        self.image = self.image.to(device)
        return self


@dataclass
class MaskedRegion:
    """Inpainting: the box should match `image` wherever `mask` is 0 (kept pixels).

    mask: (1, H, W) or (H, W), the image's size; 1 (white) marks the hole to fill, as in
    the usual inpainting masks. What fills the hole comes from the generative prior and
    any other condition (e.g. a TextRegion over the same box).
    """

    box: Box
    image: torch.Tensor
    mask: torch.Tensor
    weight: float = 1.0
    known: torch.Tensor = field(init=False, repr=False)
    kind = "masked"

    def __post_init__(self) -> None:
        self.box = check_box(self.box, "masked condition")
        self.image = _check_observation(self.image, "masked condition")
        self.weight = _check_weight(self.weight, "masked condition")
        mask = self.mask.float()
        if mask.ndim == 3:
            mask = mask.mean(dim=0)  # a colour mask: any channel layout reads as gray
        if mask.shape != self.image.shape[-2:]:
            raise InfdError(
                f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but its image is {self.image.shape[-1]}x{self.image.shape[-2]}; "
                "they must be the same size."
            )
        self.mask = (mask > 0.5).float()[None]
        self.known = 1 - self.mask
        if self.known.sum() == 0:
            raise InfdError("the mask covers the whole image: nothing is observed; leave some pixels black (kept).")

    def render_size(self, canvas: Size, critics: Critics) -> Size:
        return tuple(self.image.shape[-2:])

    def loss(self, region: torch.Tensor, critics: Critics) -> torch.Tensor:
        error = (region - self.image[None]).abs() * self.known
        return error.sum() / (3 * self.known.sum())

    def describe(self) -> str:
        hole = float(self.mask.mean())
        return f"masked image {self.image.shape[-1]}x{self.image.shape[-2]} ({hole:.0%} hole)"

    def to(self, device: torch.device) -> MaskedRegion:
        self.image, self.mask, self.known = self.image.to(device), self.mask.to(device), self.known.to(device)
        return self


Condition = TextRegion | ImageRegion | MaskedRegion
CONDITION_KEYS = {
    "text": {"type", "box", "prompt", "weight"},
    "image": {"type", "box", "image", "weight", "loss"},
    "masked": {"type", "box", "image", "mask", "weight"},
}


def condition_from_dict(entry: dict, base: Path | None = None, index: int = 0) -> Condition:
    """One spec entry -> a condition; image paths are relative to `base` (the spec's folder).

    {"type": "text", "box": [y0, x0, y1, x1], "prompt": "...", "weight": 1}
    {"type": "image", "box": ..., "image": "obs.png", "loss": "l1" | "lpips", "weight": 1}
    {"type": "masked", "box": ..., "image": "photo.png", "mask": "mask.png", "weight": 1}
    "box" may also be "y0,x0,y1,x1"; it defaults to the whole image.
    """
    what = f"condition {index}"
    if not isinstance(entry, dict):
        raise InfdError(f"{what} must be a JSON object with a \"type\", got {entry!r}.")
    kind = entry.get("type")
    if kind not in CONDITION_KEYS:
        raise InfdError(f"{what} has unknown type {kind!r}; use one of {', '.join(CONDITION_KEYS)}.")
    unknown = set(entry) - CONDITION_KEYS[kind]
    if unknown:
        raise InfdError(f"{what} ({kind}) has unknown keys {', '.join(sorted(unknown))}; it takes {', '.join(sorted(CONDITION_KEYS[kind]))}.")
    box = check_box(entry.get("box", Box.full()), what)
    weight = entry.get("weight", 1.0)
    if kind == "text":
        if "prompt" not in entry:
            raise InfdError(f"{what} (text) needs a \"prompt\".")
        return TextRegion(box, entry["prompt"], weight)
    image = load_image(_spec_path(entry, "image", base, what))
    if kind == "image":
        return ImageRegion(box, image, weight, entry.get("loss", "l1"))
    mask = load_image(_spec_path(entry, "mask", base, what))
    return MaskedRegion(box, image, mask, weight)


def _spec_path(entry: dict, key: str, base: Path | None, what: str) -> Path:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise InfdError(f"{what} ({entry['type']}) needs \"{key}\": the path of an image file.")
    path = Path(value).expanduser()
    return path if path.is_absolute() or base is None else base / path


def condition_to_dict(condition: Condition) -> dict:
    """What a log records of a condition (images by size, not by pixels)."""
    entry = {"type": condition.kind, "box": list(condition.box.as_tuple()), "weight": condition.weight}
    if isinstance(condition, TextRegion):
        entry["prompt"] = condition.prompt
    else:
        entry["image_size"] = list(condition.image.shape[-2:])
    if isinstance(condition, ImageRegion):
        entry["loss"] = condition.loss_type
    return entry
