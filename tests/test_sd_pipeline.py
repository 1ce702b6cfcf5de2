import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from test_convert import tiny_vae
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from typer.testing import CliRunner

from infd.cli import app
from infd.errors import InfdError
from infd.stable_diffusion.convert import convert_vae
from infd.stable_diffusion.pipeline import INFDStableDiffusionPipeline, load_sd_pipeline

TEXT_WIDTH = 16


def tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters (vocab.json + merges.txt as SD ships them, no merges): works offline."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=12)


def write_tiny_sd(folder: Path, latent_channels: int = 4) -> Path:
    """A random tiny Stable Diffusion saved in the diffusers layout (model_index.json, vae/, text_encoder/, ...)."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(folder.parent / f"{folder.name}-vocab")
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=12)
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
    )
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    vae = tiny_vae(latent_channels=latent_channels)
    pipe = StableDiffusionPipeline(vae, text, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """(SD folder, converted autoencoder folder), built once for this module."""
    root = tmp_path_factory.mktemp("sd")
    sd = write_tiny_sd(root / "sd")
    convert_vae(sd / "vae", root / "ae", renderer_hidden=16)
    return sd, root / "ae"


def seeded(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_generates_the_requested_sizes_deterministically_per_seed(tiny_sd, one_torch_thread):
    pipe = load_sd_pipeline(*tiny_sd)
    options = dict(num_inference_steps=2, render_size=(40, 56), output_type="pt")
    a = pipe("a red cat", generator=seeded(0), **options).images
    assert a.shape == (1, 3, 40, 56) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(pipe("a red cat", generator=seeded(0), **options).images, a)
    assert not torch.equal(pipe("a red cat", generator=seeded(1), **options).images, a)
    assert not torch.equal(pipe("a blue dog", generator=seeded(0), **options).images, a)  # the prompt matters
    batch = pipe(["a red cat", "a dog"], negative_prompt=["blur", "fog"], num_images_per_prompt=2, generator=seeded(0, 1, 2, 3), **options).images
    assert batch.shape == (4, 3, 40, 56)
    pil = pipe("a red cat", generator=seeded(0), num_inference_steps=2, render_size=(24, 20), guidance_scale=1.0).images
    assert pil[0].size == (20, 24)
    # Sampled latents render later, at any size or region, to the very same pixels.
    z = pipe("a red cat", generator=seeded(0), num_inference_steps=2, output_type="latent").images
    assert z.shape == (1, 4, 16, 16)
    assert torch.equal(pipe.render(z, (40, 56), output_type="pt"), a)
    assert pipe.render(z, (30, 30), box=None, renderer="fixed", output_type="np").shape == (1, 30, 30, 3)


def test_save_and_load_round_trip(tiny_sd, tmp_path, one_torch_thread):
    pipe = load_sd_pipeline(*tiny_sd).use_sampler("ddim")
    before = pipe("a cat", generator=seeded(3), num_inference_steps=2, render_size=(32, 32), output_type="pt").images
    pipe.save_pretrained(tmp_path / "pipe")
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == ["autoencoder", "infd_stable_diffusion_pipeline.py", "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet"]
    again = INFDStableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    again.set_progress_bar_config(disable=True)
    assert type(again.scheduler).__name__ == "DDIMScheduler"
    assert torch.equal(again("a cat", generator=seeded(3), num_inference_steps=2, render_size=(32, 32), output_type="pt").images, before)
    assert torch.equal(load_sd_pipeline(tmp_path / "pipe")("a cat", generator=seeded(3), num_inference_steps=2, render_size=(32, 32), output_type="pt").images, before)
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe", custom_pipeline="infd_stable_diffusion_pipeline", trust_remote_code=True)
    assert type(loaded) is INFDStableDiffusionPipeline
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded("a cat", generator=seeded(3), num_inference_steps=2, render_size=(32, 32), output_type="pt").images, before)


def test_bad_inputs_get_one_clear_sentence(tiny_sd, tmp_path):
    sd, ae = tiny_sd
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(sd, broken)
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(InfdError, match="has no tokenizer/"):
        load_sd_pipeline(broken, ae)
    (broken / "tokenizer").mkdir()
    with pytest.raises(InfdError, match="could not load the tokenizer"):
        load_sd_pipeline(broken, ae)
    other = write_tiny_sd(tmp_path / "sd3", latent_channels=3)  # an SD whose UNet wants 3 latent channels
    with pytest.raises(InfdError, match="the UNet denoises 3-channel latents but the autoencoder's have 4"):
        load_sd_pipeline(other, ae)
    with pytest.raises(InfdError, match="not a saved INFDStableDiffusionPipeline; pass the converted autoencoder"):
        load_sd_pipeline(sd)
    with pytest.raises(InfdError, match="is not a folder"):
        load_sd_pipeline(tmp_path / "nope", ae)
    pipe = load_sd_pipeline(sd, ae)
    with pytest.raises(InfdError, match="height and width must be 32"):
        pipe("a cat", height=64, width=64)
    with pytest.raises(InfdError, match="render size"):
        pipe("a cat", render_size=(0, 64))
    with pytest.raises(InfdError, match="pass a prompt"):
        pipe([])
    with pytest.raises(InfdError, match="one generator per image"):
        pipe("a cat", generator=seeded(0, 1))
    with pytest.raises(InfdError, match="guidance scale"):
        pipe("a cat", guidance_scale=float("nan"))


def test_txt2img_command_writes_the_image_and_its_latent(tiny_sd, tmp_path, one_torch_thread):
    sd, ae = tiny_sd
    runner = CliRunner()
    common = ["--sd", str(sd), "--ae", str(ae), "--steps", "2", "--device", "cpu"]
    result = runner.invoke(app, ["txt2img", "--prompt", "a cat", "--size", "48x40", "--n", "2", "--sampler", "dpm++", "--out", str(tmp_path / "cat.png"), *common])
    assert result.exit_code == 0, result.output
    first = np.array(Image.open(tmp_path / "cat_0000.png"))
    assert first.shape == (40, 48, 3) and (tmp_path / "cat_0001.png").is_file()
    assert not np.array_equal(first, np.array(Image.open(tmp_path / "cat_0001.png")))
    # `infd render` turns the saved z back into the same pixels.
    result = runner.invoke(app, ["render", str(tmp_path / "cat_0000.z.safetensors"), "--ckpt", str(ae), "--size", "48x40", "--device", "cpu", "--out", str(tmp_path / "again.png")])
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.array(Image.open(tmp_path / "again.png")), first)
    result = runner.invoke(app, ["txt2img", "--prompt", "a cat", "--sd", str(tmp_path / "nope"), "--ae", str(ae), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "is not a folder" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["txt2img", "--prompt", "a cat", "--sampler", "euler", "--out", str(tmp_path / "x.png"), *common])
    assert result.exit_code == 1 and "unknown sampler" in result.output
    assert json.loads((sd / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_denoising_is_stable_diffusions_own(tiny_sd, one_torch_thread):
    """Same folder, prompt and seed: the latent StableDiffusionPipeline samples is the one we decode (scaled)."""
    sd, ae = tiny_sd
    reference = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    options = dict(negative_prompt="fog", num_inference_steps=3, guidance_scale=5.0)
    expected = reference("a red cat", height=32, width=32, generator=seeded(7)[0], output_type="latent", **options).images
    pipe = load_sd_pipeline(sd, ae)
    z = pipe("a red cat", generator=seeded(7), output_type="latent", **options).images
    assert torch.allclose(z * pipe.autoencoder.config.scaling_factor, expected, atol=1e-5)
