"""The paper's released models as infd pipelines: one converter from the reference code's names to ours.

    convert_official("dm_ffhq/last-model.pth", "ffhq-infd")     # -> model_index.json, autoencoder/, unet/, scheduler/

Each reference component becomes an infd or diffusers module, so the converted folder is an
ordinary `INFDPipeline` (or, for an AE-stage file, an autoencoder in a pipeline folder):

| reference (models/, diffusion/)                       | here                                                        |
|-------------------------------------------------------|-------------------------------------------------------------|
| encoder_vqf4 (VQGAN Encoder + 1x1 conv)               | NeuralFieldAutoencoder.encoder (diffusers Encoder) + quant_conv |
| VectorQuantizer, 8192 x 3, first index on ties        | FirstIndexQuantizer (`vq_distance="expanded"`)              |
| decoder_vqf4 (1x1 conv + Decoder, `give_pre_end`)     | post_quant_conv + diffusers Decoder without its last norm, SiLU and conv (`decoder_norm_out=False`) |
| renderer_concat_wrapper + simple_renderer_net         | NormalizedCLIFRenderer (`renderer_type="clif_groupnorm"`)    |
| openai_unet (guided-diffusion UNetModel)              | diffusers UNet2DModel                                        |
| SpacedDiffusion "ddim200", eta 1                      | diffusers DDIMScheduler ("leading" spacing, final alpha 1), the pipeline's default 200 steps, eta 1 |
| PIL Lanczos resize of the input                       | `input_resampling="lanczos"`                                 |

The VQGAN trunk's names are mapped by diffusers' own LDM-VAE converter; the UNet's by
`unet_state`, which splits the attention's `qkv` weight (q, k and v interleaved per head).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import diffusers
import torch
from diffusers import DDIMScheduler, UNet2DModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from infd.errors import InfdError
from infd.files import atomic_directory, check_output_path, check_replaceable
from infd.models import NeuralFieldAutoencoder
from infd.official.checkpoint import ReferenceCheckpoint, read_reference_checkpoint

PIPELINE_LAYOUT = {
    r"model_index\.json|infd_pipeline\.py": None,
    r"autoencoder|unet|scheduler": {r"[\w.-]+\.json|[\w.-]+\.safetensors": None},
}
IGNORED_PREFIXES = ("perc_loss.", "disc.")  # training-only: the LPIPS network and the discriminator


# ---------------------------------------------------------------- the autoencoder


def autoencoder_config(ckpt: ReferenceCheckpoint) -> dict:
    """NeuralFieldAutoencoder options that rebuild the reference autoencoder."""
    t = ckpt.trunk
    levels = len(t["ch_mult"])
    c, h, w = ckpt.z_shape
    if t["attn_resolutions"]:
        raise InfdError(f"'{ckpt.path}' has attention inside its trunk's levels (attn_resolutions {t['attn_resolutions']}); infd converts the released trunks, which have none.")
    if c != t["z_channels"] or h != w:
        raise InfdError(f"'{ckpt.path}' has z_shape {list(ckpt.z_shape)} but z_channels {t['z_channels']}; infd converts square latents of the trunk's channels.")
    if not t["give_pre_end"]:
        raise InfdError(f"'{ckpt.path}' has a decoder that outputs RGB (give_pre_end false), which is no feature map for a renderer.")
    features = t["ch"] * t["ch_mult"][0]
    if ckpt.renderer_features != features:
        raise InfdError(f"'{ckpt.path}' feeds its renderer {ckpt.renderer_features} channels but its decoder makes {features}.")
    if ckpt.latent == "kl" and not t["double_z"]:
        raise InfdError(f"'{ckpt.path}' has a Gaussian latent without double_z; it cannot be a trained KL autoencoder.")
    return dict(
        in_channels=t["in_channels"],
        latent_channels=c,
        input_size=h * 2 ** (levels - 1),
        block_out_channels=tuple(t["ch"] * m for m in t["ch_mult"]),
        layers_per_block=t["num_res_blocks"],
        norm_num_groups=32,
        mid_block_add_attention=True,
        latent_type=ckpt.latent,
        vq_codebook_size=ckpt.n_embed or 8192,
        renderer_type="clif_groupnorm",
        renderer_hidden=ckpt.renderer_hidden,
        renderer_blocks=2,
        renderer_norm_groups=32,
        renderer_statistics="scale",
        decoder_norm_out=False,
        vq_distance="expanded",
        input_resampling="lanczos",
    )


RENDERER_KEYS = [
    (r"renderer\.net\.model\.0\.", "renderer.conv_in."),
    (r"renderer\.net\.model\.(\d+)\.", lambda m: f"renderer.blocks.{int(m.group(1)) - 1}."),
    (r"renderer\.net\.", "renderer."),
]


def autoencoder_state(ckpt: ReferenceCheckpoint, config: dict) -> dict[str, torch.Tensor]:
    """The reference autoencoder's weights under NeuralFieldAutoencoder's names."""
    ldm = {}
    for prefix, new in (("encoder.0.", "encoder."), ("encoder.1.", "quant_conv."), ("decoder.0.", "post_quant_conv."), ("decoder.1.", "decoder.")):
        ldm.update({new + k[len(prefix) :]: v for k, v in ckpt.state.items() if k.startswith(prefix)})
    levels = len(config["block_out_channels"])
    state = convert_ldm_vae_checkpoint(ldm, {"down_block_types": [None] * levels, "up_block_types": [None] * levels})
    if "quantizer.embedding.weight" in ckpt.state:
        state["quantizer.embedding.weight"] = ckpt.state["quantizer.embedding.weight"]
    for key, value in ckpt.state.items():
        if key.startswith("renderer."):
            for pattern, replacement in RENDERER_KEYS:
                if re.match(pattern, key):
                    state[re.sub(pattern, replacement, key, count=1)] = value
                    break
    return state


# ---------------------------------------------------------------- the diffusion model


def unet_config(ckpt: ReferenceCheckpoint) -> dict:
    """diffusers UNet2DModel options that rebuild the reference's openai UNet."""
    u = ckpt.unet
    levels = range(len(u["channel_mult"]))
    attention = [2**level in u["attention_resolutions"] for level in levels]
    return dict(
        sample_size=u["image_size"],
        in_channels=u["in_channels"],
        out_channels=u["out_channels"],
        block_out_channels=tuple(int(u["model_channels"] * m) for m in u["channel_mult"]),
        layers_per_block=u["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=u["num_head_channels"],
        norm_num_groups=32,
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if u["use_scale_shift_norm"] else "default",
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        dropout=float(u["dropout"]),
        add_attention=True,
    )


RESBLOCK_KEYS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def unet_state(state: dict[str, torch.Tensor], prefix: str, config: dict) -> dict[str, torch.Tensor]:
    """The openai UNet's weights under `prefix` ("z_dm." or "z_dm_ema.") under UNet2DModel's names."""
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    places = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2", "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    resnets, attentions = {}, {}
    levels, per_level = len(config["block_out_channels"]), config["layers_per_block"]
    has_attention = [kind.startswith("Attn") for kind in config["down_block_types"]]
    n = 1
    for level in range(levels):
        for r in range(per_level):
            resnets[f"input_blocks.{n}.0"] = f"down_blocks.{level}.resnets.{r}"
            if has_attention[level]:
                attentions[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{r}"
            n += 1
        if level < levels - 1:
            places[f"input_blocks.{n}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            n += 1
    resnets["middle_block.0"], attentions["middle_block.1"], resnets["middle_block.2"] = "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"
    n = 0
    for up, level in enumerate(reversed(range(levels))):
        for r in range(per_level + 1):
            resnets[f"output_blocks.{n}.0"] = f"up_blocks.{up}.resnets.{r}"
            if has_attention[level]:
                attentions[f"output_blocks.{n}.1"] = f"up_blocks.{up}.attentions.{r}"
            if level > 0 and r == per_level:
                places[f"output_blocks.{n}.{2 if has_attention[level] else 1}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
            n += 1
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(old: str, new: str, transform=lambda t: t) -> None:
        for suffix in ("weight", "bias"):
            key = f"{old}.{suffix}"
            if key in own:
                out[f"{new}.{suffix}"] = transform(own[key])
                used.add(key)

    for old, new in places.items():
        take(old, new)
    for old, new in resnets.items():
        for part, name in RESBLOCK_KEYS.items():
            take(f"{old}.{part}", f"{new}.{name}")
    for old, new in attentions.items():
        take(f"{old}.norm", f"{new}.group_norm")
        take(f"{old}.proj_out", f"{new}.to_out.0", lambda t: t[..., 0] if t.ndim == 3 else t)
        split_qkv(own, f"{old}.qkv", new, config["attention_head_dim"], out, used)
    unused = sorted(set(own) - used)
    if unused:
        raise InfdError(f"the checkpoint's UNet has weights infd does not know where to put ({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}); its UNet differs from the released models'.")
    return out


def split_qkv(own: dict, key: str, new: str, head_dim: int, out: dict, used: set) -> None:
    """The legacy attention's one qkv conv (3C, C, 1), q, k and v interleaved per head, as to_q, to_k, to_v (C, C)."""
    weight, bias = own.get(f"{key}.weight"), own.get(f"{key}.bias")
    if weight is None or bias is None:
        return
    channels = weight.shape[1]
    heads = channels // head_dim
    w = weight.reshape(heads, 3, head_dim, channels)
    b = bias.reshape(heads, 3, head_dim)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        out[f"{new}.{name}.weight"] = w[:, i].reshape(channels, channels).contiguous()
        out[f"{new}.{name}.bias"] = b[:, i].reshape(channels).contiguous()
    used.update({f"{key}.weight", f"{key}.bias"})


def scheduler_config(ckpt: ReferenceCheckpoint) -> tuple[dict, int]:
    """The DDIM scheduler of the reference sampler, and its number of steps."""
    d = ckpt.diffusion
    scale = 1000 / d["steps"]  # the reference scales "linear" betas to the number of steps
    respacing = str(d["_sampling_timestep_respacing"])
    match = re.fullmatch(r"ddim(\d+)", respacing)
    if match is None:
        raise InfdError(f"'{ckpt.path}' samples with timestep respacing {respacing!r}; infd converts the DDIM striding 'ddimN' the released models use.")
    prediction = "v_prediction" if d["predict_velocity"] else "sample" if d["predict_xstart"] else "epsilon"
    config = dict(
        num_train_timesteps=d["steps"],
        beta_start=scale * d["linear_beta_start"],
        beta_end=scale * d["linear_beta_end"],
        beta_schedule="linear",  # a plain linspace, as np.linspace in the reference (not LDM's scaled_linear)
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
        prediction_type=prediction,
    )
    return config, int(match.group(1))


# ---------------------------------------------------------------- the whole conversion


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """Copy `state` into `module`, refusing any missing, extra or misshapen weight in one sentence."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        detail = (
            f"missing {missing[:2]}" if missing else f"unexpected {extra[:2]}" if extra else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, not {tuple(expected[wrong[0]].shape)}"
        )
        raise InfdError(f"'{path}' does not fit the {what} its arguments describe ({detail}); the file is damaged or not from the paper's code.")
    module.load_state_dict({k: v.to(expected[k].dtype).contiguous() for k, v in state.items()}, strict=True, assign=True)


def build_models(ckpt: ReferenceCheckpoint, ema: bool = True) -> tuple[NeuralFieldAutoencoder, UNet2DModel | None, DDIMScheduler | None, dict]:
    """The converted modules (weights still mmapped where possible) and a summary of what was found."""
    config = autoencoder_config(ckpt)
    with torch.device("meta"):
        autoencoder = NeuralFieldAutoencoder(**config)
    load_state(autoencoder, autoencoder_state(ckpt, config), "autoencoder", ckpt.path)
    summary = {
        "stage": ckpt.stage,
        "autoencoder parameters": sum(p.numel() for p in autoencoder.parameters()),
        "latent": f"{ckpt.latent.upper()} {'x'.join(map(str, ckpt.z_shape))}" + (f", {ckpt.n_embed} codes" if ckpt.latent == "vq" else ""),
        "ignored (training only)": sum(math.prod(t.shape) for k, t in ckpt.state.items() if k.startswith(IGNORED_PREFIXES)),
    }
    if ckpt.unet is None:
        return autoencoder.eval(), None, None, summary
    has_ema = any(k.startswith("z_dm_ema.") for k in ckpt.state)
    prefix = "z_dm_ema." if ema and has_ema else "z_dm."
    if not any(k.startswith(prefix) for k in ckpt.state):
        raise InfdError(f"'{ckpt.path}' names a diffusion model but holds no {prefix.rstrip('.')} weights; the file is damaged.")
    uconfig = unet_config(ckpt)
    with torch.device("meta"):
        unet = UNet2DModel(**uconfig)
    load_state(unet, unet_state(ckpt.state, prefix, uconfig), "UNet", ckpt.path)
    sconfig, steps = scheduler_config(ckpt)
    summary.update({"UNet parameters": sum(p.numel() for p in unet.parameters()), "UNet weights": "EMA" if prefix == "z_dm_ema." else "raw (no EMA)" if not has_ema else "raw (--no-ema)"})
    summary.update({"sampler": f"DDIM {steps} steps, eta {ckpt.ddim_eta:g}"})
    return autoencoder.eval(), unet.eval(), DDIMScheduler(**sconfig), {**summary, "steps": steps, "eta": ckpt.ddim_eta}


def convert_official(path: str | Path, out: str | Path, ema: bool = True, overwrite: bool = False) -> dict:
    """Convert a reference checkpoint (AE- or DM-stage) into a pipeline folder at `out`; returns the summary.

    The folder is written under a temporary name and renamed when complete, so a failed
    conversion leaves nothing at `out`.
    """
    from infd.diffusion.pipeline import INFDPipeline

    out = Path(out)
    check_output_path(out, folder=True)
    check_replaceable(out, PIPELINE_LAYOUT, overwrite, "infd convert-official")
    ckpt = read_reference_checkpoint(path)
    autoencoder, unet, scheduler, summary = build_models(ckpt, ema)
    with atomic_directory(out) as tmp:
        if unet is None:  # an autoencoder-only pipeline folder: every --ckpt takes it, sampling says what is missing
            autoencoder.save_pretrained(tmp / "autoencoder")
            index = {"_class_name": INFDPipeline.__name__, "_diffusers_version": diffusers.__version__, "autoencoder": ["infd.models.autoencoder", "NeuralFieldAutoencoder"]}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        else:
            INFDPipeline(autoencoder, unet, scheduler, sampling_steps=summary["steps"], sampling_eta=summary["eta"]).save_pretrained(tmp)
    return summary
