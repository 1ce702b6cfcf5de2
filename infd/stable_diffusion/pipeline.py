"""`INFDStableDiffusionPipeline`: Stable Diffusion text-to-image, decoded by a neural field.

Stable Diffusion's text encoder, tokenizer, UNet and scheduler denoise the usual latent
(64x64 for SD 1.x); a converted autoencoder (`infd convert-vae`, then finetuned) decodes
it once to phi and renders it tile by tile at any size and region, so 2048² and 4096²
outputs need no more GPU memory than 512² (only the CPU holds the whole image).

    pipe = load_sd_pipeline("stable-diffusion-v1-5", "runs/sd-ae", device="cuda")
    image = pipe("a lighthouse at dusk", render_size=(2048, 2048), generator=torch.Generator().manual_seed(0)).images[0]
    z = pipe("a lighthouse at dusk", output_type="latent", generator=...).images      # render later:
    zoom = pipe.render(z, (2048, 2048), box=Box(-0.25, -0.25, 0.25, 0.25))

Saved with `save_pretrained` like any diffusers pipeline (model_index.json, autoencoder/,
text_encoder/, tokenizer/, unet/, scheduler/) and loaded back with `from_pretrained`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTokenizer

from infd import geometry
from infd.diffusion import ClassifierFreeGuidance, check_sampling, make_sampler, sample
from infd.diffusion.pipeline import IMAGE_OUTPUT_TYPES, OUTPUT_TYPES, InfdPipelineMixin, to_output
from infd.errors import InfdError, check_choice, quote_error
from infd.geometry import Box, Size
from infd.models import NeuralFieldAutoencoder
from infd.rendering import DEFAULT_TILE, pick_device, render
from infd.store import PIPELINE_INDEX, load_autoencoder

SD_PARTS = ("tokenizer", "text_encoder", "unet", "scheduler")
SD_LAYOUT = "a Stable Diffusion folder in the diffusers layout (model_index.json, text_encoder/, tokenizer/, unet/, scheduler/)"


def check_sd_compatible(autoencoder: NeuralFieldAutoencoder, text_encoder: CLIPTextModel, unet: UNet2DConditionModel) -> None:
    """The UNet must denoise the autoencoder's latents and read the text encoder's states."""
    c = autoencoder.latent_shape[0]
    if unet.config.in_channels != c or unet.config.out_channels != c:
        raise InfdError(
            f"the UNet denoises {unet.config.in_channels}-channel latents but the autoencoder's have {c} channels; "
            "convert the VAE of this Stable Diffusion model (infd convert-vae --vae SD/vae)."
        )
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise InfdError(
            f"the UNet attends to {unet.config.cross_attention_dim}-wide text states but the text encoder gives "
            f"{text_encoder.config.hidden_size}; use the text encoder of the same Stable Diffusion model."
        )


class INFDStableDiffusionPipeline(InfdPipelineMixin, DiffusionPipeline):
    """Text-to-image with Stable Diffusion's UNet on a converted autoencoder's latent (see the module docstring)."""

    model_cpu_offload_seq = "text_encoder->unet->autoencoder"

    def __init__(
        self,
        autoencoder: NeuralFieldAutoencoder,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
    ):
        super().__init__()
        check_sd_compatible(autoencoder, text_encoder, unet)
        self.register_modules(autoencoder=autoencoder, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    def use_sampler(self, name: str) -> INFDStableDiffusionPipeline:
        """Swap the scheduler for sampler `name` (ddim, dpm++, ddpm) of the same noise schedule."""
        self.scheduler = make_sampler(name, self.scheduler.config)
        return self

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> the text encoder's last hidden states (B, tokens, width), as SD conditions on them."""
        max_length = self.tokenizer.model_max_length
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def sample_latents(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Denoise with classifier-free guidance: z (B, C, h, w), the autoencoder's (unscaled) latents, float32.

        B = number of prompts x num_images_per_prompt. `generator` (one, or one per image)
        draws the starting noise; CPU generators give the same images on every device.
        """
        prompts, negatives = self._prompts(prompt, negative_prompt, num_images_per_prompt)
        check_sampling(self.scheduler, num_inference_steps, eta)
        if not guidance_scale >= 0:  # also refuses NaN
            raise InfdError(f"the guidance scale must be 0 or more, got {guidance_scale}.")
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise InfdError(f"pass one generator per image: got {len(generator)} for {len(prompts)} images.")
        text = self.encode_prompt(negatives + prompts if ClassifierFreeGuidance.is_guided(guidance_scale) else prompts)
        denoiser = ClassifierFreeGuidance(self.unet, text, guidance_scale)
        shape = (len(prompts), *self.autoencoder.latent_shape)
        x = sample(denoiser, self.scheduler, shape, num_inference_steps, generator, eta, latents, dtype, progress=self._steps_bar)
        return self.autoencoder.from_diffusion(x)

    @staticmethod
    def _prompts(prompt, negative_prompt, per_prompt: int) -> tuple[list[str], list[str]]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InfdError("pass a prompt: a string or a non-empty list of strings.")
        negatives = [negative_prompt or ""] * len(prompts) if negative_prompt is None or isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise InfdError(f"pass one negative prompt per prompt: got {len(negatives)} for {len(prompts)}.")
        if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt <= 0:
            raise InfdError(f"num_images_per_prompt must be a positive whole number, got {per_prompt!r}.")
        return [p for p in prompts for _ in range(per_prompt)], [n for n in negatives for _ in range(per_prompt)]

    def _check_generation_size(self, height: int | None, width: int | None) -> None:
        side = self.autoencoder.config.input_size
        if (height or side, width or side) != (side, side):
            raise InfdError(
                f"this autoencoder's latent is that of a {side}x{side} image, so height and width must be {side} "
                "(or left out); choose the output's size and aspect with render_size."
            )

    @torch.no_grad()
    def render(
        self,
        z: torch.Tensor,
        render_size: Size = (2048, 2048),
        box: Box | None = None,
        tile: int | Size | None = DEFAULT_TILE,
        dtype: torch.dtype | None = None,
        renderer: str | None = None,
        output_type: str = "pil",
    ):
        """Render latents z (B, C, h, w) at render_size (H, W) over `box`, tile by tile."""
        check_choice(output_type, IMAGE_OUTPUT_TYPES, "output type")
        size = geometry.check_size(render_size, "render size")
        return to_output(render(self.autoencoder, z, size, box=box, tile=tile, dtype=dtype, renderer=renderer), output_type)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        generator: torch.Generator | list[torch.Generator] | None = None,
        render_size: Size = (2048, 2048),
        render_box: Box | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        tile: int | Size | None = DEFAULT_TILE,
        dtype: torch.dtype | None = None,
        renderer: str | None = None,
        return_dict: bool = True,
    ):
        """Generate images for `prompt` and render them at render_size (H, W) over render_box.

        height/width are SD's generation size, which the autoencoder fixes (its input
        size: 512 for SD 1.x); render_size is the output's. output_type: "pil", "np"
        ((B, H, W, 3) in [0, 1]), "pt" ((B, 3, H, W) in [0, 1]) or "latent" (z, to
        `render` later at other sizes or regions). `renderer="fixed"` decodes with the
        original decoder's last conv, bicubic-upsampled: the baseline. Everything is
        checked before denoising starts.
        """
        check_choice(output_type, OUTPUT_TYPES, "output type")
        self._check_generation_size(height, width)
        size = geometry.check_size(render_size, "render size")
        self.autoencoder.get_renderer(renderer)
        z = self.sample_latents(prompt, negative_prompt, num_inference_steps, guidance_scale, generator, num_images_per_prompt, eta, latents, dtype)
        if output_type == "latent":
            images = z
        else:
            images = to_output(render(self.autoencoder, z, size, box=render_box, tile=tile, dtype=dtype, renderer=renderer), output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


# ---------------------------------------------------------------- loading


def load_sd_pipeline(sd: str | os.PathLike, ae: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> INFDStableDiffusionPipeline:
    """SD's text encoder, tokenizer, UNet and scheduler from the local folder `sd`, decoding with the autoencoder `ae`.

    `ae` is a converted (and finetuned) autoencoder: run, checkpoint or pipeline folder.
    Without `ae`, `sd` must be a saved INFDStableDiffusionPipeline folder. Nothing is
    downloaded; every failure is one sentence.
    """
    sd = Path(sd)
    if not sd.is_dir():
        raise InfdError(f"'{sd}' is not a folder; pass {SD_LAYOUT}.")
    device = pick_device(device) if isinstance(device, str) else device
    if ae is None:
        return _load_saved_pipeline(sd).to(device)
    missing = [part for part in SD_PARTS if not (sd / part).is_dir()]
    if missing:
        raise InfdError(f"'{sd}' has no {', '.join(p + '/' for p in missing)}; pass {SD_LAYOUT}.")
    tokenizer_files = [name for name in ("tokenizer.json", "vocab.json") if (sd / "tokenizer" / name).is_file()]
    if not tokenizer_files:  # CLIPTokenizer would "load" an empty folder as a 3-token vocabulary
        raise InfdError(f"could not load the tokenizer from '{sd / 'tokenizer'}': it has neither tokenizer.json nor vocab.json.")
    tokenizer = _load_part(sd / "tokenizer", CLIPTokenizer)
    text_encoder = _load_part(sd / "text_encoder", CLIPTextModel)
    unet = _load_part(sd / "unet", UNet2DConditionModel)
    scheduler = _load_part(sd / "scheduler", scheduler_class(sd / "scheduler"))
    pipe = INFDStableDiffusionPipeline(load_autoencoder(ae), text_encoder, tokenizer, unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_part(folder: Path, cls: type):
    try:
        part = cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as error:
        raise InfdError(f"could not load the {folder.name} ({cls.__name__}) from '{folder}': {quote_error(error)}") from None
    return part.eval() if isinstance(part, torch.nn.Module) else part


def scheduler_class(folder: Path) -> type:
    """The diffusers scheduler class that `folder/scheduler_config.json` names."""
    try:
        name = json.loads((folder / "scheduler_config.json").read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError):
        raise InfdError(f"'{folder}' has no readable scheduler_config.json; pass {SD_LAYOUT}.") from None
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise InfdError(f"'{folder}/scheduler_config.json' names {name!r}, which is not a diffusers scheduler.")
    return cls


def _load_saved_pipeline(folder: Path) -> INFDStableDiffusionPipeline:
    index = folder / PIPELINE_INDEX
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if name != INFDStableDiffusionPipeline.__name__:
        raise InfdError(f"'{folder}' is not a saved INFDStableDiffusionPipeline; pass the converted autoencoder with --ae (ae=...).")
    try:
        pipe = INFDStableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    except InfdError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as error:
        raise InfdError(f"could not load the pipeline from '{folder}': {quote_error(error)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe
