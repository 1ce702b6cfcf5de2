import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DModel, VQModel
from safetensors.torch import save_file
from typer.testing import CliRunner

from infd import rendering, store
from infd.cli import app
from infd.errors import InfdError
from infd.stable_diffusion.convert import FINETUNE_CONFIG, convert_autoencoder, convert_vae, finetune_config, load_ldm_autoencoder
from infd.training.autoencoder import AETrainConfig, train_autoencoder

REPO = Path(__file__).resolve().parent.parent
# Two levels (f2): a 32² input gives a 4x16x16 latent. 32 channels: LDM files assume 32 norm groups.
TINY_VAE = dict(
    block_out_channels=(32, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    sample_size=32,
)


def tiny_vae(cls=AutoencoderKL, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    extra = {"latent_channels": 4} if cls is AutoencoderKL else {"latent_channels": 3, "num_vq_embeddings": 16}
    return cls(**{**TINY_VAE, **extra, **overrides}).eval()


def saved_vae(folder: Path, **overrides) -> Path:
    tiny_vae(**overrides).save_pretrained(folder)
    return folder


def images(seed: int = 0, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def decoded(model, z, size) -> torch.Tensor:
    """The converted model's render in [-1, 1]."""
    return rendering.render(model, z, size, tile=None) * 2 - 1


def test_conversion_keeps_the_encoder_bit_for_bit_and_renders_the_original_decoder(tmp_path, one_torch_thread):
    vae = load_ldm_autoencoder(saved_vae(tmp_path / "vae"))
    model = convert_autoencoder(vae)
    assert model.config.input_size == 32 and model.latent_shape == (4, 16, 16) and model.config.scaling_factor == 0.18215
    x = images()
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        mean, logvar = model.encode_moments(x)
        assert torch.equal(mean, posterior.mean) and torch.equal(logvar, posterior.logvar)
        original = vae.decode(posterior.mean).sample.clamp(-1, 1)
        # At the original output size the new renderer starts as exactly the original decoder.
        assert (decoded(model, mean, (32, 32)) - original).abs().max() < 1e-5
        # Larger: the original image, bicubic-upsampled (CLIF's residual starts at zero)...
        upsampled = F.interpolate(vae.decode(posterior.mean).sample, size=(64, 64), mode="bicubic", align_corners=False).clamp(-1, 1)
        assert (decoded(model, mean, (64, 64)) - upsampled).abs().max() < 1e-4
        # ...and, as every renderer, seam-free: tiles equal the whole image.
        whole = rendering.render(model, mean, (70, 45), tile=None)
        assert torch.equal(rendering.render(model, mean, (70, 45), tile=16), whole)
        # The original head alone is the "fixed" baseline renderer.
        assert (rendering.render(model, mean, (32, 32), renderer="fixed") * 2 - 1 - original).abs().max() < 1e-5


def test_vq_f4_style_vqmodel_converts_too(one_torch_thread):
    vq = tiny_vae(VQModel)
    model = convert_autoencoder(vq)
    assert model.config.latent_type == "vq" and model.config.vq_codebook_size == 16
    x = images(1)
    with torch.no_grad():
        h = vq.encode(x).latents
        assert torch.equal(model.encode(x), h)
        assert (decoded(model, h, (32, 32)) - vq.decode(h).sample.clamp(-1, 1)).abs().max() < 1e-5


def test_saved_conversion_round_trips_and_writes_its_finetune_config(tmp_path):
    vae_folder = saved_vae(tmp_path / "sd" / "vae", scaling_factor=0.5, shift_factor=0.1)
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    model = convert_vae(tmp_path / "sd", tmp_path / "ae", renderer_hidden=16, freeze_decoder=True)  # an SD folder: its vae/
    again = store.load_autoencoder(tmp_path / "ae")
    assert again.config.scaling_factor == 0.5 and again.config.shift_factor == 0.1 and again.config.residual_renderer
    assert model.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    config = AETrainConfig.load(tmp_path / "ae" / FINETUNE_CONFIG)
    assert config.init == str((tmp_path / "ae").resolve()) and config.freeze_encoder and config.freeze_decoder
    assert config.data.input_size == 32
    with pytest.raises(InfdError, match="already exists"):
        convert_vae(vae_folder, tmp_path / "ae")


def test_the_shipped_finetune_config_is_the_one_convert_writes():
    shipped = AETrainConfig.load(REPO / "configs" / "ae-sd-finetune.json").to_dict()
    written = finetune_config(convert_autoencoder(tiny_vae(), input_size=512), init="RUN").to_dict()
    shipped.pop("init"), written.pop("init")
    assert shipped == written


def to_ldm_layout(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the original SD checkpoint layout (as in SD .ckpt/.safetensors files)."""

    def up(m) -> str:  # the LDM numbers decoder levels from the bottom
        return f"up.{levels - 1 - int(m[1])}"

    renames = [
        (r"down_blocks\.(\d+)\.resnets", r"down.\1.block"),
        (r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample"),
        (r"up_blocks\.(\d+)\.resnets", lambda m: up(m) + ".block"),
        (r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: up(m) + ".upsample"),
        (r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}"),
        (r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)", lambda m: "mid.attn_1." + {"group_norm": "norm", "to_out.0": "proj_out"}.get(m[1], m[1][-1])),
        (r"conv_norm_out", "norm_out"),
        (r"conv_shortcut", "nin_shortcut"),
    ]
    out = {}
    for key, value in state.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if ".attn_1." in key and value.ndim == 2:  # the LDM's attention projections are 1x1 convs
            value = value[:, :, None, None]
        out["first_stage_model." + key] = value.contiguous()
    return out


def test_single_safetensors_in_the_original_layout_converts_through_diffusers(tmp_path):
    vae = tiny_vae()
    save_file(to_ldm_layout(vae.state_dict(), 2), str(tmp_path / "vae.safetensors"))
    loaded = load_ldm_autoencoder(tmp_path / "vae.safetensors")
    assert loaded.config.scaling_factor == 0.18215 and tuple(loaded.config.block_out_channels) == (32, 32)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in vae.state_dict().items())
    assert load_ldm_autoencoder(tmp_path / "vae.safetensors", scaling_factor=0.13025).config.scaling_factor == 0.13025
    model = convert_autoencoder(loaded, input_size=16)
    assert model.latent_shape == (4, 8, 8)


def test_bad_sources_get_one_clear_sentence(tmp_path):
    with pytest.raises(InfdError, match="does not exist"):
        load_ldm_autoencoder(tmp_path / "nope")
    UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(tmp_path / "unet")
    with pytest.raises(InfdError, match="holds a UNet2DModel, not an AutoencoderKL"):
        load_ldm_autoencoder(tmp_path / "unet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InfdError, match="has no config.json"):
        load_ldm_autoencoder(tmp_path / "empty")
    broken = saved_vae(tmp_path / "broken")
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InfdError, match="could not load the AutoencoderKL"):
        load_ldm_autoencoder(broken)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InfdError, match="not a readable safetensors"):
        load_ldm_autoencoder(tmp_path / "junk.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InfdError, match="no VAE in the original Stable Diffusion layout"):
        load_ldm_autoencoder(tmp_path / "other.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(InfdError, match="never unpickles"):
        load_ldm_autoencoder(tmp_path / "model.ckpt")
    with pytest.raises(InfdError, match="activation relu"):
        convert_autoencoder(tiny_vae(act_fn="relu"))
    with pytest.raises(InfdError, match="must be divisible by 2"):
        convert_autoencoder(tiny_vae(), input_size=33)


def unchanged_weights(before, after) -> set[str]:
    after = after.state_dict()
    return {k for k, v in before.state_dict().items() if torch.equal(v, after[k])}


def test_finetuning_a_converted_model_with_a_frozen_encoder(image_folder, tmp_path, one_torch_thread):
    model = convert_vae(saved_vae(tmp_path / "vae"), tmp_path / "ae", renderer_hidden=16)
    config = AETrainConfig.load(tmp_path / "ae" / FINETUNE_CONFIG)
    overrides = dict(steps=2, batch_size=2, num_workers=0, perceptual="ffl", gan_weight=0.0, ema_decay=0.0, checkpoint_every=2, sample_every=100, lr=1e-3)
    for name, value in overrides.items():
        setattr(config, name, value)
    config.data.crop_size = 24
    last = train_autoencoder(config, image_folder, tmp_path / "run", progress=False)
    unchanged = unchanged_weights(model, store.load_autoencoder(last))
    assert all(k in unchanged for k in model.state_dict() if k.startswith(("encoder.", "quant_conv.")))
    assert "renderer.conv_out.weight" not in unchanged and "decoder.conv_in.weight" not in unchanged
    # The same through the CLI, the other way round: encoder trained, decoder trunk frozen.
    config_file = tmp_path / "finetune.json"
    config_file.write_text(json.dumps(dict(config.to_dict(), init=None)))
    args = ["train-ae", "--config", str(config_file), "--init", str(tmp_path / "ae"), "--data", str(image_folder), "--out", str(tmp_path / "run2")]
    result = CliRunner().invoke(app, [*args, "--no-freeze-encoder", "--freeze-decoder", "--no-progress"])
    assert result.exit_code == 0, result.output
    unchanged = unchanged_weights(model, store.load_autoencoder(tmp_path / "run2"))
    assert all(k in unchanged for k in model.state_dict() if k.startswith(("decoder.", "post_quant_conv.")))
    assert "encoder.conv_in.weight" not in unchanged and "renderer.conv_out.weight" not in unchanged


CLI = CliRunner()


def test_convert_vae_command(tmp_path):
    result = CLI.invoke(app, ["convert-vae", "--vae", str(saved_vae(tmp_path / "vae")), "--out", str(tmp_path / "ae"), "--renderer-hidden", "16", "--no-freeze-encoder"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "z 4x16x16 from 32x32" in text and "infd train-ae --config" in text
    assert not json.loads((tmp_path / "ae" / FINETUNE_CONFIG).read_text())["freeze_encoder"]
    assert store.load_autoencoder(tmp_path / "ae").config.renderer_hidden == 16
    (tmp_path / "not-vae").mkdir()
    (tmp_path / "not-vae" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    result = CLI.invoke(app, ["convert-vae", "--vae", str(tmp_path / "not-vae"), "--out", str(tmp_path / "ae2")])
    assert result.exit_code == 1 and "not an AutoencoderKL or VQModel" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "ae2").exists()
