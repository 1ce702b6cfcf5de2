"""Reading the paper's checkpoints: the files its trainer writes, opened safely and cheaply.

The reference code (github yinboc/infd) saves `torch.save({"cfg", "model", "optimizers",
"iter", ...})`, where "model" is the spec it builds the network from, {"name": "infd",
"args": {...}, "sd": state_dict}, and "args" names each component with only the arguments
its yaml gives: every other size comes from the reference code's defaults, collected here
(`*_DEFAULTS`, read from its source). A DM-stage file also names the AE-stage checkpoint it
started from ("load_ckpt"): that path is never opened, the file holds every weight.

Files are read with `torch.load(weights_only=True, mmap=True)`: no code is unpickled and
tensors stay on disk until a converted module copies them.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from infd.errors import InfdError, quote_error

# The reference code's defaults (models/vqgan/utils.py: defaults_vqf4; models/infd_base.py;
# diffusion/utils.py: make_openai_unet; diffusion/unet.py: UNetModel; diffusion/script_util.py:
# create_gaussian_diffusion). A file's "args" override them.
TRUNK_DEFAULTS = dict(
    double_z=False, z_channels=3, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4],
    num_res_blocks=2, attn_resolutions=[], dropout=0.0, give_pre_end=True, resamp_with_conv=True, attn_type="vanilla",
)  # fmt: skip
MODEL_DEFAULTS = dict(z_gaussian=False, quantizer=False, n_embed=None, vq_beta=0.25, z_ddim_eta=1.0, z_dm=None, z_dp=None)
RENDERER_NET_DEFAULTS = dict(out_channels=3, kernel_size=3, normalize=True)
UNET_DEFAULTS = dict(
    image_size=64, in_channels=3, out_channels=3, model_channels=224, channel_mult=[1, 2, 3, 4], num_res_blocks=2,
    attention_resolutions=[8, 4, 2], num_head_channels=32, dropout=0, conv_resample=True, num_classes=None,
    num_heads=1, use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False,
    use_spatial_transformer=False, noisy_z_cond=False,
)  # fmt: skip
DIFFUSION_DEFAULTS = dict(
    steps=1000, learn_sigma=False, noise_schedule="linear", predict_velocity=False, predict_xstart=False,
    rescale_timesteps=False, linear_beta_start=0.0001, linear_beta_end=0.02, _sampling_timestep_respacing="ddim200",
)  # fmt: skip

NOT_A_REFERENCE_FILE = "is not a checkpoint of the paper's code (github yinboc/infd: a torch file with model.name 'infd', its args and its state dict 'sd')"


@dataclass
class ReferenceCheckpoint:
    """What a reference checkpoint holds: resolved component arguments and its state dict (mmapped tensors)."""

    path: Path
    trunk: dict[str, Any]
    z_shape: tuple[int, int, int]
    latent: str  # "vq" or "kl"
    n_embed: int | None
    renderer_hidden: int
    renderer_features: int
    unet: dict[str, Any] | None
    diffusion: dict[str, Any] | None
    ddim_eta: float
    state: dict[str, torch.Tensor] = field(repr=False)
    iteration: int | None = None

    @property
    def stage(self) -> str:
        return "DM" if self.unet is not None else "AE"

    def parameters(self, prefix: str) -> int:
        return sum(math.prod(t.shape) for k, t in self.state.items() if k.startswith(prefix))


def read_reference_checkpoint(path: str | Path) -> ReferenceCheckpoint:
    """Open and check a reference checkpoint; every problem is one sentence (InfdError)."""
    path = Path(path)
    return reference_checkpoint(load_torch_file(path), path)


def reference_checkpoint(raw: Any, path: Path) -> ReferenceCheckpoint:
    """The checkpoint a loaded reference file (its top-level dict) describes; `path` names it in messages."""
    model = raw.get("model") if isinstance(raw, dict) else None
    if not (isinstance(model, dict) and model.get("name") == "infd" and isinstance(model.get("sd"), dict)):
        raise InfdError(f"'{path}' {NOT_A_REFERENCE_FILE}.")
    args = model.get("args") or {}
    state = model["sd"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise InfdError(f"'{path}' {NOT_A_REFERENCE_FILE}: its state dict holds something other than named tensors.")
    merged = {**MODEL_DEFAULTS, **args}
    encoder, decoder = component(args, "encoder", ("encoder_vqf4",)), component(args, "decoder", ("decoder_vqf4",))
    trunk = {**TRUNK_DEFAULTS, **encoder}
    if sizes(encoder) != sizes(decoder):
        raise InfdError(f"'{path}' has an encoder and a decoder of different sizes ({encoder} vs {decoder}); infd converts only matching trunks.")
    renderer = component(args, "renderer", ("renderer_concat_wrapper",))
    if any(renderer.get(k) is not None for k in ("co_pe_dim", "ce_pe_dim", "x_channels")):
        raise InfdError(f"'{path}' uses a renderer with positional encodings or extra inputs ({renderer}); infd converts the released models' plain CLIF.")
    net = renderer.get("net") or {}
    net_args = {**RENDERER_NET_DEFAULTS, **(net.get("args") or {})}
    if net.get("name") != "simple_renderer_net" or net_args["kernel_size"] != 3 or not net_args["normalize"] or net_args["out_channels"] != 3:
        raise InfdError(f"'{path}' uses the renderer net {net.get('name')!r} with {net_args}; infd converts the released models' 'simple_renderer_net' (3x3, GroupNorm).")
    if "hidden_channels" not in net_args:
        raise InfdError(f"'{path}' does not give its renderer's hidden_channels; it {NOT_A_REFERENCE_FILE}.")
    z_shape = merged.get("z_shape")
    if not (isinstance(z_shape, (list, tuple)) and len(z_shape) == 3 and all(isinstance(v, int) and v > 0 for v in z_shape)):
        raise InfdError(f"'{path}' has no valid z_shape ({z_shape!r}); it {NOT_A_REFERENCE_FILE}.")
    if merged["z_gaussian"] == bool(merged["quantizer"]):
        raise InfdError(f"'{path}' has {'both a' if merged['quantizer'] else 'neither a'} quantizer {'and' if merged['quantizer'] else 'nor'} a Gaussian latent; infd converts VQ or KL latents.")
    unet = diffusion = None
    if merged["z_dm"] is not None:
        unet = {**UNET_DEFAULTS, **component(args, "z_dm", ("openai_unet",))}
        diffusion = {**DIFFUSION_DEFAULTS, **(merged["z_dp"] or {})}
        check_unet(path, unet, diffusion)
    iteration = raw.get("iter")
    return ReferenceCheckpoint(
        path=path,
        trunk=trunk,
        z_shape=tuple(z_shape),
        latent="vq" if merged["quantizer"] else "kl",
        n_embed=merged["n_embed"],
        renderer_hidden=int(net_args["hidden_channels"]),
        renderer_features=int(renderer.get("z_dec_channels", trunk["ch"] * trunk["ch_mult"][0])),
        unet=unet,
        diffusion=diffusion,
        ddim_eta=float(merged["z_ddim_eta"]),
        state=state,
        iteration=iteration if isinstance(iteration, int) else None,
    )


def sizes(trunk_args: dict) -> dict:
    """The arguments that set a trunk's shapes (the encoder's and the decoder's must agree)."""
    keys = ("z_channels", "resolution", "in_channels", "ch", "ch_mult", "num_res_blocks", "attn_resolutions")
    merged = {**TRUNK_DEFAULTS, **trunk_args}
    return {k: list(merged[k]) if isinstance(merged[k], (list, tuple)) else merged[k] for k in keys}


def component(args: dict, name: str, supported: tuple[str, ...]) -> dict[str, Any]:
    """The arguments the file gives component `name` (a {"name", "args"} spec), checking its kind."""
    spec = args.get(name)
    if not isinstance(spec, dict) or "name" not in spec:
        raise InfdError(f"the checkpoint's model has no '{name}' component; it {NOT_A_REFERENCE_FILE}.")
    if spec["name"] not in supported:
        raise InfdError(f"the checkpoint's {name} is {spec['name']!r}; infd converts {' or '.join(map(repr, supported))} (the released models).")
    return dict(spec.get("args") or {})


def check_unet(path: Path, unet: dict, diffusion: dict) -> None:
    unsupported = {
        "resblock_updown": unet["resblock_updown"],
        "use_new_attention_order": unet["use_new_attention_order"],
        "use_spatial_transformer": unet["use_spatial_transformer"],
        "num_classes": unet["num_classes"] is not None,
        "noisy_z_cond": unet["noisy_z_cond"],
        "num_head_channels -1 (a fixed number of heads)": unet["num_head_channels"] == -1,
        "learn_sigma": diffusion["learn_sigma"],
        "a cosine noise schedule": diffusion["noise_schedule"] != "linear",
        "rescale_timesteps": diffusion["rescale_timesteps"],
    }
    used = [name for name, on in unsupported.items() if on]
    if used:
        raise InfdError(f"'{path}' uses {', '.join(used)} in its diffusion model; infd converts the released models' unconditional UNet and linear schedule.")


def load_torch_file(path: Path) -> Any:
    """torch.load without running code and without reading the tensors into memory."""
    if not path.is_file():
        raise InfdError(f"'{path}' does not exist or is not a file; pass a checkpoint written by the paper's code (e.g. dm_ffhq's last-model.pth).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise InfdError(f"'{path}' holds objects other than tensors and plain values, which infd does not unpickle ({quote_error(error)}); it {NOT_A_REFERENCE_FILE}.") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise InfdError(f"'{path}' could not be read as a torch checkpoint (truncated or not a checkpoint: {quote_error(error)}).") from None
