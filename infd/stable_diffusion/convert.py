"""Convert a latent diffusion model's autoencoder into a neural-field autoencoder.

Stable Diffusion's `AutoencoderKL` (and the LDM `VQModel`s, e.g. VQ-f4) are built from
the same diffusers `Encoder`/`Decoder` blocks as infd's autoencoder, so the conversion
keeps every weight where it is:

    encoder, quant_conv, (quantize,) post_quant_conv   ->  the same modules, bit for bit
    decoder up to conv_norm_out + conv_act             ->  the decoder trunk; its output is phi
    decoder.conv_out (the last RGB conv)               ->  renderer.base.head
    (new)                                              ->  CLIF, its output conv at zero

phi is the input of the original last conv, so `ResidualCLIFRenderer` starts as exactly
the original decoder, bicubic-upsampled: at the original output size the converted model
renders the original decoder's image, and finetuning (`infd train-ae --init`, encoder
frozen so the LDM's latent space stays valid) only has to teach CLIF the detail that
upsampling lacks. The GroupNorm before the last conv stays in the trunk: it runs once
per latent at phi's resolution, before any tiling, so rendering stays seam-free.

    vae = load_ldm_autoencoder("stable-diffusion-v1-5/vae")        # folder or .safetensors
    model = convert_autoencoder(vae)                               # NeuralFieldAutoencoder
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel

from infd.errors import InfdError, quote_error
from infd.files import atomic_directory, check_output_path, check_replaceable
from infd.models import NeuralFieldAutoencoder
from infd.training.autoencoder import AETrainConfig

SOURCE_CLASSES = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
# The LDM default; SDXL's VAE uses 0.13025 (pass scaling_factor for single files of other models).
SD_SCALING_FACTOR = 0.18215
FINETUNE_CONFIG = "finetune.json"
# Renderer width of a converted model: phi has the decoder's first block width (128 for SD),
# and at 2048² the renderer, not the trunk, does most of the work, so it stays that narrow.
CONVERTED_RENDERER_HIDDEN = 128


# ---------------------------------------------------------------- loading the original


def load_ldm_autoencoder(path: str | Path, scaling_factor: float | None = None) -> AutoencoderKL | VQModel:
    """A diffusers AutoencoderKL/VQModel from a local folder, or an AutoencoderKL from one .safetensors.

    `path`: the autoencoder's folder (config.json + weights), a diffusers pipeline folder
    (its vae/), or a single .safetensors in the original LDM/SD layout (converted by
    diffusers' own single-file loader, with the architecture read off the tensor shapes).
    `scaling_factor` overrides the one recorded (single files record none: SD's 0.18215).
    """
    path = Path(path)
    if not path.exists():
        raise InfdError(f"'{path}' does not exist; pass a diffusers AutoencoderKL folder (e.g. the vae/ of a Stable Diffusion model) or a .safetensors VAE.")
    if path.is_file():
        vae = load_single_file_vae(path, scaling_factor or SD_SCALING_FACTOR)
    else:
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        cls = source_class(path)
        try:
            vae = cls.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise InfdError(f"could not load the {cls.__name__} in '{path}': {quote_error(error)}") from None
        if scaling_factor is not None:
            vae.register_to_config(scaling_factor=scaling_factor)
    return vae.eval()


def source_class(folder: Path) -> type:
    """AutoencoderKL or VQModel, as the folder's config.json names it."""
    hint = "pass the vae/ folder of a Stable Diffusion model, a diffusers AutoencoderKL or VQModel folder, or a .safetensors VAE"
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except FileNotFoundError:
        raise InfdError(f"'{folder}' has no config.json; {hint}.") from None
    except (json.JSONDecodeError, AttributeError):
        raise InfdError(f"'{folder}/config.json' is not a diffusers model config; {hint}.") from None
    if name not in SOURCE_CLASSES:
        raise InfdError(f"'{folder}' holds a {name or 'model of no known class'}, not an AutoencoderKL or VQModel; {hint}.")
    return SOURCE_CLASSES[name]


def load_single_file_vae(path: Path, scaling_factor: float) -> AutoencoderKL:
    if path.suffix != ".safetensors":
        raise InfdError(f"'{path}' is not a .safetensors file; convert pickled .ckpt files to safetensors first (infd never unpickles).")
    from safetensors.torch import load_file

    try:
        checkpoint = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for garbage
        raise InfdError(f"'{path}' is not a readable safetensors file ({type(error).__name__}).") from None
    original_config = ldm_vae_config(checkpoint, scaling_factor)
    try:
        return AutoencoderKL.from_single_file(checkpoint, original_config=original_config, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise InfdError(f"could not convert '{path}' with diffusers' single-file loader: {quote_error(error)}") from None


def ldm_vae_config(checkpoint: dict[str, torch.Tensor], scaling_factor: float) -> dict:
    """The original LDM config (as diffusers' single-file loader reads it) that fits these weights.

    An original-layout file has no config; its architecture is read off the tensors:
    channel widths from the encoder's resnets, depth from the number of down levels.
    """
    prefix = next((p for p in ("first_stage_model.", "vae.", "") if f"{p}encoder.conv_in.weight" in checkpoint), None)
    if prefix is None or f"{prefix}decoder.conv_out.weight" not in checkpoint:
        raise InfdError("the .safetensors file holds no VAE in the original Stable Diffusion layout (no encoder.conv_in / decoder.conv_out weights).")
    down = r"encoder\.down\.(\d+)\.block\.(\d+)\."
    levels = {int(m[1]) for key in checkpoint if (m := re.match(prefix.replace(".", r"\.") + down, key))}
    blocks = {int(m[2]) for key in checkpoint if (m := re.match(prefix.replace(".", r"\.") + down, key)) and m[1] == "0"}
    conv_in = checkpoint[f"{prefix}encoder.conv_in.weight"]
    ch = conv_in.shape[0]
    widths = [checkpoint[f"{prefix}encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in sorted(levels)]
    ddconfig = {
        "ch": ch,
        "ch_mult": [w // ch for w in widths],
        "num_res_blocks": len(blocks),
        "z_channels": checkpoint[f"{prefix}decoder.conv_in.weight"].shape[1],
        "in_channels": conv_in.shape[1],
        "out_ch": checkpoint[f"{prefix}decoder.conv_out.weight"].shape[0],
    }
    return {"model": {"params": {"scale_factor": scaling_factor, "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}


# ---------------------------------------------------------------- conversion


def converted_config(vae: AutoencoderKL | VQModel, input_size: int | None = None, renderer_hidden: int = CONVERTED_RENDERER_HIDDEN, renderer_blocks: int = 2) -> dict:
    """NeuralFieldAutoencoder arguments with the original's architecture, latent and scaling."""
    cfg = vae.config
    kind = type(vae).__name__
    problems = []
    if cfg.act_fn != "silu":
        problems.append(f"activation {cfg.act_fn} (infd's trunk uses silu)")
    if set(cfg.down_block_types) != {"DownEncoderBlock2D"} or set(cfg.up_block_types) != {"UpDecoderBlock2D"}:
        problems.append("blocks other than DownEncoderBlock2D/UpDecoderBlock2D")
    if cfg.in_channels != 3 or cfg.out_channels != 3:
        problems.append(f"{cfg.in_channels} input / {cfg.out_channels} output channels (RGB needs 3)")
    if kind == "VQModel" and cfg.norm_type != "group":
        problems.append(f"{cfg.norm_type} normalisation in the decoder")
    if kind == "VQModel" and (cfg.vq_embed_dim or cfg.latent_channels) != cfg.latent_channels:
        problems.append(f"a codebook of dimension {cfg.vq_embed_dim} != {cfg.latent_channels} latent channels")
    if problems:
        raise InfdError(f"this {kind} cannot be converted: it has {'; '.join(problems)}.")
    sample_size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return dict(
        latent_channels=cfg.latent_channels,
        input_size=int(input_size or sample_size),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_block_add_attention,
        latent_type="kl" if kind == "AutoencoderKL" else "vq",
        vq_codebook_size=cfg.num_vq_embeddings if kind == "VQModel" else 8192,
        renderer_type="clif",
        renderer_hidden=renderer_hidden,
        renderer_blocks=renderer_blocks,
        residual_renderer=True,
        scaling_factor=float(cfg.scaling_factor),
        shift_factor=float(getattr(cfg, "shift_factor", None) or 0.0),
    )


def converted_state(vae: AutoencoderKL | VQModel) -> dict[str, torch.Tensor]:
    """The original's weights under the converted model's names (all but the new CLIF's)."""
    renames = {"decoder.conv_out.": "renderer.base.head.", "quantize.": "quantizer."}
    state = {}
    for key, value in vae.state_dict().items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        state[renames[prefix] + key[len(prefix) :] if prefix else key] = value
    # AutoencoderKLs without quant convs (use_quant_conv=False) get identity 1x1 convs: the same map.
    for name, channels in (("quant_conv", 2 * vae.config.latent_channels), ("post_quant_conv", vae.config.latent_channels)):
        if f"{name}.weight" not in state:
            state[f"{name}.weight"] = torch.eye(channels)[:, :, None, None]
            state[f"{name}.bias"] = torch.zeros(channels)
    return state


def convert_autoencoder(
    vae: AutoencoderKL | VQModel,
    input_size: int | None = None,
    renderer_hidden: int = CONVERTED_RENDERER_HIDDEN,
    renderer_blocks: int = 2,
    seed: int = 0,
) -> NeuralFieldAutoencoder:
    """The neural-field autoencoder of `vae` (see the module docstring); CLIF starts at zero output.

    `input_size` is the encoder's fixed input (default: the original's sample_size, 512
    for SD 1.x, whose latent is then 64x64); `seed` initialises the new CLIF weights.
    """
    torch.manual_seed(seed)
    model = NeuralFieldAutoencoder(**converted_config(vae, input_size, renderer_hidden, renderer_blocks))
    state = converted_state(vae)
    missing, unexpected = model.load_state_dict(state, strict=False)
    new = [key for key in missing if not key.startswith("renderer.") or key.startswith("renderer.base.")]
    if new or unexpected:
        raise InfdError(f"the {type(vae).__name__}'s weights do not fit the converted model (missing {new[:3]}, unexpected {unexpected[:3]}).")
    return model.eval()


# ---------------------------------------------------------------- finetuning


def finetune_config(model: NeuralFieldAutoencoder, init: str | Path, freeze_encoder: bool = True, freeze_decoder: bool = False) -> AETrainConfig:
    """The mixed-resolution finetuning of a converted model on one 80 GB GPU (configs/ae-sd-finetune.json).

    The encoder stays frozen by default, so latents (and an LDM trained on them) stay
    valid; `freeze_decoder` trains CLIF alone.
    """
    return AETrainConfig.from_dict(
        {
            "data": {"input_size": model.config.input_size, "crop_size": 256, "aspect": "squash"},
            "steps": 50_000,
            "batch_size": 8,
            "lr": 5e-5,
            "gan_weight": 0.5,
            "gan_start": 5_000,
            "ema_decay": 0.999,
            "num_workers": 8,
            "checkpoint_every": 2_000,
            "sample_every": 2_000,
            "init": str(init),
            "freeze_encoder": freeze_encoder,
            "freeze_decoder": freeze_decoder,
        }
    )


# What `convert_vae` writes in its --out: what --overwrite may replace.
CONVERTED_LAYOUT = {r"config\.json|" + re.escape(FINETUNE_CONFIG) + r"|[\w.-]+\.safetensors": None}


def convert_vae(
    source: str | Path,
    out: str | Path,
    input_size: int | None = None,
    scaling_factor: float | None = None,
    renderer_hidden: int = CONVERTED_RENDERER_HIDDEN,
    renderer_blocks: int = 2,
    freeze_encoder: bool = True,
    freeze_decoder: bool = False,
    overwrite: bool = False,
) -> NeuralFieldAutoencoder:
    """Convert the autoencoder at `source` and write it to `out` (atomically).

    `out` is a checkpoint folder (config.json + safetensors) that every `--ckpt`/`--ae`/
    `--init` accepts, with `finetune.json`, the training config to continue from it.
    An earlier conversion there is replaced only with `overwrite`, anything else never.
    """
    out = Path(out)
    check_output_path(out, folder=True)
    check_replaceable(out, CONVERTED_LAYOUT, overwrite, "infd convert-vae")
    if scaling_factor is not None and not (math.isfinite(scaling_factor) and scaling_factor > 0):
        raise InfdError(f"the scaling factor must be a positive finite number, got {scaling_factor}.")
    if input_size is not None and input_size <= 0:
        raise InfdError(f"the input size must be a positive number of pixels, got {input_size}.")
    model = convert_autoencoder(load_ldm_autoencoder(source, scaling_factor), input_size, renderer_hidden, renderer_blocks)
    config = finetune_config(model, out.resolve(), freeze_encoder, freeze_decoder)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / FINETUNE_CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return model
