"""infd as ComfyUI nodes: load a model, sample at any size, render any region, encode an image, decode an SD latent at any size.

Types that travel between nodes:

    INFD_MODEL    `InfdModel`: an infd pipeline (can sample), or an autoencoder alone
                  (an `infd train-ae` run, or a Stable Diffusion VAE from `infd convert-vae`)
    INFD_LATENT   {"z": (B, C, h, w) float32, "aspect": width / height of the image it shows}
    IMAGE         ComfyUI's: (B, H, W, C) float32 in [0, 1]
    LATENT        ComfyUI's: {"samples": (B, 4, h, w)}, the raw VAE latent (ComfyUI applies the
                  model's scale factor only inside its samplers), which is what a converted VAE decodes

Sizes follow infd's one rule (`infd.geometry.fit_size`): "2048x1536" is exact, one number is
the long side and the short side follows the image's aspect. Every user error is an
`InfdError` of one sentence, which ComfyUI shows on the node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infd import geometry
from infd.diffusion import SAMPLERS, check_sampling, check_seed
from infd.errors import InfdError, check_choice
from infd.geometry import Box
from infd.models import NeuralFieldAutoencoder
from infd.rendering import LatentField, check_latent, encode, render_dtype

CATEGORY = "infd"
DEVICES = ["auto", "cpu", "cuda"]
MAX_SIDE = 8192  # one in-memory image (infd.rendering.MAX_RENDER_PIXELS caps the pixels)
SIZE_TOOLTIP = "WIDTHxHEIGHT (exact) or one number: the long side, the short side following the image's aspect."


@dataclass
class InfdModel:
    """What the Load node gives: the autoencoder, and the pipeline when the folder holds one (else None)."""

    autoencoder: NeuralFieldAutoencoder
    pipe: object | None
    path: str


def load_model(path: str, device: str = "auto") -> InfdModel:
    """An infd pipeline folder or LDM run (sampling and rendering), else an autoencoder folder (rendering only)."""
    from infd.commands.invert import load_generator  # what `infd invert --ckpt` loads: the same rule

    autoencoder, pipe = load_generator(path, device)
    return InfdModel(autoencoder, pipe, path)


def render_image(model: InfdModel, z: torch.Tensor, aspect: float, size: str, box: Box | None = None) -> torch.Tensor:
    """z (B, C, h, w) rendered over `box` at a size request: a ComfyUI IMAGE (B, H, W, 3) in [0, 1]."""
    height, width = geometry.fit_size(geometry.parse_size_request(size), aspect, box)
    if max(height, width) > MAX_SIDE:
        raise InfdError(f"{width}x{height} has a side longer than the {MAX_SIDE} pixels one image may have here; render a region of it instead.")
    autoencoder = model.autoencoder
    dtype = render_dtype(next(autoencoder.parameters()).device)
    images = LatentField(autoencoder, z, box, dtype=dtype).image((height, width))
    return images.permute(0, 2, 3, 1).contiguous()


def _size_input(default: str) -> tuple:
    return ("STRING", {"default": default, "tooltip": SIZE_TOOLTIP})


def _box_inputs() -> dict:
    corner = {"min": -geometry.MAX_BOX_COORDINATE, "max": geometry.MAX_BOX_COORDINATE, "step": 0.01}
    return {
        "y0": ("FLOAT", {"default": -1.0, **corner, "tooltip": "Top of the region; the image spans [-1, 1]."}),
        "x0": ("FLOAT", {"default": -1.0, **corner, "tooltip": "Left of the region."}),
        "y1": ("FLOAT", {"default": 1.0, **corner, "tooltip": "Bottom of the region."}),
        "x1": ("FLOAT", {"default": 1.0, **corner, "tooltip": "Right of the region."}),
    }


# ---------------------------------------------------------------- nodes


class InfdLoadModel:
    """Load an infd pipeline (samples and renders) or autoencoder (renders; also a converted SD VAE)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "path": ("STRING", {"default": "weights/wallpapers", "tooltip": "A pipeline folder, an LDM run, an autoencoder run or checkpoint, or an `infd convert-vae` output."}),
                "device": (DEVICES, {"default": "auto"}),
            }
        }

    RETURN_TYPES = ("INFD_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, path: str, device: str = "auto"):
        check_choice(device, DEVICES, "device")
        return (load_model(path, device),)


class InfdSample:
    """Sample new images from an infd pipeline, rendered at any width and height."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("INFD_MODEL",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**32 - 1, "tooltip": "Image i of the batch starts from the noise of seed + i, as `infd sample` does."}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "Sampling steps; 0: the pipeline's own (50; 200 for the paper's models)."}),
                "width": ("INT", {"default": 2048, "min": 8, "max": MAX_SIDE, "step": 8}),
                "height": ("INT", {"default": 1152, "min": 8, "max": MAX_SIDE, "step": 8}),
                "sampler": (list(SAMPLERS), {"default": "ddim"}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 16}),
            }
        }

    RETURN_TYPES = ("IMAGE", "INFD_LATENT")
    RETURN_NAMES = ("image", "latent")
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, model: InfdModel, seed: int, steps: int, width: int, height: int, sampler: str = "ddim", batch_size: int = 1):
        if model.pipe is None:
            raise InfdError(f"'{model.path}' is an autoencoder without a diffusion model, so it cannot sample; load a pipeline folder.")
        check_choice(sampler, SAMPLERS, "sampler")
        check_seed(seed, batch_size, "the seed")
        pipe = model.pipe.use_sampler(sampler)
        steps = steps or pipe.default_steps
        check_sampling(pipe.scheduler, steps, pipe.default_eta)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(batch_size)]
        z = pipe.sample_latents(batch_size, steps, generators)
        _, h, w = model.autoencoder.latent_shape
        latent = {"z": z.float().cpu(), "aspect": w / h}
        return render_image(model, latent["z"], latent["aspect"], f"{width}x{height}"), latent


class InfdRenderRegion:
    """Render any region of an infd latent at any size: a zoom that adds detail, not pixels."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("INFD_MODEL",), "latent": ("INFD_LATENT",), **_box_inputs(), "size": _size_input("1024")}}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "render"
    CATEGORY = CATEGORY

    def render(self, model: InfdModel, latent: dict, y0: float, x0: float, y1: float, x1: float, size: str):
        return (render_image(model, latent["z"], latent["aspect"], size, Box(y0, x0, y1, x1)),)


class InfdEncodeImage:
    """Encode images into infd latents (the field of each image, renderable at any size)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("INFD_MODEL",), "image": ("IMAGE",)}}

    RETURN_TYPES = ("INFD_LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, model: InfdModel, image: torch.Tensor):
        if image.ndim != 4 or image.shape[-1] not in (3, 4):
            raise InfdError(f"an IMAGE must be batch x height x width x 3 (or 4) channels, got {tuple(image.shape)}.")
        _, height, width, _ = image.shape
        z = encode(model.autoencoder, image[..., :3].permute(0, 3, 1, 2).float())
        return ({"z": z.float().cpu(), "aspect": width / height},)


class InfdDecodeSDLatent:
    """Decode a Stable Diffusion LATENT at any size with a VAE converted by `infd convert-vae`."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("INFD_MODEL",), "samples": ("LATENT",), "size": _size_input("2048")}}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, model: InfdModel, samples: dict, size: str):
        z = samples["samples"].float()
        c, h, w = model.autoencoder.latent_shape
        if tuple(z.shape[1:]) != (c, h, w) and z.ndim == 4 and z.shape[1] == c:
            side = model.autoencoder.config.input_size
            raise InfdError(
                f"this decoder takes {h}x{w} latents ({side}x{side} images), got {z.shape[2]}x{z.shape[3]}; "
                f"start from a {side}x{side} latent and choose the output's size and aspect here."
            )
        z = check_latent(model.autoencoder, z)
        return (render_image(model, z, w / h, size),)


NODE_CLASS_MAPPINGS = {
    "InfdLoadModel": InfdLoadModel,
    "InfdSample": InfdSample,
    "InfdRenderRegion": InfdRenderRegion,
    "InfdEncodeImage": InfdEncodeImage,
    "InfdDecodeSDLatent": InfdDecodeSDLatent,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "InfdLoadModel": "Load infd model",
    "InfdSample": "infd Sample (any size)",
    "InfdRenderRegion": "infd Render Region",
    "InfdEncodeImage": "infd Encode Image",
    "InfdDecodeSDLatent": "infd Decode SD Latent (any size)",
}
