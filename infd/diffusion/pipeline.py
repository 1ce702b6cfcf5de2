"""`INFDPipeline`: latent diffusion whose samples render at any resolution, region and aspect.

A diffusers pipeline of three components, saved as diffusers saves any pipeline:

    PIPE/model_index.json     component classes
    PIPE/autoencoder/         infd NeuralFieldAutoencoder (its scaling_factor is the LDM's)
    PIPE/unet/                diffusers UNet2DModel on scaled latents
    PIPE/scheduler/           the training noise schedule (DDPMScheduler config)

    pipe = INFDPipeline.from_pretrained("runs/ldm/checkpoints/step_0100000")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)   # or pipe.use_sampler("dpm++")
    images = pipe(num_images=4, height=2048, width=2048, generator=torch.Generator().manual_seed(0)).images
    z = pipe(num_images=1, output_type="latent", generator=...).images   # what the autoencoder decodes
    zoom = pipe.render(z, 1024, 1024, box=Box(-0.25, -0.25, 0.25, 0.25))

Sampling happens once at the latent's fixed size; only rendering depends on the output
size. `renderer="fixed"` decodes the same latents with the autoencoder's fixed-resolution
head and upsamples them (bicubic, or Lanczos with upsample="lanczos"): the baseline.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from infd import geometry
from infd.diffusion.sampling import sample
from infd.diffusion.schedulers import check_sampling, make_sampler
from infd.errors import InfdError, check_choice, quote_error
from infd.files import atomic_path
from infd.geometry import Box, Size
from infd.images import lanczos_resize
from infd.models import NeuralFieldAutoencoder
from infd.rendering import DEFAULT_TILE, ArraySink, Sink, check_latent, pick_device, render
from infd.store import find_pipeline

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEFAULT_STEPS = 50  # sampling steps of a pipeline that names none
IMAGE_OUTPUT_TYPES = OUTPUT_TYPES[:3]  # what `render` returns
UPSAMPLERS = ("bicubic", "lanczos")


def check_compatible(autoencoder: NeuralFieldAutoencoder, unet: UNet2DModel) -> None:
    """The UNet must denoise latents of exactly the autoencoder's shape."""
    c, h, w = autoencoder.latent_shape
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
    if cfg.in_channels != c or cfg.out_channels != c or size not in (h, (h, w)):
        raise InfdError(
            f"the UNet denoises {cfg.in_channels}-channel latents of size {size} but the autoencoder's latents are "
            f"{c}x{h}x{w}; use the autoencoder the LDM was trained with."
        )


def check_upsample(renderer: str | None, upsample: str) -> None:
    check_choice(upsample, UPSAMPLERS, "upsampling")
    if upsample == "lanczos" and renderer != "fixed":
        raise InfdError("Lanczos upsampling applies to the fixed-resolution renderer only; add --renderer fixed.")


def lanczos_render(autoencoder: NeuralFieldAutoencoder, z: torch.Tensor, size: Size, box: Box | None = None) -> torch.Tensor:
    """The fixed head's image at its native resolution, Lanczos-resampled to `size` over `box`.

    z: (B, C, h, w) -> (B, 3, H, W) float32 in [0, 1]. Resampling runs in float per
    channel (PIL mode "F"), so nothing is quantised before the final image.
    """
    box = geometry.check_inside_image(box or Box.full(), "the box of a Lanczos-upsampled render")
    native = autoencoder.feature_shape[1:]
    return lanczos_resize(render(autoencoder, z, native, renderer="fixed", tile=None), size, box)


def render_latents(
    autoencoder: NeuralFieldAutoencoder,
    z: torch.Tensor,
    size: Size,
    box: Box | None = None,
    renderer: str | None = None,
    upsample: str = "bicubic",
    tile: int | Size | None = DEFAULT_TILE,
    dtype: torch.dtype | None = None,
    sink: Sink | None = None,
    progress: bool = False,
) -> torch.Tensor | None:
    """Render z (B, C, h, w) at `size` with the chosen renderer: (B, 3, H, W) in [0, 1], or
    None when a `sink` takes the tiles (Lanczos, a whole-image resampling, gives it one)."""
    check_upsample(renderer, upsample)
    if upsample != "lanczos":
        return render(autoencoder, z, size, box=box, tile=tile, dtype=dtype, renderer=renderer, sink=sink, progress=progress)
    images = lanczos_render(autoencoder, check_latent(autoencoder, z), size, box)
    if sink is None:
        return images
    sink(geometry.Window(0, 0, *images.shape[-2:]), images)
    return None


def render_to_array(
    autoencoder: NeuralFieldAutoencoder,
    z: torch.Tensor,
    size: Size,
    box: Box | None = None,
    renderer: str | None = None,
    upsample: str = "bicubic",
    tile: int | Size | None = DEFAULT_TILE,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> np.ndarray:
    """One latent z (1, C, h, w) as an (H, W, 3) uint8 image, tile by tile (memory flat in H x W).

    `infd sample` and `infd render` both go through here, so a saved z renders to the
    very pixels of the image it was saved with.
    """
    h, w = geometry.check_size(size)
    canvas = np.empty((h, w, 3), dtype=np.uint8)
    render_latents(autoencoder, z, (h, w), box, renderer, upsample, tile, dtype, sink=ArraySink(canvas), progress=progress)
    return canvas


def pipeline_module_name(cls: type) -> str:
    """The custom-pipeline file of `cls`'s folders: INFDPipeline -> infd_pipeline (.py)."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", cls.__name__.replace("INFD", "Infd")).lower()


def write_pipeline_module(folder: str | os.PathLike, cls: type) -> None:
    """`folder/infd_pipeline.py` (for INFDPipeline), naming `cls`, so that diffusers' own loader opens the folder.

    diffusers finds pipeline classes in its own namespace or, through its custom-pipeline
    mechanism, in a file of the folder; this one only imports infd's class (infd must be
    installed): `DiffusionPipeline.from_pretrained(folder, custom_pipeline="infd_pipeline",
    trust_remote_code=True)`. Each class has its own file name, since diffusers keeps one
    module per name: two folder kinds loaded in one process never share one.
    """
    name = pipeline_module_name(cls)
    text = (
        f'"""diffusers\' custom-pipeline entry of this folder; the pipeline class is infd\'s own (pip install infd).\n\n'
        f'    DiffusionPipeline.from_pretrained(folder, custom_pipeline="{name}", trust_remote_code=True)\n'
        f'"""\n\nfrom {cls.__module__} import {cls.__name__}  # noqa: F401\n'
    )
    with atomic_path(Path(folder) / f"{name}.py") as tmp:
        tmp.write_text(text)


class InfdPipelineMixin:
    """What infd's diffusers pipelines share: a progress bar over the sampler's steps, and
    folders that diffusers' own `DiffusionPipeline.from_pretrained` loads (`write_pipeline_module`)."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        write_pipeline_module(save_directory, type(self))

    def _steps_bar(self, timesteps):
        return self.progress_bar(iterable=timesteps)


class INFDPipeline(InfdPipelineMixin, DiffusionPipeline):
    """Unconditional latent diffusion on a neural-field latent (see the module docstring).

    Components: `autoencoder` (NeuralFieldAutoencoder; its config's scaling_factor maps
    the UNet's latents back to z), `unet` (UNet2DModel) and `scheduler` (any diffusers
    scheduler of the training noise schedule; swap it like in any pipeline).
    """

    model_cpu_offload_seq = "unet->autoencoder"

    def __init__(
        self,
        autoencoder: NeuralFieldAutoencoder,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        sampling_steps: int | None = None,
        sampling_eta: float | None = None,
    ):
        super().__init__()
        check_compatible(autoencoder, unet)
        self.register_modules(autoencoder=autoencoder, unet=unet, scheduler=scheduler)
        # The sampler's defaults, saved in model_index.json: a converted model keeps the sampler it was
        # evaluated with (the paper's: DDIM, 200 steps, eta 1); None: DEFAULT_STEPS and eta 0.
        self.register_to_config(sampling_steps=sampling_steps, sampling_eta=sampling_eta)

    @property
    def default_steps(self) -> int:
        return int(self.config.get("sampling_steps") or DEFAULT_STEPS)

    @property
    def default_eta(self) -> float:
        return float(self.config.get("sampling_eta") or 0.0)

    @property
    def scaling_factor(self) -> float:
        return float(self.autoencoder.config.scaling_factor)

    def use_sampler(self, name: str) -> INFDPipeline:
        """Swap the scheduler for sampler `name` (ddim, dpm++, ddpm) of the same noise schedule."""
        self.scheduler = make_sampler(name, self.scheduler.config)
        return self

    @torch.no_grad()
    def sample_latents(
        self,
        num_images: int = 1,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float | None = None,
        latents: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Sample z (num_images, C, h, w): the autoencoder's latents (unscaled), float32.

        num_inference_steps and eta default to the pipeline's own (`default_steps`, `default_eta`).
        """
        num_inference_steps = self.default_steps if num_inference_steps is None else num_inference_steps
        eta = self.default_eta if eta is None else eta
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images <= 0:
            raise InfdError(f"num_images must be a positive whole number, got {num_images!r}.")
        if isinstance(generator, list) and len(generator) != num_images:
            raise InfdError(f"pass one generator per image: got {len(generator)} for {num_images} images.")
        shape = (num_images, *self.autoencoder.latent_shape)
        x = sample(self.unet, self.scheduler, shape, num_inference_steps, generator, eta, latents, dtype, progress=self._steps_bar)
        return self.autoencoder.from_diffusion(x)

    @torch.no_grad()
    def render(
        self,
        z: torch.Tensor,
        height: int | None = None,
        width: int | None = None,
        box: Box | None = None,
        renderer: str | None = None,
        upsample: str = "bicubic",
        tile: int | Size | None = DEFAULT_TILE,
        dtype: torch.dtype | None = None,
        output_type: str = "pil",
    ):
        """Render latents z (B, C, h, w) at height x width (default: the encoder's input size)."""
        check_choice(output_type, IMAGE_OUTPUT_TYPES, "output type")
        size = self._size(height, width)
        images = render_latents(self.autoencoder, z, size, box, renderer, upsample, tile, dtype)
        return to_output(images, output_type)

    def _size(self, height: int | None, width: int | None) -> Size:
        default = self.autoencoder.config.input_size
        return geometry.check_size((default if height is None else height, default if width is None else width), "image size")

    @torch.no_grad()
    def __call__(
        self,
        num_images: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        box: Box | None = None,
        renderer: str | None = None,
        eta: float | None = None,
        latents: torch.Tensor | None = None,
        upsample: str = "bicubic",
        tile: int | Size | None = DEFAULT_TILE,
        dtype: torch.dtype | None = None,
        return_dict: bool = True,
    ):
        """Sample `num_images` latents and render them at height x width over `box`.

        output_type: "pil" (list of PIL images), "np" ((B, H, W, 3) float32 in [0, 1]),
        "pt" ((B, 3, H, W) float32 in [0, 1]) or "latent" (z (B, C, h, w), what the
        autoencoder decodes; render it later with `render`). `latents` is the starting
        noise (B, C, h, w) instead of drawing it from `generator`. Everything is checked
        before sampling starts.
        """
        check_choice(output_type, OUTPUT_TYPES, "output type")
        size = self._size(height, width)
        num_inference_steps = self.default_steps if num_inference_steps is None else num_inference_steps
        eta = self.default_eta if eta is None else eta
        check_sampling(self.scheduler, num_inference_steps, eta)
        if output_type != "latent":
            check_upsample(renderer, upsample)
            self.autoencoder.get_renderer(renderer)
        z = self.sample_latents(num_images, num_inference_steps, generator, eta, latents, dtype)
        if output_type == "latent":
            images = z
        else:
            images = to_output(render_latents(self.autoencoder, z, size, box, renderer, upsample, tile, dtype), output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def to_output(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) in [0, 1] -> the pipeline's output type."""
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).contiguous().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)) for a in array]


# ---------------------------------------------------------------- loading


def load_pipeline(path: str | os.PathLike, device: str | torch.device = "cpu") -> INFDPipeline:
    """Load a pipeline folder or an LDM run's newest checkpoint onto `device`; errors are one sentence."""
    folder = find_pipeline(path)
    try:
        pipe = INFDPipeline.from_pretrained(folder)
    except InfdError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as error:
        reason = quote_error(error)
        raise InfdError(f"could not load the pipeline from '{folder}': {reason}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(pick_device(device) if isinstance(device, str) else device)
