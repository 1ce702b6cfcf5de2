"""configs/ae-paper.json and ldm-paper.json state the reference's ae_ffhq / dm_ffhq settings (github yinboc/infd cfgs/)."""

from pathlib import Path

import torch

from infd.models import NeuralFieldAutoencoder
from infd.training.autoencoder import AETrainConfig
from infd.training.ldm import LDMTrainConfig, build_unet

CONFIGS = Path(__file__).parent.parent / "configs"


def test_the_autoencoder_recipe_is_the_reference_one():
    config = AETrainConfig.load(CONFIGS / "ae-paper.json")
    with torch.device("meta"):
        model = NeuralFieldAutoencoder(input_size=config.data.input_size, **config.model)
    # encoder_vqf4 / decoder_vqf4: ch 128, ch_mult [1, 2, 4], 2 res blocks; VQ 8192 x 3; z 3x64x64 from 256²
    assert tuple(model.config.block_out_channels) == (128, 256, 512) and model.config.layers_per_block == 2
    assert model.latent_shape == (3, 64, 64) and model.feature_shape == (128, 256, 256)
    assert model.config.latent_type == "vq" and model.quantizer.n_e == 8192 and model.config.vq_distance == "expanded"
    assert not model.config.decoder_norm_out  # phi is the decoder before its final norm (give_pre_end)
    # renderer_concat_wrapper + simple_renderer_net {hidden_channels: 256}: GroupNorm CLIF
    assert model.config.renderer_type == "clif_groupnorm" and model.renderer.conv_in.out_channels == 256
    assert model.config.input_resampling == "lanczos"
    # trainers/ae.yaml and ae_ffhq.yaml: Adam (0.5, 0.9) at 3.6e-5 for every part, GAN from step 0 at
    # 0.75 with the adaptive weight, L1 + LPIPS, batch 8, 256² crops of 256..native resolutions
    assert (config.lr, config.disc_lr, tuple(config.adam_betas)) == (3.6e-5, 3.6e-5, (0.5, 0.9))
    assert (config.gan_weight, config.gan_start, config.adaptive_gan_weight) == (0.75, 0, True)
    assert (config.l1_weight, config.perceptual, config.perceptual_weight, config.vq_weight) == (1.0, "lpips", 1.0, 1.0)
    assert (config.batch_size, config.data.crop_size, config.data.input_size, config.steps) == (8, 256, 256, 1_000_000)
    assert config.grad_clip == 0 and config.ema_decay == 0


def test_the_diffusion_recipe_is_the_reference_one():
    config = LDMTrainConfig.load(CONFIGS / "ldm-paper.json")
    with torch.device("meta"):
        unet = build_unet(config.unet, (3, 64, 64))
    # openai_unet: 224 channels x [1, 2, 3, 4], 2 res blocks, attention at 8, 4 and 2 times downsampled, 32 channels a head
    assert tuple(unet.config.block_out_channels) == (224, 448, 672, 896) and unet.config.layers_per_block == 2
    assert tuple(unet.config.down_block_types) == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert unet.config.attention_head_dim == 32 and unet.config.resnet_time_scale_shift == "default"
    # dm.yaml / trainers/dm.yaml: linear betas 0.0015..0.0195 over 1000 steps, AdamW 9.6e-5 with decay 0.01, batch 48, EMA 0.9999
    assert (config.beta_start, config.beta_end, config.num_train_timesteps) == (0.0015, 0.0195, 1000)
    assert (config.lr, config.weight_decay, config.batch_size, config.ema_decay, config.steps) == (9.6e-5, 0.01, 48, 0.9999, 600_000)
    assert config.scaling_factor == 1.0 and config.sample_sampler == "ddim" and config.sample_steps == 200
